//! Shared test pieces: NBD targets on our own server with request counters,
//! sources that fail or stall on purpose, byte-level helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use disk_digest::BLOCK_SIZE;
use integration_tests::support::TestServer;
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Export, Extent, MemoryBackend, ReadChunk,
    ZeroFlags,
};
use tokio::sync::{mpsc, Semaphore};

pub const B: usize = BLOCK_SIZE as usize;

/// A memory disk counting what arrives: WRITE payload bytes and requests,
/// WRITE_ZEROES bytes and requests.
#[derive(Debug)]
pub struct Counting {
    pub inner: MemoryBackend,
    pub written: AtomicU64,
    pub writes: AtomicU64,
    pub zeroed: AtomicU64,
    pub zeroes: AtomicU64,
}

impl Counting {
    pub fn new(size: u64) -> Arc<Self> {
        Arc::new(Counting {
            inner: MemoryBackend::new(size),
            written: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
        })
    }

    /// Like a hub overlay: already reads as `data`, counters at zero.
    pub async fn holding(data: &[u8]) -> Arc<Self> {
        let c = Self::new(data.len() as u64);
        c.inner
            .write(0, Bytes::copy_from_slice(data))
            .await
            .unwrap();
        c
    }

    pub fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
            self.zeroed.load(Ordering::Relaxed),
            self.zeroes.load(Ordering::Relaxed),
        )
    }

    /// Every byte.
    pub async fn contents(&self) -> Vec<u8> {
        read_all(&self.inner).await
    }
}

pub async fn read_all(b: &dyn BlockBackend) -> Vec<u8> {
    let size = b.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(4 << 20);
        let chunks = b.read(at, n as u32).await.unwrap();
        out.extend_from_slice(&nbd_client::assemble::flatten(&chunks));
        at += n;
    }
    out
}

#[async_trait]
impl BlockBackend for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), BackendError> {
        self.zeroed.fetch_add(len, Ordering::Relaxed);
        self.zeroes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_zeroes(offset, len, f).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.inner.block_status(offset, len).await
    }
}

/// A read-only source whose reads fail, or stall until released.
#[derive(Debug)]
pub struct Faulty {
    pub size: u64,
    /// `None`: every read fails. `Some`: every read takes a permit (for
    /// good), so a test lets exactly N reads through.
    pub gate: Option<Arc<Semaphore>>,
    /// Told each time a read starts.
    pub entered: mpsc::UnboundedSender<()>,
}

#[async_trait]
impl BlockBackend for Faulty {
    fn size(&self) -> u64 {
        self.size
    }
    fn caps(&self) -> Caps {
        Caps {
            read_only: true,
            ..Caps::default()
        }
    }
    async fn read(&self, _offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let _ = self.entered.send(());
        match &self.gate {
            None => Err(BackendError::new(BackendErrorKind::Io, "read")),
            Some(g) => {
                if let Ok(p) = g.acquire().await {
                    p.forget();
                }
                Ok(vec![ReadChunk::Zero(len)])
            }
        }
    }
    async fn write(&self, _: u64, _: Bytes) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "write"))
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::ReadOnly,
            "write_zeroes",
        ))
    }
    async fn trim(&self, _: u64, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        Ok(vec![Extent::data(len.min(self.size - offset))])
    }
}

/// Our NBD server with the given exports.
pub async fn nbd(exports: Vec<(&str, Arc<dyn BlockBackend>)>) -> TestServer {
    TestServer::start(
        exports
            .into_iter()
            .map(|(n, b)| Export::new(n, b))
            .collect(),
    )
    .await
}

/// A disk image: pseudo-random, text and zero extents, with some whole
/// zero blocks and a short last block.
pub fn disk(seed: u64, len: usize) -> Vec<u8> {
    let mut d = integration_tests::support::disk_like(seed, len);
    for b in [1usize, 2, 7] {
        let s = b * B;
        if s + B <= d.len() {
            d[s..s + B].fill(0);
        }
    }
    d
}

/// Bytes of blocks that are not all zero.
pub fn nonzero_bytes(d: &[u8]) -> u64 {
    d.chunks(B)
        .filter(|c| c.iter().any(|b| *b != 0))
        .map(|c| c.len() as u64)
        .sum()
}

/// Poll `cond` (a state the code under test reaches asynchronously) until
/// it holds; fails after 20 s.
pub async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..4000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached in 20 s");
}
