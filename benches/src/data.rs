//! Deterministic "realistic disk" data, after `shared/bench/gen-data.py`:
//! extents of 4 KiB … 1 MiB, 50 % random bytes, 25 % zeroes (written out,
//! not sparse), 25 % repeated log text. Same size and seed, same bytes.

use std::io::Write;
use std::path::Path;

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fill with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn text_pool(rng: &mut Rng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "kernel",
        "systemd",
        "sshd",
        "nginx",
        "postgres",
        "backup",
        "snapshot",
        "qcow2",
        "cluster",
        "refcount",
        "allocate",
        "write",
        "flush",
        "request",
        "reply",
        "offset",
        "error",
        "info",
        "connection",
        "timeout",
    ];
    let mut pool = Vec::with_capacity(300 * 1024);
    let mut n = 0u64;
    while pool.len() < 256 * 1024 {
        n += 1;
        let mut line = format!(
            "2025-11-25T19:{:02}:{:02} host{:02} {}[{}]:",
            n / 60 % 60,
            n % 60,
            rng.below(8),
            WORDS[rng.below(WORDS.len() as u64) as usize],
            100 + rng.below(30000)
        );
        for _ in 0..4 + rng.below(10) {
            line.push(' ');
            line.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        }
        line.push('\n');
        pool.extend_from_slice(line.as_bytes());
    }
    pool
}

/// Write `size` bytes of disk-like data for `seed` to `path`.
pub fn generate(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut layout = Rng(seed);
    let mut content = Rng(seed.wrapping_mul(1_000_003).wrapping_add(7));
    let pool = text_pool(&mut Rng(seed + 17));
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        let len = (4096 * (1 + layout.below(256))).min(size - pos) as usize;
        let kind = layout.below(4);
        let mut toff = layout.below(pool.len() as u64) as usize;
        let b = &mut buf[..len];
        match kind {
            0 | 1 => content.fill(b),
            2 => b.fill(0),
            _ => {
                for byte in b.iter_mut() {
                    *byte = pool[toff];
                    toff = (toff + 1) % pool.len();
                }
            }
        }
        out.write_all(b)?;
        pos += len as u64;
    }
    out.flush()?;
    out.get_ref().sync_all()
}

/// Parse `4G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    hub_daemon::cli::size::parse_size(s)
}

/// `blake3-tree-v1` digest of a raw file, streamed segment by segment
/// (64 MiB at a time), to check what a server recorded.
pub fn digest_file(path: &Path) -> std::io::Result<String> {
    use disk_digest::algo::{leaf, root, segment_hash, Geometry};
    use std::io::Read;
    let size = std::fs::metadata(path)?.len();
    let g = Geometry::new(size);
    let mut f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut segs = Vec::with_capacity(g.segments() as usize);
    let mut block = vec![0u8; disk_digest::BLOCK_SIZE as usize];
    for s in 0..g.segments() {
        let (first, end) = g.segment_blocks(s);
        let mut leaves = Vec::with_capacity((end - first) as usize);
        for b in first..end {
            let n = g.block_len(b) as usize;
            f.read_exact(&mut block[..n])?;
            leaves.push(leaf(&block[..n]));
        }
        segs.push(segment_hash(&leaves));
    }
    Ok(root(size, &segs).to_hex())
}
