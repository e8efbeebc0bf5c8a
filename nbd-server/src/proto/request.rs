//! Transmission-phase requests: header decoding and validation.
//!
//! Decoding only checks framing (magic, payload size): a bad frame is a
//! protocol violation and ends the connection. Validation then turns a
//! well-framed header into a [`Command`] or the errno the spec asks for; a
//! bad request gets an error reply and the connection goes on. Once a
//! `Command` exists, its range lies inside the export, so backends never
//! see out-of-range requests (nbdkit's `validate_request` split).

use super::consts::{
    cmd, cmd_flags, tx_flags, COMPACT_REQUEST_LEN, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC,
    MAX_PAYLOAD, REQUEST_MAGIC,
};
use super::errno::NbdErrno;

/// A decoded request header (compact or extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length, or payload length (see [`RequestHeader::payload_len`]).
    pub length: u64,
}

/// A framing violation: the connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The request did not start with the expected magic.
    #[error("request has bad magic {0:#010x}")]
    BadMagic(u32),
    /// A payload larger than we will ever buffer (spec: hard disconnect allowed).
    #[error("request payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(u64),
}

impl RequestHeader {
    /// Size of the header on the wire for the negotiated mode.
    pub fn wire_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        }
    }

    /// Decode a header from the start of `buf`. `Ok(None)` means more bytes
    /// are needed.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Option<RequestHeader>, FrameError> {
        let need = Self::wire_len(extended);
        if buf.len() < need {
            return Ok(None);
        }
        let magic = be_u32(&buf[0..4]);
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(FrameError::BadMagic(magic));
        }
        let length = if extended {
            be_u64(&buf[24..32])
        } else {
            u64::from(be_u32(&buf[24..28]))
        };
        let header = RequestHeader {
            flags: be_u16(&buf[4..6]),
            kind: be_u16(&buf[6..8]),
            cookie: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            length,
        };
        let payload = header.payload_len(extended);
        if payload > u64::from(MAX_PAYLOAD) {
            return Err(FrameError::PayloadTooLarge(payload));
        }
        Ok(Some(header))
    }

    /// Bytes of payload that follow this header on the wire.
    ///
    /// A WRITE always carries `length` bytes. In extended mode the spec asks
    /// clients to flag it with `PAYLOAD_LEN`, but qemu (8.2 through 10.x)
    /// does not, and its own server reads the payload either way; so do we.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.kind == cmd::WRITE || (extended && self.flags & cmd_flags::PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }

    /// Encode (used by tests, fuzz round-trips and the test client).
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        if extended {
            out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            // Compact headers carry 32 bits; callers only encode what fits.
            out.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
    }
}

/// What validation needs to know about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Export size.
    pub size: u64,
    /// Transmission flags as sent.
    pub flags: u16,
    /// Structured replies (or extended headers) negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
    /// At least one metadata context selected.
    pub has_contexts: bool,
}

impl Session {
    fn read_only(&self) -> bool {
        self.flags & tx_flags::READ_ONLY != 0
    }
}

/// A validated request. Every range lies inside the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes; `df` asks for a single content chunk.
    Read {
        /// Offset.
        offset: u64,
        /// Length (≤ the maximum payload).
        len: u32,
        /// Don't fragment.
        df: bool,
    },
    /// Write the payload that follows the header.
    Write {
        /// Offset.
        offset: u64,
        /// Payload length.
        len: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Soft disconnect.
    Disconnect,
    /// Persist everything written so far.
    Flush,
    /// Discard hint.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Persist before replying.
        fua: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Make a range read as zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Persist before replying.
        fua: bool,
        /// Must not deallocate.
        no_hole: bool,
        /// Fail with ENOTSUP unless this is fast.
        fast: bool,
    },
    /// Report allocation status.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length of interest.
        len: u64,
        /// Only one extent per context.
        req_one: bool,
    },
}

/// Validate a decoded header against the session.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, NbdErrno> {
    use cmd_flags::{DF, FAST_ZERO, FUA, NO_HOLE, PAYLOAD_LEN, REQ_ONE};
    // FUA is accepted on every command: the spec notes clients that send it
    // on reads, and ignoring it there is harmless.
    let allowed = match h.kind {
        cmd::READ => FUA | if s.structured { DF } else { 0 },
        cmd::WRITE => FUA | if s.extended { PAYLOAD_LEN } else { 0 },
        cmd::DISC | cmd::FLUSH | cmd::TRIM | cmd::CACHE => FUA,
        cmd::WRITE_ZEROES => {
            FUA | NO_HOLE
                | if s.flags & tx_flags::SEND_FAST_ZERO != 0 {
                    FAST_ZERO
                } else {
                    0
                }
        }
        cmd::BLOCK_STATUS => FUA | REQ_ONE,
        _ => return Err(NbdErrno::EINVAL),
    };
    if h.flags & !allowed != 0 {
        return Err(NbdErrno::EINVAL);
    }
    let fua = h.flags & FUA != 0;
    let end = h.offset.checked_add(h.length);
    let in_range = matches!(end, Some(e) if e <= s.size);
    match h.kind {
        cmd::READ => {
            if !in_range {
                return Err(NbdErrno::EINVAL);
            }
            let len = u32::try_from(h.length)
                .ok()
                .filter(|l| *l <= MAX_PAYLOAD)
                .ok_or(NbdErrno::EOVERFLOW)?;
            Ok(Command::Read {
                offset: h.offset,
                len,
                df: h.flags & DF != 0,
            })
        }
        cmd::WRITE => {
            if s.read_only() {
                return Err(NbdErrno::EPERM);
            }
            if !in_range {
                return Err(NbdErrno::ENOSPC);
            }
            // decode() already bounded the payload by MAX_PAYLOAD.
            let len = u32::try_from(h.length).map_err(|_| NbdErrno::EINVAL)?;
            Ok(Command::Write {
                offset: h.offset,
                len,
                fua,
            })
        }
        cmd::DISC => Ok(Command::Disconnect),
        cmd::FLUSH => {
            if h.offset != 0 || h.length != 0 {
                return Err(NbdErrno::EINVAL);
            }
            Ok(Command::Flush)
        }
        cmd::TRIM => {
            if s.read_only() {
                return Err(NbdErrno::EPERM);
            }
            if !in_range {
                return Err(NbdErrno::EINVAL);
            }
            Ok(Command::Trim {
                offset: h.offset,
                len: h.length,
                fua,
            })
        }
        cmd::CACHE => {
            if !in_range {
                return Err(NbdErrno::EINVAL);
            }
            Ok(Command::Cache {
                offset: h.offset,
                len: h.length,
            })
        }
        cmd::WRITE_ZEROES => {
            if s.read_only() {
                return Err(NbdErrno::EPERM);
            }
            if !in_range {
                return Err(NbdErrno::ENOSPC);
            }
            Ok(Command::WriteZeroes {
                offset: h.offset,
                len: h.length,
                fua,
                no_hole: h.flags & NO_HOLE != 0,
                fast: h.flags & FAST_ZERO != 0,
            })
        }
        cmd::BLOCK_STATUS => {
            if !s.structured || !s.has_contexts {
                return Err(NbdErrno::EINVAL);
            }
            if !in_range || h.length == 0 {
                return Err(NbdErrno::EINVAL);
            }
            Ok(Command::BlockStatus {
                offset: h.offset,
                len: h.length,
                req_one: h.flags & REQ_ONE != 0,
            })
        }
        // Unknown kinds returned above.
        _ => Err(NbdErrno::EINVAL),
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
