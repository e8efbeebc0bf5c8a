//! End to end with HTTP both ways: the hub (`hub-daemon`, in this process)
//! hands a 3-disk VM to `hub-agent serve` (a real process), which streams
//! every disk over NBD and calls back. A full, three incrementals with
//! different changes, and an incremental after the agent lost its state
//! (those disks go full); every restore point compared with the source as
//! it was, at the end (qemu-img compare and check). Then: the appliance
//! down at start leaves nothing behind; the agent killed mid-stream makes
//! the backup fail by the idle timeout, leaving nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hub_daemon::app::Daemon;
use hub_daemon::config::{Config, PortRange};
use integration_tests::http::call;
use integration_tests::support::{assert_identical, disk_like, pattern, require, run_ok};
use nbd_server::{
    BackendError, BlockBackend, Caps, Export, Extent, MemoryBackend, ReadChunk, Server,
    ServerConfig, ZeroFlags,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const MIB: usize = 1 << 20;

/// A change applied to the sources between two backups.
type Change = dyn Fn(&[PathBuf]);
const SIZES: [usize; 3] = [8 * MIB, 4 * MIB, 6 * MIB];

/// `hub-agent serve` with `sources` for vm1 (disk keys 2000, 2001, …).
struct Agent {
    child: tokio::process::Child,
    addr: SocketAddr,
    /// Every log line so far.
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn agent(state: &Path, sources: &[String]) -> Agent {
    agent_with(state, sources, &[]).await
}

async fn agent_with(state: &Path, sources: &[String], extra: &[&str]) -> Agent {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub-agent"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .args(extra);
    for (i, s) in sources.iter().enumerate() {
        cmd.arg("--source").arg(format!("vm1/{}={s}", 2000 + i));
    }
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let l = lines.next_line().await.unwrap().expect("agent exited");
        if let Some(a) = l.split("listening on ").nth(1) {
            break a.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining its logs so it never blocks on a full pipe.
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = Arc::clone(&logs);
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            keep.lock().unwrap().push(l);
        }
    });
    Agent { child, addr, logs }
}

/// The VM's disks as registered (disk_id = unit = index).
fn vm_disks() -> Vec<Value> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"disk_id": i, "size_bytes": s, "unit_number": i}))
        .collect()
}

/// One source file per disk of disk-like data (seeds from `seed`), and
/// the agent's arguments for them.
fn sources(dir: &Path, seed: u64) -> (Vec<PathBuf>, Vec<String>) {
    let paths: Vec<PathBuf> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let p = dir.join(format!("src{i}.raw"));
            std::fs::write(&p, disk_like(seed + i as u64, s)).unwrap();
            p
        })
        .collect();
    let args = paths.iter().map(|p| p.display().to_string()).collect();
    (paths, args)
}

async fn hub(dir: &Path, sna: SocketAddr, idle: Duration) -> Daemon {
    hub_with(dir, sna, idle, |_| {}).await
}

async fn hub_with(
    dir: &Path,
    sna: SocketAddr,
    idle: Duration,
    tweak: impl FnOnce(&mut Config),
) -> Daemon {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        nbd_ports: PortRange::Ephemeral { capacity: 16 },
        nbd_shared_port: 0,
        idle_timeout: idle,
        ..Config::default()
    };
    c.sna.url = Some(format!("http://{sna}"));
    tweak(&mut c);
    let d = Daemon::start(c).await.unwrap();
    let r = call(
        d.api_addr,
        "PUT",
        "/api/v1/vms/vm1",
        Some(&json!({"vm_context_id": "ctx-1", "disks": vm_disks()})),
    )
    .await;
    assert!(r.status < 300, "{}", r.text());
    d
}

/// Start a backup and wait until it is no longer running.
async fn backup(api: SocketAddr, kind: &str) -> Value {
    let r = call(
        api,
        "POST",
        "/api/v1/backups",
        Some(&json!({"vm_name": "vm1", "backup_type": kind, "repository_id": "default"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    finished(api, &id, 60).await
}

async fn finished(api: SocketAddr, id: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let b = call(api, "GET", &format!("/api/v1/backups/{id}"), None)
            .await
            .json();
        if b["status"] != "running" {
            return b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backup {id} still running: {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Change `n` scattered 64 KiB blocks of a source (`zero`: zero them).
fn change(path: &Path, seed: u64, n: usize, zero: bool) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = (f.metadata().unwrap().len() / 65536) as usize;
    // Incompressible data: a disk-like block may be all zeroes.
    let data = pattern(seed, 65536);
    for k in 0..n {
        let b = (seed as usize * 7 + k * 13) % blocks;
        let buf = if zero { vec![0u8; 65536] } else { data.clone() };
        f.write_all_at(&buf, (b * 65536) as u64).unwrap();
    }
    f.sync_all().unwrap();
}

/// A copy of every source as it is now (the restore point's truth).
fn snapshot(sources: &[PathBuf], dir: &Path, label: &str) -> Vec<PathBuf> {
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = dir.join(format!("{label}-disk{i}.raw"));
            std::fs::copy(s, &p).unwrap();
            p
        })
        .collect()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_through_hub_and_agent_full_incrementals_and_lost_state() {
    if !require("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sources, src_args) = sources(tmp.path(), 10);
    let state = tmp.path().join("agent-state");
    let mut ag = agent(&state, &src_args).await;
    let hubd = hub(tmp.path(), ag.addr, Duration::from_secs(3600)).await;
    let api = hubd.api_addr;
    let repo = tmp.path().join("data/repository");

    // (restore point, snapshot of the sources it must equal)
    let mut points: Vec<(Value, Vec<PathBuf>)> = Vec::new();
    let b = backup(api, "full").await;
    assert_eq!(b["status"], "completed", "{b}");
    points.push((b, snapshot(&sources, tmp.path(), "p0")));

    // Three incrementals, each with different changes.
    let steps: [(&str, Box<Change>); 3] = [
        (
            "scattered writes on every disk",
            Box::new(|s: &[PathBuf]| {
                for (i, p) in s.iter().enumerate() {
                    change(p, 100 + i as u64, 5, false);
                }
            }),
        ),
        (
            "zeroed blocks on disk 0 and 2",
            Box::new(|s: &[PathBuf]| {
                change(&s[0], 200, 6, true);
                change(&s[2], 201, 3, true);
            }),
        ),
        (
            "disk 1 only",
            Box::new(|s: &[PathBuf]| change(&s[1], 300, 9, false)),
        ),
    ];
    for (n, (what, apply)) in steps.iter().enumerate() {
        apply(&sources);
        let b = backup(api, "incremental").await;
        assert_eq!(b["status"], "completed", "{what}: {b}");
        for d in b["disks"].as_array().unwrap() {
            assert_eq!(d["backup_mode"], "incremental", "{what}: {d}");
            assert!(d["change_id"].is_string() && d["digest"].is_string(), "{d}");
        }
        points.push((b, snapshot(&sources, tmp.path(), &format!("p{}", n + 1))));
    }
    // The disk-1-only incremental sent (almost) nothing for disks 0 and 2.
    let last = &points[3].0["disks"];
    assert_eq!(last[0]["bytes_written"], 0, "{last}");
    assert_eq!(last[2]["bytes_written"], 0, "{last}");
    assert_eq!(last[1]["bytes_written"], 9 * 65536, "{last}");

    // The agent loses its state (new machine, wiped disk): the next
    // incremental is a full on every disk, with the appliance's reason.
    ag.child.kill().await.unwrap();
    std::fs::remove_dir_all(&state).unwrap();
    change(&sources[0], 400, 4, false);
    let ag2 = agent(&state, &src_args).await;
    assert_eq!(ag2.addr.ip(), ag.addr.ip());
    // The VM names no appliance of its own: point the default at the new
    // agent by re-registering with an sna_url.
    let r = call(
        api,
        "PUT",
        "/api/v1/vms/vm1",
        Some(&json!({"vm_context_id": "ctx-1", "disks": vm_disks(), "sna_url": format!("http://{}", ag2.addr)})),
    )
    .await;
    assert!(r.status < 300, "{}", r.text());
    let b = backup(api, "incremental").await;
    assert_eq!(b["status"], "completed", "{b}");
    for d in b["disks"].as_array().unwrap() {
        assert_eq!(d["backup_mode"], "full", "{d}");
        assert!(d["mode_reason"].as_str().unwrap().contains("change"), "{d}");
    }
    points.push((b, snapshot(&sources, tmp.path(), "p4")));

    // Every restore point still reads as its source did.
    for (b, truth) in &points {
        for (i, d) in b["disks"].as_array().unwrap().iter().enumerate() {
            let img = repo.join(d["file"].as_str().unwrap());
            run_ok("qemu-img", &["check", img.to_str().unwrap()]).await;
            assert_identical(
                "raw",
                truth[i].to_str().unwrap(),
                "qcow2",
                img.to_str().unwrap(),
            )
            .await;
        }
    }
    hubd.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_down_at_start_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // An address nobody listens on.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hubd = hub(tmp.path(), dead, Duration::from_secs(3600)).await;
    let before = files_in(&tmp.path().join("data/repository"));
    let r = call(
        hubd.api_addr,
        "POST",
        "/api/v1/backups",
        Some(&json!({"vm_name": "vm1", "backup_type": "full", "repository_id": "default"})),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(files_in(&tmp.path().join("data/repository")), before);
    let list = call(hubd.api_addr, "GET", "/api/v1/backups", None)
        .await
        .json();
    assert_eq!(list.as_array().map_or(0, Vec::len), 0, "{list}");
    hubd.shutdown().await.unwrap();
}

/// A source that serves the first `open` bytes and then never answers: the
/// agent is stuck mid-stream, deterministically.
#[derive(Debug)]
struct Stalls {
    inner: MemoryBackend,
    open: u64,
    /// Closed to let stalled reads go (so the server can shut down).
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl BlockBackend for Stalls {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        if offset >= self.open {
            let _ = self.gate.acquire().await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), BackendError> {
        self.inner.write_zeroes(offset, len, f).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.inner.block_status(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_stream_fails_by_idle_timeout_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // Disk 0 comes from an NBD source that stalls after 2 MiB; the others
    // are files.
    let mem = MemoryBackend::new(SIZES[0] as u64);
    mem.write(0, Bytes::from(disk_like(1, SIZES[0])))
        .await
        .unwrap();
    let server = Server::new(ServerConfig::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let stalls = Stalls {
        inner: mem,
        open: 2 * MIB as u64,
        gate: Arc::clone(&gate),
    };
    server
        .add_export(Export::new("src0", Arc::new(stalls)))
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = server.serve(l).unwrap();
    let mut src_args = vec![format!("nbd://{}/src0", h.local_addr())];
    for (i, &s) in SIZES.iter().enumerate().skip(1) {
        let p = tmp.path().join(format!("src{i}.raw"));
        std::fs::write(&p, disk_like(20 + i as u64, s)).unwrap();
        src_args.push(p.display().to_string());
    }
    let mut ag = agent(&tmp.path().join("state"), &src_args).await;
    let hubd = hub(tmp.path(), ag.addr, Duration::from_secs(2)).await;
    let r = call(
        hubd.api_addr,
        "POST",
        "/api/v1/backups",
        Some(&json!({"vm_name": "vm1", "backup_type": "full", "repository_id": "default"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    // Wait until disk 0 has received data (the agent is mid-stream and
    // stuck at the stall), then kill it without a word to the hub.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b = call(hubd.api_addr, "GET", &format!("/api/v1/backups/{id}"), None)
            .await
            .json();
        if b["disks"][0]["bytes_written"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no data arrived: {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ag.child.start_kill().unwrap();
    ag.child.wait().await.unwrap();
    let b = finished(hubd.api_addr, &id, 30).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("no NBD client activity"),
        "{b}"
    );
    let left: Vec<PathBuf> = files_in(&tmp.path().join("data/repository"));
    assert!(left.is_empty(), "files left behind: {left:?}");
    hubd.shutdown().await.unwrap();
    gate.close();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_over_tls_with_client_certificates() {
    if !require("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("tls");
    hub_daemon::tls::init(&creds, &[]).unwrap();
    let (sources, src_args) = sources(tmp.path(), 50);
    let ag = agent_with(
        &tmp.path().join("state"),
        &src_args,
        &["--tls-certificates", creds.to_str().unwrap()],
    )
    .await;
    let creds2 = creds.clone();
    let hubd = hub_with(tmp.path(), ag.addr, Duration::from_secs(3600), move |c| {
        c.nbd_tls = hub_daemon::tls::NbdTls {
            setting: hub_daemon::tls::TlsSetting::Require,
            certificates: Some(creds2),
            verify_peer: true,
        };
    })
    .await;
    let repo = tmp.path().join("data/repository");
    for (n, kind) in ["full", "incremental"].iter().enumerate() {
        if n == 1 {
            change(&sources[2], 77, 7, false);
        }
        let b = backup(hubd.api_addr, kind).await;
        assert_eq!(b["status"], "completed", "{b}");
        for (i, d) in b["disks"].as_array().unwrap().iter().enumerate() {
            assert_eq!(d["backup_mode"], *kind, "{d}");
            let img = repo.join(d["file"].as_str().unwrap());
            assert_identical(
                "raw",
                sources[i].to_str().unwrap(),
                "qcow2",
                img.to_str().unwrap(),
            )
            .await;
        }
    }
    hubd.shutdown().await.unwrap();
}

/// `qemu-nbd -r -B b0` serving a qcow2 on a fixed port, as a child process
/// (so stopping it is a kill and a wait, and the image is free afterwards).
struct QemuNbd {
    child: tokio::process::Child,
}

impl QemuNbd {
    async fn start(img: &Path, port: u16) -> QemuNbd {
        let child = tokio::process::Command::new("qemu-nbd")
            .args([
                "-r",
                "-B",
                "b0",
                "-f",
                "qcow2",
                "-x",
                "d",
                "-t",
                "-b",
                "127.0.0.1",
            ])
            .args(["-p", &port.to_string()])
            .arg(img)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Bounded: qemu-nbd listens within milliseconds; 2000 × 5 ms is
        // far beyond that even on a loaded machine.
        for _ in 0..2000 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return QemuNbd { child };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("qemu-nbd on port {port} never listened");
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// `disk streamed` lines of the agent's log: (disk key, bytes read), last
/// `n` of them.
fn bytes_read(logs: &[String], n: usize) -> std::collections::BTreeMap<u32, u64> {
    let field = |l: &str, k: &str| -> u64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {l}"))
            .parse()
            .unwrap()
    };
    let lines: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("disk streamed"))
        .collect();
    assert!(lines.len() >= n, "{logs:?}");
    lines[lines.len() - n..]
        .iter()
        .map(|l| (field(l, "disk_key=") as u32, field(l, "bytes_read=")))
        .collect()
}

/// The sources are qcow2 images served by `qemu-nbd -r -B b0`, the
/// bitmap started with the full: the incremental reads only what qemu-io
/// wrote since (a block rewritten with its old bytes is read but not
/// sent), and a source naming a bitmap the server lacks is read whole.
/// Every restore point equals its source (qemu-img compare) and every
/// digest the hub recorded is the source's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmap_incremental_reads_only_dirty_blocks() {
    if !require("qemu-img") || !require("qemu-nbd") || !require("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut imgs = Vec::new();
    let mut ports = Vec::new();
    let mut servers = Vec::new();
    let mut src_args = Vec::new();
    for (i, &size) in SIZES.iter().enumerate() {
        let raw = tmp.path().join(format!("src{i}.raw"));
        std::fs::write(&raw, disk_like(60 + i as u64, size)).unwrap();
        let img = tmp.path().join(format!("src{i}.qcow2"));
        let (r, q) = (raw.to_str().unwrap(), img.to_str().unwrap());
        run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", r, q]).await;
        std::fs::remove_file(&raw).unwrap();
        // Started before the full reads the disk: it records every write
        // since, which is the operator's contract.
        run_ok("qemu-img", &["bitmap", "--add", q, "b0"]).await;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        servers.push(QemuNbd::start(&img, port).await);
        // Disk 2 names a bitmap qemu-nbd does not export.
        let bitmap = if i == 2 { "missing" } else { "b0" };
        src_args.push(format!("nbd://127.0.0.1:{port}/d?dirty-bitmap={bitmap}"));
        imgs.push(img);
        ports.push(port);
    }
    let ag = agent(&tmp.path().join("state"), &src_args).await;
    let hubd = hub(tmp.path(), ag.addr, Duration::from_secs(3600)).await;
    let repo = tmp.path().join("data/repository");

    let check = |b: Value| {
        let repo = repo.clone();
        let ports = ports.clone();
        async move {
            for (i, d) in b["disks"].as_array().unwrap().iter().enumerate() {
                let img = repo.join(d["file"].as_str().unwrap());
                let src = format!("nbd://127.0.0.1:{}/d", ports[i]);
                assert_identical("raw", &src, "qcow2", img.to_str().unwrap()).await;
                let (_, want) = hub_daemon::cli::digest::digest_target(&src).await.unwrap();
                assert_eq!(d["digest"].as_str().unwrap(), want.to_hex(), "{d}");
                let (_, got) = hub_daemon::cli::digest::digest_target(img.to_str().unwrap())
                    .await
                    .unwrap();
                assert_eq!(got, want, "disk {i}");
            }
        }
    };

    let b = backup(hubd.api_addr, "full").await;
    assert_eq!(b["status"], "completed", "{b}");
    check(b).await;
    let read = bytes_read(&ag.logs.lock().unwrap(), 3);
    for (i, &size) in SIZES.iter().enumerate() {
        assert_eq!(
            read[&(2000 + i as u32)],
            size as u64,
            "full reads everything"
        );
    }

    // Writes while nothing serves the images (qemu-nbd's view of the
    // bitmap is loaded when it starts): re-served afterwards.
    for s in servers.drain(..) {
        s.stop().await;
    }
    let blk = 65536u64;
    let old = tmp.path().join("old-block");
    // Block 20 of disk 0 as it is (the data the image was made from), to
    // write back unchanged.
    let orig = disk_like(60, SIZES[0]);
    std::fs::write(&old, &orig[20 * 65536..21 * 65536]).unwrap();
    let old_s = format!("write -s {} 1310720 64k", old.display());
    let writes: [(usize, Vec<String>); 3] = [
        (
            0,
            vec![
                "write -P 0x11 196608 64k".into(),   // block 3
                "write -P 0x12 3276800 100k".into(), // blocks 50, 51
                "write -P 0x13 8388607 1".into(),    // the last byte: block 127
                old_s,                               // block 20, same bytes
            ],
        ),
        (1, vec!["write -z 1048576 128k".into()]), // blocks 16, 17 zeroed
        (2, vec!["write -P 0x14 458752 64k".into()]),
    ];
    for (i, cmds) in &writes {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(imgs[*i].to_str().unwrap());
        run_ok("qemu-io", &args).await;
    }
    for (img, &port) in imgs.iter().zip(&ports) {
        servers.push(QemuNbd::start(img, port).await);
    }

    let b = backup(hubd.api_addr, "incremental").await;
    assert_eq!(b["status"], "completed", "{b}");
    for d in b["disks"].as_array().unwrap() {
        assert_eq!(d["backup_mode"], "incremental", "{d}");
    }
    let read = bytes_read(&ag.logs.lock().unwrap(), 3);
    // Only the dirty blocks of disks 0 and 1; disk 2 whole (no bitmap).
    assert_eq!(read[&2000], 5 * blk, "{read:?}");
    assert_eq!(read[&2001], 2 * blk, "{read:?}");
    assert_eq!(read[&2002], SIZES[2] as u64, "{read:?}");
    // Block 20 was read but not sent: four blocks' worth written.
    assert_eq!(b["disks"][0]["bytes_written"], 4 * blk, "{b}");
    check(b).await;

    hubd.shutdown().await.unwrap();
    for s in servers {
        s.stop().await;
    }
}
