//! Synthetic fulls (`max_chain_length`), the prune schedule and "what
//! deleting would free", through the HTTP API with real images written by
//! nbdcopy / qemu-io and checked by qemu-img. Every expected content is
//! built independently of the hub (the same writes applied to a raw
//! copy), so a merge that changed a restore point's contents fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::call_ok;
use common::hub::{eventually, parse_targets, Hub};
use integration_tests::support::{
    self, assert_check_clean, assert_identical, require, run_ok, write_file,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn tools() -> bool {
    require("nbdcopy") && require("qemu-io") && require("qemu-img")
}

fn id_of(v: &Value) -> String {
    v["backup_id"].as_str().unwrap().to_owned()
}

/// Apply qemu-io commands to a target (`fmt`: its format).
async fn qemu_io(fmt: &str, target: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = run_ok("qemu-io", &args).await;
    assert!(!out.contains("failed"), "{out}");
}

fn has_merging(dir: &Path) -> bool {
    common::files_under(dir)
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".merging"))
}

/// Layers `qemu-img info --backing-chain` reports for `img`.
async fn chain_len(img: &Path) -> usize {
    let info = run_ok(
        "qemu-img",
        &["info", "--backing-chain", img.to_str().unwrap()],
    )
    .await;
    info.lines().filter(|l| l.starts_with("image:")).count()
}

/// A VM's backups, built and mirrored: each restore point's expected
/// contents as a raw file, made by applying the same writes to a copy.
struct Mirror {
    dir: PathBuf,
    size: u64,
    expected: Vec<PathBuf>,
}

impl Mirror {
    fn new(dir: &Path, size: u64, seed: u64) -> Mirror {
        let src = write_file(dir, "src.raw", &support::disk_like(seed, size as usize));
        Mirror {
            dir: dir.to_path_buf(),
            size,
            expected: vec![src],
        }
    }

    /// Write the first restore point's contents to `uri`.
    async fn full(&self, uri: &str) {
        run_ok(
            "nbdcopy",
            &["--flush", self.expected[0].to_str().unwrap(), uri],
        )
        .await;
    }

    /// Apply `cmds` to `uri` and to a copy of the newest expected contents.
    async fn incremental(&mut self, uri: &str, cmds: &[&str]) {
        let mut with_flush = cmds.to_vec();
        with_flush.push("flush");
        qemu_io("raw", uri, &with_flush).await;
        let next = self
            .dir
            .join(format!("expected-{}.raw", self.expected.len()));
        std::fs::copy(self.expected.last().unwrap(), &next).unwrap();
        qemu_io("raw", next.to_str().unwrap(), cmds).await;
        assert_eq!(std::fs::metadata(&next).unwrap().len(), self.size);
        self.expected.push(next);
    }
}

async fn start_backup(hub: &Hub, vm: &str, kind: &str, policy: &str) -> (String, String) {
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": vm, "backup_type": kind, "repository_id": "default", "policy_id": policy}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    let uri = parse_targets(b["nbd_targets_string"].as_str().unwrap())[0]
        .1
        .clone();
    (id_of(&b), uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_chain_length_builds_a_synthetic_full_that_reads_the_same() {
    if !tools() {
        return;
    }
    let mut hub = Hub::start().await;
    hub.register("app", &[8 * MIB]).await;
    let r = hub
        .put(
            "/api/v1/policies/short",
            json!({"keep_last": 10, "max_chain_length": 3}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut m = Mirror::new(hub.dir.path(), 8 * MIB, 11);
    let img = |b: &Value| hub.repo().join(b["disks"][0]["file"].as_str().unwrap());

    let (f, uri) = start_backup(&hub, "app", "full", "short").await;
    m.full(&uri).await;
    hub.complete(&f).await;
    let (i1, uri) = start_backup(&hub, "app", "incremental", "short").await;
    m.incremental(&uri, &["write -P 0xb1 1M 64k", "write -z 4M 1M"])
        .await;
    hub.complete(&i1).await;

    // I2 completes while a restore point of the VM is being restored:
    // its chain (length 3) is due, but must not be rewritten now.
    let r = hub
        .post(&format!("/api/v1/backups/{i1}/restore"), Value::Null)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (i2, uri) = start_backup(&hub, "app", "incremental", "short").await;
    m.incremental(&uri, &["write -P 0xb2 6M 128k", "discard 2M 1M"])
        .await;
    hub.complete(&i2).await;
    let backups = std::sync::Arc::clone(hub.daemon.as_ref().unwrap().backups());
    assert_eq!(backups.synthetic_pass(None).await.unwrap(), vec![]);
    let b2 = hub.record(&i2).await;
    assert_eq!(b2["disks"][0]["synthetic"], false, "{b2}");
    assert_eq!(b2["disks"][0]["parent_backup_id"], i1.as_str());
    assert_eq!(chain_len(&img(&b2)).await, 3);
    assert_eq!(
        hub.delete(&format!("/api/v1/backups/{i1}/restore"))
            .await
            .status,
        204
    );

    // Nor while a backup of the VM is being written (it may build on I2).
    let (running, _) = start_backup(&hub, "app", "incremental", "short").await;
    assert_eq!(backups.synthetic_pass(None).await.unwrap(), vec![]);
    let pass = hub_daemon::lifecycle::schedule::run_pass(&backups)
        .await
        .unwrap();
    assert!(pass.synthetic.is_empty(), "{pass:?}");
    assert_eq!(hub.record(&i2).await["disks"][0]["synthetic"], false);
    let r = hub
        .post(&format!("/api/v1/backups/{running}/abort"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Now it is built (by the pass a completion triggers, or this one).
    let pass = hub_daemon::lifecycle::schedule::run_pass(&backups)
        .await
        .unwrap();
    assert!(pass.skipped.is_empty(), "{pass:?}");
    let b2 = eventually(60, || async {
        let b = hub.record(&i2).await;
        (b["disks"][0]["synthetic"] == true).then_some(b)
    })
    .await;
    let d2 = &b2["disks"][0];
    assert_eq!(d2["parent_backup_id"], Value::Null, "{b2}");
    assert_eq!(d2["backup_mode"], "incremental", "how it was taken stays");
    let file2 = img(&b2);
    assert_eq!(
        d2["image_bytes"].as_u64().unwrap(),
        std::fs::metadata(&file2).unwrap().len(),
        "image_bytes is the new file's"
    );
    assert_eq!(chain_len(&file2).await, 1, "not standalone");
    assert!(!has_merging(&hub.repo()));
    // Every restore point reads exactly as written; the older ones keep
    // their own chain.
    let ids = [&f, &i1, &i2];
    for (id, exp) in ids.iter().zip(&m.expected) {
        let b = hub.record(id).await;
        let file = img(&b);
        assert_check_clean(&file, false).await;
        assert_identical(
            "qcow2",
            file.to_str().unwrap(),
            "raw",
            exp.to_str().unwrap(),
        )
        .await;
    }
    let b1 = hub.record(&i1).await;
    assert_eq!(b1["disks"][0]["synthetic"], false);
    assert_eq!(b1["disks"][0]["parent_backup_id"], f.as_str());
    assert_eq!(chain_len(&img(&b1)).await, 2);
    // Its recorded digest still holds.
    hub.verify_ok(&i2).await;

    // The next incremental builds on the synthetic full: a short chain.
    let (i3, uri) = start_backup(&hub, "app", "incremental", "short").await;
    let r = hub.record(&i3).await;
    assert_eq!(r["disks"][0]["parent_backup_id"], i2.as_str(), "{r}");
    assert_eq!(r["disks"][0]["backup_mode"], "incremental", "{r}");
    m.incremental(&uri, &["write -P 0xb3 0 4k"]).await;
    hub.complete(&i3).await;
    let b3 = hub.record(&i3).await;
    let file3 = img(&b3);
    assert_eq!(chain_len(&file3).await, 2);
    assert_check_clean(&file3, false).await;
    assert_identical(
        "qcow2",
        file3.to_str().unwrap(),
        "raw",
        m.expected[3].to_str().unwrap(),
    )
    .await;

    // What deleting would free: the newest and I1 (nothing builds on it
    // any more) free their images; F (I1 builds on it) and I2 (I3 does)
    // are certain to free nothing.
    let mut total = 0;
    for (id, builds_on_it) in [(&f, true), (&i1, false), (&i2, true), (&i3, false)] {
        let b = hub.record(id).await;
        let d = &b["disks"][0];
        let image = d["image_bytes"].as_u64().unwrap();
        assert!(image > 0);
        let want = if builds_on_it { 0 } else { image };
        assert_eq!(d["freed_bytes_if_deleted"], want, "{id}: {b}");
        assert_eq!(b["freed_bytes_if_deleted"], want, "{id}");
        assert_eq!(b["image_bytes"], image, "{id}");
        total += image;
        let metrics = hub.get("/metrics").await.text();
        let label = format!("{{backup_id=\"{id}\",vm=\"app\",repository=\"default\",disk=\"0\"}}");
        assert!(
            metrics.contains(&format!("hub_backup_image_bytes{label} {image}\n")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "hub_backup_freed_if_deleted_bytes{label} {want}\n"
            )),
            "{metrics}"
        );
    }
    assert_eq!(hub.metric("hub_repository_backup_bytes").await, total);
    hub.stop().await;
}

/// The daemon prunes on its own every `prune_interval`: with
/// `keep_last 1`, the full goes once an incremental completes, and the
/// incremental becomes a synthetic full reading as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_prune_runs_without_a_request() {
    if !tools() {
        return;
    }
    let mut hub =
        Hub::start_configured(|c| c.prune_interval = Some(Duration::from_millis(100))).await;
    hub.register("app", &[4 * MIB]).await;
    let r = hub
        .put("/api/v1/policies/one", json!({"keep_last": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut m = Mirror::new(hub.dir.path(), 4 * MIB, 12);
    let (f, uri) = start_backup(&hub, "app", "full", "one").await;
    m.full(&uri).await;
    hub.complete(&f).await;
    let f_file = hub.repo().join(format!("app/disk0/{f}.qcow2"));
    assert!(f_file.exists());
    let (i1, uri) = start_backup(&hub, "app", "incremental", "one").await;
    m.incremental(&uri, &["write -P 0xc1 1M 64k"]).await;
    hub.complete(&i1).await;
    eventually(60, || async {
        (hub.get(&format!("/api/v1/backups/{f}")).await.status == 404).then_some(())
    })
    .await;
    let b = eventually(60, || async {
        let b = hub.record(&i1).await;
        // The file work follows the commit: wait for the old image to go.
        (!f_file.exists() && !has_merging(&hub.repo())).then_some(b)
    })
    .await;
    assert_eq!(b["disks"][0]["parent_backup_id"], Value::Null, "{b}");
    assert_eq!(b["disks"][0]["synthetic"], true, "{b}");
    let file = hub.repo().join(b["disks"][0]["file"].as_str().unwrap());
    assert_check_clean(&file, false).await;
    assert_eq!(chain_len(&file).await, 1);
    assert_identical(
        "qcow2",
        file.to_str().unwrap(),
        "raw",
        m.expected[1].to_str().unwrap(),
    )
    .await;
    hub.stop().await;
}

/// Every restore point of the crash test reads as written and checks
/// clean; with `layers`, its file's chain agrees with the catalog.
async fn check_all(
    api: std::net::SocketAddr,
    ids: &[String],
    expected: &[PathBuf],
    repo: &Path,
    seed: u64,
    layers: bool,
) {
    for (k, (id, exp)) in ids.iter().zip(expected).enumerate() {
        let rec = call_ok(api, "GET", &format!("/api/v1/backups/{id}"), None).await;
        assert_eq!(rec["files_missing"], false, "seed {seed}: {rec}");
        let img = repo.join(format!("vm/disk0/{id}.qcow2"));
        assert_check_clean(&img, false).await;
        assert_identical("qcow2", img.to_str().unwrap(), "raw", exp.to_str().unwrap()).await;
        if !layers {
            continue;
        }
        let n = chain_len(&img).await;
        if rec["disks"][0]["synthetic"] == true {
            assert_eq!(rec["disks"][0]["parent_backup_id"], Value::Null);
            assert_eq!(n, 1, "seed {seed}: {id} marked synthetic");
        } else {
            assert_eq!(n, k + 1, "seed {seed}: {id}");
        }
    }
}

/// kill -9 at states one can observe while a synthetic full is built
/// (right after the completion that triggers it, once its `.merging`
/// file exists, once it is recorded): after a restart every restore
/// point reads exactly as written and checks clean, the flattened one's
/// file agrees with the catalog (standalone iff marked synthetic), the
/// interrupted build is finished, and no `.merging` file is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_synthetic_full_leaves_every_restore_point_readable() {
    if !tools() {
        return;
    }
    for seed in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let d = common::DaemonProcess::start_in(&data);
        let size = 48 * MIB;
        call_ok(
            d.api,
            "PUT",
            "/api/v1/vms/vm",
            Some(json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": size, "unit_number": 0}]})),
        )
        .await;
        call_ok(
            d.api,
            "PUT",
            "/api/v1/policies/p",
            Some(json!({"max_chain_length": 3})),
        )
        .await;
        let mut m = Mirror::new(dir.path(), size, 20 + seed);
        let mut ids = Vec::new();
        for i in 0..3u64 {
            let kind = if i == 0 { "full" } else { "incremental" };
            let b = call_ok(
                d.api,
                "POST",
                "/api/v1/backups",
                Some(json!({"vm_name": "vm", "backup_type": kind, "repository_id": "default", "policy_id": "p"})),
            )
            .await;
            let uri = parse_targets(b["nbd_targets_string"].as_str().unwrap())[0]
                .1
                .clone();
            if i == 0 {
                m.full(&uri).await;
            } else {
                let w = format!("write -P {} {}M 3M", 0x40 + i, 7 * i);
                m.incremental(&uri, &[&w]).await;
            }
            let id = id_of(&b);
            let rec = call_ok(d.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
            call_ok(
                d.api,
                "POST",
                &format!("/api/v1/backups/{id}/complete"),
                Some(common::hub::change_ids(&rec)),
            )
            .await;
            ids.push(id);
        }
        let repo = data.join("repository").canonicalize().unwrap();
        let img_of = |id: &str| repo.join(format!("vm/disk0/{id}.qcow2"));
        let merging = PathBuf::from(format!("{}.merging", img_of(&ids[2]).display()));
        let api = d.api;
        let top = ids[2].clone();
        let synthetic = || async {
            let b = call_ok(api, "GET", &format!("/api/v1/backups/{top}"), None).await;
            b["disks"][0]["synthetic"] == true
        };
        match seed {
            0 => {}
            1 => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while !merging.exists() && !synthetic().await {
                    assert!(tokio::time::Instant::now() < deadline, "never started");
                    tokio::task::yield_now().await;
                }
            }
            _ => eventually(60, || async { synthetic().await.then_some(()) }).await,
        }
        d.kill9();

        let d = common::DaemonProcess::start_in(&data);
        // Readable straight away (a retried build may be under way, so
        // the file may not agree with the catalog's parent yet).
        check_all(d.api, &ids, &m.expected, &repo, seed, false).await;
        let api = d.api;
        eventually(60, || async {
            let b = call_ok(api, "GET", &format!("/api/v1/backups/{top}"), None).await;
            (b["disks"][0]["synthetic"] == true && !merging.exists()).then_some(())
        })
        .await;
        check_all(d.api, &ids, &m.expected, &repo, seed, true).await;
        assert!(!has_merging(&repo), "seed {seed}: merging files left");
        d.terminate();
    }
}
