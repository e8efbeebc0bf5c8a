//! Read-ahead for sequential reads of read-only layers (restores).
//!
//! The kernel reads ahead one stream per open file, one window at a time,
//! so a cold sequential restore runs at the rate of one outstanding request
//! on the device. A virtual disk serves several at once (on the reference
//! machine four parallel cold readers move 2.5× the bytes of one), so when
//! the image is being read sequentially we ask the kernel
//! (`posix_fadvise(WILLNEED)`) to start reading what the next [`WINDOW`]
//! bytes of the disk map to now: one call per run queues it on the device.
//! The pages land in the page cache (reclaimable), not in our memory.
//!
//! The stream is followed in the disk's own (guest) offsets, and the
//! window is resolved through the cluster mappings before it is hinted.
//! In a backing chain that is the only way to read ahead at all: each
//! incremental layer holds its changed clusters in the order they were
//! written, not in disk order, so a sequential restore reads every layer
//! file at scattered offsets and the kernel (and a per-file stream
//! detector) sees random reads. The same holds for a single image filled
//! by random writes. Random reads never trigger hints: only a read that
//! starts near where the previous one ended does.
//!
//! A window found already in the page cache (a warm restore: its first and
//! last pages are there) is not hinted, and the windows after it are not
//! even resolved until a read misses the page cache again: resolving a
//! window of a deep chain and asking the kernel about pages it holds is CPU
//! a warm reader is bound by. Only those two pages are probed: a probe of a
//! page that is not cached starts a small read around it, so probing every
//! run of a chain's window would double the requests on the device.
//!
//! Only layers nobody writes through this image get hints: the writable
//! top of a backup has the write-behind (`writeback.rs`) managing its
//! pages instead. The descriptor kept per layer is also what
//! `cached_read.rs` reads those layers' data through.

use std::fs::File;
use std::num::NonZeroU64;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{fadvise, Advice};

use crate::cached_read::{read_cached, Cached};

/// Bytes of the disk hinted ahead of a sequential reader.
pub const WINDOW: u64 = 64 << 20;
/// A new hint is issued once the reader is this close to the hinted end.
const REFILL: u64 = WINDOW / 2;
/// A read starting within this distance of the previous read's end
/// continues a sequential stream (NBD clients keep many requests in
/// flight, and the I/O threads complete them out of order).
const NEAR: u64 = 16 << 20;
/// Consecutive near reads before a stream counts as sequential: a random
/// reader lands near its previous read now and then, but not this often
/// in a row.
const PROOF: u32 = 8;

/// The reader's position in the disk.
#[derive(Debug, Default)]
struct Stream {
    /// End of the last read.
    last_end: u64,
    /// Everything below this was hinted already.
    hinted: u64,
    /// Consecutive reads near the previous one.
    run: u32,
    /// The last window hinted was in the page cache already, and no read
    /// has missed it since: skip windows.
    warm: bool,
}

/// The read-ahead state of one image's read-only layers.
#[derive(Debug, Default)]
pub struct ReadAhead {
    /// Each read-only layer's path (the name its storage reports) and an
    /// open descriptor of it.
    layers: Vec<(PathBuf, Arc<File>)>,
    stream: Mutex<Stream>,
}

impl ReadAhead {
    /// Track `file` (an open descriptor of the layer at `path`).
    pub fn add(&mut self, path: &Path, file: File) {
        self.layers.push((path.to_owned(), Arc::new(file)));
    }

    /// Whether any layer is tracked.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer's own descriptor, if `path` is a tracked (read-only) layer.
    pub fn descriptor(&self, path: &Path) -> Option<Arc<File>> {
        self.layers
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, f)| Arc::clone(f))
    }

    /// A read of `len` bytes at disk offset `offset` is about to happen:
    /// if it continues a sequential stream and the hinted window runs
    /// short, the disk range to hint now (the caller resolves it into
    /// layer-file runs for [`hint_window`](Self::hint_window)). Claimed
    /// here, so concurrent readers
    /// never hint the same range twice.
    pub fn due(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        if self.layers.is_empty() {
            return None;
        }
        let mut s = self.stream.lock().ok()?;
        let end = offset.saturating_add(len);
        if offset.abs_diff(s.last_end) > NEAR {
            // A jump: a new stream may start here.
            s.last_end = end;
            s.hinted = end;
            s.run = 0;
            return None;
        }
        s.last_end = s.last_end.max(end);
        s.run = s.run.saturating_add(1);
        if s.warm || s.run < PROOF || s.hinted >= end.saturating_add(REFILL) {
            return None;
        }
        let from = s.hinted.max(end);
        let to = end.saturating_add(WINDOW);
        s.hinted = to;
        (from < to).then_some(from..to)
    }

    /// Ask the kernel to read `len` bytes at `offset` of the layer at
    /// `path` into the page cache. Never fails (a hint is only a hint);
    /// layers not tracked (a writable top) are left alone.
    pub fn hint(&self, path: &Path, offset: u64, len: u64) {
        let (Some(file), Some(n)) = (self.descriptor(path), NonZeroU64::new(len)) else {
            return;
        };
        let _ = fadvise(&*file, offset, Some(n), Advice::WillNeed);
    }

    /// Whether the byte at `offset` of the tracked layer at `path` is in
    /// the page cache (if not, the probe starts a small read around it).
    pub fn is_cached(&self, path: &Path, offset: u64) -> bool {
        self.descriptor(path)
            .is_some_and(|f| matches!(read_cached(&f, &mut [0u8; 1], offset), Cached::Read(1)))
    }

    /// Hint every run of a window [`due`](Self::due) returned (`runs`:
    /// layer path, offset in it, length, in disk order), unless its first
    /// and last pages are cached: then skip it and the windows after it
    /// until [`missed`](Self::missed). Returns whether it hinted.
    pub fn hint_window(&self, runs: &[(PathBuf, u64, u64)]) -> bool {
        let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
            return false;
        };
        let last_byte = last.1.saturating_add(last.2.saturating_sub(1));
        let warm = self.is_cached(&first.0, first.1) && self.is_cached(&last.0, last_byte);
        if let Ok(mut s) = self.stream.lock() {
            s.warm = warm;
        }
        if warm {
            return false;
        }
        for (path, offset, len) in runs {
            self.hint(path, *offset, *len);
        }
        true
    }

    /// A read had to wait for the disk: windows are hinted again.
    pub fn missed(&self) {
        if let Ok(mut s) = self.stream.lock() {
            s.warm = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked() -> (tempfile::NamedTempFile, ReadAhead) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut ra = ReadAhead::default();
        ra.add(f.path(), f.reopen().unwrap());
        (f, ra)
    }

    fn hinted(ra: &ReadAhead) -> u64 {
        ra.stream.lock().unwrap().hinted
    }

    #[test]
    fn sequential_reads_hint_a_window_ahead_and_refill_it() {
        let (_f, ra) = tracked();
        let mb = 1u64 << 20;
        for i in 0..u64::from(PROOF) - 1 {
            assert_eq!(ra.due(i * mb, mb), None, "not yet proven sequential");
        }
        let last = u64::from(PROOF) - 1;
        let first = (last + 1) * mb + WINDOW;
        assert_eq!(ra.due(last * mb, mb), Some((last + 1) * mb..first));
        // Inside the window: no new hint.
        assert_eq!(ra.due((last + 1) * mb, mb), None);
        assert_eq!(hinted(&ra), first);
        // Once the reader is within REFILL of the hinted end, the window
        // moves on from where it ended.
        let mut o = (last + 2) * mb;
        let next = loop {
            if let Some(w) = ra.due(o, mb) {
                break w;
            }
            o += mb;
        };
        assert_eq!(next.start, first, "no gap, no overlap");
        assert_eq!(next.end, o + mb + WINDOW);
        assert!(o + mb + REFILL > first, "not before the refill mark");
        assert!(o + REFILL <= first, "at the first read past it");
    }

    /// A 4 MiB file written and synced (its pages clean, so they can be
    /// dropped without privilege), tracked.
    fn written() -> (tempfile::NamedTempFile, ReadAhead) {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 4 << 20]).unwrap();
        f.as_file().sync_all().unwrap();
        let mut ra = ReadAhead::default();
        ra.add(f.path(), f.reopen().unwrap());
        (f, ra)
    }

    /// Drop the file's pages; whether they went (tmpfs keeps them, and a
    /// file system without RWF_NOWAIT reads never shows them cached).
    /// Probes the file's last page, past the ranges the tests look at: a
    /// probe of an uncached page starts the kernel's read-ahead from it,
    /// which reaches `read_ahead_kb` (8 MiB on some hosts) forward, so a
    /// probe at 0 raced the tests' own probes of pages 2-3 MiB in.
    fn drop_pages(f: &tempfile::NamedTempFile, ra: &ReadAhead) -> bool {
        fadvise(f.as_file(), 0, NonZeroU64::new(4 << 20), Advice::DontNeed).unwrap();
        !ra.is_cached(f.path(), (4 << 20) - 4096)
    }

    #[test]
    fn a_warm_window_pauses_hints_until_a_read_misses() {
        let (f, ra) = written();
        let mb = 1u64 << 20;
        let runs = vec![(f.path().to_owned(), 2 * mb, mb)];
        let mut at = 0;
        let mut next = || {
            at += mb;
            ra.due(at, mb)
        };
        let first = std::iter::repeat_with(&mut next).find_map(|w| w).unwrap();
        if !ra.is_cached(f.path(), 2 * mb) {
            return; // no RWF_NOWAIT here: nothing ever looks cached
        }
        // All of it in the page cache: not hinted, and no window while no
        // read misses.
        assert!(!ra.hint_window(&runs));
        for _ in 0..(2 * WINDOW / mb) {
            assert_eq!(next(), None, "warm stream hinted");
        }
        // A read waited for the disk: a window ahead of the reader, who is
        // past the last one hinted by now.
        ra.missed();
        let again = next().expect("hints resume after a miss");
        assert!(again.start > first.end);
        assert_eq!(again.end - again.start, WINDOW);
        // A window that needs the disk is hinted and keeps hints going.
        if drop_pages(&f, &ra) {
            assert!(ra.hint_window(&runs));
            let more = std::iter::repeat_with(&mut next).find_map(|w| w).unwrap();
            assert_eq!(more.start, again.end);
        }
        // A window without data (all zeroes) hints nothing.
        assert!(!ra.hint_window(&[]));
    }

    #[test]
    fn is_cached_tells_what_the_page_cache_holds() {
        let (f, ra) = written();
        let mb = 1u64 << 20;
        let nowait = ra.is_cached(f.path(), 2 * mb);
        if drop_pages(&f, &ra) {
            assert!(!ra.is_cached(f.path(), 3 * mb));
        } else {
            assert_eq!(ra.is_cached(f.path(), 3 * mb), nowait);
        }
        assert!(!ra.is_cached(Path::new("/nonexistent/other"), 0));
    }

    #[test]
    fn random_reads_never_hint() {
        let (_f, ra) = tracked();
        for off in [10u64 << 30, 1 << 30, 30 << 30, 5 << 30] {
            assert_eq!(ra.due(off, 4096), None);
            assert_eq!(hinted(&ra), off + 4096, "no window past a jump");
        }
        // A few near reads after a jump are not yet a stream.
        for i in 1..u64::from(PROOF) {
            assert_eq!(ra.due((5 << 30) + i * 8192, 4096), None);
        }
    }

    #[test]
    fn an_image_without_read_only_layers_never_hints() {
        let ra = ReadAhead::default();
        for i in 0..64u64 {
            assert_eq!(ra.due(i << 20, 1 << 20), None);
        }
    }

    #[test]
    fn other_files_are_ignored() {
        let (f, ra) = tracked();
        assert!(ra.descriptor(Path::new("/nonexistent/other")).is_none());
        ra.hint(Path::new("/nonexistent/other"), 0, 1 << 20);
        assert!(
            ra.descriptor(f.path()).is_some(),
            "tracked layer's descriptor"
        );
        ra.hint(f.path(), 0, 1 << 20);
    }
}
