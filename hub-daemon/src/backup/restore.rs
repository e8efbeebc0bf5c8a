//! Restore exports: a completed restore point (its whole chain) served
//! read-only over NBD, one port per disk.

use std::sync::Arc;

use nbd_server::Export;
use qcow_backend::QcowBackend;

use super::Backups;
use crate::error::{DaemonError, Result};
use crate::model::{DiskResult, RestoreStarted};
use crate::nbd::Published;

/// Running restore exports of one backup.
#[derive(Debug)]
pub struct Restore {
    published: Vec<Published>,
}

impl Backups {
    /// Serve backup `id` read-only.
    pub async fn start_restore(&self, id: &str) -> Result<RestoreStarted> {
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
        let (layout, opts) = self.reader_of(&b.repository_id).await?;
        let mut restores = self.restores.lock().await;
        if restores.contains_key(id) {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is already being restored"
            )));
        }
        let leases = self.nbd.pool().allocate(b.disks.len())?;
        let mut published: Vec<Published> = Vec::with_capacity(b.disks.len());
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
                let backend =
                    QcowBackend::open(&path, &opts)
                        .await
                        .map_err(|e| match e.kind() {
                            qcow_backend::ImageErrorKind::Locked => DaemonError::from(e),
                            _ => DaemonError::BadImage(format!("disk {}: {e}", d.disk_id)),
                        })?;
                // Unguessable, as backup export names are.
                let name = format!(
                    "restore-{id}-disk{}-{}",
                    d.disk_id,
                    crate::secret::capability()
                        .map_err(|e| DaemonError::io("reading random bytes", e))?
                );
                let export = Export::new(name.clone(), Arc::new(backend))
                    .read_only(true)
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
            return Err(e);
        }
        let targets = results
            .iter()
            .map(|r| format!("{}:{}", r.disk_key, r.nbd_uri))
            .collect::<Vec<_>>()
            .join(",");
        restores.insert(id.to_owned(), Restore { published });
        tracing::info!(backup = id, targets = %targets, "restore exports started");
        Ok(RestoreStarted {
            backup_id: id.to_owned(),
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
        tracing::info!(backup = id, "restore exports stopped");
        Ok(())
    }

    /// Number of backups being restored.
    pub async fn restoring(&self) -> usize {
        self.restores.lock().await.len()
    }
}
