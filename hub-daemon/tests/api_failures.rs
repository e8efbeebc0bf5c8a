//! Failure paths of the API: every one leaves nothing behind (no port, no
//! export, no file, no running catalog row) and answers with the one error
//! shape and the status the architecture names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::hub::{eventually, parse_targets, Hub};
use integration_tests::http::raw;
use integration_tests::support::{require, run_ok};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

fn assert_error(r: &integration_tests::http::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    assert_eq!(j["error"]["status"], status, "{j}");
    assert_eq!(j["error"]["code"], code, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{j}"
    );
}

async fn assert_nothing_left(hub: &Hub, vm: &str) {
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0, "ports leaked");
    assert_eq!(
        hub.metric("hub_nbd_exports{kind=\"backup\"}").await,
        0,
        "exports leaked"
    );
    let running = hub
        .get(&format!("/api/v1/backups?vm_name={vm}&status=running"))
        .await
        .json();
    assert_eq!(
        running.as_array().unwrap().len(),
        0,
        "running rows leaked: {running}"
    );
    let files = files_under(&hub.repo().join(vm));
    assert!(
        files.iter().all(|f| !f.ends_with(".partial")),
        "partial files leaked: {files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_with_the_error_shape() {
    let mut hub = Hub::start().await;
    hub.register("vm", &[MIB]).await;
    // Malformed JSON, wrong types, unknown fields, missing fields.
    let r = raw(hub.addr, "POST", "/api/v1/backups", b"{\"vm_name\": ").await;
    assert_error(&r, 400, "bad_request");
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm", "backup_type": "weekly", "repository_id": "default"}),
        )
        .await;
    assert_error(&r, 400, "bad_request");
    let r = hub.post("/api/v1/backups", json!({"vm_name": "vm", "backup_type": "full", "repository_id": "default", "disk_id": 0})).await;
    assert_error(&r, 400, "bad_request");
    let r = hub.post("/api/v1/backups", json!({"vm_name": "vm"})).await;
    assert_error(&r, 400, "bad_request");
    // Names that could reach the filesystem.
    for bad in ["../etc", "..", ".hidden", "a b", "x/y"] {
        let r = hub
            .post(
                "/api/v1/backups",
                json!({"vm_name": bad, "backup_type": "full", "repository_id": "default"}),
            )
            .await;
        assert_error(&r, 400, "bad_request");
        let r = hub
            .post(
                "/api/v1/backups",
                json!({"vm_name": "vm", "backup_type": "full", "repository_id": bad}),
            )
            .await;
        assert_error(&r, 400, "bad_request");
    }
    let r = hub
        .put(
            "/api/v1/vms/..%2F..%2Fetc",
            json!({"vm_context_id": "c", "disks": []}),
        )
        .await;
    assert_error(&r, 400, "bad_request");
    let r = hub
        .put(
            "/api/v1/vms/ok",
            json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 1000}]}),
        )
        .await;
    assert_error(&r, 400, "bad_request");
    let r = hub.put("/api/v1/vms/ok", json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 512}, {"disk_id": 0, "size_bytes": 512}]})).await;
    assert_error(&r, 400, "bad_request");
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": "r1", "path": "relative/dir"}),
        )
        .await;
    assert_error(&r, 400, "bad_request");
    let r = hub.get("/api/v1/backups?status=weird").await;
    assert_error(&r, 400, "bad_request");
    let r = hub
        .get(&format!("/api/v1/backups/{}", "x".repeat(300)))
        .await;
    assert_error(&r, 400, "bad_request");
    // Unknown routes and methods keep the shape too.
    assert_error(&hub.get("/api/v1/nope").await, 404, "not_found");
    assert_error(
        &hub.delete("/api/v1/repositories").await,
        405,
        "method_not_allowed",
    );
    assert_nothing_left(&hub, "vm").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vm_repository_and_backup_are_404() {
    let mut hub = Hub::start().await;
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "ghost", "backup_type": "full", "repository_id": "default"}),
        )
        .await;
    assert_error(&r, 404, "not_found");
    hub.register("vm", &[MIB]).await;
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm", "backup_type": "full", "repository_id": "nowhere"}),
        )
        .await;
    assert_error(&r, 404, "not_found");
    for path in ["/api/v1/backups/backup-x", "/api/v1/vms/ghost"] {
        assert_error(&hub.get(path).await, 404, "not_found");
    }
    assert_error(
        &hub.post("/api/v1/backups/backup-x/complete", Value::Null)
            .await,
        404,
        "not_found",
    );
    assert_error(
        &hub.post("/api/v1/backups/backup-x/abort", Value::Null)
            .await,
        404,
        "not_found",
    );
    assert_error(
        &hub.delete("/api/v1/backups/backup-x/restore").await,
        404,
        "not_found",
    );
    assert_nothing_left(&hub, "vm").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_backup_of_a_running_vm_is_409() {
    let mut hub = Hub::start().await;
    hub.register("vm", &[MIB, MIB]).await;
    let b = hub.backup("vm", "full").await;
    let id = b["backup_id"].as_str().unwrap();
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm", "backup_type": "full", "repository_id": "default"}),
        )
        .await;
    assert_error(&r, 409, "conflict");
    // Re-registering or deleting the VM while it is backed up is refused too.
    let r = hub
        .put(
            "/api/v1/vms/vm",
            json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 512}]}),
        )
        .await;
    assert_error(&r, 409, "conflict");
    assert_error(&hub.delete("/api/v1/vms/vm").await, 409, "conflict");
    assert_error(
        &hub.delete(&format!("/api/v1/backups/{id}")).await,
        409,
        "conflict",
    );
    assert_error(
        &hub.post(&format!("/api/v1/backups/{id}/restore"), Value::Null)
            .await,
        409,
        "conflict",
    );
    hub.complete(id).await;
    // Finishing twice is a conflict, not a crash.
    assert_error(
        &hub.post(&format!("/api/v1/backups/{id}/complete"), Value::Null)
            .await,
        409,
        "conflict",
    );
    assert_error(
        &hub.post(&format!("/api/v1/backups/{id}/abort"), Value::Null)
            .await,
        409,
        "conflict",
    );
    assert_eq!(hub.delete("/api/v1/vms/vm").await.status, 204);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_part_way_removes_everything() {
    if !require("qemu-io") {
        return;
    }
    let mut hub = Hub::start().await;
    hub.register("vm", &[8 * MIB, 8 * MIB]).await;
    let b = hub.backup("vm", "full").await;
    let id = b["backup_id"].as_str().unwrap();
    let targets = parse_targets(b["nbd_targets_string"].as_str().unwrap());
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 1M", &targets[0].1],
    )
    .await;
    let r = hub
        .post(
            &format!("/api/v1/backups/{id}/abort"),
            json!({"reason": "snapshot removed by the SNA"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], "failed");
    assert_eq!(j["error"], "snapshot removed by the SNA");
    assert_eq!(j["disks"][0]["bytes_written"], MIB);
    assert!(
        files_under(&hub.repo()).is_empty(),
        "partial images deleted: {:?}",
        files_under(&hub.repo())
    );
    assert_nothing_left(&hub, "vm").await;
    for (_, uri) in &targets {
        integration_tests::support::assert_export_gone(uri).await;
    }
    // The VM can be backed up again right away.
    let b = hub.backup("vm", "full").await;
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_port_range_is_503_and_leaks_nothing() {
    let mut hub = Hub::start_with(4, 0, Duration::from_secs(3600)).await;
    hub.register("small", &[MIB, MIB, MIB]).await;
    hub.register("big", &[MIB, MIB]).await;
    let b = hub.backup("small", "full").await;
    // 3 of 4 ports held: a 2-disk VM cannot get its ports.
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "big", "backup_type": "full", "repository_id": "default"}),
        )
        .await;
    assert_error(&r, 503, "unavailable");
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 3);
    let all = hub.get("/api/v1/backups?vm_name=big").await.json();
    assert_eq!(
        all.as_array().unwrap().len(),
        0,
        "no catalog row for a backup that never started"
    );
    assert!(files_under(&hub.repo().join("big")).is_empty());
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    // With the ports back, it works.
    let b = hub.backup("big", "full").await;
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    assert_nothing_left(&hub, "big").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backup_fails_by_itself() {
    let mut hub = Hub::start_with(8, 0, Duration::from_secs(1)).await;
    hub.register("vm", &[MIB]).await;
    let b = hub.backup("vm", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let rec = eventually(30, || {
        let (addr, id) = (hub.addr, id.clone());
        async move {
            let j =
                integration_tests::http::call(addr, "GET", &format!("/api/v1/backups/{id}"), None)
                    .await
                    .json();
            (j["status"] == "failed").then_some(j)
        }
    })
    .await;
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("no NBD client activity"),
        "{rec}"
    );
    assert_nothing_left(&hub, "vm").await;
    assert!(files_under(&hub.repo()).is_empty());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_can_be_added_and_used() {
    let mut hub = Hub::start().await;
    let other = hub.dir.path().join("second-repo");
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": "r2", "path": other.display().to_string()}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": "r2", "path": other.display().to_string()}),
        )
        .await;
    assert_error(&r, 409, "conflict");
    let list = hub.get("/api/v1/repositories").await.json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["default", "r2"]);
    hub.register("vm", &[MIB]).await;
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": "vm", "backup_type": "full", "repository_id": "r2"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let b = r.json();
    assert!(b["disk_results"][0]["qcow2_path"]
        .as_str()
        .unwrap()
        .starts_with(other.canonicalize().unwrap().to_str().unwrap()));
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    assert_eq!(hub.get("/healthz").await.json()["status"], "ok");
    hub.stop().await;
}
