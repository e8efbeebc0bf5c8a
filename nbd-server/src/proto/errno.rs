//! The error values allowed on the NBD wire.

use std::fmt;

/// An NBD error value as carried in replies.
///
/// An open newtype rather than a closed enum (h2's `Reason` style), so any
/// value read off the wire still round-trips; the named constants are the
/// only values this server ever sends.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: NbdErrno = NbdErrno(1);
    /// Input/output error.
    pub const EIO: NbdErrno = NbdErrno(5);
    /// Out of memory; the spec asks servers to avoid it.
    pub const ENOMEM: NbdErrno = NbdErrno(12);
    /// Invalid argument: bad range, flag or command.
    pub const EINVAL: NbdErrno = NbdErrno(22);
    /// No space left (also write past the end of the export).
    pub const ENOSPC: NbdErrno = NbdErrno(28);
    /// Value too large (DF read that cannot be sent in one chunk, oversized request).
    pub const EOVERFLOW: NbdErrno = NbdErrno(75);
    /// Not supported (only for WRITE_ZEROES with FAST_ZERO).
    pub const ENOTSUP: NbdErrno = NbdErrno(95);
    /// Server is shutting down.
    pub const ESHUTDOWN: NbdErrno = NbdErrno(108);

    /// The spec's symbolic name, for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_match_the_spec_table() {
        assert_eq!(NbdErrno::EPERM.0, 1);
        assert_eq!(NbdErrno::EIO.0, 5);
        assert_eq!(NbdErrno::ENOMEM.0, 12);
        assert_eq!(NbdErrno::EINVAL.0, 22);
        assert_eq!(NbdErrno::ENOSPC.0, 28);
        assert_eq!(NbdErrno::EOVERFLOW.0, 75);
        assert_eq!(NbdErrno::ENOTSUP.0, 95);
        assert_eq!(NbdErrno::ESHUTDOWN.0, 108);
        assert_eq!(format!("{}", NbdErrno(99)), "unknown(99)");
    }
}
