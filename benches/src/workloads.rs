//! The workloads. Each runs one server through one client workload, records
//! samples, and verifies the result (qemu-img compare + check) — a figure
//! from a run that wrote wrong data is reported as a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::client::{self, Change};
use crate::data::Rng;
use crate::report::Sample;
use crate::servers::{self, Kind, Options, Spec};

/// One fio job.
#[derive(Debug, Clone, Copy)]
struct FioJob {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
    timed: bool,
}

/// Shared state of a run.
#[derive(Debug)]
pub struct Run {
    pub workdir: PathBuf,
    pub size: u64,
    pub disk_size: u64,
    pub disks: usize,
    pub conns: Vec<u32>,
    pub fio_runtime: u64,
    pub src: PathBuf,
    pub md_src: Vec<PathBuf>,
    pub base: PathBuf,
    pub expected: PathBuf,
    pub changes: Vec<Change>,
    pub samples: Vec<Sample>,
    pub failures: Vec<String>,
    pub progress: String,
}

fn run_cmd(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let st = cmd
        .stdout(f.try_clone()?)
        .stderr(f)
        .status()
        .with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st}); see {}", log.display());
    }
    Ok(())
}

fn qemu_img(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("qemu-img")
        .args(args)
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!(
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Make the changes of the incremental workload: random 64 KiB extents over
/// 10 % of the disk with new data, plus zeroed 1 MiB runs, non-overlapping,
/// in random order. Returns the changes and their data.
pub fn make_changes(size: u64, seed: u64) -> (Vec<Change>, Vec<u8>) {
    let mut rng = Rng(seed);
    let slots = size / 65536;
    let mut used = vec![false; slots as usize];
    let mut changes = Vec::new();
    let want = slots / 10;
    let mut payload = vec![0u8; want as usize * 65536];
    rng.fill(&mut payload);
    let mut at = 0;
    while (changes.len() as u64) < want {
        let s = rng.below(slots);
        if !used[s as usize] {
            used[s as usize] = true;
            changes.push(Change::Data {
                off: s * 65536,
                len: 65536,
                at,
            });
            at += 65536;
        }
    }
    // Zeroed ranges: 1 % of the disk in 1 MiB runs of unused slots.
    let runs = (size / 100 / (1 << 20)).max(1);
    for _ in 0..runs {
        let s = rng.below(slots.saturating_sub(16)) & !15;
        if (s..s + 16).all(|i| !used[i as usize]) {
            (s..s + 16).for_each(|i| used[i as usize] = true);
            changes.push(Change::Zero {
                off: s * 65536,
                len: 1 << 20,
            });
        }
    }
    // Shuffle (Fisher-Yates) so writes arrive scattered.
    for i in (1..changes.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        changes.swap(i, j);
    }
    (changes, payload)
}

/// Bytes the changes cover.
pub fn change_bytes(changes: &[Change]) -> u64 {
    changes
        .iter()
        .map(|c| match c {
            Change::Data { len, .. } | Change::Zero { len, .. } => u64::from(*len),
        })
        .sum()
}

/// The expected image after the changes: the source with every change applied.
pub fn write_expected(
    src: &Path,
    expected: &Path,
    changes: &[Change],
    payload: &[u8],
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::copy(src, expected)?;
    let f = std::fs::OpenOptions::new().write(true).open(expected)?;
    for c in changes {
        match *c {
            Change::Data { off, len, at } => {
                f.write_all_at(&payload[at..at + len as usize], off)?
            }
            Change::Zero { off, len } => f.write_all_at(&vec![0u8; len as usize], off)?,
        }
    }
    Ok(())
}

impl Run {
    pub(crate) fn log(&self, kind: Kind) -> PathBuf {
        self.workdir
            .join("log")
            .join(format!("{}.log", kind.name()))
    }

    pub(crate) fn img(&self, kind: Kind, name: &str) -> PathBuf {
        self.workdir
            .join("img")
            .join(format!("{}-{name}", kind.name()))
    }

    pub fn record(&mut self, kind: Kind, test: &str, rep: usize, value: f64, unit: &str) {
        // TLS figures are their own rows, compared with qemu-nbd over TLS.
        let test = if kind.tls() {
            format!("tls_{test}")
        } else {
            test.to_owned()
        };
        self.samples.push(Sample {
            server: kind.name().into(),
            test,
            rep,
            value,
            unit: unit.into(),
        });
    }

    pub fn progress(&mut self, msg: String) {
        eprint!("\r\x1b[K{}{msg}", self.progress);
    }

    /// Record `bytes` moved in `secs` as decimal MB/s.
    pub fn record_mbps(&mut self, kind: Kind, test: &str, rep: usize, bytes: u64, secs: f64) {
        self.record(kind, test, rep, bytes as f64 / 1e6 / secs, "MB/s");
    }

    /// Verify a qcow2/raw image against a raw source: compare and (qcow2) check.
    pub fn verify(
        &mut self,
        kind: Kind,
        test: &str,
        rep: usize,
        fmt: &str,
        img: &Path,
        src: &Path,
    ) {
        let cmp = qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            fmt,
            src.to_str().unwrap_or(""),
            img.to_str().unwrap_or(""),
        ]);
        let check = if fmt == "qcow2" {
            qemu_img(&["check", "-q", img.to_str().unwrap_or("")]).map(|_| ())
        } else {
            Ok(())
        };
        let ok = cmp.is_ok() && check.is_ok();
        self.record(
            kind,
            &format!("{test}_verified"),
            rep,
            if ok { 1.0 } else { 0.0 },
            "bool",
        );
        if !ok {
            self.failures.push(format!(
                "{} {test} rep {rep}: compare {:?} check {:?}",
                kind.name(),
                cmp.err(),
                check.err()
            ));
        }
    }

    /// The hub's verify engine on the image just written (and its digest
    /// sidecar) against `sha256sum` of the source: cold, then warm.
    fn verify_speed(&mut self, rep: usize, img: &Path) -> anyhow::Result<()> {
        self.progress(String::from("verify vs sha256sum"));
        let src = self.src.clone();
        for state in ["cold", "warm"] {
            // Same page-cache state for both: dropped (a restore point
            // verified days later), or the file read once just before.
            let prepare = |file: &Path| -> anyhow::Result<()> {
                if state == "cold" {
                    if !crate::verify::drop_caches() {
                        eprintln!("cannot drop caches (not root): cold figures are warm");
                    }
                } else {
                    crate::verify::read_through(file)?;
                }
                Ok(())
            };
            prepare(img)?;
            let secs = crate::verify::verify_secs(img)?;
            self.record_mbps(
                Kind::OursDigest,
                &format!("verify_{state}"),
                rep,
                self.size,
                secs,
            );
            prepare(&src)?;
            let secs = crate::verify::sha256sum_secs(&src)?;
            self.samples.push(Sample {
                server: "system".into(),
                test: format!("sha256sum_{state}"),
                rep,
                value: self.size as f64 / 1e6 / secs,
                unit: "MB/s".into(),
            });
        }
        // The cold state dropped the sources too: the workloads after this
        // one measure servers, not the source disk.
        self.warm_sources()
    }

    /// Read every source file into the page cache. Called before each
    /// server's writes and after anything that drops the caches: without
    /// it the four-disk figure of `ours-digest`, measured right after the
    /// cold verify, read its sources from the disk and halved.
    pub fn warm_sources(&self) -> anyhow::Result<()> {
        for p in std::iter::once(&self.src).chain(&self.md_src) {
            if p.exists() {
                crate::verify::read_through(p)?;
            }
        }
        Ok(())
    }

    /// The digest our server printed for `disk0` must be the source's.
    fn check_digest(
        &mut self,
        kind: Kind,
        test: &str,
        rep: usize,
        printed: &[String],
    ) -> anyhow::Result<()> {
        let want = crate::data::digest_file(&self.src)?;
        let got = printed
            .iter()
            .find_map(|l| l.strip_prefix("digest disk0 "))
            .map(str::to_owned);
        let ok = got.as_deref() == Some(want.as_str());
        self.record(
            kind,
            &format!("{test}_digest_ok"),
            rep,
            if ok { 1.0 } else { 0.0 },
            "bool",
        );
        if !ok {
            self.failures.push(format!(
                "{} {test} rep {rep}: digest {got:?}, source {want}",
                kind.name()
            ));
        }
        Ok(())
    }

    pub(crate) fn fresh(&self, path: &Path, size: u64) -> anyhow::Result<()> {
        remove_image(path);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path.to_str().unwrap_or(""),
            &size.to_string(),
        ])?;
        Ok(())
    }

    fn nbdcopy(&self, kind: Kind, args: &[&str]) -> anyhow::Result<f64> {
        let t = Instant::now();
        run_cmd(Command::new("nbdcopy").args(args), &self.log(kind))?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Sequential backup write of the source into a fresh qcow2.
    pub fn write(&mut self, kind: Kind, rep: usize) -> anyhow::Result<()> {
        for c in self.conns.clone() {
            self.progress(format!("{}: write, {c} connection(s)", kind.name()));
            let img = self.img(kind, "write.qcow2");
            self.fresh(&img, self.size)?;
            let spec = [Spec {
                name: "disk0".into(),
                path: img.clone(),
                format: "qcow2",
                size: self.size,
            }];
            let srv = servers::start(kind, &spec, Options::default(), &self.log(kind))?;
            if rep == 1 && c == self.conns[0] {
                let (rss, _, _) = servers::memory(&srv.pids());
                self.record(kind, "idle_rss_1_export", rep, rss as f64, "KiB");
            }
            let cs = c.to_string();
            let secs = self.nbdcopy(
                kind,
                &[
                    "--flush",
                    "-C",
                    &cs,
                    "-T",
                    &cs,
                    self.src.to_str().unwrap_or(""),
                    &srv.uris[0],
                ],
            )?;
            self.record_mbps(
                kind,
                &format!("write_fresh_qcow2_c{c}"),
                rep,
                self.size,
                secs,
            );
            let printed = srv.stop()?;
            if kind.digest() {
                self.check_digest(kind, &format!("write_fresh_qcow2_c{c}"), rep, &printed)?;
                if c == self.conns[0] && kind == Kind::OursDigest {
                    self.verify_speed(rep, &img)?;
                }
            }
            let src = self.src.clone();
            self.verify(
                kind,
                &format!("write_fresh_qcow2_c{c}"),
                rep,
                "qcow2",
                &img,
                &src,
            );
            remove_image(&img);
        }
        Ok(())
    }

    /// Incremental: scattered 64 KiB writes and zeroed runs into an overlay.
    pub fn overlay(
        &mut self,
        kind: Kind,
        rep: usize,
        payload: &Arc<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.progress(format!("{}: incremental overlay", kind.name()));
        let ov = self
            .workdir
            .join("img")
            .join(format!("{}-overlay.qcow2", kind.name()));
        let _ = std::fs::remove_file(&ov);
        let base_name = self
            .base
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("base.qcow2")
            .to_owned();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base_name,
            "-F",
            "qcow2",
            ov.to_str().unwrap_or(""),
        ])?;
        let spec = [Spec {
            name: "disk0".into(),
            path: ov.clone(),
            format: "qcow2",
            size: self.size,
        }];
        let srv = servers::start(kind, &spec, Options::default(), &self.log(kind))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let t = Instant::now();
        rt.block_on(client::apply(
            &srv.uris[0],
            Arc::clone(payload),
            &self.changes,
            32,
        ))?;
        let secs = t.elapsed().as_secs_f64();
        self.record_mbps(
            kind,
            "overlay_write",
            rep,
            change_bytes(&self.changes),
            secs,
        );
        srv.stop()?;
        let expected = self.expected.clone();
        self.verify(kind, "overlay_write", rep, "qcow2", &ov, &expected);
        let _ = std::fs::remove_file(&ov);
        Ok(())
    }

    /// N disks written in parallel, to N exports.
    pub fn multi(&mut self, kind: Kind, rep: usize) -> anyhow::Result<()> {
        self.progress(format!("{}: {} disks in parallel", kind.name(), self.disks));
        let srcs = self.md_src.clone();
        let test = format!("multi{}", self.disks);
        let (secs, rss) = self.parallel_copy(kind, &srcs, &test, rep)?;
        let total = self.disk_size * self.disks as u64;
        self.record_mbps(kind, &format!("{test}_aggregate_write"), rep, total, secs);
        self.record(
            kind,
            &format!("{test}_server_rss"),
            rep,
            rss.end as f64,
            "KiB",
        );
        self.record(
            kind,
            &format!("{test}_server_peak_rss"),
            rep,
            rss.peak as f64,
            "KiB",
        );
        Ok(())
    }

    /// The original design's path for a VM: one export per source on fresh
    /// qcow2 images (a port each) and one `nbdcopy --flush` per disk, all in
    /// parallel. Verifies every image (as `{test}_disk{i}`) and removes it;
    /// returns the wall time of the copies and the server RSS during them.
    pub fn parallel_copy(
        &mut self,
        kind: Kind,
        srcs: &[PathBuf],
        test: &str,
        rep: usize,
    ) -> anyhow::Result<(f64, Rss)> {
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
        let srv = servers::start(kind, &specs, opts, &self.log(kind))?;
        let t = Instant::now();
        let mut children = Vec::new();
        for (src, uri) in srcs.iter().zip(&srv.uris) {
            children.push(
                Command::new("nbdcopy")
                    .args(["--flush", src.to_str().unwrap_or(""), uri])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        // The servers' summed RSS, sampled while the copies run (qemu-nbd's
        // four processes peak at different moments: their VmHWM summed
        // would overstate them).
        let pids = srv.pids();
        let mut peak = 0;
        while !children.is_empty() {
            peak = peak.max(servers::memory(&pids).0);
            let mut running = Vec::with_capacity(children.len());
            for mut c in children {
                match c.try_wait()? {
                    Some(status) if !status.success() => bail!("nbdcopy failed in {test}"),
                    Some(_) => {}
                    None => running.push(c),
                }
            }
            children = running;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let secs = t.elapsed().as_secs_f64();
        let (end, _, _) = servers::memory(&pids);
        let rss = Rss {
            end,
            peak: peak.max(end),
        };
        srv.stop()?;
        for (i, s) in specs.iter().enumerate() {
            self.verify(
                kind,
                &format!("{test}_disk{i}"),
                rep,
                "qcow2",
                &s.path,
                &srcs[i],
            );
            remove_image(&s.path);
        }
        Ok((secs, rss))
    }

    fn fio(&self, kind: Kind, uri: &str, job: FioJob) -> anyhow::Result<(f64, f64)> {
        let FioJob {
            name,
            rw,
            bs,
            qd,
            timed,
        } = job;
        let out = self
            .workdir
            .join("log")
            .join(format!("fio-{}-{name}.json", kind.name()));
        let mut cmd = Command::new("fio");
        cmd.args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={qd}"),
            &format!("--size={}", self.size),
            "--output-format=json",
            &format!("--output={}", out.display()),
        ]);
        if timed {
            cmd.args(["--time_based", &format!("--runtime={}", self.fio_runtime)]);
        }
        if rw.contains("write") {
            cmd.arg("--end_fsync=1");
        }
        run_cmd(&mut cmd, &self.log(kind))?;
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        let job = &j["jobs"][0];
        let side = if rw.contains("write") {
            &job["write"]
        } else {
            &job["read"]
        };
        Ok((
            side["iops"].as_f64().unwrap_or(0.0),
            side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        ))
    }

    /// 4k random I/O at queue depth 32 (fio's nbd engine).
    pub fn random(&mut self, kind: Kind, rep: usize) -> anyhow::Result<()> {
        self.progress(format!("{}: fio 4k random QD32", kind.name()));
        let img = self.img(kind, "fio.qcow2");
        self.fresh(&img, self.size)?;
        let spec = [Spec {
            name: "disk0".into(),
            path: img.clone(),
            format: "qcow2",
            size: self.size,
        }];
        let srv = servers::start(kind, &spec, Options::default(), &self.log(kind))?;
        let uri = srv.uris[0].clone();
        let (iops, _) = self.fio(
            kind,
            &uri,
            FioJob {
                name: "randwrite-fresh",
                rw: "randwrite",
                bs: "4k",
                qd: 32,
                timed: true,
            },
        )?;
        self.record(kind, "randwrite_4k_qd32_fresh", rep, iops, "IOPS");
        let (_, mbps) = self.fio(
            kind,
            &uri,
            FioJob {
                name: "fill",
                rw: "write",
                bs: "1M",
                qd: 8,
                timed: false,
            },
        )?;
        self.record(kind, "fio_seqwrite_1M_qd8", rep, mbps, "MB/s");
        let (iops, _) = self.fio(
            kind,
            &uri,
            FioJob {
                name: "randwrite-alloc",
                rw: "randwrite",
                bs: "4k",
                qd: 32,
                timed: true,
            },
        )?;
        self.record(kind, "randwrite_4k_qd32_allocated", rep, iops, "IOPS");
        let (iops, _) = self.fio(
            kind,
            &uri,
            FioJob {
                name: "randread",
                rw: "randread",
                bs: "4k",
                qd: 32,
                timed: true,
            },
        )?;
        self.record(kind, "randread_4k_qd32", rep, iops, "IOPS");
        srv.stop()?;
        let ok = qemu_img(&["check", "-q", img.to_str().unwrap_or("")]).is_ok();
        self.record(
            kind,
            "random_check_clean",
            rep,
            if ok { 1.0 } else { 0.0 },
            "bool",
        );
        if !ok {
            self.failures.push(format!(
                "{} random rep {rep}: qemu-img check failed",
                kind.name()
            ));
        }
        remove_image(&img);
        Ok(())
    }

    /// The protocol ceiling: a null backend, writes and dense reads.
    pub fn null(&mut self, kind: Kind, rep: usize) -> anyhow::Result<()> {
        self.progress(format!("{}: null backend", kind.name()));
        let path = PathBuf::from(format!("null:{}", self.size));
        let spec = [Spec {
            name: "disk0".into(),
            path,
            format: "raw",
            size: self.size,
        }];
        let srv = servers::start(kind, &spec, Options::default(), &self.log(kind))?;
        let secs = self.nbdcopy(
            kind,
            &[
                "-C",
                "1",
                "-T",
                "1",
                self.src.to_str().unwrap_or(""),
                &srv.uris[0],
            ],
        )?;
        self.record_mbps(kind, "null_write_c1", rep, self.size, secs);
        let secs = self.nbdcopy(
            kind,
            &["--no-extents", "-C", "1", "-T", "1", &srv.uris[0], "null:"],
        )?;
        self.record_mbps(kind, "null_read_c1_no_extents", rep, self.size, secs);
        srv.stop()?;
        Ok(())
    }

    /// N idle exports: memory per export and time to bring them all up.
    pub fn idle(&mut self, kind: Kind, n: usize) -> anyhow::Result<()> {
        self.progress(format!("{}: {n} idle exports", kind.name()));
        let dir = self
            .workdir
            .join("img")
            .join(format!("idle-{}", kind.name()));
        std::fs::create_dir_all(&dir)?;
        let first = dir.join("e0.qcow2");
        self.fresh(&first, 1 << 30)?;
        let mut specs = Vec::with_capacity(n);
        for i in 0..n {
            let p = dir.join(format!("e{i}.qcow2"));
            if i > 0 {
                std::fs::copy(&first, &p)?;
            }
            specs.push(Spec {
                name: format!("disk{i}"),
                path: p,
                format: "qcow2",
                size: 1 << 30,
            });
        }
        let opts = Options {
            port_per_export: true,
            ..Options::default()
        };
        let srv = servers::start(kind, &specs, opts, &self.log(kind))?;
        let up = srv.ready_after.as_secs_f64();
        let (rss, pss, private) = servers::memory(&srv.pids());
        let n64 = n as f64;
        self.record(
            kind,
            &format!("idle{n}_rss_per_export"),
            1,
            rss as f64 / n64,
            "KiB",
        );
        self.record(
            kind,
            &format!("idle{n}_pss_per_export"),
            1,
            pss as f64 / n64,
            "KiB",
        );
        self.record(
            kind,
            &format!("idle{n}_private_per_export"),
            1,
            private as f64 / n64,
            "KiB",
        );
        self.record(kind, &format!("idle{n}_bring_up"), 1, up, "s");
        srv.stop()?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

/// Remove an image and the digest sidecar a `--digest` server kept beside it.
pub(crate) fn remove_image(path: &Path) {
    let _ = std::fs::remove_file(path);
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push(".digest");
    let _ = std::fs::remove_file(&sidecar);
}

/// Server memory during a workload (KiB, all its processes summed).
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    /// When the workload finished.
    pub end: u64,
    /// The most sampled while it ran (every 10 ms).
    pub peak: u64,
}
