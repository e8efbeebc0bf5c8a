//! The fleet: the hubs (nodes) sharing one catalog, each with a heartbeat
//! lease.
//!
//! A hub registers its row at start-up (how other hubs reach its API, the
//! host and port range its NBD exports are at, the free space of its
//! built-in repository), then renews `lease_until_ms` every third of its
//! lease. Any hub reaps: the running backups of a node whose lease ran out
//! are marked failed with the reason, in one UPDATE whose WHERE clause is
//! the lease condition itself, so two hubs reaping at once cannot both act
//! on a backup (the second finds it no longer running), and a node that
//! renewed meanwhile is not reaped.
//!
//! Clock: every time is the acting hub's wall clock (unix ms). The hubs of
//! a fleet are assumed NTP-synchronised to well within a lease.

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use super::db::{params, DbError, Row, Sql};
use super::Catalog;
use crate::error::Result;
use crate::time::{now_ms, rfc3339};

/// The node id rows from before the fleet carry, and the one a catalog
/// handle works for until told otherwise.
pub const LOCAL: &str = "local";

/// The node that ran the newest backup of row `b`'s VM in `b`'s
/// repository: who manages that chain in a shared repository.
const CHAIN_HOME: &str = "(SELECT h.node_id FROM backups h
      WHERE h.vm_name = b.vm_name AND h.repository_id = b.repository_id
      ORDER BY h.created_ms DESC, h.id DESC LIMIT 1)";

/// SQL condition: backups row `alias` is node `?n`'s to maintain (prune,
/// verify, offload): every backup in the node's own repositories, and in a
/// shared repository the chains whose newest backup the node ran. Run by
/// anyone else, two nodes could merge and read one chain at once.
pub(crate) fn managed_by(alias: &str, n: u32) -> String {
    format!(
        "(({alias}.repository_id IN (SELECT id FROM repositories WHERE node_id = ?{n} AND shared = 0))
          OR ({alias}.repository_id IN (SELECT id FROM repositories WHERE shared = 1)
              AND ?{n} = {}))",
        CHAIN_HOME.replace("b.", &format!("{alias}."))
    )
}

/// See [`Catalog::backup_owner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupOwner {
    /// The node that serves requests on it.
    pub node_id: String,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// Its repository is shared: its files are reachable from every node.
    pub shared: bool,
}

/// What a hub registers about itself.
#[derive(Debug, Clone)]
pub struct NodeRegistration {
    /// Base URL of its API, as other hubs reach it.
    pub api_url: String,
    /// Host its NBD exports are reached at.
    pub advertise_host: String,
    /// First NBD port of its range (0: ephemeral ports).
    pub nbd_first_port: u16,
    /// Last NBD port of its range (0: ephemeral ports).
    pub nbd_last_port: u16,
    /// Bytes free in its built-in repository.
    pub free_bytes: u64,
}

/// One node of the fleet, as `GET /api/v1/nodes` shows it.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name (`--node-id`).
    pub node_id: String,
    /// Base URL of its API.
    pub api_url: String,
    /// Host its NBD exports are reached at.
    pub advertise_host: String,
    /// First NBD port of its range (0: ephemeral ports).
    pub nbd_first_port: u16,
    /// Last NBD port of its range (0: ephemeral ports).
    pub nbd_last_port: u16,
    /// Bytes free in its built-in repository at its last heartbeat.
    pub free_bytes: u64,
    /// `alive` while its lease holds, else `expired`.
    pub lease: String,
    /// When it (last) started.
    pub started_at: String,
    /// Its last heartbeat.
    pub heartbeat_at: String,
    /// When its lease runs out (or ran out).
    pub lease_until: String,
    /// Its running backups.
    pub running_backups: u64,
}

impl NodeInfo {
    /// Whether its lease holds.
    pub fn alive(&self) -> bool {
        self.lease == "alive"
    }
}

fn ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2)
}

fn read_node(r: &Row, now: i64) -> Result<NodeInfo, DbError> {
    let started: i64 = r.get(6)?;
    let heartbeat: i64 = r.get(7)?;
    let until: i64 = r.get(8)?;
    Ok(NodeInfo {
        node_id: r.get(0)?,
        api_url: r.get(1)?,
        advertise_host: r.get(2)?,
        nbd_first_port: r.get(3)?,
        nbd_last_port: r.get(4)?,
        free_bytes: r.get(5)?,
        lease: if until > now { "alive" } else { "expired" }.to_owned(),
        started_at: rfc3339(started),
        heartbeat_at: rfc3339(heartbeat),
        lease_until: rfc3339(until),
        running_backups: r.get(9)?,
    })
}

const NODE_COLUMNS: &str =
    "n.node_id, n.api_url, n.advertise_host, n.nbd_first_port, n.nbd_last_port, n.free_bytes,
     n.started_ms, n.heartbeat_ms, n.lease_until_ms,
     (SELECT count(*) FROM backups b WHERE b.node_id = n.node_id AND b.status = 'running')";

impl Catalog {
    /// Register (or re-register, after a restart) this handle's node with
    /// a fresh lease.
    pub async fn register_node(&self, reg: NodeRegistration, lease: Duration) -> Result<()> {
        let node = self.node.to_string();
        self.with(move |c| {
            let now = now_ms();
            c.execute(
                "INSERT INTO nodes (node_id, api_url, advertise_host, nbd_first_port, nbd_last_port, free_bytes,
                                    started_ms, heartbeat_ms, lease_until_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)
                 ON CONFLICT (node_id) DO UPDATE SET api_url = excluded.api_url,
                   advertise_host = excluded.advertise_host, nbd_first_port = excluded.nbd_first_port,
                   nbd_last_port = excluded.nbd_last_port, free_bytes = excluded.free_bytes,
                   started_ms = excluded.started_ms, heartbeat_ms = excluded.heartbeat_ms,
                   lease_until_ms = excluded.lease_until_ms",
                params![
                    node,
                    reg.api_url,
                    reg.advertise_host,
                    reg.nbd_first_port,
                    reg.nbd_last_port,
                    i64::try_from(reg.free_bytes).unwrap_or(i64::MAX),
                    now,
                    now.saturating_add(ms(lease))
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Renew this node's lease (and report its free space). `false` if
    /// its row is gone (it then registers again).
    pub async fn heartbeat(&self, lease: Duration, free_bytes: u64) -> Result<bool> {
        let node = self.node.to_string();
        self.with(move |c| {
            let now = now_ms();
            let n = c.execute(
                "UPDATE nodes SET heartbeat_ms = ?2, lease_until_ms = ?3, free_bytes = ?4 WHERE node_id = ?1",
                params![
                    node,
                    now,
                    now.saturating_add(ms(lease)),
                    i64::try_from(free_bytes).unwrap_or(i64::MAX)
                ],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Fail the running backups of every other node whose lease ran out
    /// before `now_ms`, recording why; the ids failed. One UPDATE guarded
    /// by the status and the lease: a second reaper (or a late heartbeat)
    /// changes the outcome, never doubles it.
    pub async fn reap_expired(&self, now_ms: i64) -> Result<Vec<String>> {
        let node = self.node.to_string();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let rows = tx.query(
                "UPDATE backups SET status = 'failed', completed_ms = ?1,
                   error = 'node ' || node_id || ' lost its heartbeat lease while the backup was running'
                 WHERE status = 'running' AND node_id <> ?2
                   AND node_id IN (SELECT node_id FROM nodes WHERE lease_until_ms < ?1)
                 RETURNING id",
                params![now_ms, node],
            )?;
            let ids = rows
                .iter()
                .map(|r| r.get::<String>(0))
                .collect::<Result<Vec<_>, DbError>>()?;
            for id in &ids {
                // As when a backup fails anywhere: it holds no port and
                // its appliance's token is void.
                tx.execute(
                    "UPDATE backup_disks SET nbd_port = NULL WHERE backup_id = ?1",
                    params![id],
                )?;
                tx.execute(
                    "DELETE FROM callback_tokens WHERE backup_id = ?1",
                    params![id],
                )?;
            }
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    /// The fleet, by node id, with each node's lease state at `now_ms`.
    pub async fn nodes(&self, now_ms: i64) -> Result<Vec<NodeInfo>> {
        self.with(move |c| {
            let rows = c.query(
                &format!("SELECT {NODE_COLUMNS} FROM nodes n ORDER BY n.node_id"),
                params![],
            )?;
            Ok(rows
                .iter()
                .map(|r| read_node(r, now_ms))
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// One node.
    pub async fn node(&self, node_id: &str, now_ms: i64) -> Result<Option<NodeInfo>> {
        let node_id = node_id.to_owned();
        self.with(move |c| {
            let row = c.query_opt(
                &format!("SELECT {NODE_COLUMNS} FROM nodes n WHERE n.node_id = ?1"),
                params![node_id],
            )?;
            Ok(row.as_ref().map(|r| read_node(r, now_ms)).transpose()?)
        })
        .await
    }

    /// Who serves requests on a backup (see `api::forward`), its status,
    /// and whether its repository is shared (`None`: no such backup). In a
    /// repository of one node, that node. In a shared one, the node
    /// managing the backup's chain: the one that ran the VM's newest
    /// backup there (a running backup is its VM's newest).
    pub async fn backup_owner(&self, backup_id: &str) -> Result<Option<BackupOwner>> {
        let id = backup_id.to_owned();
        self.with(move |c| {
            let row = c.query_opt(
                &format!(
                    "SELECT b.node_id, b.status, r.shared, {CHAIN_HOME}
                     FROM backups b JOIN repositories r ON r.id = b.repository_id
                     WHERE b.id = ?1"
                ),
                params![id],
            )?;
            Ok(row
                .map(|r| {
                    let shared: bool = r.get(2)?;
                    let node: String = r.get(0)?;
                    let home: Option<String> = r.get(3)?;
                    Ok::<_, DbError>(BackupOwner {
                        node_id: if shared { home.unwrap_or(node) } else { node },
                        status: r.get(1)?,
                        shared,
                    })
                })
                .transpose()?)
        })
        .await
    }

    /// The VMs of shared repository `repo` whose leftover files this node
    /// may sweep at start-up: the chains it manages, none of whose backups
    /// runs on another node.
    pub async fn sweepable_vms(&self, repo: &str) -> Result<Vec<String>> {
        let (repo, node) = (repo.to_owned(), self.node.to_string());
        self.with(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT DISTINCT b.vm_name FROM backups b
                     WHERE b.repository_id = ?1 AND {}
                       AND NOT EXISTS (SELECT 1 FROM backups o WHERE o.vm_name = b.vm_name
                                       AND o.status = 'running' AND o.node_id <> ?2)
                     ORDER BY b.vm_name",
                    managed_by("b", 2)
                ),
                params![repo, node],
            )?;
            Ok(rows
                .iter()
                .map(|r| r.get(0))
                .collect::<Result<_, DbError>>()?)
        })
        .await
    }

    /// The node a new backup of `vm` in shared repository `repo` runs on:
    /// the node managing its chain while that node's lease holds (one
    /// node at a time touches a chain), else the alive node with the
    /// fewest running backups (ties: the most free space, then the id).
    /// `None` when no node is alive.
    pub async fn place_in_shared(
        &self,
        vm: &str,
        repo: &str,
        now_ms: i64,
    ) -> Result<Option<String>> {
        let (vm, repo) = (vm.to_owned(), repo.to_owned());
        let home: Option<String> = self
            .with(move |c| {
                let row = c.query_opt(
                    "SELECT h.node_id FROM backups h WHERE h.vm_name = ?1 AND h.repository_id = ?2
                     ORDER BY h.created_ms DESC, h.id DESC LIMIT 1",
                    params![vm, repo],
                )?;
                Ok(row.map(|r| r.get(0)).transpose()?)
            })
            .await?;
        let nodes = self.nodes(now_ms).await?;
        if let Some(h) = home {
            if nodes.iter().any(|n| n.node_id == h && n.alive()) {
                return Ok(Some(h));
            }
        }
        Ok(nodes
            .into_iter()
            .filter(NodeInfo::alive)
            .min_by(|a, b| {
                (
                    a.running_backups,
                    std::cmp::Reverse(a.free_bytes),
                    &a.node_id,
                )
                    .cmp(&(
                        b.running_backups,
                        std::cmp::Reverse(b.free_bytes),
                        &b.node_id,
                    ))
            })
            .map(|n| n.node_id))
    }

    /// Make the rows of another node id this node's: on SQLite every row
    /// (the file is one hub's: a renamed host keeps its data), on
    /// PostgreSQL those still [`LOCAL`] (a catalog from before the fleet
    /// served one hub; the first hub started on the new version adopts
    /// them, so that hub is upgraded first). The number of rows claimed.
    pub async fn claim_rows(&self, everything: bool) -> Result<u64> {
        let node = self.node.to_string();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let mut n = 0;
            for table in ["repositories", "backups", "backup_disks", "prune_journal"] {
                // The table name is one of ours, not input.
                n += tx.execute(
                    &format!(
                        "UPDATE {table} SET node_id = ?1
                         WHERE node_id <> ?1 AND (CAST(?2 AS BIGINT) = 1 OR node_id = '{LOCAL}')"
                    ),
                    params![node, everything],
                )?;
            }
            tx.commit()?;
            Ok(n)
        })
        .await
    }
}
