//! The issue-10 figure: a VM's disks backed up as an operator sees it —
//! `POST /api/v1/backups` to a hub that hands the job to the appliance
//! (`hub-agent`), until `GET` shows `completed` — against the original
//! design's path (one qemu-nbd + one nbdcopy per disk, in parallel), then an
//! incremental after 10 % of the blocks changed.
//!
//! Hub and agent run in this process on their own runtime (the same
//! `Daemon` and `Agent` the binaries run: qcow2 images with digests, change
//! tracking, complete callbacks); only the HTTP calls of the operator are ours.
//!
//! The `handoff-bitmap` variant serves each source as a qcow2 through
//! `qemu-nbd -r -B b0` (the bitmap added before the full) and names the
//! bitmap in the agent's source (`?dirty-bitmap=b0`): its incremental reads
//! only the blocks qemu recorded as written. Samples under the server name
//! `hub+agent+bitmap`.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::data::Rng;
use crate::report::Sample;
use crate::servers::Kind;
use crate::workloads::Run;

/// The server name of our samples.
const OURS: &str = "hub+agent";
/// The server name of the dirty-bitmap variant's samples.
const OURS_BITMAP: &str = "hub+agent+bitmap";
const VM: &str = "vm1";
const BLOCK: u64 = 64 << 10;

/// One HTTP/1.1 call with `Connection: close` (all the operator needs);
/// returns the status and the JSON body (null when empty).
pub(crate) async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let v = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("{method} {path}: {body}"))?
    };
    Ok((status, v))
}

/// Change 10 % of the 64 KiB blocks of `path`, scattered (seeded): every
/// fifth changed block is zeroed, the others get new random bytes.
pub fn mutate(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let slots = size / BLOCK;
    let mut rng = Rng(seed);
    let mut used = vec![false; slots as usize];
    let mut buf = vec![0u8; BLOCK as usize];
    let mut n = 0;
    while n < slots / 10 {
        let s = rng.below(slots);
        if std::mem::replace(&mut used[s as usize], true) {
            continue;
        }
        if n % 5 == 0 {
            buf.fill(0);
        } else {
            rng.fill(&mut buf);
        }
        f.write_all_at(&buf, s * BLOCK)?;
        n += 1;
    }
    Ok(())
}

/// A 10 % change plan like [`mutate`]'s: (offset, `Some(byte)` to fill
/// the block with, `None` to zero it). Constant bytes, because qemu-io
/// writes patterns; hashing and sending cost the same as random bytes.
pub fn change_plan(size: u64, seed: u64) -> Vec<(u64, Option<u8>)> {
    let slots = size / BLOCK;
    let mut rng = Rng(seed);
    let mut used = vec![false; slots as usize];
    let mut plan = Vec::new();
    while (plan.len() as u64) < slots / 10 {
        let s = rng.below(slots);
        if std::mem::replace(&mut used[s as usize], true) {
            continue;
        }
        let fill = if plan.len() % 5 == 0 {
            None
        } else {
            Some(1 + rng.below(255) as u8)
        };
        plan.push((s * BLOCK, fill));
    }
    plan
}

/// Apply `plan` to a raw file (the truth the restore point is compared to)
/// and to a qcow2 image through qemu-io, whose writes its enabled bitmaps
/// record.
fn apply_plan(plan: &[(u64, Option<u8>)], raw: &Path, qcow2: &Path) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(raw)?;
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for &(off, fill) in plan {
        f.write_all_at(&vec![fill.unwrap_or(0); BLOCK as usize], off)?;
        args.push("-c".into());
        args.push(match fill {
            Some(b) => format!("write -q -P {b} {off} {BLOCK}"),
            None => format!("write -q -z {off} {BLOCK}"),
        });
    }
    f.sync_all()?;
    args.push(qcow2.display().to_string());
    let st = std::process::Command::new("qemu-io").args(&args).status()?;
    if !st.success() {
        bail!("qemu-io on {}: {st}", qcow2.display());
    }
    Ok(())
}

/// CPU seconds (user + system) this process has used so far, and those of
/// its children already waited for, from `/proc/self/stat` (`USER_HZ` is
/// 100 on every Linux ABI this runs on). A CPU-bound path's wall time on
/// N cores is at least its CPU time / N, whatever else loads the machine,
/// so these say more than seconds on a shared host.
pub(crate) fn cpu_secs() -> anyhow::Result<(f64, f64)> {
    proc_cpu_secs("/proc/self/stat")
}

/// [`cpu_secs`] of the process whose `stat` file is `path`.
pub(crate) fn proc_cpu_secs(path: &str) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name (which may hold spaces) start at
    // `state` (field 3): utime, stime, cutime, cstime are fields 14–17.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/self/stat")?
        .1;
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse::<f64>().map(|t| t / 100.0))
        .collect::<Result<_, _>>()
        .context("malformed /proc/self/stat")?;
    if f.len() != 4 {
        bail!("malformed /proc/self/stat");
    }
    Ok((f[0] + f[1], f[2] + f[3]))
}

/// How hub and agent share the machine in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtimes {
    /// Each on the runtime its binary builds (the hub's
    /// [`hub_daemon::cli::runtime`], the agent's default multi-threaded
    /// one): two processes on one host, as deployed, left to the kernel's
    /// scheduler.
    Separate,
    /// Both on one 2-worker runtime: the figures before 2026-11-30 04:00
    /// (`HANDOFF_SHARED_RUNTIME=1` for comparison). Either side's
    /// CPU-bound work then holds a worker the other side's I/O waits for.
    Shared,
}

impl Runtimes {
    fn from_env() -> Runtimes {
        match std::env::var("HANDOFF_SHARED_RUNTIME").as_deref() {
            Ok("1") => Runtimes::Shared,
            _ => Runtimes::Separate,
        }
    }
}

/// The agent's stream options: its defaults, unless the environment turns
/// a lever off to measure what it buys (`HANDOFF_FUSED=0`: read and hash in
/// separate tasks; `HANDOFF_CPU_TASKS=N`: that bound, 0 for none).
fn stream_options() -> hub_agent::stream::StreamOptions {
    let mut o = hub_agent::stream::StreamOptions::default();
    if std::env::var("HANDOFF_FUSED").as_deref() == Ok("0") {
        o.fused_read_hash = false;
    }
    if let Some(n) = std::env::var("HANDOFF_CPU_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.cpu_tasks = n;
    }
    o
}

/// A hub and an agent serving `srcs` as the disks of `VM`.
struct Stack {
    rt: tokio::runtime::Runtime,
    /// The agent's own runtime (`None`: it shares `rt`).
    agent_rt: Option<tokio::runtime::Runtime>,
    daemon: hub_daemon::app::Daemon,
    repo: PathBuf,
}

impl Stack {
    fn start(dir: &Path, srcs: Vec<hub_agent::source::SourceSpec>) -> anyhow::Result<Stack> {
        let (rt, agent_rt) = match Runtimes::from_env() {
            Runtimes::Separate => (
                hub_daemon::cli::runtime()?,
                Some(tokio::runtime::Runtime::new()?),
            ),
            Runtimes::Shared => (
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?,
                None,
            ),
        };
        let state_dir = dir.join("agent-state");
        let data_dir = dir.join("hub");
        std::fs::create_dir_all(&state_dir)?;
        let sources: BTreeMap<(String, u32), hub_agent::source::SourceSpec> = srcs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| ((VM.to_owned(), 2000 + i as u32), spec))
            .collect();
        let agent = hub_agent::serve::Agent::new(hub_agent::serve::AgentConfig {
            state_dir,
            token: None,
            sources,
            stream: stream_options(),
            progress_every: hub_agent::serve::PROGRESS_EVERY,
        });
        let agent_url = agent_rt.as_ref().unwrap_or(&rt).block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", l.local_addr()?);
            tokio::spawn(hub_agent::serve::serve(l, agent, std::future::pending()));
            anyhow::Ok(url)
        })?;
        let daemon = rt.block_on(async {
            let config = hub_daemon::config::Config {
                listen: "127.0.0.1:0".parse()?,
                data_dir: data_dir.clone(),
                nbd_ports: hub_daemon::config::PortRange::Ephemeral { capacity: 64 },
                nbd_shared_port: 0,
                sna: hub_daemon::config::SnaConfig {
                    url: Some(agent_url),
                    ..Default::default()
                },
                ..Default::default()
            };
            hub_daemon::app::Daemon::start(config).await
        })?;
        Ok(Stack {
            rt,
            agent_rt,
            daemon,
            repo: data_dir.join("repository").canonicalize()?,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let (status, v) = self
            .rt
            .block_on(call(self.daemon.api_addr, method, path, body))?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }

    /// Start a backup and poll every 20 ms until it completes; the seconds
    /// from the POST, and the completed record.
    fn backup(&self, kind: &str) -> anyhow::Result<(f64, Value)> {
        let body = json!({"vm_name": VM, "backup_type": kind, "repository_id": "default"});
        let t = Instant::now();
        let started = self.call("POST", "/api/v1/backups", Some(&body))?;
        let id = started["backup_id"].as_str().context("no backup_id")?;
        loop {
            let b = self.call("GET", &format!("/api/v1/backups/{id}"), None)?;
            match b["status"].as_str() {
                Some("completed") => return Ok((t.elapsed().as_secs_f64(), b)),
                Some("running") | Some("starting") | Some("pending") => {}
                other => bail!("{kind} backup {id}: {other:?}: {b}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        let r = self.rt.block_on(self.daemon.shutdown());
        // The agent's server task ends with its runtime.
        drop(self.agent_rt);
        r
    }
}

impl Run {
    fn record_ours(&mut self, test: &str, rep: usize, value: f64, unit: &str) {
        self.record_as(OURS, test, rep, value, unit);
    }

    fn record_as(&mut self, server: &str, test: &str, rep: usize, value: f64, unit: &str) {
        self.samples.push(Sample {
            server: server.into(),
            test: test.into(),
            rep,
            value,
            unit: unit.into(),
        });
    }

    /// Each completed disk image must read as its source and be clean; and
    /// carry the digest the hub computed while it was written.
    fn verify_point(
        &mut self,
        server: &str,
        test: &str,
        rep: usize,
        repo: &Path,
        done: &Value,
        srcs: &[PathBuf],
    ) {
        for (i, src) in srcs.iter().enumerate() {
            let d = &done["disks"][i];
            let img = repo.join(d["file"].as_str().unwrap_or("missing"));
            self.verify(
                Kind::Ours,
                &format!("{test}_disk{i}"),
                rep,
                "qcow2",
                &img,
                src,
            );
            // `verify` records under a server kind; this image is the hub's.
            if let Some(s) = self.samples.last_mut() {
                s.server = server.into();
            }
            if d["digest"].as_str().is_none() {
                self.failures
                    .push(format!("{test} rep {rep} disk {i}: no digest recorded"));
            }
        }
    }

    /// The original design's path on `srcs` (`kind` = qemu-nbd): one
    /// server per disk on a fresh qcow2 and one `nbdcopy --flush` per disk
    /// (durable when it exits), all in parallel; recorded as seconds, MB/s
    /// and the CPU seconds of every nbdcopy and server process (from start
    /// to exit). With `kind` = ours-digest it is the hub's ingest alone
    /// (qcow2 with digests, as a backup export), fed by nbdcopy.
    fn copy_path(
        &mut self,
        kind: Kind,
        srcs: &[PathBuf],
        test: &str,
        rep: usize,
    ) -> anyhow::Result<()> {
        use crate::servers::{Options, Spec};
        let mut specs = Vec::new();
        for i in 0..srcs.len() {
            let img = self.img(kind, &format!("{test}-{i}.qcow2"));
            self.fresh(&img, self.disk_size)?;
            specs.push(Spec {
                name: format!("disk{i}"),
                path: img,
                format: "qcow2",
                size: self.disk_size,
            });
        }
        let opts = Options {
            port_per_export: true,
            ..Options::default()
        };
        let (_, cpu0) = cpu_secs()?;
        let srv = crate::servers::start(kind, &specs, opts, &self.log(kind))?;
        let t = Instant::now();
        let mut children = Vec::new();
        for (src, uri) in srcs.iter().zip(&srv.uris) {
            children.push(
                std::process::Command::new("nbdcopy")
                    .arg("--flush")
                    .arg(src)
                    .arg(uri)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()?,
            );
        }
        for mut c in children {
            if !c.wait()?.success() {
                bail!("nbdcopy failed in {test}");
            }
        }
        let secs = t.elapsed().as_secs_f64();
        srv.stop()?;
        let (_, cpu1) = cpu_secs()?;
        let total = self.disk_size * srcs.len() as u64;
        self.record_mbps(kind, test, rep, total, secs);
        self.record(kind, &format!("{test}_secs"), rep, secs, "s");
        self.record(kind, &format!("{test}_cpu_s"), rep, cpu1 - cpu0, "s");
        for (i, s) in specs.iter().enumerate() {
            self.verify(
                kind,
                &format!("{test}_disk{i}"),
                rep,
                "qcow2",
                &s.path,
                &srcs[i],
            );
            crate::workloads::remove_image(&s.path);
        }
        Ok(())
    }

    /// One repetition of the issue-10 figure (`handoff` workload). The two
    /// paths take turns going first (even repetitions: qemu-nbd), so
    /// neither always runs on the caches and disk queue the other left.
    /// Both read the same sources, generated and synced just before, so
    /// from the page cache (4 GiB fits many times in this host's memory).
    pub fn handoff(&mut self, rep: usize, with_qemu: bool) -> anyhow::Result<()> {
        let n = self.disks;
        let dir = self.workdir.join("handoff");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Fresh sources every repetition: the incremental changes them.
        self.progress(format!("handoff: generating {n} sources"));
        let srcs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("src{i}.raw"))).collect();
        for (i, p) in srcs.iter().enumerate() {
            crate::data::generate(p, self.disk_size, 2 + i as u64)?;
        }
        let total = self.disk_size * n as u64;
        let full = format!("handoff_full_{n}x{}", size_name(self.disk_size));
        let qemu_first = rep % 2 == 0;
        if with_qemu && qemu_first {
            self.progress(format!("handoff: qemu-nbd + nbdcopy × {n}"));
            self.copy_path(Kind::QemuNbd, &srcs, &full, rep)?;
        }

        self.progress(format!("handoff: hub + agent, full of {n} disks"));
        let specs = srcs
            .iter()
            .map(|p| hub_agent::source::SourceSpec::Path(p.clone()))
            .collect();
        let stack = Stack::start(&dir, specs)?;
        let disks: Vec<Value> = (0..n)
            .map(|i| json!({"disk_id": i, "size_bytes": self.disk_size, "unit_number": i}))
            .collect();
        let vm = json!({"vm_context_id": "ctx-vm1", "disks": disks});
        stack.call("PUT", &format!("/api/v1/vms/{VM}"), Some(&vm))?;
        let (cpu0, _) = cpu_secs()?;
        let (full_secs, done) = stack.backup("full")?;
        let (cpu1, _) = cpu_secs()?;
        self.record_ours(&full, rep, total as f64 / 1e6 / full_secs, "MB/s");
        self.record_ours(&format!("{full}_secs"), rep, full_secs, "s");
        self.record_ours(&format!("{full}_cpu_s"), rep, cpu1 - cpu0, "s");
        // Compared before the sources change.
        self.verify_point(OURS, &full, rep, &stack.repo, &done, &srcs);
        if with_qemu && !qemu_first {
            self.progress(format!("handoff: qemu-nbd + nbdcopy × {n}"));
            self.copy_path(Kind::QemuNbd, &srcs, &full, rep)?;
        }

        if with_qemu {
            self.progress(format!(
                "handoff: ceilings (hub ingest via nbdcopy, hash, read, write) × {n}"
            ));
            self.copy_path(Kind::OursDigest, &srcs, &full, rep)?;
            self.handoff_ceilings(&dir, &srcs, &full, rep)?;
        }

        self.progress(String::from("handoff: changing 10 % of the blocks"));
        for (i, p) in srcs.iter().enumerate() {
            mutate(p, self.disk_size, 1000 * rep as u64 + i as u64)?;
        }
        self.progress(String::from("handoff: hub + agent, incremental"));
        let (inc_secs, done) = stack.backup("incremental")?;
        let inc = "handoff_incremental_10pct";
        self.record_ours(&format!("{inc}_secs"), rep, inc_secs, "s");
        self.record_ours(
            &format!("{inc}_over_full"),
            rep,
            inc_secs / full_secs,
            "ratio",
        );
        for i in 0..n {
            let mode = done["disks"][i]["backup_mode"].as_str().unwrap_or("");
            if mode != "incremental" {
                self.failures
                    .push(format!("{inc} rep {rep} disk {i}: backed up {mode:?}"));
            }
        }
        self.verify_point(OURS, inc, rep, &stack.repo, &done, &srcs);
        stack.stop()?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

/// Run `f` on every source in its own thread; the wall seconds and the
/// CPU seconds of this process meanwhile.
fn timed_per_source<F>(srcs: &[PathBuf], f: F) -> anyhow::Result<(f64, f64)>
where
    F: Fn(usize, &Path) -> std::io::Result<()> + Sync,
{
    let (c0, _) = cpu_secs()?;
    let t = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = srcs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let f = &f;
                s.spawn(move || f(i, p))
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("ceiling thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    let (c1, _) = cpu_secs()?;
    Ok((secs, c1 - c0))
}

/// Each 1 MiB piece of `path`, in order, to `f(offset, bytes)`.
fn each_piece(
    path: &Path,
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let mut got = 0;
        while got < buf.len() {
            match file.read(&mut buf[got..])? {
                0 => break,
                k => got += k,
            }
        }
        if got == 0 {
            return Ok(());
        }
        f(at, &buf[..got])?;
        at += got as u64;
    }
}

impl Run {
    /// What one host can do at most on these sources, each disk in its own
    /// thread as both paths do: read them (from the page cache), read and
    /// hash every 64 KiB leaf once (the agent's work; the hub hashes the
    /// same bytes again), and write their non-zero 64 KiB blocks to a raw
    /// file with one fsync at the end (the durable write every path owes).
    fn handoff_ceilings(
        &mut self,
        dir: &Path,
        srcs: &[PathBuf],
        test: &str,
        rep: usize,
    ) -> anyhow::Result<()> {
        const CEIL: &str = "ceiling";
        let total = self.disk_size * srcs.len() as u64;
        let rec = |run: &mut Run, what: &str, (secs, cpu): (f64, f64)| {
            run.record_as(
                CEIL,
                &format!("{test}_{what}"),
                rep,
                total as f64 / 1e6 / secs,
                "MB/s",
            );
            run.record_as(CEIL, &format!("{test}_{what}_cpu_s"), rep, cpu, "s");
        };
        let r = timed_per_source(srcs, |_, p| each_piece(p, |_, _| Ok(())))?;
        rec(self, "read", r);
        let r = timed_per_source(srcs, |_, p| {
            each_piece(p, |_, b| {
                for blk in b.chunks(BLOCK as usize) {
                    std::hint::black_box(disk_digest::algo::leaf(blk));
                }
                Ok(())
            })
        })?;
        rec(self, "read_hash", r);
        let outs: Vec<PathBuf> = (0..srcs.len())
            .map(|i| dir.join(format!("ceil{i}.raw")))
            .collect();
        let r = timed_per_source(srcs, |i, p| {
            let out = std::fs::File::create(&outs[i])?;
            out.set_len(std::fs::metadata(p)?.len())?;
            each_piece(p, |at, b| {
                for (k, blk) in b.chunks(BLOCK as usize).enumerate() {
                    if blk.iter().any(|x| *x != 0) {
                        out.write_all_at(blk, at + (k as u64) * BLOCK)?;
                    }
                }
                Ok(())
            })?;
            out.sync_all()
        })?;
        rec(self, "write_durable", r);
        for o in &outs {
            let _ = std::fs::remove_file(o);
        }
        Ok(())
    }
}

impl Run {
    /// One repetition of the dirty-bitmap variant (`handoff-bitmap`).
    pub fn handoff_bitmap(&mut self, rep: usize) -> anyhow::Result<()> {
        let n = self.disks;
        let dir = self.workdir.join("handoff-bitmap");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        self.progress(format!("handoff-bitmap: generating {n} qcow2 sources"));
        // Raw truths (compared with the restore points) and the qcow2
        // images qemu-nbd serves, each with bitmap b0 from before the full.
        let raws: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("src{i}.raw"))).collect();
        let imgs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("src{i}.qcow2"))).collect();
        for (i, (r, q)) in raws.iter().zip(&imgs).enumerate() {
            crate::data::generate(r, self.disk_size, 2 + i as u64)?;
            let (rs, qs) = (r.display().to_string(), q.display().to_string());
            crate::servers::qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &rs, &qs])?;
            crate::servers::qemu_img(&["bitmap", "--add", &qs, "b0"])?;
        }
        let ports = (0..n)
            .map(|_| crate::servers::free_port())
            .collect::<anyhow::Result<Vec<u16>>>()?;
        let log = dir.join("qemu-nbd.log");
        let serving = crate::servers::start_bitmap(&imgs, &ports, "b0", &log)?;
        let specs = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                hub_agent::source::SourceSpec::Nbd(format!(
                    "nbd://127.0.0.1:{p}/d{i}?dirty-bitmap=b0"
                ))
            })
            .collect();
        let total = self.disk_size * n as u64;
        let full = format!("handoff_full_{n}x{}", size_name(self.disk_size));
        self.progress(format!("handoff-bitmap: hub + agent, full of {n} disks"));
        let stack = Stack::start(&dir, specs)?;
        let disks: Vec<Value> = (0..n)
            .map(|i| json!({"disk_id": i, "size_bytes": self.disk_size, "unit_number": i}))
            .collect();
        let vm = json!({"vm_context_id": "ctx-vm1", "disks": disks});
        stack.call("PUT", &format!("/api/v1/vms/{VM}"), Some(&vm))?;
        let (full_secs, done) = stack.backup("full")?;
        self.record_as(
            OURS_BITMAP,
            &full,
            rep,
            total as f64 / 1e6 / full_secs,
            "MB/s",
        );
        self.record_as(OURS_BITMAP, &format!("{full}_secs"), rep, full_secs, "s");
        self.verify_point(OURS_BITMAP, &full, rep, &stack.repo, &done, &raws);

        // qemu-nbd loads the bitmap when it starts: stop it (SIGTERM, so
        // the image is closed cleanly), write, serve again on the same
        // ports the agent was configured with.
        self.progress(String::from("handoff-bitmap: changing 10 % of the blocks"));
        serving.stop()?;
        for (i, (r, q)) in raws.iter().zip(&imgs).enumerate() {
            let plan = change_plan(self.disk_size, 1000 * rep as u64 + i as u64);
            apply_plan(&plan, r, q)?;
        }
        let serving = crate::servers::start_bitmap(&imgs, &ports, "b0", &log)?;
        self.progress(String::from("handoff-bitmap: hub + agent, incremental"));
        let (inc_secs, done) = stack.backup("incremental")?;
        let inc = "handoff_incremental_10pct";
        self.record_as(OURS_BITMAP, &format!("{inc}_secs"), rep, inc_secs, "s");
        self.record_as(
            OURS_BITMAP,
            &format!("{inc}_over_full"),
            rep,
            inc_secs / full_secs,
            "ratio",
        );
        for i in 0..n {
            let mode = done["disks"][i]["backup_mode"].as_str().unwrap_or("");
            if mode != "incremental" {
                self.failures.push(format!(
                    "bitmap {inc} rep {rep} disk {i}: backed up {mode:?}"
                ));
            }
        }
        self.verify_point(OURS_BITMAP, inc, rep, &stack.repo, &done, &raws);
        stack.stop()?;
        serving.stop()?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

/// `1G`, `16M`: the size in a figure name.
fn size_name(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{}G", b >> 30)
    } else {
        format!("{}M", b >> 20)
    }
}
