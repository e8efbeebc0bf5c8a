//! Clients that pipeline big READs and never read the replies cannot take
//! the process past its buffer budget, cannot starve a normal client, and
//! leave no memory behind when they go.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Exporter;
use integration_tests::client::Client;

const MIB: u64 = 1 << 20;
/// The budget the exporter runs with.
const BUDGET_MIB: u64 = 256;
/// "Near the baseline": what the allocator may keep of small buffers
/// (under 1 MiB, from the heap) plus thread stacks and caches.
const NEAR_MIB: u64 = 16;
/// What the read-buffer recycling pool keeps on purpose (bounded,
/// process-wide; raw images' READs use it since their reads share the
/// qcow2 read path).
const RECYCLED_MIB: u64 = nbd_server::buffer::RECYCLE_LIMIT as u64 / MIB;

/// Resident memory of `pid` in MiB, from /proc.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024
}

/// Poll `cond` every 50 ms for up to `secs`; false if it never held.
fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn non_reading_clients_stay_within_the_buffer_budget_and_memory_comes_back() {
    flood(32 << 20, 8);
}

/// Mid-size buffers are where allocators keep freed memory (glibc's mmap
/// threshold rises to 32 MiB once a 32 MiB buffer was freed, so 1 MiB
/// buffers then come from arenas that are rarely trimmed).
#[test]
fn memory_comes_back_after_mid_size_reads_too() {
    flood(1 << 20, 256);
}

/// 20 clients each pipeline `per_client` READs of `len` bytes and never
/// read a reply.
fn flood(len: u32, per_client: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.raw");
    // Non-zero data: zero reads would cost the server nothing.
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..64u8 {
        f.write_all(&vec![i | 1; MIB as usize]).unwrap();
    }
    drop(f);
    let spec = format!("disk={}", path.display());
    let budget = format!("{BUDGET_MIB}M");
    let exporter = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--max-buffer-memory",
        &budget,
        &spec,
    ]);
    let pid = exporter.proc.child.id();
    let addr: SocketAddr = exporter.exports[0].1;

    // Baseline: started, and one client served.
    let mut normal = Client::connect(addr, "disk").unwrap();
    assert_eq!(normal.read(0, 4096).unwrap(), vec![1u8; 4096]);
    let baseline = rss_mib(pid);
    // One maximum-size read, as a real workload would have done (glibc
    // raises its mmap threshold after it).
    assert_eq!(normal.read(0, 32 << 20).unwrap().len(), 32 << 20);

    let mut hogs = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(addr, "disk").unwrap();
        for j in 0..per_client {
            let offset = (j * u64::from(len)) % (64 * MIB - u64::from(len) + 1);
            c.read_unacknowledged(offset, len).unwrap();
        }
        hogs.push(c);
    }
    // The server fills its budget (proof the hogs bite)...
    let mut peak = baseline;
    let filled = wait_for(60, || {
        peak = peak.max(rss_mib(pid));
        peak >= baseline + BUDGET_MIB / 2
    });
    assert!(filled, "hogs never made the server buffer: peak {peak} MiB");
    // ...and a normal client on the same export is still served.
    let t = Instant::now();
    assert_eq!(normal.read(40 * MIB, 4096).unwrap(), vec![41u8; 4096]);
    let served_in = t.elapsed();
    let fresh = Client::connect(addr, "disk")
        .unwrap()
        .read(MIB, 4096)
        .unwrap();
    assert_eq!(fresh, vec![1u8; 4096]);
    // Sample while they keep hanging.
    for _ in 0..20 {
        peak = peak.max(rss_mib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The budget bounds buffered bytes; on top of the baseline the rest is
    // per-connection read windows (64 KiB each) and allocator slack.
    let slack = 48;
    assert!(
        peak <= baseline + BUDGET_MIB + slack,
        "peak RSS {peak} MiB over baseline {baseline} + budget {BUDGET_MIB} + {slack}"
    );

    // The hogs go away: memory comes back to near the baseline. "Near":
    // within NEAR_MIB plus the recycling pool's bound — far below the 256 MiB the budget would let the
    // process keep, so it shows buffers are freed and handed back to the
    // OS rather than parked in the allocator (with heap buffers glibc kept
    // 130 MiB here, and mimalloc 230-290 MiB while the server stayed busy).
    drop(hogs);
    let mut after = u64::MAX;
    let returned = wait_for(30, || {
        // The server stays in use meanwhile, as it would be (an idle
        // process can look better than a busy one: exiting threads give
        // back their allocator caches).
        assert_eq!(normal.read(0, 4096).unwrap(), vec![1u8; 4096]);
        after = rss_mib(pid);
        after <= baseline + NEAR_MIB + RECYCLED_MIB
    });
    eprintln!(
        "baseline {baseline} MiB, peak {peak} MiB, after disconnect {after} MiB, \
         normal read served in {served_in:?} during the flood"
    );
    assert!(
        returned,
        "RSS stayed at {after} MiB (baseline {baseline} MiB)"
    );
    // Still serving.
    assert_eq!(normal.read(0, 4096).unwrap(), vec![1u8; 4096]);
    assert_eq!(exporter.terminate(), 0);
}
