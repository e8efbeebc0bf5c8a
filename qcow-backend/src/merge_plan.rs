//! What a merge has to do with each range of the disk, decided from the
//! top chain's allocation status alone (pure, no I/O).
//!
//! The merged image keeps the layers `top ..= X` and sits on X's backing.
//! A range whose data comes from one of the kept layers must be written
//! into the new image; a range served from below X already reads right
//! through the new backing and stays unallocated. Decisions are made per
//! cluster *of the new image*, so that no two writes ever share a cluster
//! (imago's partial-cluster hazards, and a copy-on-write read of the
//! backing per partial write, both stay out of the picture) even when the
//! layers have other cluster sizes than the top.

use nbd_server::Extent;

/// What the new image needs for a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Reads right through the new backing (or as zero without one).
    Skip,
    /// Must read as zero although the new backing may hold data there.
    Zero,
    /// Data from a kept layer: read through the top chain and write.
    Copy,
}

impl Action {
    /// The action for a cluster made of ranges with `self` and `other`.
    /// Anything mixed is copied: reading through the top gives exactly the
    /// bytes the cluster must hold, whatever they come from.
    fn mix(self, other: Action) -> Action {
        if self == other {
            self
        } else {
            Action::Copy
        }
    }
}

/// Classify one extent of the top chain. `kept` is the number of layers
/// merged (top ..= X, so X's depth); `has_backing` whether X has a backing
/// file that the new image will sit on.
pub(crate) fn classify(e: &Extent, kept: u32, has_backing: bool) -> Action {
    if e.depth == 0 || e.depth > kept {
        // Depth 0 reads as zero in every layer, the new backing included.
        Action::Skip
    } else if e.zero {
        if has_backing {
            Action::Zero
        } else {
            Action::Skip
        }
    } else {
        Action::Copy
    }
}

/// A range the new image needs written; `offset` and `len` are whole
/// clusters of the new image (except at the end of the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub offset: u64,
    pub len: u64,
    pub action: Action,
}

/// Turns the top chain's extents (fed in order) into cluster-aligned runs.
#[derive(Debug)]
pub(crate) struct Planner {
    cluster: u64,
    size: u64,
    /// Where the next extent starts.
    pos: u64,
    /// A cluster only partly covered so far: its start and mixed action.
    edge: Option<(u64, Action)>,
    runs: Vec<Run>,
}

impl Planner {
    pub fn new(size: u64, cluster: u64) -> Self {
        Planner {
            cluster: cluster.max(1),
            size,
            pos: 0,
            edge: None,
            runs: Vec::new(),
        }
    }

    /// Where the next extent must start.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The next `len` bytes need `action`.
    pub fn push(&mut self, len: u64, action: Action) {
        let end = (self.pos + len).min(self.size);
        let mut start = self.pos;
        self.pos = end;
        if let Some((cs, prev)) = self.edge.take() {
            let ce = (cs + self.cluster).min(self.size);
            let mixed = prev.mix(action);
            if end < ce {
                self.edge = Some((cs, mixed));
                return;
            }
            self.emit(cs, ce - cs, mixed);
            start = ce;
        }
        if start >= end {
            return;
        }
        // `start` is cluster-aligned here: every earlier partial cluster
        // went to `edge`.
        let full_end = end - end % self.cluster;
        if full_end > start {
            self.emit(start, full_end - start, action);
        }
        let tail = full_end.max(start);
        if end > tail {
            if end == self.size {
                self.emit(tail, end - tail, action);
            } else {
                self.edge = Some((tail, action));
            }
        }
    }

    fn emit(&mut self, offset: u64, len: u64, action: Action) {
        if action == Action::Skip || len == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some(r) if r.action == action && r.offset + r.len == offset => r.len += len,
            _ => self.runs.push(Run {
                offset,
                len,
                action,
            }),
        }
    }

    /// Runs that can no longer grow (all but the last, unless `finished`).
    pub fn take(&mut self, finished: bool) -> Vec<Run> {
        if finished {
            if let Some((cs, a)) = self.edge.take() {
                self.emit(cs, self.size - cs, a);
            }
            return std::mem::take(&mut self.runs);
        }
        let keep = self.runs.pop();
        let out = std::mem::take(&mut self.runs);
        self.runs.extend(keep);
        out
    }
}

/// Split a run into pieces of at most `chunk` bytes (a multiple of the
/// cluster size, so pieces stay cluster-aligned).
pub(crate) fn pieces(run: Run, chunk: u64) -> impl Iterator<Item = Run> {
    let chunk = chunk.max(1);
    (0..run.len.div_ceil(chunk)).map(move |i| {
        let offset = run.offset + i * chunk;
        Run {
            offset,
            len: chunk.min(run.offset + run.len - offset),
            action: run.action,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::{Copy, Skip, Zero};

    fn plan(size: u64, cluster: u64, exts: &[(u64, Action)]) -> Vec<(u64, u64, Action)> {
        let mut p = Planner::new(size, cluster);
        let mut out = Vec::new();
        for (len, a) in exts {
            p.push(*len, *a);
            out.extend(p.take(false));
        }
        out.extend(p.take(true));
        out.into_iter()
            .map(|r| (r.offset, r.len, r.action))
            .collect()
    }

    #[test]
    fn aligned_extents_map_one_to_one_and_skips_vanish() {
        let r = plan(
            64,
            8,
            &[(16, Copy), (8, Skip), (8, Zero), (16, Zero), (16, Copy)],
        );
        assert_eq!(r, vec![(0, 16, Copy), (24, 24, Zero), (48, 16, Copy)]);
    }

    #[test]
    fn partly_covered_clusters_are_copied_whole() {
        // Zero 0..12 then skip 12..32: cluster 8..16 is mixed.
        let r = plan(32, 8, &[(12, Zero), (20, Skip)]);
        assert_eq!(r, vec![(0, 8, Zero), (8, 8, Copy)]);
        // A tiny data extent inside a skipped cluster copies that cluster.
        let r = plan(32, 8, &[(9, Skip), (2, Copy), (21, Skip)]);
        assert_eq!(r, vec![(8, 8, Copy)]);
        // Several small extents within one cluster, all skip: nothing.
        let r = plan(16, 8, &[(3, Skip), (3, Skip), (10, Skip)]);
        assert!(r.is_empty());
    }

    #[test]
    fn unaligned_disk_end_is_covered() {
        let r = plan(20, 8, &[(20, Copy)]);
        assert_eq!(r, vec![(0, 20, Copy)]);
        let r = plan(20, 8, &[(17, Skip), (3, Zero)]);
        assert_eq!(r, vec![(16, 4, Copy)]);
    }

    #[test]
    fn extents_past_the_end_are_clamped() {
        let r = plan(16, 8, &[(100, Copy)]);
        assert_eq!(r, vec![(0, 16, Copy)]);
    }

    #[test]
    fn classify_by_depth_and_backing() {
        let e = |depth, zero| Extent {
            length: 1,
            hole: zero,
            zero,
            depth,
        };
        assert_eq!(classify(&e(1, false), 2, true), Copy);
        assert_eq!(classify(&e(2, false), 2, true), Copy);
        assert_eq!(classify(&e(3, false), 2, true), Skip);
        assert_eq!(classify(&e(2, true), 2, true), Zero);
        assert_eq!(classify(&e(2, true), 2, false), Skip);
        assert_eq!(classify(&e(0, true), 2, true), Skip);
    }

    #[test]
    fn pieces_are_bounded_and_contiguous() {
        let run = Run {
            offset: 8,
            len: 40,
            action: Copy,
        };
        let p: Vec<_> = pieces(run, 16).map(|r| (r.offset, r.len)).collect();
        assert_eq!(p, vec![(8, 16), (24, 16), (40, 8)]);
    }
}
