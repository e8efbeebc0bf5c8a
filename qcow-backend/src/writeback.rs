//! Write-behind: start the kernel's writeback of an image while a backup
//! streams in, instead of leaving all of it to the final FLUSH.
//!
//! Without it, every byte of a backup sits dirty in the page cache until the
//! client's FLUSH, which then has to write all of it: ingest and disk time
//! add up, and a hub running many backups floods the page cache (the
//! "flush storm" oVirt imageio ran into). Every [`WRITE_BEHIND_CHUNK`]
//! bytes written, `posix_fadvise(DONTNEED)` over the file makes Linux start
//! asynchronous writeback of its dirty pages and drop the pages already
//! clean. Dirty data is never discarded, so this changes nothing about what
//! is durable when: FLUSH still fsyncs. The call runs on an I/O thread,
//! never in a request's path.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{fadvise, Advice};

/// Bytes written between writeback starts.
pub const WRITE_BEHIND_CHUNK: u64 = 64 << 20;

/// Write-behind state of one image file.
#[derive(Debug)]
pub struct WriteBehind {
    file: File,
    pending: AtomicU64,
    running: AtomicBool,
}

impl WriteBehind {
    /// Track `file` (a duplicate of the image's descriptor).
    pub fn new(file: File) -> Arc<Self> {
        Arc::new(WriteBehind {
            file,
            pending: AtomicU64::new(0),
            running: AtomicBool::new(false),
        })
    }

    /// Count `n` bytes written; `true` when a writeback should start now
    /// (at most one runs at a time).
    pub fn add(&self, n: u64) -> bool {
        let total = self.pending.fetch_add(n, Ordering::Relaxed) + n;
        if total < WRITE_BEHIND_CHUNK {
            return false;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.pending.store(0, Ordering::Relaxed);
        true
    }

    /// Start writeback of the whole file and drop its clean pages (blocks
    /// briefly while I/O is submitted: call it off the async threads).
    pub fn kick(&self) {
        if let Err(e) = fadvise(&self.file, 0, None, Advice::DontNeed) {
            tracing::debug!(error = %e, "write-behind hint failed");
        }
        self.running.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_once_per_chunk_and_one_at_a_time() {
        let f = tempfile::tempfile().unwrap();
        let wb = WriteBehind::new(f);
        assert!(!wb.add(WRITE_BEHIND_CHUNK - 1));
        assert!(wb.add(1));
        // While one runs, no second one starts.
        assert!(!wb.add(WRITE_BEHIND_CHUNK));
        wb.kick();
        assert!(wb.add(WRITE_BEHIND_CHUNK));
        wb.kick();
    }
}
