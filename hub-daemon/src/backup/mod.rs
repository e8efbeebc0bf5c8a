//! Backup orchestration: the state machine of a VM backup, with no HTTP in
//! sight.
//!
//! ```text
//!  start ──▶ running ──complete──▶ completed
//!               │  └──abort / idle / error / shutdown──▶ failed
//!               └─ (daemon killed) ── reconcile on start ──▶ failed
//! ```
//!
//! A running backup is a `Job`: one qcow2 image per disk being written
//! under a `.partial` name, each served on its own NBD port. `start` is
//! all-or-nothing: any failure part-way releases every port and export,
//! deletes every file and leaves no catalog row. `complete` drains and
//! flushes every export, renames and syncs the files, then commits the
//! catalog in one transaction.
//!
//! With a backup appliance for the VM (`sna_url`, or the hub's default),
//! `start` also agrees each disk's mode with it (prepare) before creating
//! the images and hands the targets over (start) before answering; the
//! appliance then reports with a callback token scoped to the backup, and
//! is sent a best-effort cancel when the backup fails on the hub side.
//! The client of the contract is [`crate::sna`].

mod layout;
mod object_sweep;
mod offload;
mod prune;
mod reconcile;
mod restore;
mod start;
mod synthetic;
mod throttle;
mod verify;
mod watchdog;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

use disk_digest::{DigestBackend, DigestChain, Hash};
use qcow_backend::{BackingPolicy, OpenOptions};

use crate::catalog::{Catalog, DiskCompletion, DiskFailure};
use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::model::{BackupRecord, CompleteRequest, Progress};
use crate::nbd::{NbdHub, Published};

pub use layout::Layout;
pub use object_sweep::SweepReport;
pub use offload::TierReport;
pub use prune::{KeptPoint, MergeStep, PruneReport, PruneRequest};
pub use reconcile::ReconcileReport;
pub use restore::Restore;
pub use synthetic::SyntheticFull;
pub use verify::VerifyOutcome;

/// One disk of a running backup.
#[derive(Debug)]
struct DiskJob {
    disk_id: u32,
    /// The repository the files live in.
    layout: Layout,
    partial: PathBuf,
    final_path: PathBuf,
    /// The image behind the export, hashing what arrives.
    digest: Arc<DigestBackend>,
    /// Sidecars of the parent chain, newest first (empty for a full).
    parent_sidecars: Vec<PathBuf>,
    /// `None` once the export has been stopped.
    published: Option<Published>,
    /// An overlay on a parent (its `complete` must bring a change id).
    incremental: bool,
}

impl DiskJob {
    fn sidecar_partial(&self) -> PathBuf {
        Layout::partial(&Layout::sidecar(&self.final_path))
    }
}

/// A running backup.
#[derive(Debug)]
pub(crate) struct Job {
    id: String,
    disks: Vec<DiskJob>,
    watchdog: CancellationToken,
    /// The appliance this backup was handed to (told when it fails here).
    appliance: Option<String>,
    /// The sender's latest progress, per disk id.
    progress: HashMap<u32, Progress>,
}

/// The backup service: owns running jobs and restore exports.
#[derive(Debug)]
pub struct Backups {
    catalog: Catalog,
    nbd: NbdHub,
    config: Config,
    /// Shared with the verification throttle, which slows down while any
    /// backup runs.
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    restores: tokio::sync::Mutex<HashMap<String, Restore>>,
    /// Backups being verified.
    verifying: Mutex<std::collections::HashSet<String>>,
    /// The read budget of every verification.
    verify_throttle: Arc<throttle::Throttle>,
    /// Verification's own I/O threads (started on first use): reading and
    /// hashing old restore points never queues behind, or in front of, a
    /// running backup's image I/O on the shared pool or the tokio workers
    /// serving NBD.
    verify_pool: OnceLock<qcow_backend::IoPool>,
    shutting_down: AtomicBool,
    seq: AtomicU32,
    /// Client of the backup appliances.
    sna: crate::sna::SnaClient,
    /// Base URL of the API for appliance callbacks (set once it listens).
    public_url: OnceLock<String>,
    /// Held by every prune and synthetic-full run: each plans from the
    /// catalog and then rewrites chains, so two at once could act on a
    /// plan the other made stale.
    lifecycle: tokio::sync::Mutex<()>,
    /// Poked when a backup completes (its chain may now be due a synthetic
    /// full); the lifecycle schedule waits on it.
    lifecycle_kick: tokio::sync::Notify,
    /// Held by every change of a layer's location and every re-hydration
    /// (see `offload`): innermost of the locks.
    tier: tokio::sync::Mutex<()>,
}

impl Backups {
    /// A service over an open catalog and a started NBD hub.
    pub fn new(catalog: Catalog, nbd: NbdHub, config: Config) -> Arc<Backups> {
        let sna = crate::sna::SnaClient::new(config.sna.token.clone(), config.sna.timeout);
        let public_url = OnceLock::new();
        if let Some(u) = &config.sna.public_url {
            let _ = public_url.set(u.clone());
        }
        let jobs: Arc<Mutex<HashMap<String, Job>>> = Arc::default();
        let running = Arc::clone(&jobs);
        let verify_throttle = Arc::new(throttle::Throttle::new(
            config.verify.rate,
            config.verify.rate_during_backup,
            Box::new(move || !running.lock().unwrap_or_else(|e| e.into_inner()).is_empty()),
        ));
        Arc::new(Backups {
            sna,
            verify_throttle,
            verify_pool: OnceLock::new(),
            public_url,
            catalog,
            nbd,
            config,
            jobs,
            restores: tokio::sync::Mutex::new(HashMap::new()),
            verifying: Mutex::new(Default::default()),
            shutting_down: AtomicBool::new(false),
            seq: AtomicU32::new(0),
            lifecycle: tokio::sync::Mutex::new(()),
            lifecycle_kick: tokio::sync::Notify::new(),
            tier: tokio::sync::Mutex::new(()),
        })
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The NBD hub.
    pub fn nbd(&self) -> &NbdHub {
        &self.nbd
    }

    /// Notified when a backup completes (see [`crate::lifecycle::schedule`]).
    pub fn lifecycle_kick(&self) -> &tokio::sync::Notify {
        &self.lifecycle_kick
    }

    /// Where the API listens: the base URL appliances call back to and
    /// other hubs of the fleet forward to, unless `public_url` is
    /// configured. On every address (`0.0.0.0`, `[::]`) that is the
    /// advertised host (the one the NBD targets name: appliances reach it).
    pub fn set_api_addr(&self, addr: std::net::SocketAddr) {
        let url = api_url(self.config.api_scheme(), addr, &self.config.advertise_host);
        if self.public_url.set(url).is_ok() && addr.ip().is_unspecified() {
            tracing::info!(%addr, host = %self.config.advertise_host, "the API listens on every address: it is reached at the advertised host (set --public-url otherwise)");
        }
    }

    /// The base URL appliances call back to and other hubs forward to.
    pub fn public_url(&self) -> Result<&str> {
        self.public_url
            .get()
            .map(String::as_str)
            .ok_or_else(|| DaemonError::Internal("the API address is not known yet".into()))
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of running backups.
    pub fn running(&self) -> usize {
        self.jobs().len()
    }

    /// Take a running job out of the table (so only one caller can finish
    /// it), or explain why there is none.
    async fn take_job(&self, id: &str) -> Result<Job> {
        let job = self.jobs().remove(id);
        if let Some(job) = job {
            return Ok(job);
        }
        Err(self.not_running(id).await)
    }

    /// Why backup `id` has no running job: 409 with its status, or 404.
    async fn not_running(&self, id: &str) -> DaemonError {
        match self.catalog.backup(id).await {
            Ok(Some(b)) => DaemonError::Conflict(format!("backup {id:?} is {}", b.status)),
            Ok(None) => DaemonError::NotFound {
                what: "backup",
                id: id.to_owned(),
            },
            Err(e) => e,
        }
    }

    /// Stop every export of a job (drain, disconnect, flush); returns what
    /// each disk saw and the first flush error.
    async fn stop_exports(&self, job: &mut Job) -> (Vec<DiskFailure>, Option<DaemonError>) {
        job.watchdog.cancel();
        let mut seen = Vec::with_capacity(job.disks.len());
        let mut first_err = None;
        for d in &mut job.disks {
            let Some(p) = d.published.take() else {
                continue;
            };
            let export = Arc::clone(&p.export);
            let snap = match self.nbd.unpublish(p).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(backup = %job.id, disk_id = d.disk_id, error = %e, "flushing the image failed");
                    first_err.get_or_insert(DaemonError::Incomplete(format!(
                        "disk {}: flushing the image failed: {e}",
                        d.disk_id
                    )));
                    export.stats().snapshot()
                }
            };
            seen.push(DiskFailure {
                disk_id: d.disk_id,
                bytes_written: snap.bytes_written,
                write_errors: snap.write_errors,
                last_error: export.stats().last_write_error(),
            });
        }
        (seen, first_err)
    }

    /// Close every image of a job and delete every file it may have
    /// produced (partial and final names, images and digest sidecars).
    /// Closing first matters on a full disk: a removed file's space comes
    /// back only once nothing holds it open, and recording the failure
    /// needs that space.
    async fn remove_files(disks: Vec<DiskJob>) {
        let mut paths = Vec::with_capacity(disks.len() * 4);
        for d in disks {
            if let Err(e) = d.digest.inner().close().await {
                tracing::debug!(disk_id = d.disk_id, error = %e, "closing a failed image");
            }
            let sidecar = Layout::sidecar(&d.final_path);
            let layout = d.layout.clone();
            paths.extend(
                [d.sidecar_partial(), sidecar, d.partial, d.final_path]
                    .map(|p| (layout.clone(), p)),
            );
        }
        for (layout, p) in &paths {
            match layout.remove(p) {
                Ok(()) => tracing::debug!(path = %p.display(), "removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(path = %p.display(), error = %e, "cannot remove image"),
            }
        }
    }

    /// Finish a running backup. It completes only if every byte is there:
    /// no data-changing request failed on any disk, every image flushed,
    /// every digest computed (and equal to the sender's, when given).
    /// Otherwise it fails, its files go, and the error says why.
    pub async fn complete(&self, id: &str, req: CompleteRequest) -> Result<BackupRecord> {
        let mut job = self.take_job(id).await?;
        if let Some(bad) = req
            .disks
            .iter()
            .find(|c| !job.disks.iter().any(|d| d.disk_id == c.disk_id))
        {
            let msg = format!("backup {id:?} has no disk {}", bad.disk_id);
            self.jobs().insert(id.to_owned(), job);
            return Err(DaemonError::BadRequest(msg));
        }
        // Lineage: an incremental is only worth keeping if the next one can
        // build on it, and only the sender knows the change id to build on.
        let no_change_id: Vec<String> = job
            .disks
            .iter()
            .filter(|d| d.incremental)
            .filter(|d| {
                !req.disks.iter().any(|c| {
                    c.disk_id == d.disk_id && c.change_id.as_deref().is_some_and(|s| !s.is_empty())
                })
            })
            .map(|d| d.disk_id.to_string())
            .collect();
        if !no_change_id.is_empty() {
            let e = DaemonError::Incomplete(format!(
                "lineage: incremental disk(s) {} completed without a change id",
                no_change_id.join(", ")
            ));
            return Err(self.fail_job(job, e, Vec::new()).await);
        }
        let (seen, flush_err) = self.stop_exports(&mut job).await;
        let failed: Vec<String> = seen
            .iter()
            .filter(|d| d.write_errors > 0)
            .map(|d| {
                format!(
                    "disk {}: {} failed write request(s), last: {}",
                    d.disk_id,
                    d.write_errors,
                    d.last_error.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if !failed.is_empty() {
            let reason = format!("incomplete: {}", failed.join("; "));
            return Err(self
                .fail_job(job, DaemonError::Incomplete(reason), seen)
                .await);
        }
        if let Some(e) = flush_err {
            return Err(self.fail_job(job, e, seen).await);
        }
        let mut digests = Vec::with_capacity(job.disks.len());
        for d in &job.disks {
            match Self::finish_disk(d, &req).await {
                Ok(h) => digests.push((d.disk_id, h)),
                Err(e) => return Err(self.fail_job(job, e, seen).await),
            }
        }
        if let Err(e) = Self::commit_files(&job) {
            let e = DaemonError::Incomplete(format!("committing images failed: {e}"));
            return Err(self.fail_job(job, e, seen).await);
        }
        let mut completions = Vec::with_capacity(job.disks.len());
        for d in &job.disks {
            let image_bytes = std::fs::metadata(&d.final_path)
                .map(|m| m.len())
                .unwrap_or(0);
            let bytes_written = seen
                .iter()
                .find(|w| w.disk_id == d.disk_id)
                .map_or(0, |w| w.bytes_written);
            let change_id = req
                .disks
                .iter()
                .find(|c| c.disk_id == d.disk_id)
                .and_then(|c| c.change_id.clone());
            let digest = digests
                .iter()
                .find(|x| x.0 == d.disk_id)
                .map(|x| x.1.to_hex())
                .unwrap_or_default();
            completions.push(DiskCompletion {
                disk_id: d.disk_id,
                bytes_written,
                image_bytes,
                change_id,
                digest,
            });
        }
        if let Err(e) = self.catalog.complete(id, completions).await {
            let e = DaemonError::Incomplete(format!("catalog commit failed: {e}"));
            return Err(self.fail_job(job, e, seen).await);
        }
        tracing::info!(backup = id, disks = job.disks.len(), "backup completed");
        self.lifecycle_kick.notify_one();
        self.record(id).await
    }

    /// Digest one drained disk (reading back what was not seen whole),
    /// close its image, and check the sender's digest.
    async fn finish_disk(d: &DiskJob, req: &CompleteRequest) -> Result<Hash> {
        let size = d.digest.inner().size();
        let chain = DigestChain::open(&d.parent_sidecars, size).map_err(|e| {
            DaemonError::Incomplete(format!("disk {}: parent digests: {e}", d.disk_id))
        })?;
        let header = d.digest.finish(&chain).await.map_err(|e| {
            DaemonError::Incomplete(format!("disk {}: computing the digest: {e}", d.disk_id))
        })?;
        d.digest.inner().close().await.map_err(|e| {
            DaemonError::Incomplete(format!("disk {}: closing the image: {e}", d.disk_id))
        })?;
        let claimed = req
            .disks
            .iter()
            .find(|c| c.disk_id == d.disk_id)
            .and_then(|c| c.digest.as_deref());
        if let Some(claimed) = claimed {
            if Hash::from_hex(claimed) != Some(header.root) {
                return Err(DaemonError::Incomplete(format!(
                    "disk {}: digest mismatch: the sender read {claimed}, the hub holds {}",
                    d.disk_id, header.root
                )));
            }
        }
        Ok(header.root)
    }

    /// Rename every `.partial` image and sidecar to its final name and make
    /// the renames durable.
    fn commit_files(job: &Job) -> std::io::Result<()> {
        // Each rename syncs its directory (reached without symlinks).
        for d in &job.disks {
            d.layout.rename(&d.partial, &d.final_path)?;
            d.layout
                .rename(&d.sidecar_partial(), &Layout::sidecar(&d.final_path))?;
        }
        Ok(())
    }

    /// Tear a job down as failed: files deleted, catalog marked with the
    /// error's text. Returns `err` to report.
    async fn fail_job(
        &self,
        mut job: Job,
        err: DaemonError,
        seen: Vec<DiskFailure>,
    ) -> DaemonError {
        let (more, _) = self.stop_exports(&mut job).await;
        let seen = if seen.is_empty() { more } else { seen };
        let Job {
            id,
            disks,
            appliance,
            ..
        } = job;
        Self::remove_files(disks).await;
        let reason = err.to_string();
        if let Err(e) = self.catalog.fail(&id, &reason, seen).await {
            tracing::error!(backup = %id, error = %e, "cannot record failure");
        }
        // Told once the backup is failed and its token void.
        if let Some(url) = appliance {
            self.sna.cancel_in_background(url, id.clone());
        }
        tracing::warn!(backup = %id, reason, "backup failed");
        err
    }

    /// Abort a running backup: stop its exports, delete its images, mark it
    /// failed with `reason`.
    pub async fn abort(&self, id: &str, reason: &str) -> Result<BackupRecord> {
        self.abort_as(id, reason, false).await
    }

    /// [`Backups::abort`]; `by_appliance`: the appliance itself aborts (so
    /// it is not sent a cancel).
    pub async fn abort_as(
        &self,
        id: &str,
        reason: &str,
        by_appliance: bool,
    ) -> Result<BackupRecord> {
        let mut job = self.take_job(id).await?;
        if by_appliance {
            job.appliance = None;
        }
        let (seen, _) = self.stop_exports(&mut job).await;
        let _ = self
            .fail_job(job, DaemonError::Incomplete(reason.to_owned()), seen)
            .await;
        self.record(id).await
    }

    /// A repository's layout and the options to open its restore points
    /// the way every reader must: read-only, strict backing policy inside
    /// the repository.
    async fn reader_of(&self, repository_id: &str) -> Result<(Layout, OpenOptions)> {
        let repo = self
            .catalog
            .repository(repository_id)
            .await?
            .ok_or_else(|| DaemonError::NotFound {
                what: "repository",
                id: repository_id.to_owned(),
            })?;
        let layout = Layout::new(&repo.path);
        let root = layout
            .root()
            .canonicalize()
            .map_err(|e| DaemonError::io(format!("repository {}", repo.path), e))?;
        let opts = OpenOptions::new()
            .read_only(true)
            .policy(BackingPolicy::strict_within([root]));
        Ok((layout, opts))
    }

    /// A backup as recorded, with live figures while it runs.
    pub async fn record(&self, id: &str) -> Result<BackupRecord> {
        let mut b = self
            .catalog
            .backup(id)
            .await?
            .ok_or_else(|| DaemonError::NotFound {
                what: "backup",
                id: id.to_owned(),
            })?;
        self.add_live_stats(&mut b);
        Ok(b)
    }

    /// Record a sender's progress on a running backup (the latest per
    /// disk is kept, in memory).
    pub async fn progress(&self, id: &str, req: sna_contract::ProgressRequest) -> Result<()> {
        {
            let mut jobs = self.jobs();
            if let Some(job) = jobs.get_mut(id) {
                for p in &req.disks {
                    if !job.disks.iter().any(|d| d.disk_id == p.disk_id) {
                        return Err(DaemonError::BadRequest(format!(
                            "backup {id:?} has no disk {}",
                            p.disk_id
                        )));
                    }
                    if p.bytes_done > p.bytes_total {
                        return Err(DaemonError::BadRequest(format!(
                            "disk {}: bytes_done exceeds bytes_total",
                            p.disk_id
                        )));
                    }
                }
                for p in req.disks {
                    job.progress.insert(
                        p.disk_id,
                        Progress {
                            bytes_done: p.bytes_done,
                            bytes_total: p.bytes_total,
                        },
                    );
                }
                return Ok(());
            }
        }
        // Not running: say why, as for complete.
        Err(self.not_running(id).await)
    }

    /// Fill per-disk live counters of a running backup.
    pub fn add_live_stats(&self, b: &mut BackupRecord) {
        if b.status != "running" {
            return;
        }
        let progress = self
            .jobs()
            .get(&b.backup_id)
            .map(|j| j.progress.clone())
            .unwrap_or_default();
        for d in &mut b.disks {
            d.progress = progress.get(&d.disk_id).copied();
            if let Some(e) = self
                .nbd
                .exports()
                .into_iter()
                .find(|e| e.name() == d.nbd_export_name)
            {
                let s = e.stats().snapshot();
                d.bytes_written = s.bytes_written;
                d.write_errors = s.write_errors;
                d.last_error = e.stats().last_write_error();
                d.connections = Some(s.connections_active);
                d.last_activity = (s.last_activity_ms > 0)
                    .then(|| crate::time::rfc3339(s.last_activity_ms as i64));
            }
        }
    }

    /// Delete a finished backup and its files; `Conflict` while it runs, is
    /// being restored, or another backup depends on it. Its offloaded
    /// objects are queued for deletion with its rows and swept in the
    /// background (see `object_sweep`).
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<()> {
        let b = self.record(id).await?;
        if b.status == "running" {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is running; abort it first"
            )));
        }
        if self.restores.lock().await.contains_key(id) {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is being restored"
            )));
        }
        if self.is_verifying(id) {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is being verified"
            )));
        }
        let deps = self.catalog.dependents(id).await?;
        if !deps.is_empty() {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is the parent of {}",
                deps.join(", ")
            )));
        }
        let repo = self.catalog.repository(&b.repository_id).await?;
        if let Some(repo) = repo {
            let layout = Layout::new(&repo.path);
            for d in &b.disks {
                let path = layout.path_of(&d.file);
                let sidecar = Layout::sidecar(&path);
                for p in [
                    Layout::partial(&path),
                    Layout::partial(&sidecar),
                    sidecar,
                    path,
                ] {
                    match layout.remove(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) if crate::confined::is_link_refusal(&e) => {
                            return Err(DaemonError::BadImage(format!(
                                "refusing to remove {}: a symlink is in the way",
                                p.display()
                            )))
                        }
                        Err(e) => {
                            return Err(DaemonError::io(format!("removing {}", p.display()), e))
                        }
                    }
                }
            }
        }
        self.catalog.delete_backup(id).await?;
        tracing::info!(backup = id, "backup deleted");
        if b.disks.iter().any(|d| d.location != "local") {
            self.sweep_objects_soon();
        }
        Ok(())
    }

    /// Abort every running backup and stop every restore export (SIGTERM).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let ids: Vec<String> = self.jobs().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.abort(&id, "daemon shutting down").await {
                tracing::error!(backup = %id, error = %e, "abort on shutdown failed");
            }
        }
        // Appliances of the aborted backups hear of it before we go.
        self.sna.drain().await;
        let restores: Vec<String> = self.restores.lock().await.keys().cloned().collect();
        for id in restores {
            let _ = self.stop_restore(&id).await;
        }
        if let Err(e) = self.nbd.shutdown().await {
            tracing::error!(error = %e, "NBD shutdown failed");
        }
    }
}

/// The API's base URL for a listener on `addr`: its own address, or
/// `advertise_host` when it listens on every address (nobody can call
/// `0.0.0.0`).
fn api_url(scheme: &str, addr: std::net::SocketAddr, advertise_host: &str) -> String {
    if !addr.ip().is_unspecified() {
        return format!("{scheme}://{addr}");
    }
    let host = advertise_host.trim();
    if host.contains(':') && !host.starts_with('[') {
        format!("{scheme}://[{host}]:{}", addr.port())
    } else {
        format!("{scheme}://{host}:{}", addr.port())
    }
}

#[cfg(test)]
mod api_url_tests {
    use super::api_url;

    #[test]
    fn every_address_is_reached_at_the_advertised_host() {
        let a = |s: &str| s.parse().unwrap();
        assert_eq!(
            api_url("http", a("127.0.0.1:8082"), "h"),
            "http://127.0.0.1:8082"
        );
        assert_eq!(api_url("https", a("[::1]:8082"), "h"), "https://[::1]:8082");
        assert_eq!(
            api_url("http", a("0.0.0.0:8082"), "hub1.example"),
            "http://hub1.example:8082"
        );
        assert_eq!(
            api_url("http", a("[::]:9"), "fd00::5"),
            "http://[fd00::5]:9"
        );
        assert_eq!(
            api_url("http", a("[::]:9"), "[fd00::5]"),
            "http://[fd00::5]:9"
        );
    }
}
