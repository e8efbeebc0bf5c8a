//! The digest sidecar kept beside each image (`<image>.digest`).
//!
//! ```text
//! [0, 4096)            header (little endian):
//!    0  8  magic "HUBDIGST"
//!    8  4  version (1)
//!   12  4  block size (65536)
//!   16  4  segment blocks (1024)
//!   20  4  flags (0)
//!   24  8  disk size in bytes
//!   32 32  root digest of the logical disk at this restore point
//!   64 32  root digest of the parent restore point (zeroes for a full)
//!   96 32  BLAKE3 of bytes [0, 96) followed by the segment table
//! [4096, L)            segment table: every segment hash of the logical
//!                      disk, m × 32 bytes, zero padded to a 4 KiB multiple
//! [L, L + n × 32)      leaf table: leaf of block i at L + 32 i, written only
//!                      for blocks this image wrote; all-zero = "not written
//!                      here, look in the parent" (the file is sparse there)
//! ```
//!
//! The segment table makes a child's digest cheap (untouched segments are
//! copied from the parent); the leaf table makes a touched segment cheap
//! (leaves of untouched blocks come from the nearest ancestor that has
//! them) and lets verify name the bad blocks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::algo::{Geometry, Hash, BLOCK_SIZE, SEGMENT_BLOCKS};

/// Magic at offset 0.
pub const MAGIC: &[u8; 8] = b"HUBDIGST";
/// Format version.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: u64 = 4096;
/// Largest disk a sidecar describes (qcow2's limit of 2^56 bytes).
pub const MAX_DISK_SIZE: u64 = 1 << 56;

/// Why a sidecar cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The content is not a valid sidecar.
    #[error("invalid digest sidecar: {0}")]
    Invalid(String),
}

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Disk size.
    pub size: u64,
    /// Root digest.
    pub root: Hash,
    /// Parent's root digest (NONE for a full).
    pub parent_root: Hash,
    /// Checksum over header fields and segment table.
    pub checksum: Hash,
}

impl Header {
    /// Geometry of the disk.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.size)
    }

    /// Encode the 96 bytes the checksum covers.
    fn fields(&self) -> [u8; 96] {
        let mut b = [0u8; 96];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(SEGMENT_BLOCKS as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..64].copy_from_slice(&self.root.0);
        b[64..96].copy_from_slice(&self.parent_root.0);
        b
    }

    /// The full header block with the checksum of `segments` filled in.
    pub fn encode(&mut self, segments: &[u8]) -> Vec<u8> {
        let fields = self.fields();
        self.checksum = checksum(&fields, segments);
        let mut out = vec![0u8; HEADER_LEN as usize];
        out[..96].copy_from_slice(&fields);
        out[96..128].copy_from_slice(&self.checksum.0);
        out
    }

    /// Decode and check a header block (the checksum is verified later,
    /// against the segment table, by [`Sidecar::open`]).
    pub fn decode(b: &[u8]) -> Result<Header, SidecarError> {
        let bad = |m: &str| Err(SidecarError::Invalid(m.to_owned()));
        if b.len() < 128 {
            return bad("truncated header");
        }
        if &b[0..8] != MAGIC {
            return bad("bad magic");
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if u32_at(8) != VERSION {
            return bad("unsupported version");
        }
        if u64::from(u32_at(12)) != BLOCK_SIZE || u64::from(u32_at(16)) != SEGMENT_BLOCKS {
            return bad("unsupported block or segment size");
        }
        if u32_at(20) != 0 {
            return bad("unknown flags");
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[24..32]);
        let size = u64::from_le_bytes(size);
        if size == 0 || size > MAX_DISK_SIZE {
            return bad("disk size out of range");
        }
        let hash_at = |o: usize| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&b[o..o + 32]);
            Hash(h)
        };
        Ok(Header {
            size,
            root: hash_at(32),
            parent_root: hash_at(64),
            checksum: hash_at(96),
        })
    }
}

fn checksum(fields: &[u8], segments: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(fields);
    h.update(segments);
    h.finalize().into()
}

/// Byte offset of the leaf table for a disk of `g`.
pub fn leaf_table_offset(g: &Geometry) -> u64 {
    HEADER_LEN + (g.segments() * 32).div_ceil(HEADER_LEN) * HEADER_LEN
}

/// A sidecar file: being written (during a backup) or finished.
#[derive(Debug)]
pub struct Sidecar {
    file: File,
    geometry: Geometry,
}

impl Sidecar {
    /// Create a new sidecar for a disk of `size` bytes at `path` (which must
    /// not exist). Only the leaf table is written until [`Sidecar::finish`].
    pub fn create(path: &Path, size: u64) -> Result<Sidecar, SidecarError> {
        if size == 0 || size > MAX_DISK_SIZE {
            return Err(SidecarError::Invalid("disk size out of range".into()));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let g = Geometry::new(size);
        // Sparse: untouched leaves are holes that read as "no entry".
        file.set_len(leaf_table_offset(&g) + g.blocks() * 32)?;
        Ok(Sidecar { file, geometry: g })
    }

    /// Open a finished sidecar and check its header and segment table.
    pub fn open(path: &Path) -> Result<(Sidecar, Header, Vec<Hash>), SidecarError> {
        let file = File::open(path)?;
        let mut head = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0)?;
        let header = Header::decode(&head)?;
        let g = header.geometry();
        let len = file.metadata()?.len();
        if len != leaf_table_offset(&g) + g.blocks() * 32 {
            return Err(SidecarError::Invalid(
                "file length does not match the disk size".into(),
            ));
        }
        // Bounded: ≤ 2^56 / 2^26 segments × 32 bytes = 32 MiB.
        let mut seg = vec![0u8; (g.segments() * 32) as usize];
        file.read_exact_at(&mut seg, HEADER_LEN)?;
        if checksum(&head[..96], &seg) != header.checksum {
            return Err(SidecarError::Invalid(
                "header or segment table damaged".into(),
            ));
        }
        let segments = seg
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                Hash(h)
            })
            .collect();
        Ok((Sidecar { file, geometry: g }, header, segments))
    }

    /// The disk geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Write leaves for consecutive blocks starting at `first`.
    pub fn write_leaves(&self, first: u64, leaves: &[Hash]) -> io::Result<()> {
        if first.saturating_add(leaves.len() as u64) > self.geometry.blocks() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "leaf past the end",
            ));
        }
        let mut buf = Vec::with_capacity(leaves.len() * 32);
        for l in leaves {
            buf.extend_from_slice(&l.0);
        }
        self.file
            .write_all_at(&buf, leaf_table_offset(&self.geometry) + first * 32)
    }

    /// Leaves of blocks `[first, end)` as recorded here (NONE = not written
    /// by this image).
    pub fn read_leaves(&self, first: u64, end: u64) -> io::Result<Vec<Hash>> {
        let end = end.min(self.geometry.blocks());
        if first >= end {
            return Ok(Vec::new());
        }
        // Callers read one segment at a time: ≤ 32 KiB.
        let mut buf = vec![0u8; ((end - first) * 32) as usize];
        self.file
            .read_exact_at(&mut buf, leaf_table_offset(&self.geometry) + first * 32)?;
        Ok(buf
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                Hash(h)
            })
            .collect())
    }

    /// Write the segment table and the header, then make the file durable.
    pub fn finish(&self, root: Hash, parent_root: Hash, segments: &[Hash]) -> io::Result<Header> {
        let mut seg = Vec::with_capacity(segments.len() * 32);
        for s in segments {
            seg.extend_from_slice(&s.0);
        }
        let mut header = Header {
            size: self.geometry.size(),
            root,
            parent_root,
            checksum: Hash::NONE,
        };
        let head = header.encode(&seg);
        self.file.write_all_at(&seg, HEADER_LEN)?;
        self.file.write_all_at(&head, 0)?;
        self.file.sync_all()?;
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::leaf;

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.digest");
        let size = BLOCK_SIZE * SEGMENT_BLOCKS * 2 + 4096;
        let s = Sidecar::create(&p, size).unwrap();
        s.write_leaves(5, &[leaf(b"a"), leaf(b"b")]).unwrap();
        let segs = vec![leaf(b"s0"), leaf(b"s1"), leaf(b"s2")];
        let h = s.finish(leaf(b"root"), Hash::NONE, &segs).unwrap();
        drop(s);
        let (s, h2, segs2) = Sidecar::open(&p).unwrap();
        assert_eq!(h, h2);
        assert_eq!(segs, segs2);
        let l = s.read_leaves(4, 8).unwrap();
        assert_eq!(l, vec![Hash::NONE, leaf(b"a"), leaf(b"b"), Hash::NONE]);
        // A flipped bit in the segment table is detected.
        let f = File::options().write(true).open(&p).unwrap();
        f.write_all_at(&[1], HEADER_LEN + 40).unwrap();
        assert!(matches!(Sidecar::open(&p), Err(SidecarError::Invalid(_))));
        // Garbage headers are refused, never panicking.
        for bad in [&b""[..], &[0u8; 200][..], &b"HUBDIGST\x02\0\0\0"[..]] {
            assert!(Header::decode(bad).is_err());
        }
    }
}
