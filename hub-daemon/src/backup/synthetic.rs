//! Synthetic fulls: keeping image chains short (`max_chain_length`).
//!
//! When the newest restore point of a disk (the one the next incremental
//! builds on) sits on a chain — itself and its ancestors — as long as its
//! policy's `max_chain_length`, the hub flattens it: a new standalone
//! image with the same guest contents, built locally from the chain (the
//! VM is not read again). The next incremental then starts a short chain
//! on top of it. Nothing else changes: the older restore points keep
//! their own images (the flattened one no longer needs them, so prune can
//! remove them without a merge), and the restore point's recorded digest
//! stays valid (its guest contents are unchanged).
//!
//! This is a prune merge that removes nothing ([`super::prune`]): the same
//! `.merging` file, rewritten sidecar, one catalog transaction with its
//! journal, rename, so a kill at any moment leaves every restore point
//! readable and the catalog consistent. The same guards apply: not while
//! a backup of the VM runs (a commit that finds one refuses, and the
//! merge result is dropped), nor while one of its restore points is
//! restored or verified; such a chain is skipped and retried at the next
//! pass.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::prune::{MergeStep, PruneReport};
use super::Backups;
use crate::catalog::PruneCandidate;
use crate::error::{DaemonError, Result};
use crate::lifecycle::chains::ChainError;

/// One synthetic full built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyntheticFull {
    /// VM.
    pub vm_name: String,
    /// Repository.
    pub repository_id: String,
    /// The restore point whose image was flattened.
    pub backup_id: String,
    /// Disk.
    pub disk_id: u32,
    /// Its chain's length before (itself included).
    pub chain_length: usize,
}

/// The flattenings one VM/repository group is due: per disk whose newest
/// image (`latest`: disk → backup) has a chain of at least its policy's
/// `max_chain_length` (`limits`: policy → limit, 0 = none). A chain that
/// names a parent not among `cands`, or loops, is an error: flattening a
/// guessed chain could publish the wrong contents.
fn plan(
    cands: &[&PruneCandidate],
    latest: &BTreeMap<u32, String>,
    limits: &HashMap<String, u32>,
) -> std::result::Result<Vec<MergeStep>, ChainError> {
    let parent_of = |id: &str, disk: u32| -> Option<Option<String>> {
        cands
            .iter()
            .find(|c| c.backup_id == id)
            .and_then(|c| c.disks.iter().find(|d| d.0 == disk))
            .map(|d| d.1.clone())
    };
    let mut steps = Vec::new();
    for (&disk, top) in latest {
        let Some(c) = cands.iter().find(|c| &c.backup_id == top) else {
            continue;
        };
        let limit = c
            .policy_id
            .as_deref()
            .and_then(|p| limits.get(p))
            .copied()
            .unwrap_or(0) as usize;
        if limit == 0 {
            continue;
        }
        let mut chain = vec![top.clone()];
        let mut next = parent_of(top, disk).flatten();
        while let Some(p) = next {
            if chain.contains(&p) || chain.len() > qcow_backend::DEFAULT_MAX_DEPTH {
                return Err(ChainError::Loop(top.clone()));
            }
            next = parent_of(&p, disk).ok_or_else(|| ChainError::MissingParent {
                child: chain.last().cloned().unwrap_or_default(),
                parent: p.clone(),
            })?;
            chain.push(p);
        }
        // A full is as short as a chain gets: a limit of 1 flattens
        // every incremental, never a full.
        if chain.len() >= limit && chain.len() > 1 {
            steps.push(MergeStep {
                disk_id: disk,
                into: top.clone(),
                drop: chain[1..].to_vec(),
                new_parent: None,
            });
        }
    }
    Ok(steps)
}

impl Backups {
    /// Build every synthetic full that is due (of one VM, or all), one
    /// VM/repository at a time. A busy or failing group is logged and
    /// skipped (the next pass retries it); the answer lists what was built.
    pub async fn synthetic_pass(&self, vm: Option<String>) -> Result<Vec<SyntheticFull>> {
        let lifecycle = self.lifecycle.lock().await;
        let limits: HashMap<String, u32> = self
            .catalog
            .policies()
            .await?
            .into_iter()
            .filter(|p| p.max_chain_length > 0)
            .map(|p| (p.id, p.max_chain_length))
            .collect();
        if limits.is_empty() {
            return Ok(Vec::new());
        }
        let cands = self.catalog.prune_candidates(vm, None).await?;
        let mut groups: BTreeMap<(&str, &str), Vec<&PruneCandidate>> = BTreeMap::new();
        for c in &cands {
            groups
                .entry((c.vm_name.as_str(), c.repository_id.as_str()))
                .or_default()
                .push(c);
        }
        let mut built = Vec::new();
        for ((vm, repo), group) in &groups {
            if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            match self.synthesize_group(vm, repo, group, &limits).await {
                Ok(done) => built.extend(done),
                Err(e @ (DaemonError::Conflict(_) | DaemonError::Unavailable(_))) => {
                    tracing::info!(vm, repository = repo, reason = %e, "synthetic full postponed");
                }
                Err(e) => {
                    tracing::error!(vm, repository = repo, error = %e, "synthetic full failed");
                }
            }
        }
        if !built.is_empty() {
            // A flattened layer's old object is unreferenced now.
            self.sweep_objects_quietly(&lifecycle).await;
        }
        Ok(built)
    }

    async fn synthesize_group(
        &self,
        vm: &str,
        repo: &str,
        group: &[&PruneCandidate],
        limits: &HashMap<String, u32>,
    ) -> Result<Vec<SyntheticFull>> {
        let mut disks: Vec<u32> = group
            .iter()
            .flat_map(|c| c.disks.iter().map(|d| d.0))
            .collect();
        disks.sort_unstable();
        disks.dedup();
        // The image the next incremental of each disk would build on.
        let mut latest = BTreeMap::new();
        for disk in disks {
            if let Some(img) = self.catalog.latest_image(vm, repo, disk).await? {
                latest.insert(disk, img.backup_id);
            }
        }
        let merges = plan(group, &latest, limits)
            .map_err(|e| DaemonError::BadImage(format!("VM {vm:?} in {repo:?}: {e}")))?;
        if merges.is_empty() {
            return Ok(Vec::new());
        }
        let report = PruneReport {
            vm_name: vm.to_owned(),
            repository_id: repo.to_owned(),
            keep: Vec::new(),
            remove: Vec::new(),
            merges,
        };
        self.check_idle(&report, group).await?;
        self.execute(&report, group).await?;
        let built: Vec<SyntheticFull> = report
            .merges
            .iter()
            .map(|m| SyntheticFull {
                vm_name: vm.to_owned(),
                repository_id: repo.to_owned(),
                backup_id: m.into.clone(),
                disk_id: m.disk_id,
                chain_length: m.drop.len() + 1,
            })
            .collect();
        for b in &built {
            tracing::info!(vm, backup = %b.backup_id, disk_id = b.disk_id, chain_length = b.chain_length,
                "synthetic full built");
        }
        Ok(built)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, policy: Option<&str>, parent: Option<&str>) -> PruneCandidate {
        PruneCandidate {
            backup_id: id.into(),
            vm_name: "vm".into(),
            repository_id: "r".into(),
            policy_id: policy.map(Into::into),
            created_ms: 0,
            disks: vec![(0, parent.map(Into::into), format!("{id}.qcow2"), None)],
        }
    }

    fn run(
        c: &[PruneCandidate],
        top: &str,
        limit: u32,
    ) -> std::result::Result<Vec<MergeStep>, ChainError> {
        let refs: Vec<&PruneCandidate> = c.iter().collect();
        let latest = BTreeMap::from([(0, top.to_owned())]);
        plan(&refs, &latest, &HashMap::from([("p".to_owned(), limit)]))
    }

    #[test]
    fn flattens_the_newest_image_once_its_chain_reaches_the_limit() {
        let c = [
            cand("F", Some("p"), None),
            cand("I1", Some("p"), Some("F")),
            cand("I2", Some("p"), Some("I1")),
        ];
        assert!(run(&c, "I1", 3).unwrap().is_empty(), "2 < 3");
        let s = run(&c, "I2", 3).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].into, "I2");
        assert_eq!(s[0].drop, ["I1", "F"]);
        assert_eq!(s[0].new_parent, None);
        // A full is never "flattened", whatever the limit.
        assert!(run(&c, "F", 1).unwrap().is_empty());
        assert_eq!(run(&c, "I1", 1).unwrap()[0].drop, ["F"]);
    }

    #[test]
    fn no_policy_or_no_limit_means_no_synthetic_full() {
        let c = [cand("F", None, None), cand("I1", None, Some("F"))];
        assert!(run(&c, "I1", 1).unwrap().is_empty());
        let c = [cand("F", Some("p"), None), cand("I1", Some("p"), Some("F"))];
        assert!(run(&c, "I1", 0).unwrap().is_empty());
    }

    #[test]
    fn broken_or_looping_chains_are_errors() {
        let c = [cand("I1", Some("p"), Some("F"))];
        assert!(run(&c, "I1", 2).is_err());
        let c = [
            cand("A", Some("p"), Some("B")),
            cand("B", Some("p"), Some("A")),
        ];
        assert!(run(&c, "A", 2).is_err());
    }
}
