//! Where a read-only image's bytes lie, remembered per 4 MiB window, so a
//! READ whose window is known never leaves the connection's thread.
//!
//! imago's futures are not `Send`, so every READ otherwise hops to the
//! image's I/O thread and back: two wake-ups per request, the largest
//! cost left in a warm chain restore after the copies (18 % of the
//! server's samples in `finish_task_switch` and the wake-up locks). A
//! read-only image's mapping never changes while it is open, so the runs
//! one READ resolves on the I/O thread can serve every later READ of the
//! same window: as zero runs and as (layer descriptor, offset) runs that
//! are read with a page-cache-only `preadv2`, whatever is not cached going
//! to the blocking pool as on the I/O thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::direct_read::{Direct, DirectRun};

/// Bytes of disk per remembered window (resolving one costs about one
/// mapping lookup per layer and run in it).
pub(super) const WINDOW: u64 = 4 << 20;
/// A window cut into more runs than this (a 512-byte cluster image written
/// in random order) is remembered as unservable: its READs go the usual way.
const MAX_WINDOW_RUNS: usize = 1024;
/// Runs remembered per image, about 3 MiB; the oldest windows go first.
const MAX_RUNS: usize = 64 << 10;

/// The remembered windows of one read-only image.
#[derive(Debug, Default)]
pub(super) struct RunCache {
    inner: Mutex<Windows>,
    /// READs served from remembered runs.
    served: AtomicU64,
}

#[derive(Debug, Default)]
struct Windows {
    by_index: HashMap<u64, Arc<[DirectRun]>>,
    /// Oldest first.
    order: VecDeque<u64>,
    runs: usize,
}

/// The window `[offset, offset + len)` lies in, if one (and `len > 0`).
pub(super) fn window_of(offset: u64, len: u64) -> Option<u64> {
    let last = offset.checked_add(len.checked_sub(1)?)?;
    (offset / WINDOW == last / WINDOW).then_some(offset / WINDOW)
}

impl RunCache {
    fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        // Nothing here can be left half-updated by a panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runs of `[offset, offset + len)`, clipped to it, if its window
    /// is remembered.
    pub fn lookup(&self, offset: u64, len: u64) -> Option<Vec<DirectRun>> {
        let window = Arc::clone(self.windows().by_index.get(&window_of(offset, len)?)?);
        let end = offset.checked_add(len)?;
        let first = window.partition_point(|r| r.at.saturating_add(r.len) <= offset);
        let mut out = Vec::new();
        for r in window[first..].iter().take_while(|r| r.at < end) {
            let at = r.at.max(offset);
            let n = r.at.saturating_add(r.len).min(end) - at;
            let src = match &r.src {
                Direct::Zero => Direct::Zero,
                Direct::File(f, host) => Direct::File(Arc::clone(f), host.checked_add(at - r.at)?),
            };
            out.push(DirectRun { at, len: n, src });
        }
        // The window's runs tile it; anything else is not used.
        let covered: u64 = out.iter().map(|r| r.len).sum();
        (covered == len).then_some(out)
    }

    /// Count a READ served from remembered runs.
    pub fn served_one(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// READs served from remembered runs so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether window `index` is remembered.
    pub fn contains(&self, index: u64) -> bool {
        self.windows().by_index.contains_key(&index)
    }

    /// Remember window `index` as `runs` (in disk order, tiling it). No
    /// runs, or more than [`MAX_WINDOW_RUNS`], remember that its READs go
    /// the usual way, so they do not resolve the window again each time.
    pub fn insert(&self, index: u64, mut runs: Vec<DirectRun>) {
        if runs.len() > MAX_WINDOW_RUNS {
            runs = Vec::new();
        }
        // An unservable window counts as one run against the bound.
        let cost = runs.len().max(1);
        let mut w = self.windows();
        if w.by_index.contains_key(&index) {
            return;
        }
        while w.runs + cost > MAX_RUNS {
            let Some(old) = w.order.pop_front() else {
                break;
            };
            if let Some(r) = w.by_index.remove(&old) {
                w.runs -= r.len().max(1);
            }
        }
        w.runs += cost;
        w.order.push_back(index);
        w.by_index.insert(index, runs.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File as StdFile;

    fn file() -> Arc<StdFile> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    #[test]
    fn a_window_is_one_aligned_4_mib_range() {
        assert_eq!(window_of(0, WINDOW), Some(0));
        assert_eq!(window_of(WINDOW - 1, 1), Some(0));
        assert_eq!(window_of(WINDOW - 1, 2), None);
        assert_eq!(window_of(3 * WINDOW + 5, 4096), Some(3));
        assert_eq!(window_of(5, 0), None);
        assert_eq!(window_of(u64::MAX, 2), None);
    }

    #[test]
    fn lookups_clip_runs_and_shift_file_offsets() {
        let c = RunCache::default();
        let f = file();
        let w = WINDOW;
        c.insert(
            1,
            vec![
                DirectRun {
                    at: w,
                    len: 100,
                    src: Direct::Zero,
                },
                DirectRun {
                    at: w + 100,
                    len: w - 100,
                    src: Direct::File(Arc::clone(&f), 7000),
                },
            ],
        );
        assert!(c.contains(1) && !c.contains(0));
        let r = c.lookup(w + 50, 100).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].at, r[0].len), (w + 50, 50));
        assert!(matches!(r[0].src, Direct::Zero));
        assert_eq!((r[1].at, r[1].len), (w + 100, 50));
        assert!(matches!(r[1].src, Direct::File(_, 7000)));
        let r = c.lookup(w + 1000, 10).unwrap();
        assert!(matches!(
            r[..],
            [DirectRun {
                src: Direct::File(_, 7900),
                len: 10,
                ..
            }]
        ));
        // Another window, or across two: not known.
        assert!(c.lookup(0, 10).is_none());
        assert!(c.lookup(2 * w - 5, 10).is_none());
    }

    #[test]
    fn memory_is_bounded_oldest_windows_first() {
        let c = RunCache::default();
        let per = MAX_WINDOW_RUNS;
        let window = |i: u64| -> Vec<DirectRun> {
            let n = WINDOW / per as u64;
            (0..per as u64)
                .map(|k| DirectRun {
                    at: i * WINDOW + k * n,
                    len: n,
                    src: Direct::Zero,
                })
                .collect()
        };
        // Too many runs for one window, or none: known, never served.
        let mut big = window(0);
        big.push(DirectRun {
            at: WINDOW,
            len: 0,
            src: Direct::Zero,
        });
        c.insert(0, big);
        assert!(c.contains(0) && c.lookup(0, 4096).is_none());
        c.insert(1, Vec::new());
        assert!(c.contains(1) && c.lookup(WINDOW, 4096).is_none());
        assert_eq!(c.windows().runs, 2);
        let fit = (MAX_RUNS / per) as u64;
        for i in 2..fit + 4 {
            c.insert(i, window(i));
        }
        assert!(!c.contains(0) && !c.contains(1) && !c.contains(2) && !c.contains(3));
        assert!(c.contains(4) && c.contains(fit + 3));
        assert!(c.windows().runs <= MAX_RUNS);
    }
}
