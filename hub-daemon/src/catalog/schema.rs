//! Catalog schema and connection settings.

use rusqlite::Connection;

/// Schema changes after the first version, in order; `user_version` counts
/// how many are applied. Plain `ALTER TABLE ... ADD COLUMN`, valid on
/// SQLite and PostgreSQL alike.
const MIGRATIONS: &[&str] = &[
    // 1: integrity — image format, why a disk went full, failed writes,
    // digests and verification.
    "ALTER TABLE backup_disks ADD COLUMN format TEXT NOT NULL DEFAULT 'qcow2';
     ALTER TABLE backup_disks ADD COLUMN mode_reason TEXT;
     ALTER TABLE backup_disks ADD COLUMN write_errors INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE backup_disks ADD COLUMN last_error TEXT;
     ALTER TABLE backup_disks ADD COLUMN digest TEXT;
     ALTER TABLE backup_disks ADD COLUMN verify_status TEXT;
     ALTER TABLE backup_disks ADD COLUMN verify_detail TEXT;
     ALTER TABLE backups ADD COLUMN verify_status TEXT;
     ALTER TABLE backups ADD COLUMN verified_ms INTEGER;",
    // 2: API bearer tokens. Only a salted hash of each token is kept.
    "CREATE TABLE api_tokens (
         name          TEXT PRIMARY KEY,
         role          TEXT NOT NULL,
         salt          TEXT NOT NULL,
         token_hash    TEXT NOT NULL,
         created_ms    BIGINT NOT NULL,
         last_used_ms  BIGINT
     );",
    // 3: the appliance hand-off — a VM's own appliance, and the callback
    // token of each running backup started through one (a salted hash
    // only; the row goes when the backup ends).
    "ALTER TABLE vms ADD COLUMN sna_url TEXT;
     CREATE TABLE callback_tokens (
         backup_id   TEXT PRIMARY KEY REFERENCES backups(id) ON DELETE CASCADE,
         salt        TEXT NOT NULL,
         token_hash  TEXT NOT NULL
     );",
    // 4: retention policies (0 = option off), and the prune journal: file
    // work a committed prune still owes (finished at start-up if the
    // daemon died before doing it). `action` is 'rename' (`<path>.merging`
    // over `<path>`) or 'remove'.
    "CREATE TABLE policies (
         id                  TEXT PRIMARY KEY,
         keep_last           INTEGER NOT NULL DEFAULT 0,
         keep_hourly         INTEGER NOT NULL DEFAULT 0,
         keep_daily          INTEGER NOT NULL DEFAULT 0,
         keep_weekly         INTEGER NOT NULL DEFAULT 0,
         keep_monthly        INTEGER NOT NULL DEFAULT 0,
         keep_yearly         INTEGER NOT NULL DEFAULT 0,
         max_chain_length    INTEGER NOT NULL DEFAULT 0,
         min_retention_days  INTEGER NOT NULL DEFAULT 0,
         verify_every_days   INTEGER NOT NULL DEFAULT 0,
         updated_ms          BIGINT NOT NULL
     );
     CREATE TABLE prune_journal (
         repository_id  TEXT NOT NULL,
         path           TEXT NOT NULL,
         action         TEXT NOT NULL,
         PRIMARY KEY (repository_id, path)
     );",
    // 5: synthetic fulls — an image the hub flattened from its chain
    // (max_chain_length, or a prune that removed every ancestor). 0/1, not
    // BOOLEAN: the same type on SQLite and PostgreSQL, like files_missing.
    "ALTER TABLE backup_disks ADD COLUMN synthetic INTEGER NOT NULL DEFAULT 0;",
    // 6: the object-storage tier. A repository's S3 bucket (credentials
    // may come from the config or environment instead: both NULL), where
    // each layer lives ('local', 'local+s3', 's3'), the object each
    // offloaded layer became (SHA-256 of the image file's bytes), and the
    // policies' offload and eviction ages (0 = off).
    "CREATE TABLE repository_s3 (
         repository_id      TEXT PRIMARY KEY REFERENCES repositories(id) ON DELETE CASCADE,
         endpoint           TEXT NOT NULL,
         bucket             TEXT NOT NULL,
         region             TEXT NOT NULL,
         path_style         INTEGER NOT NULL DEFAULT 0,
         access_key_id      TEXT,
         secret_access_key  TEXT
     );
     CREATE TABLE layer_objects (
         backup_id        TEXT NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
         disk_id          INTEGER NOT NULL,
         object_key       TEXT NOT NULL,
         size_bytes       BIGINT NOT NULL,
         sha256           TEXT NOT NULL,
         version_id       TEXT,
         retain_until_ms  BIGINT,
         uploaded_ms      BIGINT NOT NULL,
         PRIMARY KEY (backup_id, disk_id)
     );
     ALTER TABLE backup_disks ADD COLUMN location TEXT NOT NULL DEFAULT 'local';
     ALTER TABLE policies ADD COLUMN offload_after_days INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE policies ADD COLUMN evict_local_after_days INTEGER NOT NULL DEFAULT 0;",
];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(m)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Create tables if missing and set the connection up.
pub fn init(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers don't block the writer; FULL: a commit is on disk when
    // COMMIT returns (a completed backup must survive power loss).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(
        "
        CREATE TABLE IF NOT EXISTS repositories (
            id          TEXT PRIMARY KEY,
            path        TEXT NOT NULL,
            created_ms  INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS vms (
            name           TEXT PRIMARY KEY,
            vm_context_id  TEXT NOT NULL,
            updated_ms     INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS vm_disks (
            vm_name      TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
            disk_id      INTEGER NOT NULL,
            size_bytes   INTEGER NOT NULL,
            unit_number  INTEGER NOT NULL,
            disk_key     INTEGER NOT NULL,
            label        TEXT NOT NULL,
            PRIMARY KEY (vm_name, disk_id)
        );
        CREATE TABLE IF NOT EXISTS backups (
            id             TEXT PRIMARY KEY,
            vm_name        TEXT NOT NULL,
            repository_id  TEXT NOT NULL REFERENCES repositories(id),
            backup_type    TEXT NOT NULL,
            policy_id      TEXT,
            tags           TEXT NOT NULL,
            status         TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
            error          TEXT,
            created_ms     INTEGER NOT NULL,
            completed_ms   INTEGER,
            files_missing  INTEGER NOT NULL DEFAULT 0
        );
        -- The database itself allows only one running backup per VM.
        CREATE UNIQUE INDEX IF NOT EXISTS one_running_backup_per_vm ON backups(vm_name) WHERE status = 'running';
        CREATE INDEX IF NOT EXISTS backups_by_vm ON backups(vm_name, status, completed_ms);
        CREATE TABLE IF NOT EXISTS backup_disks (
            backup_id         TEXT NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
            disk_id           INTEGER NOT NULL,
            disk_key          INTEGER NOT NULL,
            size_bytes        INTEGER NOT NULL,
            backup_mode       TEXT NOT NULL,
            parent_backup_id  TEXT,
            file              TEXT NOT NULL,
            export_name       TEXT NOT NULL,
            nbd_port          INTEGER,
            bytes_written     INTEGER NOT NULL DEFAULT 0,
            image_bytes       INTEGER,
            change_id         TEXT,
            PRIMARY KEY (backup_id, disk_id)
        );
        CREATE INDEX IF NOT EXISTS backup_disks_by_parent ON backup_disks(parent_backup_id);
        ",
    )?;
    migrate(conn)
}
