//! Where a disk's bytes come from: a raw file, a block device, a qcow2
//! image (with its backing chain) or a remote `nbd://` export. Every kind
//! opens to one [`BlockBackend`], so the streaming code reads them alike.

use std::path::PathBuf;
use std::sync::Arc;

use nbd_server::BlockBackend;
use qcow_backend::{OpenOptions, QcowBackend};

use crate::rawfile::RawFile;

/// A configured source, not yet opened (opening an NBD source connects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A raw file, a block device or a qcow2 image, told apart by content.
    Path(PathBuf),
    /// An `nbd://host:port/export` URI.
    Nbd(String),
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
        match self {
            SourceSpec::Path(p) => {
                let image = |source| SourceError::Image {
                    path: p.display().to_string(),
                    source,
                };
                if qcow_backend::chain::is_qcow2(p).map_err(image)? {
                    // Backing files may live only next to the image (the
                    // backend's default policy): a source is configured by
                    // the operator, its chain is not.
                    let opts = OpenOptions::new().read_only(true);
                    let q = QcowBackend::open(p, &opts).await.map_err(image)?;
                    Ok(Arc::new(q))
                } else {
                    let f = RawFile::open(p).map_err(|source| SourceError::Raw {
                        path: p.display().to_string(),
                        source,
                    })?;
                    Ok(Arc::new(f))
                }
            }
            SourceSpec::Nbd(u) => {
                let c = nbd_client::connect_uri(u).await?;
                Ok(Arc::new(nbd_client::NbdBackend::new(c)))
            }
        }
    }
}
