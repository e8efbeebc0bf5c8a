//! The decoder against the server's own encoder (one definition of the
//! wire format), hostile lengths, and random bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use nbd_server::proto::{NbdErrno, ReplyEncoder, ReplyTo, StatusDescriptor};
use proptest::prelude::*;

const TO: ReplyTo = ReplyTo {
    cookie: 7,
    offset: 4096,
};

fn decode_all(bytes: &[u8], mode: ReplyMode, want: Expect) -> Result<Vec<Reply>, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while !buf.is_empty() {
        match decode_reply(&mut buf, mode, |c| (c == 7).then_some(want))? {
            Decoded::Reply(r) => out.push(r),
            Decoded::Need(n) => {
                assert!(n > buf.len());
                panic!("incomplete: need {n}, have {}", buf.len());
            }
        }
    }
    Ok(out)
}

#[test]
fn structured_read_chunks_round_trip() {
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let enc = ReplyEncoder::new(mode);
        let mut out = BytesMut::new();
        enc.read_data(&mut out, TO, 4096, 3, false);
        out.extend_from_slice(b"abc");
        enc.read_hole(&mut out, TO, 4099, 509, false);
        enc.done(&mut out, TO);
        let r = decode_all(&out, mode, Expect::Read { len: 512 }).unwrap();
        assert_eq!(
            r,
            vec![
                Reply::Chunk {
                    cookie: 7,
                    done: false,
                    chunk: Chunk::Data {
                        offset: 4096,
                        data: Bytes::from_static(b"abc")
                    }
                },
                Reply::Chunk {
                    cookie: 7,
                    done: false,
                    chunk: Chunk::Hole {
                        offset: 4099,
                        len: 509
                    }
                },
                Reply::Chunk {
                    cookie: 7,
                    done: true,
                    chunk: Chunk::None
                },
            ]
        );
    }
}

#[test]
fn simple_read_carries_request_length_of_data() {
    let enc = ReplyEncoder::new(ReplyMode::Simple);
    let mut out = BytesMut::new();
    enc.read_data(&mut out, TO, 4096, 4, true);
    let mut buf = out.clone();
    // Header alone: the decoder asks for the data.
    assert_eq!(
        decode_reply(&mut buf, ReplyMode::Simple, |_| Some(Expect::Read {
            len: 4
        }))
        .unwrap(),
        Decoded::Need(20)
    );
    out.extend_from_slice(b"wxyz");
    let r = decode_all(&out, ReplyMode::Simple, Expect::Read { len: 4 }).unwrap();
    assert_eq!(
        r[0],
        Reply::Simple {
            cookie: 7,
            errno: 0,
            data: Some(Bytes::from_static(b"wxyz"))
        }
    );
}

#[test]
fn errors_round_trip_with_errno_and_message() {
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        let mut out = BytesMut::new();
        ReplyEncoder::new(mode).error(&mut out, TO, NbdErrno::ENOSPC, "disk full");
        let r = decode_all(&out, mode, Expect::Other).unwrap();
        match &r[0] {
            Reply::Simple { errno, .. } => assert_eq!(*errno, 28),
            Reply::Chunk {
                chunk: Chunk::Error { errno, message, .. },
                done: true,
                ..
            } => {
                assert_eq!(*errno, 28);
                assert_eq!(message, "disk full");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn block_status_round_trips_in_both_widths() {
    let ext = [
        StatusDescriptor {
            length: 65536,
            status: 3,
        },
        StatusDescriptor {
            length: 4096,
            status: 0,
        },
    ];
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut out = BytesMut::new();
        ReplyEncoder::new(mode).block_status(&mut out, TO, 1, &ext, true);
        let r = decode_all(&out, mode, Expect::BlockStatus).unwrap();
        let Reply::Chunk {
            chunk: Chunk::BlockStatus { context, extents },
            ..
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(*context, 1);
        assert_eq!(extents.len(), 2);
        assert!(extents[0].is_hole() && extents[0].is_zero());
        assert_eq!(extents[1].length, 4096);
    }
}

#[test]
fn hostile_lengths_are_refused_before_buffering() {
    // A data chunk claiming 4 GiB for a 512-byte read.
    let mut b = BytesMut::new();
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 1]);
    b.extend_from_slice(&7u64.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        decode_reply(&mut b.clone(), ReplyMode::Structured, |_| Some(
            Expect::Read { len: 512 }
        )),
        Err(ProtocolError::BadChunkLength { .. })
    ));
    // The same chunk for a write: not a valid reply at all.
    assert!(matches!(
        decode_reply(&mut b.clone(), ReplyMode::Structured, |_| Some(
            Expect::Other
        )),
        Err(ProtocolError::UnexpectedChunk { .. })
    ));
    // Unknown cookie.
    assert_eq!(
        decode_reply(&mut b, ReplyMode::Structured, |_| None),
        Err(ProtocolError::UnknownCookie(7))
    );
}

#[test]
fn simple_replies_are_refused_where_the_spec_forbids_them() {
    let mut out = BytesMut::new();
    ReplyEncoder::new(ReplyMode::Simple).ok(&mut out, TO);
    assert_eq!(
        decode_all(&out, ReplyMode::Structured, Expect::Read { len: 1 }),
        Err(ProtocolError::UnexpectedSimpleReply("READ"))
    );
    assert_eq!(
        decode_all(&out, ReplyMode::Extended, Expect::Other),
        Err(ProtocolError::BadMagic(SIMPLE_REPLY_MAGIC))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Random bytes never panic the decoder, and it never asks for more
    /// than a bounded amount of buffer.
    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        mode in 0u8..3,
        want in 0u8..3,
        read_len in 0u32..(1 << 25),
        known in any::<bool>(),
    ) {
        let mode = [ReplyMode::Simple, ReplyMode::Structured, ReplyMode::Extended][mode as usize];
        let want = [Expect::Read { len: read_len }, Expect::BlockStatus, Expect::Other][want as usize];
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..8 {
            match decode_reply(&mut buf, mode, |_| known.then_some(want)) {
                Ok(Decoded::Need(n)) => {
                    prop_assert!(n as u64 <= EXTENDED_HEADER_LEN as u64 + MAX_STATUS_PAYLOAD.max(8 + u64::from(read_len)));
                    break;
                }
                Ok(Decoded::Reply(_)) => {}
                Err(_) => break,
            }
        }
    }

    /// Valid-looking headers with random fields and payloads.
    #[test]
    fn random_chunks_never_panic(
        flags in any::<u16>(),
        kind in prop::sample::select(vec![0u16, 1, 2, 5, 6, 0x8001, 0x8002, 0x8003, 3, 0x7fff]),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        extended in any::<bool>(),
        want in 0u8..3,
    ) {
        let want = [Expect::Read { len: 64 }, Expect::BlockStatus, Expect::Other][want as usize];
        let mut b = BytesMut::new();
        if extended {
            b.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&1u64.to_be_bytes());
        if extended {
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        } else {
            b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        }
        b.extend_from_slice(&payload);
        let mode = if extended { ReplyMode::Extended } else { ReplyMode::Structured };
        let _ = decode_reply(&mut b, mode, |_| Some(want));
    }
}

proptest! {
    /// Block-status chunks with random payloads, for a connection with
    /// `base:allocation` (1) and a dirty bitmap (2) selected and the bitmap
    /// asked for: decoding then assembling never panics, and a success is
    /// a non-empty run of non-zero extents.
    #[test]
    fn random_status_payloads_never_panic_the_assembly(
        context in 0u32..4,
        body in proptest::collection::vec(any::<u8>(), 0..96),
        extended in any::<bool>(),
        done in any::<bool>(),
    ) {
        use crate::assemble::{Assembly, Output};
        let mut payload = context.to_be_bytes().to_vec();
        payload.extend_from_slice(&body);
        let mut b = BytesMut::new();
        let (magic, kind) = if extended {
            (EXTENDED_REPLY_MAGIC, nbd_server::proto::consts::reply_type::BLOCK_STATUS_EXT)
        } else {
            (STRUCTURED_REPLY_MAGIC, nbd_server::proto::consts::reply_type::BLOCK_STATUS)
        };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&u16::from(done).to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        if extended {
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        } else {
            b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        }
        b.extend_from_slice(&payload);
        let mode = if extended { ReplyMode::Extended } else { ReplyMode::Structured };
        if let Ok(Decoded::Reply(r)) = decode_reply(&mut b, mode, |_| Some(Expect::BlockStatus)) {
            let mut a = Assembly::status(2, std::sync::Arc::from([1u32, 2]));
            if let Ok(Some(Ok(Output::Status(e)))) = a.feed(r) {
                prop_assert!(!e.is_empty() && e.iter().all(|x| x.length > 0));
            }
        }
    }
}

#[test]
fn a_dirty_bitmap_chunk_next_to_base_allocation_assembles() {
    use crate::assemble::{Assembly, Output};
    let enc = ReplyEncoder::new(ReplyMode::Extended);
    let mut out = BytesMut::new();
    let alloc = [StatusDescriptor {
        length: 1 << 20,
        status: 0,
    }];
    let dirty = [
        StatusDescriptor {
            length: 65536,
            status: 1,
        },
        StatusDescriptor {
            length: 65536,
            status: 0,
        },
    ];
    enc.block_status(&mut out, TO, 1, &alloc, false);
    enc.block_status(&mut out, TO, 2, &dirty, true);
    let replies = decode_all(&out, ReplyMode::Extended, Expect::BlockStatus).unwrap();
    let mut a = Assembly::status(2, std::sync::Arc::from([1u32, 2]));
    let mut result = None;
    for r in replies {
        result = a.feed(r).unwrap();
    }
    let Some(Ok(Output::Status(e))) = result else {
        panic!("{result:?}")
    };
    assert_eq!(e.len(), 2);
    assert!(e[0].is_dirty() && !e[1].is_dirty());
}
