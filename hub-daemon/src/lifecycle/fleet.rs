//! This node's place in the fleet: its registration, the heartbeat that
//! renews its lease every third of it, and the reaper every hub runs,
//! failing the running backups of nodes whose lease ran out (see
//! [`crate::catalog`]'s nodes: the database decides, so two reapers never
//! both act).
//!
//! A lone SQLite hub runs it too: it keeps its own row fresh and finds
//! nobody to reap.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, NodeRegistration};
use crate::config::{Config, PortRange};
use crate::error::Result;
use crate::time::now_ms;

/// Registration and heartbeat of this node.
#[derive(Debug)]
pub struct Heartbeat {
    catalog: Catalog,
    lease: Duration,
    api_url: String,
    advertise_host: String,
    ports: (u16, u16),
    repo_dir: PathBuf,
}

impl Heartbeat {
    /// For this node (`catalog` works for it), reached at `api_url`, its
    /// built-in repository at `repo_dir`.
    pub fn new(catalog: Catalog, config: &Config, api_url: String, repo_dir: PathBuf) -> Self {
        let ports = match config.nbd_ports {
            PortRange::Range { first, last } => (first, last),
            PortRange::Ephemeral { .. } => (0, 0),
        };
        Heartbeat {
            catalog,
            lease: config.node_lease,
            api_url,
            advertise_host: config.advertise_host.clone(),
            ports,
            repo_dir,
        }
    }

    async fn free_bytes(&self) -> u64 {
        let dir = self.repo_dir.clone();
        tokio::task::spawn_blocking(move || crate::space::fs_space(&dir))
            .await
            .ok()
            .and_then(|r| r.ok())
            .map_or(0, |s| s.free_bytes)
    }

    /// Register this node with a fresh lease.
    pub async fn register(&self) -> Result<()> {
        let reg = NodeRegistration {
            api_url: self.api_url.clone(),
            advertise_host: self.advertise_host.clone(),
            nbd_first_port: self.ports.0,
            nbd_last_port: self.ports.1,
            free_bytes: self.free_bytes().await,
        };
        self.catalog.register_node(reg, self.lease).await
    }

    /// One beat: renew the lease (registering again if the row went),
    /// then reap the nodes whose lease ran out. The backups reaped.
    pub async fn beat(&self) -> Result<Vec<String>> {
        if !self
            .catalog
            .heartbeat(self.lease, self.free_bytes().await)
            .await?
        {
            self.register().await?;
        }
        let reaped = self.catalog.reap_expired(now_ms()).await?;
        for id in &reaped {
            tracing::warn!(backup = %id, "backup of a node that lost its lease marked failed");
        }
        Ok(reaped)
    }

    /// Beat every third of the lease until `stop`. A failed beat (the
    /// database away) is logged and retried at the next tick: the lease
    /// has two more ticks of slack.
    pub async fn run(self, stop: CancellationToken) {
        let period = (self.lease / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.beat().await {
                tracing::error!(error = %e, "node heartbeat failed");
            }
        }
    }
}
