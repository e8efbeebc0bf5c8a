//! Request and response bodies of the API (the contract with the SNA and
//! the GUI), plus the catalog's records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One disk of a VM, as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Disk index within the VM (0, 1, ...).
    pub disk_id: u32,
    /// Virtual size in bytes.
    #[schema(minimum = 512, maximum = 2251799813685248_u64, multiple_of = 512)]
    pub size_bytes: u64,
    /// SCSI unit number on its controller.
    #[serde(default)]
    pub unit_number: u32,
    /// VMware device key; defaults to 2000 + unit_number.
    #[serde(default)]
    pub disk_key: Option<u32>,
    /// Human label ("Hard disk 1").
    #[serde(default)]
    #[schema(max_length = 256)]
    pub label: String,
}

/// `PUT /api/v1/vms/{vm_name}` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    /// VMware context id.
    #[schema(max_length = 256)]
    pub vm_context_id: String,
    /// Every disk of the VM.
    #[schema(max_items = 256)]
    pub disks: Vec<DiskSpec>,
    /// Backup appliance (SNA) that sends this VM's disks, `http://host:port`
    /// (overrides the hub's `--sna-url`; absent: the hub's default, if any).
    #[serde(default)]
    #[schema(pattern = "^http://[^@?#]+$", max_length = 1024)]
    pub sna_url: Option<String>,
}

/// A registered VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Vm {
    /// Name.
    pub vm_name: String,
    /// VMware context id.
    pub vm_context_id: String,
    /// Disks, by disk_id, disk_key resolved.
    pub disks: Vec<DiskSpec>,
    /// The VM's own backup appliance, if registered with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sna_url: Option<String>,
    /// Last registration (RFC 3339).
    pub updated_at: String,
}

/// A repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// Identifier.
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub id: String,
    /// Absolute directory (under a configured repository root; created
    /// if missing).
    pub path: String,
    /// The node (hub) holding its files: the one it was created through.
    /// Set by the hub; requests use [`RepositoryBody`], which has no such
    /// field.
    #[serde(default)]
    pub node_id: String,
    /// On storage every node of the fleet mounts at `path` (NFS, CephFS…):
    /// backups are placed on any node, each VM's chain managed by one
    /// node at a time. Otherwise the files are on `node_id` only.
    #[serde(default)]
    pub shared: bool,
    /// Its object-storage tier, if any (never the credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3View>,
}

/// Body of `POST /api/v1/repositories`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepositoryBody {
    /// Identifier.
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub id: String,
    /// Absolute directory (under a configured repository root; created
    /// if missing).
    pub path: String,
    /// The directory is on storage every node of the fleet mounts at the
    /// same path: backups go to the least-loaded node (a VM's chain stays
    /// on one node while it is alive). The hub writes `.hub-repository`
    /// there; a node that cannot read it (storage not mounted) is refused.
    #[serde(default)]
    pub shared: bool,
    /// An S3 bucket restore points can be offloaded to.
    #[serde(default)]
    pub s3: Option<S3Body>,
}

/// A repository's S3 tier as given. Credentials may be left out: the hub
/// then takes `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` from its
/// environment. They are stored in the catalog and never returned.
#[derive(Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Body {
    /// Endpoint URL, `https://…` (or `http://…`).
    #[schema(max_length = 2048)]
    pub endpoint: String,
    /// Bucket (S3 naming rules: 3-63 of `a-z 0-9 . -`).
    #[schema(pattern = "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    pub bucket: String,
    /// Region (the signing scope; any value a local server accepts).
    #[schema(max_length = 64)]
    pub region: String,
    /// Access key id (with `secret_access_key`, or neither).
    #[serde(default)]
    #[schema(max_length = 256)]
    pub access_key_id: Option<String>,
    /// Secret access key.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub secret_access_key: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as most local servers
    /// need; default virtual-hosted (`bucket.endpoint/key`).
    #[serde(default)]
    pub path_style: bool,
}

// Written by hand so that the secret never reaches a log.
impl std::fmt::Debug for S3Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Body")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// A repository's S3 tier as shown: no credentials, only where they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct S3View {
    /// Endpoint URL.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Region.
    pub region: String,
    /// Path-style requests.
    pub path_style: bool,
    /// `set` (stored with the repository) or `environment`.
    pub credentials: String,
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Every disk fresh.
    Full,
    /// Each disk an overlay on its latest completed backup (when possible).
    Incremental,
}

impl BackupType {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
        }
    }

    /// Parse the lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(BackupType::Full),
            "incremental" => Some(BackupType::Incremental),
            _ => None,
        }
    }
}

/// `POST /api/v1/backups` body: always the whole VM, never one disk.
// Serialize: a hub forwards it to the node owning the repository.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// VM to back up.
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub vm_name: String,
    /// Full or incremental.
    pub backup_type: BackupType,
    /// Repository to write into.
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub repository_id: String,
    /// Optional policy reference.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub policy_id: Option<String>,
    /// Optional tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Per-disk part of a backup or restore response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct DiskResult {
    /// Disk index.
    pub disk_id: u32,
    /// VMware device key.
    pub disk_key: u32,
    /// Port of this disk's own NBD listener.
    pub nbd_port: u16,
    /// Export name (also reachable on the shared port).
    pub nbd_export_name: String,
    /// `nbd://host:port/export`.
    pub nbd_uri: String,
    /// Image file (final name once completed).
    pub qcow2_path: String,
    /// "exporting", "completed", "failed", "serving".
    pub status: String,
    /// "full" or "incremental" (an incremental request may give full for a
    /// disk without a usable parent).
    pub backup_mode: String,
    /// Parent backup of an incremental disk.
    pub parent_backup_id: Option<String>,
    /// Why an incremental request backs this disk up in full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_reason: Option<String>,
}

/// `POST /api/v1/backups` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackupStarted {
    /// Backup id.
    pub backup_id: String,
    /// VM.
    pub vm_name: String,
    /// The node running it (its repository's): the one its NBD targets
    /// are on, and the one to report to.
    pub node_id: String,
    /// Per disk, in disk order.
    pub disk_results: Vec<DiskResult>,
    /// `disk_key:nbd://host:port/export,...` in disk order, for the SNA.
    pub nbd_targets_string: String,
    /// Requested type.
    pub backup_type: BackupType,
    /// "started".
    pub status: String,
    /// RFC 3339.
    pub created_at: String,
    /// Port serving every export by name (one tunnel for the whole VM).
    pub nbd_shared_port: Option<u16>,
    /// The appliance's job id, when an appliance accepted the backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appliance_job_id: Option<String>,
}

/// `POST /api/v1/backups/{id}/complete` body.
/// Unknown fields are ignored (the appliance contract, `sna_contract`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CompleteRequest {
    /// Per-disk change ids reported by the SNA.
    #[serde(default)]
    pub disks: Vec<DiskChange>,
}

/// What the sender reports for one disk at `complete`.
/// Unknown fields are ignored (the appliance contract, `sna_contract`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DiskChange {
    /// Disk index.
    pub disk_id: u32,
    /// VMware CBT change id.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub change_id: Option<String>,
    /// The sender's `blake3-tree-v1` digest of the disk as it read it (64
    /// hex digits); a mismatch fails the backup.
    #[serde(default)]
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub digest: Option<String>,
}

/// `POST /api/v1/backups/{id}/abort` body.
/// Unknown fields are ignored (the appliance contract, `sna_contract`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct AbortRequest {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One disk of a backup as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BackupDisk {
    /// Disk index.
    pub disk_id: u32,
    /// VMware device key.
    pub disk_key: u32,
    /// Virtual size.
    pub size_bytes: u64,
    /// "full" / "incremental".
    pub backup_mode: String,
    /// Parent backup.
    pub parent_backup_id: Option<String>,
    /// Image path relative to the repository.
    pub file: String,
    /// Export name while running.
    pub nbd_export_name: String,
    /// Port while running.
    pub nbd_port: Option<u16>,
    /// Payload bytes received.
    pub bytes_written: u64,
    /// Image file size once completed (after a merge: the merged file's).
    pub image_bytes: Option<u64>,
    /// The image is a synthetic full: the hub flattened the restore point's
    /// chain into it (`max_chain_length`, or a prune that removed every
    /// ancestor). It reads exactly as the restore point always did.
    pub synthetic: bool,
    /// Where the image lives: `local` (the repository only), `local+s3`
    /// (also offloaded to the repository's object store) or `s3` (the
    /// local copy was evicted; a restore, merge or verify re-hydrates it).
    pub location: String,
    /// Bytes deleting this restore point (through prune) would give back
    /// on this disk, once completed. Exact when nothing builds on it: its
    /// image. When restore points build on it, deleting it merges it into
    /// them, and they keep whatever of it they do not overwrite, which
    /// only reading both images' allocation could tell: then it is the
    /// figure that is certain, 0 (see docs/retention.md).
    pub freed_bytes_if_deleted: Option<u64>,
    /// CBT change id.
    pub change_id: Option<String>,
    /// Image format ("qcow2").
    pub format: String,
    /// Why an incremental request backed this disk up in full.
    pub mode_reason: Option<String>,
    /// WRITE / WRITE_ZEROES / TRIM / FLUSH requests answered with an error
    /// (live while running). Any makes `complete` fail.
    pub write_errors: u64,
    /// The last such error.
    pub last_error: Option<String>,
    /// Digest algorithm of `digest`.
    pub digest_algorithm: Option<String>,
    /// Root digest of the disk at this restore point (hex).
    pub digest: Option<String>,
    /// Last verification of this disk: "ok" or "corrupt".
    pub verify_status: Option<String>,
    /// Details of the last verification (bad ranges and who shares them).
    #[schema(value_type = Option<Object>)]
    pub verify: Option<serde_json::Value>,
    /// Live: clients connected now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Live: last client request (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<String>,
    /// Live: the sender's latest progress report for this disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// A sender's progress on one disk (`POST /api/v1/backups/{id}/progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Progress {
    /// Bytes handled so far.
    pub bytes_done: u64,
    /// Bytes to handle in total.
    pub bytes_total: u64,
}

/// A backup as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BackupRecord {
    /// Id.
    pub backup_id: String,
    /// VM.
    pub vm_name: String,
    /// Repository.
    pub repository_id: String,
    /// The node (hub) the backup runs or ran on: its repository's.
    pub node_id: String,
    /// Requested type.
    pub backup_type: String,
    /// Policy.
    pub policy_id: Option<String>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// "running", "completed", "failed".
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub completed_at: Option<String>,
    /// Startup reconciliation found an image of this completed backup missing.
    pub files_missing: bool,
    /// "verifying", "ok" or "corrupt" (worst disk), once verified.
    pub verify_status: Option<String>,
    /// When the last verification finished (RFC 3339).
    pub verified_at: Option<String>,
    /// Bytes of its images, all disks (completed: the files' sizes).
    pub image_bytes: u64,
    /// Bytes deleting it would give back, all disks (see
    /// [`BackupDisk::freed_bytes_if_deleted`]); once completed.
    pub freed_bytes_if_deleted: Option<u64>,
    /// Disks.
    pub disks: Vec<BackupDisk>,
}

/// `POST /api/v1/backups/{id}/restore` body (optional).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Instant restore: serve the restore point writable through a
    /// throw-away overlay per disk (a hypervisor can boot the VM from it);
    /// the restore point itself is never written, and the overlays are
    /// deleted when the restore stops.
    #[serde(default)]
    pub writable: bool,
}

/// Restore exports of one backup.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RestoreStarted {
    /// Backup served.
    pub backup_id: String,
    /// Whether the exports take writes (into throw-away overlays).
    pub writable: bool,
    /// Per disk.
    pub disk_results: Vec<DiskResult>,
    /// Targets for a restore client.
    pub nbd_targets_string: String,
}
