//! VM-level backups through the real HTTP API and real NBD clients: full,
//! incremental, restore, and many VMs at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::hub::{free_port, parse_targets, Hub};
use integration_tests::support::{
    self, assert_check_clean, assert_identical, require, run_ok, write_file,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn image_path(disk: &Value) -> PathBuf {
    PathBuf::from(disk["qcow2_path"].as_str().unwrap())
}

/// Write every source into its target from `nbd_targets_string` with nbdcopy.
async fn copy_all(targets: &str, sources: &[PathBuf]) {
    let targets = parse_targets(targets);
    assert_eq!(targets.len(), sources.len());
    let mut tasks = Vec::new();
    for ((_, uri), src) in targets.into_iter().zip(sources) {
        let src = src.to_str().unwrap().to_owned();
        tasks.push(tokio::spawn(async move {
            run_ok("nbdcopy", &["--flush", &src, &uri]).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn sources(dir: &Path, prefix: &str, sizes: &[u64], seed: u64) -> Vec<PathBuf> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            write_file(
                dir,
                &format!("{prefix}{i}.raw"),
                &support::disk_like(seed + i as u64, *s as usize),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backup_of_a_three_disk_vm() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let shared = free_port();
    let mut hub = Hub::start_with(16, shared, std::time::Duration::from_secs(3600)).await;
    let sizes = [24 * MIB, 16 * MIB, 8 * MIB];
    hub.register("db01", &sizes).await;
    let src = sources(hub.dir.path(), "src", &sizes, 1);

    let b = hub.backup("db01", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(b["vm_name"], "db01");
    assert_eq!(b["status"], "started");
    assert_eq!(b["backup_type"], "full");
    assert!(b["created_at"].as_str().unwrap().ends_with('Z'));
    let disks = b["disk_results"].as_array().unwrap();
    assert_eq!(disks.len(), 3);
    let mut ports = Vec::new();
    let mut expected_targets = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        assert_eq!(d["disk_id"], i);
        assert_eq!(d["disk_key"], 2000 + i);
        assert_eq!(d["backup_mode"], "full");
        assert_eq!(d["parent_backup_id"], Value::Null);
        assert_eq!(d["status"], "exporting");
        let name = d["nbd_export_name"].as_str().unwrap();
        assert!(
            name.contains(&id),
            "export names are unique per backup: {name}"
        );
        ports.push(d["nbd_port"].as_u64().unwrap());
        expected_targets.push(format!(
            "{}:nbd://127.0.0.1:{}/{}",
            2000 + i,
            d["nbd_port"],
            name
        ));
        assert!(image_path(d).starts_with(hub.repo()));
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "each disk on its own port");
    assert_eq!(b["nbd_targets_string"], expected_targets.join(","));

    // Every export is also reachable by name on the shared port.
    let name0 = disks[0]["nbd_export_name"].as_str().unwrap();
    let out = run_ok(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{shared}/{name0}")],
    )
    .await;
    assert_eq!(out.trim(), (24 * MIB).to_string());

    copy_all(b["nbd_targets_string"].as_str().unwrap(), &src).await;
    let running = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert_eq!(running["status"], "running");
    assert!(running["disks"][0]["bytes_written"].as_u64().unwrap() > 0);
    assert!(running["disks"][0]["last_activity"].is_string());
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 3);

    let done = hub.complete(&id).await;
    for (i, d) in done["disks"].as_array().unwrap().iter().enumerate() {
        assert!(d["image_bytes"].as_u64().unwrap() > 0);
        assert_eq!(d["nbd_port"], Value::Null);
        let img = hub.repo().join(d["file"].as_str().unwrap());
        assert_check_clean(&img, false).await;
        assert_identical(
            "qcow2",
            img.to_str().unwrap(),
            "raw",
            src[i].to_str().unwrap(),
        )
        .await;
        assert!(!PathBuf::from(format!("{}.partial", img.display())).exists());
    }
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    assert_eq!(hub.metric("hub_backups{status=\"completed\"}").await, 1);
    // Counters survive the exports: the data written is still counted.
    let written = hub.metric("hub_nbd_written_bytes_total").await;
    assert!(written > 24 * MIB && written <= 48 * MIB, "{written}");
    assert!(hub.metric("hub_nbd_connections_total").await >= 3);
    for t in &expected_targets {
        let uri = t.split_once(':').unwrap().1;
        support::assert_export_gone(uri).await;
    }
    let list = hub
        .get("/api/v1/backups?vm_name=db01&status=completed")
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    hub.stop().await;
}

/// Apply qemu-io commands to an NBD target and the same (TRIM as zero) to
/// a raw mirror.
async fn change(uri: &str, mirror: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let mut a = args.clone();
    a.push(uri);
    let out = run_ok("qemu-io", &a).await;
    assert!(!out.contains("failed"), "{out}");
    let m: Vec<String> = cmds
        .iter()
        .map(|c| c.replace("discard", "write -z"))
        .collect();
    let mut a = vec!["-f", "raw"];
    for c in &m {
        a.extend(["-c", c.as_str()]);
    }
    let mp = mirror.to_str().unwrap().to_owned();
    a.push(&mp);
    run_ok("qemu-io", &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_chain_and_point_in_time_restore() {
    if !require("nbdcopy") || !require("qemu-io") {
        return;
    }
    let mut hub = Hub::start().await;
    let sizes = [16 * MIB, 8 * MIB];
    hub.register("app", &sizes).await;
    let src = sources(hub.dir.path(), "s", &sizes, 10);
    let full = hub.backup("app", "full").await;
    let full_id = full["backup_id"].as_str().unwrap().to_owned();
    copy_all(full["nbd_targets_string"].as_str().unwrap(), &src).await;
    hub.complete(&full_id).await;
    // Keep a copy of the sources as they were at the full backup.
    let at_full: Vec<Vec<u8>> = src.iter().map(|p| std::fs::read(p).unwrap()).collect();

    // Incremental: only changed blocks and a zeroed region are written.
    let inc = hub.backup("app", "incremental").await;
    let inc_id = inc["backup_id"].as_str().unwrap().to_owned();
    let targets = parse_targets(inc["nbd_targets_string"].as_str().unwrap());
    for d in inc["disk_results"].as_array().unwrap() {
        assert_eq!(d["backup_mode"], "incremental");
        assert_eq!(d["parent_backup_id"], full_id.as_str());
    }
    change(
        &targets[0].1,
        &src[0],
        &[
            "write -P 0xa1 1M 64k",
            "write -z 4M 2M",
            "write -P 0xa2 15M 4k",
            "discard 8M 1M",
            "flush",
        ],
    )
    .await;
    change(
        &targets[1].1,
        &src[1],
        &["write -P 0xb1 0 4k", "write -z 6M 1M"],
    )
    .await;
    let done = hub.complete(&inc_id).await;
    assert_eq!(done["disks"][0]["parent_backup_id"], full_id.as_str());

    for (i, d) in done["disks"].as_array().unwrap().iter().enumerate() {
        let img = hub.repo().join(d["file"].as_str().unwrap());
        assert_check_clean(&img, false).await;
        assert_identical(
            "qcow2",
            img.to_str().unwrap(),
            "raw",
            src[i].to_str().unwrap(),
        )
        .await;
        let info = run_ok(
            "qemu-img",
            &["info", "--backing-chain", img.to_str().unwrap()],
        )
        .await;
        assert!(
            info.contains(&format!("backing file: {full_id}.qcow2 (actual path")),
            "relative parent:\n{info}"
        );
        assert!(
            d["image_bytes"].as_u64().unwrap() < 4 * MIB,
            "overlay holds only the changes"
        );
    }

    // Restore both points in time and read them back with nbdcopy.
    for (id, expect) in [(&full_id, Some(&at_full)), (&inc_id, None)] {
        let r = hub
            .post(&format!("/api/v1/backups/{id}/restore"), Value::Null)
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let again = hub
            .post(&format!("/api/v1/backups/{id}/restore"), Value::Null)
            .await;
        assert_eq!(again.status, 409);
        let targets = parse_targets(r.json()["nbd_targets_string"].as_str().unwrap());
        for (i, (key, uri)) in targets.iter().enumerate() {
            assert_eq!(*key, 2000 + i as u32);
            let out = hub.dir.path().join(format!("restored-{i}.raw"));
            run_ok("nbdcopy", &[uri, out.to_str().unwrap()]).await;
            let got = std::fs::read(&out).unwrap();
            let want = match expect {
                Some(v) => v[i].clone(),
                None => std::fs::read(&src[i]).unwrap(),
            };
            assert!(got == want, "restore of {id} disk {i} differs");
            // Restore exports are read-only.
            let out =
                integration_tests::support::run("qemu-io", &["-f", "raw", "-c", "write 0 4k", uri])
                    .await;
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() || text.contains("failed"),
                "restore export accepted a write: {text}"
            );
        }
        // A backup being restored cannot be deleted.
        assert_eq!(
            hub.delete(&format!("/api/v1/backups/{id}")).await.status,
            409
        );
        assert_eq!(
            hub.delete(&format!("/api/v1/backups/{id}/restore"))
                .await
                .status,
            204
        );
    }
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);

    // The full is the parent of the incremental: 409 until the child goes.
    let r = hub.delete(&format!("/api/v1/backups/{full_id}")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "conflict");
    assert_eq!(
        hub.delete(&format!("/api/v1/backups/{inc_id}"))
            .await
            .status,
        204
    );
    assert_eq!(
        hub.delete(&format!("/api/v1/backups/{full_id}"))
            .await
            .status,
        204
    );
    assert_eq!(
        hub.get(&format!("/api/v1/backups/{full_id}")).await.status,
        404
    );
    let leftover: Vec<_> = common::files_under(&hub.repo());
    assert!(
        leftover.is_empty(),
        "files left after deleting every backup: {leftover:?}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_falls_back_to_full_for_new_and_resized_disks() {
    let mut hub = Hub::start().await;
    hub.register("vm", &[4 * MIB, 4 * MIB]).await;
    let b = hub.backup("vm", "full").await;
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    // Disk 1 resized, disk 2 new.
    hub.register("vm", &[4 * MIB, 8 * MIB, 2 * MIB]).await;
    let b = hub.backup("vm", "incremental").await;
    let modes: Vec<&str> = b["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["backup_mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, vec!["incremental", "full", "full"]);
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    // An incremental of a VM never backed up is a full.
    hub.register("fresh", &[MIB]).await;
    let b = hub.backup("fresh", "incremental").await;
    assert_eq!(b["disk_results"][0]["backup_mode"], "full");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_vms_of_three_disks_at_once() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start_with(40, 0, std::time::Duration::from_secs(3600)).await;
    let sizes = [6 * MIB, 4 * MIB, 2 * MIB];
    for v in 0..10 {
        hub.register(&format!("vm{v}"), &sizes).await;
    }
    // Start all ten backups concurrently.
    let mut starts = Vec::new();
    for v in 0..10 {
        let addr = hub.addr;
        starts.push(tokio::spawn(async move {
            let r = integration_tests::http::call(
                addr,
                "POST",
                "/api/v1/backups",
                Some(&serde_json::json!({"vm_name": format!("vm{v}"), "backup_type": "full", "repository_id": "default"})),
            )
            .await;
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()
        }));
    }
    let mut backups = Vec::new();
    for s in starts {
        backups.push(s.await.unwrap());
    }
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 30);
    let mut all_src = Vec::new();
    let mut copies = Vec::new();
    for (v, b) in backups.iter().enumerate() {
        let src = sources(
            hub.dir.path(),
            &format!("v{v}-"),
            &sizes,
            100 + 10 * v as u64,
        );
        let targets = b["nbd_targets_string"].as_str().unwrap().to_owned();
        let s2 = src.clone();
        copies.push(tokio::spawn(async move { copy_all(&targets, &s2).await }));
        all_src.push(src);
    }
    for c in copies {
        c.await.unwrap();
    }
    for b in &backups {
        hub.complete(b["backup_id"].as_str().unwrap()).await;
    }
    for (v, b) in backups.iter().enumerate() {
        for (i, d) in b["disk_results"].as_array().unwrap().iter().enumerate() {
            let img = image_path(d);
            assert_identical(
                "qcow2",
                img.to_str().unwrap(),
                "raw",
                all_src[v][i].to_str().unwrap(),
            )
            .await;
        }
    }
    assert_eq!(hub.metric("hub_backups{status=\"completed\"}").await, 10);
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    hub.stop().await;
}

/// Instant restore: `{"writable": true}` serves the restore point through
/// a throw-away overlay. Writes land in the overlay and read back; the
/// restore point never changes; stopping the restore deletes the overlay;
/// a leftover overlay is refused, never reused, and swept at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_restore_writes_land_in_a_throwaway_overlay() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start().await;
    let sizes = [8 * MIB];
    hub.register("boot", &sizes).await;
    let src = sources(hub.dir.path(), "s", &sizes, 40);
    let full = hub.backup("boot", "full").await;
    let id = full["backup_id"].as_str().unwrap().to_owned();
    copy_all(full["nbd_targets_string"].as_str().unwrap(), &src).await;
    let done = hub.complete(&id).await;
    let image = hub.repo().join(done["disks"][0]["file"].as_str().unwrap());
    let overlay = PathBuf::from(format!("{}.instant", image.display()));
    let restore = format!("/api/v1/backups/{id}/restore");

    // Unknown fields are a client mistake, not silently ignored.
    let r = hub
        .post(&restore, serde_json::json!({"writeable": true}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());

    for round in 0..2 {
        let r = hub
            .post(&restore, serde_json::json!({"writable": true}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.json()["writable"], true);
        let uri = parse_targets(r.json()["nbd_targets_string"].as_str().unwrap())
            .remove(0)
            .1;
        assert!(overlay.is_file(), "overlay {} exists", overlay.display());
        // Each round starts from the restore point, not from the last
        // round's writes.
        let seen = hub.dir.path().join("seen.raw");
        run_ok("nbdcopy", &[&uri, seen.to_str().unwrap()]).await;
        assert!(
            std::fs::read(&seen).unwrap() == std::fs::read(&src[0]).unwrap(),
            "round {round}: the writable restore reads as the restore point"
        );
        std::fs::remove_file(&seen).unwrap();
        let out = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 1M 64k",
                "-c",
                "write -z 2M 1M",
                "-c",
                "flush",
                "-c",
                "read -P 0x5a 1M 64k",
                "-c",
                "read -P 0 2M 1M",
                &uri,
            ],
        )
        .await;
        assert!(!out.contains("failed"), "{out}");
        // The backup cannot go while it is served, and no prune may touch it.
        assert_eq!(
            hub.delete(&format!("/api/v1/backups/{id}")).await.status,
            409
        );
        assert_eq!(hub.delete(&restore).await.status, 204);
        assert!(!overlay.exists(), "the overlay goes with the restore");
        // The restore point is untouched.
        assert_check_clean(&image, false).await;
        assert_identical(
            "qcow2",
            image.to_str().unwrap(),
            "raw",
            src[0].to_str().unwrap(),
        )
        .await;
    }

    // A leftover overlay (a crash between create and sweep) is refused,
    // never served: it may hold anything.
    std::fs::write(&overlay, b"left behind").unwrap();
    let r = hub
        .post(&restore, serde_json::json!({"writable": true}))
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    assert_eq!(std::fs::read(&overlay).unwrap(), b"left behind");
    // A planted symlink in its place is refused too, never followed: the
    // file it points at stays as it was.
    let victim = hub.dir.path().join("victim");
    std::fs::write(&victim, b"not yours").unwrap();
    std::fs::remove_file(&overlay).unwrap();
    std::os::unix::fs::symlink(&victim, &overlay).unwrap();
    let r = hub
        .post(&restore, serde_json::json!({"writable": true}))
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
    std::fs::remove_file(&overlay).unwrap();
    std::fs::write(&overlay, b"left behind").unwrap();
    // A read-only restore is unaffected by it.
    let r = hub.post(&restore, Value::Null).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["writable"], false);
    assert_eq!(hub.delete(&restore).await.status, 204);
    // Start-up reconciliation sweeps it.
    hub.stop().await;
    let dir = std::mem::replace(&mut hub.dir, tempfile::tempdir().unwrap());
    let mut hub = Hub::start_in(dir, 64, 0, std::time::Duration::from_secs(3600)).await;
    assert!(!overlay.exists(), "start-up swept the stray overlay");
    let r = hub
        .post(&restore, serde_json::json!({"writable": true}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(hub.delete(&restore).await.status, 204);
    hub.stop().await;
}
