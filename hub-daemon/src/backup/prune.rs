//! Prune: apply retention policies to completed backups, chain-aware.
//!
//! Per (VM, repository), the backups of each policy get the retention
//! planner's verdicts ([`crate::lifecycle::retention`]); backups without a
//! policy are never removed. Then, per disk, the chain planner
//! ([`crate::lifecycle::chains`]) says which kept images must be merged
//! over removed ancestors so nothing is orphaned.
//!
//! # Crash consistency
//! The merged image keeps the kept image's file name: overlays on it name
//! their backing file by bare name, so a new name would orphan them. The
//! order is:
//! 1. every merge writes `<image>.merging` (and `<image>.digest.merging`),
//!    made durable; nothing else has changed;
//! 2. ONE catalog transaction re-parents the merged images, deletes the
//!    removed backups' rows (queuing the deletion of every S3 object the
//!    merged and removed layers had; see `object_sweep`, run after the
//!    prune), and journals the file work still owed
//!    (`prune_journal`: rename each `.merging` over its image, remove each
//!    removed image and sidecar);
//! 3. the journal is carried out (renames first, each syncing its
//!    directory; then removals) and cleared.
//!
//! Killed before 2 commits: the catalog and the images are the old ones;
//! start-up sweeps the stray `.merging` files. Killed after: the catalog
//! is the new one and start-up finishes the journal before anything is
//! served (a rename whose `.merging` is gone was done; a removal of a
//! missing file was done), so it never acts twice. Between 2 and 3 in a
//! live daemon the old files still exist and hold the same guest data;
//! restores of the VM are held off until 3 is done. (A backup starting
//! in that short window finds the old chain disagreeing with the catalog
//! and goes full; a verify started after the commit's check may see files go
//! and report them; neither loses data.)
//!
//! # Digests
//! A merged image's guest contents are unchanged, so its recorded root
//! digest stays valid. Its sidecar, though, is sparse (leaves of blocks it
//! did not write live in ancestors' sidecars, which go) and records its
//! parent's root. So a new sidecar is written beside the merged image:
//! every leaf filled in from the old chain, the same segments and root,
//! and the new parent's root (none for a synthetic full). Verify and the
//! next incremental then link it to its new parent as to any other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use disk_digest::algo::Geometry;
use disk_digest::{DigestChain, Hash, Sidecar};
use qcow_backend::{BackingPolicy, MergeOptions};
use serde::{Deserialize, Serialize};

use super::{Backups, Layout};
use crate::catalog::{JournalEntry, Policy, PruneCandidate, PruneCommit, Reparent};
use crate::error::{DaemonError, Result};
use crate::lifecycle::{chains, retention};

/// Body of `POST /api/v1/prune`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Only this VM.
    #[serde(default)]
    pub vm_name: Option<String>,
    /// Only this repository.
    #[serde(default)]
    pub repository_id: Option<String>,
    /// Plan only. Required: a destructive default would be a trap.
    pub dry_run: bool,
}

/// A kept restore point and the rule that keeps it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeptPoint {
    /// Backup.
    pub backup_id: String,
    /// Retention rule ("last", "daily", …, "min-retention").
    pub rule: String,
}

/// One image rewrite.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MergeStep {
    /// Disk.
    pub disk_id: u32,
    /// The kept backup whose image is rewritten.
    pub into: String,
    /// Removed ancestors folded in, nearest first.
    pub drop: Vec<String>,
    /// Its parent afterwards (`null`: a synthetic full).
    pub new_parent: Option<String>,
}

/// What prune keeps, removes and merges for one VM in one repository.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PruneReport {
    /// VM.
    pub vm_name: String,
    /// Repository.
    pub repository_id: String,
    /// Policy-governed backups kept.
    pub keep: Vec<KeptPoint>,
    /// Backups removed.
    pub remove: Vec<String>,
    /// Image merges.
    pub merges: Vec<MergeStep>,
}

/// The `.merging` name of an image or sidecar.
pub(super) fn merging(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".merging");
    PathBuf::from(s)
}

fn keep_of(p: &Policy) -> retention::Keep {
    retention::Keep {
        last: p.keep_last,
        hourly: p.keep_hourly,
        daily: p.keep_daily,
        weekly: p.keep_weekly,
        monthly: p.keep_monthly,
        yearly: p.keep_yearly,
    }
}

/// Plan one VM/repository group (`cands`: all its completed backups).
/// `None` if no backup of it is governed by a known policy.
fn plan_group(
    vm: &str,
    repo: &str,
    cands: &[&PruneCandidate],
    policies: &HashMap<String, Policy>,
    now_ms: i64,
) -> Result<Option<PruneReport>> {
    let mut by_policy: BTreeMap<&str, Vec<&PruneCandidate>> = BTreeMap::new();
    for c in cands {
        if let Some(p) = c.policy_id.as_deref().filter(|p| policies.contains_key(*p)) {
            by_policy.entry(p).or_default().push(c);
        }
    }
    if by_policy.is_empty() {
        return Ok(None);
    }
    let mut keep = Vec::new();
    let mut remove = BTreeSet::new();
    for (pid, group) in &by_policy {
        let Some(policy) = policies.get(*pid) else {
            continue;
        };
        let points: Vec<retention::Point> = group
            .iter()
            .map(|c| retention::Point {
                id: c.backup_id.clone(),
                time_ms: c.created_ms,
            })
            .collect();
        let verdicts =
            retention::plan(&points, &keep_of(policy), policy.min_retention_days, now_ms);
        for (c, v) in group.iter().zip(verdicts) {
            match v {
                retention::Verdict::Keep(rule) => keep.push(KeptPoint {
                    backup_id: c.backup_id.clone(),
                    rule: rule.to_owned(),
                }),
                retention::Verdict::Remove => {
                    remove.insert(c.backup_id.clone());
                }
            }
        }
    }
    // Chains span every completed backup of the VM here, governed or not
    // (a chain may cross policies); only removed ones go.
    let kept: HashSet<String> = cands
        .iter()
        .filter(|c| !remove.contains(&c.backup_id))
        .map(|c| c.backup_id.clone())
        .collect();
    let disks: BTreeSet<u32> = cands
        .iter()
        .flat_map(|c| c.disks.iter().map(|d| d.0))
        .collect();
    let mut merges = Vec::new();
    for disk in disks {
        let images: Vec<chains::Image> = cands
            .iter()
            .filter_map(|c| {
                c.disks.iter().find(|d| d.0 == disk).map(|d| chains::Image {
                    backup_id: c.backup_id.clone(),
                    parent: d.1.clone(),
                })
            })
            .collect();
        let plan = chains::plan(&images, &kept).map_err(|e| {
            DaemonError::BadImage(format!("VM {vm:?} in {repo:?}, disk {disk}: {e}"))
        })?;
        merges.extend(plan.merges.into_iter().map(|m| MergeStep {
            disk_id: disk,
            into: m.into,
            drop: m.drop,
            new_parent: m.new_parent,
        }));
    }
    Ok(Some(PruneReport {
        vm_name: vm.to_owned(),
        repository_id: repo.to_owned(),
        keep,
        remove: remove.into_iter().collect(),
        merges,
    }))
}

/// Write the merged image's sidecar: every leaf of the old chain's
/// newest restore point (`old`: its sidecars, newest first), its segments
/// and root, linked to `new_parent_root`.
fn rewrite_sidecar(old: &[PathBuf], new_parent_root: Hash, out: &Path) -> std::io::Result<()> {
    let invalid = |e: disk_digest::SidecarError| std::io::Error::other(e.to_string());
    let Some(first) = old.first() else {
        return Err(std::io::Error::other("no sidecar to rewrite"));
    };
    let (_, header, _) = Sidecar::open(first).map_err(invalid)?;
    let chain = DigestChain::open(old, header.size).map_err(invalid)?;
    let g = Geometry::new(header.size);
    let new = Sidecar::create(out, header.size).map_err(invalid)?;
    let mut segments = Vec::with_capacity(g.segments() as usize);
    for s in 0..g.segments() {
        let (first_block, _) = g.segment_blocks(s);
        new.write_leaves(first_block, &chain.leaves(&g, s)?)?;
        segments.push(chain.segment(&g, s));
    }
    new.finish(chain.root(), new_parent_root, &segments)?;
    Ok(())
}

impl Backups {
    /// Plan retention for every (VM, repository) with policy-governed
    /// backups and, unless `dry_run`, carry it out.
    pub async fn prune(&self, req: PruneRequest) -> Result<Vec<PruneReport>> {
        // A dry run too: its plan should be the one a run would carry out,
        // not one a concurrent merge is about to change.
        let lifecycle = self.lifecycle.lock().await;
        let cands = self
            .catalog
            .prune_candidates(req.vm_name.clone(), req.repository_id.clone())
            .await?;
        let policies: HashMap<String, Policy> = self
            .catalog
            .policies()
            .await?
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        let now = crate::time::now_ms();
        let mut groups: BTreeMap<(&str, &str), Vec<&PruneCandidate>> = BTreeMap::new();
        for c in &cands {
            groups
                .entry((c.vm_name.as_str(), c.repository_id.as_str()))
                .or_default()
                .push(c);
        }
        let mut reports = Vec::new();
        for ((vm, repo), group) in &groups {
            if let Some(r) = plan_group(vm, repo, group, &policies, now)? {
                reports.push((r, group));
            }
        }
        if req.dry_run {
            return Ok(reports.into_iter().map(|r| r.0).collect());
        }
        // Refuse before changing anything if any group with work is busy.
        for (r, group) in reports.iter().filter(|r| !r.0.remove.is_empty()) {
            self.check_idle(r, group).await?;
        }
        let (mut executed, mut outcome) = (false, Ok(()));
        for (r, group) in reports.iter().filter(|r| !r.0.remove.is_empty()) {
            executed = true;
            outcome = self.execute(r, group).await;
            if outcome.is_err() {
                break;
            }
        }
        if executed {
            // The merged layers' old objects and the removed backups' ones
            // are unreferenced now (queued by `commit_prune`), also those
            // of the groups done before one failed.
            self.sweep_objects_quietly(&lifecycle).await;
        }
        outcome?;
        Ok(reports.into_iter().map(|r| r.0).collect())
    }

    /// 409 while a backup of the VM runs, or any of its backups is being
    /// restored or verified (they read the chains prune rewrites).
    pub(super) async fn check_idle(
        &self,
        r: &PruneReport,
        group: &[&PruneCandidate],
    ) -> Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::Unavailable("daemon is shutting down".into()));
        }
        let running = self
            .catalog
            .backups(Some(r.vm_name.clone()), Some("running".into()))
            .await?;
        if !running.is_empty() {
            return Err(DaemonError::Conflict(format!(
                "a backup of VM {:?} is running",
                r.vm_name
            )));
        }
        let restores = self.restores.lock().await;
        for c in group {
            if restores.contains_key(&c.backup_id) {
                return Err(DaemonError::Conflict(format!(
                    "backup {:?} is being restored",
                    c.backup_id
                )));
            }
            if self.is_verifying(&c.backup_id) {
                return Err(DaemonError::Conflict(format!(
                    "backup {:?} is being verified",
                    c.backup_id
                )));
            }
        }
        Ok(())
    }

    /// Merge, commit, then delete (see the module docs for the order).
    pub(super) async fn execute(&self, r: &PruneReport, group: &[&PruneCandidate]) -> Result<()> {
        let repo = self
            .catalog
            .repository(&r.repository_id)
            .await?
            .ok_or_else(|| DaemonError::NotFound {
                what: "repository",
                id: r.repository_id.clone(),
            })?;
        let layout = Layout::new(&repo.path);
        let disk_of = |id: &str, disk: u32| {
            group
                .iter()
                .find(|c| c.backup_id == id)
                .and_then(|c| c.disks.iter().find(|d| d.0 == disk))
        };
        let mut made: Vec<PathBuf> = Vec::new();
        let mut journal = Vec::new();
        let mut reparent = Vec::new();
        let result = async {
            // A merge reads every layer it folds: evicted ones come back
            // first (the merged result is local only; see
            // `catalog::commit_prune`).
            for m in &r.merges {
                self.ensure_local(&m.into).await?;
            }
            let root = layout.root().canonicalize().map_err(|e| {
                DaemonError::io(format!("repository {}", layout.root().display()), e)
            })?;
            let policy = BackingPolicy::strict_within([root]);
            for m in &r.merges {
                let missing = |id: &str| {
                    DaemonError::BadImage(format!("backup {id:?} has no disk {}", m.disk_id))
                };
                let into = disk_of(&m.into, m.disk_id).ok_or_else(|| missing(&m.into))?;
                let bottom_id = m.drop.last().map_or(m.into.as_str(), String::as_str);
                let bottom = disk_of(bottom_id, m.disk_id).ok_or_else(|| missing(bottom_id))?;
                let top = layout.path_of(&into.2);
                for p in [&top, &layout.path_of(&bottom.2)] {
                    layout.check_plain_file(p).map_err(|e| {
                        DaemonError::BadImage(format!("{}: not a plain file: {e}", p.display()))
                    })?;
                }
                let out = merging(&top);
                made.push(out.clone());
                qcow_backend::merge(
                    &top,
                    &layout.path_of(&bottom.2),
                    &out,
                    &MergeOptions::new(policy.clone()),
                )
                .await
                .map_err(|e| DaemonError::BadImage(format!("merging {}: {e}", m.into)))?;
                let image_bytes = std::fs::metadata(&out)
                    .map_err(|e| DaemonError::io(out.display().to_string(), e))?
                    .len();
                reparent.push(Reparent {
                    backup_id: m.into.clone(),
                    disk_id: m.disk_id,
                    parent: m.new_parent.clone(),
                    image_bytes,
                });
                // The old chain's sidecars, newest first, down to its full.
                let mut sidecars = Vec::new();
                let mut next = Some(m.into.clone());
                while let Some(id) = next {
                    if sidecars.len() > qcow_backend::DEFAULT_MAX_DEPTH {
                        return Err(DaemonError::BadImage(format!("chain of {} loops", m.into)));
                    }
                    let d = disk_of(&id, m.disk_id).ok_or_else(|| missing(&id))?;
                    sidecars.push(Layout::sidecar(&layout.path_of(&d.2)));
                    next = d.1.clone();
                }
                let parent_root = match &m.new_parent {
                    None => Hash::NONE,
                    Some(p) => disk_of(p, m.disk_id)
                        .and_then(|d| d.3.as_deref())
                        .and_then(Hash::from_hex)
                        .ok_or_else(|| {
                            DaemonError::BadImage(format!("backup {p:?} has no recorded digest"))
                        })?,
                };
                let side_out = merging(&Layout::sidecar(&top));
                made.push(side_out.clone());
                let so = side_out.clone();
                tokio::task::spawn_blocking(move || rewrite_sidecar(&sidecars, parent_root, &so))
                    .await
                    .map_err(|e| DaemonError::Internal(format!("sidecar task: {e}")))?
                    .map_err(|e| {
                        DaemonError::BadImage(format!(
                            "rewriting the digest sidecar of {}: {e}",
                            m.into
                        ))
                    })?;
                for path in [into.2.clone(), format!("{}.digest", into.2)] {
                    journal.push(JournalEntry {
                        repository_id: r.repository_id.clone(),
                        path,
                        action: "rename".into(),
                    });
                }
            }
            for id in &r.remove {
                let Some(c) = group.iter().find(|c| &c.backup_id == id) else {
                    continue;
                };
                for d in &c.disks {
                    for path in [d.2.clone(), format!("{}.digest", d.2)] {
                        journal.push(JournalEntry {
                            repository_id: r.repository_id.clone(),
                            path,
                            action: "remove".into(),
                        });
                    }
                }
            }
            // Held from here until the file work is done, not during the
            // merges (which only read the old chains and may take minutes
            // on big disks: restores, deletes and /metrics would queue
            // behind them): no restore of this VM starts while the files
            // and the catalog disagree. One that started meanwhile, or a
            // verify, makes this a conflict (retried by the next run).
            let restores = self.restores.lock().await;
            for c in group {
                if restores.contains_key(&c.backup_id) || self.is_verifying(&c.backup_id) {
                    return Err(DaemonError::Conflict(format!(
                        "backup {:?} of VM {:?} is being restored or verified",
                        c.backup_id, r.vm_name
                    )));
                }
            }
            self.catalog
                .commit_prune(PruneCommit {
                    vm_name: r.vm_name.clone(),
                    repository_id: r.repository_id.clone(),
                    reparent: reparent.clone(),
                    remove: r.remove.clone(),
                    journal: journal.clone(),
                })
                .await?;
            Ok(restores)
        }
        .await;
        let restores = match result {
            Ok(guard) => guard,
            Err(e) => {
                // Nothing committed: the new files are just litter.
                for p in &made {
                    match layout.remove(p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => tracing::error!(path = %p.display(), error = %e, "cannot remove"),
                    }
                }
                return Err(e);
            }
        };
        self.finish_prune_journal().await?;
        drop(restores);
        let what = if r.remove.is_empty() {
            "chains rewritten"
        } else {
            "pruned"
        };
        tracing::info!(vm = %r.vm_name, repository = %r.repository_id, removed = r.remove.len(),
            merged = r.merges.len(), "{what}");
        Ok(())
    }

    /// Carry out the file work committed prunes journalled (idempotent:
    /// also run at start-up), then forget it.
    pub(super) async fn finish_prune_journal(&self) -> Result<()> {
        let mut entries = self.catalog.prune_journal().await?;
        if entries.is_empty() {
            return Ok(());
        }
        // Renames first: until a merged image is in place its old self may
        // still need the images about to be removed.
        entries.sort_by_key(|e| e.action != "rename");
        let repos = self.catalog.repositories().await?;
        let mut done = Vec::new();
        let mut rename_failed = false;
        for e in entries {
            if rename_failed && e.action != "rename" {
                // An old image not replaced may still need these: keep them.
                break;
            }
            let Some(repo) = repos.iter().find(|r| r.id == e.repository_id) else {
                tracing::error!(repository = %e.repository_id, path = %e.path, "prune journal names an unknown repository");
                continue;
            };
            let layout = Layout::new(&repo.path);
            let path = layout.path_of(&e.path);
            let res = if e.action == "rename" {
                layout.rename(&merging(&path), &path)
            } else {
                layout.remove(&path)
            };
            match res {
                Ok(()) => {}
                // Done before a crash.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    rename_failed |= e.action == "rename";
                    // Left in the journal: retried at the next prune or start.
                    tracing::error!(path = %path.display(), action = %e.action, error = %err, "prune file work failed");
                    continue;
                }
            }
            done.push(e);
        }
        self.catalog.clear_journal(done).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, policy: Option<&str>, t: i64, parent: Option<&str>) -> PruneCandidate {
        PruneCandidate {
            backup_id: id.into(),
            vm_name: "vm".into(),
            repository_id: "r".into(),
            policy_id: policy.map(Into::into),
            created_ms: t,
            disks: vec![(
                0,
                parent.map(Into::into),
                format!("vm/disk0/{id}.qcow2"),
                None,
            )],
        }
    }

    fn policies() -> HashMap<String, Policy> {
        let p = Policy {
            id: "p".into(),
            keep_last: 1,
            ..Policy::default()
        };
        HashMap::from([("p".to_owned(), p)])
    }

    #[test]
    fn unpoliced_backups_stay_and_chains_cross_policies() {
        // F has no policy; I1, I2 are under keep_last 1.
        let c = [
            cand("F", None, 1, None),
            cand("I1", Some("p"), 2, Some("F")),
            cand("I2", Some("p"), 3, Some("I1")),
        ];
        let refs: Vec<&PruneCandidate> = c.iter().collect();
        let r = plan_group("vm", "r", &refs, &policies(), 10)
            .unwrap()
            .unwrap();
        assert_eq!(r.remove, vec!["I1".to_owned()]);
        assert_eq!(r.keep.len(), 1);
        assert_eq!(
            (r.keep[0].backup_id.as_str(), r.keep[0].rule.as_str()),
            ("I2", "last")
        );
        assert_eq!(r.merges.len(), 1);
        assert_eq!(r.merges[0].into, "I2");
        assert_eq!(r.merges[0].drop, vec!["I1".to_owned()]);
        assert_eq!(r.merges[0].new_parent.as_deref(), Some("F"));
    }

    #[test]
    fn no_known_policy_no_plan() {
        let c = [
            cand("F", None, 1, None),
            cand("I1", Some("gone"), 2, Some("F")),
        ];
        let refs: Vec<&PruneCandidate> = c.iter().collect();
        assert!(plan_group("vm", "r", &refs, &policies(), 10)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_missing_parent_is_an_error_not_a_guess() {
        let c = [cand("I1", Some("p"), 2, Some("F"))];
        let refs: Vec<&PruneCandidate> = c.iter().collect();
        assert!(plan_group("vm", "r", &refs, &policies(), 10).is_err());
    }
}
