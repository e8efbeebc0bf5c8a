//! The transmission phase of one connection, as one task.
//!
//! The task reads requests, runs each one as a future in a
//! `FuturesUnordered` (so many are in flight and complete out of order),
//! and writes finished replies with vectored writes — all in one loop, with
//! no task spawned per request and no channel between reader and writer.
//! That keeps a request's path free of cross-thread wake-ups: the only hop
//! is whatever the backend itself does.
//!
//! Memory is bounded by budgets reserved from each request's header before
//! its payload is read or its READ is issued (see [`super::budget`]): one
//! strict budget per connection and one shared by the whole process. A
//! reservation is held until the reply's last byte is written. When the
//! connection's budget is spent the loop stops reading the socket (TCP
//! then pushes back on the client) but keeps completing and writing, so it
//! can never deadlock against a client that reads replies while it writes
//! requests. A client that stops reading replies is closed once its socket
//! has accepted nothing for the send timeout, which frees what it held.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::budget::{request_cost, ConnBudget, Grant, MemoryBudget};
use super::frames::{self, Frame};
use super::outbox::{Held, Outbox, ReplySink};
use super::registry::{check_period, ConnEntry};
use super::request_reader::{ReadError, RequestReader};
use crate::dispatch::{self, ExecContext, Outcome};
use crate::export::Export;
use crate::proto::consts::cmd;
use crate::proto::{
    validate, Command, NbdErrno, Negotiated, ReplyEncoder, ReplyMode, ReplyTo, RequestHeader,
    Session,
};

/// Limits for one connection's transmission phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransmissionLimits {
    /// Most bytes held by requests in flight and replies not yet written.
    /// Strict, except that one request larger than this is admitted when
    /// nothing else is held.
    pub max_inflight_bytes: u64,
    /// Close a connection with no request for this long (zero: never).
    pub idle_timeout: Duration,
    /// Close a connection whose queued replies make no progress for this
    /// long (zero: never).
    pub send_timeout: Duration,
}

/// What a connection's loop shares with its server.
pub(crate) struct Env<'a> {
    pub limits: TransmissionLimits,
    pub budget: &'a MemoryBudget,
    pub conn: &'a ConnEntry,
    pub shutdown: &'a CancellationToken,
    /// The server allows spliced READ replies to this client (they are
    /// used when the writer is a plain TCP socket).
    pub splice: bool,
}

/// The request at the head of the input, between header and dispatch.
enum Admission {
    /// Nothing read yet.
    None,
    /// Header read; waiting for budget.
    Header(RequestHeader, u64),
    /// Budget reserved; reading the payload.
    Admitted(RequestHeader, Held),
}

type Pending = Pin<Box<dyn Future<Output = (Frame, Held)> + Send>>;
type GrantWait = Pin<Box<dyn Future<Output = Grant> + Send>>;

/// Serve requests until the client disconnects, the export closes, the
/// server shuts down, the connection is evicted or times out. In-flight
/// requests always finish; their replies go out unless the client stopped
/// reading.
pub(crate) async fn run<R, W>(
    rd: R,
    mut wr: W,
    leftover: BytesMut,
    negotiated: Negotiated<Arc<Export>>,
    env: Env<'_>,
) where
    R: AsyncRead + Unpin,
    W: ReplySink,
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
        splice: env.splice && wr.socket().is_some(),
    });
    let extended = negotiated.extended;
    let limits = env.limits;
    let mut reader = RequestReader::new(rd, leftover, extended);
    let mut budget = ConnBudget::new(limits.max_inflight_bytes);
    let mut admission = Admission::None;
    // The wait for process-wide budget, kept across iterations so the
    // connection keeps its place in the queue.
    let mut grant_wait: Option<GrantWait> = None;
    let mut inflight: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut outbox = Outbox::default();
    // Stop reading (client done, violation, shutdown) but finish what is in flight.
    let mut reading = true;
    // The client stopped reading replies: drop them instead of queueing.
    let mut discarding = false;
    let mut last_request = Instant::now();
    let mut last_progress = Instant::now();
    let period = check_period(&[limits.idle_timeout, limits.send_timeout]);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.reset();
    export.stats().connection_opened();

    loop {
        // Completions that are already done go out in the same write.
        while let Some(Some((frame, held))) = inflight.next().now_or_never() {
            complete(
                &mut outbox,
                &mut budget,
                frame,
                held,
                discarding,
                &mut last_progress,
            );
        }
        for held in outbox.take_done() {
            budget.release(held.conn);
        }
        env.conn.set_busy(
            inflight.len()
                + usize::from(!outbox.is_empty())
                + usize::from(!matches!(admission, Admission::None)),
        );
        if !reading && inflight.is_empty() && outbox.is_empty() {
            break;
        }
        let (want_read, body_of) = match &admission {
            Admission::None => (reading, None),
            Admission::Header(..) => (false, None),
            Admission::Admitted(h, _) => (reading, Some(*h)),
        };
        if let Admission::Header(h, cost) = admission {
            if reading && grant_wait.is_none() && budget.admits(cost, h.kind == cmd::WRITE) {
                let small = budget.is_small_after(cost);
                // Usually the bytes are free: no future, no allocation.
                if let Some(g) = env.budget.try_acquire(cost, small) {
                    budget.take(cost);
                    admission = Admission::Admitted(
                        h,
                        Held {
                            conn: cost,
                            _grant: Some(g),
                        },
                    );
                    continue;
                }
                grant_wait = Some(Box::pin(env.budget.acquire(cost, small)));
            }
        }
        // Cancel safety of each branch: the tokens and the ticker are
        // stateless; FuturesUnordered::next loses nothing; write_some
        // advances its queue only after a completed write; the reader keeps
        // partial input in its own buffers; a dropped budget wait takes
        // nothing.
        tokio::select! {
            biased;
            _ = env.shutdown.cancelled(), if reading => reading = false,
            _ = export.closing_token().cancelled(), if reading => reading = false,
            _ = env.conn.cancelled().cancelled(), if reading => {
                tracing::debug!(export = export.name(), "closed to make room for a new connection");
                reading = false;
            }
            done = inflight.next(), if !inflight.is_empty() => {
                if let Some((frame, held)) = done {
                    complete(&mut outbox, &mut budget, frame, held, discarding, &mut last_progress);
                }
            }
            r = outbox.write_some(&mut wr), if !outbox.is_empty() => match r {
                Ok(_) => {
                    last_progress = Instant::now();
                    last_request = last_request.max(last_progress);
                }
                Err(e) => {
                    tracing::debug!(export = export.name(), error = %e, "client gone while writing replies");
                    break;
                }
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                if !outbox.is_empty()
                    && !limits.send_timeout.is_zero()
                    && now.duration_since(last_progress) >= limits.send_timeout
                {
                    tracing::info!(export = export.name(), "client read no reply for the send timeout; closing");
                    reading = false;
                    discarding = true;
                    for held in outbox.discard() {
                        budget.release(held.conn);
                    }
                } else if reading
                    && inflight.is_empty()
                    && outbox.is_empty()
                    && matches!(admission, Admission::None)
                    && !limits.idle_timeout.is_zero()
                    && now.duration_since(last_request) >= limits.idle_timeout
                {
                    tracing::info!(export = export.name(), "no request for the idle timeout; closing");
                    reading = false;
                } else if matches!(admission, Admission::None)
                    && now.duration_since(last_request) >= period
                {
                    // Quiet for a while: hold no read buffer meanwhile.
                    reader.release_if_idle();
                }
            }
            g = wait_grant(&mut grant_wait), if reading && grant_wait.is_some() => {
                grant_wait = None;
                if let Admission::Header(h, c) = admission {
                    budget.take(c);
                    admission = Admission::Admitted(h, Held { conn: c, _grant: Some(g) });
                }
            }
            r = read_step(&mut reader, body_of), if want_read => match r {
                Ok(Step::Header(h)) => {
                    env.conn.touch();
                    last_request = Instant::now();
                    admission = Admission::Header(h, request_cost(&h, extended));
                }
                Ok(Step::Body(payload)) => {
                    let Admission::Admitted(header, held) = std::mem::replace(&mut admission, Admission::None) else {
                        continue;
                    };
                    let to = ReplyTo { cookie: header.cookie, offset: header.offset };
                    match validate(&header, &session) {
                        Ok(Command::Disconnect) => {
                            budget.release(held.conn);
                            reading = false;
                        }
                        Ok(cmd) => {
                            tracing::trace!(export = export.name(), ?cmd, cookie = header.cookie, "request");
                            let (export, ctx) = (Arc::clone(&export), Arc::clone(&ctx));
                            inflight.push(Box::pin(async move {
                                let df = matches!(cmd, Command::Read { df: true, .. });
                                let outcome = dispatch::execute(&export, cmd, payload, &ctx).await;
                                (frames::encode(&enc, to, df, outcome), held)
                            }));
                        }
                        Err(errno) => {
                            tracing::trace!(export = export.name(), ?header, %errno, "invalid request");
                            export.stats().request_done(false, 0, 0);
                            if let Some(name) = dispatch::data_command_name(header.kind) {
                                export.stats().write_failed(format!("{name} at {}: {errno}: {}", header.offset, invalid_message(errno)));
                            }
                            let outcome = Outcome::Failed { errno, message: invalid_message(errno).into() };
                            complete(&mut outbox, &mut budget, frames::encode(&enc, to, false, outcome), held, discarding, &mut last_progress);
                        }
                    }
                }
                Ok(Step::End) => reading = false,
                Err(e) => {
                    tracing::debug!(export = export.name(), error = %e, "dropping connection");
                    reading = false;
                }
            },
        }
        if !reading {
            grant_wait = None;
            // A request not yet dispatched will never be: give its budget back.
            if let Admission::Admitted(_, held) = std::mem::replace(&mut admission, Admission::None)
            {
                budget.release(held.conn);
            }
        }
    }
    if !discarding {
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
    }
    export.stats().connection_closed();
}

/// Queue a finished request's reply, charging the connection for reply
/// bytes beyond what the header promised (block status lists).
fn complete(
    outbox: &mut Outbox,
    budget: &mut ConnBudget,
    frame: Frame,
    mut held: Held,
    discarding: bool,
    last_progress: &mut Instant,
) {
    if discarding {
        budget.release(held.conn);
        return;
    }
    let len = frame.len() as u64;
    if len > held.conn {
        budget.take(len - held.conn);
        held.conn = len;
    }
    if outbox.is_empty() {
        // The stall clock starts when there is something to send.
        *last_progress = Instant::now();
    }
    outbox.push(frame, held);
}

async fn wait_grant(w: &mut Option<GrantWait>) -> Grant {
    match w {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

enum Step {
    Header(RequestHeader),
    Body(bytes::Bytes),
    End,
}

/// Read the next header, or the payload of the admitted one.
async fn read_step<R: AsyncRead + Unpin>(
    reader: &mut RequestReader<R>,
    body_of: Option<RequestHeader>,
) -> Result<Step, ReadError> {
    match body_of {
        Some(h) => Ok(Step::Body(reader.body(&h).await?)),
        None => Ok(reader.header().await?.map_or(Step::End, Step::Header)),
    }
}

fn invalid_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::EPERM => "export is read-only",
        NbdErrno::ENOSPC => "request extends past the end of the export",
        NbdErrno::EOVERFLOW => "request larger than the maximum payload",
        _ => "invalid request",
    }
}
