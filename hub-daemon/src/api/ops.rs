//! `/healthz` and `/metrics` (Prometheus text format).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;

/// `GET /healthz`: the daemon answers and its catalog is readable.
pub async fn healthz(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    st.catalog().repositories().await?;
    Ok(Json(json!({"status": "ok"})))
}

/// `GET /metrics`.
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
    let (mut backup_exports, mut restore_exports) = (0u64, 0u64);
    let (mut conns, mut read, mut written, mut reqs, mut errs) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for e in &exports {
        if e.name().starts_with("restore-") {
            restore_exports += 1;
        } else {
            backup_exports += 1;
        }
        let s = e.stats().snapshot();
        conns += s.connections_active;
        read += s.bytes_read;
        written += s.bytes_written;
        reqs += s.requests;
        errs += s.errors;
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
    gauge(
        "hub_nbd_read_bytes",
        "Bytes sent to NBD clients by current exports.",
        "gauge",
        &[(String::new(), read)],
    );
    gauge(
        "hub_nbd_written_bytes",
        "Bytes received from NBD clients by current exports.",
        "gauge",
        &[(String::new(), written)],
    );
    gauge(
        "hub_nbd_requests",
        "NBD requests handled by current exports.",
        "gauge",
        &[(String::new(), reqs)],
    );
    gauge(
        "hub_nbd_request_errors",
        "NBD requests answered with an error by current exports.",
        "gauge",
        &[(String::new(), errs)],
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
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
