//! The digests of a restore point's ancestors, for inheriting what a
//! backup did not write.

use std::path::Path;

use crate::algo::{Geometry, Hash};
use crate::sidecar::{Sidecar, SidecarError};

/// One finished sidecar with its header and segment table.
#[derive(Debug)]
pub struct Layer {
    /// The file.
    pub sidecar: Sidecar,
    /// Root of this restore point.
    pub root: Hash,
    /// Root of its parent (NONE for a full).
    pub parent_root: Hash,
    /// Segment hashes of this restore point.
    pub segments: Vec<Hash>,
}

/// The sidecars of a restore point and its ancestors, newest first.
#[derive(Debug, Default)]
pub struct DigestChain {
    layers: Vec<Layer>,
}

impl DigestChain {
    /// No ancestors (a full backup).
    pub fn empty() -> Self {
        DigestChain::default()
    }

    /// Open sidecars, newest first. Each must describe a disk of `size`
    /// bytes and record the next one's root as its parent, so a chain
    /// assembled from the wrong files is refused.
    pub fn open(paths: &[impl AsRef<Path>], size: u64) -> Result<DigestChain, SidecarError> {
        let mut layers: Vec<Layer> = Vec::with_capacity(paths.len());
        for p in paths {
            let (sidecar, header, segments) = Sidecar::open(p.as_ref())?;
            if header.size != size {
                return Err(SidecarError::Invalid(format!(
                    "{}: disk size {} differs from {size}",
                    p.as_ref().display(),
                    header.size
                )));
            }
            if let Some(child) = layers.last() {
                if child.parent_root != header.root {
                    return Err(SidecarError::Invalid(format!(
                        "{}: root does not match its child's parent root",
                        p.as_ref().display()
                    )));
                }
            }
            layers.push(Layer {
                sidecar,
                root: header.root,
                parent_root: header.parent_root,
                segments,
            });
        }
        Ok(DigestChain { layers })
    }

    /// The newest restore point's root (NONE when empty).
    pub fn root(&self) -> Hash {
        self.layers.first().map_or(Hash::NONE, |l| l.root)
    }

    /// Layers, newest first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Segment hash `s` of the newest restore point.
    pub fn segment(&self, g: &Geometry, s: u64) -> Hash {
        self.layers
            .first()
            .and_then(|l| l.segments.get(s as usize).copied())
            .unwrap_or_else(|| g.zero_segment(s))
    }

    /// Logical leaves of segment `s` at the newest restore point: each
    /// block's leaf from the nearest layer that wrote it, else zeroes.
    pub fn leaves(&self, g: &Geometry, s: u64) -> std::io::Result<Vec<Hash>> {
        let (first, end) = g.segment_blocks(s);
        let mut out = vec![Hash::NONE; (end - first) as usize];
        let mut missing = out.len();
        for l in &self.layers {
            if missing == 0 {
                break;
            }
            let leaves = l.sidecar.read_leaves(first, end)?;
            for (o, h) in out.iter_mut().zip(leaves) {
                if o.is_none() && !h.is_none() {
                    *o = h;
                    missing -= 1;
                }
            }
        }
        if missing > 0 {
            for (i, o) in out.iter_mut().enumerate() {
                if o.is_none() {
                    *o = crate::algo::zero_leaf(g.block_len(first + i as u64));
                }
            }
        }
        Ok(out)
    }
}
