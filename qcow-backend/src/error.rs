//! Errors from opening and creating images.
//!
//! Data-path errors (read, write, flush) are [`nbd_server::BackendError`]s;
//! this type covers the control path, where the caller needs to know *which*
//! file was refused and why.

use std::io;
use std::path::{Path, PathBuf};

use crate::header::HeaderError;

/// Coarse classification for callers (the daemon maps these to HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageErrorKind {
    /// The image (or a layer of its chain) is malformed, unsupported or refused by policy.
    BadImage,
    /// Someone else holds the image.
    Locked,
    /// The file does not exist.
    NotFound,
    /// The file to create exists already.
    Exists,
    /// The caller asked for something impossible (size, cluster size).
    InvalidParameters,
    /// Anything else: the filesystem failed.
    Io,
}

/// Why an image could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Filesystem error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another process (or export) holds a conflicting lock.
    #[error("{path}: image is in use by another writer or reader")]
    Locked {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Header validation failed.
    #[error("{path}: {source}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HeaderError,
    },
    /// The backing file resolves outside every allowed directory.
    #[error("{path}: backing file {name:?} is outside the allowed directories")]
    BackingNotAllowed {
        /// The image naming it.
        path: PathBuf,
        /// The name as stored.
        name: String,
    },
    /// The backing file does not exist.
    #[error("{path}: backing file {name:?} not found")]
    BackingMissing {
        /// The image naming it.
        path: PathBuf,
        /// The name as stored.
        name: String,
    },
    /// The chain is longer than allowed.
    #[error("{path}: backing chain deeper than {max} layers")]
    ChainTooDeep {
        /// The top image.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// A backing file names an image already in the chain.
    #[error("{path}: backing chain loops back to {again}")]
    BackingLoop {
        /// The image closing the loop.
        path: PathBuf,
        /// The image seen twice.
        again: PathBuf,
    },
    /// No backing format recorded, and we never probe.
    #[error("{path}: backing file {name:?} has no recorded format")]
    BackingFormatMissing {
        /// The image.
        path: PathBuf,
        /// The backing name.
        name: String,
    },
    /// A backing format other than qcow2 or raw.
    #[error("{path}: backing format {format:?} is not supported")]
    BackingFormat {
        /// The image.
        path: PathBuf,
        /// The recorded format.
        format: String,
    },
    /// imago refused or failed on the image.
    #[error("{path}: {source}")]
    Engine {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Bad create parameters.
    #[error("invalid image parameters: {0}")]
    InvalidParameters(String),
    /// The file is not what the caller requires (a symlink where links are
    /// refused, a file outside the allowed directories, not a qcow2 image
    /// where only qcow2 will do).
    #[error("{path}: {why}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl ImageError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn locked(path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::WouldBlock {
            ImageError::Locked {
                path: path.to_owned(),
                source,
            }
        } else {
            ImageError::io(path, source)
        }
    }

    pub(crate) fn refused(path: &Path, why: impl Into<String>) -> Self {
        ImageError::Refused {
            path: path.to_owned(),
            why: why.into(),
        }
    }

    pub(crate) fn header(path: &Path, source: HeaderError) -> Self {
        ImageError::Header {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn engine(path: &Path, source: io::Error) -> Self {
        ImageError::Engine {
            path: path.to_owned(),
            source,
        }
    }

    /// Coarse classification.
    pub fn kind(&self) -> ImageErrorKind {
        match self {
            ImageError::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ImageErrorKind::NotFound,
                io::ErrorKind::AlreadyExists => ImageErrorKind::Exists,
                _ => ImageErrorKind::Io,
            },
            ImageError::Locked { .. } => ImageErrorKind::Locked,
            ImageError::InvalidParameters(_) => ImageErrorKind::InvalidParameters,
            ImageError::Header { .. }
            | ImageError::BackingNotAllowed { .. }
            | ImageError::BackingMissing { .. }
            | ImageError::ChainTooDeep { .. }
            | ImageError::BackingLoop { .. }
            | ImageError::BackingFormatMissing { .. }
            | ImageError::BackingFormat { .. }
            | ImageError::Refused { .. }
            | ImageError::Engine { .. } => ImageErrorKind::BadImage,
        }
    }
}
