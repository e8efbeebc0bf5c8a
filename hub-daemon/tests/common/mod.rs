//! Running the `hub-daemon` binary, or the daemon in-process, in tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod hub;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// A running `hub-daemon export` and the exports it printed.
pub struct Exporter {
    pub child: Child,
    /// (name, address, uri)
    pub exports: Vec<(String, SocketAddr, String)>,
}

impl Exporter {
    /// Start `hub-daemon export ARGS` and wait for its "ready" line.
    pub fn start(args: &[&str]) -> Exporter {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hub-daemon"))
            .arg("export")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut exports = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line == "ready" {
                return Exporter { child, exports };
            }
            // "export NAME nbd://ADDR/NAME"
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts[0], "export", "unexpected line {line:?}");
            let uri = parts[2].to_owned();
            let addr = uri
                .trim_start_matches("nbd://")
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            exports.push((parts[1].to_owned(), addr, uri));
        }
        let status = child.wait().unwrap();
        panic!("hub-daemon export exited before ready: {status}");
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

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `hub-daemon serve` process.
pub struct DaemonProcess {
    pub child: Child,
    pub api: SocketAddr,
}

impl DaemonProcess {
    /// Start `hub-daemon serve ARGS` with extra environment, wait for "ready".
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> DaemonProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hub-daemon"));
        cmd.arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut api = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("api http://") {
                api = Some(a.parse().unwrap());
            }
            if line == "ready" {
                return DaemonProcess {
                    child,
                    api: api.expect("no api line"),
                };
            }
        }
        let status = child.wait().unwrap();
        panic!("hub-daemon serve exited before ready: {status}");
    }

    /// SIGTERM and wait; the exit code.
    pub fn terminate(mut self) -> i32 {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap().code().unwrap_or(-1)
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
