//! Hand-written protocol bytes over a real socket: what client libraries
//! will not send. Every test also checks that the server keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use integration_tests::support::{export, TestServer};
use nbd_server::proto::consts::{opt, rep, IHAVEOPT, REPLY_MAGIC};
use nbd_server::{MemoryBackend, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;

/// Read the greeting, send client flags.
async fn hello(addr: std::net::SocketAddr, cflags: u32) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    s.write_all(&cflags.to_be_bytes()).await.unwrap();
    s
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).await.unwrap();
}

/// (option, reply type, payload)
async fn read_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        p,
    )
}

/// Read until EOF; returns bytes read. Fails if the server does not close.
async fn expect_close(s: &mut TcpStream) -> usize {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("server did not close the connection")
        .unwrap_or(0);
    buf.len()
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v
}

/// GO into `disk` and return the stream ready for transmission.
async fn go(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = hello(addr, 3).await;
    send_option(&mut s, opt::GO, &go_payload("disk")).await;
    loop {
        let (_, kind, _) = read_reply(&mut s).await;
        if kind == rep::ACK {
            return s;
        }
        assert_eq!(kind, rep::INFO);
    }
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// (error, cookie) of a simple reply.
async fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[..4], &[0x67, 0x44, 0x66, 0x98]);
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

async fn server() -> TestServer {
    TestServer::start(vec![export("disk", Arc::new(MemoryBackend::new(8 * MIB)))]).await
}

/// A full write/read round trip on a fresh connection proves the server is fine.
async fn still_serving(addr: std::net::SocketAddr) {
    let mut s = go(addr).await;
    let mut w = request(1, 0, 1, 4096, 512);
    w.extend_from_slice(&[0x5a; 512]);
    s.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    s.write_all(&request(0, 0, 2, 4096, 512)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 2));
    let mut data = [0u8; 512];
    s.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|b| *b == 0x5a));
}

#[tokio::test]
async fn unknown_option_gets_err_unsup_with_payload_skipped() {
    let srv = server().await;
    let mut s = hello(srv.addr, 3).await;
    send_option(&mut s, 0x4242, b"some payload the server must skip").await;
    let (o, kind, _) = read_reply(&mut s).await;
    assert_eq!((o, kind), (0x4242, rep::ERR_UNSUP));
    // The stream is still in sync: a LIST works.
    send_option(&mut s, opt::LIST, &[]).await;
    assert_eq!(read_reply(&mut s).await.1, rep::SERVER);
    assert_eq!(read_reply(&mut s).await.1, rep::ACK);
    send_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(read_reply(&mut s).await.1, rep::ACK);
    expect_close(&mut s).await;
}

#[tokio::test]
async fn oversized_option_is_skipped_and_refused_without_buffering() {
    let srv = server().await;
    let mut s = hello(srv.addr, 3).await;
    // 1 MiB GO payload: far over the 64 KiB option limit.
    let big = vec![0u8; MIB as usize];
    send_option(&mut s, opt::GO, &big).await;
    let (o, kind, msg) = read_reply(&mut s).await;
    assert_eq!(
        (o, kind),
        (opt::GO, rep::ERR_TOO_BIG),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    send_option(&mut s, 0x99, &big).await;
    assert_eq!(read_reply(&mut s).await.1, rep::ERR_UNSUP);
    // Negotiation continues normally.
    send_option(&mut s, opt::GO, &go_payload("disk")).await;
    loop {
        let (_, kind, _) = read_reply(&mut s).await;
        if kind == rep::ACK {
            break;
        }
    }
    s.write_all(&request(0, 0, 9, 0, 16)).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 9));
}

#[tokio::test]
async fn list_with_data_gets_exactly_one_err_invalid() {
    let srv = server().await;
    let mut s = hello(srv.addr, 3).await;
    send_option(&mut s, opt::LIST, b"xx").await;
    send_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(read_reply(&mut s).await.1, rep::ERR_INVALID);
    assert_eq!(read_reply(&mut s).await, (opt::ABORT, rep::ACK, vec![]));
}

#[tokio::test]
async fn garbage_gets_a_clean_disconnect_and_others_are_unaffected() {
    let srv = server().await;
    // Garbage instead of an option.
    let mut s = hello(srv.addr, 3).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_close(&mut s).await;
    // Unknown client flags.
    let mut s = hello(srv.addr, 0xffff_0000).await;
    assert_eq!(expect_close(&mut s).await, 0);
    // Garbage instead of a request after GO.
    let mut s = go(srv.addr).await;
    s.write_all(&[0xde; 64]).await.unwrap();
    expect_close(&mut s).await;
    still_serving(srv.addr).await;
}

#[tokio::test]
async fn oversized_write_payload_disconnects_without_allocating() {
    let srv = server().await;
    let mut bystander = go(srv.addr).await;
    let mut s = go(srv.addr).await;
    // Claims a 3 GiB write; the server must hang up, not allocate or read it.
    s.write_all(&request(1, 0, 1, 0, 3 << 30)).await.unwrap();
    assert_eq!(expect_close(&mut s).await, 0);
    // The other connection, opened before, still works.
    bystander
        .write_all(&request(0, 0, 7, 0, 512))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut bystander).await, (0, 7));
    still_serving(srv.addr).await;
}

#[tokio::test]
async fn rejected_write_payload_is_consumed_and_stream_stays_in_sync() {
    let srv = server().await;
    let mut s = go(srv.addr).await;
    // Past the end: ENOSPC, but its 4 KiB payload must still be skipped.
    let mut w = request(1, 0, 1, 8 * MIB - 512, 4096);
    w.extend_from_slice(&[0x77; 4096]);
    w.extend_from_slice(&request(0, 0, 2, 0, 512));
    s.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (28, 1));
    assert_eq!(simple_reply(&mut s).await, (0, 2));
}

#[tokio::test]
async fn export_name_padding_follows_no_zeroes() {
    let srv = server().await;
    for (cflags, extra) in [(1u32, 124usize), (3, 0)] {
        let mut s = hello(srv.addr, cflags).await;
        send_option(&mut s, opt::EXPORT_NAME, b"disk").await;
        let mut h = [0u8; 10];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), 8 * MIB);
        let mut pad = vec![0u8; extra];
        s.read_exact(&mut pad).await.unwrap();
        assert!(pad.iter().all(|b| *b == 0));
        // Nothing else follows: the next bytes are replies to our requests.
        s.write_all(&request(0, 0, 3, 0, 8)).await.unwrap();
        assert_eq!(simple_reply(&mut s).await, (0, 3));
    }
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(
        config,
        vec![export("disk", Arc::new(MemoryBackend::new(MIB)))],
    )
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // Greeting arrives, then the connection is closed for lack of a reply.
    assert_eq!(expect_close(&mut s).await, 18);
}

#[tokio::test]
async fn many_requests_in_flight_all_get_their_replies() {
    let srv = server().await;
    let mut s = go(srv.addr).await;
    let mut batch = Vec::new();
    for i in 0..128u64 {
        let mut w = request(1, 0, 1000 + i, i * 65536, 65536);
        w.extend_from_slice(&vec![i as u8; 65536]);
        batch.extend_from_slice(&w);
    }
    s.write_all(&batch).await.unwrap();
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..128 {
        let (err, cookie) = simple_reply(&mut s).await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (1000..1128).collect::<Vec<u64>>());
    // Read everything back in one pipelined batch.
    let mut batch = Vec::new();
    for i in 0..128u64 {
        batch.extend_from_slice(&request(0, 0, i, i * 65536, 65536));
    }
    s.write_all(&batch).await.unwrap();
    for _ in 0..128 {
        let (err, cookie) = simple_reply(&mut s).await;
        assert_eq!(err, 0);
        let mut data = vec![0u8; 65536];
        s.read_exact(&mut data).await.unwrap();
        assert!(
            data.iter().all(|b| *b == cookie as u8),
            "data of request {cookie}"
        );
    }
}

#[tokio::test]
async fn disconnect_command_closes_after_inflight_replies() {
    let srv = server().await;
    let mut s = go(srv.addr).await;
    let mut w = request(0, 0, 5, 0, 4096);
    w.extend_from_slice(&request(2, 0, 6, 0, 0));
    s.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 5));
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).await.unwrap();
    assert_eq!(expect_close(&mut s).await, 0, "no reply to DISC");
}
