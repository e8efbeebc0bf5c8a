//! Whole-file advisory locks on images.
//!
//! Open-file-description (OFD) locks, the kind qemu takes on its images:
//! a writer holds an exclusive lock, readers a shared one. So a second
//! writer — another export in this process, another hub, or qemu itself —
//! is refused, and qemu-img refuses to open an image we are writing
//! (unless forced with `-U`), just as with qemu-nbd. OFD locks belong to
//! the open file, so they vanish with it, even on `kill -9`.

use std::fs::File;
use std::io;

use nix::fcntl::{fcntl, FcntlArg};

/// Lock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many readers.
    Shared,
    /// One writer, no readers.
    Exclusive,
}

/// Try to lock all of `file`; fails with `WouldBlock` if someone else holds
/// a conflicting lock.
pub fn lock_file(file: &File, mode: LockMode) -> io::Result<()> {
    let l_type = match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    };
    let fl = libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // to the end of the file, however it grows
        l_pid: 0, // must be 0 for OFD locks
    };
    match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "image is locked by another user",
        )),
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_exclusive_lock_on_another_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        lock_file(&a, LockMode::Exclusive).unwrap();
        let e = lock_file(&b, LockMode::Exclusive).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(lock_file(&b, LockMode::Shared).is_err());
        drop(a);
        lock_file(&b, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn shared_locks_coexist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        let a = File::open(&p).unwrap();
        let b = File::open(&p).unwrap();
        lock_file(&a, LockMode::Shared).unwrap();
        lock_file(&b, LockMode::Shared).unwrap();
    }
}
