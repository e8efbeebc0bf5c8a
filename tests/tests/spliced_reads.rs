//! READ replies spliced from the page cache into the socket
//! (`nbd_server::splice`), judged by real clients: a read-only chain with
//! every kind of run a reply can hold (clusters of several layers, zero
//! clusters, a compressed cluster, 512-byte clusters whose runs are not
//! page-aligned) must read back identical through nbdcopy and qemu-img,
//! and a client that leaves with spliced replies unread must leave no pipe
//! behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use integration_tests::client::Client;
use integration_tests::support::{self, assert_identical, qemu_img_create, require, run_ok};
use nbd_server::splice::{pipes_open, pipes_pooled, spliced_bytes};
use nbd_server::{ServerConfig, SpliceReads};
use qcow_backend::{OpenOptions, QcowBackend};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// The tests here read the process-wide splice counters: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn qemu_io(image: &Path, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(image.to_str().unwrap());
    let out = run_ok("qemu-io", &args).await;
    assert!(!out.contains("failed"), "{out}");
}

async fn overlay(dir: &Path, name: &str, parent: &str, cluster_size: u32) -> PathBuf {
    let top = dir.join(name);
    let opt = format!("cluster_size={cluster_size}");
    qemu_img_create(&top, None, Some((parent, "qcow2")), &["-o", &opt]).await;
    top
}

/// base (disk-like data, written by qemu-img) ← mid (64 KiB clusters:
/// scattered writes, zeroes, one compressed cluster) ← top (512-byte
/// clusters: small writes at odd offsets). Returns the top.
async fn chain(dir: &Path) -> PathBuf {
    let src = support::write_file(dir, "src.raw", &support::disk_like(5, SIZE as usize));
    let base = dir.join("base.qcow2");
    support::qemu_img_raw_to_qcow2(src.to_str().unwrap(), &base).await;
    let mid = overlay(dir, "mid.qcow2", "base.qcow2", 64 << 10).await;
    let mut cmds: Vec<String> = (0..24u64)
        .map(|i| format!("write -q -P {} {} 64k", 0x20 + i, (i * 37 % 250) * 65536))
        .collect();
    cmds.push(format!("write -q -z {} 256k", 3 * MIB));
    cmds.push(format!("write -q -c -P 0x66 {} 64k", 5 * MIB));
    qemu_io(&mid, &cmds).await;
    let top = overlay(dir, "top.qcow2", "mid.qcow2", 512).await;
    let cmds: Vec<String> = (0..200u64)
        .map(|i| format!("write -q -P {} {} 1536", 0x80 + i % 64, i * 81_920 + 512))
        .collect();
    qemu_io(&top, &cmds).await;
    top
}

async fn serve(top: &Path, splice: SpliceReads) -> support::TestServer {
    let b = QcowBackend::open(top, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    let config = ServerConfig {
        splice_reads: splice,
        ..ServerConfig::default()
    };
    support::TestServer::start_with(config, vec![support::export("chain", Arc::new(b))]).await
}

/// One test's chain, served with `splice`; `None` without the tools.
struct Case {
    /// Held for the test's length.
    _one: tokio::sync::MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    top: PathBuf,
    srv: support::TestServer,
}

async fn case(splice: SpliceReads) -> Option<Case> {
    if !require("qemu-io") || !require("nbdcopy") {
        return None;
    }
    let one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path()).await;
    let srv = serve(&top, splice).await;
    Some(Case {
        _one: one,
        dir,
        top,
        srv,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spliced_chain_reads_back_identical_through_nbdcopy_and_qemu_img() {
    let Some(c) = case(SpliceReads::Always).await else {
        return;
    };
    let (dir, top, srv) = (&c.dir, &c.top, &c.srv);
    let uri = srv.uri("chain");
    let before = spliced_bytes();
    for extents in [true, false] {
        let out = dir.path().join("out.raw");
        let mut args = vec!["-C", "2"];
        if !extents {
            // 4 MiB requests: replies of several pipes each.
            args.extend(["--no-extents", "--request-size=4194304"]);
        }
        let o = out.to_str().unwrap().to_owned();
        args.extend([uri.as_str(), o.as_str()]);
        run_ok("nbdcopy", &args).await;
        assert_identical("qcow2", top.to_str().unwrap(), "raw", &o).await;
        std::fs::remove_file(&out).unwrap();
    }
    // qemu's own NBD client, request sizes of its choosing.
    assert_identical("raw", &uri, "qcow2", top.to_str().unwrap()).await;
    let spliced = spliced_bytes() - before;
    assert!(
        spliced >= 2 * 8 * MIB,
        "only {spliced} bytes went through pipes: the zero-copy path was not used"
    );
    // Cold layers: the probes miss, replies mix pipes and copies as the
    // kernel brings pages back, and the bytes stay the same.
    for layer in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        let f = std::fs::File::open(dir.path().join(layer)).unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }
    assert_identical("raw", &uri, "qcow2", top.to_str().unwrap()).await;
    srv.server.shutdown().await.unwrap();
    assert_eq!(pipes_open(), pipes_pooled(), "a pipe outlived its reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_clients_are_not_spliced_by_default() {
    let Some(c) = case(SpliceReads::default()).await else {
        return;
    };
    let (dir, top, srv) = (&c.dir, &c.top, &c.srv);
    let before = spliced_bytes();
    let out = dir.path().join("out.raw");
    run_ok("nbdcopy", &[&srv.uri("chain"), out.to_str().unwrap()]).await;
    assert_identical("qcow2", top.to_str().unwrap(), "raw", out.to_str().unwrap()).await;
    assert_eq!(
        spliced_bytes(),
        before,
        "a loopback client got spliced replies"
    );
    srv.server.shutdown().await.unwrap();
}

/// A client pipelines 1 MiB READs it never reads and leaves: its
/// connection ends on the failed send, every pipe it held is closed (or
/// back in the pool, empty), and another client meanwhile reads the same
/// export identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_with_spliced_replies_unread_leaks_no_pipe() {
    let Some(case) = case(SpliceReads::Always).await else {
        return;
    };
    let (dir, top, srv) = (&case.dir, &case.top, &case.srv);
    let addr = srv.addr;
    let greedy = tokio::task::spawn_blocking(move || {
        let mut c = Client::connect(addr, "chain").unwrap();
        for i in 0..32u64 {
            c.read_unacknowledged(i % 16 * MIB, MIB as u32).unwrap();
        }
        c
    })
    .await
    .unwrap();
    let out = dir.path().join("out.raw");
    run_ok("nbdcopy", &[&srv.uri("chain"), out.to_str().unwrap()]).await;
    assert_identical("qcow2", top.to_str().unwrap(), "raw", out.to_str().unwrap()).await;
    drop(greedy);
    // Waits for every connection of the export to end.
    srv.server.remove_export("chain").await.unwrap();
    assert_eq!(
        pipes_open(),
        pipes_pooled(),
        "pipes of the dropped client leaked"
    );
    srv.server.shutdown().await.unwrap();
}

/// A read-only raw image (a restore point kept raw, `export -r`) reads on
/// the connection's thread: holes punched at page and sub-page
/// boundaries, a size that ends inside a page, spliced and copied, then
/// again with its pages dropped, byte-identical through nbdcopy (with and
/// without extents) and qemu-img.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_raw_image_reads_back_identical_spliced_or_copied_cached_or_cold() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let size = SIZE as usize + 1536;
    let src = support::write_file(dir.path(), "src.raw", &support::disk_like(9, size));
    {
        let f = std::fs::File::options().write(true).open(&src).unwrap();
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        for (at, n) in [
            (0, 8192),
            (MIB, 3 * MIB),
            (5 * MIB + 512, 70_000),
            (SIZE - 4096, 4096),
        ] {
            rustix::fs::fallocate(&f, punch, at, n).unwrap();
        }
    }
    let src_s = src.to_str().unwrap();
    for splice in [SpliceReads::Always, SpliceReads::Never] {
        let b = qcow_backend::RawBackend::open(&src, true).unwrap();
        let config = ServerConfig {
            splice_reads: splice,
            ..ServerConfig::default()
        };
        let srv =
            support::TestServer::start_with(config, vec![support::export("raw", Arc::new(b))])
                .await;
        let uri = srv.uri("raw");
        let before = spliced_bytes();
        for cold in [false, true] {
            if cold {
                let f = std::fs::File::open(&src).unwrap();
                rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            }
            for extents in [true, false] {
                let out = dir.path().join("out.raw");
                let o = out.to_str().unwrap().to_owned();
                let mut args = vec!["-C", "2"];
                if !extents {
                    args.extend(["--no-extents", "--request-size=4194304"]);
                }
                args.extend([uri.as_str(), o.as_str()]);
                run_ok("nbdcopy", &args).await;
                assert_identical("raw", src_s, "raw", &o).await;
                std::fs::remove_file(&out).unwrap();
            }
            assert_identical("raw", &uri, "raw", src_s).await;
        }
        let spliced = spliced_bytes() - before;
        match splice {
            SpliceReads::Always => assert!(
                spliced >= 8 * MIB,
                "only {spliced} bytes went through pipes: the raw image was not spliced"
            ),
            _ => assert_eq!(spliced, 0, "spliced with --splice-reads never"),
        }
        srv.server.shutdown().await.unwrap();
        assert_eq!(pipes_open(), pipes_pooled(), "a pipe outlived its reply");
    }
}
