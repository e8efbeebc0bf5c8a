//! The object-storage tier in the catalog: a repository's S3 settings,
//! where each layer (one disk image of one restore point) lives, and the
//! object an offloaded layer became.
//!
//! A layer's `location` is `local` (only the repository file), `local+s3`
//! (both; the object is recorded in `layer_objects`) or `s3` (the local
//! file was evicted; a reader re-hydrates it first). The digest sidecar
//! always stays local. Whatever drops a `layer_objects` row queues its
//! object's deletion in the same transaction (`object_deletions`).
//! Portable SQL only (SQLite and PostgreSQL).

use super::db::{params, Sql};
use super::Catalog;
use crate::error::{DaemonError, Result};

/// A repository's S3 bucket as stored. The secret never leaves the hub
/// through the API (see `model::S3View`).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint URL (`https://…`, or `http://…` for a local test server).
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Region (signing scope).
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), as local servers need.
    pub path_style: bool,
    /// Access key id; `None`: from the config or environment.
    pub access_key_id: Option<String>,
    /// Secret access key; `None`: from the config or environment.
    pub secret_access_key: Option<String>,
}

// Written by hand so that no `{:?}` of the settings can print the secret.
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id.as_ref().map(|_| "set"))
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "set"),
            )
            .finish()
    }
}

/// The object an offloaded layer became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerObject {
    /// Backup.
    pub backup_id: String,
    /// Disk.
    pub disk_id: u32,
    /// Object key in the repository's bucket.
    pub object_key: String,
    /// Bytes of the image file (and of the object).
    pub size_bytes: u64,
    /// SHA-256 of the image file's bytes (hex).
    pub sha256: String,
    /// The object version the upload made, where the bucket versions.
    pub version_id: Option<String>,
    /// Object Lock retention end (unix ms), if one was set.
    pub retain_until_ms: Option<i64>,
    /// When the upload finished (unix ms).
    pub uploaded_ms: i64,
}

/// One layer the scheduled tier pass may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierCandidate {
    /// Backup.
    pub backup_id: String,
    /// Disk.
    pub disk_id: u32,
    /// `local`, `local+s3` or `s3`.
    pub location: String,
    /// Completion time (unix ms).
    pub completed_ms: i64,
    /// The policy's `offload_after_days` (0 = off).
    pub offload_after_days: u32,
    /// The policy's `evict_local_after_days` (0 = off).
    pub evict_local_after_days: u32,
}

impl Catalog {
    /// Set (or with `None` remove) the S3 tier of a repository.
    pub async fn set_repository_s3(&self, repo_id: &str, s3: Option<S3Settings>) -> Result<()> {
        let repo_id = repo_id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "DELETE FROM repository_s3 WHERE repository_id = ?1",
                params![repo_id],
            )?;
            if let Some(s) = s3 {
                tx.execute(
                    "INSERT INTO repository_s3 (repository_id, endpoint, bucket, region, path_style, access_key_id, secret_access_key)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        repo_id,
                        s.endpoint,
                        s.bucket,
                        s.region,
                        s.path_style,
                        s.access_key_id,
                        s.secret_access_key
                    ],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The S3 tier of a repository, if it has one.
    pub async fn repository_s3(&self, repo_id: &str) -> Result<Option<S3Settings>> {
        let repo_id = repo_id.to_owned();
        self.with(move |c| {
            let row = c.query_opt(
                "SELECT endpoint, bucket, region, path_style, access_key_id, secret_access_key
                 FROM repository_s3 WHERE repository_id = ?1",
                params![repo_id],
            )?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(S3Settings {
                endpoint: r.get(0)?,
                bucket: r.get(1)?,
                region: r.get(2)?,
                path_style: r.get(3)?,
                access_key_id: r.get(4)?,
                secret_access_key: r.get(5)?,
            }))
        })
        .await
    }

    /// The object layer (`backup_id`, `disk_id`) was offloaded to.
    pub async fn layer_object(&self, backup_id: &str, disk_id: u32) -> Result<Option<LayerObject>> {
        let backup_id = backup_id.to_owned();
        self.with(move |c| {
            let row = c.query_opt(
                "SELECT object_key, size_bytes, sha256, version_id, retain_until_ms, uploaded_ms
                 FROM layer_objects WHERE backup_id = ?1 AND disk_id = ?2",
                params![backup_id, disk_id],
            )?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(LayerObject {
                backup_id,
                disk_id,
                object_key: r.get(0)?,
                size_bytes: r.get(1)?,
                sha256: r.get(2)?,
                version_id: r.get(3)?,
                retain_until_ms: r.get(4)?,
                uploaded_ms: r.get(5)?,
            }))
        })
        .await
    }

    /// Record an upload and mark the layer `local+s3`, in one transaction;
    /// `Conflict` if the layer is gone or its location is no longer
    /// `local` (a concurrent offload, or a merge rewrote it).
    pub async fn record_offload(&self, o: LayerObject) -> Result<()> {
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE backup_disks SET location = 'local+s3'
                 WHERE backup_id = ?1 AND disk_id = ?2 AND location = 'local'",
                params![o.backup_id, o.disk_id],
            )?;
            if n != 1 {
                return Err(DaemonError::Conflict(format!(
                    "disk {} of backup {:?} is no longer local only",
                    o.disk_id, o.backup_id
                )));
            }
            // A record left from before is stale (the layer was local
            // only): its object is owed a deletion, not forgotten.
            Catalog::queue_object_deletions(&mut tx, &o.backup_id, Some(o.disk_id), o.uploaded_ms)?;
            tx.execute(
                "DELETE FROM layer_objects WHERE backup_id = ?1 AND disk_id = ?2",
                params![o.backup_id, o.disk_id],
            )?;
            tx.execute(
                "INSERT INTO layer_objects (backup_id, disk_id, object_key, size_bytes, sha256, version_id, retain_until_ms, uploaded_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    o.backup_id,
                    o.disk_id,
                    o.object_key,
                    o.size_bytes as i64,
                    o.sha256,
                    o.version_id,
                    o.retain_until_ms,
                    o.uploaded_ms
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Move a layer from location `from` to `to`; false if it was not at
    /// `from` (someone else moved it first).
    pub async fn set_location(
        &self,
        backup_id: &str,
        disk_id: u32,
        from: &'static str,
        to: &'static str,
    ) -> Result<bool> {
        let backup_id = backup_id.to_owned();
        self.with(move |c| {
            let n = c.execute(
                "UPDATE backup_disks SET location = ?4
                 WHERE backup_id = ?1 AND disk_id = ?2 AND location = ?3",
                params![backup_id, disk_id, from, to],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Completed layers whose policy offloads or evicts, oldest first;
    /// only this node's (their files are here).
    pub async fn tier_candidates(&self) -> Result<Vec<TierCandidate>> {
        let node = self.node.to_string();
        self.with(move |c| {
            let rows = c.query(
                &format!("SELECT d.backup_id, d.disk_id, d.location, b.completed_ms, p.offload_after_days, p.evict_local_after_days
                 FROM backup_disks d JOIN backups b ON b.id = d.backup_id JOIN policies p ON p.id = b.policy_id
                 WHERE b.status = 'completed' AND b.completed_ms IS NOT NULL
                   AND (p.offload_after_days > 0 OR p.evict_local_after_days > 0)
                   AND {}
                 ORDER BY b.completed_ms, d.backup_id, d.disk_id", super::nodes::managed_by("b", 1)),
                params![node],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(TierCandidate {
                        backup_id: r.get(0)?,
                        disk_id: r.get(1)?,
                        location: r.get(2)?,
                        completed_ms: r.get(3)?,
                        offload_after_days: r.get(4)?,
                        evict_local_after_days: r.get(5)?,
                    })
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DiskCompletion, NewBackup, NewBackupDisk};
    use crate::model::Repository;

    async fn catalog_with_backup(dir: &std::path::Path) -> Catalog {
        let cat = Catalog::open(&dir.join("c.sqlite")).unwrap();
        cat.ensure_repository(Repository {
            shared: false,
            id: "r".into(),
            path: dir.display().to_string(),
            s3: None,
            node_id: crate::catalog::LOCAL.into(),
        })
        .await
        .unwrap();
        cat.insert_running(NewBackup {
            id: "b1".into(),
            vm_name: "vm".into(),
            repository_id: "r".into(),
            backup_type: "full".into(),
            policy_id: None,
            tags: Default::default(),
            created_ms: 1,
            disks: vec![NewBackupDisk {
                disk_id: 0,
                disk_key: 2000,
                size_bytes: 1 << 20,
                backup_mode: "full".into(),
                parent_backup_id: None,
                mode_reason: None,
                file: "vm/disk0/b1.qcow2".into(),
                export_name: "e".into(),
                nbd_port: None,
            }],
        })
        .await
        .unwrap();
        cat.complete(
            "b1",
            vec![DiskCompletion {
                disk_id: 0,
                bytes_written: 1,
                image_bytes: 100,
                change_id: None,
                digest: "00".repeat(32),
            }],
        )
        .await
        .unwrap();
        cat
    }

    fn object() -> LayerObject {
        LayerObject {
            backup_id: "b1".into(),
            disk_id: 0,
            object_key: "r/vm/disk0/b1.qcow2".into(),
            size_bytes: 100,
            sha256: "ab".repeat(32),
            version_id: Some("v1".into()),
            retain_until_ms: Some(5),
            uploaded_ms: 4,
        }
    }

    #[tokio::test]
    async fn settings_round_trip_and_never_print_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with_backup(dir.path()).await;
        assert_eq!(cat.repository_s3("r").await.unwrap(), None);
        let s = S3Settings {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            region: "x".into(),
            path_style: true,
            access_key_id: Some("AKIDSECRETISH".into()),
            secret_access_key: Some("very-secret".into()),
        };
        assert!(!format!("{s:?}").contains("very-secret"));
        assert!(!format!("{s:?}").contains("AKIDSECRETISH"));
        cat.set_repository_s3("r", Some(s.clone())).await.unwrap();
        assert_eq!(cat.repository_s3("r").await.unwrap(), Some(s));
        cat.set_repository_s3("r", None).await.unwrap();
        assert_eq!(cat.repository_s3("r").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_layer_moves_local_to_s3_and_back_only_from_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with_backup(dir.path()).await;
        let loc = |c: &Catalog| {
            let c = c.clone();
            async move {
                c.backup("b1").await.unwrap().unwrap().disks[0]
                    .location
                    .clone()
            }
        };
        assert_eq!(loc(&cat).await, "local");
        // Evicting what was never offloaded does nothing.
        assert!(!cat.set_location("b1", 0, "local+s3", "s3").await.unwrap());
        cat.record_offload(object()).await.unwrap();
        assert_eq!(loc(&cat).await, "local+s3");
        assert_eq!(cat.layer_object("b1", 0).await.unwrap(), Some(object()));
        // A second offload of the same layer is a conflict, not a duplicate.
        assert!(matches!(
            cat.record_offload(object()).await,
            Err(DaemonError::Conflict(_))
        ));
        assert!(cat.set_location("b1", 0, "local+s3", "s3").await.unwrap());
        assert_eq!(loc(&cat).await, "s3");
        assert!(cat.set_location("b1", 0, "s3", "local+s3").await.unwrap());
        assert_eq!(loc(&cat).await, "local+s3");
        // Deleting the backup takes its object records along.
        cat.delete_backup("b1").await.unwrap();
        assert_eq!(cat.layer_object("b1", 0).await.unwrap(), None);
    }
}
