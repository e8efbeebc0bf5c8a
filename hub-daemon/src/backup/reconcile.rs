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

fn remove_if_exists(layout: &Layout, p: &Path) {
    match layout.remove(p) {
        Ok(()) => tracing::info!(path = %p.display(), "removed image of an unfinished backup"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(path = %p.display(), error = %e, "cannot remove image"),
    }
}

/// Whether `name` is one of the hub's own in-progress files for VM `vm`:
/// `backup-<vm>-<digits>-<digits>.qcow2.partial` or
/// `...qcow2.digest.partial`, or a prune's uncommitted merge result
/// `...qcow2.merging` / `...qcow2.digest.merging` (committed ones were
/// renamed by the journal first), or an instant restore's throw-away
/// overlay `...qcow2.instant` (no restore survives a restart), or an
/// unfinished re-hydration download `...qcow2.rehydrating` (unchecked, so
/// never used).
fn is_own_partial(vm: &str, name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("backup-")
        .and_then(|r| r.strip_prefix(vm))
        .and_then(|r| r.strip_prefix('-'))
    else {
        return false;
    };
    let Some(stamp) = rest
        .strip_suffix(".qcow2.partial")
        .or_else(|| rest.strip_suffix(".qcow2.digest.partial"))
        .or_else(|| rest.strip_suffix(".qcow2.merging"))
        .or_else(|| rest.strip_suffix(".qcow2.digest.merging"))
        .or_else(|| rest.strip_suffix(".qcow2.instant"))
        .or_else(|| rest.strip_suffix(".qcow2.rehydrating"))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    matches!(stamp.split_once('-'), Some((a, b)) if digits(a) && digits(b))
}

/// Plain directories (never symlinks) in `dir`, by name.
fn plain_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        // DirEntry::file_type does not follow symlinks.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Remove the hub's own stray partial files, and only those: names as
/// [`is_own_partial`], in the hub's layout `<repo>/<vm>/disk<N>/`, plain
/// files reached through plain directories. Symlinks are never followed
/// (and removal itself goes through [`Layout::remove`]).
///
/// In a shared repository other nodes' backups, merges and restores have
/// files in progress too: only the VMs in `only` are swept there.
fn sweep_partials(layout: &Layout, only: Option<&[String]>, removed: &mut usize) {
    let root = layout.root();
    for vm in plain_dirs(root) {
        if crate::names::validate("vm_name", &vm).is_err() {
            continue;
        }
        if only.is_some_and(|vms| !vms.contains(&vm)) {
            continue;
        }
        let vm_dir = root.join(&vm);
        for disk in plain_dirs(&vm_dir) {
            let Some(n) = disk.strip_prefix("disk") else {
                continue;
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let disk_dir = vm_dir.join(&disk);
            let Ok(entries) = std::fs::read_dir(&disk_dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if !is_own_partial(&vm, name) || !e.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                let p = disk_dir.join(name);
                match layout.remove(&p) {
                    Ok(()) => {
                        tracing::info!(path = %p.display(), "removed a stray partial file");
                        *removed += 1;
                    }
                    Err(e) => {
                        tracing::error!(path = %p.display(), error = %e, "cannot remove a stray partial file")
                    }
                }
            }
        }
    }
}

impl Backups {
    /// Reconcile catalog and files (call once, before serving).
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        // A prune that committed owes its file work; finish it before
        // anything looks at the files (and before the sweep below would
        // take its `.merging` files for litter).
        self.finish_prune_journal().await?;
        // Only this node's: on a shared catalog the other nodes' backups
        // and files are theirs to reconcile (a dead node's running backups
        // are failed by the lease reaper, `lifecycle::fleet`).
        let repos = self.catalog.own_repositories().await?;
        let own = self.catalog.node_id().to_owned();
        let layout_of = |repo_id: &str| {
            repos
                .iter()
                .find(|r| r.id == repo_id)
                .map(|r| Layout::new(&r.path))
        };
        for b in self.catalog.backups(None, Some("running".into())).await? {
            if b.node_id != own {
                continue;
            }
            if let Some(layout) = layout_of(&b.repository_id) {
                for d in &b.disks {
                    let path = layout.path_of(&d.file);
                    let sidecar = Layout::sidecar(&path);
                    remove_if_exists(&layout, &Layout::partial(&path));
                    remove_if_exists(&layout, &Layout::partial(&sidecar));
                    remove_if_exists(&layout, &sidecar);
                    remove_if_exists(&layout, &path);
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
            if b.node_id != own {
                continue;
            }
            let Some(layout) = layout_of(&b.repository_id) else {
                continue;
            };
            // Restore points from before digests have no sidecar to miss.
            // An evicted layer ('s3') has no local image by design; its
            // sidecar stays local.
            let missing = b.disks.iter().any(|d| {
                let p = layout.path_of(&d.file);
                (d.location != "s3" && !p.is_file())
                    || (d.digest.is_some() && !Layout::sidecar(&p).is_file())
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
            let only = if r.shared {
                Some(self.catalog.sweepable_vms(&r.id).await?)
            } else {
                None
            };
            sweep_partials(
                &Layout::new(&r.path),
                only.as_deref(),
                &mut report.removed_partials,
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hubs_own_partials_match() {
        for ok in [
            "backup-vm1-1700000000000-0001.qcow2.partial",
            "backup-vm1-1-2.qcow2.digest.partial",
            "backup-vm1-1-2.qcow2.merging",
            "backup-vm1-1-2.qcow2.digest.merging",
            "backup-vm1-1-2.qcow2.instant",
            "backup-vm1-1-2.qcow2.rehydrating",
        ] {
            assert!(is_own_partial("vm1", ok), "{ok}");
        }
        for bad in [
            "notes.partial",
            "x.partial",
            "backup-vm2-1-2.qcow2.partial",
            "backup-vm1-1-2.qcow2",
            "backup-vm1-1.qcow2.partial",
            "backup-vm1-a-2.qcow2.partial",
            "backup-vm1--2.qcow2.partial",
            "backup-vm1-1-2.raw.partial",
            "backup-vm2-1-2.qcow2.rehydrating",
            "x.rehydrating",
        ] {
            assert!(!is_own_partial("vm1", bad), "{bad}");
        }
    }
}
