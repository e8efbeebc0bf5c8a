//! Accept loops and per-connection setup.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::negotiate::negotiate;
use super::transmission::{self, TransmissionLimits};
use crate::error::ConnectionError;
use crate::export::Catalog;

/// Everything a connection needs from its server.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext {
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub conn_limit: Arc<Semaphore>,
    pub handshake_timeout: Duration,
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
    let mut backoff = Duration::from_millis(10);
    loop {
        // Cancel-safe: acquire_owned and accept lose nothing when dropped.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = Arc::clone(&ctx.conn_limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let catalog = catalog.clone();
                let ctx2 = ctx.clone();
                ctx.tasks
                    .spawn(async move { handle(stream, peer, catalog, ctx2, permit).await });
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
    ctx: ConnContext,
    _permit: OwnedSemaphorePermit,
) {
    // Replies are small and latency-bound; Nagle would delay them.
    let _ = stream.set_nodelay(true);
    // TCP splits into owned halves without the lock tokio::io::split needs.
    serve_stream(
        stream,
        &peer.to_string(),
        catalog,
        ctx,
        TcpStream::into_split,
    )
    .await;
}

/// Serve one already-connected client on any byte stream (TCP, Unix
/// socket, an in-memory pipe in tests and fuzzing). `split` turns the
/// stream into read and write halves once the handshake is done.
pub(crate) async fn serve_stream<S, R, W>(
    mut stream: S,
    peer: &str,
    catalog: Catalog,
    ctx: ConnContext,
    split: impl FnOnce(S) -> (R, W),
) where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let negotiated = tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => return,
        r = tokio::time::timeout(ctx.handshake_timeout, negotiate(&mut stream, &catalog)) => {
            r.unwrap_or(Err(ConnectionError::Timeout))
        }
    };
    let (negotiated, leftover) = match negotiated {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(peer, error = %e, "handshake failed");
            return;
        }
    };
    let export = Arc::clone(&negotiated.export);
    // Count as one of the export's tasks before checking that it is still
    // open: Export::close cancels first and then waits for its tasks, so
    // either it waits for us or we see the cancellation here.
    let _token = export.tasks().token();
    if export.is_closing() {
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
        ctx.limits,
        ctx.shutdown.clone(),
    )
    .await;
    tracing::debug!(peer, export = export.name(), "client disconnected");
}
