//! Transmission replies from bytes, without I/O.
//!
//! [`decode_reply`] takes the bytes received so far and either says how
//! many bytes it needs or consumes exactly one reply (a simple reply or one
//! structured/extended chunk). Every length is checked against what its
//! type and its request allow *before* the caller buffers the payload, so a
//! hostile server can never make the client allocate more than the request
//! it is answering (bounded by the negotiated maximum payload) or a small
//! fixed bound for metadata chunks.

use bytes::{Buf, Bytes, BytesMut};
use nbd_server::proto::consts::{
    reply_flags, reply_type, EXTENDED_REPLY_MAGIC, MAX_EXTENTS, MAX_STRING_LEN, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use nbd_server::proto::ReplyMode;

use crate::error::ProtocolError;

/// Simple reply header: magic, error, cookie.
pub const SIMPLE_HEADER_LEN: usize = 16;
/// Structured chunk header: magic, flags, type, cookie, length.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Extended chunk header: magic, flags, type, cookie, offset, length.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Largest error chunk: errno, message length, message, offset.
pub const MAX_ERROR_PAYLOAD: u64 = 6 + MAX_STRING_LEN as u64 + 8;
/// Largest block-status chunk we buffer (the spec's 2^20 extents, 64-bit).
pub const MAX_STATUS_PAYLOAD: u64 = 8 + 16 * MAX_EXTENTS as u64;

/// What the request a reply answers lets the decoder accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A READ of `len` bytes: data and hole chunks up to `len` bytes.
    Read {
        /// Request length.
        len: u32,
    },
    /// A BLOCK_STATUS: status chunks.
    BlockStatus,
    /// Anything else: no payload except errors.
    Other,
}

/// `qemu:dirty-bitmap:NAME` status bit: the extent is dirty.
pub const DIRTY: u64 = 1;

/// One extent of a block-status reply, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Status bits of the context (`base:allocation`: HOLE = 1, ZERO = 2).
    pub flags: u64,
}

impl Extent {
    /// `base:allocation`: not allocated.
    pub fn is_hole(&self) -> bool {
        self.flags & u64::from(nbd_server::proto::consts::state::HOLE) != 0
    }

    /// `base:allocation`: reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & u64::from(nbd_server::proto::consts::state::ZERO) != 0
    }

    /// `qemu:dirty-bitmap:NAME`: written since the bitmap was last
    /// cleared (bit 0, the only bit qemu defines for bitmaps).
    pub fn is_dirty(&self) -> bool {
        self.flags & DIRTY != 0
    }
}

/// The payload of one structured chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `OFFSET_DATA`.
    Data {
        /// Absolute offset.
        offset: u64,
        /// The bytes (at least one).
        data: Bytes,
    },
    /// `OFFSET_HOLE`.
    Hole {
        /// Absolute offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `BLOCK_STATUS` or `BLOCK_STATUS_EXT`.
    BlockStatus {
        /// Context id.
        context: u32,
        /// Extents, in order.
        extents: Vec<Extent>,
    },
    /// `ERROR`, `ERROR_OFFSET` or an unknown error type.
    Error {
        /// Non-zero errno.
        errno: u32,
        /// Message (lossily decoded).
        message: String,
        /// Offset, for `ERROR_OFFSET`.
        offset: Option<u64>,
    },
    /// `NONE`.
    None,
}

/// One decoded reply unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; `data` only for a successful READ in simple mode.
    Simple {
        /// Cookie.
        cookie: u64,
        /// Errno (0 = success).
        errno: u32,
        /// READ data.
        data: Option<Bytes>,
    },
    /// One chunk of a structured reply.
    Chunk {
        /// Cookie.
        cookie: u64,
        /// Last chunk of this reply.
        done: bool,
        /// Payload.
        chunk: Chunk,
    },
}

impl Reply {
    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Result of one decode attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A complete reply was consumed from the buffer.
    Reply(Reply),
    /// The buffer must hold at least this many bytes (header plus a payload
    /// already validated as acceptable) before decoding can go on.
    Need(usize),
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decode one reply from the start of `buf`, consuming it on success.
/// `expect(cookie)` says what the request with that cookie accepts (`None`:
/// no such request in flight).
pub fn decode_reply(
    buf: &mut BytesMut,
    mode: ReplyMode,
    expect: impl FnOnce(u64) -> Option<Expect>,
) -> Result<Decoded, ProtocolError> {
    if buf.len() < 4 {
        return Ok(Decoded::Need(4));
    }
    let magic = be32(&buf[0..4]);
    match (magic, mode) {
        (SIMPLE_REPLY_MAGIC, ReplyMode::Simple | ReplyMode::Structured) => {
            decode_simple(buf, mode, expect)
        }
        (STRUCTURED_REPLY_MAGIC, ReplyMode::Structured) => decode_chunk(buf, false, expect),
        (EXTENDED_REPLY_MAGIC, ReplyMode::Extended) => decode_chunk(buf, true, expect),
        _ => Err(ProtocolError::BadMagic(magic)),
    }
}

fn decode_simple(
    buf: &mut BytesMut,
    mode: ReplyMode,
    expect: impl FnOnce(u64) -> Option<Expect>,
) -> Result<Decoded, ProtocolError> {
    if buf.len() < SIMPLE_HEADER_LEN {
        return Ok(Decoded::Need(SIMPLE_HEADER_LEN));
    }
    let errno = be32(&buf[4..8]);
    let cookie = be64(&buf[8..16]);
    let want = expect(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?;
    let data_len = match (want, errno) {
        (_, e) if e != 0 => 0,
        (Expect::Read { len }, _) if mode == ReplyMode::Simple => len as usize,
        (Expect::Read { .. }, _) => return Err(ProtocolError::UnexpectedSimpleReply("READ")),
        (Expect::BlockStatus, _) => {
            return Err(ProtocolError::UnexpectedSimpleReply("BLOCK_STATUS"))
        }
        (Expect::Other, _) => 0,
    };
    // data_len ≤ the request's length, itself ≤ the negotiated maximum.
    let total = SIMPLE_HEADER_LEN + data_len;
    if buf.len() < total {
        return Ok(Decoded::Need(total));
    }
    buf.advance(SIMPLE_HEADER_LEN);
    let data =
        matches!(want, Expect::Read { .. } if errno == 0).then(|| buf.split_to(data_len).freeze());
    Ok(Decoded::Reply(Reply::Simple {
        cookie,
        errno,
        data,
    }))
}

/// Whether a payload of `len` bytes is acceptable for chunk `kind`.
fn payload_ok(kind: u16, len: u64, extended: bool, want: Expect) -> Result<(), ProtocolError> {
    let bad = || ProtocolError::BadChunkLength { kind, len };
    let unexpected = |command| ProtocolError::UnexpectedChunk { kind, command };
    let command = match want {
        Expect::Read { .. } => "READ",
        Expect::BlockStatus => "BLOCK_STATUS",
        Expect::Other => "a command without reply payload",
    };
    match kind {
        reply_type::NONE => (len == 0).then_some(()).ok_or_else(bad),
        reply_type::OFFSET_DATA => match want {
            Expect::Read { len: req } if len > 8 && len <= 8 + u64::from(req) => Ok(()),
            Expect::Read { .. } => Err(bad()),
            _ => Err(unexpected(command)),
        },
        reply_type::OFFSET_HOLE => match want {
            Expect::Read { .. } if len == 12 => Ok(()),
            Expect::Read { .. } => Err(bad()),
            _ => Err(unexpected(command)),
        },
        reply_type::BLOCK_STATUS if !extended => match want {
            Expect::BlockStatus if len >= 12 && (len - 4) % 8 == 0 && len <= MAX_STATUS_PAYLOAD => {
                Ok(())
            }
            Expect::BlockStatus => Err(bad()),
            _ => Err(unexpected(command)),
        },
        reply_type::BLOCK_STATUS_EXT if extended => match want {
            Expect::BlockStatus
                if len >= 24 && (len - 8) % 16 == 0 && len <= MAX_STATUS_PAYLOAD =>
            {
                Ok(())
            }
            Expect::BlockStatus => Err(bad()),
            _ => Err(unexpected(command)),
        },
        reply_type::BLOCK_STATUS | reply_type::BLOCK_STATUS_EXT => Err(unexpected(command)),
        k if k & (1 << 15) != 0 => (6..=MAX_ERROR_PAYLOAD)
            .contains(&len)
            .then_some(())
            .ok_or_else(bad),
        k => Err(ProtocolError::UnknownChunkType(k)),
    }
}

fn decode_chunk(
    buf: &mut BytesMut,
    extended: bool,
    expect: impl FnOnce(u64) -> Option<Expect>,
) -> Result<Decoded, ProtocolError> {
    let header_len = if extended {
        EXTENDED_HEADER_LEN
    } else {
        STRUCTURED_HEADER_LEN
    };
    if buf.len() < header_len {
        return Ok(Decoded::Need(header_len));
    }
    let flags = be16(&buf[4..6]);
    let kind = be16(&buf[6..8]);
    let cookie = be64(&buf[8..16]);
    let len = if extended {
        be64(&buf[24..32])
    } else {
        u64::from(be32(&buf[16..20]))
    };
    let want = expect(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?;
    payload_ok(kind, len, extended, want)?;
    let done = flags & reply_flags::DONE != 0;
    if kind == reply_type::NONE && !done {
        return Err(ProtocolError::NoneWithoutDone);
    }
    // payload_ok bounded len by the request or a small constant.
    let total = header_len + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Need(total));
    }
    buf.advance(header_len);
    let payload = buf.split_to(len as usize).freeze();
    let chunk = parse_chunk(kind, payload, extended)?;
    Ok(Decoded::Reply(Reply::Chunk {
        cookie,
        done,
        chunk,
    }))
}

/// Parse a payload whose length `payload_ok` accepted.
fn parse_chunk(kind: u16, mut p: Bytes, extended: bool) -> Result<Chunk, ProtocolError> {
    let len = p.len() as u64;
    Ok(match kind {
        reply_type::NONE => Chunk::None,
        reply_type::OFFSET_DATA => {
            let offset = p.get_u64();
            Chunk::Data { offset, data: p }
        }
        reply_type::OFFSET_HOLE => Chunk::Hole {
            offset: p.get_u64(),
            len: p.get_u32(),
        },
        reply_type::BLOCK_STATUS | reply_type::BLOCK_STATUS_EXT => {
            let context = p.get_u32();
            let mut extents = Vec::with_capacity(p.len() / if extended { 16 } else { 8 });
            if extended {
                let count = u64::from(p.get_u32());
                if count != (len - 8) / 16 {
                    return Err(ProtocolError::BadStatus(
                        "extent count does not match payload",
                    ));
                }
                while p.has_remaining() {
                    extents.push(Extent {
                        length: p.get_u64(),
                        flags: p.get_u64(),
                    });
                }
            } else {
                while p.has_remaining() {
                    extents.push(Extent {
                        length: u64::from(p.get_u32()),
                        flags: u64::from(p.get_u32()),
                    });
                }
            }
            if extents.iter().any(|e| e.length == 0) {
                return Err(ProtocolError::BadStatus("zero-length extent"));
            }
            Chunk::BlockStatus { context, extents }
        }
        _ => {
            // Any error type, known or not: errno, message length, message.
            let errno = p.get_u32();
            let msg_len = p.get_u16();
            if errno == 0 {
                return Err(ProtocolError::ZeroErrno);
            }
            let bad = ProtocolError::BadErrorLength { msg_len, len };
            let rest = p.len();
            let msg_end = usize::from(msg_len);
            let offset = match kind {
                reply_type::ERROR if rest == msg_end => None,
                reply_type::ERROR_OFFSET if rest == msg_end + 8 => {
                    Some(be64(&p[msg_end..msg_end + 8]))
                }
                reply_type::ERROR | reply_type::ERROR_OFFSET => return Err(bad),
                _ if rest >= msg_end => None,
                _ => return Err(bad),
            };
            let message = String::from_utf8_lossy(&p[..msg_end]).into_owned();
            Chunk::Error {
                errno,
                message,
                offset,
            }
        }
    })
}

#[cfg(test)]
#[path = "reply_tests.rs"]
mod tests;
