//! Image locks that both our processes and qemu respect.
//!
//! Two mechanisms, each for one audience:
//! * `flock` (exclusive for writers, shared for readers) refuses a second
//!   writer among our own processes and exports.
//! * qemu's own protocol: OFD byte locks at offset 100 + perm ("I use this
//!   permission") and 200 + perm ("I do not share it"), perms being
//!   consistent-read (0), write (1), write-unchanged (2) and resize (3).
//!   A writer here uses read+write and shares nothing, so qemu refuses to
//!   open an image we are writing, exactly as when qemu-nbd holds it; a
//!   reader uses consistent-read and refuses to share write/resize, so qemu
//!   may read alongside us but not write.
//!
//! Both lock kinds belong to the open file, so they vanish with it, even on
//! `kill -9`.

use std::fs::File;
use std::io;

use nix::fcntl::{fcntl, FcntlArg};
use rustix::fs::{flock, FlockOperation};

/// Lock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many readers, no writer.
    Shared,
    /// One writer, no readers.
    Exclusive,
}

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;
const PERMS: i64 = 4;

fn locked(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, msg.to_owned())
}

fn flock_struct(l_type: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0, // must be 0 for OFD locks
    }
}

/// Whether someone else holds any lock on bytes `[start, start+len)`.
fn someone_holds(file: &File, start: i64, len: i64) -> io::Result<bool> {
    let mut fl = flock_struct(libc::F_WRLCK, start, len);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn read_lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_struct(libc::F_RDLCK, byte, 1);
    match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => {
            Err(locked("image is locked by qemu"))
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Lock `file` for `mode`; fails with `WouldBlock` if another user (ours or
/// qemu) holds it in a conflicting way.
///
/// A conflict is retried for about a quarter of a second before it counts:
/// a process that forks (to run any program) gives the child copies of all
/// its open files until the child execs, locks included, so an image closed
/// a moment ago can look locked for that long.
pub fn lock_file(file: &File, mode: LockMode) -> io::Result<()> {
    let mut delay = std::time::Duration::from_millis(1);
    loop {
        match try_lock_file(file, mode) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && delay.as_millis() <= 128 => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            r => return r,
        }
    }
}

fn try_lock_file(file: &File, mode: LockMode) -> io::Result<()> {
    let op = match mode {
        LockMode::Shared => FlockOperation::NonBlockingLockShared,
        LockMode::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    flock(file, op).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            locked("image is in use by another writer or reader")
        } else {
            io::Error::from(e)
        }
    })?;
    match mode {
        LockMode::Exclusive => {
            // Anyone using or denying any permission conflicts with a writer.
            if someone_holds(file, PERM_BASE, PERMS)? || someone_holds(file, SHARED_BASE, PERMS)? {
                return Err(locked("image is in use by qemu"));
            }
            for p in [READ, WRITE] {
                read_lock_byte(file, PERM_BASE + p)?;
            }
            for p in 0..PERMS {
                read_lock_byte(file, SHARED_BASE + p)?;
            }
        }
        LockMode::Shared => {
            // A qemu writer, or anyone refusing to share consistent reads.
            if someone_holds(file, PERM_BASE + WRITE, 1)?
                || someone_holds(file, SHARED_BASE + READ, 1)?
            {
                return Err(locked("image is being written by qemu"));
            }
            read_lock_byte(file, PERM_BASE + READ)?;
            read_lock_byte(file, SHARED_BASE + WRITE)?;
            read_lock_byte(file, SHARED_BASE + RESIZE)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_opens(dir: &tempfile::TempDir) -> (File, File) {
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        (a, b)
    }

    #[test]
    fn writer_excludes_writers_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_opens(&dir);
        lock_file(&a, LockMode::Exclusive).unwrap();
        assert_eq!(
            lock_file(&b, LockMode::Exclusive).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(
            lock_file(&b, LockMode::Shared).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(a);
        lock_file(&b, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn readers_coexist_and_exclude_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_opens(&dir);
        lock_file(&a, LockMode::Shared).unwrap();
        lock_file(&b, LockMode::Shared).unwrap();
        let c = File::options()
            .read(true)
            .write(true)
            .open(dir.path().join("img"))
            .unwrap();
        assert!(lock_file(&c, LockMode::Exclusive).is_err());
    }

    #[test]
    fn a_qemu_style_writer_lock_excludes_us() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_opens(&dir);
        // What qemu holds while writing: perm bytes for read and write.
        read_lock_byte(&a, PERM_BASE + WRITE).unwrap();
        assert!(lock_file(&b, LockMode::Shared).is_err());
    }
}
