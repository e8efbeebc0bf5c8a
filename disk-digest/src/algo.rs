//! The digest algorithm itself: leaves, segments, root. Pure functions on
//! byte slices, so a sender can compute the same digest while it reads its
//! source, in any order and in parallel.
//!
//! See the crate documentation for the exact definition.

use std::fmt;

/// Bytes per block (leaf).
pub const BLOCK_SIZE: u64 = 64 * 1024;
/// Blocks per segment.
pub const SEGMENT_BLOCKS: u64 = 1024;
/// Domain-separation prefix of the root hash.
pub const ROOT_DOMAIN: &[u8] = b"nbd-backup-hub disk digest v1";
/// The algorithm's name as the API and CLI report it.
pub const ALGORITHM: &str = "blake3-tree-v1";

/// A 32-byte BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The all-zero value, used in sidecars to mean "no entry" (a real
    /// BLAKE3 output is all zeroes with probability 2^-256).
    pub const NONE: Hash = Hash([0; 32]);

    /// Whether this is [`Hash::NONE`].
    pub fn is_none(&self) -> bool {
        self.0 == [0; 32]
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        s
    }

    /// Parse 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Hash> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Hash(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

/// The leaf of a block: BLAKE3 of its bytes.
pub fn leaf(data: &[u8]) -> Hash {
    // One call hashes the block's 1 KiB chunks with SIMD in parallel lanes.
    blake3::hash(data).into()
}

/// The leaf of a block of `len` zero bytes (cached for the full block size).
pub fn zero_leaf(len: u64) -> Hash {
    static FULL: std::sync::OnceLock<Hash> = std::sync::OnceLock::new();
    static ZEROES: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
    let len = len.min(BLOCK_SIZE) as usize;
    if len == BLOCK_SIZE as usize {
        *FULL.get_or_init(|| leaf(&ZEROES))
    } else {
        leaf(&ZEROES[..len])
    }
}

/// The hash of one segment from its leaves, in block order.
pub fn segment_hash(leaves: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    for l in leaves {
        h.update(&l.0);
    }
    h.finalize().into()
}

/// The root over every segment hash of a disk of `size` bytes.
pub fn root(size: u64, segments: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(ROOT_DOMAIN);
    h.update(&size.to_le_bytes());
    h.update(&(BLOCK_SIZE as u32).to_le_bytes());
    h.update(&(SEGMENT_BLOCKS as u32).to_le_bytes());
    for s in segments {
        h.update(&s.0);
    }
    h.finalize().into()
}

/// Block and segment arithmetic for a disk of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
}

impl Geometry {
    /// A disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Geometry { size }
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    /// Number of segments.
    pub fn segments(&self) -> u64 {
        self.blocks().div_ceil(SEGMENT_BLOCKS)
    }

    /// Byte offset of block `b`.
    pub fn block_offset(&self, b: u64) -> u64 {
        b.saturating_mul(BLOCK_SIZE)
    }

    /// Length of block `b` (the last one may be short; 0 past the end).
    pub fn block_len(&self, b: u64) -> u64 {
        let start = self.block_offset(b);
        self.size.saturating_sub(start).min(BLOCK_SIZE)
    }

    /// Blocks `[first, end)` of segment `s`.
    pub fn segment_blocks(&self, s: u64) -> (u64, u64) {
        let first = s.saturating_mul(SEGMENT_BLOCKS);
        let end = first.saturating_add(SEGMENT_BLOCKS).min(self.blocks());
        (first.min(end), end)
    }

    /// Segment of block `b`.
    pub fn segment_of(block: u64) -> u64 {
        block / SEGMENT_BLOCKS
    }

    /// Leaves of segment `s` if every block of it reads as zeroes.
    pub fn zero_leaves(&self, s: u64) -> Vec<Hash> {
        let (first, end) = self.segment_blocks(s);
        (first..end).map(|b| zero_leaf(self.block_len(b))).collect()
    }

    /// Hash of segment `s` if every block of it reads as zeroes (cached
    /// for whole segments: a sparse terabyte has thousands of them).
    pub fn zero_segment(&self, s: u64) -> Hash {
        static FULL: std::sync::OnceLock<Hash> = std::sync::OnceLock::new();
        let (first, end) = self.segment_blocks(s);
        if end - first == SEGMENT_BLOCKS && self.block_len(end - 1) == BLOCK_SIZE {
            return *FULL.get_or_init(|| segment_hash(&self.zero_leaves(s)));
        }
        segment_hash(&self.zero_leaves(s))
    }

    /// Blocks touched by `len` bytes at `offset`: the whole range
    /// `[first, end)` and whether the first and last are only partly covered.
    pub fn touched(&self, offset: u64, len: u64) -> Touched {
        if len == 0 {
            return Touched {
                first: 0,
                end: 0,
                head_partial: false,
                tail_partial: false,
            };
        }
        let end_byte = offset.saturating_add(len).min(self.size);
        let first = offset / BLOCK_SIZE;
        let end = end_byte.div_ceil(BLOCK_SIZE);
        let head_partial = offset % BLOCK_SIZE != 0 || end_byte < self.block_end(first);
        let last = end.saturating_sub(1);
        let tail_partial = end_byte < self.block_end(last) || self.block_offset(last) < offset;
        Touched {
            first,
            end,
            head_partial,
            tail_partial,
        }
    }

    fn block_end(&self, b: u64) -> u64 {
        self.block_offset(b).saturating_add(self.block_len(b))
    }
}

/// Blocks a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touched {
    /// First block.
    pub first: u64,
    /// One past the last block.
    pub end: u64,
    /// The first block is only partly covered.
    pub head_partial: bool,
    /// The last block is only partly covered.
    pub tail_partial: bool,
}

impl Touched {
    /// Whether block `b` (inside the range) is covered completely.
    pub fn is_whole(&self, b: u64) -> bool {
        !((b == self.first && self.head_partial) || (b + 1 == self.end && self.tail_partial))
    }
}

/// Digest of a whole disk given every block's bytes in order: the
/// reference implementation, used by tests and small tools.
pub fn digest_of_bytes(data: &[u8]) -> Hash {
    let g = Geometry::new(data.len() as u64);
    let mut segs = Vec::with_capacity(g.segments() as usize);
    for s in 0..g.segments() {
        let (first, end) = g.segment_blocks(s);
        let leaves: Vec<Hash> = (first..end)
            .map(|b| {
                let start = g.block_offset(b) as usize;
                leaf(&data[start..start + g.block_len(b) as usize])
            })
            .collect();
        segs.push(segment_hash(&leaves));
    }
    root(g.size(), &segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = leaf(b"abc");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn zero_leaf_matches_hashing_zeroes() {
        assert_eq!(zero_leaf(BLOCK_SIZE), leaf(&vec![0u8; BLOCK_SIZE as usize]));
        assert_eq!(zero_leaf(512), leaf(&[0u8; 512]));
    }

    #[test]
    fn geometry() {
        let g = Geometry::new(BLOCK_SIZE * SEGMENT_BLOCKS + 512);
        assert_eq!(g.blocks(), SEGMENT_BLOCKS + 1);
        assert_eq!(g.segments(), 2);
        assert_eq!(g.block_len(SEGMENT_BLOCKS), 512);
        assert_eq!(g.segment_blocks(1), (SEGMENT_BLOCKS, SEGMENT_BLOCKS + 1));
        let t = g.touched(0, BLOCK_SIZE);
        assert_eq!(
            (t.first, t.end, t.head_partial, t.tail_partial),
            (0, 1, false, false)
        );
        let t = g.touched(100, BLOCK_SIZE);
        assert_eq!(
            (t.first, t.end, t.head_partial, t.tail_partial),
            (0, 2, true, true)
        );
        // The short last block written whole.
        let t = g.touched(BLOCK_SIZE * SEGMENT_BLOCKS, 512);
        assert!(t.is_whole(SEGMENT_BLOCKS));
        let t = g.touched(BLOCK_SIZE, 4096);
        assert!(!t.is_whole(1));
    }

    #[test]
    fn zero_segments_match_hashing_zero_leaves() {
        let g = Geometry::new(BLOCK_SIZE * SEGMENT_BLOCKS * 2 + 4096);
        for s in 0..3 {
            assert_eq!(g.zero_segment(s), segment_hash(&g.zero_leaves(s)));
        }
        let zeroes = vec![0u8; g.size() as usize];
        let segs: Vec<Hash> = (0..3).map(|s| g.zero_segment(s)).collect();
        assert_eq!(root(g.size(), &segs), digest_of_bytes(&zeroes));
    }

    #[test]
    fn digest_depends_on_every_byte_and_the_size() {
        let mut d = vec![7u8; (BLOCK_SIZE * 3) as usize];
        let a = digest_of_bytes(&d);
        d[100_000] ^= 1;
        assert_ne!(a, digest_of_bytes(&d));
        d[100_000] ^= 1;
        d.push(0);
        assert_ne!(a, digest_of_bytes(&d));
    }
}
