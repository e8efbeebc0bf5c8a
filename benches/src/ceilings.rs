//! The `ceilings` workload: what this machine and this client can do at
//! all, measured in every repetition next to the servers, so a write
//! figure can be judged against what any server could reach here.
//!
//! * `ceiling_fs_write_fsync`: `dd` of the source into a file in the image
//!   directory with nbdcopy's request size and one fsync at the end, the
//!   same pattern as a backup ending in FLUSH (but dd also writes the zero
//!   quarter that nbdcopy sends as WRITE_ZEROES).
//! * `ceiling_client_null_c{N}`: `nbdcopy --flush` of the source into
//!   `nbdkit null`: the client's own rate with a server that does nothing.
//! * `ceiling_client_tls_null_c{N}`: the same over TLS (`nbdkit --tls=require`,
//!   GnuTLS on both ends, the credentials of the TLS servers). With one
//!   connection nbdcopy decrypts nothing but encrypts everything on one
//!   thread, so this bounds every TLS write figure from this client.
//! * `ceiling_ours_tls_null_c{N}`: our server over TLS into its null
//!   backend: our TLS receive path without an image or digests.
//! * `ceiling_client_read_c1`: `nbdcopy -C 1 -T 1` from `nbdkit pattern`
//!   (data everywhere, made on the fly) to `null:`, the options of the
//!   restore suite's sequential reads: what this client can pull over NBD
//!   from a server that reads nothing from disk.
//! * `ceiling_client_read_file_c1`: the same into a raw file, as the
//!   restore suite's `seq_file` figures write theirs (every byte data, as
//!   with `--no-extents`): the client's rate when it must also write what
//!   it reads.
//!
//! The restore figures have their own ceiling server, `nbdkit-file`
//! (`--servers …,nbdkit-file`): every read workload against a flat raw
//! copy of the same image served by nbdkit's file plugin.
//! * `ceiling_client_randread_4k_qd32` / `ceiling_client_randwrite_4k_qd32`:
//!   fio's nbd engine against `nbdkit null`, the random figures' jobs: the
//!   IOPS the protocol round trips allow here at all.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::report::Sample;
use crate::servers::{self, Kind, Options, Spec};
use crate::workloads::Run;

/// nbdcopy's default request size: the block size of the dd ceiling.
const DD_BLOCK: &str = "256K";

/// An `nbdkit null` child, killed when dropped.
struct Nbdkit {
    child: std::process::Child,
    uri: String,
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbdkit_null(size: u64, tls: bool) -> anyhow::Result<Nbdkit> {
    nbdkit_plugin("null", size, tls)
}

fn nbdkit_plugin(plugin: &str, size: u64, tls: bool) -> anyhow::Result<Nbdkit> {
    let port = servers::free_port()?;
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-p", &port.to_string(), "-i", "127.0.0.1"]);
    if tls {
        cmd.arg("--tls=require").arg(format!(
            "--tls-certificates={}",
            servers::tls_dir()?.display()
        ));
    }
    cmd.args([plugin, &size.to_string()]);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning nbdkit")?;
    let mut k = Nbdkit {
        child,
        uri: String::new(),
    };
    servers::wait_ready(port, &mut k.child)?;
    k.uri = if tls {
        format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            servers::tls_dir()?.display()
        )
    } else {
        format!("nbd://127.0.0.1:{port}/")
    };
    Ok(k)
}

impl Run {
    /// Seconds of one `nbdcopy --flush -C c -T c SRC URI`.
    fn copy_secs(&self, c: u32, uri: &str) -> anyhow::Result<f64> {
        let cs = c.to_string();
        let src = self.src.to_str().unwrap_or("");
        let t = Instant::now();
        let out = Command::new("nbdcopy")
            .args(["--flush", "-C", &cs, "-T", &cs, src, uri])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!(
                "nbdcopy into {uri}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Seconds of one `nbdcopy -C 1 -T 1 URI DST` (the restore reads).
    fn read_secs(&self, uri: &str, dst: &str) -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = Command::new("nbdcopy")
            .args(["-C", "1", "-T", "1", uri, dst])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!(
                "nbdcopy from {uri}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// IOPS of fio's nbd engine doing `rw` 4k at QD32 over the whole disk
    /// for the run's fio time; `name` names its JSON and log files.
    pub(crate) fn fio_4k_qd32(&self, name: &str, uri: &str, rw: &str) -> anyhow::Result<f64> {
        let log_dir = self.workdir.join("log");
        let out = log_dir.join(format!("fio-{name}.json"));
        let log = std::fs::File::create(log_dir.join(format!("fio-{name}.log")))?;
        let st = Command::new("fio")
            .args([
                &format!("--name={name}"),
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=32",
                &format!("--size={}", self.size),
                "--time_based",
                &format!("--runtime={}", self.fio_runtime),
                "--output-format=json",
                &format!("--output={}", out.display()),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .status()?;
        if !st.success() {
            bail!(
                "fio {name} against {uri} failed (see {})",
                log_dir.display()
            );
        }
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        let side = if rw.contains("write") {
            "write"
        } else {
            "read"
        };
        Ok(j["jobs"][0][side]["iops"].as_f64().unwrap_or(0.0))
    }

    /// The client-side ceilings of the restore and random figures.
    fn read_ceilings(&mut self, rep: usize) -> anyhow::Result<()> {
        self.progress("ceilings: nbdcopy from nbdkit pattern".into());
        let k = nbdkit_plugin("pattern", self.size, false)?;
        let secs = self.read_secs(&k.uri, "null:")?;
        self.push_ceiling("nbdkit-pattern", "ceiling_client_read_c1".into(), rep, secs);
        self.progress("ceilings: nbdcopy from nbdkit pattern to a file".into());
        let out = self.workdir.join("img").join("ceiling-read.raw");
        let _ = std::fs::remove_file(&out);
        let secs = self.read_secs(&k.uri, out.to_str().unwrap_or(""));
        let _ = std::fs::remove_file(&out);
        drop(k);
        self.push_ceiling(
            "nbdkit-pattern",
            "ceiling_client_read_file_c1".into(),
            rep,
            secs?,
        );
        for rw in ["randread", "randwrite"] {
            self.progress(format!("ceilings: fio {rw} into nbdkit null"));
            let k = nbdkit_null(self.size, false)?;
            let iops = self.fio_4k_qd32(&format!("ceiling-{rw}"), &k.uri, rw)?;
            drop(k);
            self.samples.push(Sample {
                server: "nbdkit-null".into(),
                test: format!("ceiling_client_{rw}_4k_qd32"),
                rep,
                value: iops,
                unit: "IOPS".into(),
            });
        }
        Ok(())
    }

    fn push_ceiling(&mut self, server: &str, test: String, rep: usize, secs: f64) {
        self.samples.push(Sample {
            server: server.into(),
            test,
            rep,
            value: self.size as f64 / 1e6 / secs,
            unit: "MB/s".into(),
        });
    }

    /// One repetition of the ceilings (nbdkit needed for the client ones).
    pub fn ceilings(&mut self, rep: usize, nbdkit: bool) -> anyhow::Result<()> {
        self.progress("ceilings: dd with fsync".into());
        let out = self.workdir.join("img").join("ceiling-dd.out");
        let t = Instant::now();
        let st = Command::new("dd")
            .arg(format!("if={}", self.src.display()))
            .arg(format!("of={}", out.display()))
            .args([&format!("bs={DD_BLOCK}"), "conv=fsync"])
            .stderr(Stdio::null())
            .status()?;
        let secs = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&out);
        if !st.success() {
            bail!("dd into {} failed", out.display());
        }
        self.push_ceiling("system", "ceiling_fs_write_fsync".into(), rep, secs);
        if nbdkit {
            self.read_ceilings(rep)?;
        }
        servers::init_tls(&self.workdir)?;
        for c in self.conns.clone() {
            if nbdkit {
                for tls in [false, true] {
                    let label = if tls { "tls_null" } else { "null" };
                    self.progress(format!("ceilings: nbdkit {label}, {c} connection(s)"));
                    let k = nbdkit_null(self.size, tls)?;
                    let secs = self.copy_secs(c, &k.uri)?;
                    drop(k);
                    let server = if tls {
                        "nbdkit-null-tls"
                    } else {
                        "nbdkit-null"
                    };
                    self.push_ceiling(server, format!("ceiling_client_{label}_c{c}"), rep, secs);
                }
            }
            self.progress(format!("ceilings: ours tls null, {c} connection(s)"));
            let spec = [Spec {
                name: "disk0".into(),
                path: PathBuf::from(format!("null:{}", self.size)),
                format: "raw",
                size: self.size,
            }];
            let log = self.workdir.join("log").join("ours-tls.log");
            let srv = servers::start(Kind::OursTls, &spec, Options::default(), &log)?;
            let secs = self.copy_secs(c, &srv.uris[0])?;
            srv.stop()?;
            self.push_ceiling("ours-tls", format!("ceiling_ours_tls_null_c{c}"), rep, secs);
        }
        Ok(())
    }
}
