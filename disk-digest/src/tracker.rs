//! What a backup wrote, block by block, while it is being written.
//!
//! Each mutating request registers the blocks it touches before it runs
//! and reports when it is done. A block covered whole by a successful WRITE
//! gets the leaf hashed from the payload; by a successful WRITE_ZEROES, the
//! zero leaf. Anything else (a partly covered block, a TRIM, a failed
//! request, or two requests overlapping in time on one block, whose order
//! on disk we cannot know) marks the block for read-back when the backup
//! completes. So the recorded leaf is always what a reader gets.
//!
//! Synchronous and socket-free; the backend wrapper drives it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::algo::{zero_leaf, Geometry, Hash, Touched};

/// How a request ended, for the blocks it covered whole.
#[derive(Debug, Clone, Copy)]
pub enum Ended<'a> {
    /// Written with data; one leaf per block of the range, in order
    /// (entries of partly covered blocks are ignored).
    Leaves(&'a [Hash]),
    /// Zeroed.
    Zeroes,
    /// Content not known (TRIM, failure): read back at the end.
    Unknown,
}

#[derive(Debug, Default, Clone, Copy)]
struct Flight {
    count: u32,
    conflicted: bool,
}

/// A sparse set of block numbers (4096 blocks per word group).
#[derive(Debug, Default)]
struct BlockSet {
    groups: BTreeMap<u64, Box<[u64; 64]>>,
    len: u64,
}

impl BlockSet {
    fn insert(&mut self, b: u64) {
        let g = self
            .groups
            .entry(b / 4096)
            .or_insert_with(|| Box::new([0; 64]));
        let (w, bit) = (((b % 4096) / 64) as usize, b % 64);
        if g[w] & (1 << bit) == 0 {
            g[w] |= 1 << bit;
            self.len += 1;
        }
    }

    fn remove(&mut self, b: u64) {
        if let Some(g) = self.groups.get_mut(&(b / 4096)) {
            let (w, bit) = (((b % 4096) / 64) as usize, b % 64);
            if g[w] & (1 << bit) != 0 {
                g[w] &= !(1 << bit);
                self.len -= 1;
            }
        }
    }

    fn drain(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len as usize);
        for (gi, g) in std::mem::take(&mut self.groups) {
            for (w, word) in g.iter().enumerate() {
                let mut word = *word;
                while word != 0 {
                    let bit = u64::from(word.trailing_zeros());
                    out.push(gi * 4096 + w as u64 * 64 + bit);
                    word &= word - 1;
                }
            }
        }
        self.len = 0;
        out
    }
}

#[derive(Debug, Default)]
struct State {
    inflight: HashMap<u64, Flight>,
    reread: BlockSet,
    /// Leaves not yet written to the sidecar.
    pending: BTreeMap<u64, Hash>,
    /// Segments holding any block this backup wrote.
    touched_segments: BTreeSet<u64>,
}

/// Per-backup write tracking for one disk.
#[derive(Debug)]
pub struct Tracker {
    geometry: Geometry,
    state: Mutex<State>,
}

impl Tracker {
    /// Track a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Tracker {
            geometry: Geometry::new(size),
            state: Mutex::new(State::default()),
        }
    }

    /// The disk geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-updated
        // entry that matters: at worst a block is re-read.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a mutating request of `len` bytes at `offset` (already
    /// validated against the disk size) before it runs.
    pub fn begin(&self, offset: u64, len: u64) -> Touched {
        let t = self.geometry.touched(offset, len);
        let mut st = self.state();
        for b in t.first..t.end {
            let f = st.inflight.entry(b).or_default();
            if f.count > 0 {
                f.conflicted = true;
            }
            f.count += 1;
            st.touched_segments.insert(Geometry::segment_of(b));
        }
        t
    }

    /// Report that the request registered as `t` finished.
    pub fn end(&self, t: Touched, how: Ended<'_>) {
        let mut st = self.state();
        for (i, b) in (t.first..t.end).enumerate() {
            let conflicted = match st.inflight.get_mut(&b) {
                Some(f) => {
                    let c = f.conflicted;
                    f.count = f.count.saturating_sub(1);
                    if f.count == 0 {
                        st.inflight.remove(&b);
                    }
                    c
                }
                None => true,
            };
            let leaf = match how {
                _ if conflicted || !t.is_whole(b) => None,
                Ended::Leaves(l) => l.get(i).copied().filter(|h| !h.is_none()),
                Ended::Zeroes => Some(zero_leaf(self.geometry.block_len(b))),
                Ended::Unknown => None,
            };
            match leaf {
                Some(h) => {
                    st.reread.remove(b);
                    st.pending.insert(b, h);
                }
                None => {
                    st.pending.remove(&b);
                    st.reread.insert(b);
                }
            }
        }
    }

    /// Leaves waiting to be written, once there are at least `min` of them.
    pub fn take_pending(&self, min: usize) -> Vec<(u64, Hash)> {
        let mut st = self.state();
        if st.pending.len() < min.max(1) {
            return Vec::new();
        }
        std::mem::take(&mut st.pending).into_iter().collect()
    }

    /// Blocks that must be read back, emptying the set (call once nothing
    /// is in flight).
    pub fn take_rereads(&self) -> Vec<u64> {
        self.state().reread.drain()
    }

    /// Segments this backup wrote into.
    pub fn touched_segments(&self) -> Vec<u64> {
        self.state().touched_segments.iter().copied().collect()
    }

    /// Requests still registered.
    pub fn in_flight(&self) -> usize {
        self.state().inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::{leaf, BLOCK_SIZE};

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn whole_writes_record_leaves_partial_ones_reread() {
        let t = Tracker::new(8 * B);
        let r = t.begin(0, 2 * B);
        t.end(r, Ended::Leaves(&[leaf(b"0"), leaf(b"1")]));
        let r = t.begin(2 * B + 10, 100);
        t.end(r, Ended::Leaves(&[leaf(b"x")]));
        let r = t.begin(4 * B, 2 * B);
        t.end(r, Ended::Zeroes);
        let r = t.begin(6 * B, B);
        t.end(r, Ended::Unknown);
        let p = t.take_pending(1);
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 4, 5]);
        assert_eq!(p[2].1, zero_leaf(B));
        assert_eq!(t.take_rereads(), vec![2, 6]);
        assert_eq!(t.touched_segments(), vec![0]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn overlapping_requests_force_a_reread_and_a_later_whole_write_clears_it() {
        let t = Tracker::new(4 * B);
        let a = t.begin(0, B);
        let b = t.begin(0, B);
        t.end(b, Ended::Leaves(&[leaf(b"b")]));
        t.end(a, Ended::Leaves(&[leaf(b"a")]));
        assert!(t.take_pending(1).is_empty());
        assert_eq!(t.take_rereads(), vec![0]);
        let r = t.begin(B, 10);
        t.end(r, Ended::Leaves(&[]));
        let r = t.begin(B, B);
        t.end(r, Ended::Leaves(&[leaf(b"c")]));
        assert!(t.take_rereads().is_empty());
        assert_eq!(t.take_pending(1), vec![(1, leaf(b"c"))]);
    }

    #[test]
    fn short_last_block_counts_as_whole() {
        let t = Tracker::new(B + 512);
        let r = t.begin(B, 512);
        t.end(r, Ended::Zeroes);
        assert_eq!(t.take_pending(1), vec![(1, zero_leaf(512))]);
    }
}
