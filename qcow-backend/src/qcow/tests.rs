use super::open::open_file;
use super::*;
use crate::{BackingPolicy, ImageError};
use bytes::Bytes;
use imago::ShallowMapping;
use nbd_server::backend::conformance;
use nbd_server::Extent;
use nbd_server::{BlockBackend, ZeroFlags};
use std::io;
use std::ops::Range;
use std::sync::atomic::AtomicUsize;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_fresh_image() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    conformance::run_all(|size| {
        let p = dir
            .path()
            .join(format!("f{}.qcow2", n.fetch_add(1, Ordering::Relaxed)));
        async move {
            QcowBackend::create(&p, &CreateOptions::fresh(size), &OpenOptions::new())
                .await
                .unwrap()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_overlay_on_our_base() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    conformance::run_all(|size| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        let base = dir.path().join(format!("b{i}.qcow2"));
        let top = dir.path().join(format!("t{i}.qcow2"));
        async move {
            let b = QcowBackend::create(&base, &CreateOptions::fresh(size), &OpenOptions::new())
                .await
                .unwrap();
            // Non-zero base data everywhere the suite looks, so an overlay that
            // leaked parent data through a zeroed range would be caught.
            b.close().await.unwrap();
            drop(b);
            QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
                .await
                .unwrap()
        }
    })
    .await;
}

/// `base.qcow2` in `dir` of `size` bytes, its first `data` bytes `byte`,
/// closed; and `top.qcow2` over it, open for writing.
async fn base_and_overlay(
    dir: &Path,
    size: u64,
    data: usize,
    byte: u8,
) -> (PathBuf, PathBuf, QcowBackend) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let b = QcowBackend::create(&base, &CreateOptions::fresh(size), &OpenOptions::new())
        .await
        .unwrap();
    b.write(0, Bytes::from(vec![byte; data])).await.unwrap();
    b.close().await.unwrap();
    drop(b);
    let t = QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
        .await
        .unwrap();
    (base, top, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_zeroes_hide_parent_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, t) = base_and_overlay(dir.path(), 4 << 20, 4 << 20, 0x55).await;
    assert_eq!(t.size(), 4 << 20);
    assert_eq!(t.chain_depth(), 2);
    // Partial clusters, whole clusters, and trim.
    t.write_zeroes(1000, 70_000, ZeroFlags::default())
        .await
        .unwrap();
    t.write_zeroes(
        1 << 20,
        1 << 20,
        ZeroFlags {
            may_trim: true,
            fast: true,
        },
    )
    .await
    .unwrap();
    t.trim(3 << 20, 100_000).await.unwrap();
    for (off, len) in [(1000u64, 70_000u32), (1 << 20, 1 << 20), (3 << 20, 100_000)] {
        let v = conformance::read_flat(&t, off, len).await;
        assert!(
            v.iter().all(|x| *x == 0),
            "range {off}+{len} shows parent data"
        );
    }
    let v = conformance::read_flat(&t, 0, 1000).await;
    assert!(v.iter().all(|x| *x == 0x55));
    // Depth: top-layer zeroes are depth 1, untouched ranges come from the base (2).
    let st = t.block_status(2 << 20, 4096).await.unwrap();
    assert_eq!(st[0].depth, 2);
    assert!(!st[0].hole);
    let st = t.block_status(1 << 20, 4096).await.unwrap();
    assert_eq!((st[0].depth, st[0].zero), (1, true));
    t.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_on_partial_cluster_with_data_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    let t = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
        .await
        .unwrap();
    t.write(0, Bytes::from(vec![9u8; 131072])).await.unwrap();
    let e = t
        .write_zeroes(
            100,
            70_000,
            ZeroFlags {
                may_trim: true,
                fast: true,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Unsupported);
    let v = conformance::read_flat(&t, 0, 131072).await;
    assert!(v.iter().all(|x| *x == 9));
    // Zeroing a fresh (unallocated) range is fast even when unaligned.
    t.write_zeroes(
        200_000,
        5000,
        ZeroFlags {
            may_trim: true,
            fast: true,
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_opens_and_creates_never_follow_a_final_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.qcow2");
    QcowBackend::create(&real, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let link = dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    // The open itself (not only the policy check) refuses the link.
    for writable in [false, true] {
        let e = open_file(&link, writable, true).err().unwrap();
        assert_eq!(e.kind(), crate::ImageErrorKind::BadImage, "{e}");
        assert!(open_file(&link, writable, false).is_ok());
    }
    let strict = OpenOptions::new()
        .read_only(true)
        .policy(BackingPolicy::strict_within([dir
            .path()
            .canonicalize()
            .unwrap()]));
    assert!(QcowBackend::open(&link, &strict).await.is_err());
    // Creating over a (dangling) symlink never writes through it.
    let target = dir.path().join("elsewhere.qcow2");
    let dangling = dir.path().join("new.qcow2");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    let e = QcowBackend::create(&dangling, &CreateOptions::fresh(1 << 20), &strict)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), crate::ImageErrorKind::Exists, "{e}");
    assert!(!target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_writer_is_refused_by_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    let _a = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
        .await
        .unwrap();
    let e = QcowBackend::open(&p, &OpenOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Locked { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_existing_file_and_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    std::fs::write(&p, b"taken").unwrap();
    let e = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), crate::ImageErrorKind::Exists);
    let mut c = CreateOptions::fresh(1 << 20);
    c.cluster_size = 3000;
    let e = QcowBackend::create(&dir.path().join("y.qcow2"), &c, &OpenOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), crate::ImageErrorKind::InvalidParameters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_reads_of_evicted_pages_come_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ro.qcow2");
    let size = 8u64 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8 | 1).collect();
    let w = QcowBackend::create(&p, &CreateOptions::fresh(size), &OpenOptions::new())
        .await
        .unwrap();
    w.write(0, Bytes::from(data.clone())).await.unwrap();
    w.close().await.unwrap();
    drop(w);
    let r = QcowBackend::open(&p, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    // Every other MiB out of the page cache (clean pages need no
    // privilege): one read then spans cached and uncached data, so both
    // the page-cache read and the blocking-pool read fill parts of it.
    let f = std::fs::File::open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    for at in (0..len).step_by(2 << 20) {
        let n = std::num::NonZeroU64::new((1 << 20).min(len - at));
        rustix::fs::fadvise(&f, at, n, rustix::fs::Advice::DontNeed).unwrap();
    }
    for (off, n) in [
        (0u64, size as u32),
        (4096, 3 << 20),
        ((5 << 20) + 17, 65536),
    ] {
        let got = conformance::read_flat(&r, off, n).await;
        let want = &data[off as usize..off as usize + n as usize];
        assert!(got == want, "read {off}+{n} differs");
    }
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_one_status_coalesces_up_to_the_first_change_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let mib = 1u64 << 20;
    let b = QcowBackend::create(&p, &CreateOptions::fresh(16 * mib), &OpenOptions::new())
        .await
        .unwrap();
    // Data in [0, 3 MiB) from three writes in reverse order (host clusters
    // not contiguous), a hole to 5 MiB, data in [5, 6) MiB, holes after.
    for at in [2 * mib, 0, mib] {
        b.write(at, Bytes::from(vec![9u8; mib as usize]))
            .await
            .unwrap();
    }
    b.write(5 * mib, Bytes::from(vec![7u8; mib as usize]))
        .await
        .unwrap();
    let e = b.block_status_first(0, 16 * mib).await.unwrap();
    let total: u64 = e.iter().map(|e| e.length).sum();
    assert_eq!(
        total,
        3 * mib,
        "one data run, whole, nothing past it: {e:?}"
    );
    assert!(e.iter().all(|e| !e.hole && !e.zero));
    let e = b.block_status_first(3 * mib, 13 * mib).await.unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].length, e[0].hole), (2 * mib, true));
    // Without REQ_ONE the whole requested range is described.
    let e = b.block_status(0, 16 * mib).await.unwrap();
    assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), 16 * mib);
    assert_eq!(e.len(), 4, "data, hole, data, hole: {e:?}");
    b.close().await.unwrap();
    drop(b);
    // Read-only: answered from one remembered walk, same answers, in any
    // order (and clipped to each request).
    let r = QcowBackend::open(&p, &OpenOptions::new().read_only(true))
        .await
        .unwrap();
    for _ in 0..2 {
        let e = r.block_status_first(5 * mib, 11 * mib).await.unwrap();
        assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), mib);
        assert!(e.iter().all(|e| !e.hole));
        let e = r
            .block_status_first(mib / 2, 16 * mib - mib / 2)
            .await
            .unwrap();
        assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), 5 * mib / 2);
        let e = r.block_status_first(mib / 2, 4096).await.unwrap();
        assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), 4096);
        let e = r.block_status_first(6 * mib, 10 * mib).await.unwrap();
        assert_eq!((e.len(), e[0].length, e[0].hole), (1, 10 * mib, true));
    }
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_of_a_chain_hints_every_layer_in_disk_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = u64::from(DEFAULT_CLUSTER_SIZE);
    let (base, top, t) = base_and_overlay(dir.path(), 16 * c, 8 * c as usize, 1).await;
    // Clusters 5, 3, 2 written in that order: in the top's file they lie
    // in reverse disk order, as an incremental's changed clusters do.
    for k in [5u64, 3, 2] {
        t.write(k * c, Bytes::from(vec![2u8; c as usize]))
            .await
            .unwrap();
    }
    let r = reopened_read_only(t, &top).await;
    assert_eq!(r.chain_depth(), 2);
    let a = r.image.access.read().await;
    let plan = mapping::plan_hints(&a, 0..16 * c).await;
    drop(a);
    let base = base.canonicalize().unwrap();
    let top = top.canonicalize().unwrap();
    let files: Vec<(&Path, u64)> = plan.iter().map(|(p, _, n)| (p.as_path(), *n)).collect();
    // Base clusters 0-1, top 2 and 3 (not adjacent in the top's file, so
    // two hints), base 4, top 5, base 6-7; nothing for the unallocated
    // clusters 8-15.
    assert_eq!(
        files,
        [
            (base.as_path(), 2 * c),
            (top.as_path(), c),
            (top.as_path(), c),
            (base.as_path(), c),
            (top.as_path(), c),
            (base.as_path(), 2 * c),
        ]
    );
    // Each hint names the cluster's place in its file: top's clusters went
    // in the order 5, 3, 2.
    let host = |i: usize| plan[i].1;
    assert!(host(4) < host(2) && host(2) < host(1), "{plan:?}");
    assert_eq!(host(3), host(0) + 4 * c, "base allocated in disk order");
    r.close().await.unwrap();
}

/// [`mapping::map_runs`] the way imago resolves a chain, cluster by cluster down to
/// the owning layer (what reads did before): the reference it must match.
async fn map_runs_by_cluster(
    a: &Access,
    range: Range<u64>,
) -> (Vec<mapping::Run<'_>>, Option<io::Error>) {
    use imago::Mapping;
    let mut runs: Vec<mapping::Run<'_>> = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        let (m, n) = match a.get_mapping(pos, range.end - pos).await {
            Ok(found) => found,
            Err(e) => return (runs, Some(e)),
        };
        let (n, src) = match m {
            Mapping::Eof { .. } => (range.end - pos, mapping::Source::Zero),
            Mapping::Zero { .. } => (n, mapping::Source::Zero),
            Mapping::Raw {
                storage, offset, ..
            } => (n, mapping::Source::Raw(storage, offset)),
            _ => (n, mapping::Source::Other),
        };
        let n = n.clamp(1, range.end - pos);
        mapping::push_run(&mut runs, pos, n, src);
        pos += n;
    }
    (runs, None)
}

/// [`status::status_walk`] as it was, walking down the chain again for every run
/// (imago's way): the reference the layer walk must match, inside the
/// backing files (past a shorter backing file's end it stopped short).
async fn status_walk_by_run(
    a: &Access,
    mut pos: u64,
    end: u64,
    first_only: bool,
) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    while pos < end && out.len() < status::MAX_STATUS_EXTENTS {
        let Some(e) = status_at(a, pos, end - pos).await? else {
            break;
        };
        let n = e.length;
        match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero && l.depth == e.depth => {
                l.length += e.length
            }
            Some(l) if first_only && (l.hole != e.hole || l.zero != e.zero) => break,
            _ => out.push(e),
        }
        pos += n;
    }
    Ok(out)
}

/// Status of the run starting at `off`, walking the chain layer by layer so
/// the depth is known. `None` at the end of the image.
async fn status_at(top: &Access, off: u64, max: u64) -> io::Result<Option<Extent>> {
    let mut layer = top;
    let mut lo = off;
    let mut len = max;
    let mut depth = 1u32;
    loop {
        let (m, n) = layer.get_shallow_mapping(lo, len).await?;
        len = len.min(n);
        let e = match m {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Extent {
                length: len,
                hole: false,
                zero: false,
                depth,
            },
            ShallowMapping::Zero { explicit: true, .. } => Extent {
                length: len,
                hole: true,
                zero: true,
                depth,
            },
            ShallowMapping::Zero { .. } => Extent::hole(len),
            ShallowMapping::Indirect {
                layer: next,
                offset,
                ..
            } => {
                layer = next;
                lo = offset;
                depth += 1;
                continue;
            }
            ShallowMapping::Eof { .. } if depth == 1 => return Ok(None),
            // Past the end of a shorter backing file: reads as zero.
            _ => Extent::hole(len),
        };
        return Ok((e.length > 0).then_some(e));
    }
}
/// `t` closed, and `path` opened again read-only (as a restore serves it).
async fn reopened_read_only(t: QcowBackend, path: &Path) -> QcowBackend {
    t.close().await.unwrap();
    drop(t);
    QcowBackend::open(path, &OpenOptions::new().read_only(true))
        .await
        .unwrap()
}

/// A run as plain values: (disk offset, length, file or 0 for zeroes and
/// usize::MAX for imago's reads, offset in the file).
fn run_key(r: &mapping::Run<'_>) -> (u64, u64, usize, u64) {
    match r.2 {
        mapping::Source::Zero => (r.0, r.1, 0, 0),
        mapping::Source::Raw(f, host) => (r.0, r.1, std::ptr::from_ref(f) as usize, host),
        mapping::Source::Other => (r.0, r.1, usize::MAX, 0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_by_layer_mapping_matches_imagos_cluster_by_cluster() {
    // Three layers with different cluster sizes, the top larger than its
    // backing file, each with data, zeroes and (top) discards in ragged
    // places; every random range must map to exactly the runs imago's own
    // resolution gives.
    let dir = tempfile::tempdir().unwrap();
    let c = u64::from(DEFAULT_CLUSTER_SIZE);
    let size = 64 * c;
    let (base, mid, m) = base_and_overlay(dir.path(), size, (40 * c) as usize, 1).await;
    drop(m);
    std::fs::remove_file(&mid).unwrap();
    let small = CreateOptions {
        cluster_size: 4096,
        ..CreateOptions::overlay(&base)
    };
    let m = QcowBackend::create(&mid, &small, &OpenOptions::new())
        .await
        .unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |below: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below
    };
    for _ in 0..60 {
        let at = next(size / 512) * 512;
        let n = (1 + next(32)) * 512;
        let n = n.min(size - at);
        if next(4) == 0 {
            m.write_zeroes(at, n, ZeroFlags::default()).await.unwrap();
        } else {
            m.write(at, Bytes::from(vec![2u8; n as usize]))
                .await
                .unwrap();
        }
    }
    m.close().await.unwrap();
    drop(m);
    let top = dir.path().join("top2.qcow2");
    let big = CreateOptions {
        size: Some(size + 16 * c),
        ..CreateOptions::overlay(&mid)
    };
    let t = QcowBackend::create(&top, &big, &OpenOptions::new())
        .await
        .unwrap();
    for _ in 0..40 {
        let at = next((size + 16 * c) / 512) * 512;
        let n = ((1 + next(3 * c / 512)) * 512).min(size + 16 * c - at);
        match next(5) {
            0 => t.write_zeroes(at, n, ZeroFlags::default()).await.unwrap(),
            1 => t.trim(at, n).await.unwrap(),
            _ => t
                .write(at, Bytes::from(vec![3u8; n as usize]))
                .await
                .unwrap(),
        }
    }
    let r = reopened_read_only(t, &top).await;
    assert_eq!(r.chain_depth(), 3);
    let a = r.image.access.read().await;
    let end = size + 16 * c;
    let mut layers_seen = std::collections::HashSet::new();
    for i in 0..400 {
        let at = if i % 2 == 0 {
            next(end)
        } else {
            next(end / 512) * 512
        };
        let len = (1 + next(4 * c)).min(end - at);
        let (ours, e1) = mapping::map_runs(&a, at..at + len).await;
        let (want, e2) = map_runs_by_cluster(&a, at..at + len).await;
        assert!(e1.is_none() && e2.is_none(), "{e1:?} {e2:?}");
        let ours: Vec<_> = ours.iter().map(run_key).collect();
        let want: Vec<_> = want.iter().map(run_key).collect();
        assert_eq!(ours, want, "range {at}+{len}");
        layers_seen.extend(ours.iter().map(|k| k.2));
        // Block status walks the same way; inside the backing files it
        // must say what the old walk said, whole or up to the first
        // change.
        if at + len <= size {
            for first in [false, true] {
                let ours = status::status_walk(&a, at, at + len, first).await.unwrap();
                let want = status_walk_by_run(&a, at, at + len, first).await.unwrap();
                assert_eq!(ours, want, "status {at}+{len} first_only={first}");
            }
        }
    }
    // Past the end of the shorter backing file: unallocated, read as
    // zeroes, to the end (the old walk stopped at the backing file's end
    // and said nothing about the rest).
    let tail = status::status_walk(&a, size, end, false).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.length).sum::<u64>(), end - size);
    assert!(
        tail.iter()
            .all(|e| e.depth == 1 || (e.hole && e.zero && e.depth == 0)),
        "{tail:?}"
    );
    assert!(tail.iter().any(|e| e.depth == 0), "{tail:?}");
    let old = status_walk_by_run(&a, size, end, false).await.unwrap();
    assert!(
        old.iter().map(|e| e.length).sum::<u64>() < end - size,
        "{old:?}"
    );
    // Zeroes and all three files turned up.
    assert!(layers_seen.len() >= 4, "{layers_seen:?}");
    drop(a);
    // Over NBD that was an EIO for any block status asked past the old
    // size of a disk that grew between backups (the incremental's overlay
    // is the new size): both request kinds now answer.
    let e = r.block_status(size, end - size).await.unwrap();
    assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), end - size);
    let e = r.block_status_first(end - c, c).await.unwrap();
    assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), c);
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_reads_of_a_known_window_stay_on_the_callers_thread_and_read_the_same() {
    use super::run_cache::WINDOW;
    use nbd_server::backend::conformance::read_flat;
    // A chain a little over two windows long (the last window short), the
    // top's clusters in reverse order and some zeroed; the writable open
    // reads everything through imago: the reference.
    let dir = tempfile::tempdir().unwrap();
    let c = u64::from(DEFAULT_CLUSTER_SIZE);
    let size = 2 * WINDOW + 3 * c;
    let (_, top, t) = base_and_overlay(dir.path(), size, (size - c) as usize, 1).await;
    for k in (0..size / c).rev().step_by(7) {
        t.write(k * c + 512, Bytes::from(vec![k as u8; 3000]))
            .await
            .unwrap();
    }
    t.write_zeroes(WINDOW - c, 2 * c, ZeroFlags::default())
        .await
        .unwrap();
    let want = read_flat(&t, 0, size as u32).await;
    let r = reopened_read_only(t, &top).await;
    assert_eq!(r.direct_reads(), 0);
    // Requests of odd sizes, some across a window boundary; twice: the
    // second pass finds every window remembered.
    let mut spans = Vec::new();
    let mut at = 0u64;
    let mut n = 1u64;
    while at < size {
        let len = (n * 37_119 % (700 << 10) + 1).min(size - at);
        spans.push((at, len));
        at += len;
        n += 1;
    }
    let inside = spans
        .iter()
        .filter(|(at, len)| at / WINDOW == (at + len - 1) / WINDOW)
        .count() as u64;
    assert!(inside > 10 && (inside as usize) < spans.len());
    for pass in 0..2 {
        for &(at, len) in &spans {
            let got = read_flat(&r, at, len as u32).await;
            assert!(
                got == want[at as usize..(at + len) as usize],
                "pass {pass}: {at}+{len} differs"
            );
            let chunks = r.read_for_socket(at, len as u32).await.unwrap();
            let n: u64 = chunks.iter().map(|c| c.len()).sum();
            assert_eq!(n, len);
        }
    }
    // Each window was resolved on the I/O thread once, by the first
    // request inside it; every later request inside a window (four reads
    // of each span in all) was served where it was made.
    let windows: std::collections::HashSet<u64> = spans
        .iter()
        .filter(|(at, len)| at / WINDOW == (at + len - 1) / WINDOW)
        .map(|(at, _)| at / WINDOW)
        .collect();
    assert_eq!(r.direct_reads(), 4 * inside - windows.len() as u64);
    r.close().await.unwrap();
    let e = r.read(0, 4096).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Shutdown);
}
