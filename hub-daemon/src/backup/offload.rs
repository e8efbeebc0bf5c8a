//! Offload, eviction and re-hydration of restore points (see
//! [`crate::tier`] for the object side).
//!
//! * **Offload** uploads every local-only layer of a completed restore
//!   point that verified ok, and records each object; the layer becomes
//!   `local+s3`. A prior verification is required rather than run here:
//!   it reads the whole chain (minutes on big disks) and has its own
//!   schedule and throttle, and uploading bytes never checked would make
//!   a damaged copy immutable under Object Lock.
//! * **Evict** deletes the local image of `local+s3` layers (the catalog
//!   first says `s3`, then the file goes). The digest sidecar stays.
//! * **Re-hydrate** ([`Backups::ensure_local`]) brings every `s3` layer of
//!   a restore point's chains back before anything opens them: restore,
//!   verify, prune and synthetic merges, and an incremental's parent.
//! * Objects no layer counts on any more are deleted by the sweep
//!   (`object_sweep`), which holds `lifecycle` like offload.
//!
//! # Locks (always in this order)
//! `lifecycle` (offload and evict, as prune and synthetic builds hold it:
//! a merge rewrites a layer, which must not be uploaded or evicted
//! meanwhile) → `restores` → `tier`. `tier` serialises every location
//! change and download, and a reader re-reads a layer's location under
//! it, so an evict and a re-hydration of one layer never interleave.

use super::{Backups, Layout};
use crate::catalog::{DiskVerified, LayerObject};
use crate::error::{DaemonError, Result};
use crate::model::BackupRecord;
use crate::tier::ObjectTier;

/// Remove `p` if it exists.
fn remove_quietly(layout: &Layout, p: &std::path::Path) {
    match layout.remove(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove"),
    }
}

/// What one scheduled tier pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierReport {
    /// Restore points offloaded.
    pub offloaded: Vec<String>,
    /// Restore points whose local copies were evicted.
    pub evicted: Vec<String>,
    /// Restore points due but left for the next pass, and why.
    pub skipped: Vec<(String, String)>,
    /// Unreferenced objects deleted, and the deletions still owed.
    pub objects: super::SweepReport,
}

impl Backups {
    /// The scheduled tier pass at `now_ms`: offload restore points older
    /// than their policy's `offload_after_days` (once verified ok), then
    /// evict offloaded ones older than `evict_local_after_days`. A busy or
    /// not yet verified point is skipped and retried at the next pass.
    /// Last, the objects still owed a deletion whose retention has ended
    /// by `now_ms` are deleted (see `object_sweep`).
    pub async fn tier_pass(&self, now_ms: i64) -> Result<TierReport> {
        const DAY_MS: i64 = 86_400_000;
        let mut report = TierReport::default();
        let cands = self.catalog.tier_candidates().await?;
        let mut seen = std::collections::BTreeSet::new();
        for c in &cands {
            if !seen.insert(c.backup_id.clone()) {
                continue;
            }
            let disks: Vec<_> = cands
                .iter()
                .filter(|d| d.backup_id == c.backup_id)
                .collect();
            let age = now_ms.saturating_sub(c.completed_ms);
            let offload_due = c.offload_after_days > 0
                && age >= i64::from(c.offload_after_days) * DAY_MS
                && disks.iter().any(|d| d.location == "local");
            let mut offloaded = !disks.iter().any(|d| d.location == "local");
            if offload_due {
                match self.offload(&c.backup_id).await {
                    Ok(_) => {
                        offloaded = true;
                        report.offloaded.push(c.backup_id.clone());
                    }
                    Err(e) => {
                        tracing::info!(backup = %c.backup_id, reason = %e, "scheduled offload postponed");
                        report.skipped.push((c.backup_id.clone(), e.to_string()));
                    }
                }
            }
            let evict_due = c.evict_local_after_days > 0
                && age >= i64::from(c.evict_local_after_days) * DAY_MS
                && offloaded
                && disks.iter().any(|d| d.location == "local+s3");
            if evict_due {
                match self.evict(&c.backup_id).await {
                    Ok(_) => report.evicted.push(c.backup_id.clone()),
                    Err(e) => {
                        tracing::info!(backup = %c.backup_id, reason = %e, "scheduled eviction postponed");
                        report.skipped.push((c.backup_id.clone(), e.to_string()));
                    }
                }
            }
        }
        // Retries the deletions earlier merges, prunes and deletes queued
        // (a locked object's, once its retention has ended).
        match self.sweep_objects(now_ms).await {
            Ok(s) => report.objects = s,
            Err(e) => tracing::warn!(error = %e, "object sweep failed; the next pass retries it"),
        }
        Ok(report)
    }

    /// The object tier of a repository; 409 if it has none.
    pub(crate) async fn tier_of(&self, repository_id: &str) -> Result<ObjectTier> {
        let s = self
            .catalog
            .repository_s3(repository_id)
            .await?
            .ok_or_else(|| {
                DaemonError::Conflict(format!(
                    "repository {repository_id:?} has no object-storage (s3) tier"
                ))
            })?;
        ObjectTier::connect(&s)
    }

    /// Offload every local-only layer of `id` (completed, verified ok).
    pub async fn offload(&self, id: &str) -> Result<BackupRecord> {
        let _lifecycle = self.lifecycle.lock().await;
        let b = self.record(id).await?;
        if b.status != "completed" {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is {}, not completed",
                b.status
            )));
        }
        if b.verify_status.as_deref() != Some("ok") {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} has not verified ok (verify_status {:?}): verify it first",
                b.verify_status
            )));
        }
        let tier = self.tier_of(&b.repository_id).await?;
        let (layout, _) = self.reader_of(&b.repository_id).await?;
        let retain_days = match &b.policy_id {
            Some(p) => self
                .catalog
                .policy(p)
                .await?
                .map_or(0, |p| p.min_retention_days),
            None => 0,
        };
        for d in b.disks.iter().filter(|d| d.location == "local") {
            let path = layout.path_of(&d.file);
            let file = layout.open_file(&path, false).map_err(|e| {
                DaemonError::BadImage(format!(
                    "disk {}: {} is not a plain file inside the repository: {e}",
                    d.disk_id, d.file
                ))
            })?;
            let key = ObjectTier::key_of(&b.repository_id, &d.file);
            let started = std::time::Instant::now();
            let up = tier.upload(file, &key).await?;
            let mut retain_until_ms = None;
            if retain_days > 0 {
                // Whole seconds: S3 dates have no milliseconds to spare.
                let until = (crate::time::now_ms() / 1000 + i64::from(retain_days) * 86_400) * 1000;
                match tier
                    .signer()
                    .put_retention(&key, up.version_id.as_deref(), until)
                    .await
                {
                    Ok(()) => retain_until_ms = Some(until),
                    Err(e) => {
                        tracing::warn!(backup = id, disk = d.disk_id, error = %e,
                            "the object store refused an Object Lock retention (is Object Lock enabled on the bucket?); the object is not locked")
                    }
                }
            }
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(backup = id, disk = d.disk_id, key = %key, bytes = up.size_bytes,
                secs, locked = retain_until_ms.is_some(), "layer offloaded");
            self.catalog
                .record_offload(LayerObject {
                    backup_id: id.to_owned(),
                    disk_id: d.disk_id,
                    object_key: key,
                    size_bytes: up.size_bytes,
                    sha256: up.sha256,
                    version_id: up.version_id,
                    retain_until_ms,
                    uploaded_ms: crate::time::now_ms(),
                })
                .await?;
        }
        self.record(id).await
    }

    /// Delete the local copy of every offloaded layer of `id`; 409 unless
    /// each is offloaded, or while the VM is backed up, or any of its
    /// restore points is restored or verified.
    pub async fn evict(&self, id: &str) -> Result<BackupRecord> {
        let _lifecycle = self.lifecycle.lock().await;
        let b = self.record(id).await?;
        if let Some(d) = b.disks.iter().find(|d| d.location == "local") {
            return Err(DaemonError::Conflict(format!(
                "disk {} of backup {id:?} is not offloaded",
                d.disk_id
            )));
        }
        let (layout, _) = self.reader_of(&b.repository_id).await?;
        let restores = self.restores.lock().await;
        let siblings = self.catalog.backups(Some(b.vm_name.clone()), None).await?;
        for s in &siblings {
            if s.status == "running" {
                return Err(DaemonError::Conflict(format!(
                    "a backup of VM {:?} is running",
                    b.vm_name
                )));
            }
            if restores.contains_key(&s.backup_id) || self.is_verifying(&s.backup_id) {
                return Err(DaemonError::Conflict(format!(
                    "backup {:?} of VM {:?} is being restored or verified",
                    s.backup_id, b.vm_name
                )));
            }
        }
        let _tier = self.tier.lock().await;
        for d in b.disks.iter().filter(|d| d.location == "local+s3") {
            // The catalog first: a crash in between leaves a file the
            // catalog does not count on, never a location that lies.
            if self
                .catalog
                .set_location(id, d.disk_id, "local+s3", "s3")
                .await?
            {
                remove_quietly(&layout, &layout.path_of(&d.file));
                tracing::info!(backup = id, disk = d.disk_id, "local copy evicted");
            }
        }
        drop(restores);
        self.record(id).await
    }

    /// Re-hydrate every evicted layer in the chains of restore point `id`.
    pub(crate) async fn ensure_local(&self, id: &str) -> Result<()> {
        let b = self.record(id).await?;
        for d in &b.disks {
            let chain = self
                .catalog
                .chain(id, d.disk_id, qcow_backend::DEFAULT_MAX_DEPTH)
                .await?;
            for link in chain.iter().filter(|l| l.location == "s3") {
                self.rehydrate(&b.repository_id, &link.backup_id, d.disk_id, &link.file)
                    .await?;
            }
        }
        Ok(())
    }

    /// Download one evicted layer back into place, checked against its
    /// recorded size and SHA-256. A mismatch flags the layer corrupt and
    /// fails (422): the download is deleted, never served.
    async fn rehydrate(
        &self,
        repo_id: &str,
        backup_id: &str,
        disk_id: u32,
        file: &str,
    ) -> Result<()> {
        let _tier = self.tier.lock().await;
        // Again under the lock: another reader may have brought it back.
        let now = self.catalog.backup(backup_id).await?;
        let evicted = now
            .as_ref()
            .and_then(|b| b.disks.iter().find(|d| d.disk_id == disk_id))
            .is_some_and(|d| d.location == "s3");
        if !evicted {
            return Ok(());
        }
        let obj = self
            .catalog
            .layer_object(backup_id, disk_id)
            .await?
            .ok_or_else(|| {
                DaemonError::BadImage(format!(
                    "disk {disk_id} of backup {backup_id:?} is evicted but no object is recorded"
                ))
            })?;
        let tier = self.tier_of(repo_id).await?;
        let (layout, _) = self.reader_of(repo_id).await?;
        let path = layout.path_of(file);
        let part = Layout::rehydrating(&path);
        // An earlier attempt's leftover was never checked: start afresh.
        remove_quietly(&layout, &part);
        let out = layout
            .open_file(&part, true)
            .map_err(|e| DaemonError::io(format!("creating {}", part.display()), e))?;
        let started = std::time::Instant::now();
        let got = tier
            .download(&obj.object_key, obj.version_id.clone(), out, obj.size_bytes)
            .await;
        let (size, sha) = match got {
            Ok(v) => v,
            Err(e) => {
                remove_quietly(&layout, &part);
                if let DaemonError::BadImage(why) = &e {
                    self.flag_object_corrupt(backup_id, disk_id, why).await;
                }
                return Err(e);
            }
        };
        if size != obj.size_bytes || sha != obj.sha256 {
            remove_quietly(&layout, &part);
            let why = format!(
                "object {} does not match what was offloaded: {size} bytes with SHA-256 {sha}, recorded {} bytes with SHA-256 {}",
                obj.object_key, obj.size_bytes, obj.sha256
            );
            self.flag_object_corrupt(backup_id, disk_id, &why).await;
            return Err(DaemonError::BadImage(format!(
                "re-hydrating disk {disk_id} of backup {backup_id:?}: {why}; the layer is flagged corrupt"
            )));
        }
        layout
            .rename(&part, &path)
            .map_err(|e| DaemonError::io(format!("renaming {}", part.display()), e))?;
        self.catalog
            .set_location(backup_id, disk_id, "s3", "local+s3")
            .await?;
        tracing::info!(
            backup = backup_id,
            disk = disk_id,
            bytes = size,
            secs = started.elapsed().as_secs_f64(),
            "layer re-hydrated"
        );
        Ok(())
    }

    /// Record a damaged object as this layer's verification outcome, so
    /// nothing builds on it and the API shows why.
    async fn flag_object_corrupt(&self, backup_id: &str, disk_id: u32, why: &str) {
        tracing::error!(
            backup = backup_id,
            disk = disk_id,
            why,
            "offloaded object is damaged"
        );
        let detail = serde_json::json!({ "object": why }).to_string();
        let r = self
            .catalog
            .record_verify(vec![DiskVerified {
                backup_id: backup_id.to_owned(),
                disk_id,
                status: "corrupt".into(),
                detail,
            }])
            .await;
        if let Err(e) = r {
            tracing::error!(backup = backup_id, error = %e, "cannot flag the layer corrupt");
        }
    }
}
