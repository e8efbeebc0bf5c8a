//! Shared test bodies every [`BlockBackend`] must pass (cloud-hypervisor's
//! one-suite-for-all-backends idea). Enabled with the `test-utils` feature so
//! other crates can run it against their backends.
//!
//! Each check takes a fresh backend from the factory, so checks do not
//! depend on each other.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::{BlockBackend, Extent, ReadChunk, ZeroFlags};

/// Size of the devices the suite asks for: a few MiB, not a multiple of
/// 64 KiB, so tail handling gets exercised.
pub const SUITE_SIZE: u64 = 4 * 1024 * 1024 + 512 * 7;

/// Run every check against backends made by `make(size)`.
pub async fn run_all<F, Fut, B>(make: F)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = B>,
    B: BlockBackend,
{
    let make = |size| {
        let fut = make(size);
        async move { Arc::new(fut.await) as Arc<dyn BlockBackend> }
    };
    size_is_reported(make(SUITE_SIZE).await).await;
    fresh_device_reads_zero(make(SUITE_SIZE).await).await;
    write_read_round_trip(make(SUITE_SIZE).await).await;
    write_zeroes_zeroes_only_the_range(make(SUITE_SIZE).await).await;
    trim_leaves_neighbours_intact(make(SUITE_SIZE).await).await;
    block_status_is_consistent_with_data(make(SUITE_SIZE).await).await;
    concurrent_disjoint_writes(make(SUITE_SIZE).await).await;
    random_ops_match_a_mirror(make(SUITE_SIZE).await, 0x5eed).await;
    flush_and_close_succeed(make(SUITE_SIZE).await).await;
}

/// Read `len` bytes and flatten the chunks.
pub async fn read_flat(b: &dyn BlockBackend, offset: u64, len: u32) -> Vec<u8> {
    let chunks = b.read(offset, len).await.unwrap();
    let mut v = Vec::with_capacity(len as usize);
    for c in chunks {
        match c {
            ReadChunk::Data(d) => v.extend_from_slice(&d),
            ReadChunk::Zero(n) => v.resize(v.len() + n as usize, 0),
        }
    }
    assert_eq!(
        v.len(),
        len as usize,
        "read chunks must cover the request exactly"
    );
    v
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

async fn size_is_reported(b: Arc<dyn BlockBackend>) {
    assert_eq!(b.size(), SUITE_SIZE);
}

async fn fresh_device_reads_zero(b: Arc<dyn BlockBackend>) {
    let v = read_flat(&*b, 0, 1 << 20).await;
    assert!(v.iter().all(|x| *x == 0));
    let tail = read_flat(&*b, SUITE_SIZE - 4096, 4096).await;
    assert!(tail.iter().all(|x| *x == 0));
}

async fn write_read_round_trip(b: Arc<dyn BlockBackend>) {
    // Aligned, unaligned, cluster-crossing and tail writes.
    let cases: [(u64, usize); 5] = [
        (0, 4096),
        (65536 - 100, 300),
        (3 * 65536 + 1, 200_001),
        (1 << 20, 1 << 20),
        (SUITE_SIZE - 777, 777),
    ];
    for (i, (off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, *len);
        b.write(*off, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(read_flat(&*b, *off, *len as u32).await, data, "case {i}");
    }
    // A one-byte read in the middle of earlier data.
    let data = pattern(2, 300);
    assert_eq!(read_flat(&*b, 65536 - 100 + 150, 1).await, vec![data[150]]);
}

async fn write_zeroes_zeroes_only_the_range(b: Arc<dyn BlockBackend>) {
    let data = pattern(9, 512 * 1024);
    b.write(0, Bytes::from(data.clone())).await.unwrap();
    for (off, len, may_trim) in [
        (1000u64, 5000u64, true),
        (65536, 131072, false),
        (300_000, 70_000, true),
    ] {
        b.write_zeroes(
            off,
            len,
            ZeroFlags {
                may_trim,
                fast: false,
            },
        )
        .await
        .unwrap();
        let v = read_flat(&*b, off, len as u32).await;
        assert!(
            v.iter().all(|x| *x == 0),
            "zeroed range {off}+{len} reads zero"
        );
    }
    // Bytes outside every zeroed range are untouched.
    let v = read_flat(&*b, 0, 1000).await;
    assert_eq!(v, data[..1000]);
    let v = read_flat(&*b, 6000, 59536).await;
    assert_eq!(v, data[6000..65536]);
    let v = read_flat(&*b, 196608, 103392).await;
    assert_eq!(v, data[196608..300_000]);
    let v = read_flat(&*b, 370_000, 524288 - 370_000).await;
    assert_eq!(v, data[370_000..]);
}

async fn trim_leaves_neighbours_intact(b: Arc<dyn BlockBackend>) {
    let data = pattern(3, 1 << 20);
    b.write(0, Bytes::from(data.clone())).await.unwrap();
    b.trim(100_000, 300_000).await.unwrap();
    assert_eq!(read_flat(&*b, 0, 100_000).await, data[..100_000]);
    assert_eq!(read_flat(&*b, 400_000, 648_576).await, data[400_000..]);
    // Contents of the trimmed range are unspecified, but reading must work.
    let _ = read_flat(&*b, 100_000, 300_000).await;
}

async fn block_status_is_consistent_with_data(b: Arc<dyn BlockBackend>) {
    b.write(1 << 20, Bytes::from(pattern(4, 65536)))
        .await
        .unwrap();
    let mut off = 0;
    while off < SUITE_SIZE {
        let ext = b.block_status(off, SUITE_SIZE - off).await.unwrap();
        assert!(!ext.is_empty(), "at least one extent");
        for e in &ext {
            assert!(e.length > 0, "extents are non-empty");
            let len = e.length.min(SUITE_SIZE - off).min(8 << 20) as u32;
            if e.zero {
                let v = read_flat(&*b, off, len).await;
                assert!(v.iter().all(|x| *x == 0), "extent at {off} claims zero");
            }
            off += e.length;
            if off >= SUITE_SIZE {
                break;
            }
        }
    }
    // The written range must not be reported as zero.
    let ext = b.block_status(1 << 20, 65536).await.unwrap();
    assert!(
        !ext[0].zero && !ext[0].hole,
        "written data is reported allocated: {ext:?}"
    );
    // The REQ_ONE variant starts with the same status as the full answer,
    // never claims more of it than the full answer does, and covers the
    // written data whole when asked from its start.
    for off in [
        0,
        (1 << 20) - 4096,
        1 << 20,
        (1 << 20) + 65536,
        SUITE_SIZE - 512,
    ] {
        let full = b.block_status(off, SUITE_SIZE - off).await.unwrap();
        let first = b.block_status_first(off, SUITE_SIZE - off).await.unwrap();
        assert!(!first.is_empty(), "REQ_ONE answer at {off} is empty");
        let run = |ext: &[Extent]| -> u64 {
            let s = (ext[0].hole, ext[0].zero);
            ext.iter()
                .take_while(|e| (e.hole, e.zero) == s)
                .map(|e| e.length)
                .sum()
        };
        assert_eq!(
            (first[0].hole, first[0].zero),
            (full[0].hole, full[0].zero),
            "REQ_ONE status at {off}"
        );
        assert!(run(&first) <= run(&full), "REQ_ONE run at {off} too long");
    }
    let first = b
        .block_status_first(1 << 20, SUITE_SIZE - (1 << 20))
        .await
        .unwrap();
    assert!(!first[0].hole && !first[0].zero);
    let data: u64 = first
        .iter()
        .take_while(|e| !e.hole && !e.zero)
        .map(|e| e.length)
        .sum();
    assert!(
        data >= 65536,
        "REQ_ONE answer cuts the written data: {first:?}"
    );
}

async fn concurrent_disjoint_writes(b: Arc<dyn BlockBackend>) {
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            // 4 KiB granules interleaved inside the same 64 KiB clusters.
            let off = i * 4096 + (i % 4) * 65536 * 4;
            b.write(off, Bytes::from(pattern(100 + i, 4096)))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..32u64 {
        let off = i * 4096 + (i % 4) * 65536 * 4;
        assert_eq!(
            read_flat(&*b, off, 4096).await,
            pattern(100 + i, 4096),
            "granule {i}"
        );
    }
}

/// Random writes, zeroes and trims against an in-memory mirror. Trimmed
/// bytes become "unknown" until overwritten.
pub async fn random_ops_match_a_mirror(b: Arc<dyn BlockBackend>, seed: u64) {
    let size = b.size() as usize;
    let mut mirror = vec![0u8; size];
    let mut known = vec![true; size];
    let mut rng = SplitMix(seed);
    for step in 0..300 {
        let off = (rng.next() % size as u64) as usize;
        let max = (size - off).min(300_000);
        let len = 1 + (rng.next() % max as u64) as usize;
        match rng.next() % 10 {
            0..=5 => {
                let data = pattern(rng.next(), len);
                mirror[off..off + len].copy_from_slice(&data);
                known[off..off + len].fill(true);
                b.write(off as u64, Bytes::from(data)).await.unwrap();
            }
            6 | 7 => {
                let flags = ZeroFlags {
                    may_trim: rng.next() % 2 == 0,
                    fast: false,
                };
                b.write_zeroes(off as u64, len as u64, flags).await.unwrap();
                mirror[off..off + len].fill(0);
                known[off..off + len].fill(true);
            }
            8 => {
                b.trim(off as u64, len as u64).await.unwrap();
                known[off..off + len].fill(false);
            }
            _ => {
                let v = read_flat(&*b, off as u64, len as u32).await;
                for (i, byte) in v.iter().enumerate() {
                    if known[off + i] {
                        assert_eq!(
                            *byte,
                            mirror[off + i],
                            "step {step}: byte {} differs",
                            off + i
                        );
                    }
                }
            }
        }
    }
    let v = read_flat(&*b, 0, size as u32).await;
    for i in 0..size {
        if known[i] {
            assert_eq!(v[i], mirror[i], "final byte {i} differs");
        }
    }
}

async fn flush_and_close_succeed(b: Arc<dyn BlockBackend>) {
    b.write(0, Bytes::from_static(b"hello")).await.unwrap();
    b.flush().await.unwrap();
    b.close().await.unwrap();
}

/// A tiny deterministic generator (SplitMix64), so seeded runs reproduce
/// without pulling in `rand`.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
