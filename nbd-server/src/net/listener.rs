//! Accept loops and per-connection setup.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::MemoryBudget;
use super::negotiate::{negotiate, within, Negotiation};
use super::outbox::ReplySink;
use super::registry::ConnEntry;
use super::registry::{ConnGuard, ConnRegistry};
use super::transmission::{self, TransmissionLimits};
use crate::export::Catalog;
use crate::export::Export;
use crate::proto::{Handshake, Negotiated, TlsMode};
use crate::server::SpliceReads;
use crate::tls::ServerTls;
use bytes::BytesMut;

/// Everything a connection needs from its server.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext {
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Live connections and their limits.
    pub registry: ConnRegistry,
    /// The process-wide buffer budget.
    pub budget: MemoryBudget,
    /// Most time without progress in the handshake (per option; the TLS
    /// handshake counts as one step).
    pub handshake_timeout: Duration,
    /// TLS offered or required.
    pub tls: Option<ServerTls>,
    /// Which clients get spliced READ replies; per connection, `Never`
    /// once the peer is known not to qualify.
    pub splice_reads: SpliceReads,
    pub limits: TransmissionLimits,
}

/// Accept connections until `stop` fires, serving `catalog`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    catalog: Catalog,
    ctx: ConnContext,
    stop: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let listener_id = ctx.registry.listener_id();
    let mut backoff = Duration::from_millis(10);
    loop {
        // Cancel-safe: accept loses nothing when dropped.
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                // Limits are enforced right here: room is made by closing
                // the longest-idle connection, or the newcomer is dropped.
                let guard = match ctx.registry.admit(listener_id) {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::debug!(listener = ?local, %peer, error = %e, "connection refused");
                        continue;
                    }
                };
                let catalog = catalog.clone();
                let ctx2 = ctx.clone();
                ctx.tasks
                    .spawn(async move { handle(stream, peer, catalog, ctx2, guard).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the
                // listener itself stays up.
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    tracing::debug!(listener = ?local, "listener stopped");
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    catalog: Catalog,
    mut ctx: ConnContext,
    guard: ConnGuard,
) {
    // Replies are small and latency-bound; Nagle would delay them.
    let _ = stream.set_nodelay(true);
    if !ctx.splice_reads.allows(peer.ip()) {
        ctx.splice_reads = SpliceReads::Never;
    }
    // TCP splits into owned halves without the lock tokio::io::split needs.
    serve_stream(
        stream,
        &peer.to_string(),
        catalog,
        ctx,
        guard,
        TcpStream::into_split,
    )
    .await;
}

/// Serve one already-connected client on any byte stream (TCP, Unix
/// socket, an in-memory pipe in tests and fuzzing). `split` turns the
/// plaintext stream into read and write halves once the handshake is done;
/// a TLS stream is split with `tokio::io::split`.
pub(crate) async fn serve_stream<S, R, W>(
    mut stream: S,
    peer: &str,
    catalog: Catalog,
    ctx: ConnContext,
    guard: ConnGuard,
    split: impl FnOnce(S) -> (R, W),
) where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    W: ReplySink,
{
    let conn = Arc::clone(guard.entry());
    let mode = ctx.tls.as_ref().map_or(TlsMode::Off, ServerTls::mode);
    let mut hs = Handshake::with_tls(mode);
    let first = haggle(&mut stream, &mut hs, true, peer, &catalog, &ctx, &conn).await;
    match first {
        Some(Negotiation::Enter(n, leftover)) => {
            enter(stream, split, n, leftover, peer, &ctx, guard).await
        }
        Some(Negotiation::StartTls) => {
            let Some(tls) = &ctx.tls else { return };
            // The TLS handshake is one handshake step: bounded by the same
            // per-step deadline, and by shutdown and eviction.
            let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
            let accepted = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return,
                _ = conn.cancelled().cancelled() => return,
                r = within(deadline, tls.acceptor().accept(stream)) => r,
            };
            let mut stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(e) => {
                    tracing::debug!(peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            conn.touch();
            hs.tls_started();
            match haggle(&mut stream, &mut hs, false, peer, &catalog, &ctx, &conn).await {
                Some(Negotiation::Enter(n, leftover)) => {
                    enter(stream, tokio::io::split, n, leftover, peer, &ctx, guard).await
                }
                // A second STARTTLS is answered ERR_INVALID by the
                // handshake; nothing else to do.
                Some(Negotiation::StartTls) | Some(Negotiation::Closed) | None => {}
            }
        }
        Some(Negotiation::Closed) | None => {}
    }
}

/// Option haggling on one stream, cut short by shutdown or eviction.
async fn haggle<S>(
    stream: &mut S,
    hs: &mut Handshake,
    greet: bool,
    peer: &str,
    catalog: &Catalog,
    ctx: &ConnContext,
    conn: &ConnEntry,
) -> Option<Negotiation>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let r = tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => return None,
        _ = conn.cancelled().cancelled() => return None,
        r = negotiate(stream, hs, greet, catalog, ctx.handshake_timeout, conn) => r,
    };
    match r {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(peer, error = %e, "handshake failed");
            None
        }
    }
}

/// Transmission on a negotiated stream until the client leaves.
async fn enter<S, R, W>(
    stream: S,
    split: impl FnOnce(S) -> (R, W),
    negotiated: Negotiated<Arc<Export>>,
    leftover: BytesMut,
    peer: &str,
    ctx: &ConnContext,
    guard: ConnGuard,
) where
    R: AsyncRead + Unpin,
    W: ReplySink,
{
    let conn = Arc::clone(guard.entry());
    let export = Arc::clone(&negotiated.export);
    if let Err(e) = guard.assign_export(export.name()) {
        tracing::debug!(peer, export = export.name(), error = %e, "connection refused");
        return;
    }
    // Count as one of the export's tasks before checking that it is still
    // open: Export::close cancels first and then waits for its tasks, so
    // either it waits for us or we see the cancellation here.
    let _token = export.tasks().token();
    if export.is_closing() || conn.cancelled().is_cancelled() {
        return;
    }
    tracing::debug!(
        peer,
        export = export.name(),
        structured = negotiated.structured,
        extended = negotiated.extended,
        "client entered transmission"
    );
    let (rd, wr) = split(stream);
    transmission::run(
        rd,
        wr,
        leftover,
        negotiated,
        transmission::Env {
            limits: ctx.limits,
            budget: &ctx.budget,
            conn: &conn,
            shutdown: &ctx.shutdown,
            splice: ctx.splice_reads != SpliceReads::Never,
        },
    )
    .await;
    drop(guard);
    tracing::debug!(peer, export = export.name(), "client disconnected");
}
