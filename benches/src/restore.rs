//! Restore reads (issue 13): a restore point served read-only (ours:
//! `hub-daemon export -r`, qemu-nbd: `-r`) and read the ways a restore
//! reads it, with the page cache put in the same state for both servers
//! before every figure:
//!
//! - `cold`: `sync` + drop caches (the normal restore, days after the
//!   backup; needs root);
//! - `warm`: every file of the image read once just before.
//!
//! Figures (`restore_{cache}_…`): sequential nbdcopy of the full image to
//! `null:` and to a file, with and without extents; a 20-deep chain (a
//! base and 19 overlays each 5 % changed, built once with qemu-img/qemu-io
//! so both servers read the same files) to `null:`; `qemu-img convert -O qcow2`
//! from the export (a restore into a hypervisor); fio 4k random reads at
//! QD32. Every file written is compared with what it must hold.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::data::Rng;
use crate::servers::{self, Kind, Options, Spec};
use crate::workloads::Run;

/// Layers of the chain figure, the base included.
pub const CHAIN_DEPTH: usize = 20;
/// Share of the disk each overlay of the chain rewrites, in percent.
const CHAIN_CHANGED_PERCENT: u64 = 5;
/// Size of one chain write (one default cluster).
const CHAIN_WRITE: u64 = 64 << 10;

/// Page-cache state before a read figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`).
    Cold,
    /// The image files read once just before.
    Warm,
}

impl Cache {
    /// Name in figures and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Warm => "warm",
        }
    }

    /// Parse `cold` / `warm`.
    pub fn parse(s: &str) -> anyhow::Result<Cache> {
        match s {
            "cold" => Ok(Cache::Cold),
            "warm" => Ok(Cache::Warm),
            other => bail!("--cache: unknown state {other} (cold, warm)"),
        }
    }

    /// Put the page cache in this state for `files`. Cold fails if the
    /// caches cannot be dropped: a "cold" figure that is warm would lie.
    pub fn prepare(self, files: &[PathBuf]) -> anyhow::Result<()> {
        match self {
            Cache::Cold => {
                if !crate::digest::drop_caches() {
                    bail!("cannot drop the page cache (needs root): use --cache warm");
                }
            }
            Cache::Warm => {
                for f in files {
                    crate::digest::warm(f)?;
                }
            }
        }
        Ok(())
    }
}

/// The default states: both when the caches can be dropped, else warm.
pub fn default_caches() -> Vec<Cache> {
    let root = std::fs::metadata("/proc/sys/vm/drop_caches")
        .map(|m| !m.permissions().readonly())
        .unwrap_or(false)
        && std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/vm/drop_caches")
            .is_ok();
    if root {
        vec![Cache::Cold, Cache::Warm]
    } else {
        vec![Cache::Warm]
    }
}

/// `cmd`, its output to `log`; seconds it took.
fn timed(cmd: &mut Command, log: &Path) -> anyhow::Result<f64> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let t = Instant::now();
    let st = cmd
        .stdout(f.try_clone()?)
        .stderr(f)
        .status()
        .with_context(|| format!("{cmd:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!("{cmd:?} failed ({st}); see {}", log.display());
    }
    Ok(secs)
}

/// What `kind` serves for the qcow2 `image`: the image itself, or for
/// the [`Kind::flat_raw`] servers its flattened raw copy (sparse, made once beside
/// it as `*.flat.raw`; [`flat_raw_of`] names it for removal).
fn served(kind: Kind, image: &Path) -> anyhow::Result<(PathBuf, &'static str)> {
    if !kind.flat_raw() {
        return Ok((image.to_path_buf(), "qcow2"));
    }
    let raw = flat_raw_of(image);
    if !raw.exists() {
        servers::qemu_img(&[
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path_str(image)?,
            path_str(&raw)?,
        ])?;
    }
    Ok((raw, "raw"))
}

/// The flattened raw copy [`served`] makes of `image`.
pub fn flat_raw_of(image: &Path) -> PathBuf {
    image.with_extension("flat.raw")
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Build the chain once: `l00.qcow2` a copy of `base`, then overlays
/// `l01..` each with 5 % of the disk rewritten in 64 KiB extents at random
/// offsets (a different pattern per layer, so a layer read from the wrong
/// depth shows). Returns the layers, base first.
pub fn build_chain(dir: &Path, base: &Path, size: u64) -> anyhow::Result<Vec<PathBuf>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut layers = vec![dir.join("l00.qcow2")];
    std::fs::copy(base, &layers[0])?;
    let mut rng = Rng(1313);
    let slots = (size / CHAIN_WRITE).max(1);
    let per_layer = (slots * CHAIN_CHANGED_PERCENT / 100).max(1);
    for i in 1..CHAIN_DEPTH {
        let top = dir.join(format!("l{i:02}.qcow2"));
        let parent = format!("l{:02}.qcow2", i - 1);
        servers::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &parent,
            "-F",
            "qcow2",
            path_str(&top)?,
        ])?;
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for _ in 0..per_layer {
            let off = rng.below(slots) * CHAIN_WRITE;
            cmd.arg("-c")
                .arg(format!("write -q -P {} {off} {CHAIN_WRITE}", 0x10 + i));
        }
        let out = cmd.arg(&top).stderr(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!(
                "qemu-io on {}: {}",
                top.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        layers.push(top);
    }
    Ok(layers)
}

/// CPU seconds the server and the client (a child of this process, waited
/// for) spend on one workload: where a zero-copy path moves the work to.
struct CpuMeter {
    server: f64,
    children: f64,
}

impl CpuMeter {
    fn start(srv: &servers::Running) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            server: srv.cpu_secs()?,
            children: crate::handoff::cpu_secs()?.1,
        })
    }

    /// (server, client) CPU seconds since `start`.
    fn stop(self, srv: &servers::Running) -> anyhow::Result<(f64, f64)> {
        Ok((
            srv.cpu_secs()? - self.server,
            crate::handoff::cpu_secs()?.1 - self.children,
        ))
    }
}

impl Run {
    /// `{name}_server_cpu` and `{name}_client_cpu`: CPU seconds per GiB
    /// moved.
    fn record_cpu(&mut self, kind: Kind, name: &str, rep: usize, (server, client): (f64, f64)) {
        let gib = self.size as f64 / f64::from(1u32 << 30);
        self.record(
            kind,
            &format!("{name}_server_cpu"),
            rep,
            server / gib,
            "CPU s/GiB",
        );
        self.record(
            kind,
            &format!("{name}_client_cpu"),
            rep,
            client / gib,
            "CPU s/GiB",
        );
    }

    /// The restore figures of `kind` for one repetition, every state in
    /// `caches`. `chain` is the layers of [`build_chain`], base first.
    pub fn restore(
        &mut self,
        kind: Kind,
        rep: usize,
        caches: &[Cache],
        chain: &[PathBuf],
        fio: bool,
    ) -> anyhow::Result<()> {
        let log = self
            .workdir
            .join("log")
            .join(format!("{}.log", kind.name()));
        let opts = Options {
            readonly: true,
            ..Options::default()
        };
        let src = self.src.clone();
        let (image, format) = served(kind, &self.base)?;
        let img_files = [image.clone()];
        let spec = [Spec {
            name: "disk0".into(),
            path: image,
            format,
            size: self.size,
        }];
        let srv = servers::start(kind, &spec, opts, &log)?;
        let uri = srv.uris[0].clone();
        let out_raw = self.workdir.join("img").join("restore.raw");
        let out_qcow = self.workdir.join("img").join("restore.qcow2");
        for &cache in caches {
            let c = cache.name();
            for extents in [true, false] {
                let suffix = if extents { "" } else { "_no_extents" };
                // To null: (what moves over the socket) and to a file (a restore).
                self.progress(format!("{}: restore {c} seq read{suffix}", kind.name()));
                let mut args = vec!["-C", "1", "-T", "1"];
                if !extents {
                    args.push("--no-extents");
                }
                cache.prepare(&img_files)?;
                let cpu = CpuMeter::start(&srv)?;
                let secs = timed(
                    Command::new("nbdcopy").args(&args).args([&uri, "null:"]),
                    &log,
                )?;
                let name = format!("restore_{c}_seq_null{suffix}");
                self.record_cpu(kind, &name, rep, cpu.stop(&srv)?);
                self.record_mbps(kind, &name, rep, self.size, secs);
                let _ = std::fs::remove_file(&out_raw);
                cache.prepare(&img_files)?;
                let secs = timed(
                    Command::new("nbdcopy")
                        .args(&args)
                        .args([uri.as_str(), path_str(&out_raw)?]),
                    &log,
                )?;
                self.record_mbps(
                    kind,
                    &format!("restore_{c}_seq_file{suffix}"),
                    rep,
                    self.size,
                    secs,
                );
                self.verify(
                    kind,
                    &format!("restore_{c}_seq_file{suffix}"),
                    rep,
                    "raw",
                    &out_raw,
                    &src,
                );
                let _ = std::fs::remove_file(&out_raw);
            }
            // A restore into a hypervisor: a new qcow2 from the export.
            self.progress(format!("{}: restore {c} qemu-img convert", kind.name()));
            let _ = std::fs::remove_file(&out_qcow);
            cache.prepare(&img_files)?;
            let secs = timed(
                Command::new("qemu-img").args([
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    &uri,
                    path_str(&out_qcow)?,
                ]),
                &log,
            )?;
            self.record_mbps(
                kind,
                &format!("restore_{c}_convert_qcow2"),
                rep,
                self.size,
                secs,
            );
            self.verify(
                kind,
                &format!("restore_{c}_convert_qcow2"),
                rep,
                "qcow2",
                &out_qcow,
                &src,
            );
            let _ = std::fs::remove_file(&out_qcow);
            if fio {
                self.progress(format!("{}: restore {c} 4k random read QD32", kind.name()));
                cache.prepare(&img_files)?;
                let iops = self.fio_randread(kind, &uri, c)?;
                self.record(
                    kind,
                    &format!("restore_{c}_randread_4k_qd32"),
                    rep,
                    iops,
                    "IOPS",
                );
            }
        }
        srv.stop()?;
        self.restore_chain(kind, rep, caches, chain, &log)?;
        Ok(())
    }

    /// The 20-deep chain read to `null:`; the top read to a file and
    /// compared with what qemu-img sees in the first repetition.
    fn restore_chain(
        &mut self,
        kind: Kind,
        rep: usize,
        caches: &[Cache],
        chain: &[PathBuf],
        log: &Path,
    ) -> anyhow::Result<()> {
        let Some(top) = chain.last() else {
            return Ok(());
        };
        let depth = chain.len();
        let opts = Options {
            readonly: true,
            ..Options::default()
        };
        let (image, format) = served(kind, top)?;
        let files = if format == "raw" {
            vec![image.clone()]
        } else {
            chain.to_vec()
        };
        let spec = [Spec {
            name: "disk0".into(),
            path: image,
            format,
            size: self.size,
        }];
        let srv = servers::start(kind, &spec, opts, log)?;
        let uri = srv.uris[0].clone();
        for &cache in caches {
            let c = cache.name();
            self.progress(format!("{}: restore {c} chain of {depth}", kind.name()));
            cache.prepare(&files)?;
            let cpu = CpuMeter::start(&srv)?;
            let secs = timed(
                Command::new("nbdcopy").args(["-C", "1", "-T", "1", &uri, "null:"]),
                log,
            )?;
            let name = format!("restore_{c}_chain{depth}_null");
            self.record_cpu(kind, &name, rep, cpu.stop(&srv)?);
            self.record_mbps(kind, &name, rep, self.size, secs);
        }
        if rep == 1 {
            let out = self.workdir.join("img").join("chain-readback.raw");
            let _ = std::fs::remove_file(&out);
            timed(
                Command::new("nbdcopy").args([uri.as_str(), path_str(&out)?]),
                log,
            )?;
            let ok = servers::qemu_img(&[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                path_str(top)?,
                path_str(&out)?,
            ]);
            self.record(
                kind,
                &format!("restore_chain{depth}_verified"),
                rep,
                if ok.is_ok() { 1.0 } else { 0.0 },
                "bool",
            );
            if let Err(e) = ok {
                self.failures
                    .push(format!("{} chain{depth} rep {rep}: {e}", kind.name()));
            }
            let _ = std::fs::remove_file(&out);
        }
        srv.stop()?;
        Ok(())
    }

    /// fio 4k random reads at QD32 over the whole disk, timed; IOPS.
    fn fio_randread(&self, kind: Kind, uri: &str, cache: &str) -> anyhow::Result<f64> {
        self.fio_4k_qd32(&format!("{}-restore-{cache}", kind.name()), uri, "randread")
    }
}
