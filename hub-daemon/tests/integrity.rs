//! "Completed" means every byte is there, provably: digests recorded at
//! completion equal the source's, verify finds a flipped byte in any
//! layer, failed writes (a full filesystem) never complete, and a damaged
//! or replaced parent is never used as a base.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::hub::{eventually, parse_targets, Hub};
use common::tmpfs::Tmpfs;
use disk_digest::algo::digest_of_bytes;
use integration_tests::support::{
    assert_check_clean, assert_identical, require, run, run_ok, write_file,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn data(seed: u64, len: usize) -> Vec<u8> {
    integration_tests::support::disk_like(seed, len)
}

async fn copy(src: &Path, uri: &str) {
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), uri]).await;
}

fn uris(started: &Value) -> Vec<String> {
    parse_targets(started["nbd_targets_string"].as_str().unwrap())
        .into_iter()
        .map(|(_, u)| u)
        .collect()
}

fn image(hub: &Hub, b: &Value, disk: usize) -> PathBuf {
    hub.repo().join(b["disks"][disk]["file"].as_str().unwrap())
}

async fn wait_verified(hub: &Hub, id: &str) -> Value {
    eventually(60, || async {
        let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
        (b["verify_status"] != "verifying").then_some(b)
    })
    .await
}

/// Apply `writes` (offset, bytes) to the NBD target with qemu-io, the way
/// an incremental sends only changed ranges, and to the mirror.
async fn write_ranges(uri: &str, mirror: &mut [u8], writes: &[(u64, Vec<u8>)], dir: &Path) {
    for (i, (off, bytes)) in writes.iter().enumerate() {
        mirror[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        let f = write_file(dir, &format!("chunk{i}"), bytes);
        // nbdcopy cannot write at an offset; qemu-io can, from a pattern
        // only, so write the chunk by nbdsh-free means: qemu-img dd is
        // whole-image too. Use qemu-io's `write -s FILE`.
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                uri,
                "-c",
                &format!("write -s {} {off} {}", f.display(), bytes.len()),
            ],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_match_the_source_and_verify_finds_flipped_bytes() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start().await;
    let sizes = [20 * MIB, 9 * MIB + 512 * 3];
    hub.register("vm", &sizes).await;
    let mut src: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| data(i as u64 + 7, *s as usize))
        .collect();
    // A zero run the sender may send as a hole.
    src[0][5 * MIB as usize..8 * MIB as usize].fill(0);
    let files: Vec<PathBuf> = src
        .iter()
        .enumerate()
        .map(|(i, d)| write_file(hub.dir.path(), &format!("src{i}.raw"), d))
        .collect();

    // Full backup; the sender reports the digest it computed itself.
    let started = hub.backup("vm", "full").await;
    let full_id = started["backup_id"].as_str().unwrap().to_owned();
    for (u, f) in uris(&started).iter().zip(&files) {
        copy(f, u).await;
    }
    let claims: Vec<Value> = src
        .iter()
        .enumerate()
        .map(|(i, d)| json!({"disk_id": i, "digest": digest_of_bytes(d).to_hex(), "change_id": format!("c{i}")}))
        .collect();
    let r = hub
        .post(
            &format!("/api/v1/backups/{full_id}/complete"),
            json!({"disks": claims}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let full = r.json();
    for (i, d) in src.iter().enumerate() {
        assert_eq!(full["disks"][i]["digest"], digest_of_bytes(d).to_hex());
        assert_eq!(full["disks"][i]["digest_algorithm"], "blake3-tree-v1");
    }

    // Incremental: unaligned and partial-block writes (read back at the
    // end), a whole-block write, a zeroed range.
    let started = hub.backup("vm", "incremental").await;
    let inc_id = started["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(started["disk_results"][0]["backup_mode"], "incremental");
    let u = uris(&started);
    let writes = vec![
        (4096 * 3 + 100, vec![0xab; 5000]),
        (2 * MIB, vec![0x5c; 65536]),
        (15 * MIB + 77, vec![0x11; 200_000]),
    ];
    write_ranges(&u[0], &mut src[0], &writes, hub.dir.path()).await;
    run_ok(
        "qemu-io",
        &["-f", "raw", &u[1], "-c", "write -z 1048576 3145728"],
    )
    .await;
    src[1][MIB as usize..4 * MIB as usize].fill(0);
    let inc = hub.complete(&inc_id).await;
    for (i, d) in src.iter().enumerate() {
        assert_eq!(
            inc["disks"][i]["digest"],
            digest_of_bytes(d).to_hex(),
            "disk {i}"
        );
    }
    // The restore point reads as the source; qemu agrees with the image.
    for (i, s) in src.iter().enumerate() {
        let img = image(&hub, &inc, i);
        assert_check_clean(&img, false).await;
        let f = write_file(hub.dir.path(), &format!("now{i}.raw"), s);
        assert_identical("raw", f.to_str().unwrap(), "qcow2", img.to_str().unwrap()).await;
    }

    // Verify: all fine.
    let r = hub
        .post(&format!("/api/v1/backups/{inc_id}/verify"), json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let v = wait_verified(&hub, &inc_id).await;
    assert_eq!(v["verify_status"], "ok", "{v}");
    assert!(v["verified_at"].is_string());
    let f = hub.get(&format!("/api/v1/backups/{full_id}")).await.json();
    assert_eq!(f["verify_status"], "ok", "ancestors are verified too: {f}");

    // Flip one byte of data in the full's image, in a block the
    // incremental did not rewrite: both restore points are corrupt, and
    // the report names the range and who holds it.
    let full_img = image(&hub, &full, 0);
    let map = run_ok(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            full_img.to_str().unwrap(),
        ],
    )
    .await;
    let map: Value = serde_json::from_str(&map).unwrap();
    let target = 10 * MIB;
    let ext = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["data"] == true
                && e["start"].as_u64().unwrap() <= target
                && target < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
        })
        .expect("allocated extent at 10 MiB");
    let host = ext["offset"].as_u64().unwrap() + (target - ext["start"].as_u64().unwrap()) + 1234;
    {
        use std::os::unix::fs::FileExt;
        let fh = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&full_img)
            .unwrap();
        let mut b = [0u8; 1];
        fh.read_exact_at(&mut b, host).unwrap();
        fh.write_all_at(&[b[0] ^ 0x40], host).unwrap();
    }
    hub.post(&format!("/api/v1/backups/{inc_id}/verify"), json!({}))
        .await;
    let v = wait_verified(&hub, &inc_id).await;
    assert_eq!(v["verify_status"], "corrupt", "{v}");
    let d0 = &v["disks"][0];
    assert_eq!(d0["verify_status"], "corrupt");
    let ranges = d0["verify"]["bad_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{d0}");
    assert_eq!(ranges[0]["offset"], target);
    assert_eq!(ranges[0]["length"], 65536);
    assert_eq!(ranges[0]["held_by"], full_id.as_str());
    assert_eq!(
        v["disks"][1]["verify_status"], "ok",
        "the other disk is fine"
    );
    let f = hub.get(&format!("/api/v1/backups/{full_id}")).await.json();
    assert_eq!(f["verify_status"], "corrupt");
    assert!(f["disks"][0]["verify"]["shared_with"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == inc_id.as_str()));
    // A corrupt restore point is never a parent: the next incremental of
    // that disk goes full, with the reason.
    let started = hub.backup("vm", "incremental").await;
    assert_eq!(started["disk_results"][0]["backup_mode"], "full");
    assert!(started["disk_results"][0]["mode_reason"]
        .as_str()
        .unwrap()
        .contains("verification"));
    let id = started["backup_id"].as_str().unwrap();
    hub.post(&format!("/api/v1/backups/{id}/abort"), json!({}))
        .await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sender_digest_fails_the_backup_and_removes_its_files() {
    if !require("nbdcopy") {
        return;
    }
    let mut hub = Hub::start().await;
    hub.register("vm", &[4 * MIB]).await;
    let d = data(3, 4 * MIB as usize);
    let f = write_file(hub.dir.path(), "s.raw", &d);
    let started = hub.backup("vm", "full").await;
    let id = started["backup_id"].as_str().unwrap().to_owned();
    copy(&f, &uris(&started)[0]).await;
    let mut wrong = d.clone();
    wrong[12345] ^= 1;
    let r = hub
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            json!({"disks": [{"disk_id": 0, "digest": digest_of_bytes(&wrong).to_hex()}]}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "backup_failed");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("digest mismatch"));
    let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert_eq!(b["status"], "failed");
    let dir = hub.repo().join("vm/disk0");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_never_completes() {
    if !require("nbdcopy") {
        return;
    }
    let mut hub = Hub::start().await;
    // Inside the hub's repository root (beside its data directory).
    let Some(fs) = Tmpfs::mount(&hub.dir.path().join("small"), "24m") else {
        return;
    };
    let repo = fs.dir.join("repo");
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": "small", "path": repo.to_str().unwrap()}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    hub.register("vm", &[64 * MIB, MIB]).await;
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm", "backup_type": "full", "repository_id": "small"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let started = r.json();
    let id = started["backup_id"].as_str().unwrap().to_owned();
    let u = uris(&started);
    let big = write_file(hub.dir.path(), "big.raw", &data(9, 64 * MIB as usize));
    let small = write_file(hub.dir.path(), "small.raw", &data(10, MIB as usize));
    copy(&small, &u[1]).await;
    // The client sees the errors (nbdcopy fails) ...
    let out = run("nbdcopy", &["--flush", big.to_str().unwrap(), &u[0]]).await;
    assert!(
        !out.status.success(),
        "nbdcopy into a full filesystem succeeded"
    );
    // ... and so does the API, per disk, while the backup runs.
    let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert!(b["disks"][0]["write_errors"].as_u64().unwrap() > 0, "{b}");
    assert!(
        b["disks"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("ENOSPC"),
        "{b}"
    );
    assert_eq!(b["disks"][1]["write_errors"], 0);
    // complete refuses: failed, with the reason, files gone.
    let r = hub
        .post(&format!("/api/v1/backups/{id}/complete"), json!({}))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("disk 0") && msg.contains("failed write"),
        "{msg}"
    );
    assert!(!msg.contains("disk 1"), "{msg}");
    let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert_eq!(b["status"], "failed");
    assert!(b["error"].as_str().unwrap().contains("disk 0"));
    assert!(b["disks"][0]["write_errors"].as_u64().unwrap() > 0);
    let files: Vec<_> = common::files_under(&repo);
    assert!(files.is_empty(), "files left: {files:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_replaced_parent_is_never_a_base() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start_with(16, 0, Duration::from_secs(3600)).await;
    hub.register("vm", &[2 * MIB, 2 * MIB]).await;
    hub.register("other", &[2 * MIB]).await;
    let a = write_file(hub.dir.path(), "a.raw", &data(1, 2 * MIB as usize));
    let b = write_file(hub.dir.path(), "b.raw", &data(2, 2 * MIB as usize));
    let o = write_file(hub.dir.path(), "o.raw", &data(3, 2 * MIB as usize));
    let started = hub.backup("vm", "full").await;
    let full_id = started["backup_id"].as_str().unwrap().to_owned();
    let u = uris(&started);
    copy(&a, &u[0]).await;
    copy(&b, &u[1]).await;
    let full = hub.complete(&full_id).await;
    let started = hub.backup("other", "full").await;
    let oid = started["backup_id"].as_str().unwrap().to_owned();
    copy(&o, &uris(&started)[0]).await;
    let other = hub.complete(&oid).await;

    // Disk 0's parent loses its qcow2 header; disk 1's is replaced by a
    // symlink to another VM's image.
    let img0 = image(&hub, &full, 0);
    {
        use std::os::unix::fs::FileExt;
        let fh = std::fs::OpenOptions::new().write(true).open(&img0).unwrap();
        fh.write_all_at(&[0u8; 8], 0).unwrap();
    }
    let img1 = image(&hub, &full, 1);
    std::fs::remove_file(&img1).unwrap();
    std::os::unix::fs::symlink(image(&hub, &other, 0), &img1).unwrap();

    let started = hub.backup("vm", "incremental").await;
    for (i, why) in [(0, "qcow2"), (1, "symlink")] {
        let d = &started["disk_results"][i];
        assert_eq!(d["backup_mode"], "full", "{d}");
        assert!(d["mode_reason"].as_str().unwrap().contains(why), "{d}");
        assert!(d["parent_backup_id"].is_null());
    }
    let id = started["backup_id"].as_str().unwrap().to_owned();
    let u = uris(&started);
    copy(&a, &u[0]).await;
    copy(&b, &u[1]).await;
    let done = hub.complete(&id).await;
    assert_eq!(
        done["disks"][0]["mode_reason"]
            .as_str()
            .map(|s| s.contains("qcow2")),
        Some(true)
    );
    // The new fulls restore the right bytes.
    assert_identical(
        "raw",
        a.to_str().unwrap(),
        "qcow2",
        image(&hub, &done, 0).to_str().unwrap(),
    )
    .await;
    assert_identical(
        "raw",
        b.to_str().unwrap(),
        "qcow2",
        image(&hub, &done, 1).to_str().unwrap(),
    )
    .await;
    // Restoring the damaged restore point is refused with the reason.
    let r = hub
        .post(&format!("/api/v1/backups/{full_id}/restore"), json!({}))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "bad_image");
    hub.stop().await;
}

/// Flip one byte of `img` at virtual `offset`, which `img` itself holds
/// (qemu-img map: depth 0, data); returns false if it holds none there.
async fn flip_own_byte(img: &Path, offset: u64) -> bool {
    let map = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()],
    )
    .await;
    let map: Value = serde_json::from_str(&map).unwrap();
    let Some(e) = map.as_array().unwrap().iter().find(|e| {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        e["data"] == true && e["depth"] == 0 && s <= offset && offset < s + l
    }) else {
        return false;
    };
    let host = e["offset"].as_u64().unwrap() + offset - e["start"].as_u64().unwrap();
    use std::os::unix::fs::FileExt;
    let fh = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 1];
    fh.read_exact_at(&mut b, host).unwrap();
    fh.write_all_at(&[b[0] ^ 0x01], host).unwrap();
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_flipped_byte_in_an_incremental_layer() {
    if !require("nbdcopy") || !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut hub = Hub::start().await;
    hub.register("vm", &[8 * MIB]).await;
    let src = write_file(hub.dir.path(), "s.raw", &data(21, 8 * MIB as usize));
    let b = hub.backup("vm", "full").await;
    let full_id = b["backup_id"].as_str().unwrap().to_owned();
    copy(&src, &uris(&b)[0]).await;
    hub.complete(&full_id).await;
    let b = hub.backup("vm", "incremental").await;
    let inc_id = b["backup_id"].as_str().unwrap().to_owned();
    run_ok(
        "qemu-io",
        &["-f", "raw", &uris(&b)[0], "-c", "write -P 0x3c 3M 128k"],
    )
    .await;
    let inc = hub.complete(&inc_id).await;
    assert!(flip_own_byte(&image(&hub, &inc, 0), 3 * MIB + 70_000).await);
    hub.post(&format!("/api/v1/backups/{inc_id}/verify"), json!({}))
        .await;
    let v = wait_verified(&hub, &inc_id).await;
    assert_eq!(v["verify_status"], "corrupt", "{v}");
    let r = &v["disks"][0]["verify"]["bad_ranges"];
    assert_eq!(r[0]["offset"], 3 * MIB + 65536, "{r}");
    assert_eq!(r[0]["held_by"], inc_id.as_str());
    // The full it builds on is intact.
    let f = hub.get(&format!("/api/v1/backups/{full_id}")).await.json();
    assert_eq!(f["verify_status"], "ok", "{f}");
    hub.stop().await;
}

/// Space (issue "Lifecycle", part 4): the repository reports its space and
/// what its restore points hold; a backup that cannot fit by its history
/// is refused up front with 507 and leaves nothing, while one that fits
/// still starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_cannot_fit_is_refused_up_front() {
    if !require("nbdcopy") {
        return;
    }
    let mut hub = Hub::start().await;
    let Some(fs) = Tmpfs::mount(&hub.dir.path().join("space"), "40m") else {
        return;
    };
    let repo = fs.dir.join("repo");
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": "tight", "path": repo.to_str().unwrap()}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    hub.register("vm", &[16 * MIB]).await;
    let start = |kind: &'static str| {
        let hub = &hub;
        async move {
            hub.post(
                "/api/v1/backups",
                json!({"vm_name": "vm", "backup_type": kind, "repository_id": "tight"}),
            )
            .await
        }
    };
    // A first full: no history, only the reserve is checked.
    let r = start("full").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let started = r.json();
    let id = started["backup_id"].as_str().unwrap().to_owned();
    let src = write_file(
        hub.dir.path(),
        "src.raw",
        &integration_tests::support::pattern(3, 12 * MIB as usize),
    );
    copy(&src, &uris(&started)[0]).await;
    let done = hub.complete(&id).await;
    let image = done["disks"][0]["image_bytes"].as_u64().unwrap();
    assert!(image >= 12 * MIB, "{done}");

    let r = hub.get("/api/v1/repositories/tight").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = r.json();
    assert_eq!(s["backup_bytes"], image, "{s}");
    assert_eq!(s["capacity_bytes"], 40 * MIB, "{s}");
    assert!(s["free_bytes"].as_u64().unwrap() < 28 * MIB, "{s}");
    assert!(hub
        .get("/metrics")
        .await
        .text()
        .contains("hub_repository_free_bytes{repository=\"tight\"}"));
    assert_eq!(hub.get("/api/v1/repositories/nope").await.status, 404);

    // Something else fills the filesystem: another full (~12 MiB by its
    // history) no longer fits, and is refused before anything is made.
    let junk = fs.dir.join("junk");
    std::fs::write(&junk, vec![1u8; 20 * MIB as usize]).unwrap();
    let before = common::files_under(&repo);
    let r = start("full").await;
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(r.text().contains("expected to write"), "{}", r.text());
    assert_eq!(common::files_under(&repo), before);
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    // An incremental (a tenth of the full, by history) still fits.
    let r = start("incremental").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let r = hub
        .post(&format!("/api/v1/backups/{id}/abort"), json!({}))
        .await;
    assert!(r.status < 300, "{}", r.text());
    std::fs::remove_file(&junk).unwrap();
    hub.stop().await;
}
