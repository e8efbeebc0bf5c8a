//! The NBD side of the daemon: one `nbd_server::Server` for every export,
//! each export on its own port from the pool and, when configured, also by
//! name on the shared port (so one SSH tunnel can carry a whole VM).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use nbd_server::{Export, ExportStatsSnapshot, Server};

use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::ports::{PortLease, PortPool};

/// Exports, ports and the shared listener.
#[derive(Debug)]
pub struct NbdHub {
    server: Server,
    pool: PortPool,
    advertise_host: String,
    /// `nbd` or `nbds`.
    scheme: &'static str,
    shared: Option<SocketAddr>,
    /// Counters of exports already removed, so totals never go backwards.
    finished: Mutex<Totals>,
}

/// Lifetime totals over every export this process served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connections ever accepted into transmission.
    pub connections: u64,
    /// Requests handled.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Payload bytes sent.
    pub bytes_read: u64,
    /// Payload bytes received.
    pub bytes_written: u64,
}

impl Totals {
    fn add(&mut self, s: &ExportStatsSnapshot) {
        self.connections += s.connections_total;
        self.requests += s.requests;
        self.errors += s.errors;
        self.bytes_read += s.bytes_read;
        self.bytes_written += s.bytes_written;
    }
}

/// An export on its own port; dropping it does not stop the export (call
/// [`NbdHub::unpublish`]), but holds the port lease until then.
#[derive(Debug)]
pub struct Published {
    /// The export.
    pub export: Arc<Export>,
    /// Its port.
    pub port: u16,
    /// The port lease, released after the export's listener is gone.
    pub lease: PortLease,
}

impl NbdHub {
    /// Start the NBD server and the shared listener (if configured).
    pub async fn start(config: &Config) -> Result<NbdHub> {
        // Export names carry 128 random bits and are the capability to
        // reach a disk: only exact names reach an export, and listing is
        // off unless the operator turns it on.
        let mut server_config = config.nbd_limits.server_config();
        server_config.list_exports = config.nbd_list_exports;
        server_config.exact_export_names = true;
        server_config.tls = config
            .nbd_tls
            .load(Some(&config.default_tls_dir()))
            .map_err(|e| DaemonError::Internal(format!("NBD TLS: {e}")))?;
        let server = Server::new(server_config);
        let shared = if config.nbd_shared_port != 0 {
            let addr = SocketAddr::new(config.nbd_bind, config.nbd_shared_port);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| DaemonError::io(format!("binding shared NBD port {addr}"), e))?;
            Some(server.serve(l)?.local_addr())
        } else {
            None
        };
        Ok(NbdHub {
            server,
            pool: PortPool::new(config.nbd_ports, config.nbd_bind),
            advertise_host: config.advertise_host.clone(),
            scheme: config.nbd_tls.scheme(),
            shared,
            finished: Mutex::new(Totals::default()),
        })
    }

    /// The port pool.
    pub fn pool(&self) -> &PortPool {
        &self.pool
    }

    /// The shared listener's address.
    pub fn shared_addr(&self) -> Option<SocketAddr> {
        self.shared
    }

    /// `nbd://host:port/name` (`nbds://` with TLS) as clients should use it.
    pub fn uri(&self, port: u16, name: &str) -> String {
        format!("{}://{}:{port}/{name}", self.scheme, self.advertise_host)
    }

    /// Register `export` and serve it on the leased port's listener.
    pub fn publish(
        &self,
        export: Export,
        lease: PortLease,
        listener: tokio::net::TcpListener,
    ) -> Result<Published> {
        let export = self.server.add_export(export)?;
        if let Err(e) = self.server.serve_export(listener, &export) {
            // Undo the registration; the export never served anything.
            let server = self.server.clone();
            let name = export.name().to_owned();
            tokio::spawn(async move { server.remove_export(&name).await });
            return Err(e.into());
        }
        let port = lease.port();
        Ok(Published {
            export,
            port,
            lease,
        })
    }

    /// Stop an export: its listener closes, clients are drained and
    /// disconnected, the backend is closed (flushed). Then the lease can go.
    pub async fn unpublish(&self, p: Published) -> Result<ExportStatsSnapshot> {
        let r = self.server.remove_export(p.export.name()).await;
        drop(p.lease);
        // Count what the export did even if closing it failed.
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(&p.export.stats().snapshot());
        Ok(r?)
    }

    /// Lifetime totals: finished exports plus the current ones.
    pub fn totals(&self) -> Totals {
        let mut t = *self.finished.lock().unwrap_or_else(|e| e.into_inner());
        for e in self.server.exports() {
            t.add(&e.stats().snapshot());
        }
        t
    }

    /// Every export.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.server.exports()
    }

    /// Drain and close everything.
    pub async fn shutdown(&self) -> Result<()> {
        Ok(self.server.shutdown().await?)
    }
}
