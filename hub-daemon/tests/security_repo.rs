//! Repositories confined (issue "Security", part 4): repositories only
//! under configured roots, and no symlink planted inside a repository can
//! redirect a write, a delete, a parent, a restore or the start-up sweep.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::hub::Hub;
use common::DaemonProcess;
use integration_tests::http::call;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn assert_error(r: &integration_tests::http::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    assert_eq!(j["error"]["status"], status, "{j}");
    assert_eq!(j["error"]["code"], code, "{j}");
}

async fn start_backup(hub: &Hub, vm: &str) -> integration_tests::http::Response {
    hub.post(
        "/api/v1/backups",
        json!({"vm_name": vm, "backup_type": "full", "repository_id": "default"}),
    )
    .await
}

/// A directory outside everything the hub owns, with a precious file.
fn outside() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("precious.qcow2");
    std::fs::write(&f, b"not yours").unwrap();
    (d, f)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_only_under_roots_and_never_through_symlinks() {
    let mut hub = Hub::start().await;
    let root = hub.dir.path().canonicalize().unwrap();
    let (out, _) = outside();
    let create = |id: &str, p: &Path| json!({"id": id, "path": p.display().to_string()});
    // Under the root: created.
    let r = hub
        .post("/api/v1/repositories", create("ok", &root.join("repos/a")))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // Outside every root, the root's parent, system trees: 400.
    for (i, p) in [
        out.path().join("repo"),
        root.parent().unwrap().to_path_buf(),
        PathBuf::from("/"),
        PathBuf::from("/proc/x"),
        PathBuf::from("/etc/hub"),
    ]
    .iter()
    .enumerate()
    {
        let r = hub
            .post("/api/v1/repositories", create(&format!("o{i}"), p))
            .await;
        assert_error(&r, 400, "bad_request");
    }
    assert!(!out.path().join("repo").exists());
    // A symlink under the root, to outside or to inside: 400.
    symlink(out.path(), root.join("to-out")).unwrap();
    symlink(root.join("repos"), root.join("to-in")).unwrap();
    for (i, p) in [
        root.join("to-out"),
        root.join("to-out/new"),
        root.join("to-in/b"),
    ]
    .iter()
    .enumerate()
    {
        let r = hub
            .post("/api/v1/repositories", create(&format!("l{i}"), p))
            .await;
        assert_error(&r, 400, "bad_request");
    }
    assert_eq!(listing(out.path()), ["precious.qcow2"]);
    assert!(!root.join("repos/b").exists());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_from_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for d in [&a, &b, &c] {
        std::fs::create_dir(d).unwrap();
    }
    let data = dir.path().join("data");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--nbd-ports",
        "0",
        "--nbd-shared-port",
        "0",
    ];
    let roots = format!("{}:{}", a.display(), b.display());
    let d = DaemonProcess::start(&args, &[("HUB_REPOSITORY_ROOTS", roots.as_str())]);
    for (id, p, want) in [
        ("ra", a.join("r"), 201),
        ("rb", b.join("r"), 201),
        ("rc", c.join("r"), 400),
    ] {
        let body = json!({"id": id, "path": p.display().to_string()});
        let r = call(d.api, "POST", "/api/v1/repositories", Some(&body)).await;
        assert_eq!(r.status, want, "{p:?}: {}", r.text());
    }
    // The data directory is not a root once roots are configured.
    let body = json!({"id": "rd", "path": data.join("r2").display().to_string()});
    let r = call(d.api, "POST", "/api/v1/repositories", Some(&body)).await;
    assert_eq!(r.status, 400);
    assert_eq!(d.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_directory_symlinks_cannot_redirect_a_backup() {
    let mut hub = Hub::start().await;
    let repo = hub.repo();
    let (out, _) = outside();
    // <vm> is a symlink to a directory outside the repository.
    hub.register("vm1", &[MIB]).await;
    symlink(out.path(), repo.join("vm1")).unwrap();
    assert_error(&start_backup(&hub, "vm1").await, 422, "bad_image");
    // disk0 is a symlink to outside.
    hub.register("vm2", &[MIB, MIB]).await;
    std::fs::create_dir(repo.join("vm2")).unwrap();
    symlink(out.path(), repo.join("vm2/disk0")).unwrap();
    assert_error(&start_backup(&hub, "vm2").await, 422, "bad_image");
    // disk1 is a symlink (disk 0 is fine): all or nothing.
    hub.register("vm3", &[MIB, MIB]).await;
    std::fs::create_dir_all(repo.join("vm3")).unwrap();
    symlink(out.path(), repo.join("vm3/disk1")).unwrap();
    assert_error(&start_backup(&hub, "vm3").await, 422, "bad_image");
    assert!(listing(&repo.join("vm3/disk0")).is_empty());
    // Nothing was written outside; nothing is left running.
    assert_eq!(listing(out.path()), ["precious.qcow2"]);
    let list = hub.get("/api/v1/backups").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    // A clean VM still backs up.
    hub.register("vm4", &[MIB]).await;
    let b = hub.backup("vm4", "full").await;
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    hub.stop().await;
}

fn image(hub: &Hub, done: &Value, disk: usize) -> PathBuf {
    hub.repo()
        .join(done["disks"][disk]["file"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_file_symlinks_cannot_redirect_delete_or_restore() {
    let mut hub = Hub::start().await;
    let (out, precious) = outside();
    hub.register("vm", &[MIB]).await;

    // Restore of a top image replaced by a symlink: 422, nothing served.
    let b = hub.backup("vm", "full").await;
    let id1 = b["backup_id"].as_str().unwrap().to_owned();
    let done1 = hub.complete(&id1).await;
    let img1 = image(&hub, &done1, 0);
    let moved = hub.dir.path().join("moved.qcow2");
    std::fs::rename(&img1, &moved).unwrap();
    symlink(&moved, &img1).unwrap();
    let r = hub
        .post(&format!("/api/v1/backups/{id1}/restore"), Value::Null)
        .await;
    assert_error(&r, 422, "bad_image");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("symlink"));
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    // ... and an incremental does not build on it.
    let b = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm", "backup_type": "incremental", "repository_id": "default"}),
        )
        .await;
    assert_eq!(b.status, 201, "{}", b.text());
    let b = b.json();
    assert_eq!(b["disk_results"][0]["backup_mode"], "full", "{b}");
    let id2 = b["backup_id"].as_str().unwrap().to_owned();
    let done2 = hub.complete(&id2).await;

    // Deleting a backup whose image is a symlink to an outside file
    // removes the link only.
    std::fs::remove_file(&img1).unwrap();
    symlink(&precious, &img1).unwrap();
    let r = hub.delete(&format!("/api/v1/backups/{id1}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(std::fs::symlink_metadata(&img1).is_err(), "link removed");
    assert_eq!(std::fs::read(&precious).unwrap(), b"not yours");

    // Deleting through a disk directory replaced by a symlink to an
    // outside directory holding same-named files: refused, nothing lost.
    let img2 = image(&hub, &done2, 0);
    let disk_dir = img2.parent().unwrap().to_path_buf();
    let name = img2.file_name().unwrap();
    std::fs::write(out.path().join(name), b"also not yours").unwrap();
    let mut sidecar = name.to_owned();
    sidecar.push(".digest");
    std::fs::write(out.path().join(&sidecar), b"nor this").unwrap();
    let kept = hub.dir.path().join("kept-disk0");
    std::fs::rename(&disk_dir, &kept).unwrap();
    symlink(out.path(), &disk_dir).unwrap();
    let r = hub.delete(&format!("/api/v1/backups/{id2}")).await;
    assert_error(&r, 422, "bad_image");
    assert_eq!(
        listing(out.path()).len(),
        3,
        "files outside the repository were touched"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_sweep_removes_only_the_hubs_own_partials() {
    let mut hub = Hub::start().await;
    let repo = hub.repo();
    hub.stop().await;
    let (out, _) = outside();
    // The hub's own strays: removed.
    let disk = repo.join("vm1/disk0");
    std::fs::create_dir_all(&disk).unwrap();
    let own = [
        "backup-vm1-1700000000000-0001.qcow2.partial",
        "backup-vm1-1700000000000-0001.qcow2.digest.partial",
    ];
    for f in own {
        std::fs::write(disk.join(f), b"x").unwrap();
    }
    // Not the hub's: survive.
    std::fs::write(disk.join("notes.partial"), b"mine").unwrap();
    std::fs::write(
        repo.join("vm1/backup-vm1-1-2.qcow2.partial"),
        b"wrong place",
    )
    .unwrap();
    std::fs::write(out.path().join("x.partial"), b"outside").unwrap();
    std::fs::write(out.path().join("backup-evil-1-2.qcow2.partial"), b"outside").unwrap();
    // Reachable through symlinks: a <vm> link, a disk<N> link, a file link.
    std::fs::create_dir_all(out.path().join("disk0")).unwrap();
    std::fs::write(
        out.path().join("disk0/backup-evil-1-2.qcow2.partial"),
        b"outside",
    )
    .unwrap();
    symlink(out.path(), repo.join("evil")).unwrap();
    symlink(out.path(), repo.join("vm1/disk1")).unwrap();
    symlink(
        out.path().join("x.partial"),
        disk.join("backup-vm1-1-2.qcow2.partial"),
    )
    .unwrap();

    let Hub { dir, .. } = hub;
    let mut hub = Hub::start_in(dir, 8, 0, Duration::from_secs(3600)).await;
    let report = &hub.daemon.as_ref().unwrap().reconciled;
    assert_eq!(report.removed_partials, 2, "{report:?}");
    for f in own {
        assert!(!disk.join(f).exists(), "{f} survived");
    }
    assert_eq!(std::fs::read(disk.join("notes.partial")).unwrap(), b"mine");
    assert!(repo.join("vm1/backup-vm1-1-2.qcow2.partial").exists());
    // The planted file link is not a plain file: left alone (it is not
    // the hub's), and its target certainly is.
    assert!(std::fs::symlink_metadata(disk.join("backup-vm1-1-2.qcow2.partial")).is_ok());
    assert_eq!(
        listing(out.path()),
        [
            "backup-evil-1-2.qcow2.partial",
            "disk0",
            "precious.qcow2",
            "x.partial"
        ]
    );
    assert!(out
        .path()
        .join("disk0/backup-evil-1-2.qcow2.partial")
        .exists());
    hub.stop().await;
}
