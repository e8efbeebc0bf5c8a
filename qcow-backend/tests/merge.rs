//! Chain merges checked against qemu: layers made with qemu-img/qemu-io,
//! results compared (`qemu-img compare`), checked (`qemu-img check`) and
//! inspected (`qemu-img info`, our own allocation depths).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_server::BlockBackend;
use qcow_backend::{merge, BackingPolicy, ImageErrorKind, MergeOptions, OpenOptions, QcowBackend};

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create` a layer (on `backing`, if any) and apply qemu-io commands.
fn layer(dir: &Path, name: &str, backing: Option<&str>, cluster: &str, cmds: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let opt = format!("cluster_size={cluster}");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opt];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.push(s(&p));
    if backing.is_none() {
        args.push("16M");
    }
    run("qemu-img", &args);
    for c in cmds {
        run("qemu-io", &["-f", "qcow2", "-c", c, s(&p)]);
    }
    p
}

/// F ← I1 ← I2 ← I3 (16 MiB, 64 KiB clusters): overlapping writes, zeroes
/// over data, data over zeroes, a partial-cluster write, a hole in F.
fn chain(dir: &Path) -> [PathBuf; 4] {
    let f = layer(dir, "F.qcow2", None, "64k", &["write -P 0x11 0 12M"]);
    let i1 = layer(
        dir,
        "I1.qcow2",
        Some("F.qcow2"),
        "64k",
        &[
            "write -P 0x22 1M 2M",
            "write -z 4M 1M",
            "write -P 0x23 13M 1M",
        ],
    );
    let i2 = layer(
        dir,
        "I2.qcow2",
        Some("I1.qcow2"),
        "64k",
        &[
            "write -P 0x33 2M 1M",
            "write -P 0x34 4352k 64k",
            "write -z 6M 512k",
        ],
    );
    let i3 = layer(
        dir,
        "I3.qcow2",
        Some("I2.qcow2"),
        "64k",
        &[
            "write -P 0x44 0 64k",
            "write -z 1M 256k",
            "write -P 0x45 7M 100k",
        ],
    );
    [f, i1, i2, i3]
}

fn opts(dir: &Path) -> MergeOptions {
    MergeOptions::new(BackingPolicy::strict_within([dir.canonicalize().unwrap()]))
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn assert_same_guest_view(a: &Path, b: &Path) {
    let out = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(a), s(b)],
    );
    assert!(out.contains("identical"), "{out}");
}

fn assert_clean(p: &Path) {
    run("qemu-img", &["check", "-q", "-f", "qcow2", s(p)]);
}

fn info(p: &Path) -> String {
    run("qemu-img", &["info", "-U", "--output=json", s(p)])
}

/// Allocation depth at `off` in the chain of `p` (1 = `p` itself).
async fn depth_at(p: &Path, off: u64) -> u32 {
    let b = QcowBackend::open(p, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    let d = b.block_status(off, 4096).await.unwrap()[0].depth;
    b.close().await.unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_middle_incremental_keeps_the_view_and_backs_onto_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let files = chain(dir.path());
    let [f, _i1, i2, _i3] = &files;
    let before = snapshot(&files);
    let out = dir.path().join("I2.merging");
    let rep = merge(i2, &files[1], &out, &opts(dir.path())).await.unwrap();
    assert_eq!(rep.layers_merged, 2);
    assert_eq!(rep.backing, Some(f.canonicalize().unwrap()));
    // I1's zeroes over F's data at 4M..5M (less I2's 64k) and I2's at
    // 6M..6.5M must be explicit; I1's and I2's data is copied, F's not.
    assert_eq!(rep.bytes_zeroed, MIB - 64 * 1024 + 512 * 1024, "{rep:?}");
    assert_eq!(rep.bytes_copied, 3 * MIB + 64 * 1024, "{rep:?}");
    assert_same_guest_view(i2, &out);
    assert_clean(&out);
    let i = info(&out);
    assert!(i.contains(r#""backing-filename": "F.qcow2""#), "{i}");
    assert!(i.contains(r#""backing-filename-format": "qcow2""#), "{i}");
    assert!(i.contains(r#""cluster-size": 65536"#), "{i}");
    // Data only in F stays there; merged data and zeroes are in `out`.
    assert_eq!(depth_at(&out, 8 * MIB).await, 2);
    assert_eq!(depth_at(&out, MIB).await, 1);
    assert_eq!(depth_at(&out, 4 * MIB).await, 1);
    // Nothing else was touched.
    assert_eq!(snapshot(&files), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flattening_to_the_full_makes_a_synthetic_full() {
    let dir = tempfile::tempdir().unwrap();
    let files = chain(dir.path());
    let before = snapshot(&files);
    let out = dir.path().join("I3.full");
    let rep = merge(&files[3], &files[0], &out, &opts(dir.path()))
        .await
        .unwrap();
    assert_eq!((rep.layers_merged, rep.backing.clone()), (4, None));
    // Without a backing, zeroes are just left unallocated.
    assert_eq!(rep.bytes_zeroed, 0, "{rep:?}");
    assert_same_guest_view(&files[3], &out);
    assert_clean(&out);
    let i = info(&out);
    assert!(!i.contains("backing-filename"), "{i}");
    // Zeroed and never-written ranges take no space.
    assert_eq!(depth_at(&out, 4 * MIB + 512 * 1024).await, 0);
    assert_eq!(depth_at(&out, 15 * MIB).await, 0);
    assert_eq!(snapshot(&files), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_direct_parent_only_and_merging_two_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let files = chain(dir.path());
    for (top, x, backing) in [(3, 2, 1), (3, 1, 0), (1, 0, usize::MAX)] {
        let out = dir.path().join(format!("m{top}{x}.qcow2"));
        // Small pieces, few in flight: many pieces per run, all completing
        // out of order.
        let mut o = opts(dir.path());
        o.chunk_size = 3 * 64 * 1024 + 1;
        o.inflight = 3;
        let rep = merge(&files[top], &files[x], &out, &o).await.unwrap();
        assert_eq!(
            rep.backing,
            files.get(backing).map(|b| b.canonicalize().unwrap())
        );
        assert_same_guest_view(&files[top], &out);
        assert_clean(&out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroes_over_data_hide_the_new_backing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = layer(d, "F.qcow2", None, "64k", &["write -P 0x77 0 16M"]);
    let i1 = layer(d, "I1.qcow2", Some("F.qcow2"), "64k", &["write -z 0 16M"]);
    let i2 = layer(
        d,
        "I2.qcow2",
        Some("I1.qcow2"),
        "64k",
        &["write -P 0x78 5M 64k"],
    );
    let out = d.join("out.qcow2");
    let rep = merge(&i2, &i1, &out, &opts(d)).await.unwrap();
    assert_eq!(rep.bytes_zeroed, 16 * MIB - 64 * 1024, "{rep:?}");
    assert_eq!(rep.bytes_copied, 64 * 1024, "{rep:?}");
    assert_same_guest_view(&i2, &out);
    assert_clean(&out);
    run("qemu-io", &["-f", "qcow2", "-c", "read -P 0 0 5M", s(&out)]);
    // Data that reads as zero is not written as data either.
    let z = layer(d, "Z.qcow2", Some("F.qcow2"), "64k", &["write -P 0 1M 1M"]);
    let out2 = d.join("out2.qcow2");
    let rep = merge(&z, &f, &out2, &opts(d)).await.unwrap();
    assert_eq!(
        (rep.bytes_copied, rep.bytes_zeroed),
        (15 * MIB, 0),
        "{rep:?}"
    );
    assert_same_guest_view(&z, &out2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_with_other_cluster_sizes_merge_exactly() {
    // Kept layers with smaller clusters than the top: one cluster of the
    // new image mixes zeroes or data from a kept layer with data from below.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    layer(d, "F.qcow2", None, "64k", &["write -P 0x11 0 9M"]);
    let i1 = layer(
        d,
        "I1.qcow2",
        Some("F.qcow2"),
        "4k",
        &["write -z 4k 8k", "write -P 0x22 200k 4k", "write -z 4M 4k"],
    );
    let i2 = layer(
        d,
        "I2.qcow2",
        Some("I1.qcow2"),
        "128k",
        &["write -P 0x33 1M 4k", "write -z 5M 128k"],
    );
    let i3 = layer(
        d,
        "I3.qcow2",
        Some("I2.qcow2"),
        "512",
        &["write -P 0x44 3M 512"],
    );
    for (top, x, name) in [
        (&i2, &i1, "a.qcow2"),
        (&i2, &d.join("F.qcow2"), "b.qcow2"),
        (&i3, &i1, "c.qcow2"),
    ] {
        let out = d.join(name);
        merge(top, x, &out, &opts(d)).await.unwrap();
        assert_same_guest_view(top, &out);
        assert_clean(&out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_everything_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = chain(d);
    let o = opts(d);
    // Output exists: refused, its content kept.
    let taken = d.join("taken");
    std::fs::write(&taken, b"mine").unwrap();
    let e = merge(&files[2], &files[1], &taken, &o).await.unwrap_err();
    assert_eq!(e.kind(), ImageErrorKind::Exists, "{e}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
    // Not in the chain (above the top), and the top itself.
    let out = d.join("out.qcow2");
    for x in [&files[3], &files[2]] {
        let e = merge(&files[2], x, &out, &o).await.unwrap_err();
        assert_eq!(e.kind(), ImageErrorKind::InvalidParameters, "{e}");
        assert!(!out.exists());
    }
    // A layer of another size.
    let big = d.join("big.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "F.qcow2",
            "-F",
            "qcow2",
            s(&big),
            "32M",
        ],
    );
    let e = merge(&big, &files[0], &out, &o).await.unwrap_err();
    assert_eq!(e.kind(), ImageErrorKind::BadImage, "{e}");
    assert!(!out.exists());
    // A chain reaching outside the allowed directories.
    let other = tempfile::tempdir().unwrap();
    let e = merge(&files[2], &files[1], &out, &opts(other.path()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ImageErrorKind::BadImage, "{e}");
    assert!(!out.exists());
    // A top being written (exclusively locked) cannot be merged.
    let w = QcowBackend::open(&files[3], &OpenOptions::new())
        .await
        .unwrap();
    let e = merge(&files[3], &files[1], &out, &o).await.unwrap_err();
    assert_eq!(e.kind(), ImageErrorKind::Locked, "{e}");
    assert!(!out.exists());
    w.close().await.unwrap();
}
