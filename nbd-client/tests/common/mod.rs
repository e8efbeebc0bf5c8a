//! External NBD servers for tests: qemu-nbd and nbdkit started in their
//! daemon modes (the parent exits once the socket listens, so no polling or
//! sleeping), killed through their pid files on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A free loopback port for a server that needs its number up front (outside
/// the ephemeral range, so no outgoing connection takes it first).
pub fn free_port() -> u16 {
    integration_tests::ports::loopback_port()
}

/// A daemonized server, killed on drop.
pub struct Daemon {
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn pidfile(dir: &Path) -> PathBuf {
        dir.join("server.pid")
    }

    fn start(program: &str, args: impl FnOnce(u16, &Path) -> Vec<String>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = args(port, &Self::pidfile(dir.path()));
        let st = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
        assert!(st.success(), "{program} {args:?} failed: {st}");
        Daemon { port, dir }
    }

    /// `qemu-nbd -f FORMAT -x NAME -p PORT -b 127.0.0.1 -t --fork` on `image`.
    pub fn qemu_nbd(image: &Path, format: &str, name: &str, extra: &[&str]) -> Daemon {
        Self::start("qemu-nbd", |port, pid| {
            let mut a: Vec<String> = [
                "-f",
                format,
                "-x",
                name,
                "-p",
                &port.to_string(),
                "-b",
                "127.0.0.1",
                "-t",
                "--fork",
                "--pid-file",
                pid.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.extend(extra.iter().map(|s| s.to_string()));
            a.push(image.to_str().unwrap().to_owned());
            a
        })
    }

    /// `nbdkit -p PORT -i 127.0.0.1 -P PIDFILE PLUGIN ARGS...` (daemonizes).
    pub fn nbdkit(plugin_args: &[&str]) -> Daemon {
        Self::start("nbdkit", |port, pid| {
            let mut a: Vec<String> = vec![
                "-p".into(),
                port.to_string(),
                "-i".into(),
                "127.0.0.1".into(),
                "-P".into(),
                pid.to_str().unwrap().into(),
            ];
            a.extend(plugin_args.iter().map(|s| s.to_string()));
            a
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(Self::pidfile(self.dir.path())) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}
