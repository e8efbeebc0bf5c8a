//! Startup reconciliation: make the catalog and the files agree again after
//! a crash or kill. Backups left running become failed and their files go;
//! completed backups with missing images are flagged; stray `.partial`
//! files are removed. No port or export survives a restart, so none needs
//! releasing.

use std::path::Path;

use super::{Backups, Layout};
use crate::error::Result;

/// What reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Backups that were running and are now failed.
    pub failed: Vec<String>,
    /// Completed backups with missing images.
    pub missing: Vec<String>,
    /// Stray partial files removed.
    pub removed_partials: usize,
}

fn remove_if_exists(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => tracing::info!(path = %p.display(), "removed image of an unfinished backup"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(path = %p.display(), error = %e, "cannot remove image"),
    }
}

/// Remove every `*.partial` under `dir` (the repository tree is shallow:
/// `<vm>/disk<id>/`).
fn sweep_partials(dir: &Path, depth: usize, removed: &mut usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() && depth < 3 => sweep_partials(&p, depth + 1, removed),
            Ok(t) if t.is_file() && p.extension().is_some_and(|x| x == "partial") => {
                remove_if_exists(&p);
                *removed += 1;
            }
            _ => {}
        }
    }
}

impl Backups {
    /// Reconcile catalog and files (call once, before serving).
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let repos = self.catalog.repositories().await?;
        let layout_of = |repo_id: &str| {
            repos
                .iter()
                .find(|r| r.id == repo_id)
                .map(|r| Layout::new(&r.path))
        };
        for b in self.catalog.backups(None, Some("running".into())).await? {
            if let Some(layout) = layout_of(&b.repository_id) {
                for d in &b.disks {
                    let path = layout.path_of(&d.file);
                    let sidecar = Layout::sidecar(&path);
                    remove_if_exists(&Layout::partial(&path));
                    remove_if_exists(&Layout::partial(&sidecar));
                    remove_if_exists(&sidecar);
                    remove_if_exists(&path);
                }
            }
            self.catalog
                .fail(
                    &b.backup_id,
                    "daemon stopped while the backup was running",
                    Vec::new(),
                )
                .await?;
            tracing::warn!(backup = %b.backup_id, "unfinished backup marked failed");
            report.failed.push(b.backup_id);
        }
        for b in self.catalog.backups(None, Some("completed".into())).await? {
            let Some(layout) = layout_of(&b.repository_id) else {
                continue;
            };
            // Restore points from before digests have no sidecar to miss.
            let missing = b.disks.iter().any(|d| {
                let p = layout.path_of(&d.file);
                !p.is_file() || (d.digest.is_some() && !Layout::sidecar(&p).is_file())
            });
            if missing {
                tracing::error!(backup = %b.backup_id, "completed backup has missing images");
                report.missing.push(b.backup_id.clone());
            }
            if b.verify_status.as_deref() == Some("verifying") {
                // The daemon stopped mid-verify: no outcome was recorded.
                self.catalog.set_verify_status(&b.backup_id, None).await?;
            }
            if missing != b.files_missing {
                self.catalog
                    .set_files_missing(&b.backup_id, missing)
                    .await?;
            }
        }
        for r in &repos {
            sweep_partials(Path::new(&r.path), 0, &mut report.removed_partials);
        }
        Ok(report)
    }
}
