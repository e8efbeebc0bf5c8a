//! Validation of names that come from requests and end up in file paths,
//! export names or SQL rows.
//!
//! Allowed: ASCII letters, digits, `.`, `_`, `-`; 1..=128 bytes; not
//! starting with `.` (no hidden files, no `.`/`..`). That keeps every name
//! a single safe path component and a valid NBD export name.
//!
//! Repository paths (whole absolute directories chosen by the client) have
//! their own check, [`repository_dir`], which confines them under the
//! configured roots and also creates the directory.

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

/// Validate a repository path ([`repository_path`]) and confine it: it
/// must lie strictly under one of `roots` (given as configured or
/// canonical), and no component below the root may be a symlink (each is
/// checked, and missing ones are created, without following links; see
/// [`crate::confined`]). Returns the canonical path, created.
///
/// Client mistakes are [`DaemonError::BadRequest`]: a bad path, one outside
/// every root, a symlink or a non-directory in the way, a directory that
/// cannot be created there (EACCES, EROFS, ...). A full disk is
/// [`DaemonError::NoSpace`].
pub fn repository_dir(path: &str, roots: &[PathBuf]) -> Result<PathBuf, DaemonError> {
    let bad = DaemonError::BadRequest;
    let path = repository_path(path).map_err(bad)?;
    // (root as configured, normalized; canonical root)
    let roots: Vec<(PathBuf, PathBuf)> = roots
        .iter()
        .filter_map(|r| {
            let canonical = r.canonicalize().ok()?;
            let given = r
                .to_str()
                .and_then(|s| repository_path(s).ok())
                .unwrap_or_else(|| canonical.clone());
            Some((given, canonical))
        })
        .collect();
    let found = roots.iter().find_map(|(given, canonical)| {
        [canonical, given].into_iter().find_map(|r| {
            path.strip_prefix(r)
                .ok()
                .filter(|rest| !rest.as_os_str().is_empty())
                .map(|rest| (canonical.clone(), rest.to_path_buf()))
        })
    });
    let Some((root, rest)) = found else {
        let list: Vec<String> = roots.iter().map(|r| r.1.display().to_string()).collect();
        return Err(bad(format!(
            "{} is not under a repository root ({})",
            path.display(),
            list.join(", ")
        )));
    };
    let target = root.join(&rest);
    check_not_system(&target).map_err(bad)?;
    if target.as_os_str().len() > MAX_PATH_LEN {
        return Err(bad(format!(
            "resolved path longer than {MAX_PATH_LEN} bytes"
        )));
    }
    // Every existing component below the root: a plain directory.
    let mut cur = root.clone();
    for c in rest.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(bad(format!("{} is a symlink", cur.display())))
            }
            Ok(m) if !m.is_dir() => {
                return Err(bad(format!(
                    "{} exists and is not a directory",
                    cur.display()
                )))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Created (and re-checked) without following links, so a link swapped
    // in meanwhile is refused too.
    crate::confined::open_dir(&root, &rest, true).map_err(|e| {
        if crate::confined::is_link_refusal(&e) {
            bad(format!(
                "{}: a symlink or non-directory is in the way",
                target.display()
            ))
        } else if is_client_path_error(&e) {
            bad(format!(
                "cannot create repository directory {}: {e}",
                target.display()
            ))
        } else {
            DaemonError::io(format!("creating {}", target.display()), e)
        }
    })?;
    Ok(target)
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
    fn repository_dirs_are_created_under_roots_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let roots = [base.join("root")];
        std::fs::create_dir(&roots[0]).unwrap();
        let root = &roots[0];
        // Created, nested, and idempotent.
        let want = root.join("a/b");
        let got = repository_dir(want.to_str().unwrap(), &roots).unwrap();
        assert_eq!(got, want);
        assert!(want.is_dir());
        assert_eq!(
            repository_dir(want.to_str().unwrap(), &roots).unwrap(),
            want
        );
        // Outside every root, or the root itself.
        let outside = base.join("elsewhere");
        for p in [outside.clone(), root.clone(), base.clone()] {
            let e = repository_dir(p.to_str().unwrap(), &roots).unwrap_err();
            assert!(matches!(e, DaemonError::BadRequest(_)), "{p:?}: {e}");
        }
        assert!(!outside.exists());
        // A file, or a file in the way.
        let file = root.join("file");
        std::fs::write(&file, b"x").unwrap();
        for p in [file.clone(), file.join("sub")] {
            let e = repository_dir(p.to_str().unwrap(), &roots).unwrap_err();
            assert!(matches!(e, DaemonError::BadRequest(_)), "{p:?}: {e}");
        }
        // Symlinks below the root: refused, wherever they point.
        std::os::unix::fs::symlink("/etc", root.join("to-etc")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("to-a")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("to-out")).unwrap();
        for l in ["to-etc", "to-a", "to-out"] {
            for p in [root.join(l), root.join(l).join("new-repo")] {
                let e = repository_dir(p.to_str().unwrap(), &roots).unwrap_err();
                assert!(matches!(e, DaemonError::BadRequest(_)), "{p:?}: {e}");
            }
        }
        assert!(!Path::new("/etc/new-repo").exists());
        assert!(!outside.exists());
        // A root given through a symlink is accepted in either form.
        std::os::unix::fs::symlink(root, base.join("root-link")).unwrap();
        let via = [base.join("root-link")];
        let got = repository_dir(base.join("root-link/c").to_str().unwrap(), &via).unwrap();
        assert_eq!(got, root.join("c"));
        let got = repository_dir(root.join("d").to_str().unwrap(), &via).unwrap();
        assert_eq!(got, root.join("d"));
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
