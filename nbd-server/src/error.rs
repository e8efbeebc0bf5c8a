//! Errors of the serving layer.

use std::io;

use crate::backend::BackendError;
use crate::proto::HandshakeError;

/// Errors from [`Server`](crate::Server) operations.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export with this name is already registered.
    #[error("export {0:?} already exists")]
    DuplicateExport(String),
    /// No export has this name.
    #[error("no export named {0:?}")]
    UnknownExport(String),
    /// The name is not a valid NBD string.
    #[error("invalid export name: {0}")]
    InvalidExportName(String),
    /// The server is shutting down and takes no new work.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Socket setup failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The backend failed to close (flush) when the export was removed.
    #[error("closing export {name:?}: {source}")]
    Close {
        /// The export.
        name: String,
        /// Why.
        #[source]
        source: BackendError,
    },
}

/// Why one connection ended before transmission; logged, never fatal.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("handshake timed out")]
    Timeout,
    #[error(transparent)]
    Io(#[from] io::Error),
}
