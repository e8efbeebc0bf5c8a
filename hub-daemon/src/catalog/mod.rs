//! The catalog: VMs, repositories and backups, in SQLite (the embedded
//! default, `sqlite:PATH`) or PostgreSQL (`postgres://…`, which several
//! hubs can share).
//!
//! Every method is written once against [`db`], a small backend-neutral
//! layer (SQL with numbered `?N` placeholders, rows of typed values, one
//! typed error); its module doc says how a method is written and which SQL
//! is portable. The schema and its migrations are in `schema` (SQLite's
//! `user_version`, PostgreSQL's `schema_version` table).
//!
//! # Data model
//! * `nodes(node_id, api_url, advertise_host, nbd_first_port, nbd_last_port,
//!   free_bytes, started_ms, heartbeat_ms, lease_until_ms)`: the hubs
//!   sharing the catalog and their heartbeat leases (`nodes`).
//! * `repositories(id, path, node_id)`: a repository's files are on its
//!   node; backups and their disks carry the node they run on too. The
//!   per-node methods ([`Catalog::own_repositories`], prune candidates,
//!   the prune journal, scheduled verification) answer for the node the
//!   handle works for ([`Catalog::for_node`]).
//! * `vms(name, vm_context_id)` and `vm_disks(vm_name, disk_id, size_bytes,
//!   unit_number, disk_key, label)`: what a backup of the VM covers.
//! * `api_tokens(name, role, salt, token_hash, created_ms, last_used_ms)`:
//!   API bearer tokens, stored only as salted hashes (`tokens`).
//! * `callback_tokens(backup_id, salt, token_hash)`: the token an appliance
//!   reports a running backup with, also only hashed; gone when it ends.
//! * `policies(id, keep_last, …, min_retention_days, verify_every_days)`:
//!   retention policies a backup's `policy_id` names (`policies`).
//! * `repository_s3(repository_id, endpoint, bucket, …)` and
//!   `layer_objects(backup_id, disk_id, object_key, sha256, …)`: the
//!   object-storage tier (`offload`); `backup_disks.location` says where
//!   each layer lives.
//! * `object_deletions(repository_id, object_key, version_id,
//!   retain_until_ms, …)`: objects no layer counts on any more, queued in
//!   the transaction that forgot them and deleted from the bucket once
//!   their retention allows (`object_deletions`).
//! * `prune_journal(repository_id, path, action)`: file work a committed
//!   prune still owes, finished at start-up after a crash.
//! * `backups(id, vm_name, repository_id, backup_type, status, ...)` with
//!   `backup_disks(backup_id, disk_id, backup_mode, parent_backup_id, file,
//!   ...)`. A backup is `running`, `completed` or `failed`.
//!
//! # Rules the database keeps (they hold with several hubs)
//! * One running backup per VM: a partial unique index on
//!   `backups(vm_name) WHERE status = 'running'`; the second insert gets
//!   `Conflict` whichever hub makes it.
//! * One backup per NBD port: a running backup's disks hold their
//!   `nbd_port` (cleared when it ends); a unique index over the non-NULL
//!   ports refuses a second holder (`Conflict`).
//! * No parent deleted under a child: deleting a backup (alone or in a
//!   prune) is refused while a running or completed backup's disk names
//!   it as parent; failed backups' parent links are cleared instead. On
//!   PostgreSQL a deferred foreign key also orders the delete against a
//!   child another hub inserts meanwhile.
//!
//! # Consistency with the files
//! An image file is valid only if its backup row says `completed`. Images
//! are written under a `.partial` name, renamed, synced, and only then is
//! the row committed (one transaction for all disks); startup
//! reconciliation deletes the files of any backup still `running`.
//!
//! # Concurrency
//! One connection per catalog handle behind a mutex, used from tokio's
//! blocking pool (the sync clients block). For SQLite that is the only
//! sane shape (one writer); WAL and `synchronous=FULL` so a committed
//! backup survives power loss. For PostgreSQL one connection too: a hub's
//! catalog traffic is a few short statements per API call (prepared once
//! and cached), so a pool would add moving parts for no measured gain
//! (BENCHMARKS.md, "Catalog"); calls within one hub stay serialized as on
//! SQLite, and what two hubs race for is decided by constraints, not by
//! reads (PostgreSQL's default READ COMMITTED). A connection the server
//! dropped is re-opened on the next call.

pub mod db;
mod nodes;
mod object_deletions;
mod offload;
mod policies;
mod schema;
mod space;
mod tokens;

pub use nodes::{BackupOwner, NodeInfo, NodeRegistration, LOCAL};
pub use object_deletions::ObjectDeletion;
pub use offload::{LayerObject, S3Settings, TierCandidate};
pub use policies::{JournalEntry, Policy, PruneCandidate, PruneCommit, Reparent};
pub use space::DiskHistory;
pub use tokens::{Role, TokenInfo, CALLBACK_PREFIX};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use db::{params, Conn, Row, Sql, Tx};
pub use db::{Backend, CatalogUrl, DbError};

use crate::error::{DaemonError, Result};
use crate::model::{BackupDisk, BackupRecord, DiskSpec, Repository, Vm};
use crate::time::{now_ms, rfc3339};

/// Handle to the catalog. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Catalog {
    conn: Arc<Mutex<Conn>>,
    /// The node this handle works for: rows it creates belong to it, and
    /// the per-node questions (own repositories, own running backups) are
    /// about it. `local` until [`Catalog::for_node`] says otherwise.
    node: Arc<str>,
}

/// A backup about to start.
#[derive(Debug, Clone)]
pub struct NewBackup {
    /// Id.
    pub id: String,
    /// VM.
    pub vm_name: String,
    /// Repository.
    pub repository_id: String,
    /// "full" / "incremental".
    pub backup_type: String,
    /// Policy.
    pub policy_id: Option<String>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Creation time (unix ms).
    pub created_ms: i64,
    /// Disks.
    pub disks: Vec<NewBackupDisk>,
}

/// One disk of a [`NewBackup`].
#[derive(Debug, Clone)]
pub struct NewBackupDisk {
    /// Disk index.
    pub disk_id: u32,
    /// Device key.
    pub disk_key: u32,
    /// Virtual size.
    pub size_bytes: u64,
    /// "full" / "incremental".
    pub backup_mode: String,
    /// Parent backup.
    pub parent_backup_id: Option<String>,
    /// Why an incremental request backs this disk up in full.
    pub mode_reason: Option<String>,
    /// Image path relative to the repository (final name).
    pub file: String,
    /// Export name.
    pub export_name: String,
    /// Port.
    pub nbd_port: Option<u16>,
}

/// What completing one disk records.
#[derive(Debug, Clone)]
pub struct DiskCompletion {
    /// Disk index.
    pub disk_id: u32,
    /// Payload bytes received.
    pub bytes_written: u64,
    /// Image file size.
    pub image_bytes: u64,
    /// CBT change id from the SNA.
    pub change_id: Option<String>,
    /// Root digest (hex).
    pub digest: String,
}

/// One restore point of a disk in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// Backup id.
    pub backup_id: String,
    /// Image relative to the repository.
    pub file: String,
    /// Root digest.
    pub digest: Option<String>,
    /// Parent backup.
    pub parent_backup_id: Option<String>,
    /// Backup status.
    pub status: String,
    /// Virtual size.
    pub size_bytes: u64,
    /// This disk's last verification outcome ("ok" / "corrupt").
    pub verify_status: Option<String>,
    /// Where the layer lives: `local`, `local+s3` or `s3` (evicted).
    pub location: String,
}

/// What failing one disk records.
#[derive(Debug, Clone, Default)]
pub struct DiskFailure {
    /// Disk index.
    pub disk_id: u32,
    /// Payload bytes received.
    pub bytes_written: u64,
    /// Data-changing requests answered with an error.
    pub write_errors: u64,
    /// The last such error.
    pub last_error: Option<String>,
}

/// The outcome of verifying one disk of one restore point.
#[derive(Debug, Clone)]
pub struct DiskVerified {
    /// Backup.
    pub backup_id: String,
    /// Disk index.
    pub disk_id: u32,
    /// "ok" or "corrupt".
    pub status: String,
    /// Details (JSON): bad ranges, where they come from.
    pub detail: String,
}

/// The latest completed image of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentImage {
    /// Backup id.
    pub backup_id: String,
    /// File relative to the repository.
    pub file: String,
    /// Virtual size.
    pub size_bytes: u64,
    /// Image format as recorded.
    pub format: String,
    /// Root digest, if recorded.
    pub digest: Option<String>,
    /// Last verification outcome.
    pub verify_status: Option<String>,
    /// Change id the sender reported at completion.
    pub change_id: Option<String>,
}

/// `e`, or `Conflict(msg)` if it is a unique violation.
fn conflict_if_unique(e: DbError, msg: impl FnOnce() -> String) -> DaemonError {
    match e {
        DbError::Unique(_) => DaemonError::Conflict(msg()),
        e => e.into(),
    }
}

impl Catalog {
    /// Open (creating if needed) the SQLite catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog> {
        Self::open_blocking(&CatalogUrl::Sqlite(path.to_owned()))
    }

    /// Open the catalog at `url` (SQLite or PostgreSQL), bringing its
    /// schema up to date. Connecting blocks, so it runs on the blocking
    /// pool.
    pub async fn connect(url: &CatalogUrl) -> Result<Catalog> {
        let url = url.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(&url))
            .await
            .map_err(|e| DaemonError::Internal(format!("catalog task failed: {e}")))?
    }

    fn open_blocking(url: &CatalogUrl) -> Result<Catalog> {
        let mut conn = Conn::open(url)?;
        schema::init(&mut conn)?;
        Ok(Catalog {
            conn: Arc::new(Mutex::new(conn)),
            node: Arc::from(nodes::LOCAL),
        })
    }

    /// This handle, working for node `node_id` (same connection).
    pub fn for_node(mut self, node_id: &str) -> Catalog {
        self.node = Arc::from(node_id);
        self
    }

    /// The node this handle works for.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Which database this catalog is in.
    pub async fn backend(&self) -> Result<Backend> {
        self.with(|c| Ok(c.backend())).await
    }

    /// Run `f` on the connection, off the async threads.
    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Conn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A poisoned mutex means a panic mid-call; the transaction was
            // rolled back (dropped), so the connection is still usable.
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            c.ensure_open()?;
            f(&mut c)
        })
        .await
        .map_err(|e| DaemonError::Internal(format!("catalog task failed: {e}")))?
    }

    /// Refuse (`Conflict`) while any disk still names one of `removed` as
    /// its parent; called inside a delete's transaction after the rows
    /// went, so the whole delete rolls back. Failed backups' parent links
    /// are only history: they are cleared instead of blocking the delete.
    /// On PostgreSQL the deferred foreign key (migration 7) backs this up
    /// against a child another hub inserts meanwhile.
    fn refuse_orphans(tx: &mut Tx<'_>, removed: &[String]) -> Result<()> {
        for id in removed {
            tx.execute(
                "UPDATE backup_disks SET parent_backup_id = NULL
                 WHERE parent_backup_id = ?1 AND backup_id IN (SELECT id FROM backups WHERE status = 'failed')",
                params![id],
            )?;
            let child = tx.query_opt(
                "SELECT backup_id FROM backup_disks WHERE parent_backup_id = ?1 ORDER BY backup_id LIMIT 1",
                params![id],
            )?;
            if let Some(r) = child {
                let child: String = r.get(0)?;
                return Err(DaemonError::Conflict(format!(
                    "backup {id:?} is the parent of backup {child:?}"
                )));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- repositories

    /// Add a repository; `Conflict` if the id exists.
    pub async fn create_repository(&self, repo: Repository) -> Result<()> {
        let node = self.node.to_string();
        self.with(move |c| {
            c.execute(
                "INSERT INTO repositories (id, path, created_ms, node_id, shared) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![repo.id, repo.path, now_ms(), node, repo.shared],
            )
            .map_err(|e| conflict_if_unique(e, || format!("repository {:?} exists", repo.id)))?;
            Ok(())
        })
        .await
    }

    /// Add a repository unless one with this id exists.
    pub async fn ensure_repository(&self, repo: Repository) -> Result<()> {
        let node = self.node.to_string();
        self.with(move |c| {
            c.execute(
                "INSERT INTO repositories (id, path, created_ms, node_id, shared) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO NOTHING",
                params![repo.id, repo.path, now_ms(), node, repo.shared],
            )?;
            Ok(())
        })
        .await
    }

    /// All repositories.
    pub async fn repositories(&self) -> Result<Vec<Repository>> {
        self.with(|c| {
            let rows = c.query(
                "SELECT id, path, node_id, shared FROM repositories ORDER BY id",
                params![],
            )?;
            Ok(rows
                .iter()
                .map(read_repository)
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// The repositories whose files this handle's node can reach: its own
    /// and the shared ones. What start-up reconciliation looks at (in a
    /// shared one, only at the backups this node runs or manages).
    pub async fn own_repositories(&self) -> Result<Vec<Repository>> {
        let node = self.node.to_string();
        self.with(move |c| {
            let rows = c.query(
                "SELECT id, path, node_id, shared FROM repositories WHERE node_id = ?1 OR shared = 1 ORDER BY id",
                params![node],
            )?;
            Ok(rows
                .iter()
                .map(read_repository)
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// One repository.
    pub async fn repository(&self, id: &str) -> Result<Option<Repository>> {
        let id = id.to_owned();
        self.with(move |c| {
            let row = c.query_opt(
                "SELECT id, path, node_id, shared FROM repositories WHERE id = ?1",
                params![id],
            )?;
            Ok(row.as_ref().map(read_repository).transpose()?)
        })
        .await
    }

    // ---------------------------------------------------------------- VMs

    fn running_count(c: &mut impl Sql, vm: &str) -> Result<i64> {
        Ok(c.query_one(
            "SELECT count(*) FROM backups WHERE vm_name = ?1 AND status = 'running'",
            params![vm],
        )?
        .get(0)?)
    }

    /// Register or replace a VM and its disks. `Conflict` while a backup of
    /// it runs.
    pub async fn put_vm(
        &self,
        name: &str,
        vm_context_id: &str,
        disks: Vec<DiskSpec>,
        sna_url: Option<String>,
    ) -> Result<Vm> {
        let (name, ctx) = (name.to_owned(), vm_context_id.to_owned());
        self.with(move |c| {
            let mut tx = c.transaction()?;
            if Self::running_count(&mut tx, &name)? > 0 {
                return Err(DaemonError::Conflict(format!("a backup of VM {name:?} is running")));
            }
            let now = now_ms();
            tx.execute(
                "INSERT INTO vms (name, vm_context_id, updated_ms, sna_url) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET vm_context_id = excluded.vm_context_id, updated_ms = excluded.updated_ms,
                   sna_url = excluded.sna_url",
                params![name, ctx, now, sna_url],
            )?;
            tx.execute("DELETE FROM vm_disks WHERE vm_name = ?1", params![name])?;
            for d in &disks {
                tx.execute(
                    "INSERT INTO vm_disks (vm_name, disk_id, size_bytes, unit_number, disk_key, label) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![name, d.disk_id, d.size_bytes as i64, d.unit_number, d.disk_key, d.label],
                )?;
            }
            tx.commit()?;
            Ok(Vm {
                vm_name: name,
                vm_context_id: ctx,
                disks,
                sna_url,
                updated_at: rfc3339(now),
            })
        })
        .await
    }

    fn read_vm(c: &mut impl Sql, name: &str) -> Result<Option<Vm>> {
        let Some(row) = c.query_opt(
            "SELECT vm_context_id, updated_ms, sna_url FROM vms WHERE name = ?1",
            params![name],
        )?
        else {
            return Ok(None);
        };
        let (ctx, updated, sna_url): (String, i64, Option<String>) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        let disks = c
            .query(
                "SELECT disk_id, size_bytes, unit_number, disk_key, label FROM vm_disks WHERE vm_name = ?1 ORDER BY disk_id",
                params![name],
            )?
            .iter()
            .map(|r| {
                Ok(DiskSpec {
                    disk_id: r.get(0)?,
                    size_bytes: r.get(1)?,
                    unit_number: r.get(2)?,
                    disk_key: Some(r.get(3)?),
                    label: r.get(4)?,
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(Some(Vm {
            vm_name: name.to_owned(),
            vm_context_id: ctx,
            disks,
            sna_url,
            updated_at: rfc3339(updated),
        }))
    }

    /// One VM.
    pub async fn vm(&self, name: &str) -> Result<Option<Vm>> {
        let name = name.to_owned();
        self.with(move |c| Self::read_vm(c, &name)).await
    }

    /// All VMs.
    pub async fn vms(&self) -> Result<Vec<Vm>> {
        self.with(|c| {
            let names = c
                .query("SELECT name FROM vms ORDER BY name", params![])?
                .iter()
                .map(|r| r.get::<String>(0))
                .collect::<Result<Vec<_>, DbError>>()?;
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                if let Some(vm) = Self::read_vm(c, &n)? {
                    out.push(vm);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Forget a VM (its backups stay). `Conflict` while a backup runs.
    pub async fn delete_vm(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            if Self::running_count(&mut tx, &name)? > 0 {
                return Err(DaemonError::Conflict(format!(
                    "a backup of VM {name:?} is running"
                )));
            }
            tx.execute("DELETE FROM vm_disks WHERE vm_name = ?1", params![name])?;
            let n = tx.execute("DELETE FROM vms WHERE name = ?1", params![name])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    // ---------------------------------------------------------------- backups

    /// Record a backup as running, with its disks, atomically. `Conflict`
    /// if another backup of the VM is running (the partial unique index
    /// decides, also between hubs), if a disk's port is taken, or if a
    /// parent is gone.
    pub async fn insert_running(&self, b: NewBackup) -> Result<()> {
        let node = self.node.to_string();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let tags = serde_json::to_string(&b.tags).map_err(|e| DaemonError::Internal(e.to_string()))?;
            tx.execute(
                "INSERT INTO backups (id, vm_name, repository_id, backup_type, policy_id, tags, status, created_ms, node_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?8)",
                params![b.id, b.vm_name, b.repository_id, b.backup_type, b.policy_id, tags, b.created_ms, node],
            )
            .map_err(|e| conflict_if_unique(e, || format!("a backup of VM {:?} is already running", b.vm_name)))?;
            for d in &b.disks {
                tx.execute(
                    "INSERT INTO backup_disks (backup_id, disk_id, disk_key, size_bytes, backup_mode, parent_backup_id, file, export_name, nbd_port, mode_reason, format, node_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'qcow2', ?11)",
                    params![b.id, d.disk_id, d.disk_key, d.size_bytes as i64, d.backup_mode, d.parent_backup_id, d.file, d.export_name, d.nbd_port, d.mode_reason, node],
                )
                .map_err(|e| conflict_if_unique(e, || format!("NBD port {:?} is taken", d.nbd_port)))?;
            }
            tx.commit().map_err(parent_gone)?;
            Ok(())
        })
        .await
    }

    /// Re-record the mode, parent and reason of a running backup's disks
    /// (after the appliance chose full for some).
    pub async fn set_disk_modes(&self, id: &str, disks: Vec<NewBackupDisk>) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            for d in &disks {
                tx.execute(
                    "UPDATE backup_disks SET backup_mode = ?3, parent_backup_id = ?4, mode_reason = ?5
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, d.disk_id, d.backup_mode, d.parent_backup_id, d.mode_reason],
                )?;
            }
            tx.commit().map_err(parent_gone)?;
            Ok(())
        })
        .await
    }

    /// Set the ports of a running backup's disks once they are bound.
    /// `Conflict` if another running backup holds one of them (two hubs
    /// on one host, or a stale row).
    pub async fn set_ports(&self, id: &str, ports: Vec<(u32, u16)>) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            for (disk, port) in ports {
                tx.execute(
                    "UPDATE backup_disks SET nbd_port = ?3 WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, disk, port],
                )
                .map_err(|e| {
                    conflict_if_unique(e, || {
                        format!("NBD port {port} is held by another running backup")
                    })
                })?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Mark completed with per-disk figures, in one transaction.
    pub async fn complete(&self, id: &str, disks: Vec<DiskCompletion>) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            for d in &disks {
                tx.execute(
                    "UPDATE backup_disks SET bytes_written = ?3, image_bytes = ?4, change_id = ?5, digest = ?6
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, d.disk_id, d.bytes_written as i64, d.image_bytes as i64, d.change_id, d.digest],
                )?;
            }
            // An ended backup holds no port (the port index counts on it).
            tx.execute("UPDATE backup_disks SET nbd_port = NULL WHERE backup_id = ?1", params![id])?;
            let n = tx.execute(
                "UPDATE backups SET status = 'completed', completed_ms = ?2 WHERE id = ?1 AND status = 'running'",
                params![id, now_ms()],
            )?;
            if n != 1 {
                return Err(DaemonError::Conflict(format!("backup {id:?} is not running")));
            }
            tx.execute("DELETE FROM callback_tokens WHERE backup_id = ?1", params![id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Mark failed with a reason (and what each disk saw so far).
    pub async fn fail(&self, id: &str, reason: &str, disks: Vec<DiskFailure>) -> Result<()> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        self.with(move |c| {
            let mut tx = c.transaction()?;
            for d in disks {
                tx.execute(
                    "UPDATE backup_disks SET bytes_written = ?3, write_errors = ?4, last_error = ?5
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![
                        id,
                        d.disk_id,
                        d.bytes_written as i64,
                        d.write_errors as i64,
                        d.last_error
                    ],
                )?;
            }
            tx.execute(
                "UPDATE backup_disks SET nbd_port = NULL WHERE backup_id = ?1",
                params![id],
            )?;
            tx.execute(
                "UPDATE backups SET status = 'failed', error = ?2, completed_ms = ?3 WHERE id = ?1",
                params![id, reason, now_ms()],
            )?;
            tx.execute(
                "DELETE FROM callback_tokens WHERE backup_id = ?1",
                params![id],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Delete a backup's rows. `Conflict` (nothing deleted) while a
    /// running or completed backup has it as a parent.
    pub async fn delete_backup(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            // Its objects (the rows go with the backup's) are owed a
            // deletion from the bucket.
            Self::queue_object_deletions(&mut tx, &id, None, now_ms())?;
            tx.execute(
                "DELETE FROM callback_tokens WHERE backup_id = ?1",
                params![id],
            )?;
            tx.execute("DELETE FROM backup_disks WHERE backup_id = ?1", params![id])?;
            tx.execute("DELETE FROM backups WHERE id = ?1", params![id])?;
            Self::refuse_orphans(&mut tx, std::slice::from_ref(&id))?;
            tx.commit().map_err(parent_gone)?;
            Ok(())
        })
        .await
    }

    fn ids(rows: Vec<Row>) -> Result<Vec<String>> {
        Ok(rows
            .iter()
            .map(|r| r.get::<String>(0))
            .collect::<Result<_, DbError>>()?)
    }

    /// Backups (running or completed) whose disks have `id` as parent.
    pub async fn dependents(&self, id: &str) -> Result<Vec<String>> {
        let id = id.to_owned();
        self.with(move |c| {
            Self::ids(c.query(
                "SELECT DISTINCT b.id FROM backup_disks d JOIN backups b ON b.id = d.backup_id
                 WHERE d.parent_backup_id = ?1 AND b.status IN ('running', 'completed') ORDER BY b.id",
                params![id],
            )?)
        })
        .await
    }

    /// Disk `disk_id` of backup `id` and its ancestors, newest first (at
    /// most `max` long; a longer or looping chain is an error).
    pub async fn chain(&self, id: &str, disk_id: u32, max: usize) -> Result<Vec<ChainLink>> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut out: Vec<ChainLink> = Vec::new();
            let mut next = Some(id);
            while let Some(bid) = next {
                if out.len() >= max || out.iter().any(|l| l.backup_id == bid) {
                    return Err(DaemonError::BadImage(format!(
                        "backup chain of disk {disk_id} is longer than {max} or loops"
                    )));
                }
                let row = c.query_opt(
                    "SELECT d.backup_id, d.file, d.digest, d.parent_backup_id, b.status, d.size_bytes, d.verify_status, d.location
                     FROM backup_disks d JOIN backups b ON b.id = d.backup_id
                     WHERE d.backup_id = ?1 AND d.disk_id = ?2",
                    params![bid, disk_id],
                )?;
                let Some(r) = row else {
                    return Err(DaemonError::BadImage(format!(
                        "backup {bid:?} (disk {disk_id}) is missing from the catalog"
                    )));
                };
                let link = ChainLink {
                    backup_id: r.get(0)?,
                    file: r.get(1)?,
                    digest: r.get(2)?,
                    parent_backup_id: r.get(3)?,
                    status: r.get(4)?,
                    size_bytes: r.get(5)?,
                    verify_status: r.get(6)?,
                    location: r.get(7)?,
                };
                next = link.parent_backup_id.clone();
                out.push(link);
            }
            Ok(out)
        })
        .await
    }

    /// Completed backups whose disk `disk_id` has `id` as parent.
    pub async fn children(&self, id: &str, disk_id: u32) -> Result<Vec<String>> {
        let id = id.to_owned();
        self.with(move |c| {
            Self::ids(c.query(
                "SELECT d.backup_id FROM backup_disks d JOIN backups b ON b.id = d.backup_id
                 WHERE d.parent_backup_id = ?1 AND d.disk_id = ?2 AND b.status = 'completed' ORDER BY d.backup_id",
                params![id, disk_id],
            )?)
        })
        .await
    }

    /// The latest completed image of `disk_id` of `vm` in `repo`.
    pub async fn latest_image(
        &self,
        vm: &str,
        repo: &str,
        disk_id: u32,
    ) -> Result<Option<ParentImage>> {
        let (vm, repo) = (vm.to_owned(), repo.to_owned());
        self.with(move |c| {
            let row = c.query_opt(
                "SELECT b.id, d.file, d.size_bytes, d.format, d.digest, d.verify_status, d.change_id FROM backups b JOIN backup_disks d ON d.backup_id = b.id
                 WHERE b.vm_name = ?1 AND b.repository_id = ?2 AND b.status = 'completed' AND b.files_missing = 0
                   AND d.disk_id = ?3
                 ORDER BY b.completed_ms DESC, b.created_ms DESC LIMIT 1",
                params![vm, repo, disk_id],
            )?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(ParentImage {
                backup_id: r.get(0)?,
                file: r.get(1)?,
                size_bytes: r.get(2)?,
                format: r.get(3)?,
                digest: r.get(4)?,
                verify_status: r.get(5)?,
                change_id: r.get(6)?,
            }))
        })
        .await
    }

    fn read_backup(c: &mut impl Sql, id: &str) -> Result<Option<BackupRecord>> {
        let Some(r) = c.query_opt(
            "SELECT vm_name, repository_id, backup_type, policy_id, tags, status, error, created_ms, completed_ms, files_missing,
                    verify_status, verified_ms, node_id
             FROM backups WHERE id = ?1",
            params![id],
        )?
        else {
            return Ok(None);
        };
        let status: String = r.get(5)?;
        let tags: String = r.get(4)?;
        let created: i64 = r.get(7)?;
        let completed: Option<i64> = r.get(8)?;
        let verified: Option<i64> = r.get(11)?;
        let mut disks = c
            .query(
                "SELECT disk_id, disk_key, size_bytes, backup_mode, parent_backup_id, file, export_name, nbd_port,
                        bytes_written, image_bytes, change_id, format, mode_reason, write_errors, last_error,
                        digest, verify_status, verify_detail, synthetic, location
                 FROM backup_disks WHERE backup_id = ?1 ORDER BY disk_id",
                params![id],
            )?
            .iter()
            .map(|r| {
                let digest: Option<String> = r.get(15)?;
                Ok(BackupDisk {
                    disk_id: r.get(0)?,
                    disk_key: r.get(1)?,
                    size_bytes: r.get(2)?,
                    backup_mode: r.get(3)?,
                    parent_backup_id: r.get(4)?,
                    file: r.get(5)?,
                    nbd_export_name: r.get(6)?,
                    nbd_port: r.get(7)?,
                    bytes_written: r.get(8)?,
                    image_bytes: r.get(9)?,
                    change_id: r.get(10)?,
                    format: r.get(11)?,
                    mode_reason: r.get(12)?,
                    write_errors: r.get(13)?,
                    last_error: r.get(14)?,
                    digest_algorithm: digest.as_ref().map(|_| disk_digest::ALGORITHM.to_owned()),
                    digest,
                    verify_status: r.get(16)?,
                    verify: r
                        .get::<Option<String>>(17)?
                        .and_then(|t| serde_json::from_str(&t).ok()),
                    synthetic: r.get(18)?,
                    location: r.get(19)?,
                    freed_bytes_if_deleted: None,
                    connections: None,
                    last_activity: None,
                    progress: None,
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        let is_completed = status == "completed";
        if is_completed {
            for d in &mut disks {
                d.freed_bytes_if_deleted = Some(space::freed_if_deleted(c, id, d)?);
            }
        }
        let image_bytes = disks.iter().filter_map(|d| d.image_bytes).sum();
        let freed_bytes_if_deleted =
            is_completed.then(|| disks.iter().filter_map(|d| d.freed_bytes_if_deleted).sum());
        Ok(Some(BackupRecord {
            backup_id: id.to_owned(),
            vm_name: r.get(0)?,
            repository_id: r.get(1)?,
            node_id: r.get(12)?,
            backup_type: r.get(2)?,
            policy_id: r.get(3)?,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            status,
            error: r.get(6)?,
            created_at: rfc3339(created),
            completed_at: completed.map(rfc3339),
            files_missing: r.get(9)?,
            verify_status: r.get(10)?,
            verified_at: verified.map(rfc3339),
            image_bytes,
            freed_bytes_if_deleted,
            disks,
        }))
    }

    /// One backup.
    pub async fn backup(&self, id: &str) -> Result<Option<BackupRecord>> {
        let id = id.to_owned();
        self.with(move |c| Self::read_backup(c, &id)).await
    }

    /// Backups, optionally filtered, newest first.
    pub async fn backups(
        &self,
        vm: Option<String>,
        status: Option<String>,
    ) -> Result<Vec<BackupRecord>> {
        self.with(move |c| {
            let ids = Self::ids(c.query(
                "SELECT id FROM backups WHERE (CAST(?1 AS TEXT) IS NULL OR vm_name = ?1) AND (CAST(?2 AS TEXT) IS NULL OR status = ?2)
                 ORDER BY created_ms DESC, id DESC",
                params![vm, status],
            )?)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(b) = Self::read_backup(c, &id)? {
                    out.push(b);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Flag a completed backup whose files are gone (or back).
    pub async fn set_files_missing(&self, id: &str, missing: bool) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE backups SET files_missing = ?2 WHERE id = ?1",
                params![id, missing],
            )?;
            Ok(())
        })
        .await
    }

    /// Record verification outcomes (one transaction): per disk, and per
    /// backup the worst of its disks.
    pub async fn record_verify(&self, results: Vec<DiskVerified>) -> Result<()> {
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let now = now_ms();
            for r in &results {
                tx.execute(
                    "UPDATE backup_disks SET verify_status = ?3, verify_detail = ?4 WHERE backup_id = ?1 AND disk_id = ?2",
                    params![r.backup_id, r.disk_id, r.status, r.detail],
                )?;
            }
            let mut ids: Vec<&str> = results.iter().map(|r| r.backup_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                let corrupt = results
                    .iter()
                    .any(|r| r.backup_id == id && r.status != "ok");
                tx.execute(
                    "UPDATE backups SET verify_status = ?2, verified_ms = ?3 WHERE id = ?1",
                    params![id, if corrupt { "corrupt" } else { "ok" }, now],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Completed restore points due for their policy's scheduled
    /// verification at `now_ms`, most overdue first: the policy has
    /// `verify_every_days > 0`, the last verification (or, never verified,
    /// the completion) is at least that old, the images are present, every
    /// disk has a digest, and it is not flagged corrupt (a corrupt restore
    /// point stays flagged until someone verifies it on demand) nor being
    /// verified, nor evicted to the object store (its object's SHA-256 is
    /// checked whenever it is re-hydrated). Plain SQL (`COALESCE` and integer arithmetic) so it runs
    /// on PostgreSQL too.
    /// With `only`, just that restore point if it is due.
    /// Only this node's restore points: their files are here.
    pub async fn due_for_verify(&self, now_ms: i64, only: Option<String>) -> Result<Vec<String>> {
        let node = self.node.to_string();
        self.with(move |c| {
            Self::ids(c.query(
                &format!("SELECT b.id FROM backups b JOIN policies p ON p.id = b.policy_id
                 WHERE b.status = 'completed' AND b.files_missing = 0 AND p.verify_every_days > 0
                   AND (b.verify_status IS NULL OR b.verify_status = 'ok')
                   AND COALESCE(b.verified_ms, b.completed_ms) <= ?1 - p.verify_every_days * 86400000
                   AND NOT EXISTS (SELECT 1 FROM backup_disks d WHERE d.backup_id = b.id AND d.digest IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM backup_disks d WHERE d.backup_id = b.id AND d.location = 's3')
                   AND (CAST(?2 AS TEXT) IS NULL OR b.id = ?2)
                   AND {}
                 ORDER BY COALESCE(b.verified_ms, b.completed_ms), b.id", nodes::managed_by("b", 3)),
                params![now_ms, only, node],
            )?)
        })
        .await
    }

    /// Set (or clear) a backup's verification status without an outcome
    /// ("verifying" while it runs).
    pub async fn set_verify_status(&self, id: &str, status: Option<&str>) -> Result<()> {
        let (id, status) = (id.to_owned(), status.map(str::to_owned));
        self.with(move |c| {
            c.execute(
                "UPDATE backups SET verify_status = ?2 WHERE id = ?1",
                params![id, status],
            )?;
            Ok(())
        })
        .await
    }

    /// Number of backups per status.
    pub async fn count_by_status(&self) -> Result<Vec<(String, u64)>> {
        self.with(|c| {
            Ok(c.query(
                "SELECT status, count(*) FROM backups GROUP BY status ORDER BY status",
                params![],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect::<Result<_, DbError>>()?)
        })
        .await
    }
}

fn read_repository(r: &Row) -> Result<Repository, DbError> {
    Ok(Repository {
        id: r.get(0)?,
        path: r.get(1)?,
        s3: None,
        node_id: r.get(2)?,
        shared: r.get(3)?,
    })
}

/// A commit the deferred parent foreign key refused (PostgreSQL: another
/// hub deleted a parent, or this one would orphan a child) is a conflict.
fn parent_gone(e: DbError) -> DaemonError {
    match e {
        DbError::ForeignKey(m) => DaemonError::Conflict(format!(
            "a parent backup is gone or still has children: {m}"
        )),
        e => e.into(),
    }
}
