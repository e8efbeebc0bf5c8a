//! New images: fresh fulls and overlays on a validated parent chain.

use std::fs::File as StdFile;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    StorageOpenOptions,
};

use super::open::open_layers;
use super::*;
use crate::chain::{backing_name_for, is_qcow2, resolve_chain, BackingPolicy, Format, Layer};
use crate::error::ImageError;
use crate::lock::{lock_file, LockMode};
use crate::pool::IoPool;
use crate::readahead::ReadAhead;

impl QcowBackend {
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
        let mut parent = match &create.backing {
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
        // The parent's layers are read only: their read-ahead comes along.
        let readahead = parent
            .as_mut()
            .map(|p| std::mem::take(&mut p.readahead))
            .unwrap_or_default();
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
            readahead,
            path,
            size,
            u64::from(cs),
            chain,
            false,
        ))
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
    /// Read-ahead state of its layers.
    readahead: ReadAhead,
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
    let (access, _, readahead) = pool
        .run(0, move || open_layers(layers, false, nofollow))
        .await
        .map_err(|e| ImageError::io(parent, io_err(e)))??;
    Ok(Parent {
        access: Arc::new(access),
        name,
        format: format.to_owned(),
        size,
        layers: chain,
        readahead,
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
pub(super) fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    StdFile::open(dir)?.sync_all()
}
