//! The per-connection in-flight budget: a client that pipelines writes the
//! backend cannot finish must be stopped at the budget (TCP-style
//! backpressure), not buffered without bound. Deterministic: a gated
//! backend and a current-thread runtime run to quiescence; nothing sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_server::{
    BackendError, BlockBackend, Caps, Export, Extent, ReadChunk, Server, ServerConfig, ZeroFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Writes wait for the gate; counts how many arrived.
#[derive(Debug)]
struct Gated {
    gate: Arc<Semaphore>,
    writes_seen: AtomicU64,
}

#[async_trait]
impl BlockBackend for Gated {
    fn size(&self) -> u64 {
        1 << 30
    }
    fn caps(&self) -> Caps {
        Caps::default()
    }
    async fn read(&self, _o: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        Ok(vec![ReadChunk::Zero(len)])
    }
    async fn write(&self, _o: u64, _d: Bytes) -> Result<(), BackendError> {
        self.writes_seen.fetch_add(1, Ordering::SeqCst);
        let _ = self.gate.acquire().await.unwrap();
        Ok(())
    }
    async fn write_zeroes(&self, _o: u64, _l: u64, _f: ZeroFlags) -> Result<(), BackendError> {
        Ok(())
    }
    async fn trim(&self, _o: u64, _l: u64) -> Result<(), BackendError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn block_status(&self, _o: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        Ok(vec![Extent::data(len)])
    }
}

/// Let every task run until all are blocked (current-thread runtime).
async fn settle() {
    for _ in 0..10_000 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_writes_stop_at_the_budget() {
    const MIB: u64 = 1 << 20;
    let backend = Arc::new(Gated {
        gate: Arc::new(Semaphore::new(0)),
        writes_seen: AtomicU64::new(0),
    });
    // Budget below one maximum request is raised to 32 MiB + 1 byte.
    let config = ServerConfig {
        max_inflight_bytes_per_connection: 1,
        ..ServerConfig::default()
    };
    let server = Server::new(config);
    server
        .add_export(Export::new("g", backend.clone()))
        .unwrap();
    let (mut client, server_side) = tokio::io::duplex(256 * 1024);
    let srv = server.clone();
    tokio::spawn(async move { srv.serve_connection(server_side).await });

    // Handshake: flags, GO "g".
    let mut g = [0u8; 18];
    client.read_exact(&mut g).await.unwrap();
    client.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(b"g");
    opt.extend_from_slice(&0u16.to_be_bytes());
    client.write_all(&opt).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        client.read_exact(&mut h).await.unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut p = vec![0u8; len];
        client.read_exact(&mut p).await.unwrap();
        if u32::from_be_bytes(h[12..16].try_into().unwrap()) == 1 {
            break;
        }
    }

    // A writer pipelining 100 x 1 MiB writes, never waiting for replies.
    let (mut rd, mut wr) = tokio::io::split(client);
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = Arc::clone(&sent);
    let writer = tokio::spawn(async move {
        let payload = vec![0x42u8; MIB as usize];
        for i in 0..100u64 {
            let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
            h.extend_from_slice(&0u16.to_be_bytes());
            h.extend_from_slice(&1u16.to_be_bytes());
            h.extend_from_slice(&i.to_be_bytes());
            h.extend_from_slice(&(i * MIB).to_be_bytes());
            h.extend_from_slice(&(MIB as u32).to_be_bytes());
            wr.write_all(&h).await.unwrap();
            wr.write_all(&payload).await.unwrap();
            sent2.fetch_add(1, Ordering::SeqCst);
        }
        wr
    });
    settle().await;
    // 32 MiB + 1 byte of budget admits exactly 33 one-MiB writes.
    assert_eq!(
        backend.writes_seen.load(Ordering::SeqCst),
        33,
        "server read past its budget"
    );
    assert!(
        sent.load(Ordering::SeqCst) < 36,
        "client was not pushed back: {}",
        sent.load(Ordering::SeqCst)
    );

    // Open the gate: everything completes and every write gets its reply.
    backend.gate.add_permits(1000);
    let mut cookies = Vec::new();
    for _ in 0..100 {
        let mut r = [0u8; 16];
        rd.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 0]);
        cookies.push(u64::from_be_bytes(r[8..16].try_into().unwrap()));
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..100).collect::<Vec<_>>());
    assert_eq!(backend.writes_seen.load(Ordering::SeqCst), 100);
    let _ = writer.await.unwrap();
}
