//! Opening any supported image by content: qcow2 by its magic, raw otherwise.

use std::path::Path;
use std::sync::Arc;

use nbd_server::BlockBackend;

use crate::chain::is_qcow2;
use crate::error::ImageError;
use crate::qcow::{OpenOptions, QcowBackend};
use crate::raw::RawBackend;

/// Which backend an image was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// qcow2, possibly with a backing chain.
    Qcow2,
    /// Raw bytes.
    Raw,
}

/// Open `path` as qcow2 if it starts with the qcow2 magic, else as raw.
///
/// Detection reads the file's own first bytes, which is safe for a file the
/// caller chose to serve; backing files are never probed (see
/// [`crate::chain`]).
pub async fn open_image(
    path: &Path,
    opts: &OpenOptions,
) -> Result<(Arc<dyn BlockBackend>, ImageFormat), ImageError> {
    if is_qcow2(path)? {
        let q = QcowBackend::open(path, opts).await?;
        Ok((Arc::new(q), ImageFormat::Qcow2))
    } else {
        let r = RawBackend::open(path, opts.read_only)?;
        Ok((Arc::new(r), ImageFormat::Raw))
    }
}
