//! The one error type every backend returns.
//!
//! A backend error is a small, stable [`BackendErrorKind`] (the NBD errno is
//! computed from it alone, in [`crate::errno_map`]) plus context for logs:
//! the operation, the offset and the underlying cause.

use std::fmt;
use std::io;

/// Classification of a backend failure. Matchable and stable; new kinds may
/// be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// Generic I/O failure.
    Io,
    /// Out of space (ENOSPC, EDQUOT, EFBIG).
    NoSpace,
    /// The image or file is read-only.
    ReadOnly,
    /// The range lies outside the device.
    OutOfRange,
    /// The operation (or this variant of it) is not supported.
    Unsupported,
    /// The request itself is invalid for this backend.
    InvalidArgument,
    /// On-disk metadata is corrupt.
    Corrupt,
    /// The backend is shutting down or already closed.
    Shutdown,
}

impl BackendErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            BackendErrorKind::Io => "I/O error",
            BackendErrorKind::NoSpace => "no space left",
            BackendErrorKind::ReadOnly => "read-only",
            BackendErrorKind::OutOfRange => "out of range",
            BackendErrorKind::Unsupported => "not supported",
            BackendErrorKind::InvalidArgument => "invalid argument",
            BackendErrorKind::Corrupt => "corrupt image",
            BackendErrorKind::Shutdown => "shutting down",
        }
    }
}

/// A backend failure with its kind, context and cause.
#[derive(Debug)]
pub struct BackendError {
    kind: BackendErrorKind,
    op: &'static str,
    offset: Option<u64>,
    message: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// An error of `kind` during `op`.
    pub fn new(kind: BackendErrorKind, op: &'static str) -> Self {
        BackendError {
            kind,
            op,
            offset: None,
            message: None,
            source: None,
        }
    }

    /// Classify an `io::Error` from `op` (errno first, then `ErrorKind`).
    pub fn from_io(op: &'static str, err: io::Error) -> Self {
        let kind = classify_io(&err);
        BackendError::new(kind, op).with_source(err)
    }

    /// Attach the device offset the error happened at.
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Attach a human-readable detail.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The classification.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The operation that failed.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The offset, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// A short description without the cause chain, safe to send to a
    /// client (the cause may name host paths; it goes to the log instead).
    pub fn summary(&self) -> String {
        format!("{} failed: {}", self.op, self.kind.as_str())
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.op, self.kind.as_str())?;
        if let Some(off) = self.offset {
            write!(f, " at offset {off:#x}")?;
        }
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Map an `io::Error` to a kind: errno values first (they are precise),
/// then the portable `ErrorKind`.
pub fn classify_io(err: &io::Error) -> BackendErrorKind {
    // Values are Linux errno numbers; std exposes no names for them.
    const EPERM: i32 = 1;
    const EACCES: i32 = 13;
    const EFBIG: i32 = 27;
    const ENOSPC: i32 = 28;
    const EROFS: i32 = 30;
    const EDQUOT: i32 = 122;
    const EOPNOTSUPP: i32 = 95;
    if let Some(code) = err.raw_os_error() {
        match code {
            ENOSPC | EDQUOT | EFBIG => return BackendErrorKind::NoSpace,
            EROFS | EPERM | EACCES => return BackendErrorKind::ReadOnly,
            EOPNOTSUPP => return BackendErrorKind::Unsupported,
            _ => {}
        }
    }
    match err.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            BackendErrorKind::NoSpace
        }
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied => {
            BackendErrorKind::ReadOnly
        }
        io::ErrorKind::Unsupported => BackendErrorKind::Unsupported,
        io::ErrorKind::InvalidData => BackendErrorKind::Corrupt,
        io::ErrorKind::UnexpectedEof => BackendErrorKind::OutOfRange,
        io::ErrorKind::InvalidInput => BackendErrorKind::InvalidArgument,
        _ => BackendErrorKind::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classification() {
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(28)),
            BackendErrorKind::NoSpace
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(122)),
            BackendErrorKind::NoSpace
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(27)),
            BackendErrorKind::NoSpace
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(30)),
            BackendErrorKind::ReadOnly
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(95)),
            BackendErrorKind::Unsupported
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(5)),
            BackendErrorKind::Io
        );
        assert_eq!(
            classify_io(&io::Error::new(io::ErrorKind::InvalidData, "bad l2")),
            BackendErrorKind::Corrupt
        );
    }

    #[test]
    fn display_has_op_kind_offset_and_cause() {
        let e = BackendError::from_io("write", io::Error::from_raw_os_error(28)).at(0x1000);
        let s = e.to_string();
        assert!(
            s.starts_with("write failed: no space left at offset 0x1000: "),
            "{s}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
