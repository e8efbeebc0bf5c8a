//! Failure paths of the API: every one leaves nothing behind (no port, no
//! export, no file, no running catalog row) and answers with the one error
//! shape and the status the architecture names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::hub::{eventually, parse_targets, Hub};
use common::tmpfs::Tmpfs;
use integration_tests::http::{raw, request};
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

// ------------------------------------------------------------------ integrity: client mistakes

/// The largest disk a backup can create (64 KiB clusters, 32 MiB L1 table).
const MAX_DISK: u64 = 1 << 51;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_repository_paths_are_400() {
    let mut hub = Hub::start().await;
    let base = hub.dir.path().canonicalize().unwrap();
    let file = base.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let to_proc = base.join("to-proc");
    std::os::unix::fs::symlink("/proc", &to_proc).unwrap();
    let bad: Vec<String> = vec![
        file.display().to_string(),
        file.join("below").display().to_string(),
        format!("{}/with\0nul", base.display()),
        format!("{}/{}", base.display(), "x".repeat(256)),
        format!("{}{}", base.display(), "/abcdefgh".repeat(520)),
        format!("{}/../../etc", base.display()),
        "/".into(),
        "/proc/self".into(),
        "/proc".into(),
        "/sys/hub".into(),
        "/dev/shm/hub".into(),
        "/etc/hub".into(),
        "/boot/hub".into(),
        "/run/hub".into(),
        "/usr/local/hub".into(),
        "/bin/hub".into(),
        "/sbin/hub".into(),
        "/lib/hub".into(),
        "/lib64/hub".into(),
        to_proc.join("hub").display().to_string(),
        "relative".into(),
        String::new(),
    ];
    for (i, path) in bad.iter().enumerate() {
        let r = hub
            .post(
                "/api/v1/repositories",
                json!({"id": format!("r{i}"), "path": path}),
            )
            .await;
        assert_error(&r, 400, "bad_request");
    }
    assert!(!Path::new("/etc/hub").exists());
    let list = hub.get("/api/v1/repositories").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // Wrong types in the body are a 400 as well.
    let r = hub
        .post("/api/v1/repositories", json!({"id": "r", "path": 7}))
        .await;
    assert_error(&r, 400, "bad_request");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_sizes_are_refused_at_put_unless_a_backup_can_create_them() {
    let mut hub = Hub::start().await;
    for size in [MAX_DISK + 512, 1 << 52, 1 << 56, u64::MAX - 511] {
        let r = hub
            .put(
                "/api/v1/vms/vm",
                json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": size}]}),
            )
            .await;
        assert_error(&r, 400, "bad_request");
    }
    // Negative, fractional or beyond u64: still the error shape.
    for size in [json!(-512), json!(512.5), json!(1e30), json!("512")] {
        let r = hub
            .put(
                "/api/v1/vms/vm",
                json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": size}]}),
            )
            .await;
        assert_error(&r, 400, "bad_request");
    }
    let r = raw(
        hub.addr,
        "PUT",
        "/api/v1/vms/vm",
        br#"{"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 123456789012345678901234567890}]}"#,
    )
    .await;
    assert_error(&r, 400, "bad_request");
    // The largest accepted size really backs up.
    hub.register("vm", &[MAX_DISK]).await;
    let b = hub.backup("vm", "full").await;
    let id = b["backup_id"].as_str().unwrap();
    let r = hub
        .post(&format!("/api/v1/backups/{id}/abort"), Value::Null)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_nothing_left(&hub, "vm").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_number_never_wraps_the_disk_key() {
    let mut hub = Hub::start().await;
    for unit in [u32::MAX, u32::MAX - 1999] {
        let r = hub
            .put(
                "/api/v1/vms/vm",
                json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 512, "unit_number": unit}]}),
            )
            .await;
        assert_error(&r, 400, "bad_request");
    }
    let r = hub
        .put(
            "/api/v1/vms/vm",
            json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 512, "unit_number": u32::MAX - 2000}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["disks"][0]["disk_key"], u32::MAX);
    // An explicit key with any unit number is fine.
    let r = hub
        .put(
            "/api/v1/vms/vm",
            json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 512, "unit_number": u32::MAX, "disk_key": 2000}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = hub.backup("vm", "full").await;
    assert!(b["nbd_targets_string"]
        .as_str()
        .unwrap()
        .starts_with("2000:"));
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413() {
    let mut hub = Hub::start().await;
    let limit = 2 << 20;
    // Valid JSON padded past the limit: the size decides, not the content.
    let mut body = br#"{"vm_context_id": "c", "disks": [], "x": ""#.to_vec();
    body.resize(limit + 1, b' ');
    for (method, path) in [
        ("PUT", "/api/v1/vms/vm"),
        ("POST", "/api/v1/backups"),
        ("POST", "/api/v1/repositories"),
        ("POST", "/api/v1/backups/b1/complete"),
        ("POST", "/api/v1/backups/b1/abort"),
    ] {
        let r = raw(hub.addr, method, path, &body).await;
        assert_error(&r, 413, "payload_too_large");
    }
    // Just under the limit it is read (and refused for what it says).
    let r = raw(hub.addr, "PUT", "/api/v1/vms/vm", &body[..limit]).await;
    assert_error(&r, 400, "bad_request");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_uris_are_414() {
    let mut hub = Hub::start().await;
    for path in [
        format!("/api/v1/vms/{}", "a".repeat(9 << 10)),
        format!("/api/v1/backups?vm_name={}", "a".repeat(9 << 10)),
        format!("/{}", "x".repeat(60 << 10)),
    ] {
        let r = hub.get(&path).await;
        assert_error(&r, 414, "uri_too_long");
    }
    // Right under our limit it is routed (and the name refused).
    let r = hub.get(&format!("/api/v1/vms/{}", "a".repeat(8000))).await;
    assert_error(&r, 400, "bad_request");
    // From 64 KiB on hyper's HTTP/1 parser answers 414 itself, before any
    // of our code runs, with an empty body: the one status without the
    // JSON shape (see api::URI_LIMIT). Pinned so a change is noticed.
    let r = hub.get(&format!("/{}", "x".repeat(64 << 10))).await;
    assert_eq!(r.status, 414);
    assert!(r.body.is_empty(), "{}", r.text());
    // Likewise more than 100 header fields: hyper's 431, empty body.
    let names: Vec<String> = (0..120).map(|i| format!("X-H{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = request(hub.addr, "GET", "/healthz", &headers, b"").await;
    assert_eq!(r.status, 431);
    assert!(r.body.is_empty(), "{}", r.text());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_query_content_type_and_path_mistakes_keep_the_shape() {
    let mut hub = Hub::start().await;
    hub.register("vm", &[MIB]).await;
    // 405 on every route, with methods axum does not know too.
    for (method, path) in [
        ("DELETE", "/api/v1/repositories"),
        ("POST", "/api/v1/vms/vm"),
        ("PATCH", "/api/v1/vms/vm"),
        ("PUT", "/api/v1/backups"),
        ("GET", "/api/v1/backups/b1/complete"),
        ("PUT", "/api/v1/backups/b1/restore"),
        ("POST", "/healthz"),
        ("POST", "/"),
        ("BREW", "/metrics"),
        ("OPTIONS", "/api/v1/vms"),
    ] {
        let r = raw(hub.addr, method, path, b"").await;
        assert_error(&r, 405, "method_not_allowed");
    }
    // 404 fallback, any method.
    for (method, path) in [
        ("GET", "/index.html"),
        ("GET", "/api/v1/vms/vm/disks"),
        ("POST", "/api/v2/backups"),
        ("DELETE", "/api/v1/backups/"),
        ("PUT", "/%FF%FE"),
    ] {
        let r = raw(hub.addr, method, path, b"").await;
        assert_error(&r, 404, "not_found");
    }
    // Bad query strings.
    for q in [
        "status=weird",
        "unknown=1",
        "vm_name=..%2Fetc",
        "vm_name=%FF",
        "vm_name=a&vm_name=b",
        "status",
        "vm_name=%",
    ] {
        let r = hub.get(&format!("/api/v1/backups?{q}")).await;
        assert_error(&r, 400, "bad_request");
    }
    // Bad JSON content: syntax, types, trailing garbage, not UTF-8.
    for body in [
        &b"{"[..],
        b"[]",
        b"null",
        b"\"vm\"",
        b"{\"vm_name\": \"vm\", \"backup_type\": \"full\", \"repository_id\": \"default\"} x",
        b"{\"vm_name\": 5, \"backup_type\": \"full\", \"repository_id\": \"default\"}",
        b"\xff\xfe{}",
    ] {
        let r = raw(hub.addr, "POST", "/api/v1/backups", body).await;
        assert_error(&r, 400, "bad_request");
    }
    let r = raw(
        hub.addr,
        "POST",
        "/api/v1/backups/b1/abort",
        b"{\"reason\": 5}",
    )
    .await;
    assert_error(&r, 400, "bad_request");
    // A body declared as something else than JSON is 415; no Content-Type
    // at all is accepted.
    let body = br#"{"vm_name": "vm", "backup_type": "full", "repository_id": "nowhere"}"#;
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = request(
            hub.addr,
            "POST",
            "/api/v1/backups",
            &[("Content-Type", ct)],
            body,
        )
        .await;
        assert_error(&r, 415, "unsupported_media_type");
    }
    let r = request(hub.addr, "POST", "/api/v1/backups", &[], body).await;
    assert_error(&r, 404, "not_found");
    let r = request(
        hub.addr,
        "POST",
        "/api/v1/backups",
        &[("Content-Type", "application/json; charset=utf-8")],
        body,
    )
    .await;
    assert_error(&r, 404, "not_found");
    // An empty complete/abort body needs no Content-Type.
    let r = request(
        hub.addr,
        "POST",
        "/api/v1/backups/b1/abort",
        &[("Content-Type", "text/plain")],
        b"",
    )
    .await;
    assert_error(&r, 404, "not_found");
    // Path parameters with odd characters.
    for p in [
        "/api/v1/vms/%FF",
        "/api/v1/vms/%00",
        "/api/v1/vms/a%2Fb",
        "/api/v1/vms/..",
        "/api/v1/vms/%2E%2E",
        "/api/v1/vms/%C3%A9",
        "/api/v1/vms/a%20b",
        "/api/v1/backups/%FF%FE",
    ] {
        let r = hub.get(p).await;
        assert_error(&r, 400, "bad_request");
    }
    for p in [
        "/api/v1/backups/%E2%80%AE/restore",
        "/api/v1/backups/%FF/complete",
        "/api/v1/backups/a%00b/abort",
    ] {
        let r = hub.post(p, Value::Null).await;
        assert_error(&r, 400, "bad_request");
    }
    assert_nothing_left(&hub, "vm").await;
    hub.stop().await;
}

// ------------------------------------------------------------------ full disks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_repository_disk_is_507_and_leaks_nothing() {
    let mut hub = Hub::start().await;
    let mnt = hub.dir.path().join("small-fs");
    let Some(fs) = Tmpfs::mount(&mnt, "2m") else {
        return;
    };
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": "small", "path": mnt.display().to_string()}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    hub.register("vm", &[MIB, MIB]).await;
    let filler = fs.fill();
    let start = json!({"vm_name": "vm", "backup_type": "full", "repository_id": "small"});
    let r = hub.post("/api/v1/backups", start.clone()).await;
    assert_error(&r, 507, "insufficient_storage");
    assert_nothing_left(&hub, "vm").await;
    assert_eq!(
        files_under(&mnt),
        vec![filler.display().to_string()],
        "only the filler is left"
    );
    let all = hub.get("/api/v1/backups?vm_name=vm").await.json();
    assert_eq!(all.as_array().unwrap().len(), 0, "{all}");
    // With space back, the same request works.
    std::fs::remove_file(&filler).unwrap();
    let r = hub.post("/api/v1/backups", start).await;
    assert_eq!(r.status, 201, "{}", r.text());
    hub.complete(r.json()["backup_id"].as_str().unwrap()).await;
    hub.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_catalog_disk_is_507() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(fs) = Tmpfs::mount(&data, "4m") else {
        return;
    };
    let mut hub = Hub::start_in(dir, 8, 0, Duration::from_secs(3600)).await;
    hub.register("before", &[MIB]).await;
    let filler = fs.fill();
    // Each PUT writes more catalog pages than the last; some write must
    // hit the full disk, and when it does it is a 507, never a 500.
    let mut refused = None;
    for i in 0..64 {
        let disks: Vec<Value> = (0..256)
            .map(|d| json!({"disk_id": d, "size_bytes": MIB, "unit_number": d, "label": format!("{i}-{}", "l".repeat(250))}))
            .collect();
        let r = hub
            .put(
                &format!("/api/v1/vms/vm{i}"),
                json!({"vm_context_id": "c", "disks": disks}),
            )
            .await;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the catalog never hit the full disk");
    assert_error(&r, 507, "insufficient_storage");
    // Reading still works; with space back, writing does too.
    assert_eq!(hub.get("/api/v1/vms/before").await.status, 200);
    std::fs::remove_file(&filler).unwrap();
    hub.register("after", &[MIB]).await;
    hub.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_at_complete_fails_the_backup_cleanly_with_422() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(fs) = Tmpfs::mount(&data, "8m") else {
        return;
    };
    let mut hub = Hub::start_in(dir, 8, 0, Duration::from_secs(3600)).await;
    hub.register("vm", &[MIB, MIB]).await;
    let b = hub.backup("vm", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let filler = fs.fill();
    let r = hub
        .post(&format!("/api/v1/backups/{id}/complete"), json!({}))
        .await;
    // A backup that cannot be completed is a failed backup (422, the
    // integrity rule), whatever the cause; the message names it.
    assert_error(&r, 422, "backup_failed");
    // Deleting the partial images frees enough to record the failure.
    let rec = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("no space"),
        "{rec}"
    );
    let left = files_under(&hub.repo());
    assert!(left.is_empty(), "{left:?}");
    assert_nothing_left(&hub, "vm").await;
    std::fs::remove_file(&filler).unwrap();
    let b = hub.backup("vm", "full").await;
    hub.complete(b["backup_id"].as_str().unwrap()).await;
    hub.stop().await;
    drop(fs);
}
