//! The HTTP API: thin axum handlers that validate, call the backup service
//! or the catalog, and map results. Every route is wired here.

mod backups;
mod error;
mod json;
mod ops;
mod repositories;
mod vms;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Router;

pub use error::ApiError;

use crate::backup::Backups;
use crate::catalog::Catalog;
use crate::error::DaemonError;

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Backups>);

impl AppState {
    /// State over the backup service.
    pub fn new(backups: Arc<Backups>) -> Self {
        AppState(backups)
    }

    fn backups(&self) -> &Arc<Backups> {
        &self.0
    }

    fn catalog(&self) -> &Catalog {
        self.0.catalog()
    }
}

async fn not_found() -> ApiError {
    ApiError(DaemonError::NotFound {
        what: "route",
        id: String::new(),
    })
}

async fn method_not_allowed() -> (StatusCode, axum::Json<serde_json::Value>) {
    let body = serde_json::json!({"error": {"status": 405, "code": "method_not_allowed", "message": "method not allowed"}});
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body))
}

/// Every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/api/v1/vms", get(vms::list))
        .route(
            "/api/v1/vms/{vm_name}",
            put(vms::put).get(vms::get).delete(vms::delete),
        )
        .route(
            "/api/v1/repositories",
            get(repositories::list).post(repositories::create),
        )
        .route("/api/v1/backups", post(backups::start).get(backups::list))
        .route(
            "/api/v1/backups/{id}",
            get(backups::get).delete(backups::delete),
        )
        .route("/api/v1/backups/{id}/complete", post(backups::complete))
        .route("/api/v1/backups/{id}/abort", post(backups::abort))
        .route("/api/v1/backups/{id}/verify", post(backups::verify))
        .route(
            "/api/v1/backups/{id}/restore",
            post(backups::restore).delete(backups::stop_restore),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}
