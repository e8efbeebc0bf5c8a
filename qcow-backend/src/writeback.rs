//! Write-behind: start the kernel's writeback of an image while a backup
//! streams in, instead of leaving all of it to the final FLUSH.
//!
//! Without it, every byte of a backup sits dirty in the page cache until the
//! client's FLUSH, which then has to write all of it: ingest and disk time
//! add up, and a hub running many backups floods the page cache (the
//! "flush storm" oVirt imageio ran into). Every [`WRITE_BEHIND_CHUNK`]
//! bytes written, `posix_fadvise(DONTNEED)` over the file makes Linux
//! start asynchronous writeback of its dirty pages and drop the pages
//! already clean. Dirty data is never discarded, so this changes nothing
//! about what is durable when: FLUSH still fsyncs. The call runs on an I/O
//! thread, never in a request's path.
//!
//! Only streams get it. Under 4k random writes the hint cost a tenth of
//! the server's CPU (it walks the whole file's cache every 64 MiB) and
//! made every write wait on the inode lock against the writeback it
//! started, for nothing a random writer needs: the kernel's own dirty
//! limits bound its dirty pages, as for qemu-nbd. A write continues a
//! stream when it starts near where one of the last [`STREAMS`] streams
//! ended (nbdcopy's connections each write their own region); a chunk
//! mostly made of such writes starts writeback, any other is skipped.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{fadvise, Advice};

/// Bytes written between writeback starts.
pub const WRITE_BEHIND_CHUNK: u64 = 64 << 20;
/// Streams followed at once.
pub const STREAMS: usize = 8;
/// How far from a stream's end a write may start and still continue it
/// (requests in flight arrive a little out of order).
const NEAR: u64 = 8 << 20;

/// Write-behind state of one image file.
#[derive(Debug)]
pub struct WriteBehind {
    file: File,
    pending: AtomicU64,
    /// Of `pending`, the bytes that continued a stream.
    streamed: AtomicU64,
    running: AtomicBool,
    streams: Mutex<Streams>,
}

/// Where the last few streams of writes ended (guest offsets).
#[derive(Debug, Default)]
struct Streams {
    ends: [u64; STREAMS],
    next: usize,
}

impl Streams {
    /// Note a write of `n` bytes at `offset`; whether it continued a stream.
    fn note(&mut self, offset: u64, n: u64) -> bool {
        let end = offset.saturating_add(n);
        if let Some(e) = self.ends.iter_mut().find(|e| offset.abs_diff(**e) <= NEAR) {
            *e = (*e).max(end);
            return true;
        }
        self.ends[self.next] = end;
        self.next = (self.next + 1) % STREAMS;
        false
    }
}

impl WriteBehind {
    /// Track `file` (a duplicate of the image's descriptor).
    pub fn new(file: File) -> Arc<Self> {
        Arc::new(WriteBehind {
            file,
            pending: AtomicU64::new(0),
            streamed: AtomicU64::new(0),
            running: AtomicBool::new(false),
            streams: Mutex::new(Streams::default()),
        })
    }

    /// Count a write of `n` bytes at guest offset `offset`; `true` when a
    /// writeback should start now (at most one runs at a time).
    pub fn add(&self, offset: u64, n: u64) -> bool {
        let continued = self
            .streams
            .lock()
            .map(|mut s| s.note(offset, n))
            .unwrap_or(false);
        if continued {
            self.streamed.fetch_add(n, Ordering::Relaxed);
        }
        let total = self.pending.fetch_add(n, Ordering::Relaxed) + n;
        if total < WRITE_BEHIND_CHUNK {
            return false;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.pending.store(0, Ordering::Relaxed);
        let streamed = self.streamed.swap(0, Ordering::Relaxed);
        if streamed.saturating_mul(2) < total {
            // Mostly random writes: the kernel's dirty limits will do.
            self.running.store(false, Ordering::Release);
            return false;
        }
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
        assert!(!wb.add(0, WRITE_BEHIND_CHUNK - 1));
        assert!(wb.add(WRITE_BEHIND_CHUNK - 1, 1));
        // While one runs, no second one starts.
        assert!(!wb.add(WRITE_BEHIND_CHUNK, WRITE_BEHIND_CHUNK));
        wb.kick();
        assert!(wb.add(2 * WRITE_BEHIND_CHUNK, WRITE_BEHIND_CHUNK));
        wb.kick();
    }

    /// Four connections each streaming their own region, a little out of
    /// order, as nbdcopy -C 4 writes: writeback starts once per chunk.
    #[test]
    fn interleaved_streams_start_writeback() {
        let wb = WriteBehind::new(tempfile::tempfile().unwrap());
        let req = 256u64 << 10;
        let mut kicks = 0;
        for i in 0..(4 * WRITE_BEHIND_CHUNK / req) {
            let region = (i % 4) * (1 << 30);
            let step = i / 4;
            // Every other pair of requests swapped.
            let step = if step % 2 == 0 { step + 1 } else { step - 1 };
            if wb.add(region + step * req, req) {
                kicks += 1;
                wb.kick();
            }
        }
        assert_eq!(kicks, 4);
    }

    /// 4k writes all over a disk never start writeback.
    #[test]
    fn random_writes_leave_it_to_the_kernel() {
        let wb = WriteBehind::new(tempfile::tempfile().unwrap());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..(4 * WRITE_BEHIND_CHUNK / 4096) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % (64 << 30)) & !4095;
            assert!(!wb.add(offset, 4096), "random writes started writeback");
        }
    }
}
