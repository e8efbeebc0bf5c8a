//! The client against our own server, in process, in every reply mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use integration_tests::support::{export, pattern, TestServer};
use nbd_client::{Client, ClientError, ConnectOptions, NbdBackend, ZeroOptions};
use nbd_server::proto::consts::tx_flags;
use nbd_server::proto::{NbdErrno, ReplyMode};
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, MemoryBackend, ReadChunk, ZeroFlags,
};

const MIB: u64 = 1 << 20;

/// The three framings: extended headers, structured replies, simple replies.
fn modes(name: &str) -> Vec<(ConnectOptions, ReplyMode)> {
    let ext = ConnectOptions::new(name);
    let mut st = ConnectOptions::new(name);
    st.extended_headers = false;
    let mut simple = st.clone();
    simple.structured_replies = false;
    vec![
        (ext, ReplyMode::Extended),
        (st, ReplyMode::Structured),
        (simple, ReplyMode::Simple),
    ]
}

async fn server(size: u64) -> TestServer {
    TestServer::start(vec![export("d", Arc::new(MemoryBackend::new(size)))]).await
}

#[tokio::test]
async fn round_trips_holes_status_flush_fua_zeroes_in_every_mode() {
    for (opts, mode) in modes("d") {
        let s = server(64 * MIB).await;
        let c = Client::connect(s.addr, &opts).await.unwrap();
        assert_eq!(c.info().mode, mode);
        assert_eq!(c.size(), 64 * MIB);
        assert_eq!(c.info().max_payload, 32 << 20);
        let data = Bytes::from(pattern(1, MIB as usize));
        c.write(4 * MIB, data.clone(), true).await.unwrap();
        c.write(6 * MIB, data.slice(..4096), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(
            c.read_bytes(4 * MIB, MIB as u32).await.unwrap(),
            data,
            "{mode:?}"
        );
        // An unwritten range: holes when the framing can say so.
        let r = c.read(0, 65536).await.unwrap();
        if mode == ReplyMode::Simple {
            assert_eq!(r, vec![ReadChunk::Data(Bytes::from(vec![0u8; 65536]))]);
        } else {
            assert!(r.iter().all(|c| matches!(c, ReadChunk::Zero(_))), "{r:?}");
            assert_eq!(r.iter().map(ReadChunk::len).sum::<u64>(), 65536);
        }
        // A read across data and hole: one buffer, exact bytes.
        let mixed = c.read_bytes(4 * MIB + MIB - 100, 200).await.unwrap();
        assert_eq!(&mixed[..100], &data[data.len() - 100..]);
        assert!(mixed[100..].iter().all(|b| *b == 0));

        if mode == ReplyMode::Simple {
            assert!(matches!(
                c.block_status(0, MIB).await,
                Err(ClientError::Unsupported(_))
            ));
        } else {
            let e = c.block_status(0, 64 * MIB).await.unwrap();
            assert!(e[0].is_hole() && e[0].is_zero(), "{e:?}");
            assert_eq!(e[0].length, 4 * MIB);
            assert!(!e[1].is_hole() && !e[1].is_zero(), "{e:?}");
        }

        c.write_zeroes(
            4 * MIB,
            65536,
            ZeroOptions {
                fua: true,
                no_hole: true,
                fast: false,
            },
        )
        .await
        .unwrap();
        c.write_zeroes(4 * MIB + 65536, 65536, ZeroOptions::default())
            .await
            .unwrap();
        let z = c.read_bytes(4 * MIB, 2 * 65536).await.unwrap();
        assert!(z.iter().all(|b| *b == 0));
        assert_eq!(
            c.read_bytes(4 * MIB + 2 * 65536, 4096).await.unwrap(),
            data.slice(2 * 65536..2 * 65536 + 4096)
        );
        c.trim(6 * MIB, 4096, false).await.unwrap();
        if c.info().has(tx_flags::SEND_FAST_ZERO) {
            c.write_zeroes(
                0,
                4096,
                ZeroOptions {
                    fast: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        c.disconnect().await.unwrap();
        s.server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn client_side_checks_refuse_before_sending() {
    let s = server(MIB).await;
    let c = Client::connect(s.addr, &ConnectOptions::new("d"))
        .await
        .unwrap();
    assert!(matches!(
        c.read(MIB - 1, 2).await,
        Err(ClientError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.read(u64::MAX, 2).await,
        Err(ClientError::OutOfRange { .. })
    ));
    let big = TestServer::start(vec![export("d", Arc::new(MemoryBackend::new(64 * MIB)))]).await;
    let c = Client::connect(big.addr, &ConnectOptions::new("d"))
        .await
        .unwrap();
    assert!(matches!(
        c.read(0, (32 << 20) + 1).await,
        Err(ClientError::TooLarge { .. })
    ));
    // The connection is still fine.
    c.read(0, 512).await.unwrap();
    // Unknown export: the server's refusal, with its message.
    let e = Client::connect(s.addr, &ConnectOptions::new("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Handshake(nbd_client::HandshakeError::Refused { .. })
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_on_one_connection() {
    let s = server(64 * MIB).await;
    let mut opts = ConnectOptions::new("d");
    opts.max_in_flight = 16;
    opts.max_in_flight_bytes = 1 << 20;
    let c = Client::connect(s.addr, &opts).await.unwrap();
    let n = 512u64;
    let writes = (0..n).map(|i| {
        let c = c.clone();
        async move {
            c.write(i * 65536, Bytes::from(pattern(i, 65536)), false)
                .await
        }
    });
    futures_util::future::try_join_all(writes).await.unwrap();
    let reads = (0..n).map(|i| {
        let c = c.clone();
        async move {
            let got = c.read_bytes(i * 65536, 65536).await?;
            assert_eq!(got, Bytes::from(pattern(i, 65536)), "block {i}");
            Ok::<_, ClientError>(())
        }
    });
    futures_util::future::try_join_all(reads).await.unwrap();
    // Spawned tasks too (clones used from several threads).
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.read_bytes(i * 65536, 4096).await.unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), Bytes::from(pattern(i as u64, 4096)));
    }
}

#[tokio::test]
async fn nbd_backend_digest_matches_the_bytes() {
    let s = server(3 * 64 * MIB / 2).await;
    let c = Client::connect(s.addr, &ConnectOptions::new("d"))
        .await
        .unwrap();
    let mut want = vec![0u8; c.size() as usize];
    for (i, off) in [0u64, 5 * MIB + 123, 70 * MIB].into_iter().enumerate() {
        let d = pattern(i as u64 + 9, MIB as usize);
        want[off as usize..off as usize + d.len()].copy_from_slice(&d);
        c.write(off, Bytes::from(d), false).await.unwrap();
    }
    let be: Arc<dyn BlockBackend> = Arc::new(NbdBackend::new(c.clone()));
    assert!(be.caps().can_block_status);
    let (root, _) = disk_digest::read::digest_backend(Arc::clone(&be), |_| {})
        .await
        .unwrap();
    assert_eq!(root, disk_digest::algo::digest_of_bytes(&want));
    // Reads larger than the maximum payload are split.
    let big = be.read(0, 40 << 20).await.unwrap();
    assert_eq!(
        nbd_client::assemble::flatten(&big),
        Bytes::copy_from_slice(&want[..40 << 20])
    );
    let ext = be.block_status(0, c.size()).await.unwrap();
    assert!(!ext[0].hole);
    be.close().await.unwrap();
}

/// A backend whose reads fail: the server answers EIO.
#[derive(Debug)]
struct Failing;

#[async_trait]
impl BlockBackend for Failing {
    fn size(&self) -> u64 {
        MIB
    }
    fn caps(&self) -> Caps {
        Caps::default()
    }
    async fn read(&self, offset: u64, _len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        Err(BackendError::new(BackendErrorKind::Io, "read").at(offset))
    }
    async fn write(&self, _offset: u64, _data: Bytes) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::NoSpace, "write"))
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

#[tokio::test]
async fn server_errors_carry_the_errno_and_the_connection_goes_on() {
    let s = TestServer::start(vec![export("d", Arc::new(Failing))]).await;
    for (opts, mode) in modes("d") {
        let c = Client::connect(s.addr, &opts).await.unwrap();
        let e = c.read(0, 512).await.unwrap_err();
        assert_eq!(e.errno(), Some(NbdErrno::EIO), "{mode:?}: {e}");
        let e = c
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), Some(NbdErrno::ENOSPC), "{mode:?}: {e}");
        c.flush().await.unwrap();
        let be = NbdBackend::new(c);
        let e = be.write(0, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::NoSpace);
    }
}

#[tokio::test]
async fn dropped_requests_leave_the_connection_usable() {
    let s = server(16 * MIB).await;
    let mut opts = ConnectOptions::new("d");
    // One request in flight at a time: a leaked permit would hang below.
    opts.max_in_flight = 1;
    let c = Client::connect(s.addr, &opts).await.unwrap();
    c.write(0, Bytes::from(pattern(5, 65536)), false)
        .await
        .unwrap();
    for _ in 0..32 {
        let f = c.read(0, 65536);
        // Poll once (the request is queued), then drop it.
        tokio::select! {
            biased;
            _ = f => {}
            _ = std::future::ready(()) => {}
        }
    }
    assert_eq!(
        c.read_bytes(0, 65536).await.unwrap(),
        Bytes::from(pattern(5, 65536))
    );
    assert!(c.closed().is_none());
}
