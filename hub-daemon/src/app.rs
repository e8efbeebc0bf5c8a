//! Assembling and running the daemon: catalog, default repository,
//! reconciliation, NBD hub, HTTP API; and the orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::tls_listener::TlsListener;
use crate::api::{router, AppState};
use crate::backup::{Backups, ReconcileReport};
use crate::catalog::{Backend, Catalog};
use crate::config::Config;
use crate::model::Repository;
use crate::nbd::NbdHub;

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// `http` or `https`.
    pub api_scheme: &'static str,
    /// The shared NBD port, if any.
    pub nbd_shared_addr: Option<SocketAddr>,
    /// What startup reconciliation did.
    pub reconciled: ReconcileReport,
    backups: Arc<Backups>,
    stop: CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    lifecycle: tokio::task::JoinHandle<()>,
    verify_schedule: Option<tokio::task::JoinHandle<()>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// The id of a node's built-in repository: `default` for a lone hub on
/// SQLite (as before the fleet), `default-<node id>` on PostgreSQL, where
/// every node has its own.
pub fn builtin_repository_id(backend: Backend, node_id: &str) -> String {
    match backend {
        Backend::Sqlite => "default".to_owned(),
        Backend::Postgres => format!("default-{node_id}"),
    }
}

impl Daemon {
    /// Start everything; the API serves once this returns.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let url = config.catalog_url();
        // `url` shows no password.
        let catalog = Catalog::connect(&url)
            .await
            .with_context(|| format!("opening catalog {url}"))?
            .for_node(&config.node_id);
        tracing::info!(catalog = %url, node = %config.node_id, "catalog open");
        let backend = catalog.backend().await?;
        let claimed = catalog.claim_rows(backend == Backend::Sqlite).await?;
        if claimed > 0 {
            tracing::info!(claimed, node = %config.node_id, "catalog rows adopted by this node");
        }
        if !config.open_without_tokens() && !catalog.has_tokens().await? {
            anyhow::bail!(
                "refusing to serve the API on {} without authentication: no API token exists. \
                 Create one (hub-daemon token create --data-dir {} --name NAME --role admin), \
                 listen on a loopback address, or pass --insecure-no-auth",
                config.listen,
                config.data_dir.display()
            );
        }
        for root in config.repository_roots() {
            let ok = root.canonicalize().is_ok_and(|r| r.is_dir());
            if !ok {
                anyhow::bail!("repository root {} is not a directory", root.display());
            }
        }
        let repo_dir = config.default_repository();
        std::fs::create_dir_all(&repo_dir)
            .with_context(|| format!("creating {}", repo_dir.display()))?;
        let repo_dir = repo_dir.canonicalize()?;
        let default_repo = builtin_repository_id(backend, &config.node_id);
        crate::names::validate("built-in repository id", &default_repo)
            .map_err(anyhow::Error::msg)?;
        catalog
            .ensure_repository(Repository {
                shared: false,
                id: default_repo,
                path: repo_dir.display().to_string(),
                s3: None,
                node_id: config.node_id.clone(),
            })
            .await?;
        let nbd = NbdHub::start(&config).await?;
        let nbd_shared_addr = nbd.shared_addr();
        let backups = Backups::new(catalog, nbd, config.clone());
        let reconciled = backups.reconcile().await?;
        if reconciled != ReconcileReport::default() {
            tracing::warn!(
                ?reconciled,
                "reconciled catalog and repository after an unclean stop"
            );
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding API address {}", config.listen))?;
        let api_addr = listener.local_addr()?;
        backups.set_api_addr(api_addr);
        // Other hubs forward to where appliances call back.
        let api_url = backups.public_url()?.to_owned();
        let fleet = crate::lifecycle::fleet::Heartbeat::new(
            backups.catalog().clone(),
            &config,
            api_url,
            repo_dir.clone(),
        );
        fleet.register().await?;
        let stop = CancellationToken::new();
        let mut state = AppState::new(Arc::clone(&backups));
        if config.api_tls {
            // Other hubs of the fleet serve HTTPS with certificates of the
            // same CA (see api::forward).
            let ca = config.tls_dir().join("ca-cert.pem");
            let tls = crate::http_client::connector(&ca)
                .map_err(|e| anyhow::anyhow!("--api-tls: the fleet CA {}: {e}", ca.display()))?;
            state = state.with_fleet_tls(tls);
        }
        let app = router(state);
        let stop2 = stop.clone();
        let shutdown = async move { stop2.cancelled().await };
        let http = if config.api_tls {
            let dir = config.tls_dir();
            let tls = nbd_server::ServerTls::from_dir(&dir, true, false).with_context(|| {
                format!(
                    "--api-tls: loading {} (make it with `hub-daemon tls init {}`)",
                    dir.display(),
                    dir.display()
                )
            })?;
            let mut rustls_config = (*tls.rustls_config()).clone();
            rustls_config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let listener = TlsListener::new(
                listener,
                Arc::new(rustls_config),
                config.nbd_limits.handshake_timeout,
            )?;
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            })
        } else {
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            })
        };
        let lifecycle = tokio::spawn(crate::lifecycle::schedule::run(
            Arc::clone(&backups),
            config.prune_interval,
            stop.clone(),
        ));
        let verify_schedule =
            crate::lifecycle::verify_schedule::spawn(Arc::clone(&backups), stop.clone());
        let heartbeat = tokio::spawn(fleet.run(stop.clone()));
        tracing::info!(%api_addr, nbd_shared = ?nbd_shared_addr, data_dir = %config.data_dir.display(), "hub daemon serving");
        Ok(Daemon {
            api_addr,
            api_scheme: config.api_scheme(),
            nbd_shared_addr,
            reconciled,
            backups,
            stop,
            http,
            lifecycle,
            verify_schedule,
            heartbeat,
        })
    }

    /// The backup service (for embedding).
    pub fn backups(&self) -> &Arc<Backups> {
        &self.backups
    }

    /// Stop: no new API requests, running backups aborted (their partial
    /// images removed), restore exports closed, every image flushed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        // Stopped before the backups: a pass must not start on a daemon
        // half shut down (one in progress is abandoned, which is safe).
        if let Err(e) = self.lifecycle.await {
            tracing::error!(error = %e, "lifecycle task");
        }
        self.backups.shutdown().await;
        if let Some(v) = self.verify_schedule {
            v.await.context("verification scheduler")?;
        }
        self.heartbeat.await.context("heartbeat task")?;
        self.http.await.context("API task")?.context("API server")?;
        Ok(())
    }
}
