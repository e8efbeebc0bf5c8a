//! The transmission phase of one connection, as one task.
//!
//! The task reads requests, runs each one as a future in a
//! `FuturesUnordered` (so many are in flight and complete out of order),
//! and writes finished replies with vectored writes — all in one loop, with
//! no task spawned per request and no channel between reader and writer.
//! That keeps a request's path free of cross-thread wake-ups: the only hop
//! is whatever the backend itself does.
//!
//! Memory is bounded by a budget of payload bytes: requests in flight plus
//! replies not yet written. When it is spent the loop stops reading the
//! socket (TCP then pushes back on the client) but keeps completing and
//! writing, so it can never deadlock against a client that reads replies
//! while it writes requests.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::frames::{self, Frame};
use crate::dispatch::{self, ExecContext, Outcome};
use crate::export::Export;
use crate::proto::consts::MAX_PAYLOAD;
use crate::proto::request::FrameError;
use crate::proto::{
    validate, Command, NbdErrno, Negotiated, ReplyEncoder, ReplyMode, ReplyTo, RequestHeader,
    Session,
};

/// Limits for one connection's transmission phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransmissionLimits {
    /// Most payload bytes in flight (requests being served plus replies not
    /// yet written). One maximum-size request is always admitted.
    pub max_inflight_bytes: u64,
}

/// Most segments handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Bytes a request holds while in flight: its payload (WRITE) or the
/// buffer it will fill (READ); at least 1, so the number of requests is
/// bounded too.
fn cost(cmd: &Command) -> u64 {
    match cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => u64::from(*len).max(1),
        _ => 1,
    }
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

/// Replies waiting to be written, as byte segments.
#[derive(Default)]
struct Outbox {
    segments: VecDeque<Bytes>,
    bytes: u64,
}

impl Outbox {
    fn push(&mut self, frame: Frame) {
        for s in frame.segments {
            if !s.is_empty() {
                self.bytes += s.len() as u64;
                self.segments.push_back(s);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Write some of the queued bytes. Cancel-safe: the queue advances only
    /// by what a completed write reported.
    async fn write_some<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        let slices: Vec<IoSlice<'_>> = self
            .segments
            .iter()
            .take(MAX_IOVECS)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.bytes -= n as u64;
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        Ok(())
    }
}

type Pending = Pin<Box<dyn Future<Output = (Frame, u64)> + Send>>;

/// Serve requests until the client disconnects, the export closes or the
/// server shuts down. In-flight requests always finish and get replies.
pub(crate) async fn run<R, W>(
    rd: R,
    mut wr: W,
    leftover: BytesMut,
    negotiated: Negotiated<Arc<Export>>,
    limits: TransmissionLimits,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
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
    let budget = limits.max_inflight_bytes.max(u64::from(MAX_PAYLOAD) + 1);
    let mut reader = RequestReader {
        rd,
        buf: leftover,
        extended: negotiated.extended,
    };
    let mut inflight: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut inflight_bytes = 0u64;
    let mut outbox = Outbox::default();
    // Stop reading (client done, violation, shutdown) but finish what is in flight.
    let mut reading = true;
    export.stats().connection_opened();

    loop {
        // Completions that are already done go out in the same write.
        while let Some(Some((frame, c))) = inflight.next().now_or_never() {
            inflight_bytes -= c;
            outbox.push(frame);
        }
        if !reading && inflight.is_empty() && outbox.is_empty() {
            break;
        }
        let can_read = reading && inflight_bytes + outbox.bytes < budget;
        // Cancel safety of each branch: the tokens are stateless;
        // FuturesUnordered::next loses nothing; write_some advances its
        // queue only after a completed write; RequestReader::next keeps
        // partial input in its own buffer.
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if reading => reading = false,
            _ = export.closing_token().cancelled(), if reading => reading = false,
            done = inflight.next(), if !inflight.is_empty() => {
                if let Some((frame, c)) = done {
                    inflight_bytes -= c;
                    outbox.push(frame);
                }
            }
            r = outbox.write_some(&mut wr), if !outbox.is_empty() => {
                if let Err(e) = r {
                    tracing::debug!(export = export.name(), error = %e, "client gone while writing replies");
                    break;
                }
            }
            next = reader.next(), if can_read => match next {
                Ok(Some((header, payload))) => {
                    let to = ReplyTo { cookie: header.cookie, offset: header.offset };
                    match validate(&header, &session) {
                        Ok(Command::Disconnect) => reading = false,
                        Ok(cmd) => {
                            tracing::trace!(export = export.name(), ?cmd, cookie = header.cookie, "request");
                            let c = cost(&cmd);
                            inflight_bytes += c;
                            let (export, ctx) = (Arc::clone(&export), Arc::clone(&ctx));
                            inflight.push(Box::pin(async move {
                                let df = matches!(cmd, Command::Read { df: true, .. });
                                let outcome = dispatch::execute(&export, cmd, payload, &ctx).await;
                                (frames::encode(&enc, to, df, outcome), c)
                            }));
                        }
                        Err(errno) => {
                            tracing::trace!(export = export.name(), ?header, %errno, "invalid request");
                            export.stats().request_done(false, 0, 0);
                            if let Some(name) = dispatch::data_command_name(header.kind) {
                                export.stats().write_failed(format!("{name} at {}: {errno}: {}", header.offset, invalid_message(errno)));
                            }
                            let outcome = Outcome::Failed { errno, message: invalid_message(errno).into() };
                            outbox.push(frames::encode(&enc, to, false, outcome));
                        }
                    }
                }
                Ok(None) => reading = false,
                Err(e) => {
                    tracing::debug!(export = export.name(), error = %e, "dropping connection");
                    reading = false;
                }
            },
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
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
