//! Retention policies, what prune reads, and prune's one commit.

use serde::{Deserialize, Serialize};

use super::db::{params, DbError, Row, Sql};
use super::Catalog;
use crate::error::{DaemonError, Result};
use crate::time::now_ms;

/// A retention policy (every option 0 = off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Policy {
    /// Id.
    pub id: String,
    /// The N newest.
    pub keep_last: u32,
    /// Newest of each of the N most recent hours.
    pub keep_hourly: u32,
    /// … days.
    pub keep_daily: u32,
    /// … ISO weeks.
    pub keep_weekly: u32,
    /// … months.
    pub keep_monthly: u32,
    /// … years.
    pub keep_yearly: u32,
    /// Chain length (restore point and ancestors) at which the newest
    /// restore point of a disk is flattened into a synthetic full.
    pub max_chain_length: u32,
    /// Nothing younger is removed.
    pub min_retention_days: u32,
    /// Re-verify a restore point this many days after its last
    /// verification (or completion); see `lifecycle::verify_schedule`.
    pub verify_every_days: u32,
    /// Offload a restore point to its repository's S3 tier this many days
    /// after completion, once it verified ok (`tier` pass).
    pub offload_after_days: u32,
    /// Delete the local copy of an offloaded restore point this many days
    /// after completion.
    pub evict_local_after_days: u32,
}

const COLUMNS: &str =
    "id, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, \
                       max_chain_length, min_retention_days, verify_every_days, \
                       offload_after_days, evict_local_after_days";

fn read_policy(r: &Row) -> Result<Policy, DbError> {
    Ok(Policy {
        id: r.get(0)?,
        keep_last: r.get(1)?,
        keep_hourly: r.get(2)?,
        keep_daily: r.get(3)?,
        keep_weekly: r.get(4)?,
        keep_monthly: r.get(5)?,
        keep_yearly: r.get(6)?,
        max_chain_length: r.get(7)?,
        min_retention_days: r.get(8)?,
        verify_every_days: r.get(9)?,
        offload_after_days: r.get(10)?,
        evict_local_after_days: r.get(11)?,
    })
}

/// One completed, policy-governed or not, restore point prune looks at.
#[derive(Debug, Clone)]
pub struct PruneCandidate {
    /// Backup id.
    pub backup_id: String,
    /// VM.
    pub vm_name: String,
    /// Repository.
    pub repository_id: String,
    /// Policy (`None`: never pruned, but its chains still count).
    pub policy_id: Option<String>,
    /// When it was taken (unix ms).
    pub created_ms: i64,
    /// Disks: (disk id, parent backup, file relative to the repository,
    /// root digest).
    pub disks: Vec<(u32, Option<String>, String, Option<String>)>,
}

/// What one executed prune of one VM/repository changes in the catalog.
#[derive(Debug, Clone, Default)]
pub struct PruneCommit {
    /// VM (refused if a backup of it runs by now).
    pub vm_name: String,
    /// Repository of every path below.
    pub repository_id: String,
    /// Every merged image.
    pub reparent: Vec<Reparent>,
    /// Backups whose rows go.
    pub remove: Vec<String>,
    /// File work owed once committed (see [`JournalEntry`]).
    pub journal: Vec<JournalEntry>,
}

/// A merged image as the catalog records it once its merge commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reparent {
    /// Backup.
    pub backup_id: String,
    /// Disk.
    pub disk_id: u32,
    /// Its parent afterwards (`None`: a synthetic full).
    pub parent: Option<String>,
    /// Size of the merged file, which replaces the old one's figure (space
    /// accounting would otherwise go on counting the old overlay).
    pub image_bytes: u64,
}

/// File work a committed prune owes, relative to its repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// Repository.
    pub repository_id: String,
    /// File relative to the repository.
    pub path: String,
    /// "rename" (`<path>.merging` over `<path>`) or "remove".
    pub action: String,
}

impl Catalog {
    /// Create or replace a policy; true if it was created.
    pub async fn put_policy(&self, p: Policy) -> Result<bool> {
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let exists = tx
                .query_opt("SELECT 1 FROM policies WHERE id = ?1", params![p.id])?
                .is_some();
            tx.execute("DELETE FROM policies WHERE id = ?1", params![p.id])?;
            tx.execute(
                &format!(
                    "INSERT INTO policies ({COLUMNS}, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    p.id,
                    p.keep_last,
                    p.keep_hourly,
                    p.keep_daily,
                    p.keep_weekly,
                    p.keep_monthly,
                    p.keep_yearly,
                    p.max_chain_length,
                    p.min_retention_days,
                    p.verify_every_days,
                    p.offload_after_days,
                    p.evict_local_after_days,
                    now_ms()
                ],
            )?;
            tx.commit()?;
            Ok(!exists)
        })
        .await
    }

    fn read_policy(c: &mut impl Sql, id: &str) -> Result<Option<Policy>> {
        let row = c.query_opt(
            &format!("SELECT {COLUMNS} FROM policies WHERE id = ?1"),
            params![id],
        )?;
        Ok(row.as_ref().map(read_policy).transpose()?)
    }

    /// One policy.
    pub async fn policy(&self, id: &str) -> Result<Option<Policy>> {
        let id = id.to_owned();
        self.with(move |c| Self::read_policy(c, &id)).await
    }

    /// Every policy, by id.
    pub async fn policies(&self) -> Result<Vec<Policy>> {
        self.with(|c| {
            let rows = c.query(
                &format!("SELECT {COLUMNS} FROM policies ORDER BY id"),
                params![],
            )?;
            Ok(rows
                .iter()
                .map(read_policy)
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// Delete a policy: `NotFound`, or `Conflict` while any backup names it
    /// (the backups would silently stop being pruned).
    pub async fn delete_policy(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let users: i64 = tx
                .query_one(
                    "SELECT count(*) FROM backups WHERE policy_id = ?1",
                    params![id],
                )?
                .get(0)?;
            if users > 0 {
                return Err(DaemonError::Conflict(format!(
                    "policy {id:?} governs {users} backup(s)"
                )));
            }
            if tx.execute("DELETE FROM policies WHERE id = ?1", params![id])? == 0 {
                return Err(DaemonError::NotFound { what: "policy", id });
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Completed backups (optionally of one VM / repository), oldest first;
    /// only in this node's repositories (prune and synthetic fulls work on
    /// files, which are on the node holding the repository).
    pub async fn prune_candidates(
        &self,
        vm: Option<String>,
        repo: Option<String>,
    ) -> Result<Vec<PruneCandidate>> {
        let node = self.node.to_string();
        self.with(move |c| {
            let mut out: Vec<PruneCandidate> = c
                .query(
                    &format!("SELECT b.id, b.vm_name, b.repository_id, b.policy_id, b.created_ms FROM backups b
                     WHERE b.status = 'completed' AND (CAST(?1 AS TEXT) IS NULL OR b.vm_name = ?1) AND (CAST(?2 AS TEXT) IS NULL OR b.repository_id = ?2)
                       AND {}
                     ORDER BY b.created_ms, b.id", super::nodes::managed_by("b", 3)),
                    params![vm, repo, node],
                )?
                .iter()
                .map(|r| {
                    Ok(PruneCandidate {
                        backup_id: r.get(0)?,
                        vm_name: r.get(1)?,
                        repository_id: r.get(2)?,
                        policy_id: r.get(3)?,
                        created_ms: r.get(4)?,
                        disks: Vec::new(),
                    })
                })
                .collect::<Result<_, DbError>>()?;
            for b in &mut out {
                b.disks = c
                    .query(
                        "SELECT disk_id, parent_backup_id, file, digest FROM backup_disks WHERE backup_id = ?1 ORDER BY disk_id",
                        params![b.backup_id],
                    )?
                    .iter()
                    .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .collect::<Result<_, DbError>>()?;
            }
            Ok(out)
        })
        .await
    }

    /// Commit one prune in one transaction: merged images get their new
    /// parents, removed backups' rows go, and the file work still owed is
    /// journalled. `Conflict` if a backup of the VM started meanwhile (it
    /// may have picked a parent that is going).
    pub async fn commit_prune(&self, p: PruneCommit) -> Result<()> {
        let node = self.node.to_string();
        let now = now_ms();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            if Catalog::running_count(&mut tx, &p.vm_name)? > 0 {
                return Err(DaemonError::Conflict(format!(
                    "a backup of VM {:?} is running",
                    p.vm_name
                )));
            }
            for r in &p.reparent {
                // A merge down to no parent made a synthetic full; one onto
                // a kept parent leaves the flag as it was.
                // The merged file is new bytes: any object the old one was
                // offloaded to no longer matches it, so the layer is local
                // only again and that object is owed a deletion.
                tx.execute(
                    "UPDATE backup_disks SET parent_backup_id = ?3, image_bytes = ?4,
                       synthetic = CASE WHEN CAST(?3 AS TEXT) IS NULL THEN 1 ELSE synthetic END,
                       location = 'local'
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![r.backup_id, r.disk_id, r.parent, r.image_bytes as i64],
                )?;
                Catalog::queue_object_deletions(&mut tx, &r.backup_id, Some(r.disk_id), now)?;
                tx.execute(
                    "DELETE FROM layer_objects WHERE backup_id = ?1 AND disk_id = ?2",
                    params![r.backup_id, r.disk_id],
                )?;
            }
            for id in &p.remove {
                Catalog::queue_object_deletions(&mut tx, id, None, now)?;
                tx.execute(
                    "DELETE FROM callback_tokens WHERE backup_id = ?1",
                    params![id],
                )?;
                tx.execute("DELETE FROM backup_disks WHERE backup_id = ?1", params![id])?;
                tx.execute("DELETE FROM backups WHERE id = ?1", params![id])?;
            }
            // After every removal, so a parent and its child may go
            // together in either order.
            Catalog::refuse_orphans(&mut tx, &p.remove)?;
            for j in &p.journal {
                tx.execute(
                    "INSERT INTO prune_journal (repository_id, path, action, node_id) VALUES (?1, ?2, ?3, ?4)",
                    params![j.repository_id, j.path, j.action, node],
                )?;
            }
            tx.commit().map_err(super::parent_gone)?;
            Ok(())
        })
        .await
    }

    /// File work committed prunes still owe in this node's repositories.
    pub async fn prune_journal(&self) -> Result<Vec<JournalEntry>> {
        let node = self.node.to_string();
        self.with(move |c| {
            let rows = c.query(
                "SELECT repository_id, path, action FROM prune_journal
                 WHERE node_id = ?1
                 ORDER BY repository_id, path",
                params![node],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    Ok(JournalEntry {
                        repository_id: r.get(0)?,
                        path: r.get(1)?,
                        action: r.get(2)?,
                    })
                })
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// Forget journal entries once their file work is done.
    pub async fn clear_journal(&self, done: Vec<JournalEntry>) -> Result<()> {
        self.with(move |c| {
            let mut tx = c.transaction()?;
            for j in &done {
                tx.execute(
                    "DELETE FROM prune_journal WHERE repository_id = ?1 AND path = ?2",
                    params![j.repository_id, j.path],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
