//! Verifying a chain of restore points against their recorded digests,
//! reading every layer's data once.
//!
//! The oldest restore point (a full) is read whole. Each newer one is read
//! only where it holds data of its own: the blocks its sidecar lists plus
//! any block its image allocates (from block status), so metadata that
//! points somewhere it should not is read too. Every other block of a
//! newer restore point reads exactly as in its parent, which was already
//! checked. Per restore point this yields the blocks that read wrong, the
//! recomputed root, and whether it matches the recorded one.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use nbd_server::{BackendError, BlockBackend};

use crate::algo::{root, segment_hash, zero_leaf, Geometry, Hash};
use crate::read::{read_leaves, segment_leaves};
use crate::sidecar::Sidecar;

/// Segments verified at once.
const SEGMENT_CONCURRENCY: usize = 3;

/// One restore point to verify: its image (opened read-only with its
/// chain), its sidecar, and the root the catalog recorded.
#[derive(Debug)]
pub struct VerifyLayer {
    /// The restore point as a reader sees it.
    pub backend: Arc<dyn BlockBackend>,
    /// Its sidecar.
    pub sidecar: Arc<Sidecar>,
    /// The root recorded at completion.
    pub expected_root: Hash,
}

/// What verification found for one restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    /// Root recomputed from the data.
    pub root: Hash,
    /// Whether it equals the recorded root.
    pub root_ok: bool,
    /// Blocks whose content differs from what was recorded, as a reader of
    /// this restore point sees them (inherited from older points included).
    pub bad_blocks: Vec<u64>,
    /// The subset of `bad_blocks` held by this restore point's own image.
    pub own_bad_blocks: Vec<u64>,
}

impl LayerReport {
    /// Whether the restore point reads exactly as recorded.
    pub fn is_ok(&self) -> bool {
        self.root_ok && self.bad_blocks.is_empty()
    }
}

/// Verification could not run (as opposed to finding corruption).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading an image failed (a read error on a restore point is itself
    /// a finding; callers report it as corrupt).
    #[error("reading: {0}")]
    Read(#[from] BackendError),
    /// Reading a sidecar failed.
    #[error("digest sidecar: {0}")]
    Sidecar(#[from] std::io::Error),
    /// The layers do not describe one disk.
    #[error("{0}")]
    Mismatch(String),
}

/// Per segment, per layer: segment hash, bad blocks visible, own bad blocks.
type SegmentOutcome = Vec<(Hash, Vec<u64>, Vec<u64>)>;

/// Blocks `[first, end)` that `backend` allocates in its own top layer.
async fn own_allocated(
    backend: &Arc<dyn BlockBackend>,
    g: &Geometry,
    first: u64,
    end: u64,
) -> Result<Vec<u64>, BackendError> {
    let start = g.block_offset(first);
    let stop = g.block_offset(end).min(g.size());
    let mut pos = start;
    let mut out = Vec::new();
    while pos < stop {
        let extents = backend.block_status(pos, stop - pos).await?;
        if extents.is_empty() {
            break;
        }
        for e in extents {
            if e.length == 0 || pos >= stop {
                break;
            }
            let len = e.length.min(stop - pos);
            if e.depth == 1 && !e.hole {
                let b0 = pos / crate::algo::BLOCK_SIZE;
                let b1 = (pos + len).div_ceil(crate::algo::BLOCK_SIZE);
                out.extend(b0..b1);
            }
            pos += len;
        }
    }
    out.dedup();
    Ok(out)
}

async fn verify_segment(
    layers: &[VerifyLayer],
    g: Geometry,
    s: u64,
) -> Result<SegmentOutcome, VerifyError> {
    let (first, end) = g.segment_blocks(s);
    let mut out = Vec::with_capacity(layers.len());
    let mut current: Vec<Hash> = Vec::new();
    let mut visible_bad: Vec<bool> = vec![false; (end - first) as usize];
    for (i, layer) in layers.iter().enumerate() {
        let listed = layer.sidecar.read_leaves(first, end)?;
        let mut own_bad = Vec::new();
        if i == 0 {
            current = segment_leaves(&layer.backend, g, s).await?;
            for (k, (got, want)) in current.iter().zip(&listed).enumerate() {
                let b = first + k as u64;
                let want = if want.is_none() {
                    zero_leaf(g.block_len(b))
                } else {
                    *want
                };
                if *got != want {
                    own_bad.push(b);
                    visible_bad[k] = true;
                }
            }
        } else {
            let mut blocks: Vec<u64> = listed
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_none())
                .map(|(k, _)| first + k as u64)
                .collect();
            blocks.extend(own_allocated(&layer.backend, &g, first, end).await?);
            blocks.sort_unstable();
            blocks.dedup();
            // Read in runs of consecutive blocks.
            let mut k = 0;
            while k < blocks.len() {
                let mut j = k + 1;
                while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && j - k < 64 {
                    j += 1;
                }
                let (r0, r1) = (blocks[k], blocks[j - 1] + 1);
                let got = read_leaves(&layer.backend, g, r0, r1).await?;
                for (b, h) in (r0..r1).zip(got) {
                    let idx = (b - first) as usize;
                    let want = match listed.get(idx) {
                        Some(l) if !l.is_none() => *l,
                        _ => current.get(idx).copied().unwrap_or(Hash::NONE),
                    };
                    if h != want {
                        own_bad.push(b);
                        visible_bad[idx] = true;
                    } else if listed.get(idx).is_some_and(|l| !l.is_none()) {
                        // Rewritten correctly here: older damage is hidden.
                        visible_bad[idx] = false;
                    }
                    if let Some(c) = current.get_mut(idx) {
                        *c = h;
                    }
                }
                k = j;
            }
        }
        let vis: Vec<u64> = visible_bad
            .iter()
            .enumerate()
            .filter(|(_, v)| **v)
            .map(|(k, _)| first + k as u64)
            .collect();
        out.push((segment_hash(&current), vis, own_bad));
    }
    Ok(out)
}

/// Verify restore points `layers`, oldest first (each the child of the one
/// before). `progress` gets bytes of disk covered after each segment.
pub async fn verify_chain(
    layers: Vec<VerifyLayer>,
    mut progress: impl FnMut(u64),
) -> Result<Vec<LayerReport>, VerifyError> {
    let Some(first) = layers.first() else {
        return Ok(Vec::new());
    };
    let size = first.backend.size();
    if layers
        .iter()
        .any(|l| l.backend.size() != size || l.sidecar.geometry().size() != size)
    {
        return Err(VerifyError::Mismatch(
            "restore points of different sizes".into(),
        ));
    }
    let g = Geometry::new(size);
    let layers = Arc::new(layers);
    let n = layers.len();
    let mut segs: Vec<Vec<Hash>> = vec![Vec::with_capacity(g.segments() as usize); n];
    let mut reports: Vec<LayerReport> = (0..n)
        .map(|_| LayerReport {
            root: Hash::NONE,
            root_ok: false,
            bad_blocks: Vec::new(),
            own_bad_blocks: Vec::new(),
        })
        .collect();
    let mut results = stream::iter(0..g.segments())
        .map(|s| {
            let layers = Arc::clone(&layers);
            async move { verify_segment(&layers, g, s).await }
        })
        .buffered(SEGMENT_CONCURRENCY);
    let mut s = 0u64;
    while let Some(per_layer) = results.try_next().await? {
        for (i, (h, vis, own)) in per_layer.into_iter().enumerate() {
            segs[i].push(h);
            reports[i].bad_blocks.extend(vis);
            reports[i].own_bad_blocks.extend(own);
        }
        s += 1;
        let (_, end) = g.segment_blocks(s - 1);
        progress(g.block_offset(end).min(size));
    }
    for (i, r) in reports.iter_mut().enumerate() {
        r.root = root(size, &segs[i]);
        r.root_ok = r.root == layers[i].expected_root;
    }
    Ok(reports)
}

/// Consecutive block numbers merged into `(first, count)` runs.
pub fn block_runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((f, c)) if *f + *c == b => *c += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::BLOCK_SIZE;
    use crate::{DigestBackend, DigestChain};
    use bytes::Bytes;
    use nbd_server::MemoryBackend;

    #[tokio::test]
    async fn finds_a_flipped_byte_and_only_there() {
        let dir = tempfile::tempdir().unwrap();
        let size = 40 * BLOCK_SIZE;
        let mem = Arc::new(MemoryBackend::new(size));
        let be: Arc<dyn BlockBackend> = mem.clone();
        let p = dir.path().join("a.digest");
        let d = DigestBackend::new(Arc::clone(&be), &p).unwrap();
        d.write(0, Bytes::from(vec![5u8; (10 * BLOCK_SIZE) as usize]))
            .await
            .unwrap();
        let h = d.finish(&DigestChain::empty()).await.unwrap();
        let layer = || VerifyLayer {
            backend: Arc::clone(&be),
            sidecar: Arc::new(Sidecar::open(&p).unwrap().0),
            expected_root: h.root,
        };
        let r = verify_chain(vec![layer()], |_| {}).await.unwrap();
        assert!(r[0].is_ok(), "{r:?}");
        be.write(3 * BLOCK_SIZE + 17, Bytes::from_static(&[6]))
            .await
            .unwrap();
        let r = verify_chain(vec![layer()], |_| {}).await.unwrap();
        assert!(!r[0].root_ok);
        assert_eq!(r[0].bad_blocks, vec![3]);
        assert_eq!(block_runs(&[3, 4, 5, 9]), vec![(3, 3), (9, 1)]);
    }
}
