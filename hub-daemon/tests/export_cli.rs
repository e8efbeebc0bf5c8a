//! `hub-daemon export` as a process, driven by real clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Exporter;
use integration_tests::support::{
    self, assert_check_clean, assert_identical, qemu_img_create, require, run_ok, write_file,
};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_qcow2_and_raw_on_one_port_and_flushes_on_sigterm() {
    if !require("qemu-img") || !require("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = support::disk_like(1, 32 * MIB);
    let src_path = write_file(dir.path(), "src.raw", &src);
    let q = dir.path().join("d0.qcow2");
    qemu_img_create(&q, Some("32M"), None, &[]).await;
    let r = dir.path().join("d1.raw");
    std::fs::File::create(&r)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        &format!("d0={}", q.display()),
        &format!("d1={}", r.display()),
    ]);
    assert_eq!(ex.exports.len(), 2);
    assert_eq!(ex.exports[0].1, ex.exports[1].1, "one shared port");
    for (_, _, uri) in &ex.exports {
        run_ok(
            "nbdcopy",
            &["--flush", "-C", "4", src_path.to_str().unwrap(), uri],
        )
        .await;
    }
    assert_eq!(ex.terminate(), 0);
    assert_check_clean(&q, false).await;
    assert_identical(
        "qcow2",
        q.to_str().unwrap(),
        "raw",
        src_path.to_str().unwrap(),
    )
    .await;
    assert_identical(
        "raw",
        r.to_str().unwrap(),
        "raw",
        src_path.to_str().unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_then_backing_makes_a_relative_chain() {
    if !require("qemu-img") || !require("qemu-io") || !require("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = support::disk_like(2, 16 * MIB);
    let src_path = write_file(dir.path(), "src.raw", &src);
    let full = dir.path().join("full.qcow2");
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--create",
        "16M",
        &format!("disk0={}", full.display()),
    ]);
    run_ok(
        "nbdcopy",
        &["--flush", src_path.to_str().unwrap(), &ex.exports[0].2],
    )
    .await;
    assert_eq!(ex.terminate(), 0);

    // The incremental: change some blocks and zero a region, through qemu-io.
    let inc = dir.path().join("inc.qcow2");
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backing",
        full.to_str().unwrap(),
        &format!("disk0={}", inc.display()),
    ]);
    let cmds = [
        "write -P 0x5c 1M 64k",
        "write -z 4M 2M",
        "write -P 0x7e 15M 4k",
        "discard 8M 64k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let uri = ex.exports[0].2.clone();
    args.push(&uri);
    run_ok("qemu-io", &args).await;
    assert_eq!(ex.terminate(), 0);
    // Apply the same commands to a raw copy of the source: the expected state.
    let expect = write_file(dir.path(), "expect.raw", &src);
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        // Our TRIM reads back as zeroes; model it as a zero write.
        let c = if c.starts_with("discard") {
            "write -z 8M 64k"
        } else {
            c
        };
        args.extend(["-c", c]);
    }
    let e = expect.to_str().unwrap().to_owned();
    args.push(&e);
    run_ok("qemu-io", &args).await;

    assert_check_clean(&inc, false).await;
    assert_identical("qcow2", inc.to_str().unwrap(), "raw", &e).await;
    assert_identical(
        "qcow2",
        full.to_str().unwrap(),
        "raw",
        src_path.to_str().unwrap(),
    )
    .await;
    let out = run_ok(
        "qemu-img",
        &["info", "--backing-chain", inc.to_str().unwrap()],
    )
    .await;
    assert!(
        out.contains("backing file: full.qcow2 (actual path:"),
        "relative backing name:\n{out}"
    );
    assert!(out.contains("backing file format: qcow2"), "{out}");
    // Only the changes live in the overlay.
    let inc_size = std::fs::metadata(&inc).unwrap().len();
    assert!(
        inc_size < 2 * MIB as u64,
        "overlay holds only changes: {inc_size} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_style_flags_and_port_per_export() {
    if !require("nbdinfo") || !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    qemu_img_create(&q, Some("8M"), None, &[]).await;
    // Exactly the qemu-nbd command line the backup scripts use (port 0 here).
    let ex = Exporter::start(&[
        "-f",
        "qcow2",
        "-x",
        "vm-disk0",
        "-p",
        "0",
        "-b",
        "127.0.0.1",
        "-t",
        q.to_str().unwrap(),
    ]);
    assert_eq!(ex.exports[0].0, "vm-disk0");
    let out = run_ok("nbdinfo", &["--size", &ex.exports[0].2]).await;
    assert_eq!(out.trim(), (8 * MIB).to_string());
    assert_eq!(ex.terminate(), 0);
    // Wrong declared format is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hub-daemon"))
        .args(["export", "-f", "raw", "-p", "0", q.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    for p in [&a, &b] {
        std::fs::File::create(p)
            .unwrap()
            .set_len(MIB as u64)
            .unwrap();
    }
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--port-per-export",
        &format!("a={}", a.display()),
        &format!("b={}", b.display()),
    ]);
    assert_ne!(
        ex.exports[0].1, ex.exports[1].1,
        "each export on its own port"
    );
    for (_, _, uri) in &ex.exports {
        run_ok("nbdinfo", &["--size", uri]).await;
    }
    assert_eq!(ex.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_export_refuses_writes_and_locks_share_with_qemu_readers() {
    if !require("nbdsh") || !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("ro.qcow2");
    qemu_img_create(&q, Some("8M"), None, &[]).await;
    let ex = Exporter::start(&[
        "-r",
        "--listen",
        "127.0.0.1:0",
        &format!("ro={}", q.display()),
    ]);
    let script = "h.set_strict_mode(0)\ntry:\n    h.pwrite(b'x'*512, 0)\n    raise SystemExit('write succeeded')\nexcept nbd.Error as e:\n    assert e.errno == 'EPERM', e.errno\nprint('OK')";
    let out = run_ok("nbdsh", &["-u", &ex.exports[0].2, "-c", script]).await;
    assert!(out.contains("OK"));
    // qemu may read an image we only read.
    run_ok("qemu-img", &["info", q.to_str().unwrap()]).await;
    assert_eq!(ex.terminate(), 0);
}
