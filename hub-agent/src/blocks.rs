//! Turning one read of the source into per-block facts: each 64 KiB
//! block's `blake3-tree-v1` leaf and whether it reads as zeroes, without
//! copying data that arrived in one piece.

use bytes::{Bytes, BytesMut};
use disk_digest::algo::{leaf, zero_leaf, Geometry};
use disk_digest::Hash;
use nbd_server::ReadChunk;

/// One block of a read.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    /// Its leaf.
    pub leaf: Hash,
    /// Whether every byte is zero.
    pub zero: bool,
}

/// Bytes `[at, at+len)` of a read made of `chunks`: a slice when one data
/// chunk covers them, else a copy with zeroes for holes.
pub fn slice_of(chunks: &[ReadChunk], at: u64, len: u64) -> Bytes {
    let mut pos = 0u64;
    let mut out: Option<BytesMut> = None;
    let end = at + len;
    for c in chunks {
        let (c_start, c_end) = (pos, pos + c.len());
        pos = c_end;
        if c_end <= at {
            continue;
        }
        if c_start >= end {
            break;
        }
        let from = at.max(c_start) - c_start;
        let to = end.min(c_end) - c_start;
        if let (None, ReadChunk::Data(d)) = (&out, c) {
            if c_start <= at && c_end >= end {
                return d.slice(from as usize..to as usize);
            }
        }
        let buf = out.get_or_insert_with(|| BytesMut::with_capacity(len as usize));
        match c {
            ReadChunk::Data(d) => buf.extend_from_slice(&d[from as usize..to as usize]),
            ReadChunk::Zero(_) => buf.resize(buf.len() + (to - from) as usize, 0),
        }
    }
    let mut buf = out.unwrap_or_default();
    // A short read would be a backend bug; zero-fill rather than misalign.
    buf.resize(len as usize, 0);
    buf.freeze()
}

/// Whether `range` of the read is a hole (zero chunks only).
fn is_hole(chunks: &[ReadChunk], at: u64, len: u64) -> bool {
    let mut pos = 0u64;
    let end = at + len;
    for c in chunks {
        let (c_start, c_end) = (pos, pos + c.len());
        pos = c_end;
        if c_end <= at || c_start >= end {
            continue;
        }
        if matches!(c, ReadChunk::Data(_)) {
            return false;
        }
    }
    true
}

/// Whether every byte is zero (16 bytes at a time, which the compiler
/// vectorizes).
pub fn all_zero(d: &[u8]) -> bool {
    let mut it = d.chunks_exact(16);
    let words_zero = it
        .by_ref()
        .all(|w| w.try_into().map(u128::from_ne_bytes).unwrap_or(1) == 0);
    words_zero && it.remainder().iter().all(|b| *b == 0)
}

/// Facts about blocks `[first, first+n)` of a disk of geometry `g`, from a
/// read starting at block `first`. CPU-bound: run it on the blocking pool.
pub fn classify(g: &Geometry, first: u64, n: u64, chunks: &[ReadChunk]) -> Vec<BlockInfo> {
    let base = g.block_offset(first);
    (first..first + n)
        .map(|b| {
            let at = g.block_offset(b) - base;
            let len = g.block_len(b);
            if is_hole(chunks, at, len) {
                return BlockInfo {
                    leaf: zero_leaf(len),
                    zero: true,
                };
            }
            let data = slice_of(chunks, at, len);
            if all_zero(&data) {
                BlockInfo {
                    leaf: zero_leaf(len),
                    zero: true,
                }
            } else {
                BlockInfo {
                    leaf: leaf(&data),
                    zero: false,
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use disk_digest::BLOCK_SIZE;

    #[test]
    fn classifies_holes_zero_data_and_data() {
        let g = Geometry::new(3 * BLOCK_SIZE + 10);
        let mut d = vec![0u8; (2 * BLOCK_SIZE + 10) as usize];
        d[BLOCK_SIZE as usize + 5] = 1;
        d[2 * BLOCK_SIZE as usize + 9] = 2;
        let chunks = vec![
            ReadChunk::Zero(BLOCK_SIZE as u32),
            ReadChunk::Data(Bytes::from(d.clone())),
        ];
        let info = classify(&g, 0, 4, &chunks);
        // A hole, zero data, data, a short data block.
        assert!(info[0].zero && info[1].zero);
        assert!(!info[2].zero && !info[3].zero);
        let mut whole = vec![0u8; BLOCK_SIZE as usize];
        whole.extend_from_slice(&d);
        for (i, b) in info.iter().enumerate() {
            let s = i * BLOCK_SIZE as usize;
            let e = (s + BLOCK_SIZE as usize).min(whole.len());
            assert_eq!(b.leaf, leaf(&whole[s..e]), "block {i}");
        }
        // Slices across chunks are copies with the hole as zeroes.
        let s = slice_of(&chunks, BLOCK_SIZE - 2, 4);
        assert_eq!(
            &s[..],
            &whole[(BLOCK_SIZE - 2) as usize..(BLOCK_SIZE + 2) as usize]
        );
        assert!(all_zero(&[0; 33]) && !all_zero(&[0, 0, 0, 1]));
    }
}
