//! The appliance's HTTP side of the hand-off contract: `prepare`, `start`
//! and `cancel` (see `sna_contract`). A started backup runs as a background
//! job ([`crate::job`]) that pushes every disk, then calls the hub back with
//! `complete` (and commits change tracking only if the hub accepted it) or
//! `abort`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header::AUTHORIZATION, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sna_contract::{
    ApplianceError, Mode, PrepareRequest, PrepareResponse, PreparedDisk, StartRequest,
    StartResponse, CONTRACT, PREPARE_PATH, START_PATH,
};
use tokio::sync::watch;

use crate::callback::Callbacks;
use crate::job::{lock, run_job, settle, BusyGuard, Job, Phase};
use crate::push::DiskRequest;
use crate::source::SourceSpec;
use crate::stream::{DiskCounter, StreamOptions};
use crate::tracking;

/// How often progress is reported at most, by default.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the service needs to know.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where change tracking lives.
    pub state_dir: PathBuf,
    /// Bearer token the hub must send (none: no check).
    pub token: Option<String>,
    /// Sources by (VM name, disk key).
    pub sources: BTreeMap<(String, u32), SourceSpec>,
    /// Stream tuning.
    pub stream: StreamOptions,
    /// Least time between two progress reports of a job.
    pub progress_every: Duration,
}

/// The service state.
#[derive(Debug)]
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    jobs: Mutex<HashMap<String, Job>>,
    /// State names of disks being pushed, with their job's phase: one push
    /// per disk at a time, so two commits never race.
    pub(crate) busy: Arc<Mutex<HashMap<String, watch::Receiver<Phase>>>>,
    /// Requests waiting in [`settle`] (observable for tests and logs).
    pub(crate) settling: AtomicUsize,
}

/// An error answer with the contract's body.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApplianceError { message: self.1 })).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed request body: {e}")))
}

fn check_contract(c: &str) -> Result<(), ApiError> {
    if c == CONTRACT {
        Ok(())
    } else {
        Err(bad(format!(
            "unsupported contract {c:?} (this appliance speaks {CONTRACT})"
        )))
    }
}

/// State name of a disk: `VM/KEY`.
pub fn state_name(vm: &str, disk_key: u32) -> String {
    format!("{vm}/{disk_key}")
}

impl Agent {
    /// A service with no jobs.
    pub fn new(cfg: AgentConfig) -> Arc<Agent> {
        Arc::new(Agent {
            cfg,
            jobs: Mutex::default(),
            busy: Arc::default(),
            settling: AtomicUsize::new(0),
        })
    }

    fn source(&self, vm: &str, disk_key: u32) -> Result<&SourceSpec, ApiError> {
        if !self.cfg.sources.keys().any(|(v, _)| v == vm) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("this appliance has no VM {vm:?}"),
            ));
        }
        self.cfg
            .sources
            .get(&(vm.to_owned(), disk_key))
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("VM {vm:?} has no disk with key {disk_key} here"),
                )
            })
    }

    /// Stop every running job and tell the hub each was aborted (the
    /// hub would otherwise wait for a complete that never comes).
    pub async fn shutdown(&self) {
        let jobs: Vec<(String, Job)> = lock(&self.jobs).drain().collect();
        for (backup_id, job) in jobs {
            job.handle.abort();
            let _ = job.handle.await;
            tracing::warn!(%backup_id, "backup stopped by shutdown");
            if let Err(e) = job.callbacks.abort("the appliance is shutting down").await {
                tracing::error!(%backup_id, error = %e, "posting abort");
            }
        }
    }

    /// Requests now waiting for a finishing job's commit.
    pub fn waiting_for_commits(&self) -> usize {
        self.settling.load(Ordering::Relaxed)
    }

    /// Whether any backup job is running.
    pub fn running_jobs(&self) -> usize {
        lock(&self.jobs).len()
    }
}

/// The router: the three contract routes, behind the Bearer check.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(PREPARE_PATH, post(prepare))
        .route(START_PATH, post(start))
        .route("/v1/backups/{backup_id}/cancel", post(cancel))
        .layer(middleware::from_fn_with_state(Arc::clone(&agent), auth))
        .with_state(agent)
}

/// Serve until `shutdown` resolves; then stop running jobs, posting abort
/// for each.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let r = axum::serve(listener, router(Arc::clone(&agent)))
        .with_graceful_shutdown(shutdown)
        .await;
    agent.shutdown().await;
    r
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret; the content comparison does not stop early.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    if let Some(token) = &agent.cfg.token {
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !sent.is_some_and(|s| ct_eq(s.as_bytes(), token.as_bytes())) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// [`tracking::base_for`] off the async threads: a state file is 32 bytes
/// per 64 KiB block (512 MiB for a TiB), read and checksummed whole.
async fn load_base(
    agent: &Agent,
    name: &str,
    parent: &str,
    size: u64,
) -> Result<tracking::DiskState, String> {
    let (dir, name, parent) = (
        agent.cfg.state_dir.clone(),
        name.to_owned(),
        parent.to_owned(),
    );
    tokio::task::spawn_blocking(move || tracking::base_for(&dir, &name, &parent, size))
        .await
        .unwrap_or_else(|e| Err(format!("reading change tracking state: {e}")))
}

async fn prepare(
    State(agent): State<Arc<Agent>>,
    body: Bytes,
) -> Result<Json<PrepareResponse>, ApiError> {
    let req: PrepareRequest = parse(&body)?;
    check_contract(&req.contract)?;
    for d in &req.disks {
        agent.source(&req.vm_name, d.disk_key)?;
    }
    let names: Vec<String> = req
        .disks
        .iter()
        .map(|d| state_name(&req.vm_name, d.disk_key))
        .collect();
    settle(&agent, &names).await;
    let mut disks = Vec::with_capacity(req.disks.len());
    for d in &req.disks {
        let name = state_name(&req.vm_name, d.disk_key);
        let (mode, reason) = match (d.mode, &d.parent_change_id) {
            (Mode::Incremental, Some(parent)) => {
                match load_base(&agent, &name, parent, d.size_bytes).await {
                    Ok(_) => (Mode::Incremental, None),
                    Err(why) => (Mode::Full, Some(why)),
                }
            }
            (Mode::Incremental, None) => (
                Mode::Full,
                Some("the hub offered an incremental without a parent change id".into()),
            ),
            (Mode::Full, _) => (Mode::Full, None),
        };
        disks.push(PreparedDisk {
            disk_key: d.disk_key,
            mode,
            reason,
        });
    }
    Ok(Json(PrepareResponse { disks }))
}

async fn start(
    State(agent): State<Arc<Agent>>,
    body: Bytes,
) -> Result<(StatusCode, Json<StartResponse>), ApiError> {
    let req: StartRequest = parse(&body)?;
    check_contract(&req.contract)?;
    if req.targets.is_empty() {
        return Err(bad("start names no targets"));
    }
    let callbacks = Callbacks::new(&req.callback).map_err(|e| bad(e.to_string()))?;
    let names: Vec<String> = req
        .targets
        .iter()
        .map(|t| state_name(&req.vm_name, t.disk_key))
        .collect();
    if let Some((i, _)) = names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
    {
        return Err(bad(format!(
            "disk key {} appears twice in the targets",
            req.targets[i].disk_key
        )));
    }
    settle(&agent, &names).await;
    let mut disks = Vec::with_capacity(req.targets.len());
    let mut totals = Vec::with_capacity(req.targets.len());
    for t in &req.targets {
        let source = agent.source(&req.vm_name, t.disk_key)?.clone();
        nbd_client::NbdUri::parse(&t.nbd_uri)
            .map_err(|e| bad(format!("disk key {}: target: {e}", t.disk_key)))?;
        let name = state_name(&req.vm_name, t.disk_key);
        let base = match t.mode {
            Mode::Full => None,
            Mode::Incremental => {
                let parent = t.parent_change_id.as_deref().ok_or_else(|| {
                    bad(format!(
                        "disk key {}: incremental without parent change id",
                        t.disk_key
                    ))
                })?;
                let st = load_base(&agent, &name, parent, t.size_bytes)
                    .await
                    .map_err(|why| {
                        ApiError(
                            StatusCode::CONFLICT,
                            format!("disk key {}: cannot send an incremental: {why}", t.disk_key),
                        )
                    })?;
                Some(Arc::new(st))
            }
        };
        let progress = Arc::new(DiskCounter::default());
        totals.push((t.disk_id, t.size_bytes, Arc::clone(&progress)));
        disks.push(DiskRequest {
            disk_id: t.disk_id,
            disk_key: t.disk_key,
            state_name: name,
            source,
            target_uri: t.nbd_uri.clone(),
            base,
            progress,
        });
    }
    let job_id = format!("job-{}", req.backup_id);
    let mut jobs = lock(&agent.jobs);
    if jobs.contains_key(&req.backup_id) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("backup {} is already running", req.backup_id),
        ));
    }
    let guard = {
        let mut busy = lock(&agent.busy);
        if let Some(d) = disks.iter().find(|d| busy.contains_key(&d.state_name)) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("disk key {} is being backed up by another job", d.disk_key),
            ));
        }
        let names: Vec<String> = disks.iter().map(|d| d.state_name.clone()).collect();
        let (phase, rx) = watch::channel(Phase::Streaming);
        busy.extend(names.iter().map(|n| (n.clone(), rx.clone())));
        BusyGuard {
            set: Arc::clone(&agent.busy),
            names,
            phase,
        }
    };
    let backup_id = req.backup_id.clone();
    // Spawned while `jobs` is locked, so the job cannot remove its entry
    // before it exists.
    let job_callbacks = callbacks.clone();
    let handle = tokio::spawn({
        let agent = Arc::clone(&agent);
        let backup_id = backup_id.clone();
        async move {
            run_job(
                &agent,
                &backup_id,
                disks,
                totals,
                job_callbacks,
                &guard.phase,
            )
            .await;
            drop(guard);
            lock(&agent.jobs).remove(&backup_id);
        }
    });
    jobs.insert(backup_id, Job { handle, callbacks });
    tracing::info!(backup_id = %req.backup_id, disks = req.targets.len(), "backup started");
    Ok((
        StatusCode::ACCEPTED,
        Json(StartResponse {
            job_id: Some(job_id),
        }),
    ))
}

async fn cancel(
    State(agent): State<Arc<Agent>>,
    Path(backup_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let job = lock(&agent.jobs).remove(&backup_id);
    let Some(job) = job else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no running backup {backup_id}"),
        ));
    };
    job.handle.abort();
    // Wait until it has stopped, so "cancelled" means no more writes.
    let _ = job.handle.await;
    tracing::info!(backup_id, "backup cancelled");
    Ok(StatusCode::OK)
}
