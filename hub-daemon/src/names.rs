//! Validation of names that come from requests and end up in file paths,
//! export names or SQL rows.
//!
//! Allowed: ASCII letters, digits, `.`, `_`, `-`; 1..=128 bytes; not
//! starting with `.` (no hidden files, no `.`/`..`). That keeps every name
//! a single safe path component and a valid NBD export name.
//!
//! Repository paths (whole absolute directories chosen by the client) have
//! their own check, [`repository_dir`], which also creates the directory.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::error::DaemonError;

/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 128;

/// Longest accepted backup id (ids embed the VM name).
pub const MAX_ID_LEN: usize = 200;

/// Check a name (`what` describes it in the error).
pub fn validate(what: &str, value: &str) -> Result<(), String> {
    validate_len(what, value, MAX_NAME_LEN)
}

/// Check a backup id from a request path.
pub fn validate_id(value: &str) -> Result<(), String> {
    validate_len("backup id", value, MAX_ID_LEN)
}

fn validate_len(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.len() > max {
        return Err(format!("{what} longer than {max} bytes"));
    }
    if value.starts_with('.') {
        return Err(format!("{what} must not start with '.'"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Longest repository path (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest component of a repository path (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Top-level trees that never hold a repository: kernel interfaces, the
/// system's own files. `/lib*` covers lib32, lib64, libx32.
const SYSTEM_TREES: &[&str] = &[
    "proc", "sys", "dev", "etc", "boot", "run", "usr", "bin", "sbin",
];

fn is_system_tree(first: &str) -> bool {
    SYSTEM_TREES.contains(&first) || first.starts_with("lib")
}

/// Check a repository path as given: absolute, no NUL, at most
/// [`MAX_PATH_LEN`] bytes with components of at most [`MAX_COMPONENT_LEN`],
/// no `..`, not `/` and not in a system tree. Returns it normalized
/// (`.` and repeated `/` removed). Pure: no filesystem access.
pub fn repository_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("path must not be empty".into());
    }
    if path.contains('\0') {
        return Err("path must not contain NUL".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("path longer than {MAX_PATH_LEN} bytes"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err("path must be an absolute directory path".into());
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("path must not contain '..'".into()),
            Component::Normal(n) => {
                if n.len() > MAX_COMPONENT_LEN {
                    return Err(format!(
                        "path component longer than {MAX_COMPONENT_LEN} bytes"
                    ));
                }
                out.push(n);
            }
            Component::Prefix(_) => return Err("path has a prefix".into()),
        }
    }
    check_not_system(&out)?;
    Ok(out)
}

/// `/` itself, or anything in a system tree, is refused.
fn check_not_system(p: &Path) -> Result<(), String> {
    let first = p.components().find_map(|c| match c {
        Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
        _ => None,
    });
    match first {
        None => Err("path must not be the root directory".into()),
        Some(f) if is_system_tree(&f) => Err(format!(
            "path {} is inside a system directory (/{f})",
            p.display()
        )),
        Some(_) => Ok(()),
    }
}

/// Errors creating a directory that come from the path the client chose
/// (not our fault, not transient): permission, a file in the way, a
/// read-only filesystem, a name or link loop the kernel refuses.
fn is_client_path_error(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(n) = e.raw_os_error() else {
        return false;
    };
    [
        Errno::ACCESS,
        Errno::PERM,
        Errno::NOTDIR,
        Errno::ROFS,
        Errno::EXIST,
        Errno::NAMETOOLONG,
        Errno::LOOP,
        Errno::INVAL,
        Errno::MLINK,
        Errno::ISDIR,
        Errno::NOENT,
    ]
    .iter()
    .any(|e| e.raw_os_error() == n)
}

/// Validate a repository path ([`repository_path`]), resolve symlinks in
/// the part that exists (so a link cannot lead into a system tree), create
/// the directory and return its canonical path.
///
/// Client mistakes are [`DaemonError::BadRequest`]: a bad path, an
/// existing non-directory, a directory that cannot be created there
/// (EACCES, ENOTDIR, EROFS, ...). A full disk is [`DaemonError::NoSpace`].
pub fn repository_dir(path: &str) -> Result<PathBuf, DaemonError> {
    let bad = DaemonError::BadRequest;
    let path = repository_path(path).map_err(bad)?;
    // The deepest existing ancestor, resolved, plus the rest as given.
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                _ => return Err(bad(format!("cannot resolve {}", path.display()))),
            },
        }
    };
    if rest.is_empty() && !resolved.is_dir() {
        return Err(bad(format!(
            "{} exists and is not a directory",
            path.display()
        )));
    }
    let target = rest.iter().rev().fold(resolved, |acc, name| acc.join(name));
    check_not_system(&target).map_err(bad)?;
    if target.as_os_str().len() > MAX_PATH_LEN {
        return Err(bad(format!(
            "resolved path longer than {MAX_PATH_LEN} bytes"
        )));
    }
    std::fs::create_dir_all(&target).map_err(|e| {
        if is_client_path_error(&e) {
            bad(format!(
                "cannot create repository directory {}: {e}",
                target.display()
            ))
        } else {
            DaemonError::io(format!("creating {}", target.display()), e)
        }
    })?;
    let canonical = target
        .canonicalize()
        .map_err(|e| DaemonError::io(format!("resolving {}", target.display()), e))?;
    // Someone may have swapped a component for a link meanwhile.
    check_not_system(&canonical).map_err(bad)?;
    if !canonical.is_dir() {
        return Err(bad(format!("{} is not a directory", canonical.display())));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_paths_are_checked_lexically() {
        for ok in [
            "/srv/backups",
            "/var/lib/hub/repo",
            "/tmp//x/./y",
            "/home/a/libraries",
        ] {
            assert!(repository_path(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            repository_path("/tmp//x/./y/").unwrap(),
            PathBuf::from("/tmp/x/y")
        );
        let long_component = format!("/srv/{}", "a".repeat(256));
        let long_path = format!("/srv{}", "/abcdefgh".repeat(512));
        for bad in [
            "",
            "relative/dir",
            "./x",
            "/",
            "//",
            "/./",
            "/srv/a\0b",
            "/srv/../etc",
            "/proc",
            "/proc/self",
            "/sys/kernel",
            "/dev/shm/x",
            "/etc",
            "/boot/x",
            "/run/x",
            "/usr/local/backups",
            "/bin",
            "/sbin/x",
            "/lib/x",
            "/lib64",
            "/libx32/y",
            long_component.as_str(),
            long_path.as_str(),
        ] {
            assert!(repository_path(bad).is_err(), "{bad:?}");
        }
        assert!(repository_path(&format!("/srv/{}", "a".repeat(255))).is_ok());
    }

    #[test]
    fn repository_dirs_are_created_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        // Created, nested, and idempotent.
        let want = base.join("a/b");
        let got = repository_dir(want.to_str().unwrap()).unwrap();
        assert_eq!(got, want);
        assert!(want.is_dir());
        assert_eq!(repository_dir(want.to_str().unwrap()).unwrap(), want);
        // A file, or a file in the way.
        let file = base.join("file");
        std::fs::write(&file, b"x").unwrap();
        for p in [file.clone(), file.join("sub")] {
            let e = repository_dir(p.to_str().unwrap()).unwrap_err();
            assert!(matches!(e, DaemonError::BadRequest(_)), "{p:?}: {e}");
        }
        // A symlink into a system tree, with or without a new tail.
        let link = base.join("to-etc");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        for p in [link.clone(), link.join("new-repo")] {
            let e = repository_dir(p.to_str().unwrap()).unwrap_err();
            assert!(matches!(e, DaemonError::BadRequest(_)), "{p:?}: {e}");
        }
        assert!(!Path::new("/etc/new-repo").exists());
        // A symlink to an ordinary directory resolves to it.
        let link = base.join("to-a");
        std::os::unix::fs::symlink(base.join("a"), &link).unwrap();
        assert_eq!(
            repository_dir(link.to_str().unwrap()).unwrap(),
            base.join("a")
        );
    }

    #[test]
    fn accepts_ordinary_names() {
        for n in ["vm1", "db-server_01", "Prod.VM-7", "a"] {
            assert!(validate("vm_name", n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_traversal_and_separators() {
        for n in [
            "",
            "..",
            ".",
            "../etc",
            "a/b",
            "a\\b",
            ".hidden",
            "vm\0",
            "vm name",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate("vm_name", n).is_err(), "{n:?}");
        }
    }
}
