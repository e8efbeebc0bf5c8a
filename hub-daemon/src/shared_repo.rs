//! The mark of a shared repository. A shared repository lives on storage
//! every node of the fleet mounts at the same path; a node that has not
//! mounted it sees an empty local directory there (or none), and would
//! write backups onto its own root filesystem where no other node can read
//! them. So the directory carries a file naming the repository, written
//! when it is registered, and a node runs a backup in it (or serves one of
//! its chains) only after reading that file back with the right id.

use std::io::{Read, Write};
use std::path::Path;

use crate::confined;
use crate::error::{DaemonError, Result};

/// The mark's file name, in the repository's top directory.
pub const MARKER: &str = ".hub-repository";
/// Longest mark read (an id is at most 128 bytes).
const MAX_MARK: u64 = 512;

/// Write the mark of repository `id` into `dir` (a fresh registration).
/// A mark of another repository there is a conflict: two repositories on
/// one directory would sweep each other's files.
pub fn write(dir: &Path, id: &str) -> Result<()> {
    match read(dir) {
        Ok(found) if found == id => return Ok(()),
        Ok(found) => {
            return Err(DaemonError::Conflict(format!(
                "{} is already repository {found:?} (its {MARKER} says so)",
                dir.display()
            )))
        }
        Err(_) => {}
    }
    let io = |e| DaemonError::io(format!("writing {}/{MARKER}", dir.display()), e);
    let mut f = confined::open_file(dir, Path::new(MARKER), true).map_err(io)?;
    f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Check that `dir` is repository `id` as this node sees it.
pub fn check(dir: &Path, id: &str, node: &str) -> Result<()> {
    match read(dir) {
        Ok(found) if found == id => Ok(()),
        Ok(found) => Err(DaemonError::Unavailable(format!(
            "node {node:?}: {} is repository {found:?}, not the shared repository {id:?}",
            dir.display()
        ))),
        Err(e) => Err(DaemonError::Unavailable(format!(
            "node {node:?} cannot reach shared repository {id:?} at {} ({MARKER}: {e}); \
             is its storage mounted there?",
            dir.display()
        ))),
    }
}

/// The id in `dir`'s mark.
fn read(dir: &Path) -> std::io::Result<String> {
    let f = confined::open_file(dir, Path::new(MARKER), false)?;
    let mut s = String::new();
    f.take(MAX_MARK).read_to_string(&mut s)?;
    Ok(s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_written_once_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(check(dir, "r1", "n").is_err(), "no mark yet");
        write(dir, "r1").unwrap();
        write(dir, "r1").unwrap();
        check(dir, "r1", "n").unwrap();
        let other = check(dir, "r2", "n").unwrap_err().to_string();
        assert!(other.contains("\"r1\""), "{other}");
        assert!(matches!(write(dir, "r2"), Err(DaemonError::Conflict(_))));
        // A symlinked mark is not followed.
        let t2 = tempfile::tempdir().unwrap();
        std::fs::write(t2.path().join("elsewhere"), "r3\n").unwrap();
        std::os::unix::fs::symlink(t2.path().join("elsewhere"), t2.path().join(MARKER)).unwrap();
        assert!(check(t2.path(), "r3", "n").is_err());
    }
}
