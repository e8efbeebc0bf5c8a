//! Request decode, validation and reply encode: the per-request protocol cost.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_server::proto::consts::tx_flags;
use nbd_server::proto::{
    validate, ReplyEncoder, ReplyMode, ReplyTo, RequestHeader, Session, StatusDescriptor,
};
use std::hint::black_box;

fn request_bytes() -> Vec<u8> {
    let h = RequestHeader {
        flags: 0,
        kind: 1,
        cookie: 42,
        offset: 1 << 30,
        length: 4096,
    };
    let mut v = Vec::new();
    h.encode(false, &mut v);
    v
}

fn codec(c: &mut Criterion) {
    let req = request_bytes();
    let session = Session {
        size: 4 << 30,
        flags: tx_flags::HAS_FLAGS
            | tx_flags::SEND_FLUSH
            | tx_flags::SEND_FUA
            | tx_flags::SEND_WRITE_ZEROES,
        structured: true,
        extended: false,
        has_contexts: true,
    };
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(req.len() as u64));
    g.bench_function("decode_compact_request", |b| {
        b.iter(|| {
            RequestHeader::decode(black_box(&req), false)
                .unwrap()
                .unwrap()
        })
    });
    let h = RequestHeader::decode(&req, false).unwrap().unwrap();
    g.bench_function("validate_write", |b| {
        b.iter(|| validate(black_box(&h), black_box(&session)).unwrap())
    });
    let to = ReplyTo {
        cookie: 42,
        offset: 1 << 30,
    };
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        let enc = ReplyEncoder::new(mode);
        let mut out = BytesMut::with_capacity(64);
        g.bench_function(format!("encode_ok_{mode:?}"), |b| {
            b.iter(|| {
                out.clear();
                enc.ok(&mut out, black_box(to));
            })
        });
    }
    let enc = ReplyEncoder::new(ReplyMode::Structured);
    let extents: Vec<StatusDescriptor> = (0..1024)
        .map(|i| StatusDescriptor {
            length: 65536,
            status: i % 4,
        })
        .collect();
    let mut out = BytesMut::with_capacity(16 << 10);
    g.throughput(Throughput::Elements(extents.len() as u64));
    g.bench_function("encode_block_status_1024_extents", |b| {
        b.iter(|| {
            out.clear();
            enc.block_status(&mut out, to, 1, black_box(&extents), true);
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
