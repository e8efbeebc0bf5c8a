//! The verify/digest figure: `hub-daemon digest` of the backup image (this
//! binary re-executed as `__digest`, the very same code path) against
//! `sha256sum` of the raw source, same data, same run, with the page cache
//! warm for both and, when the caches can be dropped, cold.
//!
//! The two are not the same work: ours reads a qcow2 (zero clusters are
//! never read or hashed byte by byte) and hashes with BLAKE3 in 64 KiB
//! leaves; sha256sum reads and hashes every raw byte on one core. The
//! figure answers the operational question: how long does verifying a
//! restore point take next to the tool an operator would otherwise use.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::report::Sample;
use crate::servers::{self, Kind, Options, Spec};
use crate::workloads::Run;

/// Read a file once so it is in the page cache.
pub(crate) fn warm(path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Write back and drop the page cache; false if not allowed (not root, or
/// a read-only /proc in a container).
pub fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Run `cmd`, return (stdout, seconds).
fn timed(cmd: &mut Command) -> anyhow::Result<(String, f64)> {
    let t = Instant::now();
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), secs))
}

/// `hub-daemon digest PATH` (re-executed); returns (hex digest, seconds).
fn ours(path: &Path) -> anyhow::Result<(String, f64)> {
    ours_target(path.to_str().unwrap_or(""))
}

/// `hub-daemon digest TARGET` (a path or an nbd:// URI).
fn ours_target(target: &str) -> anyhow::Result<(String, f64)> {
    let exe = std::env::current_exe()?;
    let (out, secs) = timed(Command::new(exe).arg("__digest").arg(target))?;
    let hex = out.split_whitespace().next().unwrap_or("").to_owned();
    if hex.len() != 64 {
        bail!("unexpected digest output {out:?}");
    }
    Ok((hex, secs))
}

fn sha256sum(path: &Path) -> anyhow::Result<f64> {
    Ok(timed(Command::new("sha256sum").arg(path))?.1)
}

impl Run {
    fn push(&mut self, server: &str, test: &str, rep: usize, secs: f64) {
        self.samples.push(Sample {
            server: server.into(),
            test: test.into(),
            rep,
            value: self.size as f64 / 1e6 / secs,
            unit: "MB/s".into(),
        });
    }

    /// Digest speed, warm and (if `cold`) cold, with the digest of the
    /// qcow2 image checked against the digest of the raw source.
    pub fn digest(&mut self, rep: usize, cold: bool) -> anyhow::Result<()> {
        let (img, src) = (self.base.clone(), self.src.clone());
        self.progress(String::from("digest: page cache warm"));
        warm(&img)?;
        warm(&src)?;
        let (qcow_hex, secs) = ours(&img)?;
        self.push("ours", "digest_qcow2_warm", rep, secs);
        let sha = sha256sum(&src)?;
        self.push("sha256sum", "digest_qcow2_warm", rep, sha);
        let (raw_hex, secs) = ours(&src)?;
        self.push("ours", "digest_raw_warm", rep, secs);
        // The same sha256sum run is the comparator of every warm figure.
        self.push("sha256sum", "digest_raw_warm", rep, sha);
        // The same image served by our export and read back by our client.
        let spec = [Spec {
            name: "disk0".into(),
            path: img.clone(),
            format: "qcow2",
            size: self.size,
        }];
        let opts = Options {
            readonly: true,
            ..Options::default()
        };
        let log = self.workdir.join("log").join("ours.log");
        let srv = servers::start(Kind::Ours, &spec, opts, &log)?;
        let over_nbd = ours_target(&srv.uris[0]);
        srv.stop()?;
        let (nbd_hex, secs) = over_nbd?;
        self.push("ours", "digest_nbd_warm", rep, secs);
        self.push("sha256sum", "digest_nbd_warm", rep, sha);
        let same = qcow_hex == raw_hex && nbd_hex == raw_hex;
        self.samples.push(Sample {
            server: "ours".into(),
            test: "digest_verified".into(),
            rep,
            value: if same { 1.0 } else { 0.0 },
            unit: "bool".into(),
        });
        if !same {
            self.failures.push(format!(
                "digest rep {rep}: raw {raw_hex}, qcow2 {qcow_hex}, over NBD {nbd_hex}"
            ));
        }
        if cold {
            self.progress(String::from("digest: page cache cold"));
            if drop_caches() {
                let (_, secs) = ours(&img)?;
                self.push("ours", "digest_qcow2_cold", rep, secs);
                drop_caches();
                let secs = sha256sum(&src)?;
                self.push("sha256sum", "digest_qcow2_cold", rep, secs);
            } else if rep == 1 {
                eprintln!("\ncannot drop caches (not root?): cold digest figures skipped");
            }
        }
        Ok(())
    }
}
