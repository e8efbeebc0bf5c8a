//! Opening an existing image and its validated backing chain, layer by layer.

use std::fs::File as StdFile;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use imago::file::File;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};
use tokio::sync::{RwLock, Semaphore};

use super::*;
use crate::chain::{resolve_chain, Format, Layer};
use crate::error::ImageError;
use crate::lock::{lock_file, LockMode};
use crate::pool::IoPool;
use crate::readahead::ReadAhead;
use crate::writeback::WriteBehind;

/// Open one layer's file: exclusive lock for the writable top, shared for
/// everything else. Also returns a duplicate descriptor (same open file,
/// so the locks are shared): write-behind hints for a writable file,
/// read-ahead hints for the others.
/// With `nofollow` (a strict [`BackingPolicy`]) the open itself refuses a
/// symlink (`O_NOFOLLOW`), so a link swapped in after the policy check
/// cannot redirect it.
pub(super) fn open_file(
    path: &Path,
    writable: bool,
    nofollow: bool,
) -> Result<(File, StdFile), ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = StdFile::options();
    o.read(true).write(writable);
    if nofollow {
        o.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    let f = o.open(path).map_err(|e| {
        if nofollow && e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            ImageError::refused(path, "is a symlink; images must be plain files")
        } else {
            ImageError::io(path, e)
        }
    })?;
    let mode = if writable {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    lock_file(&f, mode).map_err(|e| ImageError::locked(path, e))?;
    let dup = f.try_clone().map_err(|e| ImageError::io(path, e))?;
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    let file = File::from_open_file(f, opts).map_err(|e| ImageError::io(path, e))?;
    Ok((file, dup))
}

/// Open the validated layers bottom-up, each explicitly. Returns the top
/// layer, if writable a duplicate descriptor of its file, and the
/// read-ahead state of the layers opened read-only.
pub(super) async fn open_layers(
    layers: Vec<Layer>,
    top_writable: bool,
    nofollow: bool,
) -> Result<(Access, Option<StdFile>, ReadAhead), ImageError> {
    let mut below: Option<Arc<Access>> = None;
    let n = layers.len();
    let mut readahead = ReadAhead::default();
    for (i, layer) in layers.into_iter().rev().enumerate() {
        let is_top = i + 1 == n;
        let writable = is_top && top_writable;
        let (storage, dup) = open_file(&layer.path, writable, nofollow)?;
        let dup = if writable {
            Some(dup)
        } else {
            readahead.add(&layer.path, dup);
            None
        };
        let access = match layer.format {
            Format::Raw => Raw::builder(storage)
                .write(writable)
                .open(DenyImplicitOpenGate::default())
                .await
                .map(FormatAccess::new),
            Format::Qcow2 => Layered::builder(storage)
                .backing(below.take())
                .write(writable)
                .open(DenyImplicitOpenGate::default())
                .await
                .map(FormatAccess::new),
        }
        .map_err(|e| ImageError::engine(&layer.path, e))?;
        if is_top {
            return Ok((access, dup, readahead));
        }
        below = Some(Arc::new(access));
    }
    Err(ImageError::InvalidParameters("empty chain".into()))
}

impl QcowBackend {
    /// Open a qcow2 image and its backing chain under `opts`.
    pub async fn open(path: &Path, opts: &OpenOptions) -> Result<Self, ImageError> {
        let pool = opts.pool()?;
        let (path2, policy) = (path.to_owned(), opts.policy.clone());
        let layers = pool
            .run(0, move || async move { resolve_chain(&path2, &policy) })
            .await
            .map_err(|e| ImageError::io(path, io_err(e)))??;
        let top = layers
            .first()
            .and_then(|l| l.header.clone())
            .ok_or_else(|| ImageError::InvalidParameters("empty chain".into()))?;
        let depth = layers.len();
        let chain = layers.clone();
        let writable = !opts.read_only;
        let nofollow = opts.policy.strict;
        let (access, dup, readahead) = pool
            .run(0, move || open_layers(layers, writable, nofollow))
            .await
            .map_err(|e| ImageError::io(path, io_err(e)))??;
        tracing::debug!(path = %path.display(), depth, writable, "opened qcow2 image");
        Ok(Self::assemble(
            pool,
            access,
            dup,
            readahead,
            path,
            top.size,
            top.cluster_size(),
            chain,
            opts.read_only,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn assemble(
        pool: IoPool,
        access: Access,
        dup: Option<StdFile>,
        readahead: ReadAhead,
        path: &Path,
        size: u64,
        cluster_size: u64,
        chain: Vec<Layer>,
        read_only: bool,
    ) -> Self {
        QcowBackend {
            image: Arc::new(Image {
                access: RwLock::new(access),
                closed: AtomicBool::new(false),
            }),
            home: pool.affinity(),
            pool,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            readahead: Arc::new(readahead),
            write_behind: dup.map(WriteBehind::new),
            // Only a mapping nobody changes can be remembered.
            status_cache: read_only.then(StatusCache::default),
            run_cache: read_only.then(Arc::default),
            path: path.to_owned(),
            size,
            cluster_size,
            chain,
            read_only,
        }
    }
}
