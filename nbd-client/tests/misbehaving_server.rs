//! A fake server that negotiates correctly and then answers with scripted
//! bytes: every misbehaviour must surface as a typed error, never a panic,
//! and must fail the pending request rather than hang it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{BufMut, BytesMut};
use nbd_client::{Client, ClientError, ConnectOptions, HandshakeError, ProtocolError};
use nbd_server::proto::consts::{
    handshake_flags, opt, rep, reply_type, tx_flags, IHAVEOPT, NBDMAGIC, STRUCTURED_REPLY_MAGIC,
};
use nbd_server::proto::option::{put_info_export, put_reply};
use nbd_server::proto::{NbdErrno, ReplyEncoder, ReplyMode, ReplyTo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 1 << 20;

/// Accept one client, negotiate structured replies without extended
/// headers or contexts, read one request and answer with `reply(cookie,
/// offset)`, then close.
async fn fake(reply: impl FnOnce(u64, u64) -> Vec<u8> + Send + 'static) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = serve(&mut s, reply).await;
    });
    addr
}

async fn serve(s: &mut TcpStream, reply: impl FnOnce(u64, u64) -> Vec<u8>) -> std::io::Result<()> {
    let mut g = BytesMut::new();
    g.put_u64(NBDMAGIC);
    g.put_u64(IHAVEOPT);
    g.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    s.write_all(&g).await?;
    let _client_flags = s.read_u32().await?;
    loop {
        let _magic = s.read_u64().await?;
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).await?;
        let mut out = BytesMut::new();
        match option {
            opt::STRUCTURED_REPLY => put_reply(&mut out, option, rep::ACK, &[]),
            opt::GO => {
                let flags = tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH;
                put_info_export(&mut out, option, SIZE, flags);
                put_reply(&mut out, option, rep::ACK, &[]);
            }
            _ => put_reply(&mut out, option, rep::ERR_UNSUP, &[]),
        }
        s.write_all(&out).await?;
        if option == opt::GO {
            break;
        }
    }
    let mut req = [0u8; 28];
    s.read_exact(&mut req).await?;
    let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(req[16..24].try_into().unwrap());
    s.write_all(&reply(cookie, offset)).await?;
    s.flush().await?;
    // Hold the socket until the client hangs up, so errors come from the
    // bytes, not from the close.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink).await;
    Ok(())
}

fn chunk(cookie: u64, flags: u16, kind: u16, payload: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len.unwrap_or(payload.len() as u32));
    b.put_slice(payload);
    b.to_vec()
}

async fn read_against(
    reply: impl FnOnce(u64, u64) -> Vec<u8> + Send + 'static,
) -> Result<Vec<nbd_server::ReadChunk>, ClientError> {
    let addr = fake(reply).await;
    let c = Client::connect(addr, &ConnectOptions::new("x"))
        .await
        .unwrap();
    assert_eq!(c.info().mode, ReplyMode::Structured);
    let r = c.read(4096, 512).await;
    if let Err(e) = &r {
        // Once the server broke the protocol, the connection stays dead.
        assert!(c.closed().is_some() || e.errno().is_some());
    }
    r
}

fn protocol(r: Result<Vec<nbd_server::ReadChunk>, ClientError>) -> ProtocolError {
    match r {
        Err(ClientError::Protocol(p)) => p,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn well_formed_reply_from_the_fake_is_accepted() {
    let r = read_against(|cookie, offset| {
        let mut out = BytesMut::new();
        let enc = ReplyEncoder::new(ReplyMode::Structured);
        let to = ReplyTo { cookie, offset };
        enc.read_hole(&mut out, to, offset, 512, true);
        out.to_vec()
    })
    .await
    .unwrap();
    assert_eq!(r, vec![nbd_server::ReadChunk::Zero(512)]);
}

#[tokio::test]
async fn unknown_cookie_is_a_protocol_error() {
    let p = protocol(
        read_against(|cookie, _| chunk(cookie ^ 0xdead, 1, reply_type::NONE, &[], None)).await,
    );
    assert!(matches!(p, ProtocolError::UnknownCookie(_)), "{p}");
}

#[tokio::test]
async fn chunk_outside_the_request_is_a_protocol_error() {
    let p = protocol(
        read_against(|cookie, _| {
            let mut pl = 0u64.to_be_bytes().to_vec();
            pl.extend_from_slice(&[1u8; 16]);
            chunk(cookie, 1, reply_type::OFFSET_DATA, &pl, None)
        })
        .await,
    );
    assert!(
        matches!(p, ProtocolError::ChunkOutsideRequest { .. }),
        "{p}"
    );
}

#[tokio::test]
async fn oversized_payload_is_refused_before_reading_it() {
    let p = protocol(
        read_against(|cookie, offset| {
            chunk(
                cookie,
                1,
                reply_type::OFFSET_DATA,
                &offset.to_be_bytes(),
                Some(u32::MAX),
            )
        })
        .await,
    );
    assert!(matches!(p, ProtocolError::BadChunkLength { .. }), "{p}");
}

#[tokio::test]
async fn short_read_reply_is_a_protocol_error() {
    let p = protocol(
        read_against(|cookie, offset| {
            let mut out = chunk(
                cookie,
                0,
                reply_type::OFFSET_HOLE,
                &{
                    let mut h = offset.to_be_bytes().to_vec();
                    h.extend_from_slice(&100u32.to_be_bytes());
                    h
                },
                None,
            );
            out.extend(chunk(cookie, 1, reply_type::NONE, &[], None));
            out
        })
        .await,
    );
    assert!(
        matches!(
            p,
            ProtocolError::Incomplete {
                covered: 100,
                len: 512
            }
        ),
        "{p}"
    );
}

#[tokio::test]
async fn garbage_magic_and_simple_read_reply_are_protocol_errors() {
    let p = protocol(read_against(|_, _| b"this is not an NBD reply at all".to_vec()).await);
    assert!(matches!(p, ProtocolError::BadMagic(_)), "{p}");
    let p = protocol(
        read_against(|cookie, _| {
            let mut out = BytesMut::new();
            ReplyEncoder::new(ReplyMode::Simple).ok(&mut out, ReplyTo { cookie, offset: 0 });
            out.to_vec()
        })
        .await,
    );
    assert!(
        matches!(p, ProtocolError::UnexpectedSimpleReply("READ")),
        "{p}"
    );
}

#[tokio::test]
async fn error_chunk_becomes_the_errno() {
    let e = read_against(|cookie, offset| {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Structured).error(
            &mut out,
            ReplyTo { cookie, offset },
            NbdErrno::EIO,
            "medium error",
        );
        out.to_vec()
    })
    .await
    .unwrap_err();
    assert_eq!(e.errno(), Some(NbdErrno::EIO));
    assert!(e.to_string().contains("medium error"), "{e}");
}

#[tokio::test]
async fn hang_up_mid_reply_fails_the_request() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // Negotiate, then send half a chunk header and close.
        let _ = serve_then_close(&mut s).await;
    });
    let c = Client::connect(addr, &ConnectOptions::new("x"))
        .await
        .unwrap();
    let e = c.read(0, 512).await.unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e}");
    assert!(matches!(c.read(0, 512).await, Err(ClientError::Closed)));
}

async fn serve_then_close(s: &mut TcpStream) -> std::io::Result<()> {
    // The scripted server waits for the client to hang up; this one sends
    // half a chunk header and closes.
    let half = STRUCTURED_REPLY_MAGIC.to_be_bytes();
    let mut g = BytesMut::new();
    g.put_u64(NBDMAGIC);
    g.put_u64(IHAVEOPT);
    g.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    s.write_all(&g).await?;
    let _ = s.read_u32().await?;
    loop {
        let _ = s.read_u64().await?;
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).await?;
        let mut out = BytesMut::new();
        if option == opt::STRUCTURED_REPLY {
            put_reply(&mut out, option, rep::ACK, &[]);
            s.write_all(&out).await?;
            continue;
        }
        if option == opt::GO {
            put_info_export(&mut out, option, SIZE, tx_flags::HAS_FLAGS);
            put_reply(&mut out, option, rep::ACK, &[]);
            s.write_all(&out).await?;
            break;
        }
        put_reply(&mut out, option, rep::ERR_UNSUP, &[]);
        s.write_all(&out).await?;
    }
    let mut req = [0u8; 28];
    s.read_exact(&mut req).await?;
    s.write_all(&half).await?;
    s.shutdown().await
}

#[tokio::test]
async fn handshake_garbage_is_a_handshake_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n").await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    });
    let e = Client::connect(addr, &ConnectOptions::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Handshake(HandshakeError::BadGreeting)),
        "{e}"
    );
    // An oversized option reply length is refused before allocating.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut g = BytesMut::new();
        g.put_u64(NBDMAGIC);
        g.put_u64(IHAVEOPT);
        g.put_u16(handshake_flags::FIXED_NEWSTYLE);
        let _ = s.write_all(&g).await;
        let mut r = BytesMut::new();
        r.put_u64(nbd_server::proto::consts::REPLY_MAGIC);
        r.put_u32(opt::EXTENDED_HEADERS);
        r.put_u32(rep::ACK);
        r.put_u32(u32::MAX);
        let _ = s.write_all(&r).await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    });
    let e = Client::connect(addr, &ConnectOptions::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Handshake(HandshakeError::ReplyTooLarge(_))),
        "{e}"
    );
}
