//! Resolving and checking a backing chain before anything is opened.
//!
//! imago would open whatever a header names (a backing file that points at
//! itself overflows its stack; one that names `/etc/passwd` leaks it). So
//! the chain is walked here first, layer by layer: each header validated,
//! each backing name resolved the way qemu does (relative to the image's
//! directory), canonicalized, required to lie in an allowed directory,
//! checked for loops and depth. Only then are the layers opened, each
//! explicitly, with imago's implicit opening denied.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::ImageError;
use crate::header::{
    check_l1, check_metadata_layout, check_reftable, parse_header, HeaderInfo, HEADER_PROBE_LEN,
    QCOW2_MAGIC,
};

/// Default limit on backing-chain length. Long enough for a year of daily
/// incrementals, short enough that a hostile chain cannot exhaust anything.
pub const DEFAULT_MAX_DEPTH: usize = 512;

/// Image format of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// Raw bytes.
    Raw,
}

/// One validated layer, top first.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Canonical path.
    pub path: PathBuf,
    /// Format.
    pub format: Format,
    /// Header, for qcow2 layers.
    pub header: Option<HeaderInfo>,
}

/// Where backing files may live.
#[derive(Debug, Clone, Default)]
pub struct BackingPolicy {
    /// Canonical directories; a backing file must be inside one of them.
    /// Empty means "the top image's own directory only".
    pub allowed_dirs: Vec<PathBuf>,
    /// Most layers in a chain, the top included.
    pub max_depth: usize,
    /// Refuse any layer reached through a symlink, and require the top
    /// image itself to lie in an allowed directory (a backup repository,
    /// where nothing is a link and nothing comes from outside).
    pub strict: bool,
}

impl BackingPolicy {
    /// Allow backing files only under `dirs`.
    pub fn within(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        BackingPolicy {
            allowed_dirs: dirs.into_iter().collect(),
            max_depth: DEFAULT_MAX_DEPTH,
            strict: false,
        }
    }

    /// Like [`BackingPolicy::within`], and strict: no symlinks anywhere in
    /// the chain, the top inside `dirs` too.
    pub fn strict_within(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        BackingPolicy {
            strict: true,
            ..Self::within(dirs)
        }
    }

    /// Check one layer's path (as named, before resolution) and its
    /// resolved form against the policy.
    pub(crate) fn check_layer(
        &self,
        named: &Path,
        resolved: &Path,
        allowed: &[PathBuf],
    ) -> Result<(), ImageError> {
        if !self.strict {
            return Ok(());
        }
        let meta = std::fs::symlink_metadata(named).map_err(|e| ImageError::io(named, e))?;
        if meta.file_type().is_symlink() {
            return Err(ImageError::refused(
                named,
                "is a symlink; images must be plain files",
            ));
        }
        if !meta.is_file() {
            return Err(ImageError::refused(named, "is not a regular file"));
        }
        if !allowed.iter().any(|d| resolved.starts_with(d)) {
            return Err(ImageError::refused(
                named,
                "lies outside the allowed directories",
            ));
        }
        Ok(())
    }
}

/// Read and validate the qcow2 header of an open file.
pub fn read_header(file: &File, path: &Path) -> Result<HeaderInfo, ImageError> {
    let len = file.metadata().map_err(|e| ImageError::io(path, e))?.len();
    let probe = (len.min(HEADER_PROBE_LEN as u64)) as usize;
    let mut head = vec![0u8; probe];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| ImageError::io(path, e))?;
    let info = parse_header(&head, len).map_err(|e| ImageError::header(path, e))?;
    // Tables are bounded by parse_header (L1 ≤ 32 MiB, refcount table ≤ 8 MiB).
    let mut rt = vec![0u8; (u64::from(info.reftable_clusters) * info.cluster_size()) as usize];
    file.read_exact_at(&mut rt, info.reftable_offset)
        .map_err(|e| ImageError::io(path, e))?;
    check_reftable(&rt, info.cluster_size(), len).map_err(|e| ImageError::header(path, e))?;
    let mut l1 = vec![0u8; info.l1_entries as usize * 8];
    file.read_exact_at(&mut l1, info.l1_offset)
        .map_err(|e| ImageError::io(path, e))?;
    check_l1(&l1, info.cluster_size(), len).map_err(|e| ImageError::header(path, e))?;
    let cluster = info.cluster_size();
    let mut refblock = |off: u64| {
        let mut b = vec![0u8; cluster as usize];
        file.read_exact_at(&mut b, off).map(|()| b).map_err(|e| {
            crate::header::HeaderError::Invalid(format!("reading refcount block at {off:#x}: {e}"))
        })
    };
    check_metadata_layout(&info, &rt, &l1, &mut refblock)
        .map_err(|e| ImageError::header(path, e))?;
    Ok(info)
}

/// Whether the file starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> Result<bool, ImageError> {
    let mut f = File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(magic == QCOW2_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(ImageError::io(path, e)),
    }
}

/// Walk the chain from `top` (a qcow2 image) down, validating every layer.
pub fn resolve_chain(top: &Path, policy: &BackingPolicy) -> Result<Vec<Layer>, ImageError> {
    let named = top;
    let top = top.canonicalize().map_err(|e| ImageError::io(top, e))?;
    let allowed: Vec<PathBuf> = if policy.allowed_dirs.is_empty() {
        top.parent().map(Path::to_path_buf).into_iter().collect()
    } else {
        policy.allowed_dirs.clone()
    };
    policy.check_layer(named, &top, &allowed)?;
    let max_depth = if policy.max_depth == 0 {
        DEFAULT_MAX_DEPTH
    } else {
        policy.max_depth
    };
    let mut seen = HashSet::new();
    let mut layers = Vec::new();
    let mut current = top.clone();
    let mut format = Format::Qcow2;
    loop {
        if !seen.insert(current.clone()) {
            let path = layers
                .last()
                .map_or_else(|| top.clone(), |l: &Layer| l.path.clone());
            return Err(ImageError::BackingLoop {
                path,
                again: current,
            });
        }
        if layers.len() >= max_depth {
            return Err(ImageError::ChainTooDeep {
                path: top,
                max: max_depth,
            });
        }
        if format == Format::Raw {
            layers.push(Layer {
                path: current,
                format,
                header: None,
            });
            return Ok(layers);
        }
        let file = File::open(&current).map_err(|e| ImageError::io(&current, e))?;
        let header = read_header(&file, &current)?;
        let backing = header.backing_file.clone();
        let backing_format = header.backing_format.clone();
        layers.push(Layer {
            path: current.clone(),
            format,
            header: Some(header),
        });
        let Some(name) = backing else {
            return Ok(layers);
        };
        format = match backing_format.as_deref() {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            Some(other) => {
                return Err(ImageError::BackingFormat {
                    path: current,
                    format: other.to_owned(),
                })
            }
            None => {
                return Err(ImageError::BackingFormatMissing {
                    path: current,
                    name,
                })
            }
        };
        let dir = current.parent().unwrap_or(Path::new("/"));
        let candidate = dir.join(&name);
        let resolved = match candidate.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::BackingMissing {
                    path: current,
                    name,
                })
            }
            Err(e) => return Err(ImageError::io(&candidate, e)),
        };
        if !allowed.iter().any(|d| resolved.starts_with(d)) {
            return Err(ImageError::BackingNotAllowed {
                path: current,
                name,
            });
        }
        policy.check_layer(&candidate, &resolved, &allowed)?;
        current = resolved;
    }
}

/// The name to record in an overlay for its backing file `parent`: the bare
/// file name when both live in one directory (so the repository can move),
/// the canonical absolute path otherwise.
pub fn backing_name_for(image: &Path, parent: &Path) -> Result<String, ImageError> {
    let parent_c = parent
        .canonicalize()
        .map_err(|e| ImageError::io(parent, e))?;
    let image_dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let image_dir = image_dir
        .canonicalize()
        .map_err(|e| ImageError::io(image_dir, e))?;
    let name = if parent_c.parent() == Some(image_dir.as_path()) {
        parent_c
            .file_name()
            .map(PathBuf::from)
            .unwrap_or(parent_c.clone())
    } else {
        parent_c.clone()
    };
    name.into_os_string()
        .into_string()
        .map_err(|_| ImageError::InvalidParameters("backing path is not UTF-8".into()))
}
