//! The daemon's error type, at the orchestration level. The one mapping to
//! HTTP status lives in `api::error`.

use std::io;

use qcow_backend::{ImageError, ImageErrorKind};

/// Why a daemon operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The request is malformed or invalid.
    #[error("{0}")]
    BadRequest(String),
    /// A named thing does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// Kind of thing.
        what: &'static str,
        /// Its name.
        id: String,
    },
    /// The request conflicts with current state (backup running, dependents).
    #[error("{0}")]
    Conflict(String),
    /// Out of a resource (NBD ports) or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// An image is corrupt, unsupported or refused by policy.
    #[error("{0}")]
    BadImage(String),
    /// A backup could not be completed as a faithful copy (failed writes,
    /// failed flush, digest mismatch); it has been marked failed.
    #[error("{0}")]
    Incomplete(String),
    /// A digest sidecar is damaged or does not match.
    #[error("digest: {0}")]
    Digest(#[from] disk_digest::SidecarError),
    /// The catalog failed.
    #[error("catalog: {0}")]
    Catalog(#[from] rusqlite::Error),
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The NBD server refused an operation.
    #[error("nbd: {0}")]
    Nbd(#[from] nbd_server::ServerError),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl DaemonError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        DaemonError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<ImageError> for DaemonError {
    fn from(e: ImageError) -> Self {
        match e.kind() {
            ImageErrorKind::BadImage => DaemonError::BadImage(e.to_string()),
            ImageErrorKind::Locked | ImageErrorKind::Exists => DaemonError::Conflict(e.to_string()),
            ImageErrorKind::InvalidParameters => DaemonError::BadRequest(e.to_string()),
            ImageErrorKind::NotFound | ImageErrorKind::Io => DaemonError::Internal(e.to_string()),
        }
    }
}

/// Result alias.
pub type Result<T, E = DaemonError> = std::result::Result<T, E>;
