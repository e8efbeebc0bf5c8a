//! Fails a backup whose exports see no request for the configured time (an
//! SNA that crashed, hung or never came must not hold ports and images
//! forever). Time counts from the backup's start or the last request on
//! any of its exports: neither an open connection that sends nothing nor
//! one that keeps reconnecting keeps the backup alive.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Backups;
use crate::time::now_ms;

/// Watch backup `id` until `stop` fires or it is idle for `timeout`.
pub(super) fn spawn(
    service: Weak<Backups>,
    id: String,
    created_ms: i64,
    timeout: Duration,
    stop: CancellationToken,
) {
    let period = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let Some(service) = service.upgrade() else {
                return;
            };
            if !is_idle(&service, &id, created_ms, timeout) {
                continue;
            }
            let reason = format!("no NBD client activity for {} s", timeout.as_secs_f64());
            tracing::warn!(backup = %id, "{reason}; aborting");
            if let Err(e) = service.abort(&id, &reason).await {
                tracing::debug!(backup = %id, error = %e, "idle abort raced with completion");
            }
            return;
        }
    });
}

fn is_idle(service: &Arc<Backups>, id: &str, created_ms: i64, timeout: Duration) -> bool {
    let jobs = service.jobs();
    let Some(job) = jobs.get(id) else {
        return false;
    };
    let mut last = created_ms;
    for d in &job.disks {
        if let Some(p) = &d.published {
            let s = p.export.stats().snapshot();
            // Requests only: a client that keeps reconnecting without
            // sending anything is as idle as one that never came.
            last = last.max(s.last_request_ms as i64);
        }
    }
    now_ms().saturating_sub(last) > timeout.as_millis() as i64
}
