//! Deleting the objects no layer counts on any more: those a merge, a
//! prune or a delete left behind (queued in the catalog in the same
//! transaction, see `catalog::object_deletions`).
//!
//! A sweep runs after every prune and synthetic-full pass that changed
//! something, in the background after a delete, and in every scheduled
//! tier pass, which retries what is still owed. It holds the `lifecycle`
//! lock, as offload does: with a bucket without versions, a merged layer's
//! next offload reuses its old key, and the check that no layer counts on
//! a key must not race the upload that makes one count on it again.
//!
//! An object whose recorded Object Lock retention has not ended is not
//! tried; one the store refuses anyway (a retention set outside the hub,
//! a clock ahead of the store's) stays queued with the refusal, and so
//! does one whose store cannot be reached.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::MutexGuard;

use super::Backups;
use crate::error::{DaemonError, Result};
use crate::tier::ObjectTier;

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// Keys of the objects deleted.
    pub deleted: Vec<String>,
    /// Deletions still owed afterwards (under retention, refused, or the
    /// store unreachable), retried by the next pass.
    pub pending: usize,
}

impl Backups {
    /// Delete every queued object whose retention has ended by `now_ms`.
    pub async fn sweep_objects(&self, now_ms: i64) -> Result<SweepReport> {
        let held = self.lifecycle.lock().await;
        self.sweep_objects_held(&held, now_ms).await
    }

    /// [`Backups::sweep_objects`] in the background (after a delete: the
    /// answer does not wait for the store, nor for a prune holding the
    /// lock); a failure is logged and left to the next tier pass.
    pub(super) fn sweep_objects_soon(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.sweep_objects(crate::time::now_ms()).await {
                tracing::warn!(error = %e, "object sweep failed; the next tier pass retries it");
            }
        });
    }

    /// A sweep by a caller that holds the lifecycle lock already (a prune,
    /// a synthetic-full pass); a failure is logged, not the caller's.
    pub(super) async fn sweep_objects_quietly(&self, held: &MutexGuard<'_, ()>) {
        if let Err(e) = self.sweep_objects_held(held, crate::time::now_ms()).await {
            tracing::warn!(error = %e, "object sweep failed; the next tier pass retries it");
        }
    }

    /// The sweep; `_lifecycle` proves the lock is held.
    pub(super) async fn sweep_objects_held(
        &self,
        _lifecycle: &MutexGuard<'_, ()>,
        now_ms: i64,
    ) -> Result<SweepReport> {
        let due = self.catalog.object_deletions(Some(now_ms)).await?;
        let mut report = SweepReport::default();
        if due.is_empty() {
            report.pending = self.catalog.object_deletions(None).await?.len();
            return Ok(report);
        }
        // One connection per repository; one that cannot connect fails
        // each of its deletions the same way.
        let mut tiers: BTreeMap<String, std::result::Result<ObjectTier, String>> = BTreeMap::new();
        for d in due {
            if self.catalog.object_in_use(&d).await? {
                tracing::info!(key = %d.object_key, "a layer counts on the object again; its deletion is dropped");
                self.catalog.object_deletion_done(&d).await?;
                continue;
            }
            if !tiers.contains_key(&d.repository_id) {
                let t = self
                    .tier_of(&d.repository_id)
                    .await
                    .map_err(|e| e.to_string());
                tiers.insert(d.repository_id.clone(), t);
            }
            let deleted = match tiers.get(&d.repository_id) {
                Some(Ok(tier)) => {
                    tier.signer()
                        .delete_object(&d.object_key, d.version_id.as_deref())
                        .await
                }
                Some(Err(e)) => Err(DaemonError::ObjectStore(e.clone())),
                None => Err(DaemonError::Internal("no tier looked up".into())),
            };
            match deleted {
                Ok(()) => {
                    self.catalog.object_deletion_done(&d).await?;
                    tracing::info!(repository = %d.repository_id, key = %d.object_key,
                        version = ?d.version_id, "unreferenced object deleted");
                    report.deleted.push(d.object_key);
                }
                Err(e) => {
                    tracing::warn!(repository = %d.repository_id, key = %d.object_key,
                        version = ?d.version_id, attempts = d.attempts + 1, error = %e,
                        "unreferenced object not deleted (locked, or the store failed); it stays queued");
                    self.catalog
                        .object_deletion_failed(&d, &e.to_string())
                        .await?;
                }
            }
        }
        report.pending = self.catalog.object_deletions(None).await?.len();
        Ok(report)
    }
}
