//! Restore exports: a completed restore point (its whole chain) served
//! over NBD, one port per disk: read-only, or writable through throw-away
//! overlays (instant restore: a hypervisor boots the VM straight from the
//! backup while the chain stays untouched).
//!
//! An instant-restore overlay is `<image>.instant`, next to the image so it
//! names its backing file by bare name as every overlay here does. It lives
//! only as long as its restore: stopping the restore (or the daemon)
//! deletes it, and start-up reconciliation sweeps any a crash left behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_server::{BlockBackend, Export};
use qcow_backend::{BackingPolicy, CreateOptions, ImageFormat, OpenOptions, QcowBackend};

use super::{Backups, Layout};
use crate::error::{DaemonError, Result};
use crate::model::{DiskResult, RestoreStarted};
use crate::nbd::Published;

/// Running restore exports of one backup.
#[derive(Debug)]
pub struct Restore {
    published: Vec<Published>,
    /// Instant-restore overlays to delete when the exports are gone.
    overlays: Vec<PathBuf>,
    layout: Layout,
}

/// The instant-restore overlay of image `path`.
pub(crate) fn instant_overlay(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".instant");
    PathBuf::from(s)
}

fn remove_overlays(layout: &Layout, overlays: &[PathBuf]) {
    for o in overlays {
        match layout.remove(o) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %o.display(), error = %e, "cannot remove an instant-restore overlay")
            }
        }
    }
}

impl Backups {
    /// Open what a restore of image `path` serves: the chain itself
    /// (read-only), or a fresh overlay on it that takes the writes.
    async fn restore_backend(
        path: &Path,
        opts: &OpenOptions,
        writable: bool,
        overlays: &mut Vec<PathBuf>,
    ) -> std::result::Result<Arc<dyn BlockBackend>, qcow_backend::ImageError> {
        if !writable {
            return Ok(Arc::new(QcowBackend::open(path, opts).await?));
        }
        let overlay = instant_overlay(path);
        let create = CreateOptions {
            backing_format: Some(ImageFormat::Qcow2),
            ..CreateOptions::overlay(path)
        };
        // The chain below is opened read-only (shared locks) under the
        // repository's strict backing policy; only the overlay is written.
        // O_EXCL: a leftover overlay is refused, never reused.
        let backend = QcowBackend::create(&overlay, &create, opts).await?;
        overlays.push(overlay);
        Ok(Arc::new(backend))
    }

    /// Serve backup `id`: read-only, or `writable` through throw-away
    /// overlays.
    pub async fn start_restore(&self, id: &str, writable: bool) -> Result<RestoreStarted> {
        let b = self.record(id).await?;
        if b.status != "completed" {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is {}, not completed",
                b.status
            )));
        }
        if b.files_missing {
            return Err(DaemonError::BadImage(format!(
                "images of backup {id:?} are missing"
            )));
        }
        let (layout, mut opts) = self.reader_of(&b.repository_id).await?;
        if writable {
            let root = layout.root().canonicalize().map_err(|e| {
                DaemonError::io(format!("repository {}", layout.root().display()), e)
            })?;
            opts = OpenOptions::new().policy(BackingPolicy::strict_within([root]));
        }
        let mut restores = self.restores.lock().await;
        if restores.contains_key(id) {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is already being restored"
            )));
        }
        // Under the restores lock: an eviction (which takes it) cannot
        // remove a layer between its re-hydration and its opening.
        self.ensure_local(id).await?;
        let leases = self.nbd.pool().allocate(b.disks.len())?;
        let mut published: Vec<Published> = Vec::with_capacity(b.disks.len());
        let mut overlays: Vec<PathBuf> = Vec::new();
        let mut results = Vec::with_capacity(b.disks.len());
        let opened: Result<()> = async {
            for (d, (lease, listener)) in b.disks.iter().zip(leases) {
                let path = layout.path_of(&d.file);
                // Reached through plain directories, itself a plain file:
                // a planted symlink is refused (422), never followed.
                layout.check_plain_file(&path).map_err(|e| {
                    DaemonError::BadImage(format!(
                        "disk {}: {} is a symlink or not a plain file inside the repository: {e}",
                        d.disk_id, d.file
                    ))
                })?;
                // Anything wrong with the image is the image's fault: 422
                // with the reason (a lock held by a writer stays a 409).
                let backend = Self::restore_backend(&path, &opts, writable, &mut overlays)
                    .await
                    .map_err(|e| match e.kind() {
                        qcow_backend::ImageErrorKind::Locked => DaemonError::from(e),
                        // A leftover overlay (409) or a full disk (507) is
                        // not the image's fault.
                        qcow_backend::ImageErrorKind::Io | qcow_backend::ImageErrorKind::Exists
                            if writable =>
                        {
                            DaemonError::from(e)
                        }
                        _ => DaemonError::BadImage(format!("disk {}: {e}", d.disk_id)),
                    })?;
                // Unguessable, as backup export names are.
                let name = format!(
                    "restore-{id}-disk{}-{}",
                    d.disk_id,
                    crate::secret::capability()
                        .map_err(|e| DaemonError::io("reading random bytes", e))?
                );
                let export = Export::new(name.clone(), backend)
                    .read_only(!writable)
                    .with_description(format!("restore disk {}", d.disk_id));
                let p = self.nbd.publish(export, lease, listener)?;
                results.push(DiskResult {
                    disk_id: d.disk_id,
                    disk_key: d.disk_key,
                    nbd_port: p.port,
                    nbd_uri: self.nbd.uri(p.port, &name),
                    nbd_export_name: name,
                    qcow2_path: path.display().to_string(),
                    status: "serving".into(),
                    backup_mode: d.backup_mode.clone(),
                    parent_backup_id: d.parent_backup_id.clone(),
                    mode_reason: None,
                });
                published.push(p);
            }
            Ok(())
        }
        .await;
        if let Err(e) = opened {
            for p in published {
                let _ = self.nbd.unpublish(p).await;
            }
            remove_overlays(&layout, &overlays);
            return Err(e);
        }
        let targets = results
            .iter()
            .map(|r| format!("{}:{}", r.disk_key, r.nbd_uri))
            .collect::<Vec<_>>()
            .join(",");
        restores.insert(
            id.to_owned(),
            Restore {
                published,
                overlays,
                layout,
            },
        );
        tracing::info!(backup = id, writable, targets = %targets, "restore exports started");
        Ok(RestoreStarted {
            backup_id: id.to_owned(),
            writable,
            disk_results: results,
            nbd_targets_string: targets,
        })
    }

    /// Stop the restore exports of `id`.
    pub async fn stop_restore(&self, id: &str) -> Result<()> {
        let r = self
            .restores
            .lock()
            .await
            .remove(id)
            .ok_or_else(|| DaemonError::NotFound {
                what: "restore",
                id: id.to_owned(),
            })?;
        for p in r.published {
            if let Err(e) = self.nbd.unpublish(p).await {
                tracing::warn!(backup = id, error = %e, "closing restore export failed");
            }
        }
        // The exports (and their image handles) are gone: the overlays'
        // writes were never part of any restore point.
        remove_overlays(&r.layout, &r.overlays);
        tracing::info!(backup = id, "restore exports stopped");
        Ok(())
    }

    /// Number of backups being restored.
    pub async fn restoring(&self) -> usize {
        self.restores.lock().await.len()
    }
}
