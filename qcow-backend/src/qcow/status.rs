//! Block status through the chain, with the depth of each extent.

use std::io;

use nbd_server::Extent;

use super::layer_walk::{LayerWalk, PieceKind};
use super::*;

/// Most extents one block-status call walks.
pub(super) const MAX_STATUS_EXTENTS: usize = 4096;

/// The extents of `[pos, end)`, same-status neighbours merged. With
/// `first_only` the walk stops where the `hole`/`zero` status first
/// changes: all a `REQ_ONE` request uses (its `base:allocation` extent is
/// then as long as the data allows; depth changes before that point still
/// split it for `qemu:allocation-depth`). qemu's client sends `REQ_ONE`
/// with the rest of the disk as length for every extent it visits, so
/// walking the whole rest each time made `qemu-img convert` quadratic in
/// the number of extents.
pub(super) async fn status_walk(
    a: &Access,
    pos: u64,
    end: u64,
    first_only: bool,
) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut walk = LayerWalk::new(a, pos..end);
    while out.len() < MAX_STATUS_EXTENTS {
        let Some(p) = walk.next().await? else {
            break;
        };
        let e = match p.kind {
            PieceKind::Raw(..) | PieceKind::Special => Extent {
                length: p.len,
                hole: false,
                zero: false,
                depth: p.depth,
            },
            PieceKind::Zero { explicit: true } => Extent {
                length: p.len,
                hole: true,
                zero: true,
                depth: p.depth,
            },
            // The disk's end: nothing more to say.
            PieceKind::Eof if p.depth == 1 => break,
            // Unallocated all the way down, or past the end of a shorter
            // backing file: reads as zero.
            PieceKind::Zero { explicit: false } | PieceKind::Eof => Extent::hole(p.len),
        };
        match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero && l.depth == e.depth => {
                l.length += e.length
            }
            Some(l) if first_only && (l.hole != e.hole || l.zero != e.zero) => break,
            _ => out.push(e),
        }
    }
    Ok(out)
}
