//! A started backup's life on the agent: the disks it holds, its phase,
//! pushing, progress reports, and the complete/abort call that ends it
//! (with the change-tracking commit after a 2xx complete).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sna_contract::{CompleteRequest, CompletedDisk, DiskProgress, ProgressRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::callback::Callbacks;
use crate::push::{commit_states, push_disks, DiskRequest, DiskResult};
use crate::serve::Agent;
use crate::stream::DiskCounter;

/// A running backup.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) handle: JoinHandle<()>,
    /// To tell the hub when the agent stops the job itself (shutdown).
    pub(crate) callbacks: Callbacks,
}

/// Where a job is; a closed channel means it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Reading and writing disks.
    Streaming,
    /// Pushed; reporting complete and committing change tracking. A prepare
    /// or start for its disks waits for this to end: the hub may plan the
    /// next incremental the moment it has answered complete, before the
    /// state it will name is committed here.
    Finishing,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map update: poisoning leaves
    // nothing half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Releases busy disks when a job ends, however it ends (cancel drops it).
/// The entries go first, then `phase` is dropped, waking waiters: by then
/// the disks are free.
#[derive(Debug)]
pub(crate) struct BusyGuard {
    pub(crate) set: Arc<Mutex<HashMap<String, watch::Receiver<Phase>>>>,
    pub(crate) names: Vec<String>,
    pub(crate) phase: watch::Sender<Phase>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.set);
        for n in &self.names {
            s.remove(n);
        }
    }
}

/// Wait until no job is finishing on any of `names`.
pub(crate) async fn settle(agent: &Agent, names: &[String]) {
    let waits: Vec<watch::Receiver<Phase>> = {
        let busy = lock(&agent.busy);
        names.iter().filter_map(|n| busy.get(n).cloned()).collect()
    };
    for mut rx in waits {
        if *rx.borrow() == Phase::Finishing {
            agent.settling.fetch_add(1, Ordering::Relaxed);
            // Err: the job ended, which is what we wait for.
            let _ = rx.wait_for(|p| *p != Phase::Finishing).await;
            agent.settling.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub(crate) type Totals = Vec<(u32, u64, Arc<DiskCounter>)>;

pub(crate) async fn run_job(
    agent: &Agent,
    backup_id: &str,
    disks: Vec<DiskRequest>,
    totals: Totals,
    cb: Callbacks,
    phase: &watch::Sender<Phase>,
) {
    let pushed = tokio::select! {
        r = push_disks(disks, agent.cfg.stream.clone()) => r,
        () = report_progress(&cb, &totals, agent.cfg.progress_every) => return,
    };
    match pushed {
        Ok(results) => {
            phase.send_replace(Phase::Finishing);
            let req = CompleteRequest {
                disks: results
                    .iter()
                    .map(|r| CompletedDisk {
                        disk_id: r.disk_id,
                        change_id: Some(r.change_id.clone()),
                        digest: Some(r.digest.clone()),
                    })
                    .collect(),
            };
            match cb.complete(&req).await {
                Ok(()) => match commit_off_thread(agent, results).await {
                    Ok(()) => tracing::info!(backup_id, "backup completed"),
                    // The backup stands; the next one of these disks is a full.
                    Err(e) => tracing::error!(backup_id, error = %e, "committing change tracking"),
                },
                Err(e) => tracing::error!(backup_id, error = %e, "hub refused complete"),
            }
        }
        Err(e) => {
            tracing::warn!(backup_id, error = %e, "backup failed");
            if let Err(ce) = cb.abort(&e.to_string()).await {
                tracing::error!(backup_id, error = %ce, "posting abort");
            }
        }
    }
}

/// Commit change tracking (write, fsync, rename) on the blocking pool.
async fn commit_off_thread(agent: &Agent, results: Vec<DiskResult>) -> std::io::Result<()> {
    let dir = agent.cfg.state_dir.clone();
    tokio::task::spawn_blocking(move || commit_states(&dir, &results))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Report progress every `every` while something changed; never returns
/// (the job drops it when the push ends).
async fn report_progress(cb: &Callbacks, totals: &Totals, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last: Vec<u64> = vec![0; totals.len()];
    loop {
        tick.tick().await;
        let now: Vec<u64> = totals
            .iter()
            .map(|(_, _, d)| d.done.load(Ordering::Relaxed))
            .collect();
        if now != last {
            let req = ProgressRequest {
                disks: totals
                    .iter()
                    .zip(&now)
                    .map(|((id, total, _), done)| DiskProgress {
                        disk_id: *id,
                        bytes_done: *done,
                        bytes_total: *total,
                    })
                    .collect(),
            };
            cb.progress(&req).await;
            last = now;
        }
    }
}
