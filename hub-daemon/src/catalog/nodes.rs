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

    /// The node a backup's files and exports are on, and its status
    /// (`None`: no such backup). Requests acting on a backup are served
    /// by that node; see `api::forward`.
    pub async fn backup_owner(&self, backup_id: &str) -> Result<Option<(String, String)>> {
        let id = backup_id.to_owned();
        self.with(move |c| {
            let row = c.query_opt(
                "SELECT node_id, status FROM backups WHERE id = ?1",
                params![id],
            )?;
            Ok(row
                .map(|r| Ok::<_, DbError>((r.get(0)?, r.get(1)?)))
                .transpose()?)
        })
        .await
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
            for table in ["repositories", "backups", "backup_disks"] {
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
