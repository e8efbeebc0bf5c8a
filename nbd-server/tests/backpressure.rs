//! The in-flight budgets: a client that pipelines requests the backend
//! cannot finish, or whose replies it never reads, must be stopped at the
//! connection's budget (TCP-style backpressure), not buffered without bound;
//! the process-wide budget keeps room for well-behaved clients; a client
//! that never reads is closed after the send timeout. Deterministic: gated
//! backends and a current-thread runtime run to quiescence; nothing sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_server::{
    BackendError, BlockBackend, Caps, Export, Extent, ReadChunk, Server, ServerConfig, ZeroFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;

const MIB: u64 = 1 << 20;

/// Writes wait for the gate; reads return data at once. Counts both.
#[derive(Debug)]
struct Gated {
    gate: Arc<Semaphore>,
    writes_seen: AtomicU64,
    reads_seen: AtomicU64,
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            gate: Arc::new(Semaphore::new(0)),
            writes_seen: AtomicU64::new(0),
            reads_seen: AtomicU64::new(0),
        })
    }
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
        self.reads_seen.fetch_add(1, Ordering::SeqCst);
        Ok(vec![ReadChunk::Data(Bytes::from(vec![0x5a; len as usize]))])
    }
    async fn write(&self, _o: u64, _d: Bytes) -> Result<(), BackendError> {
        self.writes_seen.fetch_add(1, Ordering::SeqCst);
        // Each write consumes one permit.
        self.gate.acquire().await.unwrap().forget();
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

fn server_with(backend: Arc<Gated>, config: ServerConfig) -> Server {
    let server = Server::new(config);
    server.add_export(Export::new("g", backend)).unwrap();
    server
}

/// Connect over an in-memory pipe with `pipe` bytes of buffering and
/// finish the handshake (GO "g", simple replies). The returned handle
/// resolves when the server is done with the connection.
async fn connect(server: &Server, pipe: usize) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let (mut client, server_side) = tokio::io::duplex(pipe);
    let srv = server.clone();
    let done = tokio::spawn(async move { srv.serve_connection(server_side).await });
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
    (client, done)
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// Pipeline `n` one-MiB writes without reading replies; counts those sent.
fn spawn_writer(
    mut wr: tokio::io::WriteHalf<DuplexStream>,
    n: u64,
) -> (
    Arc<AtomicU64>,
    tokio::task::JoinHandle<tokio::io::WriteHalf<DuplexStream>>,
) {
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = Arc::clone(&sent);
    let task = tokio::spawn(async move {
        let payload = vec![0x42u8; MIB as usize];
        for i in 0..n {
            wr.write_all(&request(1, i, i * MIB, MIB as u32))
                .await
                .unwrap();
            wr.write_all(&payload).await.unwrap();
            sent2.fetch_add(1, Ordering::SeqCst);
        }
        wr
    });
    (sent, task)
}

async fn read_simple_replies(rd: &mut tokio::io::ReadHalf<DuplexStream>, n: usize) -> Vec<u64> {
    let mut cookies = Vec::new();
    for _ in 0..n {
        let mut r = [0u8; 16];
        rd.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 0]);
        cookies.push(u64::from_be_bytes(r[8..16].try_into().unwrap()));
    }
    cookies.sort_unstable();
    cookies
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_writes_stop_at_the_budget() {
    let backend = Gated::new();
    let config = ServerConfig {
        max_inflight_bytes_per_connection: 16 * MIB,
        ..ServerConfig::default()
    };
    let server = server_with(backend.clone(), config);
    let (client, _done) = connect(&server, 256 * 1024).await;

    let (mut rd, wr) = tokio::io::split(client);
    let (sent, writer) = spawn_writer(wr, 100);
    settle().await;
    // WRITEs fill half the budget. Each 1 MiB write costs 1 MiB + 512
    // bytes: 7 fit in 8 MiB, 8 do not.
    assert_eq!(
        backend.writes_seen.load(Ordering::SeqCst),
        7,
        "server admitted other than exactly what the budget holds"
    );
    // Pushed back: what was sent is what was admitted, the header the loop
    // peeked at, and what the pipe and the 64 KiB read window hold.
    assert!(
        sent.load(Ordering::SeqCst) < 10,
        "client was not pushed back: {}",
        sent.load(Ordering::SeqCst)
    );

    // Open the gate: everything completes and every write gets its reply.
    backend.gate.add_permits(1000);
    assert_eq!(
        read_simple_replies(&mut rd, 100).await,
        (0..100).collect::<Vec<_>>()
    );
    assert_eq!(backend.writes_seen.load(Ordering::SeqCst), 100);
    let _ = writer.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_larger_than_the_budget_runs_alone() {
    let backend = Gated::new();
    let config = ServerConfig {
        max_inflight_bytes_per_connection: 1,
        ..ServerConfig::default()
    };
    let server = server_with(backend.clone(), config);
    let (client, _done) = connect(&server, 256 * 1024).await;
    let (mut rd, wr) = tokio::io::split(client);
    let (_sent, writer) = spawn_writer(wr, 5);
    settle().await;
    assert_eq!(backend.writes_seen.load(Ordering::SeqCst), 1);
    for i in 1..=5 {
        backend.gate.add_permits(1);
        settle().await;
        assert_eq!(
            backend.writes_seen.load(Ordering::SeqCst),
            (i + 1).min(5),
            "more than one over-budget request in flight"
        );
    }
    assert_eq!(read_simple_replies(&mut rd, 5).await, vec![0, 1, 2, 3, 4]);
    let _ = writer.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn unread_replies_count_against_the_budget() {
    let backend = Gated::new();
    let config = ServerConfig {
        max_inflight_bytes_per_connection: 8 * MIB,
        ..ServerConfig::default()
    };
    let server = server_with(backend.clone(), config);
    let (client, _done) = connect(&server, 64 * 1024).await;
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut reqs = Vec::new();
    for i in 0..100u64 {
        reqs.extend(request(0, i, i * MIB, MIB as u32));
    }
    wr.write_all(&reqs).await.unwrap();
    settle().await;
    // Reads complete at once but nobody reads the replies: the 8 MiB
    // budget holds 7 of them (1 MiB + 512 each), and no more are issued.
    assert_eq!(backend.reads_seen.load(Ordering::SeqCst), 7);
    // Drain: every read is answered.
    let mut got = 0u64;
    for _ in 0..100 {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await.unwrap();
        let mut data = vec![0u8; MIB as usize];
        rd.read_exact(&mut data).await.unwrap();
        got += 1;
    }
    assert_eq!(got, 100);
    assert_eq!(backend.reads_seen.load(Ordering::SeqCst), 100);
}

#[tokio::test(flavor = "current_thread")]
async fn the_process_budget_keeps_room_for_a_small_client() {
    let backend = Gated::new();
    let config = ServerConfig {
        // The floor: 35 MiB for anyone plus 5 MiB kept for small holders.
        max_buffer_memory: 40 * MIB,
        max_inflight_bytes_per_connection: 64 * MIB,
        ..ServerConfig::default()
    };
    let server = server_with(backend.clone(), config);
    // A hog pipelines 1 MiB reads and never reads a reply.
    let (hog, _hog_done) = connect(&server, 64 * 1024).await;
    let (_hog_rd, mut hog_wr) = tokio::io::split(hog);
    let mut reqs = Vec::new();
    for i in 0..100u64 {
        reqs.extend(request(0, i, i * MIB, MIB as u32));
    }
    let hog_writer = tokio::spawn(async move {
        let _ = hog_wr.write_all(&reqs).await;
        hog_wr
    });
    settle().await;
    let held = backend.reads_seen.load(Ordering::SeqCst);
    assert_eq!(held, 34, "hog not stopped by the process-wide budget");

    // A well-behaved client still gets a 4 KiB read answered.
    let (mut small, _small_done) = connect(&server, 64 * 1024).await;
    small.write_all(&request(0, 7, 0, 4096)).await.unwrap();
    let mut h = [0u8; 16];
    small.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[4..16], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    let mut data = vec![0u8; 4096];
    small.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|b| *b == 0x5a));
    assert_eq!(backend.reads_seen.load(Ordering::SeqCst), held + 1);
    drop(hog_writer);
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_that_never_reads_is_closed_after_the_send_timeout() {
    let backend = Gated::new();
    // Per connection larger than the process budget, so the hog is
    // stopped by the process-wide budget (whose release is checked here).
    let config = ServerConfig {
        max_buffer_memory: 40 * MIB,
        max_inflight_bytes_per_connection: 64 * MIB,
        send_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = server_with(backend.clone(), config);
    let (hog, hog_done) = connect(&server, 64 * 1024).await;
    let (hog_rd, mut hog_wr) = tokio::io::split(hog);
    let mut reqs = Vec::new();
    for i in 0..100u64 {
        reqs.extend(request(0, i, i * MIB, MIB as u32));
    }
    let _hog_writer = tokio::spawn(async move {
        let _ = hog_wr.write_all(&reqs).await;
        hog_wr
    });
    settle().await;
    assert!(backend.reads_seen.load(Ordering::SeqCst) > 0);
    // The server gives up on the connection (and so frees its budget)
    // while the client still holds its end open.
    tokio::time::timeout(Duration::from_secs(20), hog_done)
        .await
        .expect("connection with unread replies not closed")
        .unwrap();

    // The whole process budget is back: a second hog gets as far as the first.
    let before = backend.reads_seen.load(Ordering::SeqCst);
    let (hog2, _d2) = connect(&server, 64 * 1024).await;
    let (_rd2, mut wr2) = tokio::io::split(hog2);
    let mut reqs = Vec::new();
    for i in 0..40u64 {
        reqs.extend(request(0, i, i * MIB, MIB as u32));
    }
    let _hog2_writer = tokio::spawn(async move {
        let _ = wr2.write_all(&reqs).await;
        wr2
    });
    settle().await;
    assert!(
        backend.reads_seen.load(Ordering::SeqCst) - before >= 34,
        "budget not released by the closed connection"
    );
    drop(hog_rd);
}
