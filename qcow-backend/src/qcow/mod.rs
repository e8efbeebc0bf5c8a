//! qcow2 images (and their backing chains) as a [`BlockBackend`](nbd_server::BlockBackend), on imago.
//!
//! Every imago call runs on the [`IoPool`]. The image sits behind an async
//! `RwLock`: normal I/O takes the shared side, discard (which imago allows
//! only with `&mut`) the exclusive side. Two imago hazards are handled here:
//! `write_zeroes` only ever receives whole clusters (a partial-cluster zero
//! racing a write elsewhere in the cluster can erase that write), and at
//! most [`MAX_INFLIGHT`] operations run per image (each may pin an L2 cache
//! entry, and imago fails rather than waits when all 128 are pinned).
//!
//! The files: `options` (open/create parameters), `open` (opening an
//! existing chain), `create` (new images and overlays), `backend` (the
//! `BlockBackend` operations), `layer_walk` (a disk range resolved through
//! the chain layer by layer), `mapping` (a read's runs and a read-ahead's
//! hints, from that walk), `zeroes` (zeroing without sub-cluster
//! `write_zeroes`), `status` (block status through the chain), `run_cache`
//! (a read-only image's runs per window, so its READs run on the
//! connection's thread through the crate's `direct_read`).

mod backend;
mod create;
mod layer_walk;
mod mapping;
mod open;
mod options;
mod run_cache;
mod status;
mod status_cache;
#[cfg(test)]
mod tests;
mod zeroes;

pub use options::{CreateOptions, OpenOptions};

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use imago::file::File;
use imago::qcow2::Qcow2;
use imago::FormatAccess;
use nbd_server::{BackendError, BackendErrorKind};
use tokio::sync::{RwLock, Semaphore};

use crate::chain::Layer;
use crate::pool::IoPool;
use crate::readahead::ReadAhead;
use crate::writeback::WriteBehind;
use run_cache::RunCache;
use status_cache::StatusCache;

/// Most imago operations in flight per image.
pub const MAX_INFLIGHT: usize = 64;
/// Default cluster size for new images.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;

type Access = FormatAccess<File>;
type Layered = Qcow2<File, Arc<Access>>;

#[derive(Debug)]
struct Image {
    access: RwLock<Access>,
    closed: AtomicBool,
}

/// A qcow2 image served over NBD.
#[derive(Debug)]
pub struct QcowBackend {
    image: Arc<Image>,
    pool: IoPool,
    /// Home I/O thread of this image.
    home: usize,
    inflight: Arc<Semaphore>,
    /// Read-ahead hints for the layers read only (restores).
    readahead: Arc<ReadAhead>,
    write_behind: Option<Arc<WriteBehind>>,
    /// `REQ_ONE` block status of a read-only image, from earlier walks.
    status_cache: Option<StatusCache>,
    /// Where a read-only image's READs read from, per window.
    run_cache: Option<Arc<RunCache>>,
    path: PathBuf,
    size: u64,
    cluster_size: u64,
    /// The layers opened, top first.
    chain: Vec<Layer>,
    read_only: bool,
}

pub(super) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl QcowBackend {
    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cluster size of the top layer.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// READs served on the caller's thread from remembered runs (read-only
    /// images only; see `run_cache.rs`).
    pub fn direct_reads(&self) -> u64 {
        self.run_cache.as_ref().map_or(0, |c| c.served())
    }

    /// Layers in the chain, the top included.
    pub fn chain_depth(&self) -> usize {
        self.chain.len()
    }

    /// The layers this backend opened, top first, with canonical paths (a
    /// top made by [`QcowBackend::create`] carries no parsed header).
    pub fn chain(&self) -> &[Layer] {
        &self.chain
    }

    /// Account a write of `n` bytes at `offset`; start write-behind on an
    /// I/O thread when due.
    fn written(&self, offset: u64, n: u64) {
        if let Some(wb) = &self.write_behind {
            if wb.add(offset, n) {
                let wb = Arc::clone(wb);
                let _ = self
                    .pool
                    .spawn(self.home + 1, move || async move { wb.kick() });
            }
        }
    }

    /// Run `f` against the image on an I/O thread; `bytes` is the data it
    /// moves (0 for metadata-only operations).
    async fn with_image<T, F, Fut>(
        &self,
        op: &'static str,
        bytes: usize,
        f: F,
    ) -> Result<T, BackendError>
    where
        F: FnOnce(Arc<Image>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = io::Result<T>> + 'static,
        T: Send + 'static,
    {
        let _permit = self
            .inflight
            .acquire()
            .await
            .map_err(|_| BackendError::new(BackendErrorKind::Shutdown, op))?;
        if self.image.closed.load(Ordering::Acquire) {
            return Err(BackendError::new(BackendErrorKind::Shutdown, op));
        }
        let image = Arc::clone(&self.image);
        self.pool
            .run_sized(self.home, bytes, move || f(image))
            .await
            .map_err(|e| BackendError::new(BackendErrorKind::Io, op).with_source(e))?
            .map_err(|e| BackendError::from_io(op, e))
    }
}

impl Drop for QcowBackend {
    fn drop(&mut self) {
        // imago cannot flush on drop in async mode, so a backend dropped
        // without close() gets a detached flush on an I/O thread.
        if self.read_only || self.image.closed.load(Ordering::Acquire) {
            return;
        }
        let image = Arc::clone(&self.image);
        let path = self.path.clone();
        let spawned = self.pool.spawn(self.home, move || async move {
            let a = image.access.write().await;
            image.closed.store(true, Ordering::Release);
            let r = match a.flush().await {
                Ok(()) => a.sync().await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::error!(path = %path.display(), error = %e, "flush on drop failed");
            }
        });
        if spawned.is_err() {
            tracing::error!(path = %self.path.display(), "no I/O thread to flush on drop");
        }
    }
}
