//! Driving the sans-IO handshake over a socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::registry::ConnEntry;
use crate::error::ConnectionError;
use crate::export::{Catalog, Export};
use crate::proto::{Handshake, HandshakeStep, Negotiated};

/// How a stretch of option haggling on one stream ended.
#[derive(Debug)]
pub(crate) enum Negotiation {
    /// The client picked an export; the bytes are the first transmission
    /// input.
    Enter(Negotiated<Arc<Export>>, BytesMut),
    /// `STARTTLS` was acknowledged: run the TLS handshake, then haggle on
    /// inside it.
    StartTls,
    /// The client aborted or went away cleanly.
    Closed,
}

/// Run the handshake on `stream` until it enters transmission, starts TLS
/// or ends. `greet` sends the greeting first (not after STARTTLS).
///
/// `per_step` bounds the time without progress: the greeting and every
/// reply must go out, and the next complete option come in, within it. The
/// deadline restarts with each reply, so a client listing hundreds of
/// exports one `NBD_OPT_INFO` at a time is fine, while one that trickles
/// bytes without completing an option is closed.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    hs: &mut Handshake,
    greet: bool,
    catalog: &Catalog,
    per_step: Duration,
    conn: &ConnEntry,
) -> Result<Negotiation, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut deadline = Instant::now() + per_step;
    let mut out = BytesMut::with_capacity(256);
    let mut input = BytesMut::with_capacity(4096);
    if greet {
        Handshake::greeting(&mut out);
        within(deadline, stream.write_all(&out)).await??;
        out.clear();
    }
    loop {
        let step = hs.step(&mut input, &mut out, catalog);
        if !out.is_empty() {
            // Best effort on the error path: the client may already be gone.
            // Flushed too: TLS holds records back until flushed.
            let written = within(deadline, async {
                stream.write_all(&out).await?;
                stream.flush().await
            })
            .await;
            out.clear();
            if step.is_ok() {
                written??;
            }
            deadline = Instant::now() + per_step;
        }
        match step? {
            HandshakeStep::NeedMore => {
                if within(deadline, stream.read_buf(&mut input)).await?? == 0 {
                    return Ok(Negotiation::Closed);
                }
                conn.touch();
            }
            HandshakeStep::Enter(n) => {
                within(deadline, stream.flush()).await??;
                return Ok(Negotiation::Enter(n, input));
            }
            HandshakeStep::StartTls => {
                within(deadline, stream.flush()).await??;
                return Ok(Negotiation::StartTls);
            }
            HandshakeStep::Close => {
                let _ = within(deadline, stream.flush()).await;
                return Ok(Negotiation::Closed);
            }
        }
    }
}

pub(crate) async fn within<T>(
    deadline: Instant,
    f: impl Future<Output = T>,
) -> Result<T, ConnectionError> {
    tokio::time::timeout_at(deadline, f)
        .await
        .map_err(|_| ConnectionError::Timeout)
}
