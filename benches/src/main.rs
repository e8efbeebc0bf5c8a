//! `nbd-bench`: the same client workloads against our server and qemu-nbd
//! (and nbdkit's null plugin as the protocol ceiling) in one run, servers
//! interleaved in every repetition, every written image verified.
//!
//! ```sh
//! cargo run --release -p benches --bin nbd-bench -- --reps 3 --markdown BENCHMARKS.table.md
//! cargo run -p benches --bin nbd-bench -- --smoke      # what CI runs
//! ```
//! Our server is this binary re-executed as `hub-daemon export` (the very
//! same code path), so no separate build is needed.

mod catalog;
mod ceilings;
mod client;
mod data;
mod digest;
mod handoff;
mod report;
mod restore;
mod servers;
mod verify;
mod verify_sched;
mod workloads;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;

use report::Sample;
use servers::Kind;
use workloads::Run;

/// Benchmark our NBD server against qemu-nbd.
#[derive(Debug, Parser)]
#[command(name = "nbd-bench")]
struct Opts {
    /// Single-disk data size.
    #[arg(long, default_value = "4G", value_parser = data::parse_size)]
    size: u64,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Workloads: write,overlay,multi,random,read,null,idle,limits,digest
    /// (read: the restore figures of issue 13, see --cache);
    /// ceilings (opt-in: dd with fsync, nbdcopy into nbdkit null plain and
    /// over TLS, and into our null backend over TLS, nbdcopy and fio from
    /// nbdkit, per repetition);
    /// handoff (opt-in: a VM of --disks × --disk-size backed up through
    /// hub and agent, full then a 10 % incremental, against qemu-nbd and
    /// nbdcopy); handoff-bitmap (opt-in: the same with qcow2 sources served
    /// by `qemu-nbd -r -B b0` and the incremental driven by the bitmap);
    /// verifysched (opt-in: a backup of the --size source into the hub
    /// alone and while a scheduled verification reads --disks old restore
    /// points of --disk-size; default, then unlimited rates); catalog
    /// (opt-in: POST /backups latency, start+abort cycles, with an SQLite
    /// and, given --catalog-postgres, a PostgreSQL catalog).
    #[arg(
        long,
        default_value = "write,overlay,multi,random,read,null,idle,limits,digest",
        value_delimiter = ','
    )]
    tests: Vec<String>,
    /// Start+abort cycles per repetition of the catalog test.
    #[arg(long, default_value_t = 200)]
    catalog_cycles: usize,
    /// PostgreSQL server for the catalog test (postgres://user@host:port;
    /// a database is created and dropped on it per repetition).
    #[arg(long, env = "HUB_BENCH_POSTGRES_URL")]
    catalog_postgres: Option<String>,
    /// nbdcopy connection counts for the write test.
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    conns: Vec<u32>,
    /// Disks written in parallel in the multi-disk test.
    #[arg(long, default_value_t = 4)]
    disks: usize,
    /// Size of each disk in the multi-disk test.
    #[arg(long, default_value = "1G", value_parser = data::parse_size)]
    disk_size: u64,
    /// Export counts for the idle-memory test.
    #[arg(long, default_value = "50,500", value_delimiter = ',')]
    idle: Vec<usize>,
    /// Seconds per fio random test.
    #[arg(long, default_value_t = 15)]
    fio_runtime: u64,
    /// Servers to compare (ours, ours-digest, qemu-nbd, ours-tls,
    /// qemu-nbd-tls; ours-base: the build at NBD_BENCH_BASELINE_EXE;
    /// nbdkit-file: nbdkit serving a flat raw copy, the read figures'
    /// ceiling; ours-raw and qemu-nbd-raw: ours and qemu-nbd serving that
    /// raw copy;
    /// prev, prev-digest, prev-tls with --prev-exe).
    #[arg(long, default_value = "ours,qemu-nbd", value_delimiter = ',')]
    servers: Vec<String>,
    /// Scratch directory (images, data, logs).
    #[arg(long, default_value = "/tmp/nbd-bench")]
    workdir: PathBuf,
    /// Write results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the table as Markdown (with machine and command).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Tiny sizes, one repetition: checks the harness runs and verifies data.
    #[arg(long)]
    smoke: bool,
    /// An earlier build of this binary: the `prev*` servers run its
    /// export, so a change is measured against the state before it in the
    /// same run.
    #[arg(long)]
    prev_exe: Option<PathBuf>,
    /// Skip the cold-cache digest figures (they drop the page cache, which
    /// needs root and slows whatever else runs on the machine).
    #[arg(long)]
    no_cold: bool,
    /// Page-cache states of the read figures, each prepared the same way
    /// for every server: cold (sync + drop caches, needs root), warm (the
    /// image read first). Default: both as root, else warm.
    #[arg(long, value_delimiter = ',')]
    cache: Vec<String>,
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn version(cmd: &str) -> String {
    Command::new(cmd)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine(workdir: &std::path::Path) -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let run = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": run("uname", &["-r"]),
        "memory": run("sh", &["-c", "free -h | awk '/Mem:/{print $2}'"]),
        "filesystem": run("stat", &["-f", "-c", "%T", workdir.to_str().unwrap_or("/tmp")]),
        "qemu": version("qemu-img"),
        "nbdcopy": version("nbdcopy"),
        "fio": version("fio"),
        "nbdkit": version("nbdkit"),
    })
}

/// One `dd bs=4M conv=fsync` of the source into the image directory, recorded as `test`.
fn dd_write(run: &mut Run, test: &str, extra: Option<&str>) -> anyhow::Result<()> {
    let out = run.workdir.join("img").join("dd.out");
    let mut args = vec![
        format!("if={}", run.src.display()),
        format!("of={}", out.display()),
        "bs=4M".to_string(),
        "conv=fsync".to_string(),
    ];
    args.extend(extra.map(str::to_string));
    let t = Instant::now();
    let st = Command::new("dd")
        .args(&args)
        .stderr(std::process::Stdio::null())
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    if st.success() {
        run.samples.push(Sample {
            server: "system".into(),
            test: test.into(),
            rep: 1,
            value: run.size as f64 / 1e6 / secs,
            unit: "MB/s".into(),
        });
    }
    Ok(())
}

/// Sequential write of the source with `dd conv=fsync` (through the page cache) and with
/// `oflag=direct` (the device rate without dirty-page throttling), and loopback TCP. dd writes
/// every byte, zero extents included, where an NBD client sends those as WRITE_ZEROES: a server
/// can beat the dd figure by the zero share of the data (25 % with the generated source).
fn limits(run: &mut Run) -> anyhow::Result<()> {
    for (test, extra) in [
        ("dd_conv_fsync_write", None),
        ("dd_direct_write", Some("oflag=direct")),
    ] {
        dd_write(run, test, extra)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mbps = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let total: u64 = 4 << 30;
        let rx = tokio::spawn(async move {
            let (mut s, _) = l.accept().await?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let r = s.read(&mut buf).await?;
                if r == 0 {
                    return anyhow::Ok(n);
                }
                n += r as u64;
            }
        });
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let buf = vec![7u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..total / (1 << 20) {
            s.write_all(&buf).await?;
        }
        s.shutdown().await?;
        let got = rx.await??;
        anyhow::Ok(got as f64 / 1e6 / t.elapsed().as_secs_f64())
    })?;
    run.samples.push(Sample {
        server: "system".into(),
        test: "loopback_tcp".into(),
        rep: 1,
        value: mbps,
        unit: "MB/s".into(),
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Re-executed as our server: exactly `hub-daemon export`.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "__export") {
        return serve_export(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == "__digest") {
        return run_digest(&args[2..]);
    }
    let mut opts = Opts::parse();
    if opts.smoke {
        opts.size = 64 << 20;
        opts.disk_size = 16 << 20;
        opts.reps = 1;
        opts.idle = vec![4];
        opts.fio_runtime = 1;
        opts.no_cold = true;
        opts.catalog_cycles = 5;
    }
    bench(opts)
}

/// The `__export` mode.
fn serve_export(args: &[String]) -> anyhow::Result<()> {
    #[derive(Debug, Parser)]
    struct Export {
        #[command(flatten)]
        args: hub_daemon::cli::export::ExportArgs,
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    hub_daemon::cli::raise_fd_limit();
    let e = Export::parse_from(std::iter::once("export".to_owned()).chain(args.iter().cloned()));
    let rt = hub_daemon::cli::runtime_for(e.args.tls_enabled())?;
    rt.block_on(hub_daemon::cli::export::run(e.args))
}

/// The `__digest` mode: exactly `hub-daemon digest`.
fn run_digest(args: &[String]) -> anyhow::Result<()> {
    #[derive(Debug, Parser)]
    struct Digest {
        #[command(flatten)]
        args: hub_daemon::cli::digest::DigestArgs,
    }
    let d = Digest::parse_from(std::iter::once("digest".to_owned()).chain(args.iter().cloned()));
    let rt = hub_daemon::cli::runtime()?;
    rt.block_on(hub_daemon::cli::digest::run(d.args))
}

fn bench(opts: Opts) -> anyhow::Result<()> {
    for t in ["qemu-img", "nbdcopy"] {
        if !tool(t) {
            bail!("{t} is required");
        }
    }
    let mut kinds = Vec::new();
    for s in &opts.servers {
        match s.as_str() {
            "ours" => kinds.push(Kind::Ours),
            "ours-base" => kinds.push(Kind::OursBase),
            "ours-splice" => kinds.push(Kind::OursSplice),
            "ours-digest" => kinds.push(Kind::OursDigest),
            "qemu-nbd" if tool("qemu-nbd") => kinds.push(Kind::QemuNbd),
            "qemu-nbd" => eprintln!("qemu-nbd not installed: skipped"),
            "ours-tls" => kinds.push(Kind::OursTls),
            "nbdkit-file" if tool("nbdkit") => kinds.push(Kind::NbdkitFile),
            "nbdkit-file" => eprintln!("nbdkit not installed: skipped"),
            "ours-raw" => kinds.push(Kind::OursRaw),
            "qemu-nbd-raw" if tool("qemu-nbd") => kinds.push(Kind::QemuNbdRaw),
            "qemu-nbd-raw" => eprintln!("qemu-nbd not installed: skipped"),
            "qemu-nbd-tls" if tool("qemu-nbd") => kinds.push(Kind::QemuNbdTls),
            "qemu-nbd-tls" => eprintln!("qemu-nbd not installed: skipped"),
            "prev" | "prev-digest" | "prev-tls" if opts.prev_exe.is_none() => {
                bail!("server {s} needs --prev-exe")
            }
            "prev" => kinds.push(Kind::Prev),
            "prev-digest" => kinds.push(Kind::PrevDigest),
            "prev-tls" => kinds.push(Kind::PrevTls),
            other => bail!("unknown server {other}"),
        }
    }
    if let Some(p) = &opts.prev_exe {
        servers::set_prev_exe(p.clone());
    }
    let has = |t: &str| opts.tests.iter().any(|x| x == t);
    if kinds.iter().any(|k| k.tls()) {
        servers::init_tls(&opts.workdir)?;
    }
    let fio = tool("fio");
    let nbdkit = tool("nbdkit");
    let wd = opts.workdir.clone();
    for d in ["img", "log", "data"] {
        std::fs::create_dir_all(wd.join(d))?;
    }
    let src = wd.join("data").join(format!("src-{}.raw", opts.size));
    // The handoff workload makes its own sources; alone it needs no other.
    let needs_src = opts
        .tests
        .iter()
        .any(|t| t != "handoff" && t != "handoff-bitmap" && t != "catalog");
    if needs_src && !src.exists() {
        eprintln!("generating {} bytes of disk-like data", opts.size);
        data::generate(&src, opts.size, 1)?;
    }
    let mut md_src = Vec::new();
    for i in 0..opts.disks {
        let p = wd
            .join("data")
            .join(format!("md{i}-{}.raw", opts.disk_size));
        if has("multi") && !p.exists() {
            data::generate(&p, opts.disk_size, 2 + i as u64)?;
        }
        md_src.push(p);
    }
    // A full backup image of the source: the base of the overlay test and
    // the image of the read test (same file for every server).
    let base = wd.join("img").join("base.qcow2");
    if has("overlay") || has("read") || has("digest") {
        let _ = std::fs::remove_file(&base);
        let st = Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                src.to_str().unwrap_or(""),
                base.to_str().unwrap_or(""),
            ])
            .status()?;
        if !st.success() {
            bail!("making the base image failed");
        }
    }
    let (changes, payload) = workloads::make_changes(opts.size, 42);
    let expected = wd.join("data").join("overlay-expected.raw");
    if has("overlay") {
        workloads::write_expected(&src, &expected, &changes, &payload)?;
    }
    let payload = Arc::new(payload);

    let caches = if opts.cache.is_empty() {
        if opts.no_cold {
            vec![restore::Cache::Warm]
        } else {
            restore::default_caches()
        }
    } else {
        opts.cache
            .iter()
            .map(String::as_str)
            .map(restore::Cache::parse)
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let chain_dir = wd.join("img").join("chain");
    let chain = if has("read") {
        eprintln!("building the {}-deep chain", restore::CHAIN_DEPTH);
        restore::build_chain(&chain_dir, &base, opts.size)?
    } else {
        Vec::new()
    };
    let mut run = Run {
        workdir: wd.clone(),
        size: opts.size,
        disk_size: opts.disk_size,
        disks: opts.disks,
        conns: opts.conns.clone(),
        fio_runtime: opts.fio_runtime,
        src,
        md_src,
        base: base.clone(),
        expected: expected.clone(),
        changes,
        samples: Vec::new(),
        failures: Vec::new(),
        progress: String::new(),
    };
    let started = Instant::now();
    for rep in 1..=opts.reps {
        for &k in &kinds {
            run.progress = format!("[rep {rep}/{}] ", opts.reps);
            // A flat raw copy (nbdkit's ceiling, ours and qemu-nbd on raw):
            // read figures only.
            let writes = !k.flat_raw();
            if writes && (has("write") || has("overlay") || has("multi")) {
                // The previous server's cold reads dropped them.
                run.warm_sources()?;
            }
            if has("write") && writes {
                run.write(k, rep)
                    .with_context(|| format!("{} write", k.name()))?;
            }
            // The overlay writer and fio speak plaintext NBD only.
            if has("overlay") && !k.tls() && writes {
                run.overlay(k, rep, &payload)
                    .with_context(|| format!("{} overlay", k.name()))?;
            }
            if has("multi") && writes {
                run.multi(k, rep)
                    .with_context(|| format!("{} multi", k.name()))?;
            }
            if has("random") && fio && !k.tls() && writes {
                run.random(k, rep)
                    .with_context(|| format!("{} random", k.name()))?;
            }
            if has("read") {
                run.restore(k, rep, &caches, &chain, fio && !k.tls())
                    .with_context(|| format!("{} restore reads", k.name()))?;
            }
        }
        if has("handoff") {
            run.handoff(rep, kinds.contains(&Kind::QemuNbd))
                .context("handoff")?;
        }
        if has("handoff-bitmap") {
            run.handoff_bitmap(rep).context("handoff-bitmap")?;
        }
        if has("digest") {
            run.digest(rep, !opts.no_cold).context("digest")?;
        }
        if has("catalog") {
            run.catalog(rep, opts.catalog_cycles, opts.catalog_postgres.as_deref())
                .context("catalog")?;
        }
        // Its own repetitions: the old restore points are written once.
        if rep == 1 && has("verifysched") {
            run.verify_sched(opts.reps, !opts.no_cold)
                .context("verifysched")?;
        }
        if has("ceilings") {
            run.ceilings(rep, nbdkit).context("ceilings")?;
        }
        if has("null") {
            run.null(Kind::Ours, rep)?;
            if nbdkit {
                run.null(Kind::NbdkitNull, rep)?;
            }
        }
        if rep == 1 && has("idle") {
            for &n in &opts.idle {
                for &k in kinds.iter().filter(|k| !k.tls() && !k.flat_raw()) {
                    run.idle(k, n)
                        .with_context(|| format!("{} idle {n}", k.name()))?;
                }
            }
        }
        if rep == 1 && has("limits") {
            run.progress(String::from("physical limits"));
            limits(&mut run)?;
        }
    }
    eprintln!("\r\x1b[Kdone in {:.0} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_file(&base);
    let _ = std::fs::remove_file(restore::flat_raw_of(&base));
    let _ = std::fs::remove_file(&expected);
    let _ = std::fs::remove_dir_all(&chain_dir);

    let baseline = if kinds.contains(&Kind::QemuNbd) {
        "qemu-nbd"
    } else {
        "ours"
    };
    // The null figures compare against nbdkit's null plugin.
    let figs = report::figures(&run.samples, |test| {
        if test.starts_with("null_") {
            "nbdkit-null"
        } else if test.starts_with("tls_") {
            "qemu-nbd-tls"
        } else if test.starts_with("handoff_") {
            // MB/s of the full against qemu-nbd's; seconds and the
            // incremental/full ratio are read as they are.
            if test.ends_with("_secs") || test.contains("incremental") {
                "none"
            } else {
                "qemu-nbd"
            }
        } else if test.starts_with("catalog_") {
            // PostgreSQL against SQLite, the default catalog.
            "sqlite"
        } else if test.starts_with("verifysched_") || test.starts_with("ceiling_") {
            // Alone vs with verify is its own `*_with_over_alone` row;
            // ceilings are read as they are.
            "none"
        } else if test.starts_with("digest_") {
            "sha256sum"
        } else {
            baseline
        }
        .to_owned()
    });
    let command: Vec<String> = std::env::args().collect();
    let machine = machine(&wd);
    println!("{}", report::table(&figs, baseline));
    if let Some(p) = &opts.json {
        let j = json!({"machine": machine, "command": command.join(" "), "samples": run.samples, "figures": figs, "failures": run.failures});
        std::fs::write(p, serde_json::to_vec_pretty(&j)?)?;
    }
    if let Some(p) = &opts.markdown {
        let mut md = format!("Machine: {} × {} ({}), {} RAM, kernel {}, {} filesystem; {}; {}; {}.\n\nCommand: `{}`\n\n",
            machine["nproc"], machine["cpu"].as_str().unwrap_or(""), "shared VM", machine["memory"].as_str().unwrap_or(""), machine["kernel"].as_str().unwrap_or(""), machine["filesystem"].as_str().unwrap_or(""), machine["qemu"].as_str().unwrap_or(""), machine["nbdcopy"].as_str().unwrap_or(""), machine["fio"].as_str().unwrap_or(""), command.join(" "));
        md.push_str(&report::markdown(&figs, baseline));
        std::fs::write(p, md)?;
    }
    if !run.failures.is_empty() {
        for f in &run.failures {
            eprintln!("VERIFICATION FAILED: {f}");
        }
        bail!("{} verification failure(s)", run.failures.len());
    }
    Ok(())
}
