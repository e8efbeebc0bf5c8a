//! The client against real servers: qemu-nbd (extended headers, raw and
//! qcow2) and nbdkit's memory plugin (no extended headers: the fallback).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use common::Daemon;
use integration_tests::support::{pattern, require, run_ok};
use nbd_client::{Client, ClientError, ConnectOptions, NbdBackend, ZeroOptions};
use nbd_server::proto::consts::tx_flags;
use nbd_server::proto::ReplyMode;
use nbd_server::{BlockBackend, ReadChunk};

const MIB: u64 = 1 << 20;

/// A 16 MiB sparse raw file with data at [1, 2) MiB and [8 MiB, +64 KiB).
fn sparse_raw(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(16 * MIB).unwrap();
    let mut want = vec![0u8; 16 * MIB as usize];
    for (seed, off, len) in [(1u64, MIB, MIB), (2, 8 * MIB, 65536)] {
        let d = pattern(seed, len as usize);
        f.write_all_at(&d, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    f.sync_all().unwrap();
    (path, want)
}

async fn read_all(c: &Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.size() as usize);
    let step = u64::from(c.info().max_payload).min(4 * MIB);
    let mut at = 0;
    while at < c.size() {
        let n = (c.size() - at).min(step) as u32;
        out.extend_from_slice(&c.read_bytes(at, n).await.unwrap());
        at += u64::from(n);
    }
    out
}

/// Every extent from 0 to the end, joined.
async fn all_extents(c: &Client) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < c.size() {
        let e = c.block_status(at, c.size() - at).await.unwrap();
        assert!(!e.is_empty());
        for x in e {
            let len = x.length.min(c.size() - at);
            out.push((at, len, x.is_zero()));
            at += len;
            if at >= c.size() {
                break;
            }
        }
    }
    out
}

fn zero_at(ext: &[(u64, u64, bool)], off: u64) -> bool {
    ext.iter()
        .find(|(a, l, _)| *a <= off && off < a + l)
        .unwrap()
        .2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_raw_reads_status_and_writes() {
    if !require("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, mut want) = sparse_raw(dir.path());
    let d = Daemon::qemu_nbd(&path, "raw", "disk0", &[]);
    for extended in [true, false] {
        let mut opts = ConnectOptions::new("disk0");
        opts.extended_headers = extended;
        let c = Client::connect(d.addr(), &opts).await.unwrap();
        let mode = if extended {
            ReplyMode::Extended
        } else {
            ReplyMode::Structured
        };
        assert_eq!(c.info().mode, mode);
        assert_eq!(c.size(), 16 * MIB);
        assert!(c.info().base_allocation.is_some());
        assert_eq!(read_all(&c).await, want, "{mode:?}");
        let ext = all_extents(&c).await;
        assert!(zero_at(&ext, 0), "{ext:?}");
        // [1, 1.125) MiB may have been zeroed by the previous round.
        assert!(!zero_at(&ext, MIB + MIB / 2), "{ext:?}");
        assert!(!zero_at(&ext, 8 * MIB), "{ext:?}");
        assert!(zero_at(&ext, 12 * MIB), "{ext:?}");
        // A hole read comes back as holes, not bytes.
        let r = c.read(12 * MIB, 65536).await.unwrap();
        assert!(r.iter().all(|c| matches!(c, ReadChunk::Zero(_))), "{r:?}");
        // Writes, FUA, zeroes, trim, flush, cache.
        let data = Bytes::from(pattern(3 + u64::from(extended), 128 * 1024));
        c.write(3 * MIB, data.clone(), true).await.unwrap();
        want[3 * MIB as usize..3 * MIB as usize + data.len()].copy_from_slice(&data);
        c.write_zeroes(
            MIB,
            65536,
            ZeroOptions {
                no_hole: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        want[MIB as usize..MIB as usize + 65536].fill(0);
        if c.info().has(tx_flags::SEND_FAST_ZERO) {
            // Either outcome is legal; an error must be ENOTSUP.
            if let Err(e) = c
                .write_zeroes(
                    MIB + 65536,
                    65536,
                    ZeroOptions {
                        fast: true,
                        ..Default::default()
                    },
                )
                .await
            {
                assert_eq!(e.errno(), Some(nbd_server::proto::NbdErrno::ENOTSUP));
            } else {
                want[(MIB + 65536) as usize..(MIB + 2 * 65536) as usize].fill(0);
            }
        }
        c.flush().await.unwrap();
        if c.info().has(tx_flags::SEND_CACHE) {
            c.cache(0, MIB).await.unwrap();
        }
        assert_eq!(read_all(&c).await, want);
        c.disconnect().await.unwrap();
    }
    drop(d);
    // What the server wrote is on disk.
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk == want, "file differs from what was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_qcow2_digest_through_nbd_backend() {
    if !require("qemu-nbd") || !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, want) = sparse_raw(dir.path());
    let q = dir.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    )
    .await;
    let d = Daemon::qemu_nbd(&q, "qcow2", "q", &["-r"]);
    let c = Client::connect(d.addr(), &ConnectOptions::new("q"))
        .await
        .unwrap();
    assert!(c.info().has(tx_flags::READ_ONLY));
    assert!(matches!(
        c.write(0, Bytes::from_static(b"x"), false).await,
        Err(ClientError::Unsupported(_))
    ));
    let be: Arc<dyn BlockBackend> = Arc::new(NbdBackend::new(c));
    assert!(be.caps().read_only);
    let (root, _) = disk_digest::read::digest_backend(be, |_| {}).await.unwrap();
    assert_eq!(root, disk_digest::algo::digest_of_bytes(&want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_without_extended_headers() {
    if !require("nbdkit") {
        return;
    }
    let d = Daemon::nbdkit(&["memory", "size=64M"]);
    let c = Client::connect(d.addr(), &ConnectOptions::new(""))
        .await
        .unwrap();
    // nbdkit 1.32 predates extended headers: structured replies remain.
    assert!(matches!(
        c.info().mode,
        ReplyMode::Structured | ReplyMode::Extended
    ));
    assert_eq!(c.size(), 64 * MIB);
    let data = Bytes::from(pattern(7, 4 * MIB as usize));
    // Many writes in flight, then reads in flight.
    let writes = (0..16u64).map(|i| {
        let c = c.clone();
        let d = data.slice((i * 256 * 1024) as usize..((i + 1) * 256 * 1024) as usize);
        async move { c.write(10 * MIB + i * 256 * 1024, d, i % 2 == 0).await }
    });
    futures_util::future::try_join_all(writes).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read_bytes(10 * MIB, 4 * MIB as u32).await.unwrap(), data);
    let ext = c.block_status(0, 64 * MIB).await.unwrap();
    assert!(ext[0].is_hole() && ext[0].is_zero(), "{ext:?}");
    let ext = c.block_status(10 * MIB, MIB).await.unwrap();
    assert!(!ext[0].is_zero(), "{ext:?}");
    c.write_zeroes(10 * MIB, 65536, ZeroOptions::default())
        .await
        .unwrap();
    c.trim(11 * MIB, 65536, false).await.unwrap();
    let z = c.read_bytes(10 * MIB, 65536).await.unwrap();
    assert!(z.iter().all(|b| *b == 0));
    assert_eq!(
        c.read_bytes(10 * MIB + 65536, 65536).await.unwrap(),
        data.slice(65536..131072)
    );
    if c.info().has(tx_flags::SEND_CACHE) {
        c.cache(0, MIB).await.unwrap();
    }
    // Out-of-range on the server side too (bypassing nothing: the client
    // refuses first).
    assert!(matches!(
        c.read(64 * MIB, 1).await,
        Err(ClientError::OutOfRange { .. })
    ));
    c.disconnect().await.unwrap();
}

/// Several connections when the server allows multi-conn (nbdkit's memory
/// plugin does); writes spread over them are all there after one flush.
#[tokio::test]
async fn multi_conn_spreads_requests_over_several_connections() {
    if !require("nbdkit") {
        return;
    }
    let d = Daemon::nbdkit(&["memory", "size=16M"]);
    let m = nbd_client::MultiConn::connect("127.0.0.1", d.port, &ConnectOptions::new(""), 4)
        .await
        .unwrap();
    assert_ne!(m.info().flags & tx_flags::CAN_MULTI_CONN, 0);
    assert_eq!(m.connections(), 4);
    let data = Bytes::from(pattern(11, 4 * MIB as usize));
    let writes = (0..16u64).map(|i| {
        let d = data.slice((i * 256 * 1024) as usize..((i + 1) * 256 * 1024) as usize);
        let m = &m;
        async move { m.write(i * 256 * 1024, d, false).await }
    });
    futures_util::future::try_join_all(writes).await.unwrap();
    m.flush().await.unwrap();
    // Read back through a fresh single connection.
    let c = Client::connect(d.addr(), &ConnectOptions::new(""))
        .await
        .unwrap();
    let got = c.read_bytes(0, 4 * MIB as u32).await.unwrap();
    assert_eq!(&got[..], &data[..]);
    m.disconnect().await.unwrap();
}

/// A server without multi-conn gets one connection, whatever was asked.
#[tokio::test]
async fn no_multi_conn_means_one_connection() {
    if !require("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = sparse_raw(dir.path());
    // qemu-nbd without --shared allows one client: no multi-conn.
    let d = Daemon::qemu_nbd(&path, "raw", "d", &[]);
    let m = nbd_client::MultiConn::connect("127.0.0.1", d.port, &ConnectOptions::new("d"), 4)
        .await
        .unwrap();
    if m.info().flags & tx_flags::CAN_MULTI_CONN == 0 {
        assert_eq!(m.connections(), 1);
    }
    let got = m.read(MIB, 4096).await.unwrap();
    let n: u64 = got.iter().map(|c| c.len()).sum();
    assert_eq!(n, 4096);
    let all = m.pick().read_bytes(MIB, 4096).await.unwrap();
    assert_eq!(&all[..], &want[MIB as usize..MIB as usize + 4096]);
    m.disconnect().await.unwrap();
}

/// Every extent of context `ctx` from 0 to the end, clamped: (offset,
/// length, flags).
async fn all_extents_of(c: &Client, ctx: &str) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < c.size() {
        for x in c.block_status_of(ctx, at, c.size() - at).await.unwrap() {
            let len = x.length.min(c.size() - at);
            out.push((at, len, x.flags));
            at += len;
            if at >= c.size() {
                break;
            }
        }
    }
    out
}

/// Dirty ranges, adjacent ones merged.
fn dirty_ranges(ext: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(at, len, flags) in ext {
        if flags & nbd_client::reply::DIRTY == 0 {
            continue;
        }
        match out.last_mut() {
            Some((s, l)) if *s + *l == at => *l += len,
            _ => out.push((at, len)),
        }
    }
    out
}

/// `qemu:dirty-bitmap:b0` through `qemu-nbd -r -B b0`: the bitmap was added
/// after a first write, so only what qemu-io wrote afterwards is dirty
/// (rounded out to the bitmap's 64 KiB granularity); `base:allocation` on
/// the same connection still answers (the server reports both contexts in
/// every reply); a bitmap the server does not export is a clean error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_dirty_bitmap_extents_match_the_writes() {
    if !require("qemu-nbd") || !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "64M"]).await;
    run_ok("qemu-io", &["-c", "write -P 1 0 1M", img_s]).await;
    run_ok("qemu-img", &["bitmap", "--add", img_s, "b0"]).await;
    // One aligned block, one unaligned range across a granule boundary, and
    // the last byte of the disk.
    for w in [
        "write -P 2 4M 64k",
        "write -P 3 10547200 100k",
        "write -P 4 67108863 1",
    ] {
        run_ok("qemu-io", &["-f", "qcow2", "-c", w, img_s]).await;
    }
    let want = vec![
        (4 * MIB, 64 * 1024),
        (10 * MIB, 192 * 1024),
        (64 * MIB - 64 * 1024, 64 * 1024),
    ];
    let d = Daemon::qemu_nbd(&img, "qcow2", "disk0", &["-r", "-B", "b0"]);
    for extended in [true, false] {
        let mut opts = ConnectOptions::new("disk0");
        opts.extended_headers = extended;
        opts.meta_contexts = vec![
            "qemu:dirty-bitmap:b0".into(),
            "qemu:dirty-bitmap:nope".into(),
        ];
        let c = Client::connect(d.addr(), &opts).await.unwrap();
        assert!(c.meta_context("qemu:dirty-bitmap:b0").is_some());
        assert!(c.info().base_allocation.is_some());
        assert_eq!(c.meta_contexts().len(), 2, "{:?}", c.meta_contexts());
        let ext = all_extents_of(&c, "qemu:dirty-bitmap:b0").await;
        assert_eq!(dirty_ranges(&ext), want, "extended {extended}: {ext:?}");
        // A window in the middle of a dirty run starts at the window.
        let e = c
            .block_status_of("qemu:dirty-bitmap:b0", 10 * MIB + 65536, 65536)
            .await
            .unwrap();
        assert!(e[0].is_dirty(), "{e:?}");
        // base:allocation on the same connection.
        assert!(!all_extents(&c).await.is_empty());
        match c.block_status_of("qemu:dirty-bitmap:nope", 0, MIB).await {
            Err(ClientError::NoMetaContext(n)) => assert_eq!(n, "qemu:dirty-bitmap:nope"),
            other => panic!("{other:?}"),
        }
        c.disconnect().await.unwrap();
    }
    // Only the bitmap, no base:allocation: still one context to answer.
    let mut opts = ConnectOptions::new("disk0");
    opts.block_status = false;
    opts.meta_contexts = vec!["qemu:dirty-bitmap:b0".into()];
    let c = Client::connect(d.addr(), &opts).await.unwrap();
    assert!(c.info().base_allocation.is_none());
    let ext = all_extents_of(&c, "qemu:dirty-bitmap:b0").await;
    assert_eq!(dirty_ranges(&ext), want);
    assert!(matches!(
        c.block_status(0, MIB).await,
        Err(ClientError::Unsupported(_))
    ));
}
