//! A small tmpfs for full-filesystem tests: mounted on a new directory,
//! unmounted (lazily) when dropped.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A mounted tmpfs.
pub struct Tmpfs {
    /// The mount point.
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (mount's syntax: `2m`, `24m`) on `dir`.
    /// `None`, and the test skips, where this process may not mount (not
    /// root); CI (`NBD_INTEROP_REQUIRED=1`) requires it.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("NBD_INTEROP_REQUIRED").as_deref() != Ok("1"),
                "cannot mount a tmpfs (needs root); required in CI"
            );
            eprintln!("SKIP: cannot mount a tmpfs (needs CAP_SYS_ADMIN)");
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// Fill the file system until ENOSPC; the filler's path.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 4096];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
                return path;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: an I/O thread may still be closing a removed image.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}
