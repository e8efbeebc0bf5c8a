//! The issue-11 scheduled-verify figure: a backup's write throughput into
//! the hub alone, and while the hub's scheduled verification re-reads other
//! large restore points (`verifysched` workload).
//!
//! The hub (`Daemon`) runs in this process on a 2-worker runtime, the
//! backup is `nbdcopy --flush` of the source into the backup's export
//! between `POST /api/v1/backups` and `complete`. Verification is the
//! scheduler's own pass (`run_pass`, with a clock two days on so the old
//! restore points are due), started before the backup and still running
//! when it completes (checked; otherwise the repetition fails). The hub
//! runs twice over the same catalog: with the default verification rates
//! (`verify_rate` 64M, `verify_rate_during_backup` 16M), then with both
//! unlimited, to show what the throttle buys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::workloads::Run;

const SERVER: &str = "hub";
const DAY_MS: i64 = 86_400_000;

/// A hub over `data_dir` with verification rates `rates` (None: default).
struct Hub {
    rt: tokio::runtime::Runtime,
    daemon: hub_daemon::app::Daemon,
}

impl Hub {
    fn start(data_dir: &Path, unlimited: bool) -> anyhow::Result<Hub> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut config = hub_daemon::config::Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data_dir.to_path_buf(),
            nbd_ports: hub_daemon::config::PortRange::Ephemeral { capacity: 64 },
            nbd_shared_port: 0,
            ..Default::default()
        };
        // The bench drives passes itself.
        config.verify.check_interval = Duration::ZERO;
        if unlimited {
            config.verify.rate = 0;
            config.verify.rate_during_backup = 0;
        }
        let daemon = rt.block_on(hub_daemon::app::Daemon::start(config))?;
        Ok(Hub { rt, daemon })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let (status, v) = self.rt.block_on(crate::handoff::call(
            self.daemon.api_addr,
            method,
            path,
            body,
        ))?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }

    /// A full backup of `vm` (one disk) from `src` through nbdcopy; the
    /// seconds from the POST to the completed answer, and the backup id.
    fn backup(&self, vm: &str, policy: Option<&str>, src: &Path) -> anyhow::Result<(f64, String)> {
        let mut body = json!({"vm_name": vm, "backup_type": "full", "repository_id": "default"});
        if let Some(p) = policy {
            body["policy_id"] = json!(p);
        }
        let t = Instant::now();
        let started = self.call("POST", "/api/v1/backups", Some(&body))?;
        let id = started["backup_id"]
            .as_str()
            .context("no backup_id")?
            .to_owned();
        let targets = started["nbd_targets_string"]
            .as_str()
            .context("no targets")?;
        let (_, uri) = targets.split_once(':').context("bad targets")?;
        let st = Command::new("nbdcopy")
            .args(["--flush", src.to_str().unwrap_or(""), uri])
            .status()?;
        if !st.success() {
            bail!("nbdcopy into {uri} failed");
        }
        let done = self.call(
            "POST",
            &format!("/api/v1/backups/{id}/complete"),
            Some(&json!({"disks": [{"disk_id": 0, "change_id": format!("c-{id}")}]})),
        )?;
        if done["status"] != "completed" {
            bail!("backup {id}: {done}");
        }
        Ok((t.elapsed().as_secs_f64(), id))
    }

    fn stop(self) -> anyhow::Result<()> {
        self.rt.block_on(self.daemon.shutdown())
    }
}

/// Make `path` cold in the page cache except `keep` (re-read): verification
/// then reads old restore points from the disk, as days later.
fn cold(keep: &Path) -> bool {
    let dropped = crate::verify::drop_caches();
    if let Ok(mut f) = std::fs::File::open(keep) {
        let _ = std::io::copy(&mut f, &mut std::io::sink());
    }
    dropped
}

impl Run {
    /// The whole figure (every repetition): `reps` × (backup alone, backup
    /// with a scheduled verification running), with default rates and
    /// then unlimited. Old restore points: `disks` fulls of `disk_size`;
    /// the backup: the `size` source.
    pub fn verify_sched(&mut self, reps: usize, drop_cache: bool) -> anyhow::Result<()> {
        let dir = self.workdir.join("verifysched");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data_dir = dir.join("hub");
        let n = self.disks;
        self.progress(format!("verifysched: generating {n} old restore points"));
        let olds: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("old{i}.raw"))).collect();
        for (i, p) in olds.iter().enumerate() {
            crate::data::generate(p, self.disk_size, 20 + i as u64)?;
        }
        let hub = Hub::start(&data_dir, false)?;
        hub.call(
            "PUT",
            "/api/v1/policies/daily",
            Some(&json!({"verify_every_days": 1})),
        )?;
        let disk = |size: u64| json!({"vm_context_id": "ctx", "disks": [{"disk_id": 0, "size_bytes": size, "unit_number": 0}]});
        hub.call("PUT", "/api/v1/vms/vm1", Some(&disk(self.size)))?;
        let mut old_ids = Vec::new();
        for (i, p) in olds.iter().enumerate() {
            let vm = format!("old{i}");
            hub.call(
                "PUT",
                &format!("/api/v1/vms/{vm}"),
                Some(&disk(self.disk_size)),
            )?;
            let (_, id) = hub.backup(&vm, Some("daily"), p)?;
            old_ids.push(id);
            let _ = std::fs::remove_file(p);
        }
        let mut hub = Some(hub);
        for (phase, unlimited) in [("", false), ("unthrottled_", true)] {
            let h = match hub.take() {
                Some(h) => h,
                None => Hub::start(&data_dir, unlimited)?,
            };
            for rep in 1..=reps {
                let mut alone = 0.0;
                for with_verify in [false, true] {
                    let what = if with_verify { "with verify" } else { "alone" };
                    self.progress(format!(
                        "verifysched: [rep {rep}/{reps}] {phase}backup {what}"
                    ));
                    if drop_cache && !cold(&self.src) {
                        eprintln!(
                            "\nverifysched: cannot drop the page cache (not root): warm figures"
                        );
                    }
                    let stop = CancellationToken::new();
                    let pass = with_verify.then(|| {
                        let backups = std::sync::Arc::clone(h.daemon.backups());
                        let stop = stop.clone();
                        let now = hub_daemon::time::now_ms() + 2 * DAY_MS;
                        h.rt.spawn(async move {
                            hub_daemon::lifecycle::verify_schedule::run_pass(&backups, now, &stop)
                                .await
                        })
                    });
                    if pass.is_some() {
                        // Wait until a verification is reading.
                        let t = Instant::now();
                        loop {
                            let b =
                                h.call("GET", &format!("/api/v1/backups/{}", old_ids[0]), None)?;
                            if b["verify_status"] == "verifying" {
                                break;
                            }
                            if t.elapsed() > Duration::from_secs(30) {
                                bail!("the scheduled verification did not start: {b}");
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    let (secs, id) = h.backup("vm1", None, &self.src)?;
                    let mbps = self.size as f64 / 1e6 / secs;
                    if let Some(pass) = pass {
                        if pass.is_finished() {
                            self.failures.push(format!(
                                "verifysched {phase}rep {rep}: the verification pass ended before the backup did; use more or larger old restore points (--disks, --disk-size)"
                            ));
                        }
                        stop.cancel();
                        let report = h.rt.block_on(pass)??;
                        if !report.corrupt.is_empty() || !report.failed.is_empty() {
                            self.failures
                                .push(format!("verifysched {phase}rep {rep}: {report:?}"));
                        }
                        self.record_hub(
                            &format!("verifysched_{phase}backup_with_verify"),
                            rep,
                            mbps,
                            "MB/s",
                        );
                        self.record_hub(
                            &format!("verifysched_{phase}with_over_alone"),
                            rep,
                            mbps / alone,
                            "ratio",
                        );
                    } else {
                        alone = mbps;
                        self.record_hub(
                            &format!("verifysched_{phase}backup_alone"),
                            rep,
                            mbps,
                            "MB/s",
                        );
                    }
                    h.call("DELETE", &format!("/api/v1/backups/{id}"), None)?;
                }
            }
            h.stop()?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn record_hub(&mut self, test: &str, rep: usize, value: f64, unit: &str) {
        self.samples.push(crate::report::Sample {
            server: SERVER.into(),
            test: test.into(),
            rep,
            value,
            unit: unit.into(),
        });
    }
}
