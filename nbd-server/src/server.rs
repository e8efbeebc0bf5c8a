//! The embeddable server: exports, listeners and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ServerError;
use crate::export::{Catalog, Export, ExportRegistry, ExportStatsSnapshot, Visibility};
use crate::net::budget::MemoryBudget;
use crate::net::listener::{accept_loop, ConnContext};
use crate::net::registry::{ConnLimits, ConnRegistry, NO_LISTENER};
use crate::net::transmission::TransmissionLimits;
use crate::tls::ServerTls;

/// Server-wide settings. Every limit is enforced per [`Server`]; see the
/// crate's "Guarantees" for what they promise together.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most time the handshake may go without progress: the greeting and
    /// each option's reply restart it (default 10 s per option, like
    /// qemu-nbd's `--handshake-limit` but per step, so listing hundreds of
    /// exports works).
    pub handshake_timeout: Duration,
    /// Most simultaneous connections over all listeners (default 4096).
    /// At the limit the longest-idle connection is closed to make room;
    /// if none is idle the newcomer is closed.
    pub max_connections: usize,
    /// Most connections on one listener (default 1024), so a flood on one
    /// port cannot starve another. Same eviction rule.
    pub max_connections_per_listener: usize,
    /// Most connections to one export over all listeners (default 256).
    /// Checked when the client picks the export. Same eviction rule.
    pub max_connections_per_export: usize,
    /// Most bytes one connection holds in requests in flight and replies
    /// not yet written (default 8 MiB).
    /// Strict, except that one request larger than this is admitted when
    /// nothing else is held.
    pub max_inflight_bytes_per_connection: u64,
    /// Most bytes all connections together hold in requests and replies
    /// (default 1 GiB, at least 40 MiB).
    pub max_buffer_memory: u64,
    /// Close a connection with no request for this long after the
    /// handshake (default 1 h; zero: never).
    pub idle_timeout: Duration,
    /// Close a connection whose queued replies the client has not read
    /// for this long, releasing its budget (default 60 s; zero: never).
    pub send_timeout: Duration,
    /// Answer `NBD_OPT_LIST` with the exports' names and descriptions;
    /// `false` answers an empty list (names stay secret).
    pub list_exports: bool,
    /// Reach an export only by its exact name: no default name "" on any
    /// listener, and a port of its own ([`Server::serve_export`]) does not
    /// answer to other names. With unguessable names, the name is then a
    /// capability. `false` is qemu-nbd's behaviour.
    pub exact_export_names: bool,
    /// TLS offered or required on every listener (`None`: the spec's
    /// NOTLS mode, `STARTTLS` refused).
    pub tls: Option<ServerTls>,
    /// Which plain-TCP clients get READ data spliced from the page cache
    /// into the socket instead of copied (default: clients on other
    /// hosts). See [`SpliceReads`].
    pub splice_reads: SpliceReads,
}

/// Which clients get READ replies spliced: file pages moved into the socket
/// without a copy in this process ([`crate::splice`]), when the backend
/// can ([`BlockBackend::read_for_socket`](crate::BlockBackend::read_for_socket)).
///
/// The default leaves loopback clients out. A NIC sends spliced pages
/// straight from the page cache, so the server's two copies per byte are
/// gone; a client on the same host must copy those page-cache pages out
/// of the socket itself, cold in the CPU's caches, where a copied reply
/// arrives warm. Measured with nbdcopy over loopback: the server's CPU
/// per GiB fell by 6-21 %, nbdcopy's rose by 48-89 %, and restores were
/// up to 33 % slower (BENCHMARKS.md, "Spliced READ replies"). The kernel
/// treats `MSG_ZEROCOPY` to local sockets the same way, as a deferred
/// copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpliceReads {
    /// Clients whose address is not a loopback address.
    #[default]
    Remote,
    /// Every plain-TCP client.
    Always,
    /// No client: every READ reply is copied from a buffer.
    Never,
}

impl SpliceReads {
    /// Whether a client at `peer` gets spliced READ replies.
    pub fn allows(self, peer: std::net::IpAddr) -> bool {
        match self {
            SpliceReads::Always => true,
            SpliceReads::Never => false,
            SpliceReads::Remote => !peer.to_canonical().is_loopback(),
        }
    }
}

/// Default per-connection in-flight budget: 32 of nbdcopy's 256 KiB
/// READs, 4 of qemu-img's 2 MiB ones; WRITEs fill half of it (16 and 2;
/// qemu-nbd takes 16 requests per client), see `ConnBudget::admits`. With
/// WRITEs allowed the whole 8 MiB, four parallel backups (nbdcopy opens
/// two connections each on this machine) peaked at 80 MB of RSS against
/// 54 MB for four qemu-nbd processes; with half, at 32-47 MB, at the same
/// throughput. Warm restores read 5-8 % slower with 4 MiB for READs too.
/// Measured in BENCHMARKS.md, "Read-ahead through the chain, and half the
/// in-flight budget for writes".
pub const DEFAULT_INFLIGHT_PER_CONNECTION: u64 = 8 << 20;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_listener: 1024,
            max_connections_per_export: 256,
            max_inflight_bytes_per_connection: DEFAULT_INFLIGHT_PER_CONNECTION,
            max_buffer_memory: 1 << 30,
            idle_timeout: Duration::from_secs(3600),
            send_timeout: Duration::from_secs(60),
            list_exports: true,
            exact_export_names: false,
            tls: None,
            splice_reads: SpliceReads::default(),
        }
    }
}

/// An NBD server: a set of exports served on any number of listeners.
///
/// Cloning gives another handle to the same server.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Arc<ExportRegistry>,
    ctx: ConnContext,
    visibility: Visibility,
}

/// A running listener.
#[derive(Debug)]
pub struct ListenerHandle {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl ListenerHandle {
    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting; connections already accepted carry on.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Server {
    /// A server with no exports and no listeners.
    pub fn new(config: ServerConfig) -> Self {
        let ctx = ConnContext {
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            registry: ConnRegistry::new(ConnLimits {
                global: config.max_connections,
                per_listener: config.max_connections_per_listener,
                per_export: config.max_connections_per_export,
            }),
            budget: MemoryBudget::new(config.max_buffer_memory),
            handshake_timeout: config.handshake_timeout,
            tls: config.tls.clone(),
            splice_reads: config.splice_reads,
            limits: TransmissionLimits {
                max_inflight_bytes: config.max_inflight_bytes_per_connection,
                idle_timeout: config.idle_timeout,
                send_timeout: config.send_timeout,
            },
        };
        Server {
            inner: Arc::new(Inner {
                registry: Arc::new(ExportRegistry::default()),
                ctx,
                visibility: Visibility {
                    list: config.list_exports,
                    exact_names: config.exact_export_names,
                },
            }),
        }
    }

    /// Register an export. It becomes reachable by name on every shared
    /// listener ([`Server::serve`]) at once.
    pub fn add_export(&self, export: Export) -> Result<Arc<Export>, ServerError> {
        if self.inner.ctx.shutdown.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        Export::validate_name(export.name()).map_err(ServerError::InvalidExportName)?;
        let export = Arc::new(export);
        if !self.inner.registry.insert(Arc::clone(&export)) {
            return Err(ServerError::DuplicateExport(export.name().to_owned()));
        }
        tracing::debug!(
            export = export.name(),
            size = export.backend().size(),
            "export added"
        );
        Ok(export)
    }

    /// Look up an export.
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.registry.get(name)
    }

    /// All exports.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.inner.registry.all()
    }

    /// Unregister an export and close it: its dedicated listener stops (the
    /// port is free when this returns), in-flight requests finish, clients
    /// are disconnected and the backend is flushed. Returns final counters.
    pub async fn remove_export(&self, name: &str) -> Result<ExportStatsSnapshot, ServerError> {
        let export = self
            .inner
            .registry
            .remove(name)
            .ok_or_else(|| ServerError::UnknownExport(name.to_owned()))?;
        let stats = export.close().await.map_err(|source| ServerError::Close {
            name: name.to_owned(),
            source,
        })?;
        tracing::debug!(export = name, "export removed");
        Ok(stats)
    }

    /// Serve every registered export, by name, on `listener`.
    pub fn serve(&self, listener: TcpListener) -> Result<ListenerHandle, ServerError> {
        let addr = listener.local_addr()?;
        let stop = self.inner.ctx.shutdown.child_token();
        let catalog = Catalog::Shared(Arc::clone(&self.inner.registry), self.inner.visibility);
        self.inner.ctx.tasks.spawn(accept_loop(
            listener,
            catalog,
            self.inner.ctx.clone(),
            stop.clone(),
        ));
        Ok(ListenerHandle { addr, stop })
    }

    /// Serve one export alone on `listener` (any name, including the default
    /// "", reaches it). The listener closes with the export.
    pub fn serve_export(
        &self,
        listener: TcpListener,
        export: &Arc<Export>,
    ) -> Result<ListenerHandle, ServerError> {
        if export.is_closing() {
            return Err(ServerError::UnknownExport(export.name().to_owned()));
        }
        let addr = listener.local_addr()?;
        let stop = self.inner.ctx.shutdown.child_token();
        let catalog = Catalog::Single(Arc::clone(export), self.inner.visibility);
        let ctx = self.inner.ctx.clone();
        let closing = export.closing_token().clone();
        let stop2 = stop.clone();
        // Tracked by the export too, so Export::close waits until the socket
        // is dropped and the port can be reused.
        let fut = export.tasks().track_future(async move {
            tokio::select! {
                _ = accept_loop(listener, catalog, ctx, stop2) => {}
                _ = closing.cancelled() => {}
            }
        });
        self.inner.ctx.tasks.spawn(fut);
        Ok(ListenerHandle { addr, stop })
    }

    /// Serve one client already connected over any byte stream (a Unix
    /// socket, a socketpair, an in-memory pipe), with every registered
    /// export reachable by name. Resolves when the client is done. Counts
    /// toward the global and per-export connection limits (no listener's).
    pub async fn serve_connection<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let catalog = Catalog::Shared(Arc::clone(&self.inner.registry), self.inner.visibility);
        let ctx = self.inner.ctx.clone();
        let guard = match ctx.registry.admit(NO_LISTENER) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "connection refused");
                return;
            }
        };
        let fut = crate::net::listener::serve_stream(
            stream,
            "stream",
            catalog,
            ctx,
            guard,
            tokio::io::split,
        );
        self.inner.ctx.tasks.track_future(fut).await;
    }

    /// Whether [`Server::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.ctx.shutdown.is_cancelled()
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish and
    /// their replies go out, disconnect clients, then close (flush) every
    /// export. Returns the first close error, after closing them all.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        self.inner.ctx.shutdown.cancel();
        self.inner.ctx.tasks.close();
        self.inner.ctx.tasks.wait().await;
        let mut first_err = None;
        for export in self.inner.registry.all() {
            if let Some(e) = self.inner.registry.remove(export.name()) {
                if let Err(source) = e.close().await {
                    tracing::error!(export = e.name(), error = %source, "flush on shutdown failed");
                    first_err.get_or_insert(ServerError::Close {
                        name: e.name().to_owned(),
                        source,
                    });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
