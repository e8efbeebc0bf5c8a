//! kill -9 of the serving process mid-write, several rounds: `qemu-img
//! check` must find no corruption (leaked clusters are acceptable) and
//! every byte acknowledged before the last completed FLUSH must read back.
//! The kill point is chosen by progress (a seeded count of writes), never
//! by time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Exporter;
use integration_tests::client::Client;
use integration_tests::support::{
    assert_check_clean, pattern, qemu_img_create, qemu_img_to_raw, require, run_ok,
};
use nbd_server::backend::conformance::SplitMix;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// Writes in order: (offset, data), zeroes included.
type Writes = Vec<(u64, Vec<u8>)>;

/// What a crash round knows: writes acknowledged before the last
/// acknowledged FLUSH (durable), and every write after it (acknowledged or
/// in flight), which may or may not have landed.
struct Outcome {
    durable: Writes,
    later: Vec<(u64, u64)>,
}

fn write_until_kill(client: &mut Client, seed: u64, sequential: bool) -> Outcome {
    let mut rng = SplitMix(seed);
    let kill_after = 40 + rng.next() % 80;
    let mut acked: Writes = Vec::new();
    let mut flushed = 0;
    let mut pos = 0;
    for i in 0..kill_after {
        let len = 4096 * (1 + rng.next() % 64);
        let off = if sequential {
            let o = pos;
            pos = (pos + len) % (SIZE - len);
            o
        } else {
            (rng.next() % (SIZE - len)) & !511
        };
        if !sequential && i % 7 == 3 {
            client.write_zeroes(off, len as u32).unwrap();
            acked.push((off, vec![0u8; len as usize]));
        } else {
            let data = pattern(seed ^ i, len as usize);
            client.write(off, &data).unwrap();
            acked.push((off, data));
        }
        if i % 10 == 9 {
            client.flush().unwrap();
            flushed = acked.len();
        }
    }
    // One more write in flight when the process dies.
    let inflight = (rng.next() % (SIZE - 65536)) & !511;
    client
        .write_unacknowledged(inflight, &pattern(7, 65536))
        .unwrap();
    let mut later: Vec<(u64, u64)> = acked[flushed..]
        .iter()
        .map(|(o, d)| (*o, d.len() as u64))
        .collect();
    later.push((inflight, 65536));
    acked.truncate(flushed);
    Outcome {
        durable: acked,
        later,
    }
}

/// Later writes overwrite earlier ones: replay in order into a model.
fn expected_image(durable: &Writes, base: Vec<u8>) -> Vec<u8> {
    let mut img = base;
    for (off, data) in durable {
        img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    img
}

async fn round(
    dir: &std::path::Path,
    r: u64,
    overlay: Option<&std::path::Path>,
    base_data: Vec<u8>,
) {
    let img = dir.join(format!("crash{r}.qcow2"));
    let spec = format!("d={}", img.display());
    let ex = match overlay {
        None => Exporter::start(&["--listen", "127.0.0.1:0", "--create", "64M", &spec]),
        Some(parent) => Exporter::start(&[
            "--listen",
            "127.0.0.1:0",
            "--backing",
            parent.to_str().unwrap(),
            &spec,
        ]),
    };
    let addr = ex.exports[0].1;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut c = Client::connect(addr, "d").unwrap();
        write_until_kill(&mut c, 1000 + r, r % 2 == 0)
    })
    .await
    .unwrap();
    ex.kill9();

    assert_check_clean(&img, true).await;
    // Read the image back through qemu (independent of our reader).
    let raw = dir.join(format!("crash{r}.raw"));
    qemu_img_to_raw("qcow2", &img, &raw).await;
    let got = std::fs::read(&raw).unwrap();
    let expect = expected_image(&outcome.durable, base_data);
    // Bytes a later write touched may hold either version; every other byte
    // written before the last flush must hold exactly the flushed data.
    let mut maybe = vec![false; SIZE as usize];
    for (off, len) in &outcome.later {
        maybe[*off as usize..(*off + *len) as usize].fill(true);
    }
    let mut checked = 0u64;
    for (off, data) in &outcome.durable {
        for i in *off as usize..*off as usize + data.len() {
            if !maybe[i] {
                assert_eq!(got[i], expect[i], "round {r}: flushed byte {i:#x} lost");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "round {r} checked nothing");
    std::fs::remove_file(&raw).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_nothing_flushed() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for r in 0..4 {
        round(dir.path(), r, None, vec![0u8; SIZE as usize]).await;
    }
    // Overlays: on a base with data everywhere.
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, Some("64M"), None, &[]).await;
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x66 0 64M",
            base.to_str().unwrap(),
        ],
    )
    .await;
    for r in 4..7 {
        round(dir.path(), r, Some(&base), vec![0x66u8; SIZE as usize]).await;
    }
    assert_check_clean(&base, false).await;
}
