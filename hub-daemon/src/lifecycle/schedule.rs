//! The daemon's own lifecycle work, in the background: every
//! `prune_interval` it prunes every VM with policy-governed backups and
//! builds the synthetic fulls that are due, then offloads and evicts what
//! the policies' `offload_after_days` / `evict_local_after_days` say, and
//! deletes the unreferenced objects still owed (retrying what a lock or
//! the store refused before); when a backup completes (and
//! once at start, to finish what a crash interrupted) it builds the
//! synthetic fulls only.
//!
//! A VM that is busy (backup running, restore point restored or verified)
//! is skipped and retried at the next pass rather than waited for: its
//! backup may run for hours. Cancelling the loop abandons a pass in
//! progress, which is safe at any point (prune and synthetic fulls are
//! crash-consistent, see [`crate::backup`]'s prune module).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backup::{Backups, PruneReport, PruneRequest, SyntheticFull, TierReport};
use crate::error::{DaemonError, Result};

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    /// Prune of each VM that had work (or none).
    pub pruned: Vec<PruneReport>,
    /// VMs not pruned this time, and why.
    pub skipped: Vec<(String, String)>,
    /// Synthetic fulls built.
    pub synthetic: Vec<SyntheticFull>,
    /// Offloads and evictions (`offload_after_days`,
    /// `evict_local_after_days`), and the object sweep.
    pub tier: TierReport,
}

/// One full pass: prune every VM with a policy-governed backup (one VM at
/// a time, so a busy one does not hold the others back), then build the
/// synthetic fulls that are due (after pruning: a prune may already have
/// shortened a chain).
pub async fn run_pass(backups: &Backups) -> Result<PassReport> {
    let mut report = PassReport::default();
    let vms: BTreeSet<String> = backups
        .catalog()
        .prune_candidates(None, None)
        .await?
        .into_iter()
        .filter(|c| c.policy_id.is_some())
        .map(|c| c.vm_name)
        .collect();
    for vm in vms {
        let req = PruneRequest {
            vm_name: Some(vm.clone()),
            repository_id: None,
            dry_run: false,
        };
        match backups.prune(req).await {
            Ok(r) => report.pruned.extend(r),
            Err(e @ (DaemonError::Conflict(_) | DaemonError::Unavailable(_))) => {
                tracing::info!(vm, reason = %e, "scheduled prune postponed");
                report.skipped.push((vm, e.to_string()));
            }
            Err(e) => {
                tracing::error!(vm, error = %e, "scheduled prune failed");
                report.skipped.push((vm, e.to_string()));
            }
        }
    }
    report.synthetic = backups.synthetic_pass(None).await?;
    // Last: a merge above may have made a layer local-only again.
    report.tier = backups.tier_pass(crate::time::now_ms()).await?;
    Ok(report)
}

/// Run until `stop`: a full pass every `interval` (`None`: never), the
/// synthetic-full pass whenever a backup completes.
pub async fn run(backups: Arc<Backups>, interval: Option<Duration>, stop: CancellationToken) {
    enum Work {
        Full,
        Synthetic,
    }
    // A synthetic full interrupted by a crash or shutdown is retried now
    // rather than at the next completion.
    backups.lifecycle_kick().notify_one();
    let mut next = interval.map(|i| tokio::time::Instant::now() + i);
    loop {
        let tick = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let work = tokio::select! {
            () = stop.cancelled() => return,
            () = tick => Work::Full,
            () = backups.lifecycle_kick().notified() => Work::Synthetic,
        };
        let pass = async {
            match work {
                Work::Full => {
                    // From the end of this pass: a pass longer than the
                    // interval must not make passes run back to back.
                    let r = run_pass(&backups).await.map(|r| r.synthetic.len());
                    next = interval.map(|i| tokio::time::Instant::now() + i);
                    r
                }
                Work::Synthetic => backups.synthetic_pass(None).await.map(|s| s.len()),
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            r = pass => match r {
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "lifecycle pass failed"),
            },
        }
    }
}
