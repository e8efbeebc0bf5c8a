//! `/healthz` and `/metrics` (Prometheus text format).

use std::fmt::Write;

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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
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
        "hub_nbd_connections",
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
                format!("{{status=\"{s}\"}}"),
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
    let pool = backups.nbd().pool();
    gauge(
        "hub_nbd_ports_in_use",
        "NBD ports held by backups and restores.",
        "gauge",
        &[(String::new(), pool.in_use() as u64)],
    );
    gauge(
        "hub_nbd_ports_total",
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
    for r in st.catalog().repositories().await? {
        let label = format!("{{repository=\"{}\"}}", r.id);
        if let Ok(fs) = crate::space::fs_space(std::path::Path::new(&r.path)) {
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
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
