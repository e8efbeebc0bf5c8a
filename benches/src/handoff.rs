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

/// A hub and an agent serving `srcs` as the disks of `VM`.
struct Stack {
    rt: tokio::runtime::Runtime,
    daemon: hub_daemon::app::Daemon,
    repo: PathBuf,
}

impl Stack {
    fn start(dir: &Path, srcs: Vec<hub_agent::source::SourceSpec>) -> anyhow::Result<Stack> {
        // Two workers: what the machine has; hub and agent share them as
        // they would share a small appliance host.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let state_dir = dir.join("agent-state");
        let data_dir = dir.join("hub");
        std::fs::create_dir_all(&state_dir)?;
        let sources: BTreeMap<(String, u32), hub_agent::source::SourceSpec> = srcs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| ((VM.to_owned(), 2000 + i as u32), spec))
            .collect();
        let daemon = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let agent_url = format!("http://{}", l.local_addr()?);
            let agent = hub_agent::serve::Agent::new(hub_agent::serve::AgentConfig {
                state_dir,
                token: None,
                sources,
                stream: hub_agent::stream::StreamOptions::default(),
                progress_every: hub_agent::serve::PROGRESS_EVERY,
            });
            tokio::spawn(hub_agent::serve::serve(l, agent, std::future::pending()));
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
        self.rt.block_on(self.daemon.shutdown())
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

    /// One repetition of the issue-10 figure (`handoff` workload).
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
        if with_qemu {
            self.progress(format!("handoff: qemu-nbd + nbdcopy × {n}"));
            let (secs, _) = self.parallel_copy(Kind::QemuNbd, &srcs, &full, rep)?;
            self.record_mbps(Kind::QemuNbd, &full, rep, total, secs);
            self.record(Kind::QemuNbd, &format!("{full}_secs"), rep, secs, "s");
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
        let (full_secs, done) = stack.backup("full")?;
        self.record_ours(&full, rep, total as f64 / 1e6 / full_secs, "MB/s");
        self.record_ours(&format!("{full}_secs"), rep, full_secs, "s");
        // Compared before the sources change.
        self.verify_point(OURS, &full, rep, &stack.repo, &done, &srcs);

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
