//! Connection limits and timeouts against real sockets: a flood of idle
//! connections on one port starves neither another port nor new clients of
//! the same export; silent connections and slowloris handshakes are closed;
//! the handshake deadline is per option, so listing 500 exports works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::client::Client;
use integration_tests::support::{export, require, run_ok, TestServer};
use nbd_server::proto::consts::{opt, IHAVEOPT, REPLY_MAGIC};
use nbd_server::{MemoryBackend, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1 << 20;

/// Read the greeting, send client flags (fixed newstyle, no zeroes).
async fn hello(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).await.unwrap();
}

/// Read option replies up to the final one; returns its type.
async fn read_replies(s: &mut TcpStream) -> u32 {
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await.unwrap();
        // NBD_REP_SERVER and NBD_REP_INFO precede the final reply.
        if kind != 2 && kind != 3 {
            return kind;
        }
    }
}

/// Wait up to `secs` for the peer to close; how long it took.
async fn closed_within(s: &mut TcpStream, secs: u64) -> Duration {
    let t = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut buf))
        .await
        .expect("server did not close the connection")
        .unwrap_or(0);
    t.elapsed()
}

/// Poll `cond` every 20 ms for up to `secs`.
async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Connect, GO into `name`, read 4 KiB; how long it all took.
async fn served_in(addr: SocketAddr, name: &str) -> Duration {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let mut c = Client::connect(addr, &name).unwrap();
        assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
        t.elapsed()
    })
    .await
    .unwrap()
}

/// Both ends of 2000 connections live in this process.
fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if lim.current.is_some_and(|c| c < want) {
        lim.current = Some(want.min(hard));
        setrlimit(Resource::Nofile, lim).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_on_one_port_starves_neither_another_port_nor_the_same_export() {
    const FLOOD: usize = 2000;
    raise_fd_limit(3 * FLOOD as u64 + 256);
    let config = ServerConfig {
        // Let the per-listener limit (default 1024) be the one that bites.
        max_connections_per_export: 100_000,
        ..ServerConfig::default()
    };
    let per_listener = config.max_connections_per_listener;
    let server = Server::new(config);
    let a = server
        .add_export(export("a", Arc::new(MemoryBackend::new(MIB))))
        .unwrap();
    let b = server
        .add_export(export("b", Arc::new(MemoryBackend::new(MIB))))
        .unwrap();
    let shared = server
        .serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap()
        .local_addr();
    let own = server
        .serve_export(TcpListener::bind("127.0.0.1:0").await.unwrap(), &b)
        .unwrap()
        .local_addr();

    // 2000 clients finish the handshake into "a" and go idle.
    let flood = tokio::task::spawn_blocking(move || {
        (0..FLOOD)
            .map(|_| Client::connect(shared, "a").unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        eventually(10, || a.stats().snapshot().connections_active
            <= per_listener as u64)
        .await,
        "listener limit not enforced: {} active",
        a.stats().snapshot().connections_active
    );

    // Another port, and the flooded export itself, are each served at once.
    let other_port = served_in(own, "b").await;
    let same_export = served_in(shared, "a").await;
    eprintln!("during the flood: other port {other_port:?}, same export {same_export:?}");
    assert!(other_port < Duration::from_secs(1), "{other_port:?}");
    assert!(same_export < Duration::from_secs(1), "{same_export:?}");
    // A real client too.
    if require("nbdinfo") {
        let out = run_ok("nbdinfo", &[&format!("nbd://{shared}/a")]).await;
        assert!(out.contains("export-size: 1048576"), "{out}");
    }
    drop(flood);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_idle_timeout_closes_a_silent_connection() {
    let idle = Duration::from_millis(500);
    let config = ServerConfig {
        idle_timeout: idle,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(
        config,
        vec![export("disk", Arc::new(MemoryBackend::new(MIB)))],
    )
    .await;
    let addr = srv.addr;
    let mut client = tokio::task::spawn_blocking(move || {
        let mut c = Client::connect(addr, "disk").unwrap();
        c.read(0, 512).unwrap();
        c
    })
    .await
    .unwrap();
    let silent_since = Instant::now();
    let disk = srv.server.export("disk").unwrap();
    assert!(
        eventually(10, || disk.stats().snapshot().connections_active == 0).await,
        "silent connection still open"
    );
    assert!(
        silent_since.elapsed() >= idle,
        "closed before the idle timeout"
    );
    let read = tokio::task::spawn_blocking(move || client.read(0, 512))
        .await
        .unwrap();
    assert!(read.is_err());
}

#[tokio::test]
async fn a_slowloris_handshake_is_closed() {
    let per_option = Duration::from_secs(1);
    let config = ServerConfig {
        handshake_timeout: per_option,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(
        config,
        vec![export("disk", Arc::new(MemoryBackend::new(MIB)))],
    )
    .await;
    let s = hello(srv.addr).await;
    let (mut rd, mut wr) = s.into_split();
    // One byte of an option every 200 ms: bytes keep coming, but no option
    // ever completes, so no reply restarts the deadline.
    let trickle = tokio::spawn(async move {
        let bytes = IHAVEOPT.to_be_bytes();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut sent = 0usize;
        for b in bytes.iter().cycle() {
            tick.tick().await;
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let t = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf))
        .await
        .expect("slowloris not closed")
        .unwrap_or(0);
    let took = t.elapsed();
    assert!(took >= per_option - Duration::from_millis(100), "{took:?}");
    assert!(took < 5 * per_option, "{took:?}");
    assert!(buf.is_empty(), "server replied to a partial option");
    trickle.abort();
}

#[tokio::test]
async fn the_handshake_deadline_restarts_with_each_option() {
    let per_option = Duration::from_millis(500);
    let config = ServerConfig {
        handshake_timeout: per_option,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(
        config,
        vec![export("disk", Arc::new(MemoryBackend::new(MIB)))],
    )
    .await;
    let mut s = hello(srv.addr).await;
    let t = Instant::now();
    // Four slow but complete options: 4 × 300 ms is past one deadline,
    // never past one option's.
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    tick.tick().await;
    for _ in 0..4 {
        tick.tick().await;
        send_option(&mut s, opt::LIST, &[]).await;
        assert_eq!(read_replies(&mut s).await, 1, "LIST not acknowledged");
    }
    assert!(t.elapsed() > per_option);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, opt::GO, &go).await;
    assert_eq!(read_replies(&mut s).await, 1, "GO failed");
    // And without progress it is closed by the same per-option deadline.
    let mut s = hello(srv.addr).await;
    send_option(&mut s, opt::LIST, &[]).await;
    assert_eq!(read_replies(&mut s).await, 1);
    let took = closed_within(&mut s, 10).await;
    assert!(took >= per_option - Duration::from_millis(100), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_500_exports() {
    if !require("nbdinfo") {
        return;
    }
    // libnbd spends ~0.2 s per export here (it corks its
    // LIST_META_CONTEXT with MSG_MORE), so this takes ~100 s: far past any
    // whole-handshake limit, within the per-option one.
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let exports = (0..500)
        .map(|i| export(&format!("disk{i:03}"), Arc::new(MemoryBackend::new(MIB))))
        .collect();
    let srv = TestServer::start_with(config, exports).await;
    let t = Instant::now();
    let out = run_ok("nbdinfo", &["--list", &format!("nbd://{}", srv.addr)]).await;
    eprintln!("nbdinfo --list of 500 exports took {:?}", t.elapsed());
    for i in [0, 1, 250, 499] {
        assert!(out.contains(&format!("disk{i:03}")), "disk{i:03} missing");
    }
    assert_eq!(out.matches("export-size: 1048576").count(), 500, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_limit_spans_listeners_and_closes_the_longest_idle() {
    let config = ServerConfig {
        max_connections_per_export: 2,
        ..ServerConfig::default()
    };
    let server = Server::new(config);
    let disk = server
        .add_export(export("disk", Arc::new(MemoryBackend::new(MIB))))
        .unwrap();
    let shared = server
        .serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap()
        .local_addr();
    let own = server
        .serve_export(TcpListener::bind("127.0.0.1:0").await.unwrap(), &disk)
        .unwrap()
        .local_addr();
    let (mut oldest, mut newer) = tokio::task::spawn_blocking(move || {
        let mut a = Client::connect(shared, "disk").unwrap();
        a.read(0, 512).unwrap();
        let mut b = Client::connect(shared, "disk").unwrap();
        b.read(0, 512).unwrap();
        (a, b)
    })
    .await
    .unwrap();
    // A third client on the export's own port takes the oldest one's place.
    assert!(served_in(own, "disk").await < Duration::from_secs(1));
    let (a, b) = tokio::task::spawn_blocking(move || {
        let a = oldest.read(0, 512).is_err();
        let b = newer.read(0, 512).is_ok();
        (a, b)
    })
    .await
    .unwrap();
    assert!(a, "longest-idle connection not closed");
    assert!(b, "a newer connection was closed instead");
    server.shutdown().await.unwrap();
}
