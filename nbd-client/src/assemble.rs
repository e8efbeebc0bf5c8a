//! Turning the replies of one request into its result, without I/O.
//!
//! A READ may be answered by many data and hole chunks in any order; they
//! must lie inside the request, must not overlap, and on success must cover
//! it exactly. A BLOCK_STATUS gets one status chunk for the selected
//! context. Any chunk may be an error; the first error is the result.
//! Violations are [`ProtocolError`]s: the connection cannot be trusted
//! afterwards.

use std::sync::Arc;

use bytes::Bytes;
use nbd_server::proto::NbdErrno;
use nbd_server::ReadChunk;

use crate::error::{ClientError, ProtocolError};
use crate::reply::{Chunk, Expect, Extent, Reply};

/// The result of a finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Commands without reply data.
    Done,
    /// READ: pieces in order, covering the request exactly.
    Read(Vec<ReadChunk>),
    /// BLOCK_STATUS: extents from the request offset.
    Status(Vec<Extent>),
}

#[derive(Debug)]
enum State {
    Read {
        offset: u64,
        len: u32,
        /// (absolute offset, piece); sorted when the reply is complete.
        pieces: Vec<(u64, ReadChunk)>,
        covered: u64,
    },
    Status {
        /// The context whose extents the caller wants.
        want: u32,
        /// Every context the handshake selected (the server reports each).
        selected: Arc<[u32]>,
        /// Contexts already reported in this reply.
        seen: Vec<u32>,
        extents: Option<Vec<Extent>>,
    },
    Plain {
        command: &'static str,
    },
}

/// The reply state of one request in flight.
#[derive(Debug)]
pub struct Assembly {
    state: State,
    error: Option<ClientError>,
}

/// Outcome of feeding one reply unit.
pub type Fed = Result<Option<Result<Output, ClientError>>, ProtocolError>;

impl Assembly {
    /// A READ of `len` bytes at `offset`.
    pub fn read(offset: u64, len: u32) -> Self {
        Self::with(State::Read {
            offset,
            len,
            pieces: Vec::new(),
            covered: 0,
        })
    }

    /// A BLOCK_STATUS whose result is the extents of context `want`, on a
    /// connection where the contexts `selected` were negotiated (the
    /// server sends a chunk for each; the others are checked and dropped).
    pub fn status(want: u32, selected: Arc<[u32]>) -> Self {
        Self::with(State::Status {
            want,
            selected,
            seen: Vec::new(),
            extents: None,
        })
    }

    /// Any other command (named for error messages).
    pub fn plain(command: &'static str) -> Self {
        Self::with(State::Plain { command })
    }

    fn with(state: State) -> Self {
        Assembly { state, error: None }
    }

    /// What the decoder may accept for this request.
    pub fn expect(&self) -> Expect {
        match self.state {
            State::Read { len, .. } => Expect::Read { len },
            State::Status { .. } => Expect::BlockStatus,
            State::Plain { .. } => Expect::Other,
        }
    }

    /// Feed one reply unit. `Ok(Some(..))` once the request is complete.
    pub fn feed(&mut self, reply: Reply) -> Fed {
        match reply {
            Reply::Simple { errno, data, .. } => {
                if errno != 0 {
                    return Ok(Some(Err(server_error(errno, String::new()))));
                }
                match (&mut self.state, data) {
                    (State::Read { len, .. }, Some(d)) if d.len() as u64 == u64::from(*len) => {
                        Ok(Some(Ok(Output::Read(vec![ReadChunk::Data(d)]))))
                    }
                    (State::Plain { .. }, None) => Ok(Some(Ok(Output::Done))),
                    (State::Read { .. }, _) => Err(ProtocolError::UnexpectedSimpleReply("READ")),
                    (State::Status { .. }, _) => {
                        Err(ProtocolError::UnexpectedSimpleReply("BLOCK_STATUS"))
                    }
                    (State::Plain { command }, Some(_)) => {
                        Err(ProtocolError::UnexpectedSimpleReply(command))
                    }
                }
            }
            Reply::Chunk { done, chunk, .. } => {
                self.chunk(chunk)?;
                if done {
                    self.finish().map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn chunk(&mut self, chunk: Chunk) -> Result<(), ProtocolError> {
        match (chunk, &mut self.state) {
            (Chunk::None, _) => Ok(()),
            (
                Chunk::Error {
                    errno,
                    message,
                    offset,
                },
                state,
            ) => {
                if let (
                    Some(at),
                    State::Read {
                        offset: start, len, ..
                    },
                ) = (offset, &*state)
                {
                    check_inside(at, 1, *start, *len)?;
                }
                self.error.get_or_insert(server_error(errno, message));
                Ok(())
            }
            (
                Chunk::Data { offset, data },
                State::Read {
                    offset: start,
                    len,
                    pieces,
                    covered,
                },
            ) => {
                let n = data.len() as u64;
                add_piece(offset, n, *start, *len, covered)?;
                // Empty pieces add nothing and would confuse the
                // contiguity check (the decoder refuses them anyway).
                if n > 0 {
                    pieces.push((offset, ReadChunk::Data(data)));
                }
                Ok(())
            }
            (
                Chunk::Hole { offset, len: n },
                State::Read {
                    offset: start,
                    len,
                    pieces,
                    covered,
                },
            ) => {
                add_piece(offset, u64::from(n), *start, *len, covered)?;
                if n > 0 {
                    pieces.push((offset, ReadChunk::Zero(n)));
                }
                Ok(())
            }
            (
                Chunk::BlockStatus { context, extents },
                State::Status {
                    want,
                    selected,
                    seen,
                    extents: got,
                },
            ) => {
                if !selected.contains(&context) {
                    return Err(ProtocolError::WrongContext {
                        got: context,
                        want: Some(*want),
                    });
                }
                // seen only holds selected ids, once each: bounded.
                if seen.contains(&context) {
                    return Err(ProtocolError::BadStatus("two chunks for one context"));
                }
                seen.push(context);
                // The decoder refuses these too; callers walking extents
                // rely on progress, so the assembly does not trust it.
                if extents.is_empty() || extents.iter().any(|e| e.length == 0) {
                    return Err(ProtocolError::BadStatus("empty or zero-length extent"));
                }
                // Extents are consecutive from the request offset; lengths
                // that add up past 2^64 describe no disk.
                extents
                    .iter()
                    .try_fold(0u64, |sum, e| sum.checked_add(e.length))
                    .ok_or(ProtocolError::BadStatus("extents overflow"))?;
                if context == *want {
                    *got = Some(extents);
                }
                Ok(())
            }
            (c, state) => Err(ProtocolError::UnexpectedChunk {
                kind: chunk_kind(&c),
                command: match state {
                    State::Read { .. } => "READ",
                    State::Status { .. } => "BLOCK_STATUS",
                    State::Plain { command } => command,
                },
            }),
        }
    }

    /// The result once the last chunk arrived. A server error is the
    /// request's result; a reply that contradicts the request is fatal.
    fn finish(&mut self) -> Result<Result<Output, ClientError>, ProtocolError> {
        if let Some(e) = self.error.take() {
            return Ok(Err(e));
        }
        match &mut self.state {
            State::Read {
                offset,
                len,
                pieces,
                covered,
            } => {
                let len = u64::from(*len);
                if *covered != len {
                    return Err(ProtocolError::Incomplete {
                        covered: *covered,
                        len,
                    });
                }
                pieces.sort_by_key(|(o, _)| *o);
                // Pieces lie inside the request and add up to its length;
                // contiguity then rules out overlaps and gaps.
                let mut at = *offset;
                for (o, p) in pieces.iter() {
                    if *o != at {
                        return Err(ProtocolError::Overlap);
                    }
                    at = at.saturating_add(p.len());
                }
                Ok(Ok(Output::Read(
                    std::mem::take(pieces).into_iter().map(|(_, p)| p).collect(),
                )))
            }
            State::Status { extents, .. } => {
                extents
                    .take()
                    .map(|e| Ok(Output::Status(e)))
                    .ok_or(ProtocolError::BadStatus(
                        "no status chunk for the context asked",
                    ))
            }
            State::Plain { .. } => Ok(Ok(Output::Done)),
        }
    }
}

fn server_error(errno: u32, message: String) -> ClientError {
    ClientError::Server {
        errno: NbdErrno(errno),
        message,
    }
}

fn check_inside(offset: u64, n: u64, start: u64, len: u32) -> Result<(), ProtocolError> {
    let outside = ProtocolError::ChunkOutsideRequest {
        offset,
        len: n,
        req_offset: start,
        req_len: u64::from(len),
    };
    let end = offset.checked_add(n).ok_or(outside.clone())?;
    let req_end = start.saturating_add(u64::from(len));
    if offset < start || end > req_end {
        return Err(outside);
    }
    Ok(())
}

fn add_piece(
    offset: u64,
    n: u64,
    start: u64,
    len: u32,
    covered: &mut u64,
) -> Result<(), ProtocolError> {
    check_inside(offset, n, start, len)?;
    *covered = covered.saturating_add(n);
    if *covered > u64::from(len) {
        return Err(ProtocolError::Overlap);
    }
    Ok(())
}

fn chunk_kind(c: &Chunk) -> u16 {
    use nbd_server::proto::consts::reply_type as t;
    match c {
        Chunk::Data { .. } => t::OFFSET_DATA,
        Chunk::Hole { .. } => t::OFFSET_HOLE,
        Chunk::BlockStatus { .. } => t::BLOCK_STATUS,
        Chunk::Error { .. } => t::ERROR,
        Chunk::None => t::NONE,
    }
}

/// Bytes of a READ result laid out flat (holes as zeroes), for callers that
/// want one buffer.
pub fn flatten(chunks: &[ReadChunk]) -> Bytes {
    if let [ReadChunk::Data(d)] = chunks {
        return d.clone();
    }
    let total: u64 = chunks.iter().map(ReadChunk::len).sum();
    let mut out = Vec::with_capacity(total as usize);
    for c in chunks {
        match c {
            ReadChunk::Data(d) => out.extend_from_slice(d),
            ReadChunk::Zero(n) => out.resize(out.len() + *n as usize, 0),
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk(done: bool, chunk: Chunk) -> Reply {
        Reply::Chunk {
            cookie: 1,
            done,
            chunk,
        }
    }

    #[test]
    fn out_of_order_read_chunks_assemble_in_order() {
        let mut a = Assembly::read(100, 10);
        assert!(matches!(
            a.feed(chunk(
                false,
                Chunk::Hole {
                    offset: 104,
                    len: 6
                }
            )),
            Ok(None)
        ));
        let r = a
            .feed(chunk(
                true,
                Chunk::Data {
                    offset: 100,
                    data: Bytes::from_static(b"abcd"),
                },
            ))
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            Output::Read(vec![
                ReadChunk::Data(Bytes::from_static(b"abcd")),
                ReadChunk::Zero(6)
            ])
        );
        assert_eq!(flatten(&[ReadChunk::Zero(2)]), Bytes::from_static(&[0, 0]));
    }

    #[test]
    fn read_chunks_outside_overlapping_or_short_are_protocol_errors() {
        let mut a = Assembly::read(100, 10);
        assert!(matches!(
            a.feed(chunk(false, Chunk::Hole { offset: 99, len: 2 })),
            Err(ProtocolError::ChunkOutsideRequest { .. })
        ));
        let mut a = Assembly::read(100, 10);
        a.feed(chunk(
            false,
            Chunk::Hole {
                offset: 100,
                len: 8,
            },
        ))
        .unwrap();
        assert!(matches!(
            a.feed(chunk(
                false,
                Chunk::Hole {
                    offset: 102,
                    len: 8
                }
            )),
            Err(ProtocolError::Overlap)
        ));
        let mut a = Assembly::read(100, 10);
        assert!(matches!(
            a.feed(chunk(
                true,
                Chunk::Hole {
                    offset: 100,
                    len: 8
                }
            )),
            Err(ProtocolError::Incomplete {
                covered: 8,
                len: 10
            })
        ));
        let mut a = Assembly::read(u64::MAX - 1, 10);
        assert!(a
            .feed(chunk(
                false,
                Chunk::Hole {
                    offset: u64::MAX,
                    len: 5
                }
            ))
            .is_err());
    }

    #[test]
    fn first_error_wins_and_carries_errno() {
        let mut a = Assembly::plain("WRITE");
        let err = Chunk::Error {
            errno: 28,
            message: "full".into(),
            offset: None,
        };
        let r = a.feed(chunk(true, err)).unwrap().unwrap();
        assert_eq!(r.unwrap_err().errno(), Some(NbdErrno::ENOSPC));
    }

    proptest::proptest! {
        /// Any sequence of chunks, in any order, never panics the assembly
        /// and never yields a read result that does not cover the request.
        #[test]
        fn random_chunk_sequences_never_panic(
            start in 0u64..1024,
            len in 1u32..512,
            chunks in proptest::collection::vec(
                (0u8..5, 0u64..2048, 0u32..600, proptest::bool::ANY),
                0..12,
            ),
        ) {
            let mut a = Assembly::read(start, len);
            for (kind, offset, n, done) in chunks {
                let c = match kind {
                    0 => Chunk::Data { offset, data: Bytes::from(vec![1u8; n as usize]) },
                    1 => Chunk::Hole { offset, len: n },
                    2 => Chunk::Error { errno: 5, message: String::new(), offset: Some(offset) },
                    3 => Chunk::BlockStatus { context: 1, extents: vec![] },
                    _ => Chunk::None,
                };
                match a.feed(chunk(done, c)) {
                    Ok(None) => continue,
                    Ok(Some(Ok(Output::Read(pieces)))) => {
                        let total: u64 = pieces.iter().map(ReadChunk::len).sum();
                        proptest::prop_assert_eq!(total, u64::from(len));
                    }
                    _ => {}
                }
                break;
            }
        }
    }

    #[test]
    fn status_needs_the_selected_context_once() {
        let ext = vec![Extent {
            length: 512,
            flags: 0,
        }];
        let mut a = Assembly::status(1, Arc::from([1u32]));
        assert!(matches!(
            a.feed(chunk(
                true,
                Chunk::BlockStatus {
                    context: 2,
                    extents: ext.clone()
                }
            )),
            Err(ProtocolError::WrongContext { got: 2, .. })
        ));
        let mut a = Assembly::status(1, Arc::from([1u32]));
        let r = a
            .feed(chunk(
                true,
                Chunk::BlockStatus {
                    context: 1,
                    extents: ext.clone(),
                },
            ))
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap(), Output::Status(ext));
    }

    fn ext(length: u64, flags: u64) -> Extent {
        Extent { length, flags }
    }

    #[test]
    fn status_keeps_the_wanted_context_of_several() {
        // base:allocation (1) and a dirty bitmap (2) both selected: the
        // server reports both, in any order; the caller gets its own.
        let sel: Arc<[u32]> = Arc::from([1u32, 2]);
        let mut a = Assembly::status(2, Arc::clone(&sel));
        let dirty = vec![ext(65536, 1), ext(131072, 0)];
        assert!(matches!(
            a.feed(chunk(
                false,
                Chunk::BlockStatus {
                    context: 2,
                    extents: dirty.clone()
                }
            )),
            Ok(None)
        ));
        let r = a
            .feed(chunk(
                true,
                Chunk::BlockStatus {
                    context: 1,
                    extents: vec![ext(1 << 20, 3)],
                },
            ))
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r, Output::Status(dirty));
    }

    #[test]
    fn malformed_status_replies_are_protocol_errors() {
        let sel: Arc<[u32]> = Arc::from([1u32, 2]);
        let bs = |context, extents| Chunk::BlockStatus { context, extents };
        // Only the other context: no answer for the one asked.
        let mut a = Assembly::status(2, Arc::clone(&sel));
        assert!(matches!(
            a.feed(chunk(true, bs(1, vec![ext(512, 0)]))),
            Err(ProtocolError::BadStatus(_))
        ));
        // A context never selected.
        let mut a = Assembly::status(2, Arc::clone(&sel));
        assert!(matches!(
            a.feed(chunk(true, bs(3, vec![ext(512, 0)]))),
            Err(ProtocolError::WrongContext {
                got: 3,
                want: Some(2)
            })
        ));
        // The same context twice, even the one not asked for.
        let mut a = Assembly::status(2, Arc::clone(&sel));
        a.feed(chunk(false, bs(1, vec![ext(512, 0)]))).unwrap();
        assert!(matches!(
            a.feed(chunk(true, bs(1, vec![ext(512, 0)]))),
            Err(ProtocolError::BadStatus("two chunks for one context"))
        ));
        // No extents at all.
        let mut a = Assembly::status(2, Arc::clone(&sel));
        assert!(matches!(
            a.feed(chunk(true, bs(2, vec![]))),
            Err(ProtocolError::BadStatus(_))
        ));
        // Lengths adding up past 2^64.
        let mut a = Assembly::status(2, Arc::clone(&sel));
        assert!(matches!(
            a.feed(chunk(true, bs(2, vec![ext(u64::MAX, 1), ext(1, 0)]))),
            Err(ProtocolError::BadStatus("extents overflow"))
        ));
        // Data chunks do not answer a status request.
        let mut a = Assembly::status(2, sel);
        assert!(matches!(
            a.feed(chunk(true, Chunk::Hole { offset: 0, len: 1 })),
            Err(ProtocolError::UnexpectedChunk { .. })
        ));
    }

    proptest::proptest! {
        /// Random status chunks never panic a status assembly, and a
        /// success is always the wanted context's own extents.
        #[test]
        fn random_status_sequences_never_panic(
            chunks in proptest::collection::vec(
                (0u32..4, proptest::collection::vec((1u64..u64::MAX, 0u64..4), 0..4), proptest::bool::ANY),
                0..6,
            ),
        ) {
            let sel: Arc<[u32]> = Arc::from([1u32, 2]);
            let mut a = Assembly::status(2, sel);
            let mut sent_for_want = None;
            for (context, e, done) in chunks {
                let extents: Vec<Extent> = e.iter().map(|(l, f)| ext(*l, *f)).collect();
                if context == 2 {
                    sent_for_want = Some(extents.clone());
                }
                match a.feed(chunk(done, Chunk::BlockStatus { context, extents })) {
                    Ok(None) => continue,
                    Ok(Some(Ok(Output::Status(got)))) => {
                        proptest::prop_assert_eq!(Some(got), sent_for_want.clone());
                    }
                    Ok(Some(other)) => proptest::prop_assert!(false, "{other:?}"),
                    Err(_) => {}
                }
                break;
            }
        }
    }
}
