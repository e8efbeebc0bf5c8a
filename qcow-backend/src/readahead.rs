//! Read-ahead for sequential reads of read-only layers (restores).
//!
//! The kernel reads ahead one stream per open file, one window at a time,
//! so a cold sequential restore runs at the rate of one outstanding request
//! on the device. A virtual disk serves several at once (on the reference
//! machine four parallel cold readers move 2.5× the bytes of one), so when
//! a layer is being read sequentially we ask the kernel
//! (`posix_fadvise(WILLNEED)`) to start reading the next [`WINDOW`] bytes
//! of that file now: one call queues the whole window on the device. The
//! pages land in the page cache (reclaimable), not in our memory. Random
//! reads never trigger it: only a read that starts near where the previous
//! read of the same file ended does.
//!
//! Only layers nobody writes through this image get hints: the writable
//! top of a backup has the write-behind (`writeback.rs`) managing its
//! pages instead. The descriptor kept per layer is also what
//! `cached_read.rs` reads those layers' data through.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{fadvise, Advice};

/// Bytes hinted ahead of a sequential reader.
pub const WINDOW: u64 = 64 << 20;
/// A new hint is issued once the reader is this close to the hinted end.
const REFILL: u64 = WINDOW / 2;
/// A read starting within this distance of the previous read's end on the
/// same file continues a sequential stream (NBD clients keep many requests
/// in flight, and the I/O threads complete them out of order).
const NEAR: u64 = 16 << 20;
/// Consecutive near reads before a stream counts as sequential: a random
/// reader lands near its previous read now and then, but not this often
/// in a row.
const PROOF: u32 = 8;

/// One layer file's stream state.
#[derive(Debug)]
struct Stream {
    path: PathBuf,
    file: Arc<File>,
    /// End of the last read.
    last_end: u64,
    /// Everything below this was hinted already.
    hinted: u64,
    /// Consecutive reads near the previous one.
    run: u32,
}

/// The read-ahead state of one image's read-only layers.
#[derive(Debug, Default)]
pub struct ReadAhead {
    streams: Mutex<Vec<Stream>>,
}

impl ReadAhead {
    /// Track `file` (an open descriptor of the layer at `path`, the name the
    /// layer's storage reports).
    pub fn add(&self, path: &Path, file: File) {
        if let Ok(mut s) = self.streams.lock() {
            s.push(Stream {
                path: path.to_owned(),
                file: Arc::new(file),
                last_end: 0,
                hinted: 0,
                run: 0,
            });
        }
    }

    /// Whether any layer is tracked.
    pub fn is_empty(&self) -> bool {
        self.streams.lock().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// A read of `len` bytes at `offset` of the layer file at `path` is
    /// about to happen: if it continues a sequential stream, hint the
    /// window ahead of it. Never fails (a hint is only a hint). Returns the
    /// layer's own descriptor if `path` is tracked (a read-only layer).
    pub fn reading(&self, path: &Path, offset: u64, len: u64) -> Option<Arc<File>> {
        let mut streams = self.streams.lock().ok()?;
        let s = streams.iter_mut().find(|s| s.path == path)?;
        let file = Arc::clone(&s.file);
        let end = offset.saturating_add(len);
        if offset.abs_diff(s.last_end) > NEAR {
            // A jump: a new stream may start here.
            s.last_end = end;
            s.hinted = end;
            s.run = 0;
            return Some(file);
        }
        s.last_end = s.last_end.max(end);
        s.run = s.run.saturating_add(1);
        if s.run < PROOF || s.hinted >= end.saturating_add(REFILL) {
            return Some(file);
        }
        let from = s.hinted.max(end);
        let to = end.saturating_add(WINDOW);
        s.hinted = to;
        if let Some(n) = std::num::NonZeroU64::new(to - from) {
            let _ = fadvise(&*file, from, Some(n), Advice::WillNeed);
        }
        Some(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked() -> (tempfile::NamedTempFile, ReadAhead) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let ra = ReadAhead::default();
        ra.add(f.path(), f.reopen().unwrap());
        (f, ra)
    }

    fn hinted(ra: &ReadAhead) -> u64 {
        ra.streams.lock().unwrap()[0].hinted
    }

    #[test]
    fn sequential_reads_hint_a_window_ahead_and_refill_it() {
        let (f, ra) = tracked();
        let mb = 1u64 << 20;
        for i in 0..u64::from(PROOF) - 1 {
            ra.reading(f.path(), i * mb, mb);
            assert_eq!(hinted(&ra), 0, "not yet proven sequential");
        }
        let last = u64::from(PROOF) - 1;
        ra.reading(f.path(), last * mb, mb);
        let first = (last + 1) * mb + WINDOW;
        assert_eq!(hinted(&ra), first);
        // Inside the window: no new hint.
        ra.reading(f.path(), (last + 1) * mb, mb);
        assert_eq!(hinted(&ra), first);
        // Past the refill mark: the window moves on.
        let at = (last + 2) * mb + WINDOW / 2;
        for o in ((last + 2) * mb..at).step_by(mb as usize) {
            ra.reading(f.path(), o, mb);
        }
        ra.reading(f.path(), at, mb);
        assert!(hinted(&ra) > first, "window moved on");
        assert!(hinted(&ra) <= at + mb + WINDOW);
    }

    #[test]
    fn random_reads_never_hint() {
        let (f, ra) = tracked();
        for off in [10u64 << 30, 1 << 30, 30 << 30, 5 << 30] {
            ra.reading(f.path(), off, 4096);
            assert_eq!(hinted(&ra), off + 4096, "no window past a jump");
        }
        // A few near reads after a jump are not yet a stream.
        for i in 1..u64::from(PROOF) {
            ra.reading(f.path(), (5 << 30) + i * 8192, 4096);
        }
        assert_eq!(hinted(&ra), (5 << 30) + 4096);
    }

    #[test]
    fn other_files_are_ignored() {
        let (f, ra) = tracked();
        assert!(ra
            .reading(Path::new("/nonexistent/other"), 0, 1 << 20)
            .is_none());
        assert_eq!(hinted(&ra), 0);
        assert!(
            ra.reading(f.path(), 0, 1 << 20).is_some(),
            "tracked layer's descriptor"
        );
    }
}
