//! What the catalog knows about space: bytes held by restore points, and
//! the history a start uses to estimate what a new backup will take.

use super::db::{params, Sql};
use super::Catalog;
use crate::error::Result;
use crate::model::BackupDisk;

/// What deleting completed backup `id` would give back on disk `d` (the
/// estimate [`BackupDisk::freed_bytes_if_deleted`] documents): its image
/// if no running or completed backup builds on it there, else 0.
pub(super) fn freed_if_deleted(c: &mut impl Sql, id: &str, d: &BackupDisk) -> Result<u64> {
    let dependents: i64 = c
        .query_one(
            "SELECT count(*) FROM backup_disks d JOIN backups b ON b.id = d.backup_id
             WHERE d.parent_backup_id = ?1 AND d.disk_id = ?2 AND b.status IN ('running', 'completed')",
            params![id, d.disk_id],
        )?
        .get(0)?;
    Ok(if dependents == 0 {
        d.image_bytes.unwrap_or(0)
    } else {
        0
    })
}

/// Past image sizes of one disk, newest first per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskHistory {
    /// Image bytes of the newest completed full of the disk.
    pub last_full: Option<u64>,
    /// Image bytes of the newest completed incremental of the disk.
    pub last_incremental: Option<u64>,
}

impl Catalog {
    /// Bytes of every completed restore point's images in a repository.
    pub async fn repository_backup_bytes(&self, repo: &str) -> Result<u64> {
        let repo = repo.to_owned();
        self.with(move |c| {
            // CAST: PostgreSQL's SUM of BIGINT is NUMERIC.
            let n: Option<i64> = c
                .query_one(
                    "SELECT CAST(SUM(d.image_bytes) AS BIGINT) FROM backups b JOIN backup_disks d ON d.backup_id = b.id
                     WHERE b.repository_id = ?1 AND b.status = 'completed'",
                    params![repo],
                )?
                .get(0)?;
            Ok(n.map_or(0, |v| v.max(0) as u64))
        })
        .await
    }

    /// Newest full and incremental image sizes of one disk.
    pub async fn disk_history(&self, vm: &str, repo: &str, disk_id: u32) -> Result<DiskHistory> {
        let (vm, repo) = (vm.to_owned(), repo.to_owned());
        self.with(move |c| {
            let mut newest = |mode: &str| -> Result<Option<u64>> {
                let v: Option<Option<i64>> = c
                    .query_opt(
                        "SELECT d.image_bytes FROM backups b JOIN backup_disks d ON d.backup_id = b.id
                         WHERE b.vm_name = ?1 AND b.repository_id = ?2 AND b.status = 'completed'
                           AND d.disk_id = ?3 AND d.backup_mode = ?4
                         ORDER BY b.completed_ms DESC LIMIT 1",
                        params![vm, repo, disk_id, mode],
                    )?
                    .map(|r| r.get(0))
                    .transpose()?;
                Ok(v.flatten().map(|b| b.max(0) as u64))
            };
            Ok(DiskHistory {
                last_full: newest("full")?,
                last_incremental: newest("incremental")?,
            })
        })
        .await
    }
}
