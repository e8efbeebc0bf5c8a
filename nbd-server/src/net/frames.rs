//! Turning command outcomes into reply frames (header and payload segments).
//!
//! Pure: no sockets. Payload bytes are referenced, never copied; runs of
//! zeroes that must be sent as data come from one static zero page; file
//! pages parked in a pipe stay there until the socket takes them.

use bytes::{Bytes, BytesMut};

use crate::backend::{ReadChunk, SocketChunk};
use crate::dispatch::Outcome;
use crate::proto::{ReplyEncoder, ReplyMode, ReplyTo};
use crate::splice::Piped;

/// One piece of a reply on the wire.
#[derive(Debug)]
pub(crate) enum Segment {
    /// Bytes in memory.
    Bytes(Bytes),
    /// File pages in a pipe, spliced into the socket.
    Piped(Piped),
}

impl Segment {
    /// Bytes left to send.
    pub fn len(&self) -> usize {
        match self {
            Segment::Bytes(b) => b.len(),
            Segment::Piped(p) => p.len(),
        }
    }
}

/// One reply, ready to write: segments in wire order.
#[derive(Debug, Default)]
pub(crate) struct Frame {
    pub segments: Vec<Segment>,
}

impl Frame {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.segments.iter().map(Segment::len).sum()
    }
}

fn push_zeroes(segments: &mut Vec<Segment>, n: u64) {
    segments.extend(crate::zeroes::zero_segments(n).map(Segment::Bytes));
}

/// A data chunk's payload as a segment (zero chunks are not data).
fn data_segment(c: SocketChunk) -> Option<Segment> {
    match c {
        SocketChunk::Read(ReadChunk::Data(d)) => Some(Segment::Bytes(d)),
        SocketChunk::Piped(p) => Some(Segment::Piped(p)),
        SocketChunk::Read(ReadChunk::Zero(_)) => None,
    }
}

/// Build the frame answering a request at `to` with `outcome`. `df` is the
/// READ don't-fragment flag.
pub(crate) fn encode(enc: &ReplyEncoder, to: ReplyTo, df: bool, outcome: Outcome) -> Frame {
    let mut head = BytesMut::with_capacity(64);
    match outcome {
        Outcome::Done => enc.ok(&mut head, to),
        Outcome::Failed { errno, message } => enc.error(&mut head, to, errno, &message),
        Outcome::Status(lists) => {
            let n = lists.len();
            for (i, (ctx, descs)) in lists.iter().enumerate() {
                enc.block_status(&mut head, to, ctx.id(), descs, i + 1 == n);
            }
        }
        Outcome::Read(chunks) => return encode_read(enc, to, df, chunks),
    }
    Frame {
        segments: vec![Segment::Bytes(head.freeze())],
    }
}

fn is_zero(c: &SocketChunk) -> bool {
    matches!(c, SocketChunk::Read(ReadChunk::Zero(_)))
}

fn encode_read(enc: &ReplyEncoder, to: ReplyTo, df: bool, chunks: Vec<SocketChunk>) -> Frame {
    let total: u64 = chunks.iter().map(SocketChunk::len).sum();
    let mut segments = Vec::with_capacity(chunks.len() * 2 + 1);
    let mut head = BytesMut::with_capacity(32);
    let all_zero = chunks.iter().all(is_zero);
    let single_data = chunks.len() == 1 && !is_zero(&chunks[0]);
    // total ≤ the 32 MiB maximum payload (validated), so it fits u32.
    let total32 = total as u32;

    if enc.mode() == ReplyMode::Simple || (df && !all_zero && !single_data) {
        // One contiguous data payload, holes expanded to zero bytes.
        enc.read_data(&mut head, to, to.offset, total32, true);
        segments.push(Segment::Bytes(head.split().freeze()));
        for c in chunks {
            let n = c.len();
            match data_segment(c) {
                Some(d) => segments.push(d),
                None => push_zeroes(&mut segments, n),
            }
        }
    } else if total == 0 {
        enc.done(&mut head, to);
        segments.push(Segment::Bytes(head.freeze()));
    } else if all_zero {
        // One hole chunk for the whole request (also satisfies DF).
        enc.read_hole(&mut head, to, to.offset, total32, true);
        segments.push(Segment::Bytes(head.freeze()));
    } else {
        let n = chunks.len();
        let mut pos = to.offset;
        for (i, c) in chunks.into_iter().enumerate() {
            let last = i + 1 == n;
            // A chunk is at most the request, ≤ 32 MiB.
            let len = c.len();
            match data_segment(c) {
                Some(d) => {
                    enc.read_data(&mut head, to, pos, len as u32, last);
                    segments.push(Segment::Bytes(head.split().freeze()));
                    segments.push(d);
                }
                None => {
                    enc.read_hole(&mut head, to, pos, len as u32, last);
                    segments.push(Segment::Bytes(head.split().freeze()));
                }
            }
            pos += len;
        }
    }
    Frame { segments }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::NbdErrno;

    const TO: ReplyTo = ReplyTo {
        cookie: 1,
        offset: 4096,
    };

    fn flat(f: &Frame) -> Vec<u8> {
        f.segments
            .iter()
            .flat_map(|s| match s {
                Segment::Bytes(b) => b.iter().copied(),
                Segment::Piped(_) => panic!("no pipes in these tests"),
            })
            .collect()
    }

    fn mixed() -> Vec<SocketChunk> {
        reads(vec![
            ReadChunk::Data(Bytes::from_static(&[1; 512])),
            ReadChunk::Zero(1024),
        ])
    }

    fn reads(chunks: Vec<ReadChunk>) -> Vec<SocketChunk> {
        chunks.into_iter().map(SocketChunk::Read).collect()
    }

    #[test]
    fn simple_read_expands_holes() {
        let f = encode(
            &ReplyEncoder::new(ReplyMode::Simple),
            TO,
            false,
            Outcome::Read(mixed()),
        );
        let b = flat(&f);
        assert_eq!(b.len(), 16 + 1536);
        assert!(b[16..528].iter().all(|x| *x == 1));
        assert!(b[528..].iter().all(|x| *x == 0));
    }

    #[test]
    fn structured_read_sends_data_then_hole_with_done_last() {
        let f = encode(
            &ReplyEncoder::new(ReplyMode::Structured),
            TO,
            false,
            Outcome::Read(mixed()),
        );
        let b = flat(&f);
        // data chunk: 20 header + 8 offset + 512 data; hole chunk: 20 + 12
        assert_eq!(b.len(), 28 + 512 + 32);
        assert_eq!(&b[4..6], &[0, 0], "first chunk not DONE");
        let hole = &b[540..];
        assert_eq!(&hole[4..8], &[0, 1, 0, 2], "hole chunk is last and DONE");
        assert_eq!(&hole[20..28], &(4096u64 + 512).to_be_bytes());
    }

    #[test]
    fn df_read_with_holes_is_one_data_chunk() {
        let f = encode(
            &ReplyEncoder::new(ReplyMode::Structured),
            TO,
            true,
            Outcome::Read(mixed()),
        );
        let b = flat(&f);
        assert_eq!(b.len(), 28 + 1536);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
    }

    #[test]
    fn all_hole_read_is_one_hole_chunk() {
        let chunks = vec![ReadChunk::Zero(4096), ReadChunk::Zero(4096)];
        let f = encode(
            &ReplyEncoder::new(ReplyMode::Extended),
            TO,
            true,
            Outcome::Read(reads(chunks)),
        );
        let b = flat(&f);
        assert_eq!(b.len(), 32 + 12);
        assert_eq!(&b[32..], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0]);
    }

    #[test]
    fn empty_read_is_a_done_chunk() {
        let f = encode(
            &ReplyEncoder::new(ReplyMode::Structured),
            TO,
            false,
            Outcome::Read(vec![]),
        );
        assert_eq!(f.len(), 20);
    }

    #[test]
    fn read_error_in_structured_mode_is_an_error_chunk() {
        let out = Outcome::Failed {
            errno: NbdErrno::EIO,
            message: "x".into(),
        };
        let f = encode(&ReplyEncoder::new(ReplyMode::Structured), TO, false, out);
        assert_eq!(&flat(&f)[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]);
    }

    #[test]
    fn huge_hole_in_simple_mode_uses_several_zero_segments() {
        let f = encode(
            &ReplyEncoder::new(ReplyMode::Simple),
            TO,
            false,
            Outcome::Read(reads(vec![ReadChunk::Zero(3 << 20)])),
        );
        assert_eq!(f.len(), 16 + (3 << 20));
        assert_eq!(f.segments.len(), 4);
    }
}
