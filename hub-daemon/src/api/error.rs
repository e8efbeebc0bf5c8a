//! The one mapping from daemon errors to HTTP, and the one error body:
//! `{"error": {"status": 404, "code": "not_found", "message": "..."}}`.
//! Server-side failures (500) show a generic message; details go to the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::DaemonError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub DaemonError);

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    /// 400 with `msg`.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(DaemonError::BadRequest(msg.into()))
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match &self.0 {
            DaemonError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            DaemonError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            DaemonError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            DaemonError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            DaemonError::BadImage(_) | DaemonError::Digest(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "bad_image")
            }
            DaemonError::Incomplete(_) => (StatusCode::UNPROCESSABLE_ENTITY, "backup_failed"),
            DaemonError::Catalog(_)
            | DaemonError::Io { .. }
            | DaemonError::Nbd(_)
            | DaemonError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self.0, "request failed");
            "internal error (see the daemon log)".to_owned()
        } else {
            tracing::debug!(error = %self.0, status = status.as_u16(), "request refused");
            self.0.to_string()
        };
        let body = json!({"error": {"status": status.as_u16(), "code": code, "message": message}});
        (status, Json(body)).into_response()
    }
}
