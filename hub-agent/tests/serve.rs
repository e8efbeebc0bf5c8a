//! The appliance endpoints with a fake hub: prepare answers, start streams
//! and calls back complete (digest = the source's), incremental after
//! that, cancel, abort on a failing source, no state without complete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use disk_digest::algo::digest_of_bytes;
use hub_agent::serve::{serve, Agent, AgentConfig};
use hub_agent::source::SourceSpec;
use hub_agent::stream::StreamOptions;
use hub_agent::tracking;
use integration_tests::http::call_as;
use integration_tests::support::{write_file, TestServer};
use nbd_server::BlockBackend;
use serde_json::{json, Value};
use sna_contract::CONTRACT;
use tokio::sync::{mpsc, Semaphore};

const TOKEN: &str = "appliance-secret";

/// One callback the fake hub received.
#[derive(Debug, Clone)]
struct Call {
    backup: String,
    what: String,
    auth: String,
    body: Value,
}

#[derive(Debug, Clone)]
struct Hub {
    calls: Arc<Mutex<Vec<Call>>>,
    tx: mpsc::UnboundedSender<Call>,
    /// Status answered to complete.
    complete_status: Arc<AtomicU16>,
    /// Complete is answered only once a permit is here (tests that hold
    /// the answer back add none at first).
    complete_gate: Arc<Semaphore>,
}

async fn record(
    State(h): State<Hub>,
    Path((backup, what)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let c = Call {
        backup,
        what: what.clone(),
        auth,
        body,
    };
    h.calls.lock().unwrap().push(c.clone());
    let _ = h.tx.send(c);
    if what == "complete" {
        if let Ok(p) = h.complete_gate.acquire().await {
            p.forget();
        }
        StatusCode::from_u16(h.complete_status.load(Ordering::Relaxed)).unwrap()
    } else {
        StatusCode::OK
    }
}

/// A fake hub on port 0; returns its address and the callback channel.
async fn fake_hub() -> (Hub, SocketAddr, mpsc::UnboundedReceiver<Call>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let hub = Hub {
        calls: Arc::default(),
        tx,
        complete_status: Arc::new(AtomicU16::new(200)),
        complete_gate: Arc::new(Semaphore::new(1000)),
    };
    let app = Router::new()
        .route("/api/v1/backups/{backup}/{what}", post(record))
        .with_state(hub.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (hub, addr, rx)
}

/// The next callback that is not progress.
async fn next_final(rx: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    loop {
        let c = rx.recv().await.unwrap();
        if c.what != "progress" {
            return c;
        }
    }
}

struct Appliance {
    agent: Arc<Agent>,
    addr: SocketAddr,
    state_dir: tempfile::TempDir,
}

async fn appliance(sources: Vec<(&str, u32, SourceSpec)>) -> Appliance {
    let state_dir = tempfile::tempdir().unwrap();
    let sources: BTreeMap<(String, u32), SourceSpec> = sources
        .into_iter()
        .map(|(vm, k, s)| ((vm.to_owned(), k), s))
        .collect();
    let agent = Agent::new(AgentConfig {
        state_dir: state_dir.path().to_owned(),
        token: Some(TOKEN.into()),
        sources,
        stream: StreamOptions {
            chunk: 1 << 20,
            in_flight: 3,
            max_write: 1 << 20,
            tls: None,
            ..Default::default()
        },
        // Tests wait for reports as events; no need to wait a second.
        progress_every: std::time::Duration::from_millis(10),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, Arc::clone(&agent), std::future::pending()));
    Appliance {
        agent,
        addr,
        state_dir,
    }
}

impl Appliance {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = call_as(self.addr, Some(TOKEN), "POST", path, Some(body)).await;
        (r.status, r.json())
    }
}

fn prepare_body(vm: &str, disks: Value) -> Value {
    json!({
        "contract": CONTRACT, "backup_id": "b1", "vm_name": vm, "vm_context_id": "vm-42",
        "backup_type": "incremental", "disks": disks,
    })
}

/// (disk_id, disk_key, size, mode, parent_change_id, nbd_uri)
type T<'a> = (u32, u32, u64, &'a str, Option<&'a str>, String);

fn start_body(backup: &str, hub: SocketAddr, targets: Vec<T<'_>>) -> Value {
    let ts: Vec<Value> = targets
        .iter()
        .map(|(id, key, size, mode, parent, uri)| {
            json!({"disk_id": id, "disk_key": key, "size_bytes": size, "mode": mode,
                   "parent_change_id": parent, "nbd_uri": uri})
        })
        .collect();
    let ts_string = targets
        .iter()
        .map(|t| format!("{}:{}", t.1, t.5))
        .collect::<Vec<_>>()
        .join(",");
    json!({
        "contract": CONTRACT, "backup_id": backup, "vm_name": "vm1", "vm_context_id": "vm-42",
        "backup_type": "full", "nbd_targets_string": ts_string, "targets": ts,
        "callback": {"url": format!("http://{hub}/api/v1/backups/{backup}"), "token": format!("cb-{backup}")},
    })
}

#[tokio::test]
async fn prepare_answers_per_disk_and_refuses_what_it_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "a.raw", &[1u8; 4096]);
    let app = appliance(vec![
        ("vm1", 2000, SourceSpec::Path(p.clone())),
        ("vm1", 2001, SourceSpec::Path(p)),
    ])
    .await;
    let st = tracking::DiskState {
        change_id: "ha-known".into(),
        size: 4096,
        leaves: vec![disk_digest::algo::leaf(&[1u8; 4096])],
    };
    tracking::commit(app.state_dir.path(), "vm1/2000", &st).unwrap();

    let disks = json!([
        {"disk_id": 0, "disk_key": 2000, "size_bytes": 4096, "mode": "incremental", "parent_change_id": "ha-known"},
        {"disk_id": 1, "disk_key": 2001, "size_bytes": 4096, "mode": "incremental", "parent_change_id": "ha-other"},
    ]);
    let (s, v) = app
        .post("/v1/backups/prepare", &prepare_body("vm1", disks))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["disks"][0],
        json!({"disk_key": 2000, "mode": "incremental", "reason": null})
    );
    assert_eq!(v["disks"][1]["mode"], "full");
    let why = v["disks"][1]["reason"].as_str().unwrap();
    assert!(
        why.contains("change tracking has no state for change id ha-other"),
        "{why}"
    );

    // Offered full: full, whatever the state. Known id but another size: full.
    let disks = json!([
        {"disk_id": 0, "disk_key": 2000, "size_bytes": 4096, "mode": "full"},
        {"disk_id": 1, "disk_key": 2001, "size_bytes": 8192, "mode": "incremental", "parent_change_id": "ha-known"},
    ]);
    let (_, v) = app
        .post("/v1/backups/prepare", &prepare_body("vm1", disks))
        .await;
    assert_eq!(v["disks"][0]["mode"], "full");
    assert_eq!(v["disks"][1]["mode"], "full");

    let d = json!([{"disk_id": 0, "disk_key": 2000, "size_bytes": 4096, "mode": "full"}]);
    let (s, v) = app
        .post("/v1/backups/prepare", &prepare_body("vm9", d))
        .await;
    assert_eq!(s, 404);
    assert!(
        v["message"].as_str().unwrap().contains("no VM \"vm9\""),
        "{v}"
    );
    let d = json!([{"disk_id": 0, "disk_key": 2005, "size_bytes": 4096, "mode": "full"}]);
    let (s, v) = app
        .post("/v1/backups/prepare", &prepare_body("vm1", d.clone()))
        .await;
    assert_eq!(s, 404);
    assert!(v["message"].as_str().unwrap().contains("2005"), "{v}");

    let mut bad = prepare_body("vm1", d.clone());
    bad["contract"] = json!("nbd-backup-hub/sna/v9");
    assert_eq!(app.post("/v1/backups/prepare", &bad).await.0, 400);
    let r = call_as(
        app.addr,
        Some("wrong"),
        "POST",
        "/v1/backups/prepare",
        Some(&prepare_body("vm1", d.clone())),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call_as(
        app.addr,
        None,
        "POST",
        "/v1/backups/prepare",
        Some(&prepare_body("vm1", d)),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.json()["message"].is_string());
}

#[tokio::test]
async fn start_streams_every_disk_completes_with_digests_then_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = disk(11, 6 << 20);
    let b = disk(12, (3 << 20) + 4096);
    let pa = write_file(dir.path(), "a.raw", &a);
    let pb = write_file(dir.path(), "b.raw", &b);
    let (hub, hub_addr, mut rx) = fake_hub().await;
    let app = appliance(vec![
        ("vm1", 2000, SourceSpec::Path(pa.clone())),
        ("vm1", 2001, SourceSpec::Path(pb)),
    ])
    .await;
    let (ta, tb) = (Counting::new(a.len() as u64), Counting::new(b.len() as u64));
    let nbd = nbd(vec![("ta", ta.clone()), ("tb", tb.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![
            (0, 2000, a.len() as u64, "full", None, nbd.uri("ta")),
            (1, 2001, b.len() as u64, "full", None, nbd.uri("tb")),
        ],
    );
    let (s, v) = app.post("/v1/backups/start", &body).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["job_id"], "job-b1");

    let c = next_final(&mut rx).await;
    assert_eq!((c.backup.as_str(), c.what.as_str()), ("b1", "complete"));
    assert_eq!(c.auth, "Bearer cb-b1");
    let disks = c.body["disks"].as_array().unwrap();
    assert_eq!(disks[0]["disk_id"], 0);
    assert_eq!(disks[0]["digest"], digest_of_bytes(&a).to_hex());
    assert_eq!(disks[1]["digest"], digest_of_bytes(&b).to_hex());
    let id = disks[0]["change_id"].as_str().unwrap().to_owned();
    assert_eq!(ta.contents().await, a);
    assert_eq!(tb.contents().await, b);
    // State is committed after the hub's 2xx, when the job ends.
    until(|| app.agent.running_jobs() == 0).await;

    let disks = json!([
        {"disk_id": 0, "disk_key": 2000, "size_bytes": a.len(), "mode": "incremental", "parent_change_id": id},
    ]);
    let (_, v) = app
        .post("/v1/backups/prepare", &prepare_body("vm1", disks))
        .await;
    assert_eq!(v["disks"][0]["mode"], "incremental", "{v}");

    a[B * 40] ^= 0xff;
    std::fs::write(&pa, &a).unwrap();
    let t2 = Counting::holding(&ta.contents().await).await;
    nbd.server
        .add_export(nbd_server::Export::new("t2", t2.clone()))
        .unwrap();
    let body = start_body(
        "b2",
        hub_addr,
        vec![(
            0,
            2000,
            a.len() as u64,
            "incremental",
            Some(&id),
            nbd.uri("t2"),
        )],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    let c = next_final(&mut rx).await;
    assert_eq!(c.what, "complete");
    assert_eq!(c.body["disks"][0]["digest"], digest_of_bytes(&a).to_hex());
    assert_eq!(t2.contents().await, a);
    assert_eq!(t2.counts(), (B as u64, 1, 0, 0));
    assert!(hub.calls.lock().unwrap().iter().all(|c| c.what != "abort"));

    // A start for an incremental whose base is gone is refused up front.
    let body = start_body(
        "b3",
        hub_addr,
        vec![(
            0,
            2000,
            a.len() as u64,
            "incremental",
            Some("ha-gone"),
            nbd.uri("t2"),
        )],
    );
    let (s, v) = app.post("/v1/backups/start", &body).await;
    assert_eq!(s, 409, "{v}");
    // So is a disk named twice.
    let body = start_body(
        "b5",
        hub_addr,
        vec![
            (0, 2000, a.len() as u64, "full", None, nbd.uri("t2")),
            (1, 2000, a.len() as u64, "full", None, nbd.uri("t2")),
        ],
    );
    let (s, v) = app.post("/v1/backups/start", &body).await;
    assert_eq!(s, 400, "{v}");
    // So is a callback the agent cannot call.
    let mut body = start_body(
        "b4",
        hub_addr,
        vec![(0, 2000, a.len() as u64, "full", None, nbd.uri("t2"))],
    );
    body["callback"]["url"] = json!("https://hub/api/v1/backups/b4");
    let (s, v) = app.post("/v1/backups/start", &body).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("http://"), "{v}");
}

#[tokio::test]
async fn hub_refusing_complete_leaves_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(13, 1 << 20);
    let pa = write_file(dir.path(), "a.raw", &a);
    let (hub, hub_addr, mut rx) = fake_hub().await;
    hub.complete_status.store(409, Ordering::Relaxed);
    let app = appliance(vec![("vm1", 2000, SourceSpec::Path(pa))]).await;
    let t = Counting::new(a.len() as u64);
    let nbd = nbd(vec![("t", t.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![(0, 2000, a.len() as u64, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    let c = next_final(&mut rx).await;
    assert_eq!(c.what, "complete");
    until(|| app.agent.running_jobs() == 0).await;
    assert!(tracking::load(app.state_dir.path(), "vm1/2000").is_err());
}

/// An NBD source served by [`Faulty`].
async fn faulty_source(gate: Option<Arc<Semaphore>>) -> (TestServer, mpsc::UnboundedReceiver<()>) {
    let (entered, rx) = mpsc::unbounded_channel();
    let f: Arc<dyn BlockBackend> = Arc::new(Faulty {
        size: 4 << 20,
        gate,
        entered,
    });
    (nbd(vec![("src", f)]).await, rx)
}

#[tokio::test]
async fn a_source_that_fails_to_read_posts_abort() {
    let (src, _entered) = faulty_source(None).await;
    let (hub, hub_addr, mut rx) = fake_hub().await;
    let app = appliance(vec![("vm1", 2000, SourceSpec::parse(&src.uri("src")))]).await;
    let t = Counting::new(4 << 20);
    let nbd = nbd(vec![("t", t.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![(0, 2000, 4 << 20, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    let c = next_final(&mut rx).await;
    assert_eq!(c.what, "abort");
    assert_eq!(c.auth, "Bearer cb-b1");
    let reason = c.body["reason"].as_str().unwrap();
    assert!(
        reason.contains("disk 2000") && reason.contains("reading source"),
        "{reason}"
    );
    assert!(!reason.contains("/t"), "target URI leaked: {reason}");
    until(|| app.agent.running_jobs() == 0).await;
    assert!(hub
        .calls
        .lock()
        .unwrap()
        .iter()
        .all(|c| c.what != "complete"));
    assert!(tracking::load(app.state_dir.path(), "vm1/2000").is_err());
}

#[tokio::test]
async fn cancel_stops_the_job_and_frees_its_disks() {
    let gate = Arc::new(Semaphore::new(0));
    let (src, mut entered) = faulty_source(Some(Arc::clone(&gate))).await;
    let (hub, hub_addr, _rx) = fake_hub().await;
    let app = appliance(vec![("vm1", 2000, SourceSpec::parse(&src.uri("src")))]).await;
    let t = Counting::new(4 << 20);
    let nbd = nbd(vec![("t", t.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![(0, 2000, 4 << 20, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    entered.recv().await.unwrap();
    // The same disk cannot be pushed twice at once.
    let body2 = start_body(
        "b2",
        hub_addr,
        vec![(0, 2000, 4 << 20, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body2).await.0, 409);

    let (s, _) = app.post("/v1/backups/b1/cancel", &json!({})).await;
    assert_eq!(s, 200);
    // Cancel returns once the job is gone: nothing more happens.
    assert_eq!(app.agent.running_jobs(), 0);
    gate.add_permits(1000);
    assert_eq!(app.post("/v1/backups/b1/cancel", &json!({})).await.0, 404);
    assert!(hub
        .calls
        .lock()
        .unwrap()
        .iter()
        .all(|c| c.what != "complete" && c.what != "abort"));
    assert_eq!(t.counts(), (0, 0, 0, 0));
    // Its disk is free again.
    assert_eq!(app.post("/v1/backups/start", &body2).await.0, 202);
    assert_eq!(app.post("/v1/backups/b2/cancel", &json!({})).await.0, 200);
}

#[tokio::test]
async fn progress_is_reported_while_a_job_runs() {
    let gate = Arc::new(Semaphore::new(2));
    let (src, _entered) = faulty_source(Some(Arc::clone(&gate))).await;
    let (_hub, hub_addr, mut rx) = fake_hub().await;
    let app = appliance(vec![("vm1", 2000, SourceSpec::parse(&src.uri("src")))]).await;
    let t = Counting::new(4 << 20);
    let nbd = nbd(vec![("t", t.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![(3, 2000, 4 << 20, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    // Two 1 MiB chunks get through, then the source stalls: reports rise
    // to 2 MiB (one may catch the first chunk alone) and no further.
    loop {
        let c = rx.recv().await.unwrap();
        assert_eq!(c.what, "progress");
        assert_eq!(c.auth, "Bearer cb-b1");
        let d = &c.body["disks"][0];
        assert_eq!(
            (d["disk_id"].as_u64(), d["bytes_total"].as_u64()),
            (Some(3), Some(4 << 20))
        );
        let done = d["bytes_done"].as_u64().unwrap();
        assert!(done == 1 << 20 || done == 2 << 20, "{c:?}");
        if done == 2 << 20 {
            break;
        }
    }
    assert_eq!(app.post("/v1/backups/b1/cancel", &json!({})).await.0, 200);
}

#[tokio::test]
async fn shutdown_stops_running_jobs_and_posts_abort() {
    let gate = Arc::new(Semaphore::new(0));
    let (src, mut entered) = faulty_source(Some(gate)).await;
    let (_hub, hub_addr, mut rx) = fake_hub().await;
    let app = appliance(vec![("vm1", 2000, SourceSpec::parse(&src.uri("src")))]).await;
    let t = Counting::new(4 << 20);
    let nbd = nbd(vec![("t", t.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![(0, 2000, 4 << 20, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    entered.recv().await.unwrap();
    app.agent.shutdown().await;
    assert_eq!(app.agent.running_jobs(), 0);
    let c = next_final(&mut rx).await;
    assert_eq!(c.what, "abort");
    assert!(
        c.body["reason"].as_str().unwrap().contains("shutting down"),
        "{c:?}"
    );
}

/// The hub may plan the next incremental the moment it has answered
/// complete; a prepare arriving before the agent committed that state must
/// wait for it, not answer "full".
#[tokio::test]
async fn prepare_right_after_complete_waits_for_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(14, 2 << 20);
    let pa = write_file(dir.path(), "a.raw", &a);
    let (hub, hub_addr, mut rx) = fake_hub().await;
    hub.complete_gate.forget_permits(1000);
    let app = appliance(vec![("vm1", 2000, SourceSpec::Path(pa))]).await;
    let t = Counting::new(a.len() as u64);
    let nbd = nbd(vec![("t", t.clone())]).await;
    let body = start_body(
        "b1",
        hub_addr,
        vec![(0, 2000, a.len() as u64, "full", None, nbd.uri("t"))],
    );
    assert_eq!(app.post("/v1/backups/start", &body).await.0, 202);
    let c = next_final(&mut rx).await;
    assert_eq!(c.what, "complete");
    let id = c.body["disks"][0]["change_id"].as_str().unwrap().to_owned();
    // The hub has not answered yet; its next prepare is already on its way.
    let disks = json!([{"disk_id": 0, "disk_key": 2000, "size_bytes": a.len(),
                        "mode": "incremental", "parent_change_id": id}]);
    let prepare = tokio::spawn({
        let addr = app.addr;
        let body = prepare_body("vm1", disks);
        async move {
            call_as(
                addr,
                Some(TOKEN),
                "POST",
                "/v1/backups/prepare",
                Some(&body),
            )
            .await
        }
    });
    until(|| app.agent.waiting_for_commits() == 1).await;
    hub.complete_gate.add_permits(1);
    let r = prepare.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["disks"][0]["mode"], "incremental", "{}", r.text());
}
