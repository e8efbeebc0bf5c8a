//! Several hubs, one fleet: two real `hub-daemon serve` processes on one
//! PostgreSQL database (`HUB_TEST_POSTGRES_URL`, see
//! tests/catalog/fixture.rs; skipped when unset, failed when
//! `NBD_INTEROP_REQUIRED=1`), each its own node with a 2 s heartbeat lease.
//! * what is registered through one is visible through the other, and
//!   both list the fleet;
//! * the same VM started on both at once: exactly one 201 and one 409;
//! * 20 VMs × 2 disks started alternately through both hubs, written with
//!   nbdcopy, completed, and `qemu-img compare`d with their sources;
//! * kill -9 of one hub during backups: the other reports them failed
//!   within the lease (plus one beat), and its own backup completes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog {
    pub mod fixture;
}
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use catalog::fixture::Fixture;
use common::hub::{eventually, parse_targets};
use common::{call_ok, DaemonProcess};
use hub_daemon::catalog::CatalogUrl;
use integration_tests::http::call;
use integration_tests::support::{self, require, run_ok, write_file};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Each hub's heartbeat lease in these tests (`--node-lease`).
const LEASE_SECS: u64 = 2;

/// A hub of the fleet: node `node`, its data under `dir/node`.
fn hub(dir: &Path, node: &str, url: &str) -> DaemonProcess {
    let data = dir.join(node);
    let lease = LEASE_SECS.to_string();
    DaemonProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--nbd-ports",
            "0",
            "--nbd-shared-port",
            "0",
            "--node-id",
            node,
            "--node-lease",
            &lease,
        ],
        &[("HUB_CATALOG", url)],
    )
}

/// A PostgreSQL database of its own, and a temporary directory; `None`
/// (skip) without a server or without the tools.
fn setup() -> Option<(Fixture, String, tempfile::TempDir)> {
    if !require("nbdcopy") || !require("qemu-img") {
        return None;
    }
    let f = Fixture::postgres()?;
    let CatalogUrl::Postgres(url) = &f.url else {
        unreachable!()
    };
    let url = url.clone();
    Some((f, url, tempfile::tempdir().unwrap()))
}

async fn register(api: std::net::SocketAddr, vm: &str, disks: u32, size: u64) {
    let disks: Vec<Value> = (0..disks)
        .map(|i| json!({"disk_id": i, "size_bytes": size, "unit_number": i}))
        .collect();
    call_ok(
        api,
        "PUT",
        &format!("/api/v1/vms/{vm}"),
        Some(json!({"vm_context_id": format!("ctx-{vm}"), "disks": disks})),
    )
    .await;
}

fn start_body(vm: &str, repo: &str) -> Value {
    json!({"vm_name": vm, "backup_type": "full", "repository_id": repo})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_one_catalog() {
    let Some((_f, url, dir)) = setup() else {
        return;
    };
    let a = hub(dir.path(), "node-a", &url);
    let b = hub(dir.path(), "node-b", &url);

    // Registered through A, visible through B.
    register(a.api, "shared", 1, 4 * MIB).await;
    let vm = call_ok(b.api, "GET", "/api/v1/vms/shared", None).await;
    assert_eq!(vm["vm_context_id"], "ctx-shared");

    // Both list the fleet, both alive, and each node's built-in repository.
    let nodes = call_ok(b.api, "GET", "/api/v1/nodes", None).await;
    let seen: Vec<(&str, &str)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node_id"].as_str().unwrap(), n["lease"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [("node-a", "alive"), ("node-b", "alive")]);
    assert_eq!(nodes[0]["api_url"], format!("http://{}", a.api));
    let repos = call_ok(a.api, "GET", "/api/v1/repositories", None).await;
    let repos: Vec<(&str, &str)> = repos
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["node_id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        repos,
        [("default-node-a", "node-a"), ("default-node-b", "node-b")]
    );

    // The same VM started on both at once: the database lets one run.
    let (on_a, on_b) = (
        start_body("shared", "default-node-a"),
        start_body("shared", "default-node-b"),
    );
    let (ra, rb) = tokio::join!(
        call(a.api, "POST", "/api/v1/backups", Some(&on_a)),
        call(b.api, "POST", "/api/v1/backups", Some(&on_b)),
    );
    let mut statuses = [ra.status, rb.status];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{} / {}", ra.text(), rb.text());
    let (winner, won) = if ra.status == 201 {
        (a.api, ra)
    } else {
        (b.api, rb)
    };
    let started = won.json();
    let id = started["backup_id"].as_str().unwrap();
    let node = if winner == a.api { "node-a" } else { "node-b" };
    assert_eq!(started["node_id"], node);
    // Both hubs show it running on its node; /metrics counts it there.
    for api in [a.api, b.api] {
        let rec = call_ok(api, "GET", &format!("/api/v1/backups/{id}"), None).await;
        assert_eq!(rec["status"], "running");
        assert_eq!(rec["node_id"], node);
        let m = integration_tests::http::call(api, "GET", "/metrics", None).await;
        let text = m.text();
        assert!(
            text.contains(&format!("hub_node_running_backups{{node=\"{node}\"}} 1")),
            "{text}"
        );
        assert!(text.contains("hub_node_up{node=\"node-a\"} 1"), "{text}");
        assert!(text.contains("hub_node_up{node=\"node-b\"} 1"), "{text}");
    }
    call_ok(
        winner,
        "POST",
        &format!("/api/v1/backups/{id}/abort"),
        Some(json!({"reason": "test"})),
    )
    .await;

    // Started through A for B's repository: A forwards, B runs it, and
    // the answer carries B's targets (written to, completed through B).
    let r = call(a.api, "POST", "/api/v1/backups", Some(&on_b)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let fwd = r.json();
    assert_eq!(fwd["node_id"], "node-b", "{fwd}");
    let id = fwd["backup_id"].as_str().unwrap();
    let targets = parse_targets(fwd["nbd_targets_string"].as_str().unwrap());
    let src = write_file(
        dir.path(),
        "fwd.raw",
        &support::disk_like(9, 4 * MIB as usize),
    );
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &targets[0].1],
    )
    .await;
    let done = call_ok(
        b.api,
        "POST",
        &format!("/api/v1/backups/{id}/complete"),
        Some(json!({"disks": [{"disk_id": 0, "change_id": "c0"}]})),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["node_id"], "node-b");
    assert_eq!(a.terminate(), 0);
    assert_eq!(b.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_alternately_through_both_hubs() {
    const VMS: usize = 20;
    let Some((_f, url, dir)) = setup() else {
        return;
    };
    let hubs = [
        (hub(dir.path(), "node-a", &url), "default-node-a"),
        (hub(dir.path(), "node-b", &url), "default-node-b"),
    ];
    let t0 = Instant::now();
    let mut started = Vec::new();
    for i in 0..VMS {
        let (h, repo) = &hubs[i % 2];
        let vm = format!("vm{i:02}");
        register(h.api, &vm, 2, MIB).await;
        let b = call_ok(
            h.api,
            "POST",
            "/api/v1/backups",
            Some(start_body(&vm, repo)),
        )
        .await;
        started.push((i, vm, b));
    }
    let mut sources = Vec::new();
    for (i, vm, b) in &started {
        let targets = parse_targets(b["nbd_targets_string"].as_str().unwrap());
        assert_eq!(targets.len(), 2);
        for (disk, (_, uri)) in targets.iter().enumerate() {
            let data = support::disk_like((i * 2 + disk) as u64, MIB as usize);
            let src = write_file(dir.path(), &format!("{vm}-{disk}.raw"), &data);
            run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), uri]).await;
            sources.push(src);
        }
        // Completed through the hub running it (the appliance talks to
        // the node whose targets it got).
        let (h, _) = &hubs[i % 2];
        let id = b["backup_id"].as_str().unwrap();
        call_ok(
            h.api,
            "POST",
            &format!("/api/v1/backups/{id}/complete"),
            Some(json!({"disks": [{"disk_id": 0, "change_id": "c0"}, {"disk_id": 1, "change_id": "c1"}]})),
        )
        .await;
    }
    let other = hubs[1].0.api;
    for (i, vm, b) in &started {
        let id = b["backup_id"].as_str().unwrap();
        let rec = call_ok(other, "GET", &format!("/api/v1/backups/{id}"), None).await;
        assert_eq!(rec["status"], "completed", "{rec}");
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        assert_eq!(rec["node_id"], node);
        let repo = call_ok(
            hubs[i % 2].0.api,
            "GET",
            &format!(
                "/api/v1/repositories/{}",
                rec["repository_id"].as_str().unwrap()
            ),
            None,
        )
        .await;
        for disk in 0..2usize {
            let file = rec["disks"][disk]["file"].as_str().unwrap();
            let image = Path::new(repo["path"].as_str().unwrap()).join(file);
            let src = dir.path().join(format!("{vm}-{disk}.raw"));
            support::assert_identical(
                "raw",
                src.to_str().unwrap(),
                "qcow2",
                image.to_str().unwrap(),
            )
            .await;
        }
    }
    eprintln!(
        "fleet: {VMS} VMs x 2 disks through two hubs in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for (h, _) in hubs {
        assert_eq!(h.terminate(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hubs_backups_fail_within_the_lease() {
    let Some((_f, url, dir)) = setup() else {
        return;
    };
    let a = hub(dir.path(), "node-a", &url);
    let b = hub(dir.path(), "node-b", &url);
    for vm in ["on-a", "on-b1", "on-b2"] {
        register(a.api, vm, 1, MIB).await;
    }
    let own = call_ok(
        a.api,
        "POST",
        "/api/v1/backups",
        Some(start_body("on-a", "default-node-a")),
    )
    .await;
    let mut doomed = Vec::new();
    for vm in ["on-b1", "on-b2"] {
        let r = call_ok(
            b.api,
            "POST",
            "/api/v1/backups",
            Some(start_body(vm, "default-node-b")),
        )
        .await;
        doomed.push(r["backup_id"].as_str().unwrap().to_owned());
    }
    b.kill9();
    let killed = Instant::now();
    for id in &doomed {
        let why = eventually(LEASE_SECS * 5, || async {
            let r = call_ok(a.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
            (r["status"] == "failed").then(|| r["error"].as_str().unwrap_or_default().to_owned())
        })
        .await;
        assert!(why.contains("node-b") && why.contains("lease"), "{why}");
    }
    // The lease, one beat of the reaper, and slack for a loaded machine.
    let took = killed.elapsed();
    let bound = Duration::from_secs(LEASE_SECS) + Duration::from_secs(LEASE_SECS) / 3;
    assert!(
        took <= bound + Duration::from_secs(2),
        "reaped after {took:?} (lease {LEASE_SECS} s)"
    );
    let nodes = call_ok(a.api, "GET", "/api/v1/nodes", None).await;
    assert_eq!(nodes[1]["node_id"], "node-b");
    assert_eq!(nodes[1]["lease"], "expired");
    assert_eq!(nodes[1]["running_backups"], 0);
    // Nothing is forwarded to a node without a lease: 503, error shape.
    let r = call(
        a.api,
        "POST",
        "/api/v1/backups",
        Some(&start_body("on-b1", "default-node-b")),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unavailable", "{}", r.text());

    // Nothing else is affected: A's own backup runs on and completes.
    let id = own["backup_id"].as_str().unwrap();
    let rec = call_ok(a.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(rec["status"], "running");
    let targets = parse_targets(own["nbd_targets_string"].as_str().unwrap());
    let src = write_file(dir.path(), "a.raw", &support::disk_like(3, MIB as usize));
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &targets[0].1],
    )
    .await;
    call_ok(
        a.api,
        "POST",
        &format!("/api/v1/backups/{id}/complete"),
        Some(json!({"disks": [{"disk_id": 0, "change_id": "c0"}]})),
    )
    .await;

    // B comes back: it renews its lease and reconciles its own files.
    let b = hub(dir.path(), "node-b", &url);
    let nodes = call_ok(a.api, "GET", "/api/v1/nodes", None).await;
    assert_eq!(nodes[1]["lease"], "alive");
    for id in &doomed {
        let r = call_ok(b.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
        assert_eq!(r["status"], "failed");
    }
    let partials = common::files_under(&dir.path().join("node-b"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".partial"))
        .count();
    assert_eq!(partials, 0, "the restarted node swept its partial images");
    assert_eq!(a.terminate(), 0);
    assert_eq!(b.terminate(), 0);
}
