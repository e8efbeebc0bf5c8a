//! Reaching files inside a repository without following symlinks.
//!
//! The repository root is opened as configured (it was canonicalized and
//! checked when registered); every component below it is opened with
//! `O_NOFOLLOW | O_DIRECTORY` relative to the previous one, and files are
//! created, renamed and removed relative to the handle of their directory
//! (`mkdirat`, `renameat`, `unlinkat`). A symlink planted anywhere inside a
//! repository therefore cannot redirect a write, a rename or a delete: the
//! walk fails with `ELOOP`/`ENOTDIR` instead ([`is_link_refusal`]).

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}

/// The plain components of a relative path (no `..`, no root).
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(invalid("repository paths are plain relative paths")),
        })
        .collect()
}

/// Whether `e` is the refusal of a symlink (or a non-directory) where a
/// directory or plain file was expected.
pub fn is_link_refusal(e: &io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|n| n == Errno::LOOP.raw_os_error() || n == Errno::NOTDIR.raw_os_error())
}

/// The error of a symlink (or other non-file) where a plain file was
/// expected: `ELOOP`, as `O_NOFOLLOW` reports it.
fn link_refusal() -> io::Error {
    io::Error::from_raw_os_error(Errno::LOOP.raw_os_error())
}

/// Open directory `root/rel`, each component below `root` without
/// following symlinks; with `create`, missing components are made (and
/// their parents synced, so the entries survive a crash).
pub fn open_dir(root: &Path, rel: &Path, create: bool) -> io::Result<OwnedFd> {
    let mut dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for name in components(rel)? {
        dir = match rustix::fs::openat(&dir, name, DIR_FLAGS, Mode::empty()) {
            Ok(d) => d,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                rustix::fs::fsync(&dir)?;
                rustix::fs::openat(&dir, name, DIR_FLAGS, Mode::empty())?
            }
            Err(e) => return Err(e.into()),
        };
    }
    Ok(dir)
}

/// `rel` split into its directory and file name.
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(invalid("not a file path")),
    }
}

/// Remove the file `root/rel`: the entry itself (a symlink is removed, its
/// target never touched), reached without following any symlink.
pub fn remove_file(root: &Path, rel: &Path) -> io::Result<()> {
    let (dir, name) = split(rel)?;
    let dir = open_dir(root, dir, false)?;
    rustix::fs::unlinkat(&dir, name, AtFlags::empty())?;
    Ok(())
}

/// Rename `root/from` to `root/to` (same directory) and sync the
/// directory.
pub fn rename(root: &Path, from: &Path, to: &Path) -> io::Result<()> {
    let (dir, a) = split(from)?;
    let (dir2, b) = split(to)?;
    if dir != dir2 {
        return Err(invalid("renames stay within one directory"));
    }
    let dir = open_dir(root, dir, false)?;
    rustix::fs::renameat(&dir, a, &dir, b)?;
    rustix::fs::fsync(&dir)?;
    Ok(())
}

/// Open `root/rel` without following a symlink anywhere below `root`:
/// for reading, or (`create`) a new file for writing, which must not
/// exist yet (`O_EXCL`: a leftover is refused, never reused).
pub fn open_file(root: &Path, rel: &Path, create: bool) -> io::Result<std::fs::File> {
    let (dir, name) = split(rel)?;
    let dir = open_dir(root, dir, false)?;
    let flags = if create {
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL
    } else {
        OFlags::RDONLY
    };
    let fd = rustix::fs::openat(
        &dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
    )?;
    Ok(std::fs::File::from(fd))
}

/// Check that `root/rel` is a plain file reached through plain
/// directories: no component below `root` is a symlink.
pub fn check_plain_file(root: &Path, rel: &Path) -> io::Result<()> {
    let (dir, name) = split(rel)?;
    let dir = open_dir(root, dir, false)?;
    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(link_refusal());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_below_the_root_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repo");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("x.qcow2"), b"precious").unwrap();

        // Created inside, step by step.
        open_dir(&root, Path::new("vm/disk0"), true).unwrap();
        assert!(root.join("vm/disk0").is_dir());
        std::fs::write(root.join("vm/disk0/a"), b"a").unwrap();
        rename(&root, Path::new("vm/disk0/a"), Path::new("vm/disk0/b")).unwrap();
        check_plain_file(&root, Path::new("vm/disk0/b")).unwrap();
        remove_file(&root, Path::new("vm/disk0/b")).unwrap();

        // A directory symlink: refused for create, remove, check.
        symlink(&outside, root.join("evil")).unwrap();
        for e in [
            open_dir(&root, Path::new("evil"), true).unwrap_err(),
            open_dir(&root, Path::new("evil/disk0"), true).unwrap_err(),
            remove_file(&root, Path::new("evil/x.qcow2")).unwrap_err(),
            check_plain_file(&root, Path::new("evil/x.qcow2")).unwrap_err(),
        ] {
            assert!(is_link_refusal(&e), "{e}");
        }
        assert!(outside.join("x.qcow2").exists());
        assert!(!outside.join("disk0").exists());

        // A file symlink: removing removes the link only.
        symlink(outside.join("x.qcow2"), root.join("vm/disk0/y.qcow2")).unwrap();
        let e = check_plain_file(&root, Path::new("vm/disk0/y.qcow2")).unwrap_err();
        assert!(is_link_refusal(&e), "{e}");
        remove_file(&root, Path::new("vm/disk0/y.qcow2")).unwrap();
        assert_eq!(std::fs::read(outside.join("x.qcow2")).unwrap(), b"precious");
        assert!(components(Path::new("../x")).is_err());
    }
}
