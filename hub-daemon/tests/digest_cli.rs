//! `hub-daemon digest` as a process: the same disk as a raw file, as qcow2,
//! served by qemu-nbd and by `hub-daemon export` gives one digest, the
//! reference one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::Exporter;
use integration_tests::support::{self, require, run_ok, write_file};

/// Not a multiple of the block size, and more than one 64 MiB segment.
const SIZE: usize = (65 << 20) + 512;

fn digest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hub-daemon"))
        .arg("digest")
        .args(args)
        .output()
        .unwrap()
}

/// `hub-daemon digest TARGET...` that must succeed: (digest, target) per line.
fn digest_ok(args: &[&str]) -> Vec<(String, String)> {
    let out = digest(args);
    assert!(
        out.status.success(),
        "digest {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (d, t) = l.split_once("  ").unwrap();
            assert_eq!(d.len(), 64, "{l}");
            assert!(d
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            (d.to_owned(), t.to_owned())
        })
        .collect()
}

async fn to_qcow2(raw: &Path, q: &Path) {
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
}

/// qemu-nbd in its daemon mode (the parent exits once it listens), killed
/// through its pid file on drop.
struct QemuNbd {
    port: u16,
    pidfile: PathBuf,
}

impl QemuNbd {
    fn start(image: &Path, dir: &Path) -> QemuNbd {
        let port = common::hub::free_port();
        let pidfile = dir.join("qemu-nbd.pid");
        let st = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-x", "disk", "-p", &port.to_string()])
            .args(["-b", "127.0.0.1", "-t", "-r", "--fork", "--pid-file"])
            .arg(&pidfile)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        QemuNbd { port, pidfile }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_qcow2_qemu_nbd_and_our_export_agree_with_the_reference() {
    if !require("qemu-img") || !require("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = support::disk_like(11, SIZE);
    let want = disk_digest::algo::digest_of_bytes(&data).to_hex();
    let raw = write_file(dir.path(), "disk.raw", &data);
    let q = dir.path().join("disk.qcow2");
    to_qcow2(&raw, &q).await;

    let files = digest_ok(&[raw.to_str().unwrap(), q.to_str().unwrap()]);
    assert_eq!(files.len(), 2);
    assert_eq!(files[0], (want.clone(), raw.display().to_string()));
    assert_eq!(files[1].0, want, "qcow2 differs from raw");

    let qn = QemuNbd::start(&q, dir.path());
    let uri = format!("nbd://127.0.0.1:{}/disk", qn.port);
    assert_eq!(digest_ok(&[&uri]), vec![(want.clone(), uri.clone())]);
    drop(qn);

    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--readonly",
        &format!("d0={}", q.display()),
    ]);
    let uri = ex.exports[0].2.clone();
    assert_eq!(digest_ok(&[&uri])[0].0, want, "our export");
    // JSON lines.
    let out = digest(&["--json", &uri, raw.to_str().unwrap()]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (l, t) in lines.iter().zip([uri.as_str(), raw.to_str().unwrap()]) {
        assert_eq!(l["target"], t);
        assert_eq!(l["size"], SIZE as u64);
        assert_eq!(l["algorithm"], "blake3-tree-v1");
        assert_eq!(l["digest"], want.as_str());
    }
    assert_eq!(ex.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_changes_the_digest() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut data = support::disk_like(12, 3 << 20);
    let a = write_file(dir.path(), "a.raw", &data);
    data[(2 << 20) + 77] ^= 0x40;
    let b = write_file(dir.path(), "b.raw", &data);
    let bq = dir.path().join("b.qcow2");
    to_qcow2(&b, &bq).await;
    let d = digest_ok(&[
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        bq.to_str().unwrap(),
    ]);
    assert_ne!(d[0].0, d[1].0);
    assert_eq!(d[1].0, d[2].0);
    assert_eq!(d[1].0, disk_digest::algo::digest_of_bytes(&data).to_hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_a_message_and_other_targets_still_print() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ok = write_file(dir.path(), "ok.raw", &[1u8; 4096]);
    let missing = dir.path().join("missing.raw");
    let port = common::hub::free_port();
    let dead = format!("nbd://127.0.0.1:{port}/x");
    let out = digest(&[
        missing.to_str().unwrap(),
        ok.to_str().unwrap(),
        &dead,
        "nbds://127.0.0.1/x",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.raw"), "{stderr}");
    assert!(stderr.contains(&dead), "{stderr}");
    assert!(stderr.contains("3 of 4 targets failed"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.ends_with(&format!("  {}\n", ok.display())));

    // A backing file outside the image's own directory is refused.
    let other = tempfile::tempdir().unwrap();
    let base = write_file(other.path(), "base.raw", &[2u8; 65536]);
    let top = dir.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ],
    )
    .await;
    let out = digest(&[top.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top.qcow2"));
}
