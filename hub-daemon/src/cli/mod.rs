//! Command-line front end: thin wrappers that parse arguments and call the
//! library, and the client commands that call a running hub ([`client`]).

pub mod client;
pub mod digest;
pub mod export;
pub mod limits;
pub mod serve;
pub mod size;
pub mod tls;
pub mod token;

use clap::{Parser, Subcommand};

/// The NBD backup hub.
#[derive(Debug, Parser)]
#[command(name = "hub-daemon", version, about, after_help = client::EXIT_CODES)]
pub struct Cli {
    /// Log lines as plain text (colour only on a terminal) or one JSON
    /// object per line.
    #[arg(long, global = true, env = "HUB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the backup hub: the VM-level API and every NBD export.
    // Boxed: by far the largest variant (clippy::large_enum_variant).
    Serve(Box<serve::ServeArgs>),
    /// Serve image files over NBD in the foreground (qemu-nbd replacement).
    Export(export::ExportArgs),
    /// Print the blake3-tree-v1 digest of image files or nbd:// exports.
    Digest(digest::DigestArgs),
    /// Create, list and revoke API bearer tokens.
    Token(token::TokenArgs),
    /// Make TLS credentials for NBD over TLS.
    Tls(tls::TlsCommand),
    /// Commands that talk to a running hub over its API.
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// Raise the soft open-files limit to the hard limit: every export holds a
/// listening socket and its image files, and hundreds of exports exceed the
/// usual soft limit of 1024.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
}

/// The tokio runtime for the network side: half the cores, at least one
/// (`TOKIO_WORKER_THREADS` overrides). Image I/O runs on qcow-backend's own
/// I/O threads, so the network needs fewer workers than cores, and fewer
/// workers means fewer cross-thread wake-ups per request (measured on 2
/// vCPUs: 4k random writes at QD32 went from ~34 to ~27 µs of CPU per
/// request with one worker instead of two, with no loss in streaming).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_for(false)
}

/// The runtime, with every core when NBD runs over TLS: decryption runs on
/// the workers, and one worker became the bottleneck (measured on 2 vCPUs,
/// TLS backup writes with nbdcopy: 457 → 532 MB/s with 1 connection,
/// 474 → 740 MB/s with 4, with two workers instead of one).
pub fn runtime_for(tls: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        b.worker_threads(if tls { cores } else { (cores / 2).max(1) });
    }
    b.enable_all().build()
}

/// Resolve on SIGINT or SIGTERM.
pub async fn wait_for_signal() -> std::io::Result<()> {
    Signals::listen()?.wait().await
}

/// SIGINT and SIGTERM handlers, installed when this is made: make it
/// before announcing "ready", so a signal sent right after the
/// announcement is caught rather than killing the process.
#[derive(Debug)]
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers.
    pub fn listen() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolve on the first SIGINT or SIGTERM.
    pub async fn wait(mut self) -> std::io::Result<()> {
        tokio::select! {
            _ = self.int.recv() => Ok(()),
            _ = self.term.recv() => Ok(()),
        }
    }
}
