//! Pushing a set of disks at once: open every source, connect every
//! target, stream them all concurrently, and report per disk the change id
//! and digest. The library entry point for the CLI, the HTTP service and
//! in-process benchmarks. Change-tracking state is *not* committed here:
//! the caller does that once the push counts (the hub said complete).
//!
//! ```no_run
//! # async fn f() -> Result<(), hub_agent::push::PushError> {
//! use hub_agent::push::{push_disks, DiskRequest};
//! use hub_agent::source::SourceSpec;
//! let disks = vec![
//!     DiskRequest::full(0, 2000, SourceSpec::parse("/images/a.raw"), "nbd://127.0.0.1:10105/a"),
//!     DiskRequest::full(1, 2001, SourceSpec::parse("/images/b.qcow2"), "nbd://127.0.0.1:10106/b"),
//! ];
//! for d in push_disks(disks, Default::default()).await? {
//!     println!("{} {} {}", d.disk_key, d.change_id, d.digest);
//! }
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use futures_util::future::try_join_all;
use serde::Serialize;
use sna_contract::Mode;

use crate::source::{SourceError, SourceSpec};
use crate::stream::{
    stream_disk, DiskCounter, DiskStream, StreamError, StreamOptions, StreamStats,
};
use crate::tracking::{self, DiskState};

/// One disk of a push.
#[derive(Debug, Clone)]
pub struct DiskRequest {
    /// Disk index (reported back as is).
    pub disk_id: u32,
    /// Disk key (for messages).
    pub disk_key: u32,
    /// Name of its change-tracking state.
    pub state_name: String,
    /// Where to read.
    pub source: SourceSpec,
    /// `nbd://…` to write to.
    pub target_uri: String,
    /// Base of an incremental (from [`tracking::base_for`]); `None` = full.
    pub base: Option<Arc<DiskState>>,
    /// Progress, updated while it streams.
    pub progress: Arc<DiskCounter>,
}

impl DiskRequest {
    /// A full push of `source` to `target_uri`, state named after the disk
    /// key (what a benchmark or a one-off copy needs).
    pub fn full(
        disk_id: u32,
        disk_key: u32,
        source: SourceSpec,
        target_uri: impl Into<String>,
    ) -> Self {
        DiskRequest {
            disk_id,
            disk_key,
            state_name: disk_key.to_string(),
            source,
            target_uri: target_uri.into(),
            base: None,
            progress: Arc::new(DiskCounter::default()),
        }
    }
}

/// What one disk's push produced.
#[derive(Debug, Clone, Serialize)]
pub struct DiskResult {
    /// Disk index.
    pub disk_id: u32,
    /// Disk key.
    pub disk_key: u32,
    /// Full or incremental.
    pub mode: Mode,
    /// Change id of this push (the base of the next incremental).
    pub change_id: String,
    /// `blake3-tree-v1` digest of the whole source, 64 hex digits.
    pub digest: String,
    /// Disk size.
    pub size_bytes: u64,
    /// What was sent.
    pub stats: StreamStats,
    /// The change-tracking state to commit once the push counts.
    #[serde(skip)]
    pub state: Arc<DiskState>,
    /// Its name.
    #[serde(skip)]
    pub state_name: String,
}

/// Why a push failed: the disk and the cause.
#[derive(Debug, thiserror::Error)]
#[error("disk {disk_key}: {kind}")]
pub struct PushError {
    /// Disk key.
    pub disk_key: u32,
    /// Cause.
    pub kind: PushErrorKind,
}

/// The cause of a [`PushError`].
#[derive(Debug, thiserror::Error)]
pub enum PushErrorKind {
    /// Opening the source.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Connecting to the target (URI left out: its export name is a capability).
    #[error("connecting to target: {0}")]
    Target(nbd_client::ConnectError),
    /// Streaming.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Push every disk concurrently. The first failure stops the others (their
/// futures are dropped, closing their connections). All disks of one push
/// share one fresh change id.
pub async fn push_disks(
    disks: Vec<DiskRequest>,
    opts: StreamOptions,
) -> Result<Vec<DiskResult>, PushError> {
    let change_id = tracking::new_change_id();
    // One bound for every disk: they share the cores.
    let cpu = (opts.cpu_tasks > 0).then(|| Arc::new(tokio::sync::Semaphore::new(opts.cpu_tasks)));
    try_join_all(disks.into_iter().map(|d| {
        let change_id = change_id.clone();
        let opts = opts.clone();
        let cpu = cpu.clone();
        async move {
            let disk_key = d.disk_key;
            push_one(d, change_id, opts, cpu)
                .await
                .map_err(|kind| PushError { disk_key, kind })
        }
    }))
    .await
}

/// Connect to a target: `nbds://` with the URI's own `tls-certificates=`
/// or else the agent's credentials (never in plaintext).
async fn connect_target(
    uri: &str,
    tls: Option<&nbd_client::ClientTls>,
) -> Result<nbd_client::Client, PushErrorKind> {
    let u = nbd_client::NbdUri::parse(uri)
        .map_err(|e| PushErrorKind::Target(nbd_client::ConnectError::Uri(e)))?;
    let mut opts = if u.tls && u.tls_certificates.is_none() {
        let Some(t) = tls else {
            return Err(PushErrorKind::Target(nbd_client::ConnectError::Tls(
                nbd_client::TlsConfigError::new(
                    "an nbds:// target needs --tls-certificates DIR (the hub's CA)",
                ),
            )));
        };
        let mut o = nbd_client::ConnectOptions::new(u.export.clone());
        o.tls = Some(t.clone());
        o
    } else {
        nbd_client::options_for(&u).map_err(PushErrorKind::Target)?
    };
    opts.max_in_flight = opts.max_in_flight.max(1);
    nbd_client::Client::connect_host(&u.host, u.port, &opts)
        .await
        .map_err(|e| PushErrorKind::Target(e.into()))
}

async fn push_one(
    d: DiskRequest,
    change_id: String,
    opts: StreamOptions,
    cpu: Option<Arc<tokio::sync::Semaphore>>,
) -> Result<DiskResult, PushErrorKind> {
    let (opened, target) = tokio::try_join!(
        async { d.source.open_tracked().await.map_err(PushErrorKind::Source) },
        async { connect_target(&d.target_uri, opts.tls.as_ref()).await },
    )?;
    let source = opened.backend;
    let size = source.size();
    let mode = if d.base.is_some() {
        Mode::Incremental
    } else {
        Mode::Full
    };
    let out = stream_disk(
        DiskStream {
            source,
            raw: opened.raw.filter(|_| opts.fused_read_hash),
            cpu,
            target: target.clone(),
            base: d.base,
            dirty: opened.dirty,
            progress: d.progress,
        },
        opts,
    )
    .await?;
    let s = &out.stats;
    tracing::info!(
        disk_key = d.disk_key,
        ?mode,
        bytes_read = s.bytes_read,
        blocks_clean = s.blocks_clean,
        bytes_written = s.bytes_written,
        bytes_zeroed = s.bytes_zeroed,
        "disk streamed"
    );
    // Everything is flushed; a failed goodbye loses nothing.
    let _ = target.disconnect().await;
    Ok(DiskResult {
        disk_id: d.disk_id,
        disk_key: d.disk_key,
        mode,
        change_id: change_id.clone(),
        digest: out.digest.to_hex(),
        size_bytes: size,
        stats: out.stats,
        state: Arc::new(DiskState {
            change_id,
            size,
            leaves: out.leaves,
        }),
        state_name: d.state_name,
    })
}

/// Commit the state of every pushed disk (after the push counted).
pub fn commit_states(state_dir: &Path, results: &[DiskResult]) -> std::io::Result<()> {
    for r in results {
        tracking::commit(state_dir, &r.state_name, &r.state)?;
    }
    Ok(())
}
