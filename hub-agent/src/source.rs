//! Where a disk's bytes come from: a raw file, a block device, a qcow2
//! image (with its backing chain) or a remote `nbd://` export. Every kind
//! opens to one [`BlockBackend`], so the streaming code reads them alike.
//!
//! An NBD source may name a qemu dirty bitmap
//! (`nbd://host:port/export?dirty-bitmap=NAME`, served by e.g.
//! `qemu-nbd -r -B NAME`): an incremental then reads only the blocks the
//! bitmap marks dirty (see [`crate::stream`] and the operator's contract in
//! the README).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_server::BlockBackend;
use qcow_backend::{OpenOptions, QcowBackend};

use crate::rawfile::RawFile;

/// A configured source, not yet opened (opening an NBD source connects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A raw file, a block device or a qcow2 image, told apart by content.
    Path(PathBuf),
    /// An `nbd://host:port/export[?dirty-bitmap=NAME]` URI.
    Nbd(String),
}

/// An opened source.
#[derive(Debug)]
pub struct Opened {
    /// Its bytes.
    pub backend: Arc<dyn BlockBackend>,
    /// Its dirty bitmap, if it names one.
    pub dirty: Option<DirtyBitmap>,
    /// The same source when it is a raw file or device, for readers that
    /// read and hash on one blocking thread ([`RawFile::read_blocking`]).
    pub raw: Option<Arc<RawFile>>,
}

/// A qemu dirty bitmap on an NBD source's connection: the blocks written
/// since the bitmap was started (or last cleared). Whether it covers every
/// write since the last completed push is the operator's contract.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    /// The source's connection (the context was asked for at handshake).
    pub client: nbd_client::Client,
    /// `qemu:dirty-bitmap:NAME`.
    pub context: String,
}

/// Why a source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The image or device.
    #[error("opening {path}: {source}")]
    Image {
        /// What was opened.
        path: String,
        /// Why it failed.
        source: qcow_backend::ImageError,
    },
    /// A raw file or device.
    #[error("opening {path}: {source}")]
    Raw {
        /// What was opened.
        path: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The NBD connection (the URI itself stays out of the message: its
    /// export name may be a capability).
    #[error("connecting to NBD source: {0}")]
    Nbd(#[from] nbd_client::ConnectError),
}

impl SourceSpec {
    /// `nbd://…` is an NBD source; anything else is a path.
    pub fn parse(s: &str) -> SourceSpec {
        if s.starts_with("nbd://") {
            SourceSpec::Nbd(s.to_owned())
        } else {
            SourceSpec::Path(PathBuf::from(s))
        }
    }

    /// A short name for logs and errors (never an NBD export name).
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Path(p) => p.display().to_string(),
            SourceSpec::Nbd(u) => match nbd_client::NbdUri::parse(u) {
                Ok(u) => format!("nbd://{}:{}/…", u.host, u.port),
                Err(_) => "nbd://…".to_owned(),
            },
        }
    }

    /// Open read-only.
    pub async fn open(&self) -> Result<Arc<dyn BlockBackend>, SourceError> {
        Ok(self.open_tracked().await?.backend)
    }

    /// Open read-only, with the source's dirty bitmap if it names one.
    pub async fn open_tracked(&self) -> Result<Opened, SourceError> {
        match self {
            SourceSpec::Path(p) => {
                let (backend, raw) = open_path(p).await?;
                Ok(Opened {
                    backend,
                    dirty: None,
                    raw,
                })
            }
            SourceSpec::Nbd(u) => {
                let parsed =
                    nbd_client::NbdUri::parse(u).map_err(nbd_client::ConnectError::from)?;
                // options_for asks for the bitmap's context next to
                // base:allocation.
                let opts = nbd_client::options_for(&parsed)?;
                let c = nbd_client::Client::connect_host(&parsed.host, parsed.port, &opts)
                    .await
                    .map_err(nbd_client::ConnectError::from)?;
                let dirty = parsed.dirty_bitmap_context().map(|context| DirtyBitmap {
                    client: c.clone(),
                    context,
                });
                Ok(Opened {
                    backend: Arc::new(nbd_client::NbdBackend::new(c)),
                    dirty,
                    raw: None,
                })
            }
        }
    }
}

/// The backend, and the raw file again when it is one.
type OpenedPath = (Arc<dyn BlockBackend>, Option<Arc<RawFile>>);

async fn open_path(p: &Path) -> Result<OpenedPath, SourceError> {
    let image = |source| SourceError::Image {
        path: p.display().to_string(),
        source,
    };
    if qcow_backend::chain::is_qcow2(p).map_err(image)? {
        // Backing files may live only next to the image (the backend's
        // default policy): a source is configured by the operator, its
        // chain is not.
        let opts = OpenOptions::new().read_only(true);
        let q = QcowBackend::open(p, &opts).await.map_err(image)?;
        Ok((Arc::new(q), None))
    } else {
        let f = Arc::new(RawFile::open(p).map_err(|source| SourceError::Raw {
            path: p.display().to_string(),
            source,
        })?);
        Ok((Arc::clone(&f) as Arc<dyn BlockBackend>, Some(f)))
    }
}
