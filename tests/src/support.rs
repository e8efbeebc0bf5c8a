//! Test support: servers on port 0, real clients, deterministic data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use nbd_server::{BlockBackend, Export, Server, ServerConfig};
use tokio::net::TcpListener;

/// Whether interop tools must be present (CI sets this): a missing tool
/// then fails the test instead of skipping it.
fn tools_required() -> bool {
    std::env::var("NBD_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

/// `true` if `tool` is on PATH. Otherwise skip (print why) or, when tools
/// are required, fail.
pub fn require(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        if tools_required() {
            panic!("required tool {tool} is missing (NBD_INTEROP_REQUIRED=1)");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

/// A server with some exports, listening on 127.0.0.1 port 0.
#[derive(Debug)]
pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
}

impl TestServer {
    /// Serve `exports` by name on one shared listener.
    pub async fn start(exports: Vec<Export>) -> TestServer {
        Self::start_with(ServerConfig::default(), exports).await
    }

    /// Same, with a custom configuration.
    pub async fn start_with(config: ServerConfig, exports: Vec<Export>) -> TestServer {
        let server = Server::new(config);
        for e in exports {
            server.add_export(e).unwrap();
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = server.serve(l).unwrap();
        TestServer {
            server,
            addr: h.local_addr(),
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr, name)
    }
}

/// An export named `name` over `backend`.
pub fn export(name: &str, backend: Arc<dyn BlockBackend>) -> Export {
    Export::new(name, backend)
}

/// PATH with /usr/bin first: nbdsh runs `python3 -m nbd`, and the Debian
/// python3 is the one with the libnbd module.
fn path_with_usr_bin() -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    format!("/usr/bin:{old}")
}

/// Run a command to completion (off the async threads) and return its output.
pub async fn run(cmd: &str, args: &[&str]) -> Output {
    let mut c = tokio::process::Command::new(cmd);
    c.args(args)
        .env("PATH", path_with_usr_bin())
        .kill_on_drop(true);
    c.output()
        .await
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"))
}

/// Run a command that must succeed; returns stdout.
pub async fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args).await;
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (SplitMix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = nbd_server::backend::conformance::SplitMix(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A disk-like source file: random, zero and text extents (like the bench
/// data generator, smaller).
pub fn disk_like(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = nbd_server::backend::conformance::SplitMix(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = ((1 + rng.next() % 64) as usize * 4096).min(len - v.len());
        match rng.next() % 4 {
            0 | 1 => v.extend_from_slice(&pattern(rng.next(), n)),
            2 => v.resize(v.len() + n, 0),
            _ => v.extend((0..n).map(|i| b"backup log line\n"[i % 16])),
        }
    }
    v
}

/// Write `data` to `dir/name` and return the path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// `qemu-img compare` two images; panics with the tool's message unless identical.
/// `qemu-img create -f qcow2 PATH [SIZE]`, an overlay when `backing` is
/// `Some((name, format))` (the size then defaults to the backing file's).
/// `extra` goes before the path (`-u` to skip opening the backing file).
pub async fn qemu_img_create(
    path: &Path,
    size: Option<&str>,
    backing: Option<(&str, &str)>,
    extra: &[&str],
) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some((name, fmt)) = backing {
        args.extend(["-b", name, "-F", fmt]);
    }
    args.extend_from_slice(extra);
    let p = path.to_str().expect("utf-8 test path");
    args.push(p);
    args.extend(size);
    run_ok("qemu-img", &args).await;
}

/// qemu's own reading of an image (`fmt`) into the raw file `dst`,
/// independent of our reader.
pub async fn qemu_img_to_raw(fmt: &str, src: &Path, dst: &Path) {
    let (s, d) = (
        src.to_str().expect("utf-8 test path"),
        dst.to_str().expect("utf-8 test path"),
    );
    run_ok("qemu-img", &["convert", "-f", fmt, "-O", "raw", s, d]).await;
}

/// `qemu-img convert` of raw data at `src` (a file or an NBD URI) into the
/// new qcow2 file `dst`.
pub async fn qemu_img_raw_to_qcow2(src: &str, dst: &Path) {
    let d = dst.to_str().expect("utf-8 test path");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", src, d]).await;
}

pub async fn assert_identical(fmt_a: &str, a: &str, fmt_b: &str, b: &str) {
    let out = run("qemu-img", &["compare", "-f", fmt_a, "-F", fmt_b, a, b]).await;
    assert!(
        out.status.success(),
        "qemu-img compare {a} {b}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` must report no errors (leaked clusters are tolerated
/// only when `allow_leaks`).
pub async fn assert_check_clean(image: &Path, allow_leaks: bool) {
    let out = run(
        "qemu-img",
        &["check", "--output=json", image.to_str().unwrap()],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().unwrap_or(-1);
    // 0 clean, 3 leaks only; anything else is corruption or failure.
    let ok = code == 0 || (allow_leaks && code == 3);
    assert!(
        ok,
        "qemu-img check {} exited {code}:\n{text}\n{}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assert that `uri` no longer serves its export. A bare TCP connect is not
/// enough: a freed ephemeral port may already belong to another test's
/// server, so the check is that the export itself is gone.
pub async fn assert_export_gone(uri: &str) {
    let out = run("nbdinfo", &["--size", uri]).await;
    assert!(!out.status.success(), "{uri} is still served");
}
