//! Scheduled verification: every `verify_check_interval`, the restore
//! points whose policy asks for it (`verify_every_days > 0`) and whose last
//! verification (or completion, if never verified) is at least that old
//! are verified with the on-demand engine, most overdue first, at most
//! `verify_max_concurrent` at a time.
//!
//! What keeps this from hurting backups: every verification read goes
//! through one shared throttle (`verify_rate`, and the lower
//! `verify_rate_during_backup` while any backup runs), on verification's
//! own I/O threads. What keeps it from racing the other users of a chain:
//! a restore point being restored or verified is skipped, and a prune and a
//! scheduled verification exclude each other (see
//! `Backups::begin_scheduled_verify`).
//!
//! Outcomes are recorded like an on-demand verification's: `verify_status`
//! and `verified_at` of the restore point and its ancestors; a corrupt one
//! flags every restore point built on it as corrupt too (`depends_on` in
//! the disk's `verify` detail), and none of them is a parent again. A
//! restore point flagged corrupt is not re-verified on schedule (only on
//! demand), so the flag stays until an operator acts on it.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backup::{Backups, VerifyOutcome};
use crate::error::Result;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Restore points due when the pass started, most overdue first.
    pub due: Vec<String>,
    /// Verified and found ok.
    pub ok: Vec<String>,
    /// Verified, and its chain found corrupt (it is flagged with the
    /// rest; every restore point flagged is in `flagged`).
    pub corrupt: Vec<String>,
    /// Restore points flagged corrupt by this pass (the verified ones and
    /// those sharing or depending on the damage).
    pub flagged: Vec<String>,
    /// Verification could not run.
    pub failed: Vec<String>,
    /// Due, but skipped: no longer due by its turn (verified with a newer
    /// restore point of its chain, or flagged), being restored or
    /// verified, gone, or not verifiable.
    pub skipped: Vec<String>,
    /// Most verifications running at once.
    pub peak_in_flight: usize,
    /// Stopped part-way by shutdown.
    pub cancelled: bool,
}

/// Run passes every `verify.check_interval` until `stop` (none if the
/// interval is zero). The first pass comes one interval after start-up,
/// not at it: start-up is when reconciliation and interrupted backups'
/// retries want the disk.
pub fn spawn(
    backups: Arc<Backups>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = backups.config().verify.check_interval;
    if every.is_zero() {
        tracing::info!("scheduled verification off (verify_check_interval 0)");
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A pass longer than the interval delays the next; no burst after.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = run_pass(&backups, crate::time::now_ms(), &stop).await {
                tracing::error!(error = %e, "scheduled verification pass failed");
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }))
}

/// One pass at time `now_ms` (the scheduler passes the clock; tests pass
/// a later time to make restore points due). Returns when every due
/// restore point was verified or skipped, or when `stop` is cancelled
/// (running verifications are abandoned, nothing recorded for them).
pub async fn run_pass(
    backups: &Arc<Backups>,
    now_ms: i64,
    stop: &CancellationToken,
) -> Result<PassReport> {
    let due = backups.catalog().due_for_verify(now_ms, None).await?;
    let max = backups.config().verify.max_concurrent.max(1);
    let mut report = PassReport {
        due: due.clone(),
        ..PassReport::default()
    };
    if due.is_empty() {
        tracing::debug!("scheduled verification: nothing due");
        return Ok(report);
    }
    tracing::info!(
        due = due.len(),
        max_concurrent = max,
        "scheduled verification pass"
    );
    let mut queue = due.into_iter();
    let mut set: JoinSet<(String, VerifyOutcome)> = JoinSet::new();
    // In flight: id -> its verify_status before (restored if abandoned).
    let mut in_flight: BTreeMap<String, Option<String>> = BTreeMap::new();
    loop {
        while set.len() < max && !stop.is_cancelled() {
            let Some(id) = queue.next() else { break };
            match backups.begin_scheduled_verify(&id, now_ms).await {
                Ok(Some(b)) => {
                    in_flight.insert(id.clone(), b.verify_status.clone());
                    let me = Arc::clone(backups);
                    set.spawn(async move {
                        let outcome = me.finish_verify(b).await;
                        (id, outcome)
                    });
                    report.peak_in_flight = report.peak_in_flight.max(set.len());
                }
                Ok(None) => report.skipped.push(id),
                Err(e) => {
                    tracing::warn!(backup = %id, error = %e, "scheduled verification skipped");
                    report.skipped.push(id);
                }
            }
        }
        if set.is_empty() {
            break;
        }
        let joined = tokio::select! {
            () = stop.cancelled() => None,
            j = set.join_next() => j,
        };
        let Some(joined) = joined else {
            if stop.is_cancelled() {
                // Dropping the tasks stops their reads (see finish_verify).
                set.shutdown().await;
                for (id, before) in &in_flight {
                    backups.abandon_verify(id, before.as_deref()).await;
                }
                report.cancelled = true;
                tracing::info!(
                    abandoned = in_flight.len(),
                    "scheduled verification stopped by shutdown"
                );
                return Ok(report);
            }
            break;
        };
        match joined {
            Ok((id, outcome)) => {
                in_flight.remove(&id);
                match outcome {
                    VerifyOutcome::Ok => report.ok.push(id),
                    VerifyOutcome::Corrupt(ids) => {
                        report.corrupt.push(id);
                        report.flagged.extend(ids);
                    }
                    VerifyOutcome::Failed(_) => report.failed.push(id),
                }
            }
            // A verification task panicked: its id is unknown here, so it
            // stays in `in_flight` and is released below.
            Err(e) => tracing::error!(error = %e, "scheduled verification task failed"),
        }
    }
    for (id, before) in std::mem::take(&mut in_flight) {
        backups.abandon_verify(&id, before.as_deref()).await;
        report.failed.push(id);
    }
    report.flagged.sort_unstable();
    report.flagged.dedup();
    tracing::info!(
        ok = report.ok.len(),
        corrupt = report.corrupt.len(),
        flagged = report.flagged.len(),
        failed = report.failed.len(),
        skipped = report.skipped.len(),
        "scheduled verification pass finished"
    );
    Ok(report)
}
