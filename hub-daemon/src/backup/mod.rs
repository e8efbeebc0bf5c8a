//! Backup orchestration: the state machine of a VM backup, with no HTTP in
//! sight.
//!
//! ```text
//!  start ──▶ running ──complete──▶ completed
//!               │  └──abort / idle / error / shutdown──▶ failed
//!               └─ (daemon killed) ── reconcile on start ──▶ failed
//! ```
//!
//! A running backup is a [`Job`]: one qcow2 image per disk being written
//! under a `.partial` name, each served on its own NBD port. `start` is
//! all-or-nothing: any failure part-way releases every port and export,
//! deletes every file and leaves no catalog row. `complete` drains and
//! flushes every export, renames and syncs the files, then commits the
//! catalog in one transaction.

mod layout;
mod reconcile;
mod restore;
mod start;
mod watchdog;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, DiskCompletion};
use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::model::{BackupRecord, CompleteRequest};
use crate::nbd::{NbdHub, Published};

pub use layout::Layout;
pub use reconcile::ReconcileReport;
pub use restore::Restore;

/// One disk of a running backup.
#[derive(Debug)]
struct DiskJob {
    disk_id: u32,
    partial: PathBuf,
    final_path: PathBuf,
    /// `None` once the export has been stopped.
    published: Option<Published>,
}

/// A running backup.
#[derive(Debug)]
pub(crate) struct Job {
    id: String,
    disks: Vec<DiskJob>,
    watchdog: CancellationToken,
}

/// The backup service: owns running jobs and restore exports.
#[derive(Debug)]
pub struct Backups {
    catalog: Catalog,
    nbd: NbdHub,
    config: Config,
    jobs: Mutex<HashMap<String, Job>>,
    restores: tokio::sync::Mutex<HashMap<String, Restore>>,
    shutting_down: AtomicBool,
    seq: AtomicU32,
}

impl Backups {
    /// A service over an open catalog and a started NBD hub.
    pub fn new(catalog: Catalog, nbd: NbdHub, config: Config) -> Arc<Backups> {
        Arc::new(Backups {
            catalog,
            nbd,
            config,
            jobs: Mutex::new(HashMap::new()),
            restores: tokio::sync::Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            seq: AtomicU32::new(0),
        })
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The NBD hub.
    pub fn nbd(&self) -> &NbdHub {
        &self.nbd
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
        match self.catalog.backup(id).await? {
            Some(b) => Err(DaemonError::Conflict(format!(
                "backup {id:?} is {}",
                b.status
            ))),
            None => Err(DaemonError::NotFound {
                what: "backup",
                id: id.to_owned(),
            }),
        }
    }

    /// Stop every export of a job (drain, close, flush); returns bytes
    /// written per disk and the first close error.
    async fn stop_exports(&self, job: &mut Job) -> (Vec<(u32, u64)>, Option<DaemonError>) {
        job.watchdog.cancel();
        let mut written = Vec::with_capacity(job.disks.len());
        let mut first_err = None;
        for d in &mut job.disks {
            let Some(p) = d.published.take() else {
                continue;
            };
            let seen = p.export.stats().snapshot().bytes_written;
            match self.nbd.unpublish(p).await {
                Ok(s) => written.push((d.disk_id, s.bytes_written)),
                Err(e) => {
                    tracing::error!(backup = %job.id, disk_id = d.disk_id, error = %e, "closing export failed");
                    written.push((d.disk_id, seen));
                    first_err.get_or_insert(e);
                }
            }
        }
        (written, first_err)
    }

    /// Delete every file a job may have produced (partial and final names).
    fn remove_files(job: &Job) {
        for d in &job.disks {
            for p in [&d.partial, &d.final_path] {
                match std::fs::remove_file(p) {
                    Ok(()) => tracing::debug!(path = %p.display(), "removed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(path = %p.display(), error = %e, "cannot remove image")
                    }
                }
            }
        }
    }

    /// Finish a running backup: stop the exports (drain, flush, sync),
    /// rename the images to their final names, commit the catalog.
    pub async fn complete(&self, id: &str, req: CompleteRequest) -> Result<BackupRecord> {
        let mut job = self.take_job(id).await?;
        let (written, err) = self.stop_exports(&mut job).await;
        if let Some(e) = err {
            return Err(self
                .fail_job(job, &format!("flushing images failed: {e}"), written)
                .await
                .unless_no_space(&e));
        }
        if let Err(e) = Self::commit_files(&job) {
            return Err(self
                .fail_job(job, &format!("committing images failed: {e}"), written)
                .await
                .unless_no_space(&e));
        }
        let mut completions = Vec::with_capacity(job.disks.len());
        for d in &job.disks {
            let image_bytes = std::fs::metadata(&d.final_path)
                .map(|m| m.len())
                .unwrap_or(0);
            let bytes_written = written.iter().find(|w| w.0 == d.disk_id).map_or(0, |w| w.1);
            let change_id = req
                .disks
                .iter()
                .find(|c| c.disk_id == d.disk_id)
                .map(|c| c.change_id.clone());
            completions.push(DiskCompletion {
                disk_id: d.disk_id,
                bytes_written,
                image_bytes,
                change_id,
            });
        }
        if let Err(e) = self.catalog.complete(id, completions).await {
            return Err(self
                .fail_job(job, &format!("catalog commit failed: {e}"), written)
                .await
                .unless_no_space(&e));
        }
        tracing::info!(backup = id, disks = job.disks.len(), "backup completed");
        self.record(id).await
    }

    /// Rename every `.partial` image to its final name and make the renames
    /// durable.
    fn commit_files(job: &Job) -> std::io::Result<()> {
        for d in &job.disks {
            std::fs::rename(&d.partial, &d.final_path)?;
        }
        for d in &job.disks {
            if let Some(dir) = d.final_path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Tear a job down as failed: files deleted, catalog marked. Returns the
    /// error to report.
    async fn fail_job(&self, mut job: Job, reason: &str, written: Vec<(u32, u64)>) -> DaemonError {
        let (more, _) = self.stop_exports(&mut job).await;
        let written = if written.is_empty() { more } else { written };
        Self::remove_files(&job);
        if let Err(e) = self.catalog.fail(&job.id, reason, written).await {
            tracing::error!(backup = %job.id, error = %e, "cannot record failure");
        }
        tracing::warn!(backup = %job.id, reason, "backup failed");
        DaemonError::Internal(reason.to_owned())
    }

    /// Abort a running backup: stop its exports, delete its images, mark it
    /// failed with `reason`.
    pub async fn abort(&self, id: &str, reason: &str) -> Result<BackupRecord> {
        let mut job = self.take_job(id).await?;
        let (written, _) = self.stop_exports(&mut job).await;
        let _ = self.fail_job(job, reason, written).await;
        self.record(id).await
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

    /// Fill per-disk live counters of a running backup.
    pub fn add_live_stats(&self, b: &mut BackupRecord) {
        if b.status != "running" {
            return;
        }
        for d in &mut b.disks {
            if let Some(e) = self
                .nbd
                .exports()
                .into_iter()
                .find(|e| e.name() == d.nbd_export_name)
            {
                let s = e.stats().snapshot();
                d.bytes_written = s.bytes_written;
                d.connections = Some(s.connections_active);
                d.last_activity = (s.last_activity_ms > 0)
                    .then(|| crate::time::rfc3339(s.last_activity_ms as i64));
            }
        }
    }

    /// Delete a finished backup and its files; `Conflict` while it runs, is
    /// being restored, or another backup depends on it.
    pub async fn delete(&self, id: &str) -> Result<()> {
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
                for p in [Layout::partial(&path), path] {
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(DaemonError::io(format!("removing {}", p.display()), e))
                        }
                    }
                }
            }
        }
        self.catalog.delete_backup(id).await?;
        tracing::info!(backup = id, "backup deleted");
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
        let restores: Vec<String> = self.restores.lock().await.keys().cloned().collect();
        for id in restores {
            let _ = self.stop_restore(&id).await;
        }
        if let Err(e) = self.nbd.shutdown().await {
            tracing::error!(error = %e, "NBD shutdown failed");
        }
    }
}
