//! The daemon as a process: kill -9 mid-backup and restart, SIGTERM drain,
//! configuration from file, environment and flags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::hub::parse_targets;
use common::DaemonProcess;
use integration_tests::http::call;
use integration_tests::support::{self, assert_identical, require, run_ok, write_file};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

async fn register(api: std::net::SocketAddr, vm: &str, sizes: &[u64]) {
    let disks: Vec<Value> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"disk_id": i, "size_bytes": s, "unit_number": i}))
        .collect();
    let r = call(
        api,
        "PUT",
        &format!("/api/v1/vms/{vm}"),
        Some(&json!({"vm_context_id": "c", "disks": disks})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

async fn start_backup(api: std::net::SocketAddr, vm: &str, kind: &str) -> Value {
    let r = call(
        api,
        "POST",
        "/api/v1/backups",
        Some(&json!({"vm_name": vm, "backup_type": kind, "repository_id": "default"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backup_then_restart_reconciles() {
    if !require("nbdcopy") || !require("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = DaemonProcess::start_in(&data);
    let sizes = [8 * MIB, 4 * MIB];
    register(d.api, "vm", &sizes).await;
    let src: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            write_file(
                dir.path(),
                &format!("s{i}.raw"),
                &support::disk_like(40 + i as u64, *s as usize),
            )
        })
        .collect();
    let full = start_backup(d.api, "vm", "full").await;
    let full_id = full["backup_id"].as_str().unwrap().to_owned();
    for ((_, uri), s) in parse_targets(full["nbd_targets_string"].as_str().unwrap())
        .iter()
        .zip(&src)
    {
        run_ok("nbdcopy", &["--flush", s.to_str().unwrap(), uri]).await;
    }
    let r = call(
        d.api,
        "POST",
        &format!("/api/v1/backups/{full_id}/complete"),
        Some(&json!({"disks": [{"disk_id": 0, "change_id": "c0"}, {"disk_id": 1, "change_id": "c1"}]})),
    )
    .await;
    assert_eq!(r.status, 200);

    // An incremental in flight when the daemon is killed.
    let inc = start_backup(d.api, "vm", "incremental").await;
    let inc_id = inc["backup_id"].as_str().unwrap().to_owned();
    let targets = parse_targets(inc["nbd_targets_string"].as_str().unwrap());
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 1M", &targets[0].1],
    )
    .await;
    let partial = format!(
        "{}.partial",
        inc["disk_results"][0]["qcow2_path"].as_str().unwrap()
    );
    assert!(std::path::Path::new(&partial).exists());
    d.kill9();

    // Restart on the same data: the killed backup is failed, its files are
    // gone, nothing is reserved, and the completed backup is intact.
    let d = DaemonProcess::start_in(&data);
    let rec = call(d.api, "GET", &format!("/api/v1/backups/{inc_id}"), None)
        .await
        .json();
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("daemon stopped"),
        "{rec}"
    );
    assert!(
        !std::path::Path::new(&partial).exists(),
        "partial image removed"
    );
    let m = call(d.api, "GET", "/metrics", None).await.text();
    assert!(m.contains("hub_nbd_ports_in_use 0"), "{m}");
    let rec = call(d.api, "GET", &format!("/api/v1/backups/{full_id}"), None)
        .await
        .json();
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["files_missing"], false);
    for (i, disk) in rec["disks"].as_array().unwrap().iter().enumerate() {
        let img = data.join("repository").join(disk["file"].as_str().unwrap());
        assert_identical(
            "qcow2",
            img.to_str().unwrap(),
            "raw",
            src[i].to_str().unwrap(),
        )
        .await;
    }
    // And the VM can be backed up again (incremental on the intact full).
    let again = start_backup(d.api, "vm", "incremental").await;
    assert_eq!(
        again["disk_results"][0]["parent_backup_id"],
        full_id.as_str()
    );
    assert_eq!(d.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = DaemonProcess::start_in(&data);
    register(d.api, "vm", &[MIB]).await;
    let b = start_backup(d.api, "vm", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let partial = format!(
        "{}.partial",
        b["disk_results"][0]["qcow2_path"].as_str().unwrap()
    );
    assert_eq!(d.terminate(), 0);
    assert!(
        !std::path::Path::new(&partial).exists(),
        "running backup cleaned on shutdown"
    );
    let d = DaemonProcess::start_in(&data);
    let rec = call(d.api, "GET", &format!("/api/v1/backups/{id}"), None)
        .await
        .json();
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error"], "daemon shutting down");
    assert_eq!(d.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_from_file_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    let file_data = dir.path().join("from-file");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nnbd_ports = \"0:2\"\nnbd_shared_port = 0\nadvertise_host = \"backup-hub.example\"\n",
            file_data.display()
        ),
    )
    .unwrap();
    // File alone.
    let d = DaemonProcess::start(&["--config", cfg.to_str().unwrap()], &[]);
    register(d.api, "vm", &[MIB, MIB, MIB]).await;
    let r = call(
        d.api,
        "POST",
        "/api/v1/backups",
        Some(&json!({"vm_name": "vm", "backup_type": "full", "repository_id": "default"})),
    )
    .await;
    assert_eq!(r.status, 503, "capacity 2 from the file: {}", r.text());
    assert!(file_data.join("catalog.sqlite").exists());
    assert_eq!(d.terminate(), 0);
    // Environment overrides the file, flags override the environment.
    let env_data = dir.path().join("from-env");
    let flag_data = dir.path().join("from-flag");
    let d = DaemonProcess::start(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            flag_data.to_str().unwrap(),
        ],
        &[
            ("HUB_DATA_DIR", env_data.to_str().unwrap()),
            ("HUB_ADVERTISE_HOST", "10.0.0.5"),
        ],
    );
    register(d.api, "vm", &[MIB]).await;
    let b = start_backup(d.api, "vm", "full").await;
    assert!(
        b["nbd_targets_string"]
            .as_str()
            .unwrap()
            .starts_with("2000:nbd://10.0.0.5:"),
        "{b}"
    );
    assert!(flag_data.join("catalog.sqlite").exists());
    assert!(!env_data.exists());
    assert_eq!(d.terminate(), 0);
}

/// kill -9 while `complete` digests, renames and commits, at a point
/// chosen by a seed among the states one can observe (request sent, image
/// renamed, sidecar renamed): after a restart the backup is either
/// completed with every file present and verifying, or failed with
/// nothing left; never completed with missing files, never running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_complete_leaves_all_or_nothing() {
    if !require("nbdcopy") {
        return;
    }
    for seed in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let d = DaemonProcess::start_in(&data);
        let size = 48 * MIB;
        register(d.api, "vm", &[size]).await;
        let src = write_file(
            dir.path(),
            "s.raw",
            &support::disk_like(seed, size as usize),
        );
        let b = start_backup(d.api, "vm", "full").await;
        let id = b["backup_id"].as_str().unwrap().to_owned();
        let uri = &parse_targets(b["nbd_targets_string"].as_str().unwrap())[0].1;
        // A partly written block makes complete read back before renaming.
        run_ok("nbdcopy", &[src.to_str().unwrap(), uri]).await;
        run_ok("qemu-io", &["-f", "raw", uri, "-c", "write -P 7 12345 100"]).await;
        let image = std::path::PathBuf::from(b["disk_results"][0]["qcow2_path"].as_str().unwrap());
        let mut partial = image.clone().into_os_string();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        let api = d.api;
        let path = format!("/api/v1/backups/{id}/complete");
        let req = tokio::spawn(async move { call(api, "POST", &path, Some(&json!({}))).await });
        match seed {
            0 => {}
            1 => {
                while partial.exists() && !req.is_finished() {
                    tokio::task::yield_now().await;
                }
            }
            _ => {
                let _ = req.await;
            }
        }
        d.kill9();
        let d = DaemonProcess::start_in(&data);
        let rec = call(d.api, "GET", &format!("/api/v1/backups/{id}"), None)
            .await
            .json();
        let mut sidecar = image.clone().into_os_string();
        sidecar.push(".digest");
        let sidecar = std::path::PathBuf::from(sidecar);
        if seed >= 2 {
            assert_eq!(
                rec["status"], "completed",
                "answered before the kill: {rec}"
            );
        }
        match rec["status"].as_str().unwrap() {
            "completed" => {
                assert_eq!(rec["files_missing"], false, "{rec}");
                assert!(image.is_file() && sidecar.is_file());
                let r = call(
                    d.api,
                    "POST",
                    &format!("/api/v1/backups/{id}/verify"),
                    Some(&json!({})),
                )
                .await;
                assert_eq!(r.status, 202, "{}", r.text());
                let v = common::hub::eventually(60, || async {
                    let b = call(d.api, "GET", &format!("/api/v1/backups/{id}"), None)
                        .await
                        .json();
                    (b["verify_status"] != "verifying").then_some(b)
                })
                .await;
                assert_eq!(v["verify_status"], "ok", "seed {seed}: {v}");
            }
            "failed" => {
                let left: Vec<_> = std::fs::read_dir(image.parent().unwrap())
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                assert!(left.is_empty(), "seed {seed}: files left {left:?}");
            }
            other => panic!("seed {seed}: status {other} after restart: {rec}"),
        }
        assert_eq!(d.terminate(), 0);
    }
}
