//! Verify speed: the hub's verify engine (`disk_digest::verify`, the code
//! behind `POST /backups/{id}/verify`) re-reading a written qcow2 restore
//! point against its digest sidecar, next to `sha256sum` of the raw source
//! in the same run; each with the page cache dropped (cold: a restore point
//! verified days later) and after a read (warm).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use disk_digest::verify::{verify_chain, VerifyLayer};
use disk_digest::Sidecar;
use qcow_backend::{BackingPolicy, OpenOptions, QcowBackend};

/// Write dirty pages and drop the page cache (root only; otherwise the
/// "cold" figures are warm and say so in the log).
pub fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Seconds to verify `image` (a full) against `image.digest`; fails if it
/// does not verify.
pub fn verify_secs(image: &Path) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut sidecar = image.as_os_str().to_owned();
        sidecar.push(".digest");
        let t = Instant::now();
        let dir = image.parent().context("image directory")?.canonicalize()?;
        let opts = OpenOptions::new()
            .read_only(true)
            .policy(BackingPolicy::strict_within([dir]));
        let backend = QcowBackend::open(image, &opts).await?;
        let (sidecar, header, _) = Sidecar::open(Path::new(&sidecar))?;
        let reports = verify_chain(
            vec![VerifyLayer {
                backend: Arc::new(backend),
                sidecar: Arc::new(sidecar),
                expected_root: header.root,
            }],
            |_| {},
        )
        .await?;
        if !reports.iter().all(|r| r.is_ok()) {
            bail!("{} does not verify: {reports:?}", image.display());
        }
        Ok(t.elapsed().as_secs_f64())
    })
}

/// Read a file once (into the page cache).
pub fn read_through(file: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(file)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// Seconds for `sha256sum FILE`.
pub fn sha256sum_secs(file: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = Command::new("sha256sum")
        .arg(file)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("sha256sum failed");
    }
    Ok(t.elapsed().as_secs_f64())
}
