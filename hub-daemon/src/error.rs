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
    /// The filesystem (the repository's or the catalog's) is full or over
    /// quota. Built only here: by [`DaemonError::io`], the `From` impls and
    /// [`DaemonError::unless_no_space`], from ENOSPC/EDQUOT or SQLITE_FULL.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The backup appliance refused, was unreachable, or broke the
    /// contract; everything the backup held has been released.
    #[error("appliance: {0}")]
    Appliance(String),
    /// The backup appliance did not answer in time; everything the backup
    /// held has been released.
    #[error("appliance: {0}")]
    ApplianceTimeout(String),
    /// The catalog failed (SQLite or PostgreSQL).
    /// The repository's object store refused or could not be reached.
    #[error("object store: {0}")]
    ObjectStore(String),
    /// The catalog failed.
    #[error("catalog: {0}")]
    Catalog(crate::catalog::DbError),
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
    /// An I/O error with context; a full disk or quota becomes
    /// [`DaemonError::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if is_no_space(&source) {
            return DaemonError::NoSpace(format!("{context}: {source}"));
        }
        DaemonError::Io { context, source }
    }
}

impl DaemonError {
    /// `self`, unless `cause` (what made the operation fail) was a full
    /// disk: then [`DaemonError::NoSpace`] with `self`'s message, so a
    /// failure reported in other words keeps its 507.
    pub fn unless_no_space(self, cause: &(dyn std::error::Error + 'static)) -> Self {
        if matches!(self, DaemonError::NoSpace(_)) || !is_no_space(cause) {
            return self;
        }
        DaemonError::NoSpace(self.to_string())
    }
}

/// `ENOSPC` / `EDQUOT`, by kind or by raw errno.
fn is_no_space_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || e.raw_os_error().is_some_and(|n| {
        n == rustix::io::Errno::NOSPC.raw_os_error() || n == rustix::io::Errno::DQUOT.raw_os_error()
    })
}

/// Whether `e` or anything it wraps (sources, and the payload of custom
/// `io::Error`s, which `source()` skips) is a full disk or quota.
fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    // Bounded: error chains are short; a cycle must not hang a request.
    for _ in 0..32 {
        let Some(cur) = next else {
            return false;
        };
        if let Some(DaemonError::NoSpace(_)) = cur.downcast_ref::<DaemonError>() {
            return true;
        }
        if let Some(ioe) = cur.downcast_ref::<io::Error>() {
            if is_no_space_io(ioe) {
                return true;
            }
            if let Some(inner) = ioe.get_ref() {
                if is_no_space(inner) {
                    return true;
                }
            }
        }
        next = cur.source();
    }
    false
}

impl From<crate::catalog::DbError> for DaemonError {
    fn from(e: crate::catalog::DbError) -> Self {
        use crate::catalog::DbError;
        match &e {
            DbError::NoSpace(_) => DaemonError::NoSpace(format!("catalog: {e}")),
            DbError::Sqlite(inner) if is_no_space(inner) => {
                DaemonError::NoSpace(format!("catalog: {e}"))
            }
            _ => DaemonError::Catalog(e),
        }
    }
}

impl From<rusqlite::Error> for DaemonError {
    fn from(e: rusqlite::Error) -> Self {
        crate::catalog::DbError::from(e).into()
    }
}

impl From<ImageError> for DaemonError {
    fn from(e: ImageError) -> Self {
        if is_no_space(&e) {
            return DaemonError::NoSpace(e.to_string());
        }
        match e.kind() {
            ImageErrorKind::BadImage => DaemonError::BadImage(e.to_string()),
            ImageErrorKind::Locked | ImageErrorKind::Exists => DaemonError::Conflict(e.to_string()),
            ImageErrorKind::InvalidParameters => DaemonError::BadRequest(e.to_string()),
            ImageErrorKind::NotFound | ImageErrorKind::Io => DaemonError::Internal(e.to_string()),
        }
    }
}

impl From<disk_digest::SidecarError> for DaemonError {
    fn from(e: disk_digest::SidecarError) -> Self {
        match e {
            disk_digest::SidecarError::Io(e) => DaemonError::io("digest sidecar", e),
            disk_digest::SidecarError::Invalid(m) => DaemonError::BadImage(m),
        }
    }
}

/// Result alias.
pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error())
    }

    #[test]
    fn full_disk_is_no_space_wherever_it_comes_from() {
        assert!(matches!(
            DaemonError::io("writing", enospc()),
            DaemonError::NoSpace(_)
        ));
        let quota = io::Error::from_raw_os_error(rustix::io::Errno::DQUOT.raw_os_error());
        assert!(matches!(
            DaemonError::io("writing", quota),
            DaemonError::NoSpace(_)
        ));
        // Wrapped in a custom io::Error, as engines do.
        let wrapped = io::Error::other(enospc());
        assert!(matches!(
            DaemonError::io("writing", wrapped),
            DaemonError::NoSpace(_)
        ));
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(matches!(DaemonError::from(full), DaemonError::NoSpace(_)));
        let other = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            None,
        );
        assert!(matches!(DaemonError::from(other), DaemonError::Catalog(_)));
        assert!(matches!(
            DaemonError::io("reading", io::Error::from(io::ErrorKind::PermissionDenied)),
            DaemonError::Io { .. }
        ));
    }

    #[test]
    fn a_failure_caused_by_a_full_disk_stays_no_space() {
        let failed = || DaemonError::Internal("committing images failed".into());
        assert!(matches!(
            failed().unless_no_space(&enospc()),
            DaemonError::NoSpace(m) if m == "committing images failed"
        ));
        let cause = DaemonError::NoSpace("catalog: database or disk is full".into());
        assert!(matches!(
            failed().unless_no_space(&cause),
            DaemonError::NoSpace(_)
        ));
        let other = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(matches!(
            failed().unless_no_space(&other),
            DaemonError::Internal(_)
        ));
    }

    #[test]
    fn image_errors_on_a_full_disk_are_no_space() {
        // Both the plain and the engine-wrapped forms qcow-backend produces.
        let dir = std::env::temp_dir().join("does-not-matter.qcow2");
        let e = qcow_backend::ImageError::Io {
            path: dir.clone(),
            source: enospc(),
        };
        assert!(matches!(DaemonError::from(e), DaemonError::NoSpace(_)));
        let e = qcow_backend::ImageError::Engine {
            path: dir.clone(),
            source: io::Error::other(enospc()),
        };
        assert!(matches!(DaemonError::from(e), DaemonError::NoSpace(_)));
        let e = qcow_backend::ImageError::Io {
            path: dir,
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(matches!(DaemonError::from(e), DaemonError::Internal(_)));
    }
}
