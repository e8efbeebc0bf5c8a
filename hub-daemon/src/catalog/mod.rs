//! The catalog: VMs, repositories and backups, in SQLite.
//!
//! # Data model
//! * `repositories(id, path)`.
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
//! * `prune_journal(repository_id, path, action)`: file work a committed
//!   prune still owes, finished at start-up after a crash.
//! * `backups(id, vm_name, repository_id, backup_type, status, ...)` with
//!   `backup_disks(backup_id, disk_id, backup_mode, parent_backup_id, file,
//!   ...)`. A backup is `running`, `completed` or `failed`; a partial
//!   unique index allows one `running` backup per VM, so the database itself
//!   refuses a second concurrent backup.
//!
//! # Consistency with the files
//! An image file is valid only if its backup row says `completed`. Images
//! are written under a `.partial` name, renamed, synced, and only then is
//! the row committed (one transaction for all disks); startup
//! reconciliation deletes the files of any backup still `running`.
//!
//! # Concurrency
//! One connection behind a mutex, used from tokio's blocking pool; WAL and
//! `synchronous=FULL` so a committed backup survives power loss.

mod offload;
mod policies;
mod schema;
mod space;
mod tokens;

pub use offload::{LayerObject, S3Settings, TierCandidate};
pub use policies::{JournalEntry, Policy, PruneCandidate, PruneCommit, Reparent};
pub use space::DiskHistory;
pub use tokens::{Role, TokenInfo, CALLBACK_PREFIX};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{DaemonError, Result};
use crate::model::{BackupDisk, BackupRecord, DiskSpec, Repository, Vm};
use crate::time::{now_ms, rfc3339};

/// Handle to the catalog. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Catalog {
    conn: Arc<Mutex<Connection>>,
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

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Catalog {
    /// Open (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog> {
        let conn = Connection::open(path)?;
        schema::init(&conn)?;
        Ok(Catalog {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Run `f` on the connection, off the async threads.
    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A poisoned mutex means a panic mid-call; SQLite rolled the
            // transaction back, so the connection is still usable.
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| DaemonError::Internal(format!("catalog task failed: {e}")))?
    }

    // ---------------------------------------------------------------- repositories

    /// Add a repository; `Conflict` if the id exists.
    pub async fn create_repository(&self, repo: Repository) -> Result<()> {
        self.with(move |c| {
            match c.execute(
                "INSERT INTO repositories (id, path, created_ms) VALUES (?1, ?2, ?3)",
                params![repo.id, repo.path, now_ms()],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(DaemonError::Conflict(format!(
                    "repository {:?} exists",
                    repo.id
                ))),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Add a repository unless one with this id exists.
    pub async fn ensure_repository(&self, repo: Repository) -> Result<()> {
        self.with(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO repositories (id, path, created_ms) VALUES (?1, ?2, ?3)",
                params![repo.id, repo.path, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// All repositories.
    pub async fn repositories(&self) -> Result<Vec<Repository>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, path FROM repositories ORDER BY id")?;
            let rows = st.query_map([], |r| {
                Ok(Repository {
                    id: r.get(0)?,
                    path: r.get(1)?,
                    s3: None,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// One repository.
    pub async fn repository(&self, id: &str) -> Result<Option<Repository>> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT id, path FROM repositories WHERE id = ?1",
                [id],
                |r| {
                    Ok(Repository {
                        id: r.get(0)?,
                        path: r.get(1)?,
                        s3: None,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    // ---------------------------------------------------------------- VMs

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
            let tx = c.transaction()?;
            let running: i64 = tx.query_row(
                "SELECT count(*) FROM backups WHERE vm_name = ?1 AND status = 'running'",
                [&name],
                |r| r.get(0),
            )?;
            if running > 0 {
                return Err(DaemonError::Conflict(format!("a backup of VM {name:?} is running")));
            }
            let now = now_ms();
            tx.execute(
                "INSERT INTO vms (name, vm_context_id, updated_ms, sna_url) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET vm_context_id = excluded.vm_context_id, updated_ms = excluded.updated_ms,
                   sna_url = excluded.sna_url",
                params![name, ctx, now, sna_url],
            )?;
            tx.execute("DELETE FROM vm_disks WHERE vm_name = ?1", [&name])?;
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

    fn read_vm(c: &Connection, name: &str) -> Result<Option<Vm>> {
        let row: Option<(String, i64, Option<String>)> = c
            .query_row(
                "SELECT vm_context_id, updated_ms, sna_url FROM vms WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((ctx, updated, sna_url)) = row else {
            return Ok(None);
        };
        let mut st = c.prepare(
            "SELECT disk_id, size_bytes, unit_number, disk_key, label FROM vm_disks WHERE vm_name = ?1 ORDER BY disk_id",
        )?;
        let disks = st
            .query_map([name], |r| {
                Ok(DiskSpec {
                    disk_id: r.get(0)?,
                    size_bytes: r.get::<_, i64>(1)? as u64,
                    unit_number: r.get(2)?,
                    disk_key: Some(r.get(3)?),
                    label: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
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
            let names: Vec<String> = c
                .prepare("SELECT name FROM vms ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
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
            let tx = c.transaction()?;
            let running: i64 = tx.query_row(
                "SELECT count(*) FROM backups WHERE vm_name = ?1 AND status = 'running'",
                [&name],
                |r| r.get(0),
            )?;
            if running > 0 {
                return Err(DaemonError::Conflict(format!(
                    "a backup of VM {name:?} is running"
                )));
            }
            tx.execute("DELETE FROM vm_disks WHERE vm_name = ?1", [&name])?;
            let n = tx.execute("DELETE FROM vms WHERE name = ?1", [&name])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    // ---------------------------------------------------------------- backups

    /// Record a backup as running, with its disks, atomically. `Conflict`
    /// if another backup of the VM is running.
    pub async fn insert_running(&self, b: NewBackup) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let tags = serde_json::to_string(&b.tags).map_err(|e| DaemonError::Internal(e.to_string()))?;
            match tx.execute(
                "INSERT INTO backups (id, vm_name, repository_id, backup_type, policy_id, tags, status, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)",
                params![b.id, b.vm_name, b.repository_id, b.backup_type, b.policy_id, tags, b.created_ms],
            ) {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(DaemonError::Conflict(format!("a backup of VM {:?} is already running", b.vm_name)))
                }
                Err(e) => return Err(e.into()),
            }
            for d in &b.disks {
                tx.execute(
                    "INSERT INTO backup_disks (backup_id, disk_id, disk_key, size_bytes, backup_mode, parent_backup_id, file, export_name, nbd_port, mode_reason, format)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'qcow2')",
                    params![b.id, d.disk_id, d.disk_key, d.size_bytes as i64, d.backup_mode, d.parent_backup_id, d.file, d.export_name, d.nbd_port, d.mode_reason],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Re-record the mode, parent and reason of a running backup's disks
    /// (after the appliance chose full for some).
    pub async fn set_disk_modes(&self, id: &str, disks: Vec<NewBackupDisk>) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            for d in &disks {
                tx.execute(
                    "UPDATE backup_disks SET backup_mode = ?3, parent_backup_id = ?4, mode_reason = ?5
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, d.disk_id, d.backup_mode, d.parent_backup_id, d.mode_reason],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Set the ports of a running backup's disks once they are bound.
    pub async fn set_ports(&self, id: &str, ports: Vec<(u32, u16)>) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            for (disk, port) in ports {
                tx.execute(
                    "UPDATE backup_disks SET nbd_port = ?3 WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, disk, port],
                )?;
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
            let tx = c.transaction()?;
            for d in &disks {
                tx.execute(
                    "UPDATE backup_disks SET bytes_written = ?3, image_bytes = ?4, change_id = ?5, digest = ?6, nbd_port = NULL
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, d.disk_id, d.bytes_written as i64, d.image_bytes as i64, d.change_id, d.digest],
                )?;
            }
            let n = tx.execute(
                "UPDATE backups SET status = 'completed', completed_ms = ?2 WHERE id = ?1 AND status = 'running'",
                params![id, now_ms()],
            )?;
            if n != 1 {
                return Err(DaemonError::Conflict(format!("backup {id:?} is not running")));
            }
            tx.execute("DELETE FROM callback_tokens WHERE backup_id = ?1", [&id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Mark failed with a reason (and what each disk saw so far).
    pub async fn fail(&self, id: &str, reason: &str, disks: Vec<DiskFailure>) -> Result<()> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        self.with(move |c| {
            let tx = c.transaction()?;
            for d in disks {
                tx.execute(
                    "UPDATE backup_disks SET bytes_written = ?3, write_errors = ?4, last_error = ?5, nbd_port = NULL
                     WHERE backup_id = ?1 AND disk_id = ?2",
                    params![id, d.disk_id, d.bytes_written as i64, d.write_errors as i64, d.last_error],
                )?;
            }
            tx.execute(
                "UPDATE backups SET status = 'failed', error = ?2, completed_ms = ?3 WHERE id = ?1",
                params![id, reason, now_ms()],
            )?;
            tx.execute("DELETE FROM callback_tokens WHERE backup_id = ?1", [&id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Delete a backup's rows.
    pub async fn delete_backup(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM callback_tokens WHERE backup_id = ?1", [&id])?;
            tx.execute("DELETE FROM backup_disks WHERE backup_id = ?1", [&id])?;
            tx.execute("DELETE FROM backups WHERE id = ?1", [&id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Backups (running or completed) whose disks have `id` as parent.
    pub async fn dependents(&self, id: &str) -> Result<Vec<String>> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT DISTINCT b.id FROM backup_disks d JOIN backups b ON b.id = d.backup_id
                 WHERE d.parent_backup_id = ?1 AND b.status IN ('running', 'completed') ORDER BY b.id",
            )?;
            let rows = st.query_map([id], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
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
                let row: Option<ChainLink> = c
                    .query_row(
                        "SELECT d.backup_id, d.file, d.digest, d.parent_backup_id, b.status, d.size_bytes, d.verify_status, d.location
                         FROM backup_disks d JOIN backups b ON b.id = d.backup_id
                         WHERE d.backup_id = ?1 AND d.disk_id = ?2",
                        params![bid, disk_id],
                        |r| {
                            Ok(ChainLink {
                                backup_id: r.get(0)?,
                                file: r.get(1)?,
                                digest: r.get(2)?,
                                parent_backup_id: r.get(3)?,
                                status: r.get(4)?,
                                size_bytes: r.get::<_, i64>(5)? as u64,
                                verify_status: r.get(6)?,
                                location: r.get(7)?,
                            })
                        },
                    )
                    .optional()?;
                let Some(link) = row else {
                    return Err(DaemonError::BadImage(format!(
                        "backup {bid:?} (disk {disk_id}) is missing from the catalog"
                    )));
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
            let mut st = c.prepare(
                "SELECT d.backup_id FROM backup_disks d JOIN backups b ON b.id = d.backup_id
                 WHERE d.parent_backup_id = ?1 AND d.disk_id = ?2 AND b.status = 'completed' ORDER BY d.backup_id",
            )?;
            let rows = st.query_map(params![id, disk_id], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
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
            Ok(c.query_row(
                "SELECT b.id, d.file, d.size_bytes, d.format, d.digest, d.verify_status, d.change_id FROM backups b JOIN backup_disks d ON d.backup_id = b.id
                 WHERE b.vm_name = ?1 AND b.repository_id = ?2 AND b.status = 'completed' AND b.files_missing = 0
                   AND d.disk_id = ?3
                 ORDER BY b.completed_ms DESC, b.created_ms DESC LIMIT 1",
                params![vm, repo, disk_id],
                |r| {
                    Ok(ParentImage {
                        backup_id: r.get(0)?,
                        file: r.get(1)?,
                        size_bytes: r.get::<_, i64>(2)? as u64,
                        format: r.get(3)?,
                        digest: r.get(4)?,
                        verify_status: r.get(5)?,
                        change_id: r.get(6)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    fn read_backup(c: &Connection, id: &str) -> Result<Option<BackupRecord>> {
        type Row = (
            String,
            String,
            String,
            Option<String>,
            String,
            String,
            Option<String>,
            i64,
            Option<i64>,
            bool,
            Option<String>,
            Option<i64>,
        );
        let row: Option<Row> = c
            .query_row(
                "SELECT vm_name, repository_id, backup_type, policy_id, tags, status, error, created_ms, completed_ms, files_missing,
                        verify_status, verified_ms
                 FROM backups WHERE id = ?1",
                [id],
                |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?))
                },
            )
            .optional()?;
        let Some((
            vm,
            repo,
            btype,
            policy,
            tags,
            status,
            error,
            created,
            completed,
            missing,
            vstatus,
            vms,
        )) = row
        else {
            return Ok(None);
        };
        let mut st = c.prepare(
            "SELECT disk_id, disk_key, size_bytes, backup_mode, parent_backup_id, file, export_name, nbd_port,
                    bytes_written, image_bytes, change_id, format, mode_reason, write_errors, last_error,
                    digest, verify_status, verify_detail, synthetic, location
             FROM backup_disks WHERE backup_id = ?1 ORDER BY disk_id",
        )?;
        let mut disks = st
            .query_map([id], |r| {
                Ok(BackupDisk {
                    disk_id: r.get(0)?,
                    disk_key: r.get(1)?,
                    size_bytes: r.get::<_, i64>(2)? as u64,
                    backup_mode: r.get(3)?,
                    parent_backup_id: r.get(4)?,
                    file: r.get(5)?,
                    nbd_export_name: r.get(6)?,
                    nbd_port: r.get(7)?,
                    bytes_written: r.get::<_, i64>(8)? as u64,
                    image_bytes: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
                    change_id: r.get(10)?,
                    format: r.get(11)?,
                    mode_reason: r.get(12)?,
                    write_errors: r.get::<_, i64>(13)? as u64,
                    last_error: r.get(14)?,
                    digest_algorithm: r
                        .get::<_, Option<String>>(15)?
                        .map(|_| disk_digest::ALGORITHM.to_owned()),
                    digest: r.get(15)?,
                    verify_status: r.get(16)?,
                    verify: r
                        .get::<_, Option<String>>(17)?
                        .and_then(|t| serde_json::from_str(&t).ok()),
                    synthetic: r.get(18)?,
                    location: r.get(19)?,
                    freed_bytes_if_deleted: None,
                    connections: None,
                    last_activity: None,
                    progress: None,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
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
            vm_name: vm,
            repository_id: repo,
            backup_type: btype,
            policy_id: policy,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            status,
            error,
            created_at: rfc3339(created),
            completed_at: completed.map(rfc3339),
            files_missing: missing,
            verify_status: vstatus,
            verified_at: vms.map(rfc3339),
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
            let ids: Vec<String> = c
                .prepare(
                    "SELECT id FROM backups WHERE (?1 IS NULL OR vm_name = ?1) AND (?2 IS NULL OR status = ?2)
                     ORDER BY created_ms DESC, id DESC",
                )?
                .query_map(params![vm, status], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
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
            let tx = c.transaction()?;
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
    pub async fn due_for_verify(&self, now_ms: i64, only: Option<String>) -> Result<Vec<String>> {
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT b.id FROM backups b JOIN policies p ON p.id = b.policy_id
                 WHERE b.status = 'completed' AND b.files_missing = 0 AND p.verify_every_days > 0
                   AND (b.verify_status IS NULL OR b.verify_status = 'ok')
                   AND COALESCE(b.verified_ms, b.completed_ms) <= ?1 - p.verify_every_days * 86400000
                   AND NOT EXISTS (SELECT 1 FROM backup_disks d WHERE d.backup_id = b.id AND d.digest IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM backup_disks d WHERE d.backup_id = b.id AND d.location = 's3')
                   AND (?2 IS NULL OR b.id = ?2)
                 ORDER BY COALESCE(b.verified_ms, b.completed_ms), b.id",
            )?;
            let rows = st.query_map(params![now_ms, only], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
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
            let mut st =
                c.prepare("SELECT status, count(*) FROM backups GROUP BY status ORDER BY status")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}
