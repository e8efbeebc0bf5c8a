//! The one mapping from errors to HTTP, and the one error body:
//! `{"error": {"status": 404, "code": "not_found", "message": "..."}}`.
//! Server-side failures (500) show a generic message; details go to the log.
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `bad_request` | malformed or invalid request: JSON, names, sizes, paths, query |
//! | 401 | `unauthorized` | no, a malformed, unknown or revoked bearer token (with `WWW-Authenticate: Bearer`) |
//! | 403 | `forbidden` | the token's role may not do this |
//! | 404 | `not_found` | unknown VM, repository, backup, policy or route |
//! | 405 | `method_not_allowed` | known route, other method |
//! | 409 | `conflict` | state forbids it (backup running, already finished, dependents) |
//! | 413 | `payload_too_large` | body over 2 MiB |
//! | 414 | `uri_too_long` | path and query over 8 KiB |
//! | 415 | `unsupported_media_type` | a body whose Content-Type is not JSON |
//! | 422 | `bad_image` | an image is corrupt, unsupported or refused by policy |
//! | 500 | `internal` | our fault; details only in the log |
//! | 502 | `appliance_error` | the backup appliance refused, was unreachable or broke the contract |
//! | 503 | `unavailable` | out of NBD ports, or shutting down |
//! | 504 | `appliance_timeout` | the backup appliance did not answer in time (`--sna-timeout`) |
//! | 507 | `insufficient_storage` | repository or catalog filesystem full (ENOSPC, EDQUOT) |
//!
//! Two sources of errors meet here: the daemon's own ([`DaemonError`]) and
//! refusals at the HTTP level ([`ApiError`]'s other variants: body or URI
//! too long, wrong method, not JSON), which have no meaning below the API.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::DaemonError;

/// An error on its way to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Whatever the daemon refused or failed at.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The body is longer than the API accepts.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request URI is longer than the API accepts.
    #[error("request URI of {len} bytes is longer than {limit}")]
    UriTooLong {
        /// Its length.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The route exists, the method does not.
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    /// No valid bearer token (missing, malformed, unknown or revoked).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The token's role may not do this.
    #[error("a {have} token may not do this; it needs {need}")]
    Forbidden {
        /// The token's role.
        have: crate::catalog::Role,
        /// The role the route needs.
        need: crate::catalog::Role,
    },
    /// A body was sent with a Content-Type that is not JSON.
    #[error("Content-Type {0:?} is not supported; send application/json")]
    UnsupportedMediaType(String),
}

impl ApiError {
    /// 400 with `msg`.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::Daemon(DaemonError::BadRequest(msg.into()))
    }

    /// 404 for a missing `what` named `id`.
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        ApiError::Daemon(DaemonError::NotFound {
            what,
            id: id.into(),
        })
    }

    /// The status and the machine-readable code: the one place where an
    /// error gets its HTTP meaning.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Daemon(e) => match e {
                DaemonError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                DaemonError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
                DaemonError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                DaemonError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                DaemonError::BadImage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_image"),
                DaemonError::Incomplete(_) => (StatusCode::UNPROCESSABLE_ENTITY, "backup_failed"),
                DaemonError::Appliance(_) => (StatusCode::BAD_GATEWAY, "appliance_error"),
                DaemonError::ObjectStore(_) => (StatusCode::BAD_GATEWAY, "object_store_error"),
                DaemonError::ApplianceTimeout(_) => {
                    (StatusCode::GATEWAY_TIMEOUT, "appliance_timeout")
                }
                DaemonError::NoSpace(_) => {
                    (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
                }
                DaemonError::Catalog(_)
                | DaemonError::Io { .. }
                | DaemonError::Nbd(_)
                | DaemonError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // 500s hide their details (paths, SQL); 503 and 507 say what ran out.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
            "internal error (see the daemon log)".to_owned()
        } else {
            if status.is_server_error() {
                tracing::warn!(error = %self, status = status.as_u16(), "request failed");
            } else {
                tracing::debug!(error = %self, status = status.as_u16(), "request refused");
            }
            self.to_string()
        };
        // The documented type itself, so the document and the body agree.
        let body = super::doc::ErrorBody {
            error: super::doc::ErrorDetail {
                status: status.as_u16(),
                code,
                message,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
