//! Objects the S3 tier still owes a deletion (`object_deletions`).
//!
//! Whatever forgets an offloaded layer's object — a merge that rewrote
//! the layer, a prune or a delete that removed its backup, a re-offload
//! that replaced a stale record — queues that object here in the same
//! transaction, so a crash between the catalog and the bucket never
//! leaves an object nobody knows of. The tier's sweep
//! (`backup::object_sweep`) deletes the queued objects once their Object
//! Lock retention allows and forgets them; one the store refuses stays
//! queued, with the attempt counted and the error kept, until it goes.
//! Portable SQL only (SQLite and PostgreSQL).

use super::db::{params, DbError, Sql};
use super::Catalog;
use crate::error::Result;

/// One object deletion still owed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDeletion {
    /// The repository whose bucket holds the object.
    pub repository_id: String,
    /// Object key.
    pub object_key: String,
    /// The version to delete; `None` where the bucket gave none.
    pub version_id: Option<String>,
    /// Object Lock retention end (unix ms) as recorded at upload: no
    /// attempt before then (the store would refuse it).
    pub retain_until_ms: Option<i64>,
    /// When the deletion was queued (unix ms).
    pub queued_ms: i64,
    /// Attempts the store refused or that failed.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: Option<String>,
}

impl ObjectDeletion {
    /// The version as stored: '' for none (part of the primary key).
    fn version_key(&self) -> String {
        self.version_id.clone().unwrap_or_default()
    }
}

impl Catalog {
    /// Inside a transaction, before the `layer_objects` rows go: queue the
    /// deletion of the object of backup `backup_id`'s disk `disk_id` (or
    /// of every disk). The same object queued twice stays one entry.
    pub(super) fn queue_object_deletions(
        c: &mut impl Sql,
        backup_id: &str,
        disk_id: Option<u32>,
        now_ms: i64,
    ) -> Result<u64> {
        Ok(c.execute(
            "INSERT INTO object_deletions (repository_id, object_key, version_id, retain_until_ms, queued_ms)
             SELECT b.repository_id, o.object_key, COALESCE(o.version_id, ''), o.retain_until_ms, CAST(?3 AS BIGINT)
             FROM layer_objects o JOIN backups b ON b.id = o.backup_id
             WHERE o.backup_id = ?1 AND (CAST(?2 AS BIGINT) IS NULL OR o.disk_id = ?2)
             ON CONFLICT (repository_id, object_key, version_id) DO NOTHING",
            params![backup_id, disk_id, now_ms],
        )?)
    }

    /// The deletions owed in this node's repositories (whose credentials
    /// it holds); with `due_at`, only those whose recorded retention has
    /// ended by then.
    pub async fn object_deletions(&self, due_at: Option<i64>) -> Result<Vec<ObjectDeletion>> {
        let node = self.node.to_string();
        self.with(move |c| {
            let rows = c.query(
                "SELECT repository_id, object_key, version_id, retain_until_ms, queued_ms, attempts, last_error
                 FROM object_deletions
                 WHERE repository_id IN (SELECT id FROM repositories WHERE node_id = ?1)
                   AND (CAST(?2 AS BIGINT) IS NULL OR retain_until_ms IS NULL OR retain_until_ms <= ?2)
                 ORDER BY repository_id, object_key, version_id",
                params![node, due_at],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    let version: String = r.get(2)?;
                    Ok(ObjectDeletion {
                        repository_id: r.get(0)?,
                        object_key: r.get(1)?,
                        version_id: (!version.is_empty()).then_some(version),
                        retain_until_ms: r.get(3)?,
                        queued_ms: r.get(4)?,
                        attempts: r.get(5)?,
                        last_error: r.get(6)?,
                    })
                })
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// Whether a layer still counts on the object `d` would delete: the
    /// same version, or — for a deletion without a version, which would
    /// remove whatever the key holds now — the same key at all (a merged
    /// layer keeps its file name, so its next offload reuses the key).
    pub async fn object_in_use(&self, d: &ObjectDeletion) -> Result<bool> {
        let (repo, key, version) = (
            d.repository_id.clone(),
            d.object_key.clone(),
            d.version_key(),
        );
        self.with(move |c| {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM layer_objects o JOIN backups b ON b.id = o.backup_id
                     WHERE b.repository_id = ?1 AND o.object_key = ?2
                       AND (CAST(?3 AS TEXT) = '' OR COALESCE(o.version_id, '') = ?3)",
                    params![repo, key, version],
                )?
                .get(0)?;
            Ok(n > 0)
        })
        .await
    }

    /// Forget a deletion: done, or moot.
    pub async fn object_deletion_done(&self, d: &ObjectDeletion) -> Result<()> {
        let (repo, key, version) = (
            d.repository_id.clone(),
            d.object_key.clone(),
            d.version_key(),
        );
        self.with(move |c| {
            c.execute(
                "DELETE FROM object_deletions WHERE repository_id = ?1 AND object_key = ?2 AND version_id = ?3",
                params![repo, key, version],
            )?;
            Ok(())
        })
        .await
    }

    /// Count a failed attempt and keep its error; the deletion stays owed.
    pub async fn object_deletion_failed(&self, d: &ObjectDeletion, error: &str) -> Result<()> {
        let (repo, key, version) = (
            d.repository_id.clone(),
            d.object_key.clone(),
            d.version_key(),
        );
        // Bounded: a store's error page must not bloat the catalog.
        let error: String = error.chars().take(500).collect();
        self.with(move |c| {
            c.execute(
                "UPDATE object_deletions SET attempts = attempts + 1, last_error = ?4
                 WHERE repository_id = ?1 AND object_key = ?2 AND version_id = ?3",
                params![repo, key, version, error],
            )?;
            Ok(())
        })
        .await
    }
}
