//! Scheduled verification through real backups: restore points due by
//! their policy's `verify_every_days` are verified (and only those), at
//! most `verify_max_concurrent` at a time; a corrupt full flags itself and
//! every restore point built on it, and the next backup of the VM is a
//! full that says why. Passes run with a clock the test sets (the
//! scheduler's own loop is checked once, with a backdated catalog).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::hub::{eventually, parse_targets, Hub};
use hub_daemon::lifecycle::verify_schedule::{run_pass, PassReport};
use integration_tests::support::{require, run_ok, write_file};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const DAY_MS: i64 = 86_400_000;

/// Disk content with no zero block, so every cluster of a full is
/// allocated (a flipped byte lands in data, never in a hole).
fn source(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

async fn start_backup(hub: &Hub, vm: &str, kind: &str, policy: Option<&str>) -> Value {
    let mut body = json!({"vm_name": vm, "backup_type": kind, "repository_id": "default"});
    if let Some(p) = policy {
        body["policy_id"] = json!(p);
    }
    let r = hub.post("/api/v1/backups", body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn id_of(v: &Value) -> String {
    v["backup_id"].as_str().unwrap().to_owned()
}

fn uri(started: &Value) -> String {
    parse_targets(started["nbd_targets_string"].as_str().unwrap())
        .remove(0)
        .1
}

/// A completed full of `vm` (one disk) holding `src`.
async fn full(hub: &Hub, vm: &str, policy: Option<&str>, src: &Path) -> Value {
    let started = start_backup(hub, vm, "full", policy).await;
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &uri(&started)],
    )
    .await;
    hub.complete(&id_of(&started)).await
}

/// A completed incremental of `vm` with qemu-io `cmds` applied.
async fn incremental(hub: &Hub, vm: &str, policy: &str, cmds: &[&str]) -> Value {
    let started = start_backup(hub, vm, "incremental", Some(policy)).await;
    assert_eq!(started["disk_results"][0]["backup_mode"], "incremental");
    change(&uri(&started), cmds).await;
    hub.complete(&id_of(&started)).await
}

async fn change(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run_ok("qemu-io", &args).await;
    assert!(!out.contains("failed"), "{out}");
}

async fn get(hub: &Hub, id: &str) -> Value {
    hub.get(&format!("/api/v1/backups/{id}")).await.json()
}

async fn pass(hub: &Hub, now_ms: i64) -> PassReport {
    let backups = hub.daemon.as_ref().unwrap().backups();
    run_pass(backups, now_ms, &CancellationToken::new())
        .await
        .unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Flip one byte of the guest data at `guest_offset` in qcow2 `image`.
async fn flip_byte(image: &Path, guest_offset: u64) {
    let map = run_ok(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
        ],
    )
    .await;
    let map: Value = serde_json::from_str(&map).unwrap();
    let ext = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            e["data"] == true && start <= guest_offset && guest_offset < start + len
        })
        .expect("allocated extent at the target");
    let host = ext["offset"].as_u64().unwrap() + (guest_offset - ext["start"].as_u64().unwrap());
    use std::os::unix::fs::FileExt;
    let fh = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut b = [0u8; 1];
    fh.read_exact_at(&mut b, host).unwrap();
    fh.write_all_at(&[b[0] ^ 0x40], host).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_points_are_verified_and_a_corrupt_full_takes_its_dependents_along() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start_configured(|c| {
        // Passes are run by the test, with its clock.
        c.verify.check_interval = std::time::Duration::ZERO;
        c.verify.max_concurrent = 2;
    })
    .await;
    for (p, days) in [("daily", 1), ("monthly", 30), ("never", 0)] {
        let r = hub
            .put(
                &format!("/api/v1/policies/{p}"),
                json!({"keep_last": 10, "verify_every_days": days}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    for vm in ["vm", "vm2", "late", "never", "nopolicy"] {
        hub.register(vm, &[4 * MIB]).await;
    }
    let src = write_file(hub.dir.path(), "src.raw", &source(3, 4 * MIB as usize));
    let src2 = write_file(hub.dir.path(), "src2.raw", &source(9, 4 * MIB as usize));

    // vm: a full and two incrementals; inc1 rewrites the whole block at
    // 1 MiB (where the full will be damaged), inc2 writes elsewhere.
    let f = id_of(&full(&hub, "vm", Some("daily"), &src).await);
    let i1 = id_of(&incremental(&hub, "vm", "daily", &["write -P 0x33 1M 64k"]).await);
    let i2 = id_of(&incremental(&hub, "vm", "daily", &["write -P 0x44 3M 64k"]).await);
    let v2 = id_of(&full(&hub, "vm2", Some("daily"), &src2).await);
    let late = id_of(&full(&hub, "late", Some("monthly"), &src2).await);
    let never = id_of(&full(&hub, "never", Some("never"), &src2).await);
    let nopol = id_of(&full(&hub, "nopolicy", None, &src2).await);
    let untouched = [late.clone(), never.clone(), nopol.clone()];

    // Nothing is a day old yet.
    let now = hub_daemon::time::now_ms();
    let r = pass(&hub, now).await;
    assert!(r.due.is_empty(), "{r:?}");
    assert_eq!(get(&hub, &f).await["verify_status"], Value::Null);

    // Two days on: the daily points are due, oldest first, verified two
    // at a time, all ok; the others are not touched.
    let r = pass(&hub, now + 2 * DAY_MS).await;
    assert_eq!(r.due.first(), Some(&f), "oldest first: {r:?}");
    assert_eq!(
        sorted(r.due.clone()),
        sorted(vec![f.clone(), i1.clone(), i2.clone(), v2.clone()])
    );
    assert_eq!(sorted(r.ok.clone()), sorted(r.due.clone()), "{r:?}");
    assert_eq!(
        r.peak_in_flight, 2,
        "bounded by verify_max_concurrent: {r:?}"
    );
    assert!(r.corrupt.is_empty() && r.failed.is_empty() && r.skipped.is_empty());
    for id in [&f, &i1, &i2, &v2] {
        let b = get(&hub, id).await;
        assert_eq!(b["verify_status"], "ok", "{b}");
        assert!(b["verified_at"].is_string(), "{b}");
        assert_eq!(b["disks"][0]["verify_status"], "ok", "{b}");
    }
    for id in &untouched {
        let b = get(&hub, id).await;
        assert_eq!(b["verify_status"], Value::Null, "{b}");
        assert_eq!(b["verified_at"], Value::Null, "{b}");
    }
    // Just verified: not due again half a day later.
    assert!(pass(&hub, now + DAY_MS / 2).await.due.is_empty());

    // An incremental of vm runs across the next pass (it completes after
    // its parent is flagged, unflagged itself).
    let running = start_backup(&hub, "vm", "incremental", Some("daily")).await;
    let i3 = id_of(&running);
    assert_eq!(running["disk_results"][0]["parent_backup_id"], i2.as_str());
    change(&uri(&running), &["write -P 0x55 2M 64k"]).await;

    // Damage the full's data at 1 MiB + 100 (a block inc1 rewrote).
    let full_rec = get(&hub, &f).await;
    let img: PathBuf = hub
        .repo()
        .join(full_rec["disks"][0]["file"].as_str().unwrap());
    flip_byte(&img, MIB + 100).await;

    // Which of f, i1, i2 is verified itself depends on the order of
    // their (equal) last verification times; whichever it is finds the
    // damage and flags all three, and the rest are then skipped.
    let r = pass(&hub, now + 4 * DAY_MS).await;
    assert!(!r.corrupt.is_empty(), "{r:?}");
    assert!(
        r.corrupt.iter().all(|c| [&f, &i1, &i2].contains(&c)),
        "{r:?}"
    );
    assert!(r.ok.contains(&v2), "vm2 is fine: {r:?}");
    assert!(r.failed.is_empty(), "{r:?}");
    for id in [&f, &i1, &i2] {
        assert!(r.flagged.contains(id), "{id} flagged: {r:?}");
    }
    let b = get(&hub, &f).await;
    assert_eq!(b["verify_status"], "corrupt", "{b}");
    let ranges = b["disks"][0]["verify"]["bad_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{b}");
    assert_eq!(ranges[0]["offset"], MIB);
    assert_eq!(ranges[0]["held_by"], f.as_str());
    // inc1 and inc2 read good data at 1 MiB (inc1 rewrote it), yet are
    // built on a corrupt full: flagged, saying on what.
    for id in [&i1, &i2] {
        let b = get(&hub, id).await;
        assert_eq!(b["verify_status"], "corrupt", "{b}");
        assert_eq!(b["disks"][0]["verify_status"], "corrupt", "{b}");
        assert_eq!(b["disks"][0]["verify"]["depends_on"], f.as_str(), "{b}");
        assert!(b["verified_at"].is_string());
    }
    assert_eq!(get(&hub, &v2).await["verify_status"], "ok");
    for id in &untouched {
        assert_eq!(get(&hub, id).await["verify_status"], Value::Null);
    }
    // Flagged points are not re-verified on schedule.
    let r = pass(&hub, now + 8 * DAY_MS).await;
    assert!(!r.due.iter().any(|d| [&f, &i1, &i2].contains(&d)), "{r:?}");

    // inc3 completes on top of inc2 (flagged while it ran): the next
    // backup of vm is a full, and says why.
    hub.complete(&i3).await;
    assert_eq!(get(&hub, &i3).await["verify_status"], Value::Null);
    let started = start_backup(&hub, "vm", "incremental", Some("daily")).await;
    let d = &started["disk_results"][0];
    assert_eq!(d["backup_mode"], "full", "{started}");
    assert!(d["parent_backup_id"].is_null());
    let why = d["mode_reason"].as_str().unwrap();
    assert!(
        why.contains(&i3) && why.contains("failed verification"),
        "{why}"
    );
    let id = id_of(&started);
    let r = hub
        .post(&format!("/api/v1/backups/{id}/abort"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    hub.stop().await;
}

/// The daemon's own loop: with a short interval and a restore point made
/// due in the catalog, it gets verified without anyone asking, and the
/// daemon still stops promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_runs_by_itself() {
    if !require("nbdcopy") {
        return;
    }
    let mut hub = Hub::start_configured(|c| {
        c.verify.check_interval = std::time::Duration::from_millis(200);
    })
    .await;
    let r = hub
        .put("/api/v1/policies/daily", json!({"verify_every_days": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    hub.register("vm", &[2 * MIB]).await;
    let src = write_file(hub.dir.path(), "src.raw", &source(5, 2 * MIB as usize));
    let id = id_of(&full(&hub, "vm", Some("daily"), &src).await);
    let fresh = id_of(&full(&hub, "vm", Some("daily"), &src).await);

    // Backdate the first one's completion by two days.
    let db = rusqlite::Connection::open(hub.dir.path().join("data/catalog.sqlite")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    let n = db
        .execute(
            "UPDATE backups SET completed_ms = completed_ms - ?2 WHERE id = ?1",
            rusqlite::params![id, 2 * DAY_MS],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(db);

    let b = eventually(60, || async {
        let b = get(&hub, &id).await;
        (b["verify_status"] == "ok").then_some(b)
    })
    .await;
    assert!(b["verified_at"].is_string(), "{b}");
    assert_eq!(
        get(&hub, &fresh).await["verify_status"],
        Value::Null,
        "not due"
    );
    hub.stop().await;
}
