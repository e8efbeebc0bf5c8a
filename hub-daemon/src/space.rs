//! Filesystem space of a repository, and the up-front check that a backup
//! will fit.
//!
//! The estimate of what a backup will write comes from history, because
//! the virtual size says nothing about a thin disk: a full is expected to
//! take what the disk's last full took, an incremental what its last
//! incremental took (or a tenth of the last full). A disk with no history
//! counts as zero, so only the reserve is checked for it: refusing the
//! first backup of a 1 TiB thin disk holding 20 GiB because 1 TiB is not
//! free would be wrong far more often than right. Writes past the estimate
//! still fail cleanly at `complete` (507 at start, 422 at complete).

use std::path::Path;

use serde::Serialize;

use crate::catalog::DiskHistory;

/// A filesystem's space, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FsSpace {
    /// Total size.
    pub capacity_bytes: u64,
    /// Free for this (unprivileged) process.
    pub free_bytes: u64,
    /// In use (capacity minus free to anyone).
    pub used_bytes: u64,
}

/// Space of the filesystem holding `path`.
pub fn fs_space(path: &Path) -> std::io::Result<FsSpace> {
    let s = rustix::fs::statvfs(path)?;
    let frag = s.f_frsize.max(1);
    let capacity = s.f_blocks.saturating_mul(frag);
    let free_any = s.f_bfree.saturating_mul(frag);
    Ok(FsSpace {
        capacity_bytes: capacity,
        free_bytes: s.f_bavail.saturating_mul(frag),
        used_bytes: capacity.saturating_sub(free_any),
    })
}

/// Space to keep free beyond a backup's estimate: the configured value,
/// or by default 1 % of the filesystem, at most 1 GiB.
pub fn reserve(configured: Option<u64>, capacity: u64) -> u64 {
    configured.unwrap_or_else(|| (capacity / 100).min(1 << 30))
}

/// Expected bytes one disk's backup writes.
pub fn estimate(full: bool, h: &DiskHistory) -> u64 {
    if full {
        h.last_full.unwrap_or(0)
    } else {
        h.last_incremental
            .or(h.last_full.map(|f| f / 10))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_history_and_unknown_disks_count_zero() {
        let none = DiskHistory::default();
        assert_eq!(estimate(true, &none), 0);
        assert_eq!(estimate(false, &none), 0);
        let h = DiskHistory {
            last_full: Some(1000),
            last_incremental: None,
        };
        assert_eq!(estimate(true, &h), 1000);
        assert_eq!(estimate(false, &h), 100);
        let h = DiskHistory {
            last_full: Some(1000),
            last_incremental: Some(7),
        };
        assert_eq!(estimate(false, &h), 7);
    }

    #[test]
    fn reserve_defaults_to_one_percent_capped_at_a_gibibyte() {
        assert_eq!(reserve(None, 24 << 20), (24 << 20) / 100);
        assert_eq!(reserve(None, 10 << 40), 1 << 30);
        assert_eq!(reserve(Some(5), 10 << 40), 5);
    }

    #[test]
    fn reads_a_real_filesystem() {
        let s = fs_space(Path::new("/")).unwrap();
        assert!(s.capacity_bytes > 0 && s.free_bytes <= s.capacity_bytes);
    }
}
