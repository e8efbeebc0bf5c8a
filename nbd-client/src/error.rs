//! Every way a connection or a request can fail.
//!
//! Three layers: [`HandshakeError`] (negotiation went wrong, no connection),
//! [`ProtocolError`] (the server broke the protocol during transmission; the
//! connection is dead and every pending request fails with it) and
//! [`ClientError`], what callers see, which also carries per-request server
//! errors with their errno.

use std::io;
use std::sync::Arc;

use nbd_server::proto::NbdErrno;

/// The server misbehaved during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The first 16 bytes were not `NBDMAGIC` `IHAVEOPT`.
    #[error("not an NBD newstyle server (bad greeting)")]
    BadGreeting,
    /// The server does not speak fixed newstyle.
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// An option reply did not start with the reply magic.
    #[error("option reply has bad magic {0:#018x}")]
    BadReplyMagic(u64),
    /// An option reply answered a different option.
    #[error("reply for option {got}, expected option {expected}")]
    WrongOption {
        /// Option we sent.
        expected: u32,
        /// Option the reply names.
        got: u32,
    },
    /// An option reply longer than we accept.
    #[error("option reply of {0} bytes exceeds the limit")]
    ReplyTooLarge(u32),
    /// A reply type that makes no sense for the option.
    #[error("unexpected reply type {reply:#x} to option {option}")]
    UnexpectedReply {
        /// Option.
        option: u32,
        /// Reply type.
        reply: u32,
    },
    /// A malformed `NBD_REP_INFO` or `NBD_REP_META_CONTEXT` payload.
    #[error("malformed {0} reply")]
    Malformed(&'static str),
    /// The server refused the export (or the option choosing it).
    #[error("server refused option {option} (reply {reply:#x}): {message}")]
    Refused {
        /// Option.
        option: u32,
        /// Error reply type (`NBD_REP_ERR_*`).
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// `GO` finished without `NBD_INFO_EXPORT`.
    #[error("server sent no export size")]
    NoExportInfo,
    /// Block sizes that violate the spec's constraints.
    #[error("invalid block sizes min {min} preferred {preferred} max {max}")]
    BadBlockSizes {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// An export name longer than the spec's 4096 bytes.
    #[error("export name of {0} bytes exceeds 4096")]
    NameTooLong(usize),
}

/// The server broke the protocol during transmission. Fatal for the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A reply started with an unknown (or, for the mode, forbidden) magic.
    #[error("reply has bad magic {0:#010x}")]
    BadMagic(u32),
    /// A reply for a cookie with no request in flight.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// A chunk whose payload length is impossible for its type or request.
    #[error("chunk type {kind} with payload of {len} bytes is invalid here")]
    BadChunkLength {
        /// Chunk type.
        kind: u16,
        /// Payload length.
        len: u64,
    },
    /// A known chunk type that does not belong to this request.
    #[error("chunk type {kind} is not a valid reply to {command}")]
    UnexpectedChunk {
        /// Chunk type.
        kind: u16,
        /// Command name.
        command: &'static str,
    },
    /// A non-error chunk type we do not know.
    #[error("unknown chunk type {0:#06x}")]
    UnknownChunkType(u16),
    /// A simple reply where the spec forbids one.
    #[error("simple reply not allowed for {0}")]
    UnexpectedSimpleReply(&'static str),
    /// A READ chunk outside the requested range.
    #[error("chunk {offset:#x}+{len} lies outside the request {req_offset:#x}+{req_len}")]
    ChunkOutsideRequest {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Request offset.
        req_offset: u64,
        /// Request length.
        req_len: u64,
    },
    /// READ chunks overlap (or cover more than asked).
    #[error("read reply chunks overlap")]
    Overlap,
    /// A successful READ reply that does not cover the request.
    #[error("read reply covers {covered} of {len} bytes")]
    Incomplete {
        /// Bytes covered.
        covered: u64,
        /// Bytes requested.
        len: u64,
    },
    /// A `NONE` chunk without the `DONE` flag.
    #[error("NONE chunk without the DONE flag")]
    NoneWithoutDone,
    /// An error chunk carrying errno 0.
    #[error("error chunk with errno 0")]
    ZeroErrno,
    /// An error chunk whose message length does not fit its payload.
    #[error("error chunk message length {msg_len} does not fit a payload of {len} bytes")]
    BadErrorLength {
        /// Declared message length.
        msg_len: u16,
        /// Payload length.
        len: u64,
    },
    /// Block status for a context we did not select.
    #[error("block status for context {got}, which was not selected (asked for {want:?})")]
    WrongContext {
        /// Context id received.
        got: u32,
        /// Context id negotiated.
        want: Option<u32>,
    },
    /// A block-status reply that is missing, repeated, has a zero-length
    /// extent, or extents that run past the end of the address space.
    #[error("malformed block status: {0}")]
    BadStatus(&'static str),
}

/// An error returned by the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Socket failure.
    #[error("I/O error: {0}")]
    Io(Arc<io::Error>),
    /// Negotiation failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server broke the protocol; the connection is closed.
    #[error("server broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server failed this request.
    #[error("server error {errno}: {message}")]
    Server {
        /// The errno from the reply.
        errno: NbdErrno,
        /// The server's message (empty for simple replies).
        message: String,
    },
    /// The request lies outside the export.
    #[error("request {offset:#x}+{len} lies outside the export of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// READ/WRITE larger than the negotiated maximum payload.
    #[error("request of {len} bytes exceeds the maximum payload of {max} bytes")]
    TooLarge {
        /// Length asked for.
        len: u64,
        /// Negotiated maximum.
        max: u32,
    },
    /// The export does not support this command or flag.
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    /// Block status for a metadata context the server did not select (it
    /// does not offer it, or it was not asked for in the handshake).
    #[error("the server did not select metadata context {0:?}")]
    NoMetaContext(String),
    /// The connection is closed (disconnected, or the server hung up).
    #[error("connection closed")]
    Closed,
}

impl ClientError {
    /// The server's errno, for per-request server errors.
    pub fn errno(&self) -> Option<NbdErrno> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(Arc::new(e))
    }
}
