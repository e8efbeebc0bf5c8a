//! How to open an existing image and how to make a new one.

use std::path::{Path, PathBuf};

use super::*;
use crate::chain::BackingPolicy;
use crate::error::ImageError;
use crate::pool::IoPool;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open the top layer read-only.
    pub read_only: bool,
    /// Where backing files may live.
    pub policy: BackingPolicy,
    /// I/O threads (default: the process-wide pool).
    pub pool: Option<IoPool>,
}

impl OpenOptions {
    /// Read-write, backing files only next to the image.
    pub fn new() -> Self {
        OpenOptions {
            read_only: false,
            policy: BackingPolicy::default(),
            pool: None,
        }
    }

    /// Set read-only.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Set the backing policy.
    pub fn policy(mut self, policy: BackingPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub(super) fn pool(&self) -> Result<IoPool, ImageError> {
        match &self.pool {
            Some(p) => Ok(p.clone()),
            None => IoPool::global().map_err(|e| ImageError::io(Path::new("<io threads>"), e)),
        }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Parameters of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size; for overlays, `None` takes the parent's size.
    pub size: Option<u64>,
    /// Cluster size (power of two, 512 B … 2 MiB).
    pub cluster_size: u32,
    /// Backing file for an incremental overlay.
    pub backing: Option<PathBuf>,
    /// The backing file's format as the caller knows it. `Some(Qcow2)`:
    /// it is opened only as qcow2 and refused if it is not one (a damaged
    /// parent must never be read as raw bytes); `Some(Raw)`: only as raw;
    /// `None`: detected from its content (`hub-daemon export --backing`).
    pub backing_format: Option<crate::ImageFormat>,
}

impl CreateOptions {
    /// A fresh image of `size` bytes with 64 KiB clusters.
    pub fn fresh(size: u64) -> Self {
        CreateOptions {
            size: Some(size),
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: None,
            backing_format: None,
        }
    }

    /// An overlay on `parent`, same size as the parent.
    pub fn overlay(parent: impl Into<PathBuf>) -> Self {
        CreateOptions {
            size: None,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: Some(parent.into()),
            backing_format: None,
        }
    }
}
