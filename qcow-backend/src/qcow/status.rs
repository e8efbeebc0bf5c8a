//! Block status through the chain, with the depth of each extent.

use std::io;

use imago::ShallowMapping;
use nbd_server::Extent;

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
    mut pos: u64,
    end: u64,
    first_only: bool,
) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    while pos < end && out.len() < MAX_STATUS_EXTENTS {
        let Some(e) = status_at(a, pos, end - pos).await? else {
            break;
        };
        let n = e.length;
        match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero && l.depth == e.depth => {
                l.length += e.length
            }
            Some(l) if first_only && (l.hole != e.hole || l.zero != e.zero) => break,
            _ => out.push(e),
        }
        pos += n;
    }
    Ok(out)
}

/// Status of the run starting at `off`, walking the chain layer by layer so
/// the depth is known. `None` at the end of the image.
pub(super) async fn status_at(top: &Access, off: u64, max: u64) -> io::Result<Option<Extent>> {
    let mut layer = top;
    let mut lo = off;
    let mut len = max;
    let mut depth = 1u32;
    loop {
        let (m, n) = layer.get_shallow_mapping(lo, len).await?;
        len = len.min(n);
        let e = match m {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Extent {
                length: len,
                hole: false,
                zero: false,
                depth,
            },
            ShallowMapping::Zero { explicit: true, .. } => Extent {
                length: len,
                hole: true,
                zero: true,
                depth,
            },
            ShallowMapping::Zero { .. } => Extent::hole(len),
            ShallowMapping::Indirect {
                layer: next,
                offset,
                ..
            } => {
                layer = next;
                lo = offset;
                depth += 1;
                continue;
            }
            ShallowMapping::Eof { .. } if depth == 1 => return Ok(None),
            // Past the end of a shorter backing file: reads as zero.
            _ => Extent::hole(len),
        };
        return Ok((e.length > 0).then_some(e));
    }
}
