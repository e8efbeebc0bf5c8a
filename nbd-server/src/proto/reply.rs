//! Transmission-phase replies, encoded into byte buffers.
//!
//! Which header a reply uses depends on negotiation, so encoders go through
//! [`ReplyMode`]: simple replies when neither structured replies nor
//! extended headers were negotiated, 20-byte structured chunks, or 32-byte
//! extended chunks. Data payloads are not copied here: the encoder writes a
//! header and the caller sends the payload bytes right after it.

use bytes::{BufMut, BytesMut};

use super::consts::{
    reply_flags, reply_type, EXTENDED_REPLY_MAGIC, MAX_STRING_LEN, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use super::errno::NbdErrno;
use super::option::truncate_utf8;

/// Reply framing chosen during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// 16-byte simple replies only.
    Simple,
    /// Structured reply chunks (simple replies still allowed for non-reads).
    Structured,
    /// Extended 32-byte chunks; simple replies forbidden.
    Extended,
}

impl ReplyMode {
    /// The mode matching a negotiation outcome.
    pub fn from_negotiation(structured: bool, extended: bool) -> Self {
        if extended {
            ReplyMode::Extended
        } else if structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }
}

/// One extent of a block-status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusDescriptor {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Context-defined status bits.
    pub status: u32,
}

/// Identifies the request a reply belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (echoed in extended headers).
    pub offset: u64,
}

/// Encodes replies for one connection.
#[derive(Debug, Clone, Copy)]
pub struct ReplyEncoder {
    mode: ReplyMode,
}

impl ReplyEncoder {
    /// An encoder for the negotiated mode.
    pub fn new(mode: ReplyMode) -> Self {
        ReplyEncoder { mode }
    }

    /// The negotiated mode.
    pub fn mode(&self) -> ReplyMode {
        self.mode
    }

    fn simple(out: &mut BytesMut, to: ReplyTo, error: u32) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(error);
        out.put_u64(to.cookie);
    }

    /// Chunk header. Payload lengths we produce are bounded by the maximum
    /// payload plus a small fixed overhead, so `len` always fits 32 bits in
    /// structured mode.
    fn chunk(&self, out: &mut BytesMut, to: ReplyTo, flags: u16, kind: u16, len: u64) {
        match self.mode {
            ReplyMode::Extended => {
                out.put_u32(EXTENDED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(kind);
                out.put_u64(to.cookie);
                out.put_u64(to.offset);
                out.put_u64(len);
            }
            ReplyMode::Structured | ReplyMode::Simple => {
                debug_assert!(self.mode == ReplyMode::Structured);
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(kind);
                out.put_u64(to.cookie);
                out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
            }
        }
    }

    /// Success with no payload (any command but a structured READ with data).
    pub fn ok(&self, out: &mut BytesMut, to: ReplyTo) {
        match self.mode {
            ReplyMode::Simple | ReplyMode::Structured => Self::simple(out, to, 0),
            ReplyMode::Extended => {
                self.chunk(out, to, reply_flags::DONE, reply_type::NONE, 0);
            }
        }
    }

    /// A failed request. `is_read` matters in structured mode, where a READ
    /// must never get a simple reply.
    pub fn error(&self, out: &mut BytesMut, to: ReplyTo, errno: NbdErrno, message: &str) {
        match self.mode {
            ReplyMode::Simple => Self::simple(out, to, errno.0),
            ReplyMode::Structured | ReplyMode::Extended => {
                let msg = truncate_utf8(message, MAX_STRING_LEN);
                let len = 6 + msg.len() as u64;
                self.chunk(out, to, reply_flags::DONE, reply_type::ERROR, len);
                out.put_u32(errno.0);
                out.put_u16(msg.len() as u16);
                out.put_slice(msg.as_bytes());
            }
        }
    }

    /// Header for READ data of `data_len` bytes at `data_offset`; the caller
    /// sends exactly `data_len` payload bytes next. In simple mode this is
    /// the whole reply header, so it must cover the entire request.
    pub fn read_data(
        &self,
        out: &mut BytesMut,
        to: ReplyTo,
        data_offset: u64,
        data_len: u32,
        done: bool,
    ) {
        match self.mode {
            ReplyMode::Simple => Self::simple(out, to, 0),
            ReplyMode::Structured | ReplyMode::Extended => {
                let flags = if done { reply_flags::DONE } else { 0 };
                let len = 8 + u64::from(data_len);
                self.chunk(out, to, flags, reply_type::OFFSET_DATA, len);
                out.put_u64(data_offset);
            }
        }
    }

    /// A hole chunk (structured modes only; simple mode sends zeroes instead).
    pub fn read_hole(
        &self,
        out: &mut BytesMut,
        to: ReplyTo,
        hole_offset: u64,
        hole_len: u32,
        done: bool,
    ) {
        debug_assert!(self.mode != ReplyMode::Simple);
        let flags = if done { reply_flags::DONE } else { 0 };
        self.chunk(out, to, flags, reply_type::OFFSET_HOLE, 12);
        out.put_u64(hole_offset);
        out.put_u32(hole_len);
    }

    /// The final empty chunk of a structured reply.
    pub fn done(&self, out: &mut BytesMut, to: ReplyTo) {
        debug_assert!(self.mode != ReplyMode::Simple);
        self.chunk(out, to, reply_flags::DONE, reply_type::NONE, 0);
    }

    /// One block-status chunk for context `context_id`. Descriptor lengths
    /// are clamped to 32 bits (minus a sector) in structured mode; callers
    /// pass at most [`MAX_EXTENTS`](super::consts::MAX_EXTENTS) descriptors.
    pub fn block_status(
        &self,
        out: &mut BytesMut,
        to: ReplyTo,
        context_id: u32,
        extents: &[StatusDescriptor],
        done: bool,
    ) {
        let flags = if done { reply_flags::DONE } else { 0 };
        let n = extents.len() as u64;
        match self.mode {
            ReplyMode::Extended => {
                self.chunk(out, to, flags, reply_type::BLOCK_STATUS_EXT, 8 + 16 * n);
                out.put_u32(context_id);
                out.put_u32(extents.len() as u32);
                for e in extents {
                    out.put_u64(e.length);
                    out.put_u64(u64::from(e.status));
                }
            }
            ReplyMode::Structured | ReplyMode::Simple => {
                debug_assert!(self.mode == ReplyMode::Structured);
                self.chunk(out, to, flags, reply_type::BLOCK_STATUS, 4 + 8 * n);
                out.put_u32(context_id);
                for e in extents {
                    out.put_u32(clamp_extent_len(e.length));
                    out.put_u32(e.status);
                }
            }
        }
    }
}

/// Largest extent length expressible in a 32-bit descriptor, kept a
/// multiple of 512 as the spec recommends.
pub const MAX_COMPACT_EXTENT: u32 = !511;

fn clamp_extent_len(len: u64) -> u32 {
    u32::try_from(len).map_or(MAX_COMPACT_EXTENT, |l| l.min(MAX_COMPACT_EXTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: ReplyTo = ReplyTo {
        cookie: 0x1122334455667788,
        offset: 0x1000,
    };

    #[test]
    fn simple_ok_layout() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Simple).ok(&mut out, TO);
        assert_eq!(
            &out[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
    }

    #[test]
    fn simple_error_carries_errno() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Simple).error(&mut out, TO, NbdErrno::ENOSPC, "full");
        assert_eq!(out.len(), 16);
        assert_eq!(&out[4..8], &[0, 0, 0, 28]);
    }

    #[test]
    fn structured_ok_is_a_simple_reply() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Structured).ok(&mut out, TO);
        assert_eq!(&out[..4], &[0x67, 0x44, 0x66, 0x98]);
    }

    #[test]
    fn extended_ok_is_a_none_chunk_with_offset() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Extended).ok(&mut out, TO);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[..8], &[0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0]);
        assert_eq!(&out[16..24], &0x1000u64.to_be_bytes());
        assert_eq!(&out[24..32], &[0; 8]);
    }

    #[test]
    fn structured_error_chunk_layout() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Structured).error(&mut out, TO, NbdErrno::EINVAL, "bad");
        assert_eq!(&out[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 0x01]);
        assert_eq!(&out[16..20], &[0, 0, 0, 9]);
        assert_eq!(&out[20..], &[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
    }

    #[test]
    fn read_data_header_counts_offset_field() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Structured).read_data(&mut out, TO, 0x2000, 512, true);
        assert_eq!(&out[4..8], &[0, 1, 0, 1]);
        assert_eq!(&out[16..20], &(520u32).to_be_bytes());
        assert_eq!(&out[20..28], &0x2000u64.to_be_bytes());
    }

    #[test]
    fn hole_chunk_layout() {
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Structured).read_hole(&mut out, TO, 0x3000, 4096, false);
        assert_eq!(&out[4..8], &[0, 0, 0, 2]);
        assert_eq!(&out[16..20], &[0, 0, 0, 12]);
        assert_eq!(&out[20..], &[0, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 0x10, 0]);
    }

    #[test]
    fn block_status_compact_and_extended() {
        let ext = [StatusDescriptor {
            length: 1 << 33,
            status: 3,
        }];
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Structured).block_status(&mut out, TO, 1, &ext, true);
        assert_eq!(&out[16..20], &[0, 0, 0, 12]);
        assert_eq!(&out[24..28], &MAX_COMPACT_EXTENT.to_be_bytes());
        let mut out = BytesMut::new();
        ReplyEncoder::new(ReplyMode::Extended).block_status(&mut out, TO, 1, &ext, true);
        assert_eq!(&out[6..8], &[0, 6]);
        assert_eq!(&out[24..32], &24u64.to_be_bytes());
        assert_eq!(&out[32..40], &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(&out[40..48], &(1u64 << 33).to_be_bytes());
        assert_eq!(&out[48..56], &3u64.to_be_bytes());
    }
}
