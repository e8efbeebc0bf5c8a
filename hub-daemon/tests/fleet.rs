//! Several hubs, one fleet: two real `hub-daemon serve` processes on one
//! PostgreSQL database (`HUB_TEST_POSTGRES_URL`, see
//! tests/catalog/fixture.rs; skipped when unset, failed when
//! `NBD_INTEROP_REQUIRED=1`), each its own node with a 2 s heartbeat lease.
//! * what is registered through one is visible through the other, and
//!   both list the fleet;
//! * the same VM started on both at once: exactly one 201 and one 409;
//! * 20 VMs × 2 disks started alternately through both hubs, written with
//!   nbdcopy, completed, and `qemu-img compare`d with their sources;
//! * every request on a backup works through either hub: progress, live
//!   figures, complete, verify, restore (read back and compared), abort
//!   and delete (its files gone from the owner's repository) of B's
//!   backups through A; a request forwarded once is never forwarded again;
//! * a shared repository (one directory both nodes reach): VMs spread
//!   over the nodes, a chain stays on its node, and when that node dies
//!   the other continues the chain on its files and serves its restores;
//!   without the repository's mark (storage not mounted) a node refuses;
//! * with `--api-tls` the hubs forward to each other over HTTPS, trusting
//!   the fleet's CA;
//! * kill -9 of one hub during backups: the other reports them failed
//!   within the lease (plus one beat), and its own backup completes;
//!   nothing is forwarded to the dead node (503), a GET still answers.
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
    hub_with(dir, node, url, &[])
}

/// [`hub`] with more arguments.
fn hub_with(dir: &Path, node: &str, url: &str, more: &[&str]) -> DaemonProcess {
    let lease = LEASE_SECS.to_string();
    let mut args = vec!["--node-id", node, "--node-lease", &lease];
    args.extend_from_slice(more);
    DaemonProcess::start_in_with(&dir.join(node), &args, &[("HUB_CATALOG", url)])
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

/// `method path` sent to `api`, which must relay it to node `owner`:
/// the answer (status `want`) and its body.
async fn relayed(
    api: std::net::SocketAddr,
    owner: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    want: u16,
) -> integration_tests::http::Response {
    let r = call(api, method, path, body.as_ref()).await;
    assert_eq!(r.status, want, "{method} {path}: {}", r.text());
    assert_eq!(
        r.header("x-hub-node"),
        Some(owner),
        "{method} {path}: served by"
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backup_request_works_through_either_hub() {
    let Some((_f, url, dir)) = setup() else {
        return;
    };
    let a = hub(dir.path(), "node-a", &url);
    let b = hub(dir.path(), "node-b", &url);
    register(a.api, "far", 1, 4 * MIB).await;
    let on_b = start_body("far", "default-node-b");
    let b_files = || -> Vec<std::path::PathBuf> {
        common::files_under(&dir.path().join("node-b"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("/repository/"))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "qcow2" || e == "partial")
            })
            .collect()
    };

    // Started, fed and completed entirely through A; B runs it.
    let started = call_ok(a.api, "POST", "/api/v1/backups", Some(on_b.clone())).await;
    assert_eq!(started["node_id"], "node-b", "{started}");
    let id = started["backup_id"].as_str().unwrap().to_owned();
    let targets = parse_targets(started["nbd_targets_string"].as_str().unwrap());
    let data = support::disk_like(21, 4 * MIB as usize);
    let src = write_file(dir.path(), "far.raw", &data);
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &targets[0].1],
    )
    .await;
    let r = call(
        a.api,
        "POST",
        &format!("/api/v1/backups/{id}/progress"),
        Some(&json!({"disks": [{"disk_id": 0, "bytes_done": 4 * MIB, "bytes_total": 4 * MIB}]})),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        r.header("x-hub-node"),
        Some("node-b"),
        "served by the owner"
    );
    // A body over the API's limit is refused here, not relayed.
    let big = json!({"disks": [], "pad": "x".repeat(3 << 20)});
    let r = call(
        a.api,
        "POST",
        &format!("/api/v1/backups/{id}/progress"),
        Some(&big),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.header("x-hub-node"), Some("node-a"));
    // Live figures exist only on B: A's GET of a running backup shows them.
    let live = call_ok(a.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(
        live["disks"][0]["progress"]["bytes_done"],
        4 * MIB,
        "{live}"
    );
    // (nbdcopy sends zero runs as WRITE_ZEROES: fewer bytes than the disk.)
    assert!(
        live["disks"][0]["bytes_written"].as_u64().unwrap() > 0,
        "{live}"
    );
    let done = relayed(
        a.api,
        "node-b",
        "POST",
        &format!("/api/v1/backups/{id}/complete"),
        Some(json!({"disks": [{"disk_id": 0, "change_id": "c0"}]})),
        200,
    )
    .await
    .json();
    assert_eq!(done["status"], "completed", "{done}");

    // Verified through A: B re-reads its chain.
    let path = format!("/api/v1/backups/{id}/verify");
    relayed(a.api, "node-b", "POST", &path, None, 202).await;
    let verified = eventually(60, || async {
        let v = call_ok(a.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
        (v["verify_status"] != "verifying" && !v["verify_status"].is_null()).then_some(v)
    })
    .await;
    assert_eq!(verified["verify_status"], "ok", "{verified}");

    // Restored through A: B serves it; read back, it is the source.
    let path = format!("/api/v1/backups/{id}/restore");
    let r = relayed(a.api, "node-b", "POST", &path, None, 201).await;
    let restore = parse_targets(r.json()["nbd_targets_string"].as_str().unwrap());
    let back = dir.path().join("far-back.raw");
    std::fs::write(&back, b"").unwrap();
    run_ok("nbdcopy", &[&restore[0].1, back.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(&back).unwrap(), data, "restored through A");
    relayed(a.api, "node-b", "DELETE", &path, None, 204).await;

    // One hop only: a request that says it was forwarded already, for a
    // backup this hub does not own, is refused, not sent on.
    let r = integration_tests::http::request(
        a.api,
        "DELETE",
        &format!("/api/v1/backups/{id}"),
        &[("X-Hub-Forwarded-By", "node-x")],
        b"",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("second time"), "{}", r.text());

    // Aborted through A: B closes the exports and removes the partial.
    let second = call_ok(
        a.api,
        "POST",
        "/api/v1/backups",
        Some(start_body("far", "default-node-b")),
    )
    .await;
    let id2 = second["backup_id"].as_str().unwrap();
    let aborted = relayed(
        a.api,
        "node-b",
        "POST",
        &format!("/api/v1/backups/{id2}/abort"),
        Some(json!({"reason": "through A"})),
        200,
    )
    .await
    .json();
    assert_eq!(aborted["status"], "failed", "{aborted}");
    assert!(b_files()
        .iter()
        .all(|p| !p.to_string_lossy().ends_with(".partial")));

    // Deleted through A: the image leaves B's repository too.
    assert_eq!(b_files().len(), 1, "{:?}", b_files());
    let path = format!("/api/v1/backups/{id}");
    relayed(a.api, "node-b", "DELETE", &path, None, 204).await;
    assert!(b_files().is_empty(), "{:?}", b_files());
    let r = call(b.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(a.terminate(), 0);
    assert_eq!(b.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_forward_to_each_other_over_https() {
    use axum::http::Method;
    use hub_daemon::cli::client::http::HubClient;
    let Some((_f, url, dir)) = setup() else {
        return;
    };
    // One CA for the fleet: each hub serves HTTPS with a certificate it
    // signed, and trusts it for the other hub.
    let creds = dir.path().join("creds");
    hub_daemon::tls::init(&creds, &[]).unwrap();
    let tls = ["--api-tls", "--tls-certificates", creds.to_str().unwrap()];
    let a = hub_with(dir.path(), "node-a", &url, &tls);
    let b = hub_with(dir.path(), "node-b", &url, &tls);
    let ca = creds.join("ca-cert.pem");
    let client = HubClient::new(&format!("https://{}", a.api), Some(&ca), None, None).unwrap();
    let call = |method: Method, path: String, body: Option<Value>| {
        let client = &client;
        async move {
            let bytes = client.call(method, &path, body.as_ref()).await.unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
        }
    };
    let disks = json!([{"disk_id": 0, "size_bytes": MIB, "unit_number": 0}]);
    call(
        Method::PUT,
        "/api/v1/vms/tls-vm".into(),
        Some(json!({"vm_context_id": "ctx", "disks": disks})),
    )
    .await;
    let nodes = call(Method::GET, "/api/v1/nodes".into(), None).await;
    assert_eq!(nodes[1]["api_url"], format!("https://{}", b.api), "{nodes}");
    // Through A over HTTPS, to B over HTTPS, and back.
    let started = call(
        Method::POST,
        "/api/v1/backups".into(),
        Some(start_body("tls-vm", "default-node-b")),
    )
    .await;
    assert_eq!(started["node_id"], "node-b", "{started}");
    let id = started["backup_id"].as_str().unwrap();
    let aborted = call(
        Method::POST,
        format!("/api/v1/backups/{id}/abort"),
        Some(json!({"reason": "over https"})),
    )
    .await;
    assert_eq!(aborted["status"], "failed", "{aborted}");
    assert_eq!(aborted["error"], "over https", "{aborted}");
    assert_eq!(a.terminate(), 0);
    assert_eq!(b.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_repository_spreads_vms_and_outlives_a_node() {
    let Some((_f, url, dir)) = setup() else {
        return;
    };
    // Storage both nodes mount at one path: here, one directory.
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let root = ["--repository-root", mount.to_str().unwrap()];
    let a = hub_with(dir.path(), "node-a", &url, &root);
    let b = hub_with(dir.path(), "node-b", &url, &root);
    let repo = call_ok(
        a.api,
        "POST",
        "/api/v1/repositories",
        Some(json!({"id": "sh", "path": mount.join("repo").to_str().unwrap(), "shared": true})),
    )
    .await;
    assert_eq!(repo["shared"], true, "{repo}");
    let marker = Path::new(repo["path"].as_str().unwrap()).join(".hub-repository");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "sh\n");
    for vm in ["s1", "s2", "s3"] {
        register(a.api, vm, 1, 2 * MIB).await;
    }
    let start =
        |vm: &str, kind: &str| json!({"vm_name": vm, "backup_type": kind, "repository_id": "sh"});
    let write = |uri: String, data: Vec<u8>, name: &str| {
        let src = write_file(dir.path(), name, &data);
        async move { run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await }
    };
    let target = |b: &Value| {
        parse_targets(b["nbd_targets_string"].as_str().unwrap())[0]
            .1
            .clone()
    };

    // Two VMs at once spread over both nodes, wherever they are started.
    let s1 = call_ok(b.api, "POST", "/api/v1/backups", Some(start("s1", "full"))).await;
    let s2 = call_ok(b.api, "POST", "/api/v1/backups", Some(start("s2", "full"))).await;
    let (n1, n2) = (
        s1["node_id"].as_str().unwrap().to_owned(),
        s2["node_id"].as_str().unwrap().to_owned(),
    );
    assert_ne!(n1, n2, "the second VM goes to the idle node");
    let data1 = support::disk_like(31, 2 * MIB as usize);
    write(target(&s1), data1.clone(), "s1.raw").await;
    write(
        target(&s2),
        support::disk_like(32, 2 * MIB as usize),
        "s2.raw",
    )
    .await;
    for (b, c) in [(&s1, "c1"), (&s2, "c2")] {
        let id = b["backup_id"].as_str().unwrap();
        call_ok(
            a.api,
            "POST",
            &format!("/api/v1/backups/{id}/complete"),
            Some(json!({"disks": [{"disk_id": 0, "change_id": c}]})),
        )
        .await;
    }

    // A chain stays on its node while that node lives, busy or not: s3
    // lands somewhere, and the VM whose chain is there follows it.
    let s3 = call_ok(a.api, "POST", "/api/v1/backups", Some(start("s3", "full"))).await;
    let busy = s3["node_id"].as_str().unwrap().to_owned();
    let homed = if busy == n1 { "s1" } else { "s2" };
    let inc = call_ok(
        b.api,
        "POST",
        "/api/v1/backups",
        Some(start(homed, "incremental")),
    )
    .await;
    assert_eq!(inc["node_id"], busy.as_str(), "{inc}");
    for x in [&s3, &inc] {
        let id = x["backup_id"].as_str().unwrap();
        call_ok(a.api, "POST", &format!("/api/v1/backups/{id}/abort"), None).await;
    }

    // The node of s1's chain dies: s1's next incremental runs on the
    // other, on top of the dead node's full (the files are shared).
    let (dead, alive, alive_id) = if n1 == "node-a" {
        (a, b, n2)
    } else {
        (b, a, n2)
    };
    dead.kill9();
    eventually(LEASE_SECS * 5, || async {
        let nodes = call_ok(alive.api, "GET", "/api/v1/nodes", None).await;
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == n1.as_str() && n["lease"] == "expired")
            .then_some(())
    })
    .await;
    let inc = call_ok(
        alive.api,
        "POST",
        "/api/v1/backups",
        Some(start("s1", "incremental")),
    )
    .await;
    assert_eq!(inc["node_id"], alive_id.as_str(), "{inc}");
    assert_eq!(
        inc["disk_results"][0]["backup_mode"], "incremental",
        "{inc}"
    );
    assert_eq!(
        inc["disk_results"][0]["parent_backup_id"], s1["backup_id"],
        "{inc}"
    );
    let mut data1b = data1.clone();
    data1b[..65536].fill(0xA5);
    write(target(&inc), data1b.clone(), "s1b.raw").await;
    let id = inc["backup_id"].as_str().unwrap();
    let done = call_ok(
        alive.api,
        "POST",
        &format!("/api/v1/backups/{id}/complete"),
        Some(json!({"disks": [{"disk_id": 0, "change_id": "c1b"}]})),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    // Restored by the survivor (the dead node's full is the base).
    let r = call_ok(
        alive.api,
        "POST",
        &format!("/api/v1/backups/{id}/restore"),
        None,
    )
    .await;
    let back = dir.path().join("s1-back.raw");
    std::fs::write(&back, b"").unwrap();
    run_ok("nbdcopy", &[&target(&r), back.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(&back).unwrap(), data1b);
    call_ok(
        alive.api,
        "DELETE",
        &format!("/api/v1/backups/{id}/restore"),
        None,
    )
    .await;
    // The dead node's own restore point is served by the survivor too.
    let full = s1["backup_id"].as_str().unwrap();
    let r = call(
        alive.api,
        "POST",
        &format!("/api/v1/backups/{full}/restore"),
        None,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("x-hub-node"), Some(alive_id.as_str()));
    call_ok(
        alive.api,
        "DELETE",
        &format!("/api/v1/backups/{full}/restore"),
        None,
    )
    .await;

    // Storage not mounted (no mark): the node refuses to write there.
    std::fs::remove_file(&marker).unwrap();
    let r = call(
        alive.api,
        "POST",
        "/api/v1/backups",
        Some(&start("s2", "full")),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("mounted"), "{}", r.text());
    assert_eq!(alive.terminate(), 0);
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
    // Nor a delete of its backup (its files are there): 503, kept.
    let gone = &doomed[0];
    let r = call(a.api, "DELETE", &format!("/api/v1/backups/{gone}"), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("lease"), "{}", r.text());

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
