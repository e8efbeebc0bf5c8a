//! Retention policies and chain-aware prune through the HTTP API, with
//! real images written by nbdcopy / qemu-io and checked by qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::call_ok;
use common::hub::{eventually, parse_targets, Hub};
use integration_tests::support::{
    self, assert_check_clean, assert_identical, require, run_ok, write_file,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

async fn start_backup(hub: &Hub, vm: &str, kind: &str, policy: &str) -> Value {
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": vm, "backup_type": kind, "repository_id": "default", "policy_id": policy}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

/// Apply qemu-io commands to an NBD target.
async fn change(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run_ok("qemu-io", &args).await;
    assert!(!out.contains("failed"), "{out}");
}

fn id_of(v: &Value) -> String {
    v["backup_id"].as_str().unwrap().to_owned()
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = common::files_under(dir);
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_crud_validation_and_unknown_policy_at_start() {
    let mut hub = Hub::start().await;
    let r = hub.get("/api/v1/policies").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!([]));

    let r = hub
        .put("/api/v1/policies/p1", json!({"keep_last": 2}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["keep_last"], 2);
    assert_eq!(r.json()["keep_daily"], 0);
    let r = hub
        .put(
            "/api/v1/policies/p1",
            json!({"keep_last": 3, "keep_daily": 7, "min_retention_days": 1, "max_chain_length": 10, "verify_every_days": 30}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = hub.get("/api/v1/policies/p1").await;
    assert_eq!(got.status, 200);
    let got = got.json();
    assert_eq!(got["keep_last"], 3);
    assert_eq!(got["keep_daily"], 7);
    assert_eq!(got["verify_every_days"], 30);
    assert_eq!(
        hub.get("/api/v1/policies")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    for bad in [
        json!({"keep_last": -1}),
        json!({"keep_daily": "7"}),
        json!({"keep_weekly": 1.5}),
        json!({"keep_monthly": 100_000_000}),
        json!({"keep_forever": 1}),
    ] {
        let r = hub.put("/api/v1/policies/p2", bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(hub.get("/api/v1/policies/p2").await.status, 404);
    assert_eq!(hub.delete("/api/v1/policies/p2").await.status, 404);
    assert_eq!(hub.get("/api/v1/policies/bad%20id").await.status, 400);

    // A backup naming an unknown policy is refused; a known one is kept.
    hub.register("vm1", &[MIB]).await;
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm1", "backup_type": "full", "repository_id": "default", "policy_id": "nope"}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        hub.get("/api/v1/backups")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let b = start_backup(&hub, "vm1", "full", "p1").await;
    let id = id_of(&b);
    hub.complete(&id).await;
    assert_eq!(
        hub.get(&format!("/api/v1/backups/{id}")).await.json()["policy_id"],
        "p1"
    );
    // Still used: 409; once the backup is gone it can go.
    assert_eq!(hub.delete("/api/v1/policies/p1").await.status, 409);
    assert_eq!(
        hub.delete(&format!("/api/v1/backups/{id}")).await.status,
        204
    );
    assert_eq!(hub.delete("/api/v1/policies/p1").await.status, 204);
    assert_eq!(hub.get("/api/v1/policies/p1").await.status, 404);

    // Prune validates its body.
    assert_eq!(hub.post("/api/v1/prune", json!({})).await.status, 400);
    assert_eq!(
        hub.post("/api/v1/prune", json!({"dry_run": true, "x": 1}))
            .await
            .status,
        400
    );
    let r = hub.post("/api/v1/prune", json!({"dry_run": true})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!([]));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_merges_a_chain_into_a_synthetic_full() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start().await;
    let size = 8 * MIB;
    hub.register("app", &[size]).await;
    let r = hub
        .put("/api/v1/policies/two", json!({"keep_last": 2}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());

    // F ← I1 ← I2 ← I3, each changing different blocks.
    let src = write_file(
        hub.dir.path(),
        "src.raw",
        &support::disk_like(7, size as usize),
    );
    let f = start_backup(&hub, "app", "full", "two").await;
    let targets = parse_targets(f["nbd_targets_string"].as_str().unwrap());
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &targets[0].1],
    )
    .await;
    hub.complete(&id_of(&f)).await;
    let mut ids = vec![id_of(&f)];
    for (i, cmds) in [
        &["write -P 0xa1 1M 64k", "write -z 4M 1M"][..],
        &["write -P 0xa2 1M 4k", "write -P 0xa3 6M 128k"][..],
        &["write -P 0xa4 0 4k", "discard 2M 1M"][..],
    ]
    .iter()
    .enumerate()
    {
        let b = start_backup(&hub, "app", "incremental", "two").await;
        assert_eq!(b["disk_results"][0]["backup_mode"], "incremental", "{i}");
        let t = parse_targets(b["nbd_targets_string"].as_str().unwrap());
        change(&t[0].1, cmds).await;
        hub.complete(&id_of(&b)).await;
        ids.push(id_of(&b));
    }
    let (f_id, i1, i2, i3) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let file_of = |v: &Value| hub.repo().join(v["disks"][0]["file"].as_str().unwrap());
    let mut saved = Vec::new();
    for id in &ids {
        let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
        let img = file_of(&b);
        let out = hub.dir.path().join(format!("saved-{id}.raw"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        )
        .await;
        saved.push((img, out));
    }

    // Dry run: lists the plan, changes nothing.
    let before = all_files(&hub.repo());
    let r = hub.post("/api/v1/prune", json!({"dry_run": true})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let plan = r.json();
    let expect_merges = json!([{"disk_id": 0, "into": i2, "drop": [i1, f_id], "new_parent": null}]);
    assert_eq!(plan.as_array().unwrap().len(), 1, "{plan}");
    let g = &plan[0];
    assert_eq!(g["vm_name"], "app");
    assert_eq!(g["repository_id"], "default");
    let mut kept: Vec<(String, String)> = g["keep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["backup_id"].as_str().unwrap().to_owned(),
                k["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    kept.sort();
    let mut want = vec![
        (i2.clone(), "last".to_owned()),
        (i3.clone(), "last".to_owned()),
    ];
    want.sort();
    assert_eq!(kept, want);
    let mut removed: Vec<&str> = g["remove"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    removed.sort();
    let mut want_removed = vec![f_id.as_str(), i1.as_str()];
    want_removed.sort();
    assert_eq!(removed, want_removed);
    assert_eq!(g["merges"], expect_merges);
    assert_eq!(all_files(&hub.repo()), before, "dry run changed files");
    for id in &ids {
        assert_eq!(hub.get(&format!("/api/v1/backups/{id}")).await.status, 200);
    }

    // Not while a backup of the VM runs.
    let running = start_backup(&hub, "app", "incremental", "two").await;
    let r = hub.post("/api/v1/prune", json!({"dry_run": false})).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let r = hub
        .post(
            &format!("/api/v1/backups/{}/abort", id_of(&running)),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(all_files(&hub.repo()), before);

    // Not while one of its restore points is restored.
    let r = hub
        .post(&format!("/api/v1/backups/{i3}/restore"), Value::Null)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = hub.post("/api/v1/prune", json!({"dry_run": false})).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        hub.delete(&format!("/api/v1/backups/{i3}/restore"))
            .await
            .status,
        204
    );

    // The real run.
    let r = hub.post("/api/v1/prune", json!({"dry_run": false})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["merges"], expect_merges);
    for id in [f_id, i1] {
        assert_eq!(hub.get(&format!("/api/v1/backups/{id}")).await.status, 404);
    }
    for (k, (img, _)) in saved.iter().enumerate().take(2) {
        assert!(!img.exists(), "image {k} left behind");
        let mut side = img.as_os_str().to_owned();
        side.push(".digest");
        assert!(!PathBuf::from(side).exists(), "sidecar {k} left behind");
    }
    let b2 = hub.get(&format!("/api/v1/backups/{i2}")).await.json();
    assert_eq!(b2["disks"][0]["parent_backup_id"], Value::Null, "{b2}");
    // Merged down to no parent: a synthetic full, whose recorded size is
    // the merged file's.
    assert_eq!(b2["disks"][0]["synthetic"], true, "{b2}");
    assert_eq!(
        b2["disks"][0]["image_bytes"].as_u64().unwrap(),
        std::fs::metadata(&saved[2].0).unwrap().len()
    );
    let b3 = hub.get(&format!("/api/v1/backups/{i3}")).await.json();
    assert_eq!(b3["disks"][0]["parent_backup_id"], i2.as_str());
    assert_eq!(b3["disks"][0]["synthetic"], false, "{b3}");
    for (img, raw) in &saved[2..] {
        assert_check_clean(img, false).await;
        assert_identical("qcow2", img.to_str().unwrap(), "raw", raw.to_str().unwrap()).await;
    }
    let info = run_ok("qemu-img", &["info", saved[2].0.to_str().unwrap()]).await;
    assert!(
        !info.contains("backing file"),
        "not a synthetic full:\n{info}"
    );
    assert!(
        !all_files(&hub.repo())
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".merging")),
        "merging files left"
    );

    // The rewritten digests hold: both survivors verify, and the next
    // incremental builds on I3.
    for id in [i2, i3] {
        let r = hub
            .post(&format!("/api/v1/backups/{id}/verify"), Value::Null)
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        let v = eventually(60, || async {
            let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
            let s = b["verify_status"].as_str().unwrap_or("").to_owned();
            (s != "verifying" && !s.is_empty()).then_some(b)
        })
        .await;
        assert_eq!(v["verify_status"], "ok", "{v}");
    }
    let next = start_backup(&hub, "app", "incremental", "two").await;
    assert_eq!(
        next["disk_results"][0]["backup_mode"], "incremental",
        "{next}"
    );
    assert_eq!(next["disk_results"][0]["parent_backup_id"], i3.as_str());
    hub.complete(&id_of(&next)).await;

    // Prune again: nothing more to merge for I3 ← next; I2 goes, I3 is
    // merged over it.
    let r = hub.post("/api/v1/prune", json!({"dry_run": false})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["remove"], json!([i2]));
    assert_check_clean(&saved[3].0, false).await;
    assert_identical(
        "qcow2",
        saved[3].0.to_str().unwrap(),
        "raw",
        saved[3].1.to_str().unwrap(),
    )
    .await;
    hub.stop().await;
}

/// kill -9 at states one can observe during a prune (request sent, a
/// `.merging` file written, the first removed image gone, answered): after
/// a restart every restore point in the catalog reads back exactly as
/// before, its files are all there and check clean, the removed ones are
/// either all still listed or all gone with their files, and nothing
/// `.merging` is left. A second prune then finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_prune_leaves_catalog_and_files_consistent() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    for seed in 0..4u64 {
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
            Some(json!({"keep_last": 2})),
        )
        .await;
        let src = write_file(
            dir.path(),
            "s.raw",
            &support::disk_like(seed, size as usize),
        );
        let mut ids = Vec::new();
        for i in 0..4u64 {
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
                run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
            } else {
                let w = format!("write -P {} {}M 1M", 0x10 + i, 5 * i);
                change(&uri, &[&w, "flush"]).await;
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
        let mut saved = Vec::new();
        for id in &ids {
            let out = dir.path().join(format!("saved-{id}.raw"));
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-O",
                    "raw",
                    img_of(id).to_str().unwrap(),
                    out.to_str().unwrap(),
                ],
            )
            .await;
            saved.push(out);
        }

        let api = d.api;
        let req = tokio::spawn(async move {
            integration_tests::http::call(
                api,
                "POST",
                "/api/v1/prune",
                Some(&json!({"dry_run": false})),
            )
            .await
        });
        let merging = {
            let mut s = img_of(&ids[2]).into_os_string();
            s.push(".merging");
            PathBuf::from(s)
        };
        match seed {
            0 => {}
            1 => {
                while !merging.exists() && !req.is_finished() {
                    tokio::task::yield_now().await;
                }
            }
            2 => {
                while img_of(&ids[0]).exists() && !req.is_finished() {
                    tokio::task::yield_now().await;
                }
            }
            _ => {
                let r = req.await.unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }
        d.kill9();
        let d = common::DaemonProcess::start_in(&data);
        let listed = call_ok(d.api, "GET", "/api/v1/backups", None).await;
        let listed: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["backup_id"].as_str().unwrap().to_owned())
            .collect();
        let removed_listed = [&ids[0], &ids[1]]
            .iter()
            .filter(|i| listed.contains(i))
            .count();
        assert!(
            removed_listed == 0 || removed_listed == 2,
            "seed {seed}: half a prune: {listed:?}"
        );
        if seed >= 3 {
            assert_eq!(removed_listed, 0, "answered before the kill");
        }
        for (id, raw) in ids.iter().zip(&saved) {
            let img = img_of(id);
            if listed.contains(id) {
                assert_check_clean(&img, false).await;
                assert_identical("qcow2", img.to_str().unwrap(), "raw", raw.to_str().unwrap())
                    .await;
                let rec = call_ok(d.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
                assert_eq!(rec["files_missing"], false, "seed {seed}: {rec}");
            } else {
                assert!(
                    !img.exists(),
                    "seed {seed}: {id} gone from the catalog, not from disk"
                );
            }
        }
        assert!(
            !all_files(&repo)
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".merging")),
            "seed {seed}: merging files left"
        );
        // Whatever state it died in, a new prune completes the job.
        call_ok(
            d.api,
            "POST",
            "/api/v1/prune",
            Some(json!({"dry_run": false})),
        )
        .await;
        for (id, raw) in ids.iter().zip(&saved).skip(2) {
            let img = img_of(id);
            assert_check_clean(&img, false).await;
            assert_identical("qcow2", img.to_str().unwrap(), "raw", raw.to_str().unwrap()).await;
        }
        for id in &ids[..2] {
            assert!(!img_of(id).exists(), "seed {seed}");
        }
        d.terminate();
    }
}

/// F ← I1 ← I2 ← I3 of VM `app` (one 8 MiB disk) under policy `p`.
async fn chain_of_four(hub: &Hub) -> Vec<String> {
    let size = 8 * MIB;
    hub.register("app", &[size]).await;
    let r = hub.put("/api/v1/policies/p", json!({"keep_last": 2})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let src = write_file(
        hub.dir.path(),
        "src.raw",
        &support::disk_like(3, size as usize),
    );
    let mut ids = Vec::new();
    for i in 0..4u64 {
        let kind = if i == 0 { "full" } else { "incremental" };
        let b = start_backup(hub, "app", kind, "p").await;
        let uri = parse_targets(b["nbd_targets_string"].as_str().unwrap())[0]
            .1
            .clone();
        if i == 0 {
            run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
        } else {
            let w = format!("write -P {} {}M 64k", 0x20 + i, 2 * i);
            change(&uri, &[&w, "flush"]).await;
        }
        hub.complete(&id_of(&b)).await;
        ids.push(id_of(&b));
    }
    ids
}

/// The state a kill right after the prune's catalog commit leaves (new
/// catalog with its journal, old images, merge results still `.merging`)
/// is built by hand; the next start must finish the file work from the
/// journal, not sweep the merge result away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_finishes_a_committed_prune_from_its_journal() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start().await;
    let ids = chain_of_four(&hub).await;
    let disk_dir = hub.repo().join("app/disk0");
    let rel = |id: &str| format!("app/disk0/{id}.qcow2");
    let mut saved = Vec::new();
    for id in &ids {
        let img = hub.repo().join(rel(id));
        let out = hub.dir.path().join(format!("saved-{id}.raw"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        )
        .await;
        saved.push(out);
    }
    let pre = hub.dir.path().join("pre");
    std::fs::create_dir(&pre).unwrap();
    for f in std::fs::read_dir(&disk_dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), pre.join(f.file_name())).unwrap();
    }
    let r = hub.post("/api/v1/prune", json!({"dry_run": false})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    hub.stop().await;

    // Back to "committed, no file work done".
    let merged = disk_dir.join(format!("{}.qcow2", ids[2]));
    for suffix in ["", ".digest"] {
        let from = PathBuf::from(format!("{}{suffix}", merged.display()));
        std::fs::rename(&from, format!("{}.merging", from.display())).unwrap();
    }
    for f in std::fs::read_dir(&pre).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), disk_dir.join(f.file_name())).unwrap();
    }
    {
        let db = rusqlite::Connection::open(hub.dir.path().join("data/catalog.sqlite")).unwrap();
        let add = |path: String, action: &str| {
            db.execute(
                "INSERT INTO prune_journal (repository_id, path, action) VALUES ('default', ?1, ?2)",
                rusqlite::params![path, action],
            )
            .unwrap();
        };
        add(rel(&ids[2]), "rename");
        add(format!("{}.digest", rel(&ids[2])), "rename");
        for id in &ids[..2] {
            add(rel(id), "remove");
            add(format!("{}.digest", rel(id)), "remove");
        }
    }

    let dir = hub.dir;
    let hub = Hub::start_in(dir, 64, 0, std::time::Duration::from_secs(3600)).await;
    let names: Vec<String> = all_files(&hub.repo())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut want: Vec<String> = ids[2..]
        .iter()
        .flat_map(|id| [format!("{id}.qcow2"), format!("{id}.qcow2.digest")])
        .collect();
    want.sort();
    let mut got = names.clone();
    got.sort();
    assert_eq!(got, want);
    for (id, raw) in ids.iter().zip(&saved).skip(2) {
        let img = hub.repo().join(rel(id));
        assert_check_clean(&img, false).await;
        assert_identical("qcow2", img.to_str().unwrap(), "raw", raw.to_str().unwrap()).await;
    }
    let info = run_ok("qemu-img", &["info", merged.to_str().unwrap()]).await;
    assert!(!info.contains("backing file"), "{info}");
    let r = hub
        .post(&format!("/api/v1/backups/{}/verify", ids[2]), Value::Null)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let v = eventually(60, || async {
        let b = hub.get(&format!("/api/v1/backups/{}", ids[2])).await.json();
        let s = b["verify_status"].as_str().unwrap_or("").to_owned();
        (s != "verifying" && !s.is_empty()).then_some(b)
    })
    .await;
    assert_eq!(v["verify_status"], "ok", "{v}");
}

/// Admin writes policies, readers read them, operators prune.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_prune_roles() {
    use hub_daemon::catalog::Role;
    let mut hub = Hub::start().await;
    let catalog = hub.daemon.as_ref().unwrap().backups().catalog().clone();
    let admin = catalog.create_token("root", Role::Admin).await.unwrap();
    let operator = catalog.create_token("op", Role::Operator).await.unwrap();
    let reader = catalog.create_token("ro", Role::Reader).await.unwrap();
    let body = json!({"keep_daily": 7});
    let prune = json!({"dry_run": true});

    hub.token = Some(reader);
    assert_eq!(
        hub.put("/api/v1/policies/d", body.clone()).await.status,
        403
    );
    assert_eq!(hub.post("/api/v1/prune", prune.clone()).await.status, 403);
    assert_eq!(hub.get("/api/v1/policies").await.status, 200);
    assert_eq!(hub.get("/api/v1/policies/d").await.status, 404);

    hub.token = Some(operator);
    assert_eq!(
        hub.put("/api/v1/policies/d", body.clone()).await.status,
        403
    );
    assert_eq!(hub.delete("/api/v1/policies/d").await.status, 403);
    assert_eq!(hub.post("/api/v1/prune", prune.clone()).await.status, 200);

    hub.token = Some(admin);
    assert_eq!(hub.put("/api/v1/policies/d", body).await.status, 201);
    assert_eq!(hub.delete("/api/v1/policies/d").await.status, 204);

    hub.token = None;
    assert_eq!(hub.get("/api/v1/policies").await.status, 401);
    hub.stop().await;
}

/// Two disks: one merge per disk, each reading back as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_merges_every_disk() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start().await;
    let size = 4 * MIB;
    hub.register("two", &[size, size]).await;
    let r = hub
        .put("/api/v1/policies/one", json!({"keep_last": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let kind = if i == 0 { "full" } else { "incremental" };
        let b = start_backup(&hub, "two", kind, "one").await;
        for (d, (_, uri)) in parse_targets(b["nbd_targets_string"].as_str().unwrap())
            .iter()
            .enumerate()
        {
            if i == 0 {
                let src = write_file(
                    hub.dir.path(),
                    &format!("d{d}.raw"),
                    &support::disk_like(40 + d as u64, size as usize),
                );
                run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), uri]).await;
            } else {
                let w = format!(
                    "write -P {} {}k 8k",
                    0x30 + i + d as u64,
                    512 * i + 64 * d as u64
                );
                change(uri, &[&w, "flush"]).await;
            }
        }
        hub.complete(&id_of(&b)).await;
        ids.push(id_of(&b));
    }
    let last = &ids[2];
    let mut saved = Vec::new();
    for d in 0..2 {
        let img = hub.repo().join(format!("two/disk{d}/{last}.qcow2"));
        let out = hub.dir.path().join(format!("saved-{d}.raw"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        )
        .await;
        saved.push((img, out));
    }
    let r = hub
        .post("/api/v1/prune", json!({"vm_name": "two", "dry_run": false}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let merges = r.json()[0]["merges"].clone();
    assert_eq!(
        merges,
        json!([
            {"disk_id": 0, "into": last, "drop": [&ids[1], &ids[0]], "new_parent": null},
            {"disk_id": 1, "into": last, "drop": [&ids[1], &ids[0]], "new_parent": null}
        ])
    );
    for (img, raw) in &saved {
        assert_check_clean(img, false).await;
        assert_identical("qcow2", img.to_str().unwrap(), "raw", raw.to_str().unwrap()).await;
    }
    let names: Vec<PathBuf> = all_files(&hub.repo());
    assert_eq!(names.len(), 4, "{names:?}");
    hub.stop().await;
}
