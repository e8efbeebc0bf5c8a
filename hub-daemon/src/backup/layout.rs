//! Where images live in a repository: `<repo>/<vm>/disk<id>/<backup_id>.qcow2`,
//! written as `<backup_id>.qcow2.partial` until committed. An overlay names
//! its parent by bare file name (same directory), so a repository can move.
//!
//! Every file operation inside a repository goes through [`crate::confined`]:
//! no symlink below the root is ever followed.

use std::io;
use std::path::{Path, PathBuf};

use crate::confined;

/// Paths inside one repository.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A repository rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Image path relative to the root. All components were validated
    /// (`names::validate`), so this stays inside the repository.
    pub fn relative(vm: &str, disk_id: u32, backup_id: &str) -> String {
        format!("{vm}/disk{disk_id}/{backup_id}.qcow2")
    }

    /// Absolute path of a relative image path.
    pub fn path_of(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// `abs` relative to the root; an error if it lies elsewhere.
    fn rel<'a>(&self, abs: &'a Path) -> io::Result<&'a Path> {
        abs.strip_prefix(&self.root).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is outside the repository", abs.display()),
            )
        })
    }

    /// Create the directory of image `abs` (and its parents) inside the
    /// repository, following no symlink.
    pub fn create_parent(&self, abs: &Path) -> io::Result<()> {
        let rel = self.rel(abs)?;
        confined::open_dir(&self.root, rel.parent().unwrap_or(Path::new("")), true).map(drop)
    }

    /// Remove file `abs` (the entry only, never a symlink's target),
    /// reached without following symlinks.
    pub fn remove(&self, abs: &Path) -> io::Result<()> {
        confined::remove_file(&self.root, self.rel(abs)?)
    }

    /// Rename `from` to `to` (same directory) and sync the directory.
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        confined::rename(&self.root, self.rel(from)?, self.rel(to)?)
    }

    /// Check that `abs` is a plain file reached through plain directories.
    pub fn check_plain_file(&self, abs: &Path) -> io::Result<()> {
        confined::check_plain_file(&self.root, self.rel(abs)?)
    }

    /// Open file `abs` for reading, or (`create`) create it new for
    /// writing, following no symlink.
    pub fn open_file(&self, abs: &Path, create: bool) -> io::Result<std::fs::File> {
        confined::open_file(&self.root, self.rel(abs)?, create)
    }

    /// Where a layer is downloaded to while it is re-hydrated
    /// (`<image>.rehydrating`); renamed over the image once checked.
    pub fn rehydrating(path: &Path) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(".rehydrating");
        PathBuf::from(s)
    }

    /// The digest sidecar of an image (`<image>.digest`).
    pub fn sidecar(image: &Path) -> PathBuf {
        let mut s = image.as_os_str().to_owned();
        s.push(".digest");
        PathBuf::from(s)
    }

    /// The in-progress name of an image.
    pub fn partial(path: &Path) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let l = Layout::new("/repo");
        let rel = Layout::relative("vm1", 2, "backup-vm1-1");
        assert_eq!(rel, "vm1/disk2/backup-vm1-1.qcow2");
        let p = l.path_of(&rel);
        assert_eq!(p, PathBuf::from("/repo/vm1/disk2/backup-vm1-1.qcow2"));
        assert_eq!(
            Layout::partial(&p),
            PathBuf::from("/repo/vm1/disk2/backup-vm1-1.qcow2.partial")
        );
    }
}
