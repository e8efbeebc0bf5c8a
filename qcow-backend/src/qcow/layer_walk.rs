//! A disk range resolved through the chain layer by layer, in disk order:
//! what reads ([`map_runs`](super::mapping::map_runs)) and block status
//! ([`status_walk`](super::status::status_walk)) are built on.
//!
//! imago's `get_mapping` walks from the top down to the owning layer for
//! every run it returns, and in an incremental chain a run is mostly one
//! cluster (each layer holds a few scattered ones): a warm 20-deep restore
//! made about 13 lookups per 64 KiB cluster. Here a stretch that a layer
//! does not hold is one `Indirect` run, which the layer below resolves as a
//! whole, so a request costs about one lookup per layer it reaches plus one
//! per run it returns.

use std::io;
use std::ops::Range;

use imago::file::File;
use imago::ShallowMapping;

use super::Access;

/// What one piece of the range is in the layer that decides it.
#[derive(Debug)]
pub(super) enum PieceKind<'a> {
    /// Plain data at this offset of this layer's file.
    Raw(&'a File, u64),
    /// Encoded data (compressed clusters): only imago can read it.
    Special,
    /// Zeroes: `explicit` when the layer says so (a zero cluster), not when
    /// the bottom layer simply does not hold it.
    Zero { explicit: bool },
    /// Past the end of the layer: of the top image (the disk's end), or of
    /// a backing file shorter than its overlay (reads as zeroes).
    Eof,
}

/// One piece of the range: where it starts, its length, the depth of the
/// layer that decides it (1: the top) and what it is there.
#[derive(Debug)]
pub(super) struct Piece<'a> {
    pub at: u64,
    pub len: u64,
    pub depth: u32,
    pub kind: PieceKind<'a>,
}

/// A stretch still to resolve: `len` bytes at `off` in `layer`, which are
/// the disk's bytes at `at`.
#[derive(Clone, Copy)]
struct Stretch<'a> {
    layer: &'a Access,
    off: u64,
    at: u64,
    len: u64,
    depth: u32,
}

/// The pieces of one disk range, in disk order ([`LayerWalk::next`]).
pub(super) struct LayerWalk<'a> {
    /// The next stretch is last: a lower layer's stretch is pushed above
    /// the rest of the layer that points to it.
    todo: Vec<Stretch<'a>>,
}

impl<'a> LayerWalk<'a> {
    pub fn new(top: &'a Access, range: Range<u64>) -> Self {
        let len = range.end.saturating_sub(range.start);
        let todo = (len > 0)
            .then_some(Stretch {
                layer: top,
                off: range.start,
                at: range.start,
                len,
                depth: 1,
            })
            .into_iter()
            .collect();
        LayerWalk { todo }
    }

    /// The next piece, `None` once the range is covered.
    pub async fn next(&mut self) -> io::Result<Option<Piece<'a>>> {
        while let Some(s) = self.todo.pop() {
            let (m, n) = s.layer.get_shallow_mapping(s.off, s.len).await?;
            let (n, kind) = match m {
                // imago says 0 bytes: the whole stretch is past the end.
                ShallowMapping::Eof { .. } => (s.len, PieceKind::Eof),
                ShallowMapping::Raw {
                    storage, offset, ..
                } => (n, PieceKind::Raw(storage, offset)),
                ShallowMapping::Zero { explicit, .. } => (n, PieceKind::Zero { explicit }),
                ShallowMapping::Indirect {
                    layer: lower,
                    offset: lower_off,
                    ..
                } => {
                    let n = n.clamp(1, s.len);
                    // A backing offset near u64::MAX (no sane image has
                    // one) would wrap in the lower stretch's rest.
                    if lower_off.checked_add(n).is_none() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "backing offset overflows",
                        ));
                    }
                    self.rest(s, n);
                    self.todo.push(Stretch {
                        layer: lower,
                        off: lower_off,
                        at: s.at,
                        len: n,
                        depth: s.depth + 1,
                    });
                    continue;
                }
                _ => (n, PieceKind::Special),
            };
            let n = n.clamp(1, s.len);
            self.rest(s, n);
            return Ok(Some(Piece {
                at: s.at,
                len: n,
                depth: s.depth,
                kind,
            }));
        }
        Ok(None)
    }

    /// Queue what is left of `s` after its first `n` bytes (`n ≤ s.len`;
    /// `s.off + s.len` does not wrap: the top's is inside the disk, a lower
    /// one's was checked when it was queued).
    fn rest(&mut self, s: Stretch<'a>, n: u64) {
        if n < s.len {
            self.todo.push(Stretch {
                off: s.off + n,
                at: s.at + n,
                len: s.len - n,
                ..s
            });
        }
    }
}
