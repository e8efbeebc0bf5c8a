//! The hand-off to a backup appliance (docs/sna-contract.md), against a
//! fake appliance: a small axum server in the test that records every call
//! and, on start, writes the disks with real `nbdcopy` and reports back
//! with the callback token, as a real one would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::files_under;
use common::hub::{eventually, free_port, Hub};
use integration_tests::http::call_as;
use integration_tests::support::{self, assert_identical, require, run_ok, write_file};
use serde_json::{json, Value};
use sna_contract::{Mode, PrepareRequest, PrepareResponse, PreparedDisk, StartRequest};
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;
const SNA_TOKEN: &str = "appliance-secret-1";

/// A prepare answer for one disk: mode and reason.
type Answer = (Mode, Option<String>);

/// What the fake appliance does.
#[derive(Debug, Clone, Default)]
struct Script {
    /// Prepare: answer these modes (and reasons) for these disk keys
    /// instead of what was offered; `None` leaves a key out.
    answer: Vec<(u32, Option<Answer>)>,
    /// Prepare: never answer.
    hang_prepare: bool,
    /// Prepare: answer 200 with exactly these bytes.
    prepare_raw: Option<Vec<u8>>,
    /// Start: refuse with this status and message.
    refuse_start: Option<(u16, String)>,
    /// Start: never answer.
    hang_start: bool,
    /// Start: accept but do nothing (the test plays the appliance).
    hold: bool,
    /// Complete without change ids.
    omit_change_ids: bool,
}

#[derive(Debug, Clone)]
struct Call {
    path: String,
    auth: Option<String>,
    body: Value,
}

/// What a driven backup ended with.
#[derive(Debug)]
struct Done {
    /// `GET` of the backup (with the callback token) after the progress
    /// report, before complete.
    seen: Value,
    /// Status and body of the complete callback.
    status: u16,
    body: Value,
}

struct Fake {
    script: Mutex<Script>,
    calls: Mutex<Vec<Call>>,
    /// Source image per disk id.
    sources: Mutex<Vec<PathBuf>>,
    done: mpsc::UnboundedSender<Done>,
}

struct Appliance {
    url: String,
    fake: Arc<Fake>,
    done: mpsc::UnboundedReceiver<Done>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Appliance {
    async fn start(script: Script) -> Appliance {
        let (tx, rx) = mpsc::unbounded_channel();
        let fake = Arc::new(Fake {
            script: Mutex::new(script),
            calls: Mutex::new(Vec::new()),
            sources: Mutex::new(Vec::new()),
            done: tx,
        });
        let app = Router::new()
            .route("/v1/backups/prepare", post(prepare))
            .route("/v1/backups/start", post(start))
            .route("/v1/backups/{id}/cancel", post(cancel))
            .with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Appliance {
            url: format!("http://{addr}"),
            fake,
            done: rx,
            task,
        }
    }

    fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.fake.script.lock().unwrap());
    }

    fn set_sources(&self, s: &[PathBuf]) {
        *self.fake.sources.lock().unwrap() = s.to_vec();
    }

    fn calls(&self, suffix: &str) -> Vec<Call> {
        self.fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path.ends_with(suffix))
            .cloned()
            .collect()
    }

    fn last_start(&self) -> StartRequest {
        let c = self.calls("/start").pop().expect("no start call");
        serde_json::from_value(c.body).unwrap()
    }

    fn last_prepare(&self) -> PrepareRequest {
        let c = self.calls("/prepare").pop().expect("no prepare call");
        serde_json::from_value(c.body).unwrap()
    }

    async fn next_done(&mut self) -> Done {
        tokio::time::timeout(Duration::from_secs(120), self.done.recv())
            .await
            .expect("the appliance never finished")
            .expect("channel closed")
    }
}

fn record(fake: &Fake, path: String, headers: &HeaderMap, body: &Value) {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.calls.lock().unwrap().push(Call {
        path,
        auth,
        body: body.clone(),
    });
}

async fn prepare(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    record(&fake, "/v1/backups/prepare".into(), &headers, &body);
    let script = fake.script.lock().unwrap().clone();
    if script.hang_prepare {
        std::future::pending::<()>().await;
    }
    if let Some(raw) = script.prepare_raw {
        return ([(header::CONTENT_TYPE, "application/json")], raw).into_response();
    }
    let req: PrepareRequest = serde_json::from_value(body).unwrap();
    assert_eq!(req.contract, sna_contract::CONTRACT);
    let mut disks = Vec::new();
    for d in &req.disks {
        match script.answer.iter().find(|(k, _)| *k == d.disk_key) {
            Some((_, None)) => {}
            Some((_, Some((mode, reason)))) => disks.push(PreparedDisk {
                disk_key: d.disk_key,
                mode: *mode,
                reason: reason.clone(),
            }),
            None => disks.push(PreparedDisk {
                disk_key: d.disk_key,
                mode: d.mode,
                reason: None,
            }),
        }
    }
    Json(PrepareResponse { disks }).into_response()
}

async fn start(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    record(&fake, "/v1/backups/start".into(), &headers, &body);
    let script = fake.script.lock().unwrap().clone();
    if script.hang_start {
        std::future::pending::<()>().await;
    }
    if let Some((status, message)) = script.refuse_start {
        return (
            StatusCode::from_u16(status).unwrap(),
            Json(json!({ "message": message })),
        )
            .into_response();
    }
    let req: StartRequest = serde_json::from_value(body).unwrap();
    if !script.hold {
        let sources = fake.sources.lock().unwrap().clone();
        let done = fake.done.clone();
        tokio::spawn(drive(req, sources, script.omit_change_ids, done));
    }
    (StatusCode::ACCEPTED, Json(json!({"job_id": "job-7"}))).into_response()
}

async fn cancel(
    State(fake): State<Arc<Fake>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    record(&fake, format!("/v1/backups/{id}/cancel"), &headers, &body);
    StatusCode::NO_CONTENT
}

/// `http://ADDR/PATH` → (ADDR, /PATH).
fn split_url(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    (addr.parse().unwrap(), format!("/{path}"))
}

/// What an appliance does after start: every disk written over NBD, a
/// progress report, a look at the backup, complete with change ids.
async fn drive(
    req: StartRequest,
    sources: Vec<PathBuf>,
    omit: bool,
    done: mpsc::UnboundedSender<Done>,
) {
    let mut copies = Vec::new();
    for t in &req.targets {
        let src = sources[t.disk_id as usize].to_str().unwrap().to_owned();
        let uri = t.nbd_uri.clone();
        copies.push(tokio::spawn(async move {
            run_ok("nbdcopy", &["--flush", &src, &uri]).await
        }));
    }
    for c in copies {
        c.await.unwrap();
    }
    let (hub, base) = split_url(&req.callback.url);
    let token = Some(req.callback.token.as_str());
    let progress: Vec<Value> = req
        .targets
        .iter()
        .map(|t| json!({"disk_id": t.disk_id, "bytes_done": t.size_bytes, "bytes_total": t.size_bytes}))
        .collect();
    let r = call_as(
        hub,
        token,
        "POST",
        &format!("{base}/progress"),
        Some(&json!({"disks": progress})),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let seen = call_as(hub, token, "GET", &base, None).await.json();
    let disks: Vec<Value> = req
        .targets
        .iter()
        .map(|t| {
            if omit {
                json!({"disk_id": t.disk_id})
            } else {
                json!({"disk_id": t.disk_id, "change_id": format!("cbt-{}-{}", req.backup_id, t.disk_id)})
            }
        })
        .collect();
    let r = call_as(
        hub,
        token,
        "POST",
        &format!("{base}/complete"),
        Some(&json!({"disks": disks})),
    )
    .await;
    let _ = done.send(Done {
        seen,
        status: r.status,
        body: r.json(),
    });
}

/// A hub that authenticates to appliances with [`SNA_TOKEN`].
async fn hub() -> Hub {
    Hub::start_configured(|c| {
        c.sna.token = Some(hub_daemon::sna::SnaToken::new(SNA_TOKEN.into()).unwrap());
    })
    .await
}

/// Register `vm` with disks of `sizes`, handed to the appliance at `url`.
async fn register(hub: &Hub, vm: &str, sizes: &[u64], url: Option<&str>) {
    let disks: Vec<Value> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"disk_id": i, "size_bytes": s, "unit_number": i}))
        .collect();
    let mut body = json!({"vm_context_id": format!("ctx-{vm}"), "disks": disks});
    if let Some(u) = url {
        body["sna_url"] = json!(u);
    }
    let r = hub.put(&format!("/api/v1/vms/{vm}"), body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Kept without a trailing slash (paths are appended to it).
    assert_eq!(
        r.json()["sna_url"].as_str(),
        url.map(|u| u.trim_end_matches('/'))
    );
}

async fn start_backup(hub: &Hub, vm: &str, kind: &str) -> integration_tests::http::Response {
    hub.post(
        "/api/v1/backups",
        json!({"vm_name": vm, "backup_type": kind, "repository_id": "default"}),
    )
    .await
}

fn sources(dir: &Path, tag: &str, sizes: &[u64], seed: u64) -> Vec<PathBuf> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            write_file(
                dir,
                &format!("{tag}{i}.raw"),
                &support::disk_like(seed + i as u64, *s as usize),
            )
        })
        .collect()
}

fn image(hub: &Hub, done: &Value, disk: usize) -> PathBuf {
    hub.repo()
        .join(done["disks"][disk]["file"].as_str().unwrap())
}

async fn backing_of(img: &Path) -> Option<String> {
    let out = run_ok(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    )
    .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    v["backing-filename"].as_str().map(str::to_owned)
}

fn assert_error(r: &integration_tests::http::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], code, "{}", r.text());
}

/// Nothing of a failed start is left: no file, no port, no catalog row.
async fn assert_nothing_left(hub: &Hub) {
    assert_eq!(files_under(&hub.repo()), Vec::<PathBuf>::new());
    assert_eq!(hub.metric("hub_nbd_ports_in_use").await, 0);
    let list = hub.get("/api/v1/backups").await.json();
    assert_eq!(list, json!([]), "no catalog row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_through_the_appliance() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let mut sna = Appliance::start(Script::default()).await;
    let mut hub = hub().await;
    let sizes = [8 * MIB, 4 * MIB];
    register(&hub, "vm", &sizes, Some(&format!("{}/", sna.url))).await;
    let src = sources(hub.dir.path(), "a", &sizes, 1);
    sna.set_sources(&src);

    // Full: the API answers once the appliance accepted.
    let r = start_backup(&hub, "vm", "full").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let started = r.json();
    let full_id = started["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(started["appliance_job_id"], "job-7");
    let prep = sna.last_prepare();
    assert_eq!(prep.backup_id, full_id);
    assert_eq!(prep.vm_context_id, "ctx-vm");
    assert_eq!(prep.backup_type, Mode::Full);
    assert!(prep
        .disks
        .iter()
        .all(|d| d.mode == Mode::Full && d.parent_change_id.is_none()));
    assert_eq!(
        prep.disks
            .iter()
            .map(|d| (d.disk_id, d.disk_key, d.size_bytes))
            .collect::<Vec<_>>(),
        vec![(0, 2000, 8 * MIB), (1, 2001, 4 * MIB)]
    );
    let st = sna.last_start();
    assert_eq!(st.nbd_targets_string, started["nbd_targets_string"]);
    assert_eq!(st.targets.len(), 2);
    assert_eq!(st.targets[1].nbd_uri, started["disk_results"][1]["nbd_uri"]);
    assert_eq!(
        st.callback.url,
        format!("http://{}/api/v1/backups/{full_id}", hub.addr)
    );
    assert!(st.callback.token.starts_with("hcb_"));
    for c in sna.calls("") {
        assert_eq!(
            c.auth.as_deref(),
            Some(&*format!("Bearer {SNA_TOKEN}")),
            "{}",
            c.path
        );
    }

    let done = sna.next_done().await;
    // While running, the progress report shows per disk.
    assert_eq!(done.seen["status"], "running");
    assert_eq!(
        done.seen["disks"][0]["progress"],
        json!({"bytes_done": 8 * MIB, "bytes_total": 8 * MIB})
    );
    assert_eq!(done.status, 200, "{}", done.body);
    let full = done.body;
    assert_eq!(full["status"], "completed");
    assert_eq!(full["disks"][1]["change_id"], format!("cbt-{full_id}-1"));
    assert!(full["disks"][0].get("progress").is_none());
    for i in 0..2 {
        assert_identical(
            "qcow2",
            image(&hub, &full, i).to_str().unwrap(),
            "raw",
            src[i].to_str().unwrap(),
        )
        .await;
    }
    // The callback token died with the backup.
    let r = call_as(
        hub.addr,
        Some(&st.callback.token),
        "GET",
        &format!("/api/v1/backups/{full_id}"),
        None,
    )
    .await;
    assert_error(&r, 401, "unauthorized");
    let r = call_as(
        hub.addr,
        Some(&st.callback.token),
        "POST",
        &format!("/api/v1/backups/{full_id}/complete"),
        Some(&json!({})),
    )
    .await;
    assert_error(&r, 401, "unauthorized");

    // Incremental: offered with the parent's change id, sent as such.
    let src2 = sources(hub.dir.path(), "b", &sizes, 7);
    sna.set_sources(&src2);
    let r = start_backup(&hub, "vm", "incremental").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let inc_id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let prep = sna.last_prepare();
    for d in &prep.disks {
        assert_eq!(d.mode, Mode::Incremental);
        assert_eq!(
            d.parent_change_id,
            Some(format!("cbt-{full_id}-{}", d.disk_id))
        );
    }
    let st = sna.last_start();
    assert!(st.targets.iter().all(|t| t.mode == Mode::Incremental));
    assert_eq!(
        st.targets[0].parent_change_id,
        Some(format!("cbt-{full_id}-0"))
    );
    let done = sna.next_done().await;
    assert_eq!(done.status, 200, "{}", done.body);
    let inc = done.body;
    assert_eq!(inc["backup_id"], inc_id.as_str());
    for i in 0..2 {
        assert_eq!(inc["disks"][i]["backup_mode"], "incremental");
        assert_eq!(inc["disks"][i]["parent_backup_id"], full_id.as_str());
        let img = image(&hub, &inc, i);
        let backing = backing_of(&img)
            .await
            .expect("an incremental has a backing file");
        assert!(
            full["disks"][i]["file"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/{backing}")),
            "{backing}"
        );
        assert_identical(
            "qcow2",
            img.to_str().unwrap(),
            "raw",
            src2[i].to_str().unwrap(),
        )
        .await;
    }
    assert!(sna.calls("/cancel").is_empty(), "nothing failed");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_the_appliance_sends_in_full_gets_no_backing_file() {
    if !require("nbdcopy") || !require("qemu-img") {
        return;
    }
    let mut sna = Appliance::start(Script::default()).await;
    let mut hub = hub().await;
    let sizes = [4 * MIB, 4 * MIB];
    register(&hub, "vm", &sizes, Some(&sna.url)).await;
    let src = sources(hub.dir.path(), "a", &sizes, 3);
    sna.set_sources(&src);
    assert_eq!(start_backup(&hub, "vm", "full").await.status, 201);
    let full = sna.next_done().await.body;
    assert_eq!(full["status"], "completed", "{full}");

    sna.script(|s| {
        s.answer = vec![(
            2001,
            Some((Mode::Full, Some("CBT was reset on disk 2001".into()))),
        )]
    });
    let src2 = sources(hub.dir.path(), "b", &sizes, 9);
    sna.set_sources(&src2);
    let r = start_backup(&hub, "vm", "incremental").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let started = r.json();
    assert_eq!(started["disk_results"][0]["backup_mode"], "incremental");
    let d1 = &started["disk_results"][1];
    assert_eq!(d1["backup_mode"], "full");
    assert_eq!(d1["mode_reason"], "CBT was reset on disk 2001");
    assert!(d1["parent_backup_id"].is_null());
    let st = sna.last_start();
    assert_eq!(
        (st.targets[0].mode, st.targets[1].mode),
        (Mode::Incremental, Mode::Full)
    );
    assert_eq!(st.targets[1].parent_change_id, None);

    let inc = sna.next_done().await.body;
    assert_eq!(inc["status"], "completed", "{inc}");
    assert_eq!(inc["disks"][1]["backup_mode"], "full");
    assert_eq!(inc["disks"][1]["mode_reason"], "CBT was reset on disk 2001");
    assert!(backing_of(&image(&hub, &inc, 0)).await.is_some());
    assert_eq!(backing_of(&image(&hub, &inc, 1)).await, None);
    for i in 0..2 {
        assert_identical(
            "qcow2",
            image(&hub, &inc, i).to_str().unwrap(),
            "raw",
            src2[i].to_str().unwrap(),
        )
        .await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_refusing_start_leaves_nothing() {
    if !require("nbdcopy") {
        return;
    }
    let mut sna = Appliance::start(Script {
        refuse_start: Some((503, "snapshot failed: datastore busy".into())),
        ..Script::default()
    })
    .await;
    let mut hub = hub().await;
    register(&hub, "vm", &[4 * MIB, 2 * MIB], Some(&sna.url)).await;
    let r = start_backup(&hub, "vm", "full").await;
    assert_error(&r, 502, "appliance_error");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("snapshot failed: datastore busy") && msg.contains("503"),
        "{msg}"
    );
    assert_nothing_left(&hub).await;
    // It is told to forget the backup it refused.
    let refused = sna.last_start().backup_id;
    let cancels = eventually(10, || async {
        Some(sna.calls("/cancel")).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(cancels[0].path, format!("/v1/backups/{refused}/cancel"));
    assert_eq!(
        cancels[0].auth.as_deref(),
        Some(&*format!("Bearer {SNA_TOKEN}"))
    );

    // Ports and the VM are free again: the next backup goes through.
    sna.script(|s| s.refuse_start = None);
    sna.set_sources(&sources(hub.dir.path(), "s", &[4 * MIB, 2 * MIB], 5));
    let r = start_backup(&hub, "vm", "full").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(sna.next_done().await.body["status"], "completed");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_appliance_is_502_and_the_default_appliance_applies() {
    // The hub's default appliance (--sna-url) is a port nobody listens on.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut hub = Hub::start_configured(|c| c.sna.url = Some(dead.clone())).await;
    register(&hub, "vm", &[MIB], None).await;
    let r = start_backup(&hub, "vm", "full").await;
    assert_error(&r, 502, "appliance_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{}",
        r.text()
    );
    assert_nothing_left(&hub).await;
    hub.stop().await;

    // Without any appliance the API drives backups as before.
    let mut hub = Hub::start().await;
    register(&hub, "vm", &[MIB], None).await;
    let b = start_backup(&hub, "vm", "full").await;
    assert_eq!(b.status, 201, "{}", b.text());
    assert!(b.json().get("appliance_job_id").is_none());
    hub.complete(b.json()["backup_id"].as_str().unwrap()).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_appliance_is_504() {
    let sna = Appliance::start(Script {
        hang_prepare: true,
        ..Script::default()
    })
    .await;
    let mut hub = Hub::start_configured(|c| c.sna.timeout = Duration::from_millis(300)).await;
    register(&hub, "vm", &[MIB, MIB], Some(&sna.url)).await;
    let r = start_backup(&hub, "vm", "full").await;
    assert_error(&r, 504, "appliance_timeout");
    assert_nothing_left(&hub).await;

    // Hanging at start, with the exports already up: all released too.
    sna.script(|s| {
        s.hang_prepare = false;
        s.hang_start = true;
    });
    let r = start_backup(&hub, "vm", "full").await;
    assert_error(&r, 504, "appliance_timeout");
    assert_nothing_left(&hub).await;
    let id = sna.last_start().backup_id;
    let cancels = eventually(10, || async {
        Some(sna.calls(&format!("{id}/cancel"))).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(cancels.len(), 1);

    // A client that hangs up while the hub waits for the appliance does
    // not cut the start in half: it still times out and releases all.
    let starts = sna.calls("/start").len();
    let body = json!({"vm_name": "vm", "backup_type": "full", "repository_id": "default"});
    let gone = tokio::time::timeout(
        Duration::from_millis(150),
        call_as(hub.addr, None, "POST", "/api/v1/backups", Some(&body)),
    )
    .await;
    assert!(gone.is_err(), "the hub answered before the appliance did");
    eventually(10, || async {
        Some(()).filter(|_| sna.calls("/start").len() > starts)
    })
    .await;
    let id = sna.last_start().backup_id;
    eventually(10, || async {
        Some(()).filter(|_| !sna.calls(&format!("{id}/cancel")).is_empty())
    })
    .await;
    assert_nothing_left(&hub).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_the_hub_did_not_offer_is_a_contract_violation() {
    let sna = Appliance::start(Script {
        answer: vec![(2000, Some((Mode::Incremental, None)))],
        ..Script::default()
    })
    .await;
    let mut hub = hub().await;
    register(&hub, "vm", &[MIB, MIB], Some(&sna.url)).await;
    let r = start_backup(&hub, "vm", "full").await;
    assert_error(&r, 502, "appliance_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("incremental where the hub offered full"),
        "{}",
        r.text()
    );
    assert_nothing_left(&hub).await;
    assert!(sna.calls("/start").is_empty(), "never started");

    // A disk missing from the answer, or named twice: the same.
    sna.script(|s| s.answer = vec![(2001, None)]);
    let r = start_backup(&hub, "vm", "full").await;
    assert_error(&r, 502, "appliance_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2001"),
        "{}",
        r.text()
    );
    assert_nothing_left(&hub).await;

    // Hostile bytes: not the contract's body, or more than 1 MiB of it.
    let mut huge = b"{\"disks\": [".to_vec();
    huge.resize(2 << 20, b' ');
    for (raw, says) in [
        (b"<html>502</html>".to_vec(), "not the contract"),
        (
            b"{\"disks\": [{\"disk_key\": 2000, \"mode\": \"diff\"}]}".to_vec(),
            "not the contract",
        ),
        (huge, "at most 1048576 bytes"),
    ] {
        sna.script(|s| {
            s.answer.clear();
            s.prepare_raw = Some(raw);
        });
        let r = start_backup(&hub, "vm", "full").await;
        assert_error(&r, 502, "appliance_error");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(says),
            "{}",
            r.text()
        );
        assert_nothing_left(&hub).await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_needs_change_ids() {
    if !require("nbdcopy") {
        return;
    }
    // No appliance: a full completed without change id cannot be built on.
    let mut hub = Hub::start().await;
    register(&hub, "vm", &[MIB], None).await;
    let b = start_backup(&hub, "vm", "full").await.json();
    let full_id = b["backup_id"].as_str().unwrap().to_owned();
    let r = hub
        .post(&format!("/api/v1/backups/{full_id}/complete"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = start_backup(&hub, "vm", "incremental").await;
    assert_eq!(r.status, 201);
    let d = &r.json()["disk_results"][0];
    assert_eq!(d["backup_mode"], "full");
    assert_eq!(
        d["mode_reason"],
        format!("lineage lost: parent {full_id} has no change id")
    );
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let done = hub.complete(&id).await;
    assert_eq!(done["disks"][0]["mode_reason"], d["mode_reason"]);

    // An incremental completed without its change id fails, files gone.
    let b = start_backup(&hub, "vm", "incremental").await.json();
    assert_eq!(b["disk_results"][0]["backup_mode"], "incremental");
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let before = files_under(&hub.repo()).len();
    let r = hub
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            json!({"disks": [{"disk_id": 0, "change_id": ""}]}),
        )
        .await;
    assert_error(&r, 422, "backup_failed");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("change id"),
        "{}",
        r.text()
    );
    let rec = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert_eq!(rec["status"], "failed");
    assert!(
        files_under(&hub.repo()).len() < before,
        "its files are gone"
    );
    hub.stop().await;

    // Through an appliance: the offer says full, with the reason; an
    // appliance completing an incremental without change ids fails it.
    let mut sna = Appliance::start(Script {
        omit_change_ids: true,
        ..Script::default()
    })
    .await;
    let mut hub = hub_with_appliance_default(&sna.url).await;
    register(&hub, "vm", &[MIB], None).await;
    sna.set_sources(&sources(hub.dir.path(), "s", &[MIB], 2));
    assert_eq!(start_backup(&hub, "vm", "full").await.status, 201);
    let full = sna.next_done().await.body;
    assert_eq!(full["status"], "completed", "{full}");
    let full_id = full["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(start_backup(&hub, "vm", "incremental").await.status, 201);
    let prep = sna.last_prepare();
    assert_eq!(prep.disks[0].mode, Mode::Full);
    assert_eq!(
        prep.disks[0].reason,
        Some(format!("lineage lost: parent {full_id} has no change id"))
    );
    assert_eq!(sna.next_done().await.status, 200);

    sna.script(|s| s.omit_change_ids = false);
    assert_eq!(start_backup(&hub, "vm", "full").await.status, 201);
    assert_eq!(sna.next_done().await.status, 200);
    sna.script(|s| s.omit_change_ids = true);
    let r = start_backup(&hub, "vm", "incremental").await;
    assert_eq!(
        r.json()["disk_results"][0]["backup_mode"],
        "incremental",
        "{}",
        r.text()
    );
    let done = sna.next_done().await;
    assert_eq!(done.status, 422, "{}", done.body);
    assert_eq!(done.body["error"]["code"], "backup_failed");
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(
        hub.get(&format!("/api/v1/backups/{id}")).await.json()["status"],
        "failed"
    );
    hub.stop().await;
}

async fn hub_with_appliance_default(url: &str) -> Hub {
    let url = url.to_owned();
    Hub::start_configured(move |c| c.sna.url = Some(url)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_token_opens_only_its_own_running_backup() {
    let sna = Appliance::start(Script {
        hold: true,
        ..Script::default()
    })
    .await;
    let mut hub = hub().await;
    for vm in ["a", "b", "c"] {
        register(&hub, vm, &[MIB], Some(&sna.url)).await;
    }
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for vm in ["a", "b", "c"] {
        let r = start_backup(&hub, vm, "full").await;
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["backup_id"].as_str().unwrap().to_owned());
        tokens.push(sna.last_start().callback.token);
    }
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let ta = Some(tokens[0].as_str());
    let call = |m: &'static str, p: String, body: Option<Value>| {
        let addr = hub.addr;
        async move { call_as(addr, ta, m, &p, body.as_ref()).await }
    };

    // API tokens exist from here on: the callback token still works.
    let admin = hub
        .daemon
        .as_ref()
        .unwrap()
        .backups()
        .catalog()
        .create_token("admin", hub_daemon::catalog::Role::Admin)
        .await
        .unwrap();
    hub.token = Some(admin);
    let prog = json!({"disks": [{"disk_id": 0, "bytes_done": 512, "bytes_total": MIB}]});
    let r = call(
        "POST",
        format!("/api/v1/backups/{a}/progress"),
        Some(prog.clone()),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = call("GET", format!("/api/v1/backups/{a}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["disks"][0]["progress"],
        json!({"bytes_done": 512, "bytes_total": MIB})
    );
    // Bad progress: 400, not stored.
    let r = call(
        "POST",
        format!("/api/v1/backups/{a}/progress"),
        Some(json!({"disks": [{"disk_id": 9, "bytes_done": 1, "bytes_total": 2}]})),
    )
    .await;
    assert_error(&r, 400, "bad_request");

    // Another backup, or anything but the callbacks: refused.
    for (m, p) in [
        ("GET", format!("/api/v1/backups/{b}")),
        ("POST", format!("/api/v1/backups/{b}/progress")),
        ("POST", format!("/api/v1/backups/{b}/complete")),
        ("POST", format!("/api/v1/backups/{b}/abort")),
        ("DELETE", format!("/api/v1/backups/{a}")),
        ("POST", format!("/api/v1/backups/{a}/restore")),
        ("GET", "/api/v1/backups".to_owned()),
        ("POST", "/api/v1/backups".to_owned()),
        ("GET", "/api/v1/vms".to_owned()),
    ] {
        let r = call(m, p.clone(), Some(prog.clone())).await;
        assert!(r.status == 401 || r.status == 403, "{m} {p}: {}", r.text());
    }
    assert_eq!(
        hub.get(&format!("/api/v1/backups/{b}")).await.json()["status"],
        "running"
    );

    // The appliance aborts its own backup: failed, and no cancel for it.
    let tb = Some(tokens[1].as_str());
    let r = call_as(
        hub.addr,
        tb,
        "POST",
        &format!("/api/v1/backups/{b}/abort"),
        Some(&json!({"reason": "VM deleted"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "failed");
    assert_eq!(r.json()["error"], "VM deleted");
    let r = call_as(hub.addr, tb, "GET", &format!("/api/v1/backups/{b}"), None).await;
    assert_error(&r, 401, "unauthorized");

    // An operator aborts another: the appliance is told.
    let r = hub
        .post(&format!("/api/v1/backups/{c}/abort"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(10, || async {
        Some(()).filter(|_| !sna.calls(&format!("{c}/cancel")).is_empty())
    })
    .await;

    // Complete with the token, then it is dead.
    let r = call(
        "POST",
        format!("/api/v1/backups/{a}/complete"),
        Some(json!({"disks": [{"disk_id": 0, "change_id": "x"}]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (m, p) in [
        ("GET", format!("/api/v1/backups/{a}")),
        ("POST", format!("/api/v1/backups/{a}/progress")),
        ("POST", format!("/api/v1/backups/{a}/abort")),
    ] {
        let r = call(m, p.clone(), Some(prog.clone())).await;
        assert_error(&r, 401, "unauthorized");
    }
    assert!(
        sna.calls(&format!("{b}/cancel")).is_empty(),
        "the appliance's own abort is not echoed"
    );
    assert!(sna.calls(&format!("{a}/cancel")).is_empty());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_urls_are_checked_at_registration() {
    let mut hub = Hub::start().await;
    for bad in [
        "https://sna:443",
        "sna:80",
        "http://u:p@sna",
        "http://sna/?x=1",
    ] {
        let r = hub
            .put("/api/v1/vms/vm", json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": MIB}], "sna_url": bad}))
            .await;
        assert_error(&r, 400, "bad_request");
    }
    register(&hub, "vm", &[MIB], Some("http://10.1.2.3:8443")).await;
    assert_eq!(
        hub.get("/api/v1/vms/vm").await.json()["sna_url"],
        "http://10.1.2.3:8443"
    );
    hub.stop().await;
}

/// The `serve` process: appliance settings from flags and environment,
/// the callback address from `--public-url`, and a cancel for a backup
/// the hub aborts when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_process_hands_off_with_its_flags_and_environment() {
    let sna = Appliance::start(Script {
        hold: true,
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = common::DaemonProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--nbd-ports",
            "0",
            "--nbd-shared-port",
            "0",
            "--sna-url",
            &sna.url,
            "--sna-timeout",
            "5",
        ],
        &[
            ("HUB_SNA_TOKEN", SNA_TOKEN),
            ("HUB_PUBLIC_URL", "http://hub.example:9999/"),
        ],
    );
    let disks = json!([{"disk_id": 0, "size_bytes": MIB}]);
    let r = call_as(
        d.api,
        None,
        "PUT",
        "/api/v1/vms/vm",
        Some(&json!({"vm_context_id": "c", "disks": disks})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json!({"vm_name": "vm", "backup_type": "full", "repository_id": "default"});
    let r = call_as(d.api, None, "POST", "/api/v1/backups", Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let st = sna.last_start();
    assert_eq!(
        st.callback.url,
        format!("http://hub.example:9999/api/v1/backups/{id}")
    );
    let start = sna.calls("/start").pop().unwrap();
    assert_eq!(start.auth.as_deref(), Some(&*format!("Bearer {SNA_TOKEN}")));
    // The token reaches the real process's API too.
    let r = call_as(
        d.api,
        Some(&st.callback.token),
        "GET",
        &format!("/api/v1/backups/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.terminate(), 0);
    // Stopping aborted the backup, and the appliance heard of it first.
    let cancels = sna.calls("/cancel");
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].path, format!("/v1/backups/{id}/cancel"));
    assert_eq!(
        cancels[0].body,
        json!({"contract": sna_contract::CONTRACT, "backup_id": id})
    );
}

/// An appliance that accepted and then never wrote: the idle watchdog
/// fails the backup and the appliance is told to cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_handed_off_backup_fails_and_the_appliance_is_told() {
    let sna = Appliance::start(Script {
        hold: true,
        ..Script::default()
    })
    .await;
    let mut hub = Hub::start_configured(|c| c.idle_timeout = Duration::from_millis(300)).await;
    register(&hub, "vm", &[MIB], Some(&sna.url)).await;
    let r = start_backup(&hub, "vm", "full").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let token = sna.last_start().callback.token;
    eventually(20, || async {
        Some(()).filter(|_| !sna.calls(&format!("{id}/cancel")).is_empty())
    })
    .await;
    let b = hub.get(&format!("/api/v1/backups/{id}")).await.json();
    assert_eq!(b["status"], "failed");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("no NBD client activity"),
        "{b}"
    );
    // Its token is void: a late complete is refused.
    let r = call_as(
        hub.addr,
        Some(&token),
        "POST",
        &format!("/api/v1/backups/{id}/complete"),
        Some(&json!({})),
    )
    .await;
    assert_error(&r, 401, "unauthorized");
    hub.stop().await;
}
