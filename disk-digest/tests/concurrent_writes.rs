//! Property: whatever mix of writes, zeroes and trims arrives, in whatever
//! overlap and concurrency, the recorded digest equals the digest of what
//! a reader of the image gets afterwards — for a full and for an
//! incremental on top of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use disk_digest::algo::digest_of_bytes;
use disk_digest::{DigestBackend, DigestChain, BLOCK_SIZE};
use futures_util::future::join_all;
use nbd_server::{BlockBackend, MemoryBackend, ReadChunk, ZeroFlags};
use proptest::prelude::*;

const SIZE: u64 = 20 * BLOCK_SIZE + 3 * 512;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Aligned and unaligned, small and multi-block, up to the very end.
    (0..SIZE / 512, 1u64..(6 * BLOCK_SIZE / 512)).prop_map(|(o, l)| {
        let off = o * 512 + if o % 3 == 0 { 17 } else { 0 };
        let off = off.min(SIZE - 1);
        let len = (l * 512).min(SIZE - off);
        (off, len)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte: byte | 1 }),
        2 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range().prop_map(|(off, len)| Op::Trim { off, len }),
    ]
}

async fn run(d: &DigestBackend, op: Op) {
    match op {
        Op::Write { off, len, byte } => {
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
            d.write(off, Bytes::from(data)).await.unwrap()
        }
        Op::Zero { off, len } => d
            .write_zeroes(off, len, ZeroFlags::default())
            .await
            .unwrap(),
        Op::Trim { off, len } => d.trim(off, len).await.unwrap(),
    }
}

/// Memory, but every operation yields a data-dependent number of times
/// before and after touching the data, so concurrent requests really
/// interleave and complete out of order (as they do on an I/O pool).
#[derive(Debug)]
struct Jittery {
    inner: MemoryBackend,
}

async fn jitter(seed: u64) {
    for _ in 0..(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61) {
        tokio::task::yield_now().await;
    }
}

#[async_trait::async_trait]
impl BlockBackend for Jittery {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> nbd_server::Caps {
        self.inner.caps()
    }
    async fn read(&self, o: u64, l: u32) -> Result<Vec<ReadChunk>, nbd_server::BackendError> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Bytes) -> Result<(), nbd_server::BackendError> {
        jitter(o ^ d.len() as u64).await;
        let r = self.inner.write(o, d).await;
        jitter(o + 1).await;
        r
    }
    async fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        f: ZeroFlags,
    ) -> Result<(), nbd_server::BackendError> {
        jitter(o ^ l).await;
        let r = self.inner.write_zeroes(o, l, f).await;
        jitter(o + 3).await;
        r
    }
    async fn trim(&self, o: u64, l: u64) -> Result<(), nbd_server::BackendError> {
        jitter(o ^ l ^ 5).await;
        self.inner.trim(o, l).await
    }
    async fn flush(&self) -> Result<(), nbd_server::BackendError> {
        Ok(())
    }
    async fn block_status(
        &self,
        o: u64,
        l: u64,
    ) -> Result<Vec<nbd_server::Extent>, nbd_server::BackendError> {
        self.inner.block_status(o, l).await
    }
}

async fn content(b: &Arc<dyn BlockBackend>) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for c in b.read(0, SIZE as u32).await.unwrap() {
        match c {
            ReadChunk::Data(d) => out.extend_from_slice(&d),
            ReadChunk::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    out
}

/// Run `batches` of concurrent operations, then finish the digest.
async fn layer(
    mem: &Arc<dyn BlockBackend>,
    path: &std::path::Path,
    parent: &DigestChain,
    batches: Vec<Vec<Op>>,
) -> disk_digest::Header {
    let d = DigestBackend::new(Arc::clone(mem), path).unwrap();
    for batch in batches {
        join_all(batch.into_iter().map(|o| run(&d, o))).await;
    }
    d.finish(parent).await.unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn digest_is_what_a_reader_gets(
        full in prop::collection::vec(prop::collection::vec(op(), 1..6), 1..6),
        inc in prop::collection::vec(prop::collection::vec(op(), 1..6), 0..5),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mem: Arc<dyn BlockBackend> = Arc::new(Jittery { inner: MemoryBackend::new(SIZE) });
            let h = layer(&mem, &dir.path().join("full"), &DigestChain::empty(), full).await;
            assert_eq!(h.root, digest_of_bytes(&content(&mem).await));
            let chain = DigestChain::open(&[dir.path().join("full")], SIZE).unwrap();
            let h2 = layer(&mem, &dir.path().join("inc"), &chain, inc).await;
            assert_eq!(h2.root, digest_of_bytes(&content(&mem).await));
            assert_eq!(h2.parent_root, h.root);
        });
    }

    #[test]
    fn sidecar_headers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = disk_digest::sidecar::Header::decode(&bytes);
    }
}
