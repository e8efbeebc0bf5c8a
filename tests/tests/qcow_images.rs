//! qcow2 images written by our backend, judged by qemu-img: seeded random
//! writes, zeroes and trims (aligned and not, many in flight) mirrored into a
//! raw file, then `qemu-img check` clean and `qemu-img compare` identical.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use integration_tests::support::{
    self, assert_check_clean, assert_identical, pattern, qemu_img_create, qemu_img_to_raw, require,
    run_ok,
};
use nbd_server::backend::conformance::SplitMix;
use nbd_server::{BlockBackend, ZeroFlags};
use qcow_backend::{BackingPolicy, CreateOptions, OpenOptions, QcowBackend};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, may_trim: bool },
    Trim { off: u64, len: u64 },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match *self {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Trim { off, len } => {
                (off, off + len)
            }
        }
    }
}

/// A batch of non-overlapping random operations (so running them
/// concurrently has one defined result).
fn batch(rng: &mut SplitMix, size: u64, n: usize) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    while ops.len() < n {
        let aligned = rng.next() % 2 == 0;
        let (mut off, mut len) = (rng.next() % size, 1 + rng.next() % (512 * 1024));
        if aligned {
            off &= !4095;
            len = (len + 4095) & !4095;
        }
        len = len.min(size - off).max(1);
        let op = match rng.next() % 10 {
            0..=5 => Op::Write {
                off,
                len,
                seed: rng.next(),
            },
            6..=8 => Op::Zero {
                off,
                len,
                may_trim: rng.next() % 2 == 0,
            },
            _ => Op::Trim { off, len },
        };
        let (a, b) = op.range();
        if ops.iter().all(|o| {
            let (c, d) = o.range();
            b <= c || d <= a
        }) {
            ops.push(op);
        }
    }
    ops
}

/// Apply ops to the backend concurrently and to the mirror file in order.
/// Our qcow2 TRIM always reads back as zeroes (required in overlays), so
/// the mirror models it as a zero write.
async fn apply(backend: &Arc<dyn BlockBackend>, mirror: &std::fs::File, ops: &[Op]) {
    let mut tasks = Vec::new();
    for op in ops.iter().copied() {
        let b = Arc::clone(backend);
        tasks.push(tokio::spawn(async move {
            match op {
                Op::Write { off, len, seed } => {
                    b.write(off, Bytes::from(pattern(seed, len as usize))).await
                }
                Op::Zero { off, len, may_trim } => {
                    b.write_zeroes(
                        off,
                        len,
                        ZeroFlags {
                            may_trim,
                            fast: false,
                        },
                    )
                    .await
                }
                Op::Trim { off, len } => b.trim(off, len).await,
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => mirror
                .write_all_at(&pattern(seed, len as usize), off)
                .unwrap(),
            Op::Zero { off, len, .. } | Op::Trim { off, len } => {
                mirror.write_all_at(&vec![0u8; len as usize], off).unwrap()
            }
        }
    }
}

/// Run `rounds` batches of `per_batch` concurrent ops, then flush, close,
/// check and compare.
async fn exercise(
    image: &Path,
    backend: QcowBackend,
    mirror_path: &Path,
    seed: u64,
    rounds: usize,
    per_batch: usize,
) {
    let size = backend.size();
    let backend: Arc<dyn BlockBackend> = Arc::new(backend);
    let mirror = std::fs::OpenOptions::new()
        .write(true)
        .open(mirror_path)
        .unwrap();
    let mut rng = SplitMix(seed);
    for _ in 0..rounds {
        let ops = batch(&mut rng, size, per_batch);
        apply(&backend, &mirror, &ops).await;
    }
    backend.flush().await.unwrap();
    backend.close().await.unwrap();
    drop(backend);
    assert_check_clean(image, false).await;
    assert_identical(
        "qcow2",
        image.to_str().unwrap(),
        "raw",
        mirror_path.to_str().unwrap(),
    )
    .await;
}

fn raw_mirror(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

async fn fresh_case(cluster_size: u32, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB + 3 * 512;
    let img = dir.path().join("fresh.qcow2");
    let mut c = CreateOptions::fresh(size);
    c.cluster_size = cluster_size;
    let b = QcowBackend::create(&img, &c, &OpenOptions::new())
        .await
        .unwrap();
    let mirror = raw_mirror(dir.path(), "mirror.raw", size);
    exercise(&img, b, &mirror, seed, 40, 16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_on_fresh_image_64k_clusters() {
    if !require("qemu-img") {
        return;
    }
    fresh_case(65536, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_on_fresh_image_4k_and_2m_clusters() {
    if !require("qemu-img") {
        return;
    }
    fresh_case(4096, 2).await;
    fresh_case(2 << 20, 3).await;
}

/// Fill `base` (any format) with data through qemu-io so the overlay has
/// something to hide.
async fn qemu_io_fill(path: &Path, fmt: &str) {
    run_ok(
        "qemu-io",
        &[
            "-f",
            fmt,
            "-c",
            "write -P 0x11 0 16M",
            "-c",
            "write -P 0x22 20M 5M",
            "-c",
            "write -P 0x33 40000 300000",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x44 60M 4M",
            path.to_str().unwrap(),
        ],
    )
    .await;
}

/// A qcow2 of `size` at `path` with one qemu-io command run on it.
async fn qcow2_with(path: &Path, size: &str, qemu_io: &str) {
    qemu_img_create(path, Some(size), None, &[]).await;
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", qemu_io, path.to_str().unwrap()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_on_overlay_over_qemu_made_base() {
    if !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, Some("64M"), None, &[]).await;
    qemu_io_fill(&base, "qcow2").await;
    let mirror = dir.path().join("mirror.raw");
    qemu_img_to_raw("qcow2", &base, &mirror).await;
    let top = dir.path().join("inc1.qcow2");
    let b = QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
        .await
        .unwrap();
    assert_eq!(b.size(), 64 * MIB);
    exercise(&top, b, &mirror, 7, 40, 16).await;
    // The base is untouched and the chain names it relatively.
    assert_check_clean(&base, false).await;
    let info = run_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--backing-chain",
            top.to_str().unwrap(),
        ],
    )
    .await;
    let j: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j[0]["backing-filename"], "base.qcow2");
    assert_eq!(j[0]["backing-filename-format"], "qcow2");
    assert_eq!(j.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_on_overlay_chain_over_our_base() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    let base = dir.path().join("full.qcow2");
    let mirror = raw_mirror(dir.path(), "mirror.raw", size);
    let b = QcowBackend::create(&base, &CreateOptions::fresh(size), &OpenOptions::new())
        .await
        .unwrap();
    exercise(&base, b, &mirror, 21, 20, 16).await;
    // Two incrementals on top: a chain of three.
    let inc1 = dir.path().join("inc1.qcow2");
    let b = QcowBackend::create(&inc1, &CreateOptions::overlay(&base), &OpenOptions::new())
        .await
        .unwrap();
    exercise(&inc1, b, &mirror, 22, 20, 16).await;
    let inc2 = dir.path().join("inc2.qcow2");
    let b = QcowBackend::create(&inc2, &CreateOptions::overlay(&inc1), &OpenOptions::new())
        .await
        .unwrap();
    assert_eq!(b.chain_depth(), 3);
    exercise(&inc2, b, &mirror, 23, 20, 16).await;
    let out = run_ok(
        "qemu-img",
        &["info", "--backing-chain", inc2.to_str().unwrap()],
    )
    .await;
    assert!(out.contains("backing file: inc1.qcow2"), "{out}");
    assert!(out.contains("backing file: full.qcow2"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_over_raw_base_and_moved_repository() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let data = support::disk_like(9, 16 * MIB as usize);
    let base = support::write_file(&repo, "base.raw", &data);
    let mirror = support::write_file(dir.path(), "mirror.raw", &data);
    let top = repo.join("top.qcow2");
    let b = QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
        .await
        .unwrap();
    exercise(&top, b, &mirror, 5, 10, 8).await;
    // Move the whole repository: relative backing names keep the chain intact.
    let moved = dir.path().join("moved");
    std::fs::rename(&repo, &moved).unwrap();
    let top = moved.join("top.qcow2");
    let b = QcowBackend::open(&top, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    let got = nbd_server::backend::conformance::read_flat(&b, 0, 16 * MIB as u32).await;
    assert!(
        got == std::fs::read(&mirror).unwrap(),
        "moved chain reads the same"
    );
    assert_identical(
        "qcow2",
        top.to_str().unwrap(),
        "raw",
        mirror.to_str().unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_made_compressed_image_reads_identically() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = support::disk_like(4, 8 * MIB as usize);
    let src = support::write_file(dir.path(), "src.raw", &data);
    let img = dir.path().join("c.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    )
    .await;
    let b = QcowBackend::open(&img, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    let got = nbd_server::backend::conformance::read_flat(&b, 0, data.len() as u32).await;
    assert!(got == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_depth_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let mut parent = dir.path().join("l0.qcow2");
    let b = QcowBackend::create(&parent, &CreateOptions::fresh(MIB), &OpenOptions::new())
        .await
        .unwrap();
    b.close().await.unwrap();
    drop(b);
    for i in 1..5 {
        let p = dir.path().join(format!("l{i}.qcow2"));
        let b = QcowBackend::create(&p, &CreateOptions::overlay(&parent), &OpenOptions::new())
            .await
            .unwrap();
        b.close().await.unwrap();
        drop(b);
        parent = p;
    }
    let mut policy = BackingPolicy::within([dir.path().canonicalize().unwrap()]);
    policy.max_depth = 3;
    let e = QcowBackend::open(&parent, &OpenOptions::new().policy(policy))
        .await
        .unwrap_err();
    assert!(
        matches!(e, qcow_backend::ImageError::ChainTooDeep { max: 3, .. }),
        "{e}"
    );
    let ok = QcowBackend::open(&parent, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    assert_eq!(ok.chain_depth(), 5);
}

/// qemu-io commands for one round of non-overlapping random I/O; `aio_*`
/// keeps many requests in flight over NBD.
fn qemu_io_round(rng: &mut SplitMix, size: u64, n: usize) -> Vec<String> {
    let ops = batch(rng, size, n);
    let mut cmds = Vec::new();
    for op in ops {
        cmds.push(match op {
            Op::Write { off, len, seed } => format!("aio_write -P {} {off} {len}", seed % 250 + 1),
            Op::Zero { off, len, .. } => format!("aio_write -z {off} {len}"),
            Op::Trim { off, len } => format!("discard {off} {len}"),
        });
    }
    cmds.push("aio_flush".into());
    cmds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_end_to_end_nbdcopy_then_concurrent_qemu_io_into_overlay() {
    if !require("qemu-io") || !require("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let src = support::disk_like(17, size as usize);
    let src_path = support::write_file(dir.path(), "src.raw", &src);
    let base = dir.path().join("full.qcow2");
    let b = QcowBackend::create(&base, &CreateOptions::fresh(size), &OpenOptions::new())
        .await
        .unwrap();
    let srv = support::TestServer::start(vec![support::export("full", Arc::new(b))]).await;
    run_ok(
        "nbdcopy",
        &[
            "--flush",
            "-C",
            "4",
            src_path.to_str().unwrap(),
            &srv.uri("full"),
        ],
    )
    .await;
    srv.server.shutdown().await.unwrap();
    assert_check_clean(&base, false).await;
    assert_identical(
        "qcow2",
        base.to_str().unwrap(),
        "raw",
        src_path.to_str().unwrap(),
    )
    .await;

    let top = dir.path().join("inc.qcow2");
    let t = QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
        .await
        .unwrap();
    let srv = support::TestServer::start(vec![support::export("inc", Arc::new(t))]).await;
    let mirror = support::write_file(dir.path(), "mirror.raw", &src);
    let mut rng = SplitMix(99);
    let uri = srv.uri("inc");
    for _ in 0..6 {
        let cmds = qemu_io_round(&mut rng, size, 24);
        let mut args: Vec<&str> = vec!["-f", "raw"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        let mut nbd_args = args.clone();
        nbd_args.push(&uri);
        let out = run_ok("qemu-io", &nbd_args).await;
        assert!(!out.contains("failed"), "{out}");
        // Same commands on the mirror; our TRIM reads back as zeroes.
        let mirror_cmds: Vec<String> = cmds
            .iter()
            .map(|c| c.replace("discard", "write -z"))
            .collect();
        let mut m_args: Vec<&str> = vec!["-f", "raw"];
        for c in &mirror_cmds {
            m_args.extend(["-c", c.as_str()]);
        }
        let m = mirror.to_str().unwrap().to_owned();
        m_args.push(&m);
        run_ok("qemu-io", &m_args).await;
    }
    srv.server.shutdown().await.unwrap();
    assert_check_clean(&top, false).await;
    assert_identical(
        "qcow2",
        top.to_str().unwrap(),
        "raw",
        mirror.to_str().unwrap(),
    )
    .await;
}

/// `nbdinfo --map` of meta context `ctx`: (offset, length, type) each.
async fn nbdinfo_map(uri: &str, ctx: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok("nbdinfo", &[&format!("--map={ctx}"), "--json", uri]).await;
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    j.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            (n("offset"), n("length"), n("type"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_depth_and_base_allocation_of_a_chain_over_nbd() {
    if !require("nbdinfo") || !require("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2_with(&base, "8M", "write -P 1 0 2M").await;
    let top = dir.path().join("top.qcow2");
    let t = QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
        .await
        .unwrap();
    t.write(MIB, Bytes::from(vec![2u8; MIB as usize]))
        .await
        .unwrap();
    // Zeroing hides base data (explicit zero clusters on top); zeroing a
    // range that already reads as zero through the chain writes nothing.
    t.write_zeroes(MIB / 2, MIB / 2, ZeroFlags::default())
        .await
        .unwrap();
    t.write_zeroes(4 * MIB, MIB, ZeroFlags::default())
        .await
        .unwrap();
    let srv = support::TestServer::start(vec![support::export("c", Arc::new(t))]).await;
    let uri = srv.uri("c");
    let map = |ctx: &'static str| nbdinfo_map(&uri, ctx);
    // Depth: 0-0.5M from the base (2), 0.5-2M on top (1: zeroes, then
    // data), the rest unallocated everywhere (0).
    assert_eq!(
        map("qemu:allocation-depth").await,
        vec![
            (0, MIB / 2, 2),
            (MIB / 2, 3 * MIB / 2, 1),
            (2 * MIB, 6 * MIB, 0)
        ]
    );
    // base:allocation: data from either layer, hole+zero elsewhere.
    assert_eq!(
        map("base:allocation").await,
        vec![
            (0, MIB / 2, 0),
            (MIB / 2, MIB / 2, 3),
            (MIB, MIB, 0),
            (2 * MIB, 6 * MIB, 3)
        ]
    );
    srv.server.shutdown().await.unwrap();
}

/// An incremental of a disk that grew is an overlay larger than its backing
/// file. Block status past the backing file's end was `EIO` ("backend
/// returned no extents"): restores through nbdinfo, nbdcopy or qemu-img of
/// such a disk failed there. Now that tail is unallocated zeroes, and the
/// whole disk copies identical to what qemu reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_disks_overlay_reports_and_reads_past_its_backing_files_end() {
    if !require("nbdinfo") || !require("nbdcopy") || !require("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2_with(&base, "4M", "write -P 1 0 4M").await;
    let top = dir.path().join("top.qcow2");
    let grown = CreateOptions {
        size: Some(8 * MIB),
        ..CreateOptions::overlay(&base)
    };
    let t = QcowBackend::create(&top, &grown, &OpenOptions::new())
        .await
        .unwrap();
    t.write(6 * MIB, Bytes::from(vec![2u8; MIB as usize]))
        .await
        .unwrap();
    t.close().await.unwrap();
    drop(t);
    let r = QcowBackend::open(&top, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    let srv = support::TestServer::start(vec![support::export("g", Arc::new(r))]).await;
    let uri = srv.uri("g");
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let map = nbdinfo_map(&uri, ctx).await;
        let want = if ctx == "base:allocation" {
            // Data, hole+zero (4-6M: past the base's end, not on top),
            // data on top, hole+zero.
            vec![
                (0, 4 * MIB, 0),
                (4 * MIB, 2 * MIB, 3),
                (6 * MIB, MIB, 0),
                (7 * MIB, MIB, 3),
            ]
        } else {
            vec![
                (0, 4 * MIB, 2),
                (4 * MIB, 2 * MIB, 0),
                (6 * MIB, MIB, 1),
                (7 * MIB, MIB, 0),
            ]
        };
        assert_eq!(map, want, "{ctx}");
    }
    // nbdcopy uses block status; qemu-img reads the same chain itself.
    let copied = dir.path().join("copied.raw");
    run_ok("nbdcopy", &[&uri, copied.to_str().unwrap()]).await;
    assert_identical(
        "raw",
        copied.to_str().unwrap(),
        "qcow2",
        top.to_str().unwrap(),
    )
    .await;
    srv.server.shutdown().await.unwrap();
}
