//! The one place backend errors become NBD error values.
//!
//! The mapping depends on the command as well as the error kind (nbdkit's
//! `nbd_errno`): running past the end is ENOSPC for writes but EINVAL for
//! everything else, and ENOTSUP is only legal for a FAST_ZERO request.

use crate::backend::BackendErrorKind;
use crate::proto::{Command, NbdErrno};

/// The errno to send when `cmd` failed with `kind`.
pub fn to_errno(kind: BackendErrorKind, cmd: &Command) -> NbdErrno {
    let writes = matches!(cmd, Command::Write { .. } | Command::WriteZeroes { .. });
    match kind {
        BackendErrorKind::ReadOnly => NbdErrno::EPERM,
        BackendErrorKind::NoSpace => NbdErrno::ENOSPC,
        BackendErrorKind::OutOfRange if writes => NbdErrno::ENOSPC,
        BackendErrorKind::OutOfRange => NbdErrno::EINVAL,
        BackendErrorKind::Unsupported => match cmd {
            Command::WriteZeroes { fast: true, .. } => NbdErrno::ENOTSUP,
            _ => NbdErrno::EINVAL,
        },
        BackendErrorKind::InvalidArgument => NbdErrno::EINVAL,
        BackendErrorKind::Io | BackendErrorKind::Corrupt => NbdErrno::EIO,
        BackendErrorKind::Shutdown => NbdErrno::ESHUTDOWN,
        // BackendErrorKind is non_exhaustive; a kind added later is an I/O
        // failure until someone decides otherwise here.
        #[allow(unreachable_patterns)]
        _ => NbdErrno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: Command = Command::Write {
        offset: 0,
        len: 1,
        fua: false,
    };
    const READ: Command = Command::Read {
        offset: 0,
        len: 1,
        df: false,
    };
    const FAST_ZERO: Command = Command::WriteZeroes {
        offset: 0,
        len: 1,
        fua: false,
        no_hole: false,
        fast: true,
    };
    const ZERO: Command = Command::WriteZeroes {
        offset: 0,
        len: 1,
        fua: false,
        no_hole: false,
        fast: false,
    };

    #[test]
    fn table() {
        assert_eq!(
            to_errno(BackendErrorKind::ReadOnly, &WRITE),
            NbdErrno::EPERM
        );
        assert_eq!(
            to_errno(BackendErrorKind::NoSpace, &WRITE),
            NbdErrno::ENOSPC
        );
        assert_eq!(
            to_errno(BackendErrorKind::OutOfRange, &WRITE),
            NbdErrno::ENOSPC
        );
        assert_eq!(
            to_errno(BackendErrorKind::OutOfRange, &ZERO),
            NbdErrno::ENOSPC
        );
        assert_eq!(
            to_errno(BackendErrorKind::OutOfRange, &READ),
            NbdErrno::EINVAL
        );
        assert_eq!(
            to_errno(BackendErrorKind::Unsupported, &FAST_ZERO),
            NbdErrno::ENOTSUP
        );
        assert_eq!(
            to_errno(BackendErrorKind::Unsupported, &ZERO),
            NbdErrno::EINVAL
        );
        assert_eq!(
            to_errno(BackendErrorKind::InvalidArgument, &READ),
            NbdErrno::EINVAL
        );
        assert_eq!(to_errno(BackendErrorKind::Io, &READ), NbdErrno::EIO);
        assert_eq!(to_errno(BackendErrorKind::Corrupt, &WRITE), NbdErrno::EIO);
        assert_eq!(
            to_errno(BackendErrorKind::Shutdown, &READ),
            NbdErrno::ESHUTDOWN
        );
    }
}
