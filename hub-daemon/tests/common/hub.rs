//! An in-process hub daemon for API tests, and API helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hub_daemon::app::Daemon;
use hub_daemon::config::{Config, PortRange};
use integration_tests::http::{call_as, Response};
use serde_json::{json, Value};

/// A daemon on port 0 with its own data directory.
pub struct Hub {
    pub daemon: Option<Daemon>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// Bearer token sent with every request (once tokens exist).
    pub token: Option<String>,
}

/// A free loopback port for a server that needs its number up front (outside
/// the ephemeral range, so no outgoing connection takes it first).
pub fn free_port() -> u16 {
    integration_tests::ports::loopback_port()
}

pub fn config(data_dir: &Path, capacity: usize, shared_port: u16, idle: Duration) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        nbd_ports: PortRange::Ephemeral { capacity },
        nbd_shared_port: shared_port,
        nbd_bind: "127.0.0.1".parse().unwrap(),
        advertise_host: "127.0.0.1".into(),
        idle_timeout: idle,
        // Tests put extra repositories beside the data directory.
        repository_roots: data_dir
            .parent()
            .map(Path::to_path_buf)
            .into_iter()
            .collect(),
        ..Config::default()
    }
}

impl Hub {
    pub async fn start() -> Hub {
        Self::start_with(64, 0, Duration::from_secs(3600)).await
    }

    pub async fn start_with(capacity: usize, shared_port: u16, idle: Duration) -> Hub {
        Self::start_in(tempfile::tempdir().unwrap(), capacity, shared_port, idle).await
    }

    /// Start with the test configuration changed by `f` first.
    pub async fn start_configured(f: impl FnOnce(&mut Config)) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&dir.path().join("data"), 64, 0, Duration::from_secs(3600));
        f(&mut c);
        let daemon = Daemon::start(c).await.unwrap();
        let addr = daemon.api_addr;
        Hub {
            daemon: Some(daemon),
            addr,
            dir,
            token: None,
        }
    }

    /// Start with `dir/data` as the data directory (which may exist, e.g.
    /// as a mount point).
    pub async fn start_in(
        dir: tempfile::TempDir,
        capacity: usize,
        shared_port: u16,
        idle: Duration,
    ) -> Hub {
        let daemon = Daemon::start(config(
            &dir.path().join("data"),
            capacity,
            shared_port,
            idle,
        ))
        .await
        .unwrap();
        let addr = daemon.api_addr;
        Hub {
            daemon: Some(daemon),
            addr,
            dir,
            token: None,
        }
    }

    pub fn repo(&self) -> PathBuf {
        self.dir
            .path()
            .join("data/repository")
            .canonicalize()
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> Response {
        call_as(self.addr, self.token.as_deref(), "GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        call_as(self.addr, self.token.as_deref(), "POST", path, Some(&body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Response {
        call_as(self.addr, self.token.as_deref(), "PUT", path, Some(&body)).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        call_as(self.addr, self.token.as_deref(), "DELETE", path, None).await
    }

    /// Register `vm` with disks of the given sizes (disk_id = unit = index).
    pub async fn register(&self, vm: &str, sizes: &[u64]) {
        let disks: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"disk_id": i, "size_bytes": s, "unit_number": i, "label": format!("Hard disk {}", i + 1)}))
            .collect();
        let r = self
            .put(
                &format!("/api/v1/vms/{vm}"),
                json!({"vm_context_id": format!("ctx-{vm}"), "disks": disks}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Start a backup; must be 201.
    pub async fn backup(&self, vm: &str, kind: &str) -> Value {
        let r = self
            .post(
                "/api/v1/backups",
                json!({"vm_name": vm, "backup_type": kind, "repository_id": "default"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()
    }

    /// Complete a backup, reporting a change id for every disk (as a
    /// sender must, for the next incremental to build on it); must be 200
    /// and completed.
    pub async fn complete(&self, id: &str) -> Value {
        let b = self.get(&format!("/api/v1/backups/{id}")).await.json();
        let r = self
            .post(&format!("/api/v1/backups/{id}/complete"), change_ids(&b))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["status"], "completed", "{v}");
        v
    }

    /// `GET /api/v1/backups/{id}`, which must answer 200.
    pub async fn record(&self, id: &str) -> Value {
        let r = self.get(&format!("/api/v1/backups/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Verify a restore point on demand and wait until it reports `ok`.
    pub async fn verify_ok(&self, id: &str) {
        let r = self
            .post(&format!("/api/v1/backups/{id}/verify"), Value::Null)
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        let v = eventually(60, || async {
            let b = self.record(id).await;
            let s = b["verify_status"].as_str().unwrap_or("").to_owned();
            (s != "verifying" && !s.is_empty()).then_some(b)
        })
        .await;
        assert_eq!(v["verify_status"], "ok", "{v}");
    }

    /// A metric's value from /metrics.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.get("/metrics").await.text();
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
    }

    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.unwrap();
        }
    }
}

/// A complete body giving every disk of backup record `b` a change id
/// (`cid-{backup}-{disk}`).
pub fn change_ids(b: &Value) -> Value {
    let id = b["backup_id"].as_str().unwrap_or("?");
    let disks: Vec<Value> = b["disks"]
        .as_array()
        .map(|d| d.iter().map(|d| d["disk_id"].clone()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| json!({"disk_id": d, "change_id": format!("cid-{id}-{d}")}))
        .collect();
    json!({ "disks": disks })
}

/// `disk_key:nbd://host:port/export,...` → [(disk_key, uri)].
pub fn parse_targets(s: &str) -> Vec<(u32, String)> {
    s.split(',')
        .map(|t| {
            let (k, uri) = t.split_once(':').unwrap();
            (k.parse().unwrap(), uri.to_owned())
        })
        .collect()
}

/// Poll `f` until it returns Some, up to `secs` (for state changes the
/// daemon makes on its own, like the idle watchdog).
pub async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
