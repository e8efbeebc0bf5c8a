//! Starting and stopping the NBD servers under test.

use std::io::{BufRead, BufReader, Lines, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Our server (`hub-daemon export`, this binary re-executed).
    Ours,
    /// Our server from another build of this harness, named by
    /// `NBD_BENCH_BASELINE_EXE` (before/after figures of a change in one
    /// run, servers interleaved).
    OursBase,
    /// Ours with READ replies spliced to loopback clients too
    /// (`--splice-reads always`; the default splices only to other hosts).
    OursSplice,
    /// Our server recording `blake3-tree-v1` digests of what it is sent
    /// (`--digest`), as the hub does for every backup.
    OursDigest,
    /// One qemu-nbd process per export, as deployed today.
    QemuNbd,
    /// Ours as the hub runs a backup export over TLS: digests on,
    /// `--tls require` with the credentials of [`tls_dir`].
    OursTls,
    /// qemu-nbd with `--tls-creds` (x509, same credentials).
    QemuNbdTls,
    /// nbdkit's null plugin (protocol ceiling).
    NbdkitNull,
    /// nbdkit's file plugin serving a raw (sparse) copy of the image: the
    /// least a server can do to answer a read (one `pread` from the page
    /// cache, holes from `SEEK_DATA`), so its restore figures are what the
    /// clients reach here at all. Read workloads only.
    NbdkitFile,
    /// Ours serving the same flat raw copy as [`Kind::NbdkitFile`]: the
    /// raw backend's read path (`export -r` of a raw image). Read
    /// workloads only.
    OursRaw,
    /// qemu-nbd serving that flat raw copy: what [`Kind::OursRaw`] is
    /// compared with. Read workloads only.
    QemuNbdRaw,
    /// [`Kind::Ours`] from an earlier build (`--prev-exe`): the state
    /// before a change, measured in the same run.
    Prev,
    /// [`Kind::OursDigest`] from the earlier build.
    PrevDigest,
    /// [`Kind::OursTls`] from the earlier build.
    PrevTls,
}

impl Kind {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::OursBase => "ours-base",
            Kind::OursSplice => "ours-splice",
            Kind::OursDigest => "ours-digest",
            Kind::QemuNbd => "qemu-nbd",
            Kind::OursTls => "ours-tls",
            Kind::QemuNbdTls => "qemu-nbd-tls",
            Kind::NbdkitNull => "nbdkit-null",
            Kind::NbdkitFile => "nbdkit-file",
            Kind::OursRaw => "ours-raw",
            Kind::QemuNbdRaw => "qemu-nbd-raw",
            Kind::Prev => "prev",
            Kind::PrevDigest => "prev-digest",
            Kind::PrevTls => "prev-tls",
        }
    }
}

impl Kind {
    /// Whether clients reach it over TLS.
    pub fn tls(self) -> bool {
        matches!(self, Kind::OursTls | Kind::QemuNbdTls | Kind::PrevTls)
    }

    /// Whether it records digests (and prints them on exit).
    pub fn digest(self) -> bool {
        matches!(
            self,
            Kind::OursDigest | Kind::OursTls | Kind::PrevDigest | Kind::PrevTls
        )
    }

    /// Whether it serves a flat raw copy of the image (read workloads
    /// only).
    pub fn flat_raw(self) -> bool {
        matches!(self, Kind::NbdkitFile | Kind::OursRaw | Kind::QemuNbdRaw)
    }

    /// Whether it is our server from the earlier build.
    fn prev(self) -> bool {
        matches!(self, Kind::Prev | Kind::PrevDigest | Kind::PrevTls)
    }
}

static PREV_EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The earlier `nbd-bench` binary whose `__export` the `prev*` servers run.
pub fn set_prev_exe(path: PathBuf) {
    let _ = PREV_EXE.set(path);
}

static TLS_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Make TLS credentials (`hub-daemon tls init`) under `workdir` once; the
/// TLS servers and every client use them.
pub fn init_tls(workdir: &Path) -> anyhow::Result<()> {
    let dir = workdir.join("tls");
    if !dir.join("server-key.pem").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        hub_daemon::tls::init(&dir, &[]).map_err(anyhow::Error::msg)?;
    }
    let _ = TLS_DIR.set(dir);
    Ok(())
}

/// The TLS credentials directory ([`init_tls`] first).
pub fn tls_dir() -> anyhow::Result<&'static Path> {
    TLS_DIR
        .get()
        .map(PathBuf::as_path)
        .context("TLS credentials not initialised")
}

/// `uri` as a libnbd client with our credentials uses it.
fn with_creds(uri: String) -> anyhow::Result<String> {
    Ok(format!("{uri}?tls-certificates={}", tls_dir()?.display()))
}

/// One export to serve: a name and an image (or a size for nbdkit/pseudo).
#[derive(Debug, Clone)]
pub struct Spec {
    /// Export name.
    pub name: String,
    /// Image path, or `null:SIZE`/`memory:SIZE` for ours.
    pub path: PathBuf,
    /// "qcow2" or "raw" (qemu-nbd's -f).
    pub format: &'static str,
    /// Virtual size (nbdkit plugins).
    pub size: u64,
}

/// Server options.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Serve read-only.
    pub readonly: bool,
    /// Each export on its own port (ours; qemu-nbd always is).
    pub port_per_export: bool,
}

/// A running server (one or more processes).
#[derive(Debug)]
pub struct Running {
    children: Vec<Child>,
    /// URIs, in spec order.
    pub uris: Vec<String>,
    /// When the last export became ready, measured from the first spawn.
    pub ready_after: Duration,
    /// Our server's stdout after "ready" (it prints digests on exit).
    stdout: Option<Lines<BufReader<ChildStdout>>>,
}

/// A port nobody listens on (the OS picks it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait until `port` answers with an NBD greeting.
pub fn wait_ready(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut g = [0u8; 18];
            if s.read_exact(&mut g).is_ok() && &g[..8] == b"NBDMAGIC" {
                return Ok(());
            }
        }
        if let Some(st) = child.try_wait()? {
            bail!("server exited early: {st}");
        }
        if Instant::now() > deadline {
            bail!("server on port {port} not ready after 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn log_file(log: &Path) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?)
}

/// `qemu-img ARGS`, failing with its stderr.
pub fn qemu_img(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img").args(args).output()?;
    if !out.status.success() {
        bail!(
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `qemu-nbd -r -B BITMAP` per qcow2 image, export `d<i>`, on the given
/// ports (fixed, so a source configured with a port survives a restart).
pub fn start_bitmap(
    imgs: &[PathBuf],
    ports: &[u16],
    bitmap: &str,
    log: &Path,
) -> anyhow::Result<Running> {
    let t0 = Instant::now();
    let mut children = Vec::with_capacity(imgs.len());
    let mut uris = Vec::with_capacity(imgs.len());
    for (i, (img, port)) in imgs.iter().zip(ports).enumerate() {
        let child = Command::new("qemu-nbd")
            .args(["-r", "-B", bitmap, "-f", "qcow2", "-t", "-b", "127.0.0.1"])
            .args(["-x", &format!("d{i}"), "-p", &port.to_string()])
            .arg(img)
            .stdout(log_file(log)?)
            .stderr(log_file(log)?)
            .spawn()
            .context("spawning qemu-nbd")?;
        children.push(child);
        uris.push(format!("nbd://127.0.0.1:{port}/d{i}"));
    }
    for (c, p) in children.iter_mut().zip(ports) {
        wait_ready(*p, c)?;
    }
    Ok(Running {
        children,
        uris,
        ready_after: t0.elapsed(),
        stdout: None,
    })
}

/// Start `kind` serving `specs`.
pub fn start(kind: Kind, specs: &[Spec], opts: Options, log: &Path) -> anyhow::Result<Running> {
    let t0 = Instant::now();
    match kind {
        Kind::Ours
        | Kind::OursBase
        | Kind::OursRaw
        | Kind::OursSplice
        | Kind::OursDigest
        | Kind::OursTls
        | Kind::Prev
        | Kind::PrevDigest
        | Kind::PrevTls => {
            let exe = if kind == Kind::OursBase {
                PathBuf::from(
                    std::env::var_os("NBD_BENCH_BASELINE_EXE")
                        .context("ours-base needs NBD_BENCH_BASELINE_EXE")?,
                )
            } else if kind.prev() {
                PREV_EXE.get().cloned().context("--prev-exe not given")?
            } else {
                std::env::current_exe()?
            };
            let mut cmd = Command::new(exe);
            cmd.arg("__export").arg("--listen").arg("127.0.0.1:0");
            // Digests record writes; a read-only export has none, and a
            // null export (a ceiling) keeps nothing to digest.
            let null = specs
                .iter()
                .any(|s| s.path.to_string_lossy().starts_with("null:"));
            if kind.digest() && !opts.readonly && !null {
                cmd.arg("--digest");
            }
            if kind.tls() {
                cmd.args(["--tls", "require", "--tls-certificates"])
                    .arg(tls_dir()?);
            }
            if opts.port_per_export {
                cmd.arg("--port-per-export");
            }
            if kind == Kind::OursSplice {
                cmd.args(["--splice-reads", "always"]);
            }
            if opts.readonly {
                cmd.arg("-r");
            }
            for s in specs {
                cmd.arg(format!("{}={}", s.name, s.path.display()));
            }
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(log_file(log)?)
                .spawn()
                .context("spawning our server")?;
            let out = child.stdout.take().context("stdout")?;
            let mut uris = Vec::new();
            let mut lines = BufReader::new(out).lines();
            while let Some(line) = lines.next() {
                let line = line?;
                if line == "ready" {
                    return Ok(Running {
                        children: vec![child],
                        uris,
                        ready_after: t0.elapsed(),
                        stdout: Some(lines),
                    });
                }
                if let Some(uri) = line.split_whitespace().nth(2) {
                    uris.push(if kind.tls() {
                        with_creds(uri.to_owned())?
                    } else {
                        uri.to_owned()
                    });
                }
            }
            bail!("our server exited before ready (see {})", log.display())
        }
        Kind::QemuNbd | Kind::QemuNbdTls | Kind::QemuNbdRaw => {
            let mut children = Vec::with_capacity(specs.len());
            let mut uris = Vec::with_capacity(specs.len());
            let mut ports = Vec::with_capacity(specs.len());
            for s in specs {
                let port = free_port()?;
                let mut cmd = Command::new("qemu-nbd");
                cmd.args([
                    "-f",
                    s.format,
                    "-x",
                    &s.name,
                    "-p",
                    &port.to_string(),
                    "-b",
                    "127.0.0.1",
                    "-t",
                ]);
                if opts.readonly {
                    cmd.arg("-r");
                }
                if kind.tls() {
                    cmd.arg("--object")
                        .arg(format!(
                            "tls-creds-x509,id=tls0,dir={},endpoint=server",
                            tls_dir()?.display()
                        ))
                        .args(["--tls-creds", "tls0"]);
                }
                cmd.arg(&s.path);
                let child = cmd
                    .stdout(log_file(log)?)
                    .stderr(log_file(log)?)
                    .spawn()
                    .context("spawning qemu-nbd")?;
                children.push(child);
                ports.push(port);
                uris.push(if kind.tls() {
                    with_creds(format!("nbds://127.0.0.1:{port}/{}", s.name))?
                } else {
                    format!("nbd://127.0.0.1:{port}/{}", s.name)
                });
            }
            for (c, p) in children.iter_mut().zip(&ports) {
                wait_ready(*p, c)?;
            }
            Ok(Running {
                children,
                uris,
                ready_after: t0.elapsed(),
                stdout: None,
            })
        }
        Kind::NbdkitFile => {
            let s = specs.first().context("one export")?;
            if s.format != "raw" {
                bail!("nbdkit-file serves raw images only, not {}", s.format);
            }
            let mut args = Vec::new();
            if opts.readonly {
                args.push("-r".into());
            }
            args.extend(["file".into(), s.path.clone().into_os_string()]);
            nbdkit(&args, &s.name, log, t0)
        }
        Kind::NbdkitNull => {
            let s = specs.first().context("one export")?;
            nbdkit(
                &["null".into(), s.size.to_string().into()],
                &s.name,
                log,
                t0,
            )
        }
    }
}

/// nbdkit in the foreground on a free local port with `args` (options,
/// plugin and its parameters), serving export `name` once it accepts.
fn nbdkit(
    args: &[std::ffi::OsString],
    name: &str,
    log: &Path,
    t0: Instant,
) -> anyhow::Result<Running> {
    let port = free_port()?;
    let mut child = Command::new("nbdkit")
        .args(["-f", "-p", &port.to_string(), "-i", "127.0.0.1"])
        .args(args)
        .stdout(log_file(log)?)
        .stderr(log_file(log)?)
        .spawn()
        .context("spawning nbdkit")?;
    wait_ready(port, &mut child)?;
    Ok(Running {
        children: vec![child],
        uris: vec![format!("nbd://127.0.0.1:{port}/{name}")],
        ready_after: t0.elapsed(),
        stdout: None,
    })
}

impl Running {
    /// Process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// CPU seconds (user + system) the server processes have used so far.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for pid in self.pids() {
            let (own, _) = crate::handoff::proc_cpu_secs(&format!("/proc/{pid}/stat"))?;
            total += own;
        }
        Ok(total)
    }

    /// SIGTERM every process and wait (SIGKILL after 30 s); returns what
    /// our server printed after "ready" (digests).
    pub fn stop(mut self) -> anyhow::Result<Vec<String>> {
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in &mut self.children {
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.children.clear();
        Ok(self
            .stdout
            .take()
            .map(|l| l.map_while(Result::ok).collect())
            .unwrap_or_default())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Memory of processes, summed: (RSS KiB, PSS KiB, private KiB).
pub fn memory(pids: &[u32]) -> (u64, u64, u64) {
    let (mut rss, mut pss, mut private) = (0, 0, 0);
    for pid in pids {
        let field = |text: &str, key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            rss += field(&s, "Rss:");
            pss += field(&s, "Pss:");
            private += field(&s, "Private_Clean:") + field(&s, "Private_Dirty:");
        }
    }
    (rss, pss, private)
}
