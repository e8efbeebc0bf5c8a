//! Backends without the network: memory, raw file and qcow2 (imago on the
//! I/O pool), sequential 64 KiB and random 4 KiB writes, and reads.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_server::{BlockBackend, MemoryBackend};
use qcow_backend::{CreateOptions, OpenOptions, QcowBackend, RawBackend};

const SIZE: u64 = 256 << 20;

fn backends(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> Vec<(&'static str, Arc<dyn BlockBackend>)> {
    let raw = RawBackend::create(&dir.join("b.raw"), SIZE).unwrap();
    let qcow = rt
        .block_on(QcowBackend::create(
            &dir.join("b.qcow2"),
            &CreateOptions::fresh(SIZE),
            &OpenOptions::new(),
        ))
        .unwrap();
    vec![
        ("memory", Arc::new(MemoryBackend::new(SIZE))),
        ("raw", Arc::new(raw)),
        ("qcow2", Arc::new(qcow)),
    ]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bs = backends(&rt, dir.path());
    let data64 = Bytes::from(vec![0x5au8; 65536]);
    let data4 = Bytes::from(vec![0xa5u8; 4096]);
    let mut g = c.benchmark_group("backend");
    for (name, b) in &bs {
        g.throughput(Throughput::Bytes(65536));
        let mut off = 0u64;
        g.bench_function(format!("{name}/seq_write_64k"), |bench| {
            bench.iter(|| {
                rt.block_on(b.write(off, data64.clone())).unwrap();
                off = (off + 65536) % SIZE;
            })
        });
        g.bench_function(format!("{name}/seq_read_64k"), |bench| {
            bench.iter(|| {
                let r = rt.block_on(b.read(off, 65536)).unwrap();
                off = (off + 65536) % SIZE;
                r
            })
        });
        g.throughput(Throughput::Bytes(4096));
        let mut x = 12345u64;
        g.bench_function(format!("{name}/rand_write_4k"), |bench| {
            bench.iter(|| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let o = (x >> 20) % (SIZE / 4096) * 4096;
                rt.block_on(b.write(o, data4.clone())).unwrap();
            })
        });
    }
    g.finish();
    for (_, b) in bs {
        rt.block_on(b.close()).unwrap();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
