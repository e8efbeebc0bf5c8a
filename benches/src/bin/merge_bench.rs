//! `merge-bench`: retention merges (issue 11) on a realistic chain, our
//! `qcow_backend::merge` against qemu-img on the same files in the same
//! run, every result checked with `qemu-img compare` and `qemu-img check`.
//!
//! ```sh
//! cargo run --release -p benches --bin merge-bench -- --size 4G --depth 10 --reps 3
//! ```
//! The chain: a full F (the generated "realistic disk" data, converted by
//! qemu-img, so its zero extents are sparse) and `depth - 1` incrementals,
//! each rewriting ~`--change` % of the disk in scattered 64 KiB – 1 MiB
//! writes (random and text data) plus zeroed runs of 256 KiB – 2 MiB.
//! It is kept in `--workdir` and reused by later runs with the same shape.
//!
//! Measured, each with the sources in the page cache and the output
//! fsynced before the clock stops:
//! * flatten: the top into a synthetic full; qemu: `qemu-img convert -O qcow2`.
//! * drop the oldest incremental L1: L2 merged with L1 onto F; qemu: the
//!   same result by a safe `qemu-img rebase -b F` of a copy of L2 (the
//!   copy is made off the clock).

#[allow(dead_code)]
#[path = "../data.rs"]
mod data;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use nbd_server::{BlockBackend, ZeroFlags};
use qcow_backend::{
    merge, BackingPolicy, CreateOptions, ImageFormat, MergeOptions, OpenOptions, QcowBackend,
};

/// Time chain merges: ours against qemu-img.
#[derive(Debug, Parser)]
#[command(name = "merge-bench")]
struct Opts {
    /// Virtual disk size.
    #[arg(long, default_value = "4G", value_parser = data::parse_size)]
    size: u64,
    /// Layers in the chain, the full included.
    #[arg(long, default_value_t = 10)]
    depth: usize,
    /// Percent of the disk each incremental rewrites.
    #[arg(long, default_value_t = 7)]
    change: u64,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Our copy pieces in flight.
    #[arg(long, default_value_t = qcow_backend::DEFAULT_MERGE_INFLIGHT)]
    inflight: usize,
    /// Our copy piece size.
    #[arg(long, default_value_t = qcow_backend::DEFAULT_MERGE_CHUNK, value_parser = data::parse_size)]
    chunk: u64,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/merge-bench")]
    workdir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let dir = o
        .workdir
        .join(format!("chain-{}-{}-{}", o.size, o.depth, o.change));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let layers = rt.block_on(build_chain(&dir, &o))?;
    let mut mo = MergeOptions::new(BackingPolicy::strict_within([dir.canonicalize()?]));
    mo.inflight = o.inflight;
    mo.chunk_size = o.chunk;
    let top = layers.last().context("empty chain")?.clone();
    let mut flat = (Vec::new(), Vec::new(), 0u64);
    let mut drop1 = (Vec::new(), Vec::new(), 0u64);
    // qemu-img rebase works in place: the copy that keeps L2 intact, timed apart.
    let mut copy_secs = Vec::new();
    for rep in 0..o.reps {
        // Alternate who goes first, so neither always gets the warmer cache.
        for ours_first in [rep % 2 == 0, rep % 2 != 0] {
            if ours_first {
                let out = dir.join("flat.ours");
                let (secs, bytes) = ours(&rt, &top, &layers[0], &out, &mo)?;
                verify(&top, &out, None)?;
                flat.0.push(secs);
                flat.2 = bytes;
                let out = dir.join("drop1.ours");
                let (secs, bytes) = ours(&rt, &layers[2], &layers[1], &out, &mo)?;
                verify(&layers[2], &out, Some("L0.qcow2"))?;
                drop1.0.push(secs);
                drop1.2 = bytes;
            } else {
                let out = dir.join("flat.qemu");
                let t = Instant::now();
                run(
                    "qemu-img",
                    &["convert", "-f", "qcow2", "-O", "qcow2", s(&top), s(&out)],
                )?;
                fsync(&out)?;
                flat.1.push(t.elapsed().as_secs_f64());
                verify(&top, &out, None)?;
                let out = dir.join("drop1.qemu");
                let t = Instant::now();
                std::fs::copy(&layers[2], &out)?;
                fsync(&out)?;
                copy_secs.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                run(
                    "qemu-img",
                    &[
                        "rebase",
                        "-f",
                        "qcow2",
                        "-F",
                        "qcow2",
                        "-b",
                        "L0.qcow2",
                        s(&out),
                    ],
                )?;
                fsync(&out)?;
                drop1.1.push(t.elapsed().as_secs_f64());
                verify(&layers[2], &out, Some("L0.qcow2"))?;
            }
        }
        for f in ["flat.ours", "flat.qemu", "drop1.ours", "drop1.qemu"] {
            std::fs::remove_file(dir.join(f))?;
        }
    }
    println!(
        "\n{} GiB disk, {}-layer chain, ~{} % changed per incremental, median of {} (s; MB/s of merged guest data)\n",
        o.size >> 30,
        o.depth,
        o.change,
        o.reps
    );
    println!("| operation | data | ours | qemu-img | ratio |");
    println!("|---|---|---|---|---|");
    for (name, qemu, (a, b, bytes)) in [
        ("flatten to a synthetic full", "convert -O qcow2", &mut flat),
        (
            "drop the oldest incremental",
            "rebase -b F (safe)",
            &mut drop1,
        ),
    ] {
        eprintln!("{name}: ours {a:.2?} s, qemu-img {b:.2?} s");
        let (a, b) = (median(a), median(b));
        let mb = *bytes as f64 / 1e6;
        println!(
            "| {name} | {:.0} MB | {a:.2} s, {:.0} MB/s | {qemu}: {b:.2} s, {:.0} MB/s | {:.2}× |",
            mb,
            mb / a,
            mb / b,
            b / a
        );
    }
    println!(
        "\nqemu-img rebase rewrites its image in place; copying L2 first (so the original stays \
         intact, as the merge guarantees) took another {:.2} s.",
        median(&mut copy_secs)
    );
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fsync(p: &Path) -> anyhow::Result<()> {
    std::fs::File::open(p)?.sync_all()?;
    Ok(())
}

/// Our merge; seconds and guest bytes read through the chain.
fn ours(
    rt: &tokio::runtime::Runtime,
    top: &Path,
    x: &Path,
    out: &Path,
    mo: &MergeOptions,
) -> anyhow::Result<(f64, u64)> {
    let t = Instant::now();
    let r = rt.block_on(merge(top, x, out, mo))?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!("ours {} -> {}: {r:?}", top.display(), out.display());
    Ok((secs, r.bytes_read))
}

/// Same guest view as `top`, a clean image, the expected backing.
fn verify(top: &Path, out: &Path, backing: Option<&str>) -> anyhow::Result<()> {
    let c = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(top), s(out)],
    )?;
    if !c.contains("identical") {
        bail!("{} differs from {}: {c}", out.display(), top.display());
    }
    run("qemu-img", &["check", "-q", "-f", "qcow2", s(out)])?;
    let info = run("qemu-img", &["info", "-U", "--output=json", s(out)])?;
    let found = info.contains("backing-filename");
    match backing {
        Some(b) if !info.contains(&format!(r#""backing-filename": "{b}""#)) => {
            bail!("{} not backed by {b}: {info}", out.display())
        }
        None if found => bail!("{} has a backing file: {info}", out.display()),
        _ => Ok(()),
    }
}

/// The chain L0 (full) ← L1 ← … in `dir`, made once per shape.
async fn build_chain(dir: &Path, o: &Opts) -> anyhow::Result<Vec<PathBuf>> {
    let layers: Vec<PathBuf> = (0..o.depth)
        .map(|i| dir.join(format!("L{i}.qcow2")))
        .collect();
    let done = dir.join("complete");
    if done.exists() {
        return Ok(layers);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    let raw = dir.join("full.raw");
    data::generate(&raw, o.size, 1)?;
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&layers[0]),
        ],
    )?;
    std::fs::remove_file(&raw)?;
    let opts = OpenOptions::new().policy(BackingPolicy::strict_within([dir.canonicalize()?]));
    for i in 1..o.depth {
        let create = CreateOptions {
            backing_format: Some(ImageFormat::Qcow2),
            ..CreateOptions::overlay(&layers[i - 1])
        };
        let img = QcowBackend::create(&layers[i], &create, &opts).await?;
        incremental(&img, o.size, o.size / 100 * o.change, i as u64).await?;
        img.close().await?;
    }
    std::fs::write(&done, b"")?;
    eprintln!("chain built in {:.1} s", t.elapsed().as_secs_f64());
    Ok(layers)
}

/// Scattered rewrites of about `budget` bytes, one zeroed run per ten writes.
async fn incremental(img: &QcowBackend, size: u64, budget: u64, seed: u64) -> anyhow::Result<()> {
    const BLOCK: u64 = 64 << 10;
    let mut rng = data::Rng(seed.wrapping_mul(0x5851_f42d_4c95_7f2d));
    let text = b"2026-11-29T12:00:00 host01 backup[4711]: snapshot cluster refcount write flush\n";
    let mut done = 0u64;
    while done < budget {
        let off = rng.below(size / BLOCK) * BLOCK;
        if rng.below(10) == 0 {
            let len = (BLOCK * (4 + rng.below(29))).min(size - off);
            img.write_zeroes(off, len, ZeroFlags::default()).await?;
            done += len;
            continue;
        }
        let len = (BLOCK * (1 + rng.below(16))).min(size - off);
        let mut buf = vec![0u8; len as usize];
        if rng.below(3) == 0 {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = text[i % text.len()];
            }
        } else {
            rng.fill(&mut buf);
        }
        img.write(off, Bytes::from(buf)).await?;
        done += len;
    }
    Ok(())
}
