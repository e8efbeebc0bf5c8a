//! The transmission phase of one connection.
//!
//! One reader (this task) decodes and validates requests, then spawns one
//! task per request; tasks run concurrently against the backend and hand
//! finished replies to one writer task, so replies go out as they complete
//! (out of order). A per-connection budget of in-flight bytes bounds memory:
//! when it is spent the reader stops reading, and TCP pushes back on the
//! client.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frames::{self, Frame};
use crate::dispatch::{self, ExecContext, Outcome};
use crate::export::Export;
use crate::proto::consts::MAX_PAYLOAD;
use crate::proto::request::FrameError;
use crate::proto::{
    validate, Command, NbdErrno, Negotiated, ReplyEncoder, ReplyMode, ReplyTo, RequestHeader,
    Session,
};

/// Budget unit for in-flight accounting.
const BUDGET_UNIT: u64 = 4096;

/// Limits for one connection's transmission phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransmissionLimits {
    /// Most payload bytes (reads and writes) in flight at once.
    pub max_inflight_bytes: u64,
}

impl TransmissionLimits {
    fn budget_units(&self) -> u32 {
        // Always room for one maximum-size request.
        let min = u64::from(MAX_PAYLOAD) / BUDGET_UNIT + 1;
        (self.max_inflight_bytes / BUDGET_UNIT).clamp(min, u64::from(u32::MAX >> 4)) as u32
    }
}

fn cost(cmd: &Command) -> u32 {
    let bytes = match cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => u64::from(*len),
        _ => 0,
    };
    // ≤ 32 MiB / 4 KiB + 1, fits u32.
    (bytes.div_ceil(BUDGET_UNIT)).max(1) as u32
}

/// Reads complete requests (header and payload) from the socket.
///
/// Cancel-safe: partial input stays in `buf`, so `next()` can sit in a
/// `select!` without losing bytes.
struct RequestReader<R> {
    rd: R,
    buf: BytesMut,
    extended: bool,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    /// The next request, `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<(RequestHeader, Bytes)>, ReadError> {
        let hlen = RequestHeader::wire_len(self.extended);
        loop {
            if let Some(h) = RequestHeader::decode(&self.buf, self.extended)? {
                // decode() bounded the payload by MAX_PAYLOAD.
                let plen = h.payload_len(self.extended) as usize;
                let need = hlen + plen;
                if self.buf.len() >= need {
                    self.buf.advance(hlen);
                    let payload = self.buf.split_to(plen).freeze();
                    return Ok(Some((h, payload)));
                }
                self.buf.reserve(need - self.buf.len());
            } else if self.buf.capacity() - self.buf.len() < hlen {
                self.buf.reserve(64 * 1024);
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.buf.len()))
                };
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed inside a request ({0} bytes pending)")]
    Truncated(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serve requests until the client disconnects, the export closes or the
/// server shuts down. In-flight requests always finish and get replies.
pub(crate) async fn run<R, W>(
    rd: R,
    wr: W,
    leftover: BytesMut,
    negotiated: Negotiated<Arc<Export>>,
    limits: TransmissionLimits,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = negotiated.export;
    let session = Session {
        size: negotiated.info.size,
        flags: negotiated.flags,
        structured: negotiated.structured || negotiated.extended,
        extended: negotiated.extended,
        has_contexts: !negotiated.contexts.is_empty(),
    };
    let enc = ReplyEncoder::new(ReplyMode::from_negotiation(
        negotiated.structured,
        negotiated.extended,
    ));
    let ctx = Arc::new(ExecContext {
        contexts: negotiated.contexts,
        extended: negotiated.extended,
    });
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(write_loop(BufWriter::with_capacity(256 * 1024, wr), rx));
    let budget = Arc::new(Semaphore::new(limits.budget_units() as usize));
    let tasks = TaskTracker::new();
    let mut reader = RequestReader {
        rd,
        buf: leftover,
        extended: negotiated.extended,
    };
    export.stats().connection_opened();

    loop {
        // Cancel-safe: RequestReader keeps partial input in its buffer, and
        // the token futures have no state.
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = export.closing_token().cancelled() => break,
            r = reader.next() => r,
        };
        let (header, payload) = match next {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(export = export.name(), error = %e, "dropping connection");
                break;
            }
        };
        let to = ReplyTo {
            cookie: header.cookie,
            offset: header.offset,
        };
        let cmd = match validate(&header, &session) {
            Ok(Command::Disconnect) => break,
            Ok(cmd) => cmd,
            Err(errno) => {
                tracing::trace!(export = export.name(), ?header, %errno, "invalid request");
                export.stats().request_done(false, 0, 0);
                let outcome = Outcome::Failed {
                    errno,
                    message: invalid_message(errno).into(),
                };
                let _ = tx.send(frames::encode(&enc, to, false, outcome));
                continue;
            }
        };
        tracing::trace!(
            export = export.name(),
            ?cmd,
            cookie = header.cookie,
            "request"
        );
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&budget).acquire_many_owned(cost(&cmd)) => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let export = Arc::clone(&export);
        let ctx = Arc::clone(&ctx);
        let tx = tx.clone();
        tasks.spawn(async move {
            let df = matches!(cmd, Command::Read { df: true, .. });
            let outcome = dispatch::execute(&export, cmd, payload, &ctx).await;
            let mut frame = frames::encode(&enc, to, df, outcome);
            frame.permit = Some(permit);
            let _ = tx.send(frame);
        });
    }

    tasks.close();
    tasks.wait().await;
    drop(tx);
    if let Ok(Err(e)) = writer.await {
        tracing::debug!(export = export.name(), error = %e, "reply writer stopped");
    }
    export.stats().connection_closed();
}

fn invalid_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::EPERM => "export is read-only",
        NbdErrno::ENOSPC => "request extends past the end of the export",
        NbdErrno::EOVERFLOW => "request larger than the maximum payload",
        _ => "invalid request",
    }
}

/// Write frames as they arrive; flush only when no more are queued, so
/// replies that complete together share a system call.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Frame>,
) -> std::io::Result<()> {
    while let Some(frame) = rx.recv().await {
        write_frame(&mut w, frame).await?;
        while let Ok(frame) = rx.try_recv() {
            write_frame(&mut w, frame).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    frame: Frame,
) -> std::io::Result<()> {
    for seg in &frame.segments {
        w.write_all(seg).await?;
    }
    // The permit (in-flight budget) is released here, once the bytes left us.
    drop(frame);
    Ok(())
}
