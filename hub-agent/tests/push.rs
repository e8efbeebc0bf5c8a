//! Pushing disks to a real NBD server (ours, in process): full, incremental,
//! lost state, every source kind, and the `push` command line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use disk_digest::algo::digest_of_bytes;
use hub_agent::push::{commit_states, push_disks, DiskRequest};
use hub_agent::source::SourceSpec;
use hub_agent::stream::{DiskCounter, StreamOptions};
use hub_agent::tracking;
use integration_tests::support::{require, run_ok, write_file};
use nbd_server::BlockBackend;
use sna_contract::Mode;

const SIZE: usize = 20 * 1024 * 1024 + 12_345;

fn request(key: u32, source: SourceSpec, uri: String) -> DiskRequest {
    DiskRequest {
        disk_id: key - 2000,
        disk_key: key,
        state_name: format!("vm/{key}"),
        source,
        target_uri: uri,
        base: None,
        progress: Arc::new(DiskCounter::default()),
    }
}

/// Small chunks and few in flight, so a 20 MiB disk still runs many chunks
/// concurrently and ends on a partial one.
fn opts() -> StreamOptions {
    StreamOptions {
        chunk: 1 << 20,
        in_flight: 3,
        max_write: 256 << 10,
        tls: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn full_push_copies_the_source_skips_zero_blocks_and_reports_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let src = disk(1, SIZE);
    let path = write_file(dir.path(), "d0.raw", &src);
    let target = Counting::new(SIZE as u64);
    let s = nbd(vec![("t0", target.clone())]).await;
    let r = request(2000, SourceSpec::Path(path), s.uri("t0"));
    let progress = Arc::clone(&r.progress);
    let res = push_disks(vec![r], opts()).await.unwrap();
    assert_eq!(res[0].mode, Mode::Full);
    assert_eq!(res[0].digest, digest_of_bytes(&src).to_hex());
    assert_eq!(res[0].size_bytes, SIZE as u64);
    assert!(res[0].change_id.starts_with("ha-"));
    assert_eq!(target.contents().await, src);
    // Zero blocks never travel; everything else once.
    let (written, _, zeroed, _) = target.counts();
    assert_eq!(written, nonzero_bytes(&src));
    assert!(written < SIZE as u64 - 3 * B as u64);
    assert_eq!(zeroed, 0);
    assert_eq!(res[0].stats.bytes_written, written);
    let st = s.server.export("t0").unwrap().stats().snapshot();
    assert_eq!(st.bytes_written, written);
    assert_eq!(
        progress.done.load(std::sync::atomic::Ordering::Relaxed),
        SIZE as u64
    );
    assert_eq!(res[0].state.leaves.len(), SIZE.div_ceil(B));
}

#[tokio::test]
async fn incremental_sends_only_changed_blocks_and_new_zero_blocks_as_write_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let mut src = disk(2, SIZE);
    let path = write_file(dir.path(), "d0.raw", &src);
    let t0 = Counting::new(SIZE as u64);
    let s = nbd(vec![("t0", t0.clone())]).await;
    let full = push_disks(
        vec![request(2000, SourceSpec::Path(path.clone()), s.uri("t0"))],
        opts(),
    )
    .await
    .unwrap();
    commit_states(&state_dir, &full).unwrap();

    // The guest changes three blocks (one of them the short last block) and
    // zeroes two that held data.
    let last = SIZE.div_ceil(B) - 1;
    for b in [5usize, 100, last] {
        let s = b * B;
        src[s] ^= 0x5a;
    }
    let zeroed_blocks: Vec<usize> = (10..SIZE / B)
        .filter(|b| src[b * B..(b + 1) * B].iter().any(|x| *x != 0))
        .take(2)
        .collect();
    for b in &zeroed_blocks {
        src[b * B..(b + 1) * B].fill(0);
    }
    std::fs::write(&path, &src).unwrap();

    // The hub's overlay reads as the parent until written.
    let t1 = Counting::holding(&t0.contents().await).await;
    s.server
        .add_export(nbd_server::Export::new("t1", t1.clone()))
        .unwrap();
    let base = tracking::base_for(&state_dir, "vm/2000", &full[0].change_id, SIZE as u64).unwrap();
    let mut r = request(2000, SourceSpec::Path(path), s.uri("t1"));
    r.base = Some(Arc::new(base));
    let inc = push_disks(vec![r], opts()).await.unwrap();
    assert_eq!(inc[0].mode, Mode::Incremental);
    assert_ne!(inc[0].change_id, full[0].change_id);
    assert_eq!(inc[0].digest, digest_of_bytes(&src).to_hex());
    assert_eq!(t1.contents().await, src);
    let (written, _, zeroed, zero_reqs) = t1.counts();
    assert_eq!(written, 2 * B as u64 + (SIZE - last * B) as u64);
    assert_eq!(zeroed, 2 * B as u64);
    assert!(zero_reqs >= 1);
    assert_eq!(
        s.server
            .export("t1")
            .unwrap()
            .stats()
            .snapshot()
            .bytes_written,
        written
    );
    // Unchanged source, next incremental: nothing at all is sent.
    commit_states(&state_dir, &inc).unwrap();
    let t2 = Counting::holding(&src).await;
    s.server
        .add_export(nbd_server::Export::new("t2", t2.clone()))
        .unwrap();
    let base = tracking::base_for(&state_dir, "vm/2000", &inc[0].change_id, SIZE as u64).unwrap();
    let mut r = request(
        2000,
        SourceSpec::Path(dir.path().join("d0.raw")),
        s.uri("t2"),
    );
    r.base = Some(Arc::new(base));
    let again = push_disks(vec![r], opts()).await.unwrap();
    assert_eq!(t2.counts(), (0, 0, 0, 0));
    assert_eq!(again[0].digest, inc[0].digest);
}

#[tokio::test]
async fn lost_or_corrupt_state_gives_no_base() {
    let dir = tempfile::tempdir().unwrap();
    let src = disk(3, 1 << 20);
    let path = write_file(dir.path(), "d0.raw", &src);
    let t = Counting::new(1 << 20);
    let s = nbd(vec![("t", t.clone())]).await;
    let res = push_disks(
        vec![request(2000, SourceSpec::Path(path), s.uri("t"))],
        opts(),
    )
    .await
    .unwrap();
    commit_states(dir.path(), &res).unwrap();
    let id = &res[0].change_id;
    assert!(tracking::base_for(dir.path(), "vm/2000", id, 1 << 20).is_ok());
    let file = tracking::state_path(dir.path(), "vm/2000");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let why = tracking::base_for(dir.path(), "vm/2000", id, 1 << 20).unwrap_err();
    assert!(
        why.contains(&format!("no state for change id {id}")),
        "{why}"
    );
    std::fs::remove_file(&file).unwrap();
    assert!(tracking::base_for(dir.path(), "vm/2000", id, 1 << 20).is_err());
}

#[tokio::test]
async fn qcow2_and_nbd_sources_push_like_raw_and_several_disks_run_together() {
    let dir = tempfile::tempdir().unwrap();
    // qcow2 sizes are whole sectors; still a short last block.
    let a = disk(4, 20 * 1024 * 1024 + 12_800);
    let b = disk(5, 3 << 20);
    let raw_a = write_file(dir.path(), "a.raw", &a);
    let src_b: Arc<dyn BlockBackend> = Arc::new(nbd_server::MemoryBackend::new(b.len() as u64));
    src_b.write(0, bytes::Bytes::from(b.clone())).await.unwrap();
    let ta = Counting::new(a.len() as u64);
    let tb = Counting::new(b.len() as u64);
    let s = nbd(vec![
        ("ta", ta.clone()),
        ("tb", tb.clone()),
        ("src-b", src_b),
    ])
    .await;
    let source_a = if require("qemu-img") {
        let q = dir.path().join("a.qcow2");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-O",
                "qcow2",
                raw_a.to_str().unwrap(),
                q.to_str().unwrap(),
            ],
        )
        .await;
        SourceSpec::Path(q)
    } else {
        SourceSpec::Path(raw_a)
    };
    let res = push_disks(
        vec![
            request(2000, source_a, s.uri("ta")),
            request(2001, SourceSpec::parse(&s.uri("src-b")), s.uri("tb")),
        ],
        opts(),
    )
    .await
    .unwrap();
    assert_eq!(res[0].digest, digest_of_bytes(&a).to_hex());
    assert_eq!(res[1].digest, digest_of_bytes(&b).to_hex());
    assert_eq!(res[0].change_id, res[1].change_id);
    assert_eq!(ta.contents().await, a);
    assert_eq!(tb.contents().await, b);
}

#[tokio::test]
async fn a_target_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "d.raw", &disk(6, 1 << 20));
    let t = Counting::new(2 << 20);
    let s = nbd(vec![("t", t.clone())]).await;
    let e = push_disks(
        vec![request(2000, SourceSpec::Path(path), s.uri("t"))],
        opts(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("target export is"), "{e}");
    assert_eq!(t.counts(), (0, 0, 0, 0));
}

async fn cli(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub-agent"))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // stderr is not a terminal here: no progress bar.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_command_full_then_incremental_then_full_after_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut a = disk(7, 4 << 20);
    let b = disk(8, 2 << 20);
    let pa = write_file(dir.path(), "a.raw", &a);
    let pb = write_file(dir.path(), "b.raw", &b);
    let (ta, tb) = (Counting::new(a.len() as u64), Counting::new(b.len() as u64));
    let s = nbd(vec![("ta", ta.clone()), ("tb", tb.clone())]).await;
    let targets = format!("2000:{},2001:{}", s.uri("ta"), s.uri("tb"));
    let sa = format!("2000={}", pa.display());
    let sb = format!("2001={}", pb.display());
    let st = state.to_str().unwrap();
    let v = cli(&["push", "--targets", &targets, &sa, &sb, "--state-dir", st]).await;
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks[0]["disk_key"], 2000);
    assert_eq!(disks[0]["mode"], "full");
    assert_eq!(disks[0]["digest"], digest_of_bytes(&a).to_hex());
    assert_eq!(disks[1]["digest"], digest_of_bytes(&b).to_hex());
    assert_eq!(ta.contents().await, a);
    let id = disks[0]["change_id"].as_str().unwrap().to_owned();

    // Incremental into the same targets (they hold the parent).
    a[3 * B + 1] ^= 1;
    std::fs::write(&pa, &a).unwrap();
    let before = ta.counts().0;
    let v = cli(&[
        "push",
        "--targets",
        &targets,
        &sa,
        &sb,
        "--state-dir",
        st,
        "--base-change-id",
        &id,
    ])
    .await;
    assert_eq!(v["disks"][0]["mode"], "incremental");
    assert_eq!(v["disks"][0]["stats"]["bytes_written"], B as u64);
    assert_eq!(ta.counts().0 - before, B as u64);
    assert_eq!(ta.contents().await, a);
    assert_eq!(tb.contents().await, b);

    // Corrupt state: the base is refused with a reason, and a full goes out.
    let id2 = v["disks"][0]["change_id"].as_str().unwrap().to_owned();
    std::fs::write(tracking::state_path(&state, "2000"), b"garbage").unwrap();
    let v = cli(&[
        "push",
        "--targets",
        &targets,
        &sa,
        &sb,
        "--state-dir",
        st,
        "--base-change-id",
        &id2,
    ])
    .await;
    assert_eq!(v["disks"][0]["mode"], "full");
    assert!(
        v["disks"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no state for change id"),
        "{v}"
    );
    assert_eq!(v["disks"][1]["mode"], "incremental");
}

/// What the hub does: a fresh qcow2 for the full, an overlay on it for the
/// incremental; `qemu-img compare` then sees each equal to the source.
#[tokio::test]
async fn qcow2_targets_full_then_overlay_match_the_source_by_qemu_img_compare() {
    use integration_tests::support::assert_identical;
    use qcow_backend::{CreateOptions, OpenOptions, QcowBackend};
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16 << 20;
    let mut src = disk(9, size);
    let path = write_file(dir.path(), "src.raw", &src);
    let full_img = dir.path().join("full.qcow2");
    let q = QcowBackend::create(
        &full_img,
        &CreateOptions::fresh(size as u64),
        &OpenOptions::new(),
    )
    .await
    .unwrap();
    let s = nbd(vec![("full", Arc::new(q))]).await;
    let full = push_disks(
        vec![request(2000, SourceSpec::Path(path.clone()), s.uri("full"))],
        opts(),
    )
    .await
    .unwrap();
    s.server.remove_export("full").await.unwrap();
    let p = path.to_str().unwrap();
    assert_identical("raw", p, "qcow2", full_img.to_str().unwrap()).await;

    src[9 * B + 7] ^= 0x11;
    let zero_at = (1..size / B)
        .find(|b| src[b * B..(b + 1) * B].iter().any(|x| *x != 0))
        .unwrap();
    src[zero_at * B..(zero_at + 1) * B].fill(0);
    std::fs::write(&path, &src).unwrap();
    let inc_img = dir.path().join("inc.qcow2");
    let q = QcowBackend::create(
        &inc_img,
        &CreateOptions::overlay(&full_img),
        &OpenOptions::new(),
    )
    .await
    .unwrap();
    s.server
        .add_export(nbd_server::Export::new("inc", Arc::new(q)))
        .unwrap();
    let mut r = request(2000, SourceSpec::Path(path.clone()), s.uri("inc"));
    r.base = Some(full[0].state.clone());
    let inc = push_disks(vec![r], opts()).await.unwrap();
    assert_eq!(inc[0].stats.bytes_written, B as u64);
    assert_eq!(inc[0].stats.bytes_zeroed, B as u64);
    s.server.remove_export("inc").await.unwrap();
    assert_identical("raw", p, "qcow2", inc_img.to_str().unwrap()).await;
    // The untouched parent still holds the first push.
    assert_eq!(inc[0].digest, digest_of_bytes(&src).to_hex());
}

/// Detaches a loop device however the test ends.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[tokio::test]
async fn a_block_device_source_is_read_with_its_size_from_seeking() {
    let dir = tempfile::tempdir().unwrap();
    let src = disk(10, 8 << 20);
    let file = write_file(dir.path(), "dev.img", &src);
    // Needs root and loop devices; skip (saying so) where there are none.
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", file.to_str().unwrap()])
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => Loop(String::from_utf8(o.stdout).unwrap().trim().to_owned()),
        _ => {
            eprintln!("SKIP: no loop device");
            return;
        }
    };
    let meta = std::fs::metadata(&dev.0).unwrap();
    assert_eq!(
        meta.len(),
        0,
        "a block device reports no length in metadata"
    );
    let t = Counting::new(src.len() as u64);
    let s = nbd(vec![("t", t.clone())]).await;
    let res = push_disks(
        vec![request(2000, SourceSpec::parse(&dev.0), s.uri("t"))],
        opts(),
    )
    .await
    .unwrap();
    assert_eq!(res[0].size_bytes, src.len() as u64);
    assert_eq!(res[0].digest, digest_of_bytes(&src).to_hex());
    assert_eq!(t.contents().await, src);
}

/// Reading and hashing in one task (the default for raw files) and in two,
/// with and without the bound on concurrent hashing, must push the same
/// bytes and report the same digest and leaves: the levers change where
/// the work runs, never what is sent.
#[tokio::test]
async fn fused_and_separate_read_hash_agree() {
    let dir = tempfile::tempdir().unwrap();
    let src = disk(7, SIZE);
    let path = write_file(dir.path(), "d0.raw", &src);
    let mut results = Vec::new();
    for (fused, cpu_tasks) in [(true, 2), (false, 2), (true, 0), (false, 0)] {
        let target = Counting::new(SIZE as u64);
        let s = nbd(vec![("t0", target.clone())]).await;
        let o = StreamOptions {
            fused_read_hash: fused,
            cpu_tasks,
            ..opts()
        };
        let r = request(2000, SourceSpec::Path(path.clone()), s.uri("t0"));
        let res = push_disks(vec![r], o).await.unwrap();
        assert_eq!(
            target.contents().await,
            src,
            "fused {fused} cpu {cpu_tasks}"
        );
        assert_eq!(res[0].digest, digest_of_bytes(&src).to_hex());
        results.push(res[0].state.leaves.clone());
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}
