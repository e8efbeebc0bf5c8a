//! Catalog schema and migrations, for SQLite and PostgreSQL.
//!
//! One schema text serves both (see the portability rules in
//! [`super::db`]): every integer column is `BIGINT` (on SQLite the same
//! 64-bit integer as `INTEGER`, so files created before keep working).
//! SQLite counts applied migrations in `PRAGMA user_version`, PostgreSQL in
//! the one row of `schema_version`; a fresh database of either kind ends
//! with the same tables, indexes and constraints, except where a
//! [`Migration::Split`] says otherwise.

use super::db::{params, Backend, Conn, DbError, Sql, Tx};

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub enum Migration {
    /// The same SQL on both backends (the usual case).
    Both(&'static str),
    /// SQL that differs per backend.
    Split {
        /// On SQLite.
        sqlite: &'static str,
        /// On PostgreSQL.
        postgres: &'static str,
    },
}

impl Migration {
    fn sql(self, backend: Backend) -> &'static str {
        match (self, backend) {
            (Migration::Both(s), _) => s,
            (Migration::Split { sqlite, .. }, Backend::Sqlite) => sqlite,
            (Migration::Split { postgres, .. }, Backend::Postgres) => postgres,
        }
    }
}

/// Schema changes after the first version, in order: append, never edit
/// an applied one's meaning. Each runs in one transaction with the
/// version bump.
pub const MIGRATIONS: &[Migration] = &[
    // 1: integrity — image format, why a disk went full, failed writes,
    // digests and verification.
    Migration::Both("ALTER TABLE backup_disks ADD COLUMN format TEXT NOT NULL DEFAULT 'qcow2';
     ALTER TABLE backup_disks ADD COLUMN mode_reason TEXT;
     ALTER TABLE backup_disks ADD COLUMN write_errors BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE backup_disks ADD COLUMN last_error TEXT;
     ALTER TABLE backup_disks ADD COLUMN digest TEXT;
     ALTER TABLE backup_disks ADD COLUMN verify_status TEXT;
     ALTER TABLE backup_disks ADD COLUMN verify_detail TEXT;
     ALTER TABLE backups ADD COLUMN verify_status TEXT;
     ALTER TABLE backups ADD COLUMN verified_ms BIGINT;"),
    // 2: API bearer tokens. Only a salted hash of each token is kept.
    Migration::Both("CREATE TABLE api_tokens (
         name          TEXT PRIMARY KEY,
         role          TEXT NOT NULL,
         salt          TEXT NOT NULL,
         token_hash    TEXT NOT NULL,
         created_ms    BIGINT NOT NULL,
         last_used_ms  BIGINT
     );"),
    // 3: the appliance hand-off — a VM's own appliance, and the callback
    // token of each running backup started through one (a salted hash
    // only; the row goes when the backup ends).
    Migration::Both("ALTER TABLE vms ADD COLUMN sna_url TEXT;
     CREATE TABLE callback_tokens (
         backup_id   TEXT PRIMARY KEY REFERENCES backups(id) ON DELETE CASCADE,
         salt        TEXT NOT NULL,
         token_hash  TEXT NOT NULL
     );"),
    // 4: retention policies (0 = option off), and the prune journal: file
    // work a committed prune still owes (finished at start-up if the
    // daemon died before doing it). `action` is 'rename' (`<path>.merging`
    // over `<path>`) or 'remove'.
    Migration::Both("CREATE TABLE policies (
         id                  TEXT PRIMARY KEY,
         keep_last           BIGINT NOT NULL DEFAULT 0,
         keep_hourly         BIGINT NOT NULL DEFAULT 0,
         keep_daily          BIGINT NOT NULL DEFAULT 0,
         keep_weekly         BIGINT NOT NULL DEFAULT 0,
         keep_monthly        BIGINT NOT NULL DEFAULT 0,
         keep_yearly         BIGINT NOT NULL DEFAULT 0,
         max_chain_length    BIGINT NOT NULL DEFAULT 0,
         min_retention_days  BIGINT NOT NULL DEFAULT 0,
         verify_every_days   BIGINT NOT NULL DEFAULT 0,
         updated_ms          BIGINT NOT NULL
     );
     CREATE TABLE prune_journal (
         repository_id  TEXT NOT NULL,
         path           TEXT NOT NULL,
         action         TEXT NOT NULL,
         PRIMARY KEY (repository_id, path)
     );"),
    // 5: synthetic fulls — an image the hub flattened from its chain
    // (max_chain_length, or a prune that removed every ancestor). 0/1, not
    // BOOLEAN: the same type on SQLite and PostgreSQL, like files_missing.
    Migration::Both("ALTER TABLE backup_disks ADD COLUMN synthetic BIGINT NOT NULL DEFAULT 0;"),
    // 6: one export per NBD port. A running backup's disks hold their
    // ports (cleared when it ends), so a unique index over the non-NULL
    // ports keeps two backups, on two hubs sharing the catalog too, from
    // recording the same one. With several nodes, `node_id` joins the
    // index (drop and recreate it as `(node_id, nbd_port)`). Ports an
    // older version left on ended backups are cleared first.
    Migration::Both(
        "UPDATE backup_disks SET nbd_port = NULL
           WHERE nbd_port IS NOT NULL AND backup_id IN (SELECT id FROM backups WHERE status <> 'running');
         CREATE UNIQUE INDEX one_backup_per_port ON backup_disks(nbd_port) WHERE nbd_port IS NOT NULL;",
    ),
    // 7: no parent deleted under a child. On PostgreSQL (several hubs) a
    // foreign key decides, deferred to commit so one transaction may
    // remove a parent and its child in either order (prune); its lock on
    // the parent row orders a delete against another hub's new child. A
    // lone SQLite hub has one connection, so the check inside each delete
    // transaction (`Catalog::refuse_orphans`) is enough; adding a foreign
    // key there would mean rebuilding the table.
    Migration::Split {
        sqlite: "",
        postgres: "ALTER TABLE backup_disks ADD CONSTRAINT backup_disks_parent_exists
                     FOREIGN KEY (parent_backup_id) REFERENCES backups(id) DEFERRABLE INITIALLY DEFERRED;",
    },
    // 8: the object-storage tier. A repository's S3 bucket (credentials
    // may come from the config or environment instead: both NULL), where
    // each layer lives ('local', 'local+s3', 's3'), the object each
    // offloaded layer became (SHA-256 of the image file's bytes), and the
    // policies' offload and eviction ages (0 = off).
    Migration::Both(
        "CREATE TABLE repository_s3 (
         repository_id      TEXT PRIMARY KEY REFERENCES repositories(id) ON DELETE CASCADE,
         endpoint           TEXT NOT NULL,
         bucket             TEXT NOT NULL,
         region             TEXT NOT NULL,
         path_style         BIGINT NOT NULL DEFAULT 0,
         access_key_id      TEXT,
         secret_access_key  TEXT
     );
     CREATE TABLE layer_objects (
         backup_id        TEXT NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
         disk_id          BIGINT NOT NULL,
         object_key       TEXT NOT NULL,
         size_bytes       BIGINT NOT NULL,
         sha256           TEXT NOT NULL,
         version_id       TEXT,
         retain_until_ms  BIGINT,
         uploaded_ms      BIGINT NOT NULL,
         PRIMARY KEY (backup_id, disk_id)
     );
     ALTER TABLE backup_disks ADD COLUMN location TEXT NOT NULL DEFAULT 'local';
     ALTER TABLE policies ADD COLUMN offload_after_days BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE policies ADD COLUMN evict_local_after_days BIGINT NOT NULL DEFAULT 0;",
    ),
    // 9: several hubs, one fleet. Each hub is a node with a heartbeat
    // lease; repositories, backups and the ports a running backup's disks
    // hold belong to a node (the files and listeners live there). Rows
    // from before get 'local': SQL cannot know the node id, so the hub
    // claims them at start-up (`Catalog::claim_rows`). The port index
    // becomes per node: two hosts may use the same port numbers.
    Migration::Both(
        "CREATE TABLE nodes (
             node_id         TEXT PRIMARY KEY,
             api_url         TEXT NOT NULL,
             advertise_host  TEXT NOT NULL,
             nbd_first_port  BIGINT NOT NULL,
             nbd_last_port   BIGINT NOT NULL,
             free_bytes      BIGINT NOT NULL DEFAULT 0,
             started_ms      BIGINT NOT NULL,
             heartbeat_ms    BIGINT NOT NULL,
             lease_until_ms  BIGINT NOT NULL
         );
         ALTER TABLE repositories ADD COLUMN node_id TEXT NOT NULL DEFAULT 'local';
         ALTER TABLE backups ADD COLUMN node_id TEXT NOT NULL DEFAULT 'local';
         ALTER TABLE backup_disks ADD COLUMN node_id TEXT NOT NULL DEFAULT 'local';
         CREATE INDEX backups_by_node ON backups(node_id, status);
         DROP INDEX one_backup_per_port;
         CREATE UNIQUE INDEX one_backup_per_port ON backup_disks(node_id, nbd_port) WHERE nbd_port IS NOT NULL;",
    ),
    // 10: shared repositories. A repository on storage every node mounts
    // at the same path (0/1); each VM's chain in it is managed by one node
    // at a time (see `Catalog::backup_owner`). A prune's owed file work is
    // the pruning node's to finish (it may not be the repository's).
    Migration::Both(
        "ALTER TABLE repositories ADD COLUMN shared BIGINT NOT NULL DEFAULT 0;
         ALTER TABLE prune_journal ADD COLUMN node_id TEXT NOT NULL DEFAULT 'local';
         CREATE INDEX backups_by_chain ON backups(vm_name, repository_id, created_ms);",
    ),
    // 11: objects the S3 tier still owes a deletion: queued in the same
    // transaction that forgets their layer (a merge, a prune, a delete),
    // so none is orphaned, and removed by the tier's sweep once their
    // Object Lock retention allows. `version_id` is '' where the bucket
    // gave none (a primary key column cannot be NULL on PostgreSQL).
    Migration::Both(
        "CREATE TABLE object_deletions (
             repository_id    TEXT NOT NULL,
             object_key       TEXT NOT NULL,
             version_id       TEXT NOT NULL,
             retain_until_ms  BIGINT,
             queued_ms        BIGINT NOT NULL,
             attempts         BIGINT NOT NULL DEFAULT 0,
             last_error       TEXT,
             PRIMARY KEY (repository_id, object_key, version_id)
         );",
    ),
];

/// The tables of version 0 (`IF NOT EXISTS`: run on every start).
const INITIAL: &str = "
    CREATE TABLE IF NOT EXISTS repositories (
        id          TEXT PRIMARY KEY,
        path        TEXT NOT NULL,
        created_ms  BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS vms (
        name           TEXT PRIMARY KEY,
        vm_context_id  TEXT NOT NULL,
        updated_ms     BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS vm_disks (
        vm_name      TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        disk_id      BIGINT NOT NULL,
        size_bytes   BIGINT NOT NULL,
        unit_number  BIGINT NOT NULL,
        disk_key     BIGINT NOT NULL,
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
        created_ms     BIGINT NOT NULL,
        completed_ms   BIGINT,
        files_missing  BIGINT NOT NULL DEFAULT 0
    );
    -- The database itself allows only one running backup per VM.
    CREATE UNIQUE INDEX IF NOT EXISTS one_running_backup_per_vm ON backups(vm_name) WHERE status = 'running';
    CREATE INDEX IF NOT EXISTS backups_by_vm ON backups(vm_name, status, completed_ms);
    CREATE TABLE IF NOT EXISTS backup_disks (
        backup_id         TEXT NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
        disk_id           BIGINT NOT NULL,
        disk_key          BIGINT NOT NULL,
        size_bytes        BIGINT NOT NULL,
        backup_mode       TEXT NOT NULL,
        parent_backup_id  TEXT,
        file              TEXT NOT NULL,
        export_name       TEXT NOT NULL,
        nbd_port          BIGINT,
        bytes_written     BIGINT NOT NULL DEFAULT 0,
        image_bytes       BIGINT,
        change_id         TEXT,
        PRIMARY KEY (backup_id, disk_id)
    );
    CREATE INDEX IF NOT EXISTS backup_disks_by_parent ON backup_disks(parent_backup_id);
";

/// Bring the schema up to date (creating it in a fresh database).
pub fn init(conn: &mut Conn) -> Result<(), DbError> {
    match conn.backend() {
        Backend::Sqlite => init_sqlite(conn),
        Backend::Postgres => init_postgres(conn),
    }
}

fn init_sqlite(conn: &mut Conn) -> Result<(), DbError> {
    conn.batch(INITIAL)?;
    let applied: i64 = conn.query_one("PRAGMA user_version", params![])?.get(0)?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        let mut tx = conn.transaction()?;
        tx.batch(m.sql(Backend::Sqlite))?;
        // A pragma takes no parameters; the number is ours.
        tx.batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

fn init_postgres(conn: &mut Conn) -> Result<(), DbError> {
    // One transaction (PostgreSQL's DDL is transactional) under an
    // advisory lock: hubs starting together on a fresh database take turns,
    // and the later ones find the schema made.
    let mut tx = conn.transaction()?;
    tx.batch("SELECT pg_advisory_xact_lock(7262041901)")?;
    tx.batch(INITIAL)?;
    tx.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let applied = match tx.query_opt("SELECT version FROM schema_version", params![])? {
        Some(r) => r.get::<i64>(0)?,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", params![])?;
            0
        }
    };
    migrate_postgres(&mut tx, applied)?;
    tx.commit()
}

fn migrate_postgres(tx: &mut Tx<'_>, applied: i64) -> Result<(), DbError> {
    if applied > MIGRATIONS.len() as i64 {
        tracing::warn!(
            applied,
            known = MIGRATIONS.len(),
            "the catalog's schema is newer than this hub's"
        );
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        tx.batch(m.sql(Backend::Postgres))?;
        tx.execute(
            "UPDATE schema_version SET version = ?1",
            params![(i + 1) as i64],
        )?;
    }
    Ok(())
}
