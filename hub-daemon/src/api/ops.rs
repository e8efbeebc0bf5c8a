//! `/healthz` and `/metrics` (Prometheus text format).
//!
//! Metric names follow Prometheus conventions, checked by
//! `tests/metrics.rs`: the unit in the name (`_bytes`, `_seconds`,
//! `_bytes_per_second`), counters end in `_total` and nothing else does,
//! one `# HELP` and `# TYPE` per family, label values escaped.

use std::collections::{HashMap, VecDeque};
use std::fmt::{Display, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;

/// Body of `GET /healthz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always "ok" (a failing check is an error status).
    #[schema(value_type = String, pattern = "^ok$")]
    pub status: &'static str,
}

/// `GET /healthz`: the daemon answers and its catalog is readable.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "The daemon answers and its catalog is readable.", body = Health))
)]
pub async fn healthz(State(st): State<AppState>) -> Result<Json<Health>, ApiError> {
    st.catalog().repositories().await?;
    Ok(Json(Health { status: "ok" }))
}

/// `GET /metrics`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let backups = st.backups();
    let exports = backups.nbd().exports();
    let mut out = String::with_capacity(2048);
    let mut gauge = |name: &str, help: &str, kind: &str, samples: &[(String, u64)]| {
        family(&mut out, name, help, kind, samples);
    };
    let (mut backup_exports, mut restore_exports, mut conns) = (0u64, 0u64, 0u64);
    for e in &exports {
        if e.name().starts_with("restore-") {
            restore_exports += 1;
        } else {
            backup_exports += 1;
        }
        conns += e.stats().snapshot().connections_active;
    }
    gauge(
        "hub_nbd_exports",
        "NBD exports being served.",
        "gauge",
        &[
            ("{kind=\"backup\"}".into(), backup_exports),
            ("{kind=\"restore\"}".into(), restore_exports),
        ],
    );
    gauge(
        "hub_nbd_connections_open",
        "NBD client connections open.",
        "gauge",
        &[(String::new(), conns)],
    );
    let t = backups.nbd().totals();
    gauge(
        "hub_nbd_connections_total",
        "NBD connections accepted into transmission.",
        "counter",
        &[(String::new(), t.connections)],
    );
    gauge(
        "hub_nbd_requests_total",
        "NBD requests handled.",
        "counter",
        &[(String::new(), t.requests)],
    );
    gauge(
        "hub_nbd_request_errors_total",
        "NBD requests answered with an error.",
        "counter",
        &[(String::new(), t.errors)],
    );
    gauge(
        "hub_nbd_read_bytes_total",
        "Payload bytes sent to NBD clients.",
        "counter",
        &[(String::new(), t.bytes_read)],
    );
    gauge(
        "hub_nbd_written_bytes_total",
        "Payload bytes received from NBD clients.",
        "counter",
        &[(String::new(), t.bytes_written)],
    );
    let counts = st.catalog().count_by_status().await?;
    let mut by_status: Vec<(String, u64)> = ["running", "completed", "failed"]
        .iter()
        .map(|s| {
            (
                labels(&[("status", s)]),
                counts.iter().find(|c| c.0 == *s).map_or(0, |c| c.1),
            )
        })
        .collect();
    by_status.sort();
    gauge(
        "hub_backups",
        "Backups in the catalog by status.",
        "gauge",
        &by_status,
    );
    // The fleet: every node sharing the catalog, as this hub sees it.
    let (mut up, mut node_free, mut node_running) = (Vec::new(), Vec::new(), Vec::new());
    for n in st.catalog().nodes(crate::time::now_ms()).await? {
        let label = labels(&[("node", &n.node_id)]);
        up.push((label.clone(), u64::from(n.alive())));
        node_free.push((label.clone(), n.free_bytes));
        node_running.push((label, n.running_backups));
    }
    gauge(
        "hub_node_up",
        "1 while the node's heartbeat lease holds, else 0.",
        "gauge",
        &up,
    );
    gauge(
        "hub_node_free_bytes",
        "Bytes free in the node's built-in repository at its last heartbeat.",
        "gauge",
        &node_free,
    );
    gauge(
        "hub_node_running_backups",
        "Backups running on the node.",
        "gauge",
        &node_running,
    );
    let pool = backups.nbd().pool();
    gauge(
        "hub_nbd_ports_in_use",
        "NBD ports held by backups and restores.",
        "gauge",
        &[(String::new(), pool.in_use() as u64)],
    );
    gauge(
        "hub_nbd_ports_capacity",
        "NBD ports in the configured range.",
        "gauge",
        &[(String::new(), pool.capacity() as u64)],
    );
    gauge(
        "hub_restores",
        "Backups currently served for restore.",
        "gauge",
        &[(String::new(), backups.restoring().await as u64)],
    );
    let (mut cap, mut free, mut held) = (Vec::new(), Vec::new(), Vec::new());
    let own = st.catalog().node_id().to_owned();
    // This node's only: it is the one that sweeps them.
    let owed_objects = st.catalog().object_deletions(None).await?;
    let mut owed = Vec::new();
    for r in st.catalog().repositories().await? {
        let label = labels(&[("repository", &r.id)]);
        // Another node's directory is not on this host: its filesystem
        // figures come from that node's own /metrics.
        let here = r.node_id == own;
        if here {
            let n = owed_objects
                .iter()
                .filter(|d| d.repository_id == r.id)
                .count();
            owed.push((label.clone(), n as u64));
        }
        if let Some(fs) = here
            .then(|| crate::space::fs_space(std::path::Path::new(&r.path)).ok())
            .flatten()
        {
            cap.push((label.clone(), fs.capacity_bytes));
            free.push((label.clone(), fs.free_bytes));
        }
        held.push((label, st.catalog().repository_backup_bytes(&r.id).await?));
    }
    gauge(
        "hub_repository_capacity_bytes",
        "Size of the filesystem holding the repository.",
        "gauge",
        &cap,
    );
    gauge(
        "hub_repository_free_bytes",
        "Bytes free for the hub on the repository's filesystem.",
        "gauge",
        &free,
    );
    gauge(
        "hub_repository_backup_bytes",
        "Bytes of completed restore points' images in the repository.",
        "gauge",
        &held,
    );
    gauge(
        "hub_s3_object_deletions_pending",
        "Unreferenced objects in the repository's bucket still to delete (under Object Lock retention, refused, or the store unreachable).",
        "gauge",
        &owed,
    );
    // Per restore point and disk: what it holds and what deleting it
    // would give back (the estimate documented on the backup's
    // `freed_bytes_if_deleted`).
    let (mut image, mut freed) = (Vec::new(), Vec::new());
    for b in st.catalog().backups(None, Some("completed".into())).await? {
        for d in &b.disks {
            let label = labels(&[
                ("backup_id", &b.backup_id),
                ("vm", &b.vm_name),
                ("repository", &b.repository_id),
                ("disk", &d.disk_id.to_string()),
            ]);
            image.push((label.clone(), d.image_bytes.unwrap_or(0)));
            freed.push((label, d.freed_bytes_if_deleted.unwrap_or(0)));
        }
    }
    gauge(
        "hub_backup_image_bytes",
        "Bytes of a completed restore point's image of one disk.",
        "gauge",
        &image,
    );
    gauge(
        "hub_backup_freed_if_deleted_bytes",
        "Bytes deleting the restore point would give back on one disk (0 when others build on it: a lower bound).",
        "gauge",
        &freed,
    );
    running_disks(&st, &mut out).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// Per-disk series of running backups: bytes received (a counter, whose
/// `rate()` is the throughput) and the throughput the hub itself measured
/// over its last scrapes (for a glance without PromQL). A backup's series
/// end with it.
async fn running_disks(st: &AppState, out: &mut String) -> Result<(), ApiError> {
    let mut running = st
        .catalog()
        .backups(None, Some("running".to_owned()))
        .await?;
    let mut written = Vec::new();
    let mut seen = Vec::new();
    for b in &mut running {
        st.backups().add_live_stats(b);
        for d in &b.disks {
            let disk = d.disk_id.to_string();
            let l = labels(&[
                ("backup_id", &b.backup_id),
                ("vm", &b.vm_name),
                ("disk", &disk),
            ]);
            written.push((l.clone(), d.bytes_written));
            seen.push(((b.backup_id.clone(), d.disk_id), d.bytes_written, l));
        }
    }
    family(
        out,
        "hub_backup_disk_written_bytes_total",
        "Payload bytes received for each disk of a running backup.",
        "counter",
        &written,
    );
    let rates = st.throughput().observe(
        Instant::now(),
        seen.iter().map(|(k, bytes, _)| (k.clone(), *bytes)),
    );
    let rates: Vec<(String, String)> = seen
        .into_iter()
        .zip(rates)
        .map(|((_, _, l), r)| (l, format!("{r:.1}")))
        .collect();
    family(
        out,
        "hub_backup_disk_throughput_bytes_per_second",
        "Receive rate of each disk of a running backup, between this scrape and one about \
         10 s before it (0 on the first scrape); rate() of \
         hub_backup_disk_written_bytes_total is the precise figure.",
        "gauge",
        &rates,
    );
    Ok(())
}

/// One metric family: HELP, TYPE, then its samples (`labels` already in
/// `{...}` form or empty).
fn family<V: Display>(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    samples: &[(String, V)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// `{k="v",...}` with each value escaped as the text format requires
/// (backslash, double quote, newline), so no value can break a line or
/// forge another label.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// How far back the throughput gauge looks (at least one scrape back).
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

/// Key of one disk of one backup.
type DiskKey = (String, u32);

/// The byte counters of running disks as seen at recent scrapes, to turn
/// them into a rate without a background task: the work is done only when
/// someone scrapes.
#[derive(Debug, Default)]
pub(crate) struct Throughput {
    samples: Mutex<HashMap<DiskKey, VecDeque<(Instant, u64)>>>,
}

impl Throughput {
    /// Record each disk's counter at `now` and return its rate in bytes/s
    /// (in the same order): over the span from the newest sample at least
    /// [`THROUGHPUT_WINDOW`] old (else the oldest) to now; 0 for a disk
    /// seen for the first time. Disks not given are forgotten (their backup
    /// has ended).
    pub(crate) fn observe(
        &self,
        now: Instant,
        disks: impl Iterator<Item = (DiskKey, u64)>,
    ) -> Vec<f64> {
        let mut all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = HashMap::with_capacity(all.len());
        let mut rates = Vec::new();
        for (key, bytes) in disks {
            let mut q = all.remove(&key).unwrap_or_default();
            q.push_back((now, bytes));
            // Drop what the next-oldest sample already covers.
            while q.len() > 2
                && q.get(1)
                    .is_some_and(|s| now.duration_since(s.0) >= THROUGHPUT_WINDOW)
            {
                q.pop_front();
            }
            let rate = match q.front() {
                Some(&(t, b)) if q.len() >= 2 => {
                    let dt = now.duration_since(t).as_secs_f64();
                    if dt > 0.0 {
                        bytes.saturating_sub(b) as f64 / dt
                    } else {
                        0.0
                    }
                }
                _ => 0.0,
            };
            rates.push(rate);
            kept.insert(key, q);
        }
        *all = kept;
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x")]), "{a=\"x\"}");
        assert_eq!(
            labels(&[("a", "q\"b\\n\nz"), ("b", "")]),
            "{a=\"q\\\"b\\\\n\\nz\",b=\"\"}"
        );
    }

    #[test]
    fn throughput_is_bytes_over_the_window() {
        let t = Throughput::default();
        let k = || ("b1".to_owned(), 0u32);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.observe(at(0), [(k(), 0)].into_iter()), vec![0.0]);
        assert_eq!(t.observe(at(2), [(k(), 2000)].into_iter()), vec![1000.0]);
        assert_eq!(t.observe(at(4), [(k(), 6000)].into_iter()), vec![1500.0]);
        // 12 s on: the sample at 0 is out of the window, the one at 2 is
        // the newest 10 s old.
        assert_eq!(t.observe(at(12), [(k(), 12000)].into_iter()), vec![1000.0]);
        // Seen again after being forgotten: starts over.
        assert!(t.observe(at(13), std::iter::empty()).is_empty());
        assert_eq!(t.observe(at(14), [(k(), 20000)].into_iter()), vec![0.0]);
        // A counter going back (cannot happen for one export) is no
        // negative rate.
        assert_eq!(t.observe(at(15), [(k(), 0)].into_iter()), vec![0.0]);
    }
}
