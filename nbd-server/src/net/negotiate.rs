//! Driving the sans-IO handshake over a socket.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ConnectionError;
use crate::export::{Catalog, Export};
use crate::proto::{Handshake, HandshakeStep, Negotiated};

/// Run the handshake. `Ok(None)` means the client aborted or went away
/// cleanly; on success the leftover bytes are the first transmission input.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    catalog: &Catalog,
) -> Result<Option<(Negotiated<Arc<Export>>, BytesMut)>, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(256);
    let mut input = BytesMut::with_capacity(4096);
    Handshake::greeting(&mut out);
    stream.write_all(&out).await?;
    out.clear();
    let mut hs = Handshake::new();
    loop {
        let step = hs.step(&mut input, &mut out, catalog);
        if !out.is_empty() {
            // Best effort on the error path: the client may already be gone.
            let written = stream.write_all(&out).await;
            out.clear();
            if step.is_ok() {
                written?;
            }
        }
        match step? {
            HandshakeStep::NeedMore => {
                if stream.read_buf(&mut input).await? == 0 {
                    return Ok(None);
                }
            }
            HandshakeStep::Enter(n) => {
                stream.flush().await?;
                return Ok(Some((n, input)));
            }
            HandshakeStep::Close => {
                let _ = stream.flush().await;
                return Ok(None);
            }
        }
    }
}
