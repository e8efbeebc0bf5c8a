//! Running the `hub-daemon` binary, or the daemon in-process, in tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod hub;
pub mod tmpfs;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Every file under `dir`, recursively (for "nothing left behind" checks).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Spawn `hub-daemon ARGS` and feed each stdout line to `on_line` until
    /// it returns true ("ready"); panics if the process exits first.
    fn start(args: &[&str], env: &[(&str, &str)], on_line: impl FnMut(&str) -> bool) -> Proc {
        Self::start_logged(args, env, Stdio::inherit(), on_line)
    }

    /// Like `start`, with the child's stderr sent to `stderr`.
    fn start_logged(
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hub-daemon"));
        cmd.args(args).stdout(Stdio::piped()).stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        for line in BufReader::new(stdout).lines() {
            if on_line(&line.unwrap()) {
                return Proc { child };
            }
        }
        let status = child.wait().unwrap();
        panic!("hub-daemon {args:?} exited before ready: {status}");
    }

    /// SIGTERM, then wait; returns the exit code.
    pub fn terminate(mut self) -> i32 {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap().code().unwrap_or(-1)
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `hub-daemon export` and the exports it printed.
pub struct Exporter {
    pub proc: Proc,
    /// (name, address, uri)
    pub exports: Vec<(String, SocketAddr, String)>,
}

impl Exporter {
    /// Start `hub-daemon export ARGS` and wait for its "ready" line.
    pub fn start(args: &[&str]) -> Exporter {
        let mut exports = Vec::new();
        let mut all = vec!["export"];
        all.extend_from_slice(args);
        let proc = Proc::start(&all, &[], |line| {
            if line == "ready" {
                return true;
            }
            // "export NAME nbd://ADDR/NAME"
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts[0], "export", "unexpected line {line:?}");
            let uri = parts[2].to_owned();
            let addr = uri
                .split_once("://")
                .map_or(uri.as_str(), |(_, rest)| rest)
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            exports.push((parts[1].to_owned(), addr, uri));
            false
        });
        Exporter { proc, exports }
    }

    /// SIGTERM, then wait; returns the exit code.
    pub fn terminate(self) -> i32 {
        self.proc.terminate()
    }

    /// SIGKILL, then reap.
    pub fn kill9(self) {
        self.proc.kill9()
    }
}

/// `method path` against `api`; the JSON answer, which must be a 2xx.
pub async fn call_ok(
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let r = integration_tests::http::call(api, method, path, body.as_ref()).await;
    assert!(
        r.status / 100 == 2,
        "{method} {path}: {} {}",
        r.status,
        r.text()
    );
    r.json()
}

/// A running `hub-daemon serve` process.
pub struct DaemonProcess {
    pub proc: Proc,
    pub api: SocketAddr,
}

impl DaemonProcess {
    /// Start `hub-daemon serve ARGS` with extra environment, wait for "ready".
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> DaemonProcess {
        Self::start_logged(args, env, Stdio::inherit())
    }

    /// `start` with the data directory `data`, the API on a free loopback
    /// port and NBD on free ports (what the crash tests restart over).
    pub fn start_in(data: &std::path::Path) -> DaemonProcess {
        Self::start_in_with(data, &[], &[])
    }

    /// [`DaemonProcess::start_in`] with more arguments and environment.
    pub fn start_in_with(
        data: &std::path::Path,
        more: &[&str],
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        let data = data.to_str().unwrap();
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--nbd-ports",
            "0",
            "--nbd-shared-port",
            "0",
        ];
        args.extend_from_slice(more);
        Self::start(&args, env)
    }

    /// Like `start`, with the daemon's log (stderr) sent to `stderr`.
    pub fn start_logged(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> DaemonProcess {
        let mut api = None;
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let proc = Proc::start_logged(&all, env, stderr, |line| {
            if let Some(a) = line
                .strip_prefix("api http://")
                .or_else(|| line.strip_prefix("api https://"))
            {
                api = Some(a.parse().unwrap());
            }
            line == "ready"
        });
        DaemonProcess {
            proc,
            api: api.expect("no api line"),
        }
    }

    /// SIGTERM and wait; the exit code.
    pub fn terminate(self) -> i32 {
        self.proc.terminate()
    }

    /// SIGKILL and reap.
    pub fn kill9(self) {
        self.proc.kill9()
    }
}
