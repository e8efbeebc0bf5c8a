//! Carrying out a validated command against an export's backend.
//!
//! This is the only code that calls [`BlockBackend`](crate::backend::BlockBackend)
//! methods for clients. It turns each command into an [`Outcome`] (success
//! data or an errno), emulates FUA with a flush, and keeps the export's
//! counters. Encoding the outcome into wire frames is [`crate::net`]'s job.

use bytes::Bytes;

use crate::backend::{BackendError, Extent, SocketChunk, ZeroFlags};
use crate::errno_map::to_errno;
use crate::export::Export;
use crate::proto::consts::{cmd, state, MAX_EXTENTS};
use crate::proto::reply::MAX_COMPACT_EXTENT;
use crate::proto::{Command, MetaContext, NbdErrno, StatusDescriptor};

/// The result of one command.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Success without data.
    Done,
    /// READ data, covering the request exactly.
    Read(Vec<SocketChunk>),
    /// BLOCK_STATUS: one descriptor list per selected context.
    Status(Vec<(MetaContext, Vec<StatusDescriptor>)>),
    /// Failure.
    Failed {
        /// The error value to send.
        errno: NbdErrno,
        /// A short message for the client.
        message: String,
    },
}

impl Outcome {
    fn failed(errno: NbdErrno, message: impl Into<String>) -> Self {
        Outcome::Failed {
            errno,
            message: message.into(),
        }
    }
}

/// What the session negotiated that execution depends on.
#[derive(Debug, Clone)]
pub(crate) struct ExecContext {
    /// Selected metadata contexts.
    pub contexts: Vec<MetaContext>,
    /// Extended headers: extent lengths are 64-bit.
    pub extended: bool,
    /// Replies go to a plain TCP socket: READs may return spliced pages.
    pub splice: bool,
}

/// Run `cmd` (with the WRITE payload, if any) against `export`.
pub(crate) async fn execute(
    export: &Export,
    cmd: Command,
    payload: Bytes,
    ctx: &ExecContext,
) -> Outcome {
    let backend = export.backend();
    let result: Result<Outcome, BackendError> = async {
        match cmd {
            Command::Read { offset, len, .. } => {
                let chunks = if ctx.splice {
                    backend.read_for_socket(offset, len).await?
                } else {
                    let chunks = backend.read(offset, len).await?;
                    chunks.into_iter().map(SocketChunk::Read).collect()
                };
                let total: u64 = chunks.iter().map(SocketChunk::len).sum();
                if total != u64::from(len) {
                    tracing::error!(
                        export = export.name(),
                        offset,
                        len,
                        total,
                        "backend returned a short read"
                    );
                    return Ok(Outcome::failed(
                        NbdErrno::EIO,
                        "read returned the wrong length",
                    ));
                }
                Ok(Outcome::Read(chunks))
            }
            Command::Write { offset, fua, .. } => {
                backend.write(offset, payload).await?;
                if fua {
                    backend.flush().await?;
                }
                Ok(Outcome::Done)
            }
            Command::Flush => {
                if !export.is_read_only() {
                    backend.flush().await?;
                }
                Ok(Outcome::Done)
            }
            Command::Trim { offset, len, fua } => {
                if len > 0 && backend.caps().can_trim {
                    backend.trim(offset, len).await?;
                    if fua {
                        backend.flush().await?;
                    }
                }
                Ok(Outcome::Done)
            }
            Command::Cache { offset, len } => {
                backend.cache(offset, len).await?;
                Ok(Outcome::Done)
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
                fast,
            } => {
                if fast && !backend.caps().can_fast_zero {
                    return Ok(Outcome::failed(
                        NbdErrno::ENOTSUP,
                        "fast zeroing not supported",
                    ));
                }
                if len > 0 {
                    let flags = ZeroFlags {
                        may_trim: !no_hole,
                        fast,
                    };
                    backend.write_zeroes(offset, len, flags).await?;
                    if fua {
                        backend.flush().await?;
                    }
                }
                Ok(Outcome::Done)
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let extents = if req_one {
                    backend.block_status_first(offset, len).await?
                } else {
                    backend.block_status(offset, len).await?
                };
                let max_len = if ctx.extended {
                    u64::MAX
                } else {
                    u64::from(MAX_COMPACT_EXTENT)
                };
                let mut lists = Vec::with_capacity(ctx.contexts.len());
                for c in &ctx.contexts {
                    let d = descriptors(&extents, *c, offset, len, req_one, max_len);
                    if d.is_empty() {
                        tracing::error!(
                            export = export.name(),
                            offset,
                            len,
                            "backend returned no extents"
                        );
                        return Ok(Outcome::failed(NbdErrno::EIO, "block status unavailable"));
                    }
                    lists.push((*c, d));
                }
                Ok(Outcome::Status(lists))
            }
            // The connection handles DISC itself; never dispatched.
            Command::Disconnect => Ok(Outcome::Done),
        }
    }
    .await;
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            let errno = to_errno(e.kind(), &cmd);
            tracing::warn!(export = export.name(), error = %e, errno = %errno, "request failed");
            Outcome::failed(errno, e.summary())
        }
    };
    if let (Outcome::Failed { errno, message }, Some(name)) = (&outcome, data_command(&cmd)) {
        export
            .stats()
            .write_failed(format!("{name} at {}: {errno}: {message}", offset_of(&cmd)));
    }
    let (read, written) = match (&outcome, cmd) {
        (Outcome::Read(chunks), _) => (chunks.iter().map(SocketChunk::len).sum(), 0),
        (Outcome::Done, Command::Write { len, .. }) => (0, u64::from(len)),
        _ => (0, 0),
    };
    export
        .stats()
        .request_done(!matches!(outcome, Outcome::Failed { .. }), read, written);
    outcome
}

/// The name of a command whose failure means the export may not hold what
/// the client meant it to (a backup with such a failure is not complete).
fn data_command(cmd: &Command) -> Option<&'static str> {
    data_command_name(match cmd {
        Command::Write { .. } => cmd::WRITE,
        Command::WriteZeroes { .. } => cmd::WRITE_ZEROES,
        Command::Trim { .. } => cmd::TRIM,
        Command::Flush => cmd::FLUSH,
        _ => return None,
    })
}

/// [`data_command`] by wire command type (for requests refused before
/// they became a [`Command`]).
pub(crate) fn data_command_name(kind: u16) -> Option<&'static str> {
    match kind {
        cmd::WRITE => Some("WRITE"),
        cmd::WRITE_ZEROES => Some("WRITE_ZEROES"),
        cmd::TRIM => Some("TRIM"),
        cmd::FLUSH => Some("FLUSH"),
        _ => None,
    }
}

fn offset_of(c: &Command) -> u64 {
    match *c {
        Command::Write { offset, .. }
        | Command::WriteZeroes { offset, .. }
        | Command::Trim { offset, .. } => offset,
        _ => 0,
    }
}

/// Turn backend extents into the descriptors of one context: clipped to
/// the requested range (always valid, and keeps replies small), adjacent
/// equal values merged, at most one with REQ_ONE, each no longer than
/// `max_len` (the list stops after a clamped extent so later descriptors
/// keep their true positions).
pub(crate) fn descriptors(
    extents: &[Extent],
    ctx: MetaContext,
    offset: u64,
    len: u64,
    req_one: bool,
    max_len: u64,
) -> Vec<StatusDescriptor> {
    let end = offset.saturating_add(len);
    let mut out: Vec<StatusDescriptor> = Vec::new();
    let mut pos = offset;
    for e in extents {
        if pos >= end || out.len() >= MAX_EXTENTS {
            break;
        }
        let length = e.length.min(end - pos);
        if length == 0 {
            continue;
        }
        let status = match ctx {
            MetaContext::BaseAllocation => {
                (if e.hole { state::HOLE } else { 0 }) | (if e.zero { state::ZERO } else { 0 })
            }
            MetaContext::AllocationDepth => e.depth,
        };
        match out.last_mut() {
            Some(last) if last.status == status => last.length += length,
            _ => out.push(StatusDescriptor { length, status }),
        }
        pos += length;
    }
    if let Some(i) = out.iter().position(|d| d.length > max_len) {
        out.truncate(i + 1);
        out[i].length = max_len;
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool, depth: u32) -> Extent {
        Extent {
            length,
            hole,
            zero: hole,
            depth,
        }
    }

    #[test]
    fn descriptors_clip_merge_and_map_bits() {
        let e = [
            ext(4096, false, 1),
            ext(4096, false, 2),
            ext(8192, true, 0),
            ext(1 << 20, false, 1),
        ];
        let d = descriptors(&e, MetaContext::BaseAllocation, 0, 10000, false, u64::MAX);
        assert_eq!(
            d,
            vec![
                StatusDescriptor {
                    length: 8192,
                    status: 0
                },
                StatusDescriptor {
                    length: 1808,
                    status: 3
                }
            ]
        );
        let d = descriptors(&e, MetaContext::AllocationDepth, 0, 20000, false, u64::MAX);
        assert_eq!(
            d.iter().map(|d| d.status).collect::<Vec<_>>(),
            vec![1, 2, 0, 1]
        );
        assert_eq!(d.iter().map(|d| d.length).sum::<u64>(), 20000);
    }

    #[test]
    fn descriptors_req_one_keeps_first() {
        let e = [ext(4096, false, 1), ext(4096, true, 0)];
        let d = descriptors(&e, MetaContext::BaseAllocation, 0, 8192, true, u64::MAX);
        assert_eq!(
            d,
            vec![StatusDescriptor {
                length: 4096,
                status: 0
            }]
        );
    }

    #[test]
    fn descriptors_stop_after_a_clamped_extent() {
        let e = [ext(8 << 30, true, 0), ext(4096, false, 1)];
        let d = descriptors(
            &e,
            MetaContext::BaseAllocation,
            0,
            (8 << 30) + 4096,
            false,
            1 << 30,
        );
        assert_eq!(
            d,
            vec![StatusDescriptor {
                length: 1 << 30,
                status: 3
            }]
        );
    }

    #[test]
    fn descriptors_skip_empty_extents() {
        let e = [ext(0, false, 1), ext(512, true, 0)];
        let d = descriptors(&e, MetaContext::BaseAllocation, 0, 512, false, u64::MAX);
        assert_eq!(
            d,
            vec![StatusDescriptor {
                length: 512,
                status: 3
            }]
        );
    }
}
