//! qcow2 images (and their backing chains) as a [`BlockBackend`], on imago.
//!
//! Every imago call runs on the [`IoPool`]. The image sits behind an async
//! `RwLock`: normal I/O takes the shared side, discard (which imago allows
//! only with `&mut`) the exclusive side. Two imago hazards are handled here:
//! `write_zeroes` only ever receives whole clusters (a partial-cluster zero
//! racing a write elsewhere in the cluster can erase that write), and at
//! most [`MAX_INFLIGHT`] operations run per image (each may pin an L2 cache
//! entry, and imago fails rather than waits when all 128 are pinned).

use std::fs::File as StdFile;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
    ShallowMapping, StorageOpenOptions,
};
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags,
};
use tokio::sync::{RwLock, Semaphore};

use crate::buf::AlignedBuf;
use crate::chain::{backing_name_for, is_qcow2, resolve_chain, BackingPolicy, Format, Layer};
use crate::error::ImageError;
use crate::lock::{lock_file, LockMode};
use crate::pool::IoPool;
use crate::writeback::WriteBehind;

/// Most imago operations in flight per image.
pub const MAX_INFLIGHT: usize = 64;
/// Default cluster size for new images.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Most extents one block-status call walks.
const MAX_STATUS_EXTENTS: usize = 4096;

static ZERO: [u8; 1 << 20] = [0; 1 << 20];

type Access = FormatAccess<File>;
type Layered = Qcow2<File, Arc<Access>>;

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

    fn pool(&self) -> Result<IoPool, ImageError> {
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
    write_behind: Option<Arc<WriteBehind>>,
    path: PathBuf,
    size: u64,
    cluster_size: u64,
    /// The layers opened, top first.
    chain: Vec<Layer>,
    read_only: bool,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Open one layer's file: exclusive lock for the writable top, shared for
/// everything else. Also returns a duplicate descriptor of a writable file
/// (for write-behind hints; same open file, so the locks are shared).
/// With `nofollow` (a strict [`BackingPolicy`]) the open itself refuses a
/// symlink (`O_NOFOLLOW`), so a link swapped in after the policy check
/// cannot redirect it.
fn open_file(
    path: &Path,
    writable: bool,
    nofollow: bool,
) -> Result<(File, Option<StdFile>), ImageError> {
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
    let dup = if writable {
        Some(f.try_clone().map_err(|e| ImageError::io(path, e))?)
    } else {
        None
    };
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    let file = File::from_open_file(f, opts).map_err(|e| ImageError::io(path, e))?;
    Ok((file, dup))
}

/// Open the validated layers bottom-up, each explicitly. Returns the top
/// layer and, if writable, a duplicate descriptor of its file.
async fn open_layers(
    layers: Vec<Layer>,
    top_writable: bool,
    nofollow: bool,
) -> Result<(Access, Option<StdFile>), ImageError> {
    let mut below: Option<Arc<Access>> = None;
    let n = layers.len();
    for (i, layer) in layers.into_iter().rev().enumerate() {
        let is_top = i + 1 == n;
        let writable = is_top && top_writable;
        let (storage, dup) = open_file(&layer.path, writable, nofollow)?;
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
            return Ok((access, dup));
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
        let (access, dup) = pool
            .run(0, move || open_layers(layers, writable, nofollow))
            .await
            .map_err(|e| ImageError::io(path, io_err(e)))??;
        tracing::debug!(path = %path.display(), depth, writable, "opened qcow2 image");
        Ok(Self::assemble(
            pool,
            access,
            dup,
            path,
            top.size,
            top.cluster_size(),
            chain,
            opts.read_only,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        pool: IoPool,
        access: Access,
        dup: Option<StdFile>,
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
            write_behind: dup.map(WriteBehind::new),
            path: path.to_owned(),
            size,
            cluster_size,
            chain,
            read_only,
        }
    }

    /// Create a new qcow2 image at `path` (which must not exist) and open it
    /// read-write. An overlay's parent chain is validated and opened under
    /// `opts.policy` first. The image is formatted and served on one file
    /// descriptor — never closed and reopened, so no window exists in which
    /// another opener (or a forked child still holding our descriptor)
    /// could interfere. The file is durable (synced, directory synced) on
    /// return.
    pub async fn create(
        path: &Path,
        create: &CreateOptions,
        opts: &OpenOptions,
    ) -> Result<Self, ImageError> {
        let cs = create.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(ImageError::InvalidParameters(format!("cluster size {cs}")));
        }
        let pool = opts.pool()?;
        let parent = match &create.backing {
            Some(parent) => {
                Some(open_parent(&pool, path, parent, create.backing_format, &opts.policy).await?)
            }
            None => None,
        };
        let size = create
            .size
            .or(parent.as_ref().map(|p| p.size))
            .ok_or_else(|| {
                ImageError::InvalidParameters("size required for a fresh image".into())
            })?;
        if size == 0 || size > crate::header::MAX_VIRTUAL_SIZE {
            return Err(ImageError::InvalidParameters(format!("size {size}")));
        }
        let below = parent
            .as_ref()
            .map(|p| p.layers.clone())
            .unwrap_or_default();
        let file = StdFile::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        let made = Made(path.to_owned());
        lock_file(&file, LockMode::Exclusive).map_err(|e| ImageError::locked(path, e))?;
        let dup = file.try_clone().map_err(|e| ImageError::io(path, e))?;
        let storage =
            File::from_open_file(file, StorageOpenOptions::new().filename(path).write(true))
                .map_err(|e| ImageError::io(path, e))?;
        let access = pool
            .run(0, move || async move {
                let mut b = Qcow2::<File, Arc<Access>>::create_builder(storage)
                    .size(size)
                    .cluster_size(cs as usize);
                let backing = match parent {
                    Some(p) => {
                        b = b.backing(p.name, p.format);
                        Some(p.access)
                    }
                    None => None,
                };
                let q = b
                    .create_open(DenyImplicitOpenGate::default(), move |image| {
                        Ok(Layered::builder(image).backing(backing).write(true))
                    })
                    .await?;
                let a = FormatAccess::new(q);
                a.flush().await?;
                a.sync().await?;
                io::Result::Ok(a)
            })
            .await
            .map_err(|e| ImageError::io(path, io_err(e)))?
            .map_err(|e| ImageError::engine(path, e))?;
        sync_dir_of(path).map_err(|e| ImageError::io(path, e))?;
        let canonical = path.canonicalize().map_err(|e| ImageError::io(path, e))?;
        made.keep();
        let mut chain = vec![Layer {
            path: canonical,
            format: Format::Qcow2,
            header: None,
        }];
        chain.extend(below);
        let depth = chain.len();
        tracing::debug!(path = %path.display(), size, depth, "created qcow2 image");
        Ok(Self::assemble(
            pool,
            access,
            Some(dup),
            path,
            size,
            u64::from(cs),
            chain,
            false,
        ))
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cluster size of the top layer.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
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

    /// Account written bytes; start write-behind on an I/O thread when due.
    fn written(&self, n: u64) {
        if let Some(wb) = &self.write_behind {
            if wb.add(n) {
                let wb = Arc::clone(wb);
                let _ = self
                    .pool
                    .spawn(self.home + 1, move || async move { wb.kick() });
            }
        }
    }

    /// Run `f` against the image on an I/O thread.
    async fn with_image<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, BackendError>
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
            .run(self.home, move || f(image))
            .await
            .map_err(|e| BackendError::new(BackendErrorKind::Io, op).with_source(e))?
            .map_err(|e| BackendError::from_io(op, e))
    }
}

/// A validated, opened backing chain for a new overlay.
struct Parent {
    access: Arc<Access>,
    /// Name to record in the overlay.
    name: String,
    format: String,
    size: u64,
    /// Its validated layers, top first.
    layers: Vec<Layer>,
}

/// Validate and open `parent` (and its chain) read-only.
async fn open_parent(
    pool: &IoPool,
    image: &Path,
    parent: &Path,
    format: Option<crate::ImageFormat>,
    policy: &BackingPolicy,
) -> Result<Parent, ImageError> {
    let name = backing_name_for(image, parent)?;
    let qcow2 = match format {
        Some(crate::ImageFormat::Qcow2) => {
            if !is_qcow2(parent)? {
                return Err(ImageError::refused(
                    parent,
                    "recorded as qcow2 but has no qcow2 header; never read as raw",
                ));
            }
            true
        }
        Some(crate::ImageFormat::Raw) => false,
        None => is_qcow2(parent)?,
    };
    let layers = if qcow2 {
        let (p, policy) = (parent.to_owned(), policy.clone());
        pool.run(0, move || async move { resolve_chain(&p, &policy) })
            .await
            .map_err(|e| ImageError::io(parent, io_err(e)))??
    } else {
        let path = parent
            .canonicalize()
            .map_err(|e| ImageError::io(parent, e))?;
        let allowed = if policy.allowed_dirs.is_empty() {
            image
                .parent()
                .and_then(|d| d.canonicalize().ok())
                .into_iter()
                .collect()
        } else {
            policy.allowed_dirs.clone()
        };
        policy.check_layer(parent, &path, &allowed)?;
        vec![Layer {
            path,
            format: Format::Raw,
            header: None,
        }]
    };
    let (format, size) = match &layers[0].header {
        Some(h) => ("qcow2", h.size),
        None => (
            "raw",
            std::fs::metadata(parent)
                .map_err(|e| ImageError::io(parent, e))?
                .len(),
        ),
    };
    let chain = layers.clone();
    let nofollow = policy.strict;
    let (access, _) = pool
        .run(0, move || open_layers(layers, false, nofollow))
        .await
        .map_err(|e| ImageError::io(parent, io_err(e)))??;
    Ok(Parent {
        access: Arc::new(access),
        name,
        format: format.to_owned(),
        size,
        layers: chain,
    })
}

/// Removes a file it was given unless told to keep it (cleanup of a
/// half-created image on any error path).
struct Made(PathBuf);

impl Made {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Make a new directory entry durable.
fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    StdFile::open(dir)?.sync_all()
}

fn aligned_down(x: u64, a: u64) -> u64 {
    x - x % a
}

/// Whether `[off, off+len)` already reads as zeroes (mappings, not data).
async fn reads_zero(a: &Access, mut off: u64, len: u64) -> io::Result<bool> {
    let end = off + len;
    while off < end {
        match a.get_mapping(off, end - off).await? {
            (Mapping::Zero { .. }, n) if n > 0 => off += n,
            (Mapping::Eof { .. }, _) => return Ok(true),
            _ => return Ok(false),
        }
    }
    Ok(true)
}

async fn write_zero_buffers(a: &Access, mut off: u64, len: u64) -> io::Result<()> {
    let end = off + len;
    while off < end {
        let n = (end - off).min(ZERO.len() as u64) as usize;
        a.write(&ZERO[..n], off).await?;
        off += n as u64;
    }
    Ok(())
}

/// Zero a range: whole clusters through imago's metadata-only zeroing,
/// partial head and tail as plain zero writes (never a sub-cluster
/// `write_zeroes`, see the module docs). Ranges that already read as zero
/// are left alone, so zeroing a fresh image allocates nothing.
async fn zero_range(a: &Access, off: u64, len: u64, cluster: u64, fast: bool) -> io::Result<()> {
    let end = off + len;
    let mid_start = off.div_ceil(cluster) * cluster;
    let mid_end = aligned_down(end, cluster);
    let (head, tail) = if mid_start >= mid_end {
        ((off, len), (end, 0))
    } else {
        ((off, mid_start - off), (mid_end, end - mid_end))
    };
    let head_needs = head.1 > 0 && !reads_zero(a, head.0, head.1).await?;
    let tail_needs = tail.1 > 0 && !reads_zero(a, tail.0, tail.1).await?;
    if fast && (head_needs || tail_needs) {
        return Err(io::Error::from_raw_os_error(95)); // EOPNOTSUPP: would need data writes
    }
    if head_needs {
        write_zero_buffers(a, head.0, head.1).await?;
    }
    if mid_start < mid_end && !reads_zero(a, mid_start, mid_end - mid_start).await? {
        a.write_zeroes(mid_start, mid_end - mid_start).await?;
    }
    if tail_needs {
        write_zero_buffers(a, tail.0, tail.1).await?;
    }
    Ok(())
}

/// Status of the run starting at `off`, walking the chain layer by layer so
/// the depth is known. `None` at the end of the image.
async fn status_at(top: &Access, off: u64, max: u64) -> io::Result<Option<Extent>> {
    let mut layer = top;
    let mut lo = off;
    let mut len = max;
    let mut depth = 1u32;
    loop {
        let (m, n) = layer.get_shallow_mapping(lo, len).await?;
        len = len.min(n);
        let e = match m {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Extent {
                length: len,
                hole: false,
                zero: false,
                depth,
            },
            ShallowMapping::Zero { explicit: true, .. } => Extent {
                length: len,
                hole: true,
                zero: true,
                depth,
            },
            ShallowMapping::Zero { .. } => Extent::hole(len),
            ShallowMapping::Indirect {
                layer: next,
                offset,
                ..
            } => {
                layer = next;
                lo = offset;
                depth += 1;
                continue;
            }
            ShallowMapping::Eof { .. } if depth == 1 => return Ok(None),
            // Past the end of a shorter backing file: reads as zero.
            _ => Extent::hole(len),
        };
        return Ok((e.length > 0).then_some(e));
    }
}

#[async_trait]
impl BlockBackend for QcowBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            can_fast_zero: true,
            can_allocation_depth: true,
            // One image instance (and metadata cache) serves every connection.
            can_multi_conn: true,
            ..Caps::default()
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        self.with_image("read", move |img| async move {
            let a = img.access.read().await;
            let end = offset + u64::from(len);
            // Split into zero and data runs first, then read only the data.
            let mut runs: Vec<(u64, u64, bool)> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let (m, n) = a.get_mapping(pos, end - pos).await?;
                let (n, zero) = match m {
                    Mapping::Eof { .. } => (end - pos, true),
                    Mapping::Zero { .. } => (n, true),
                    _ => (n, false),
                };
                let n = n.clamp(1, end - pos);
                match runs.last_mut() {
                    Some(last) if last.2 == zero => last.1 += n,
                    _ => runs.push((pos, n, zero)),
                }
                pos += n;
            }
            let mut chunks = Vec::with_capacity(runs.len());
            for (start, n, zero) in runs {
                // n ≤ len ≤ 32 MiB.
                if zero {
                    chunks.push(ReadChunk::Zero(n as u32));
                } else {
                    let mut buf = AlignedBuf::zeroed(n as usize);
                    a.read(buf.as_mut_slice(), start).await?;
                    chunks.push(ReadChunk::Data(buf.freeze()));
                }
            }
            Ok(chunks)
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        let n = data.len() as u64;
        self.with_image("write", move |img| async move {
            let a = img.access.read().await;
            a.write(&data[..], offset).await
        })
        .await
        .map_err(|e| e.at(offset))?;
        self.written(n);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        let cluster = self.cluster_size;
        self.with_image("write_zeroes", move |img| async move {
            let a = img.access.read().await;
            zero_range(&a, offset, len, cluster, flags.fast).await
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.with_image("trim", move |img| async move {
            // discard needs &mut: exclusive against all other I/O on the image.
            let mut a = img.access.write().await;
            // Zero, not "any": in an overlay the range must not fall back to
            // the parent's old data.
            a.discard_to_zero(offset, len).await
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.with_image("flush", |img| async move {
            let a = img.access.read().await;
            // flush() writes back imago's metadata caches; sync() is the fsync.
            a.flush().await?;
            a.sync().await
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let size = self.size;
        self.with_image("block_status", move |img| async move {
            let a = img.access.read().await;
            let end = offset.saturating_add(len).min(size);
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end && out.len() < MAX_STATUS_EXTENTS {
                let Some(e) = status_at(&a, pos, end - pos).await? else {
                    break;
                };
                pos += e.length;
                match out.last_mut() {
                    Some(l) if l.hole == e.hole && l.zero == e.zero && l.depth == e.depth => {
                        l.length += e.length
                    }
                    _ => out.push(e),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn close(&self) -> Result<(), BackendError> {
        if self.image.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let read_only = self.read_only;
        self.with_image("close", move |img| async move {
            // Exclusive: waits for every in-flight operation.
            let a = img.access.write().await;
            img.closed.store(true, Ordering::Release);
            if !read_only {
                a.flush().await?;
                a.sync().await?;
            }
            Ok(())
        })
        .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_server::backend::conformance;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_fresh_image() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::run_all(|size| {
            let p = dir
                .path()
                .join(format!("f{}.qcow2", n.fetch_add(1, Ordering::Relaxed)));
            async move {
                QcowBackend::create(&p, &CreateOptions::fresh(size), &OpenOptions::new())
                    .await
                    .unwrap()
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_overlay_on_our_base() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::run_all(|size| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let base = dir.path().join(format!("b{i}.qcow2"));
            let top = dir.path().join(format!("t{i}.qcow2"));
            async move {
                let b =
                    QcowBackend::create(&base, &CreateOptions::fresh(size), &OpenOptions::new())
                        .await
                        .unwrap();
                // Non-zero base data everywhere the suite looks, so an overlay that
                // leaked parent data through a zeroed range would be caught.
                b.close().await.unwrap();
                drop(b);
                QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
                    .await
                    .unwrap()
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlay_zeroes_hide_parent_data() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let b = QcowBackend::create(&base, &CreateOptions::fresh(4 << 20), &OpenOptions::new())
            .await
            .unwrap();
        b.write(0, Bytes::from(vec![0x55u8; 4 << 20]))
            .await
            .unwrap();
        b.close().await.unwrap();
        drop(b);
        let t = QcowBackend::create(&top, &CreateOptions::overlay(&base), &OpenOptions::new())
            .await
            .unwrap();
        assert_eq!(t.size(), 4 << 20);
        assert_eq!(t.chain_depth(), 2);
        // Partial clusters, whole clusters, and trim.
        t.write_zeroes(1000, 70_000, ZeroFlags::default())
            .await
            .unwrap();
        t.write_zeroes(
            1 << 20,
            1 << 20,
            ZeroFlags {
                may_trim: true,
                fast: true,
            },
        )
        .await
        .unwrap();
        t.trim(3 << 20, 100_000).await.unwrap();
        for (off, len) in [(1000u64, 70_000u32), (1 << 20, 1 << 20), (3 << 20, 100_000)] {
            let v = conformance::read_flat(&t, off, len).await;
            assert!(
                v.iter().all(|x| *x == 0),
                "range {off}+{len} shows parent data"
            );
        }
        let v = conformance::read_flat(&t, 0, 1000).await;
        assert!(v.iter().all(|x| *x == 0x55));
        // Depth: top-layer zeroes are depth 1, untouched ranges come from the base (2).
        let st = t.block_status(2 << 20, 4096).await.unwrap();
        assert_eq!(st[0].depth, 2);
        assert!(!st[0].hole);
        let st = t.block_status(1 << 20, 4096).await.unwrap();
        assert_eq!((st[0].depth, st[0].zero), (1, true));
        t.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_zero_on_partial_cluster_with_data_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.qcow2");
        let t = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
            .await
            .unwrap();
        t.write(0, Bytes::from(vec![9u8; 131072])).await.unwrap();
        let e = t
            .write_zeroes(
                100,
                70_000,
                ZeroFlags {
                    may_trim: true,
                    fast: true,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::Unsupported);
        let v = conformance::read_flat(&t, 0, 131072).await;
        assert!(v.iter().all(|x| *x == 9));
        // Zeroing a fresh (unallocated) range is fast even when unaligned.
        t.write_zeroes(
            200_000,
            5000,
            ZeroFlags {
                may_trim: true,
                fast: true,
            },
        )
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strict_opens_and_creates_never_follow_a_final_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.qcow2");
        QcowBackend::create(&real, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // The open itself (not only the policy check) refuses the link.
        for writable in [false, true] {
            let e = open_file(&link, writable, true).err().unwrap();
            assert_eq!(e.kind(), crate::ImageErrorKind::BadImage, "{e}");
            assert!(open_file(&link, writable, false).is_ok());
        }
        let strict = OpenOptions::new()
            .read_only(true)
            .policy(BackingPolicy::strict_within([dir
                .path()
                .canonicalize()
                .unwrap()]));
        assert!(QcowBackend::open(&link, &strict).await.is_err());
        // Creating over a (dangling) symlink never writes through it.
        let target = dir.path().join("elsewhere.qcow2");
        let dangling = dir.path().join("new.qcow2");
        std::os::unix::fs::symlink(&target, &dangling).unwrap();
        let e = QcowBackend::create(&dangling, &CreateOptions::fresh(1 << 20), &strict)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::ImageErrorKind::Exists, "{e}");
        assert!(!target.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_writer_is_refused_by_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.qcow2");
        let _a = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
            .await
            .unwrap();
        let e = QcowBackend::open(&p, &OpenOptions::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ImageError::Locked { .. }), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_refuses_existing_file_and_bad_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        std::fs::write(&p, b"taken").unwrap();
        let e = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::ImageErrorKind::Exists);
        let mut c = CreateOptions::fresh(1 << 20);
        c.cluster_size = 3000;
        let e = QcowBackend::create(&dir.path().join("y.qcow2"), &c, &OpenOptions::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::ImageErrorKind::InvalidParameters);
    }
}
