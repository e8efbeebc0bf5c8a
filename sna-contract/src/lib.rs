//! The hand-off contract between the backup hub and a backup appliance
//! (the "SNA"), version 1. One definition of every body, shared by the hub
//! (`hub-daemon`) and the reference appliance (`hub-agent`); the prose and
//! JSON examples for vendors are in `docs/sna-contract.md`.
//!
//! ```text
//!  client ── POST /api/v1/backups ──▶ hub
//!                                      │ plan disks, parents, change ids
//!                                      ├── POST {sna}/v1/backups/prepare ──▶ appliance
//!                                      │◀── per disk: full | incremental ───┘
//!                                      │ create images of that kind, bring up exports
//!                                      ├── POST {sna}/v1/backups/start ────▶ appliance
//!                                      │◀── 202 accepted ───────────────────┘
//!  client ◀── 201 BackupStarted ───────┘
//!                  appliance ── NBD writes to every target ──▶ hub
//!                  appliance ── POST /api/v1/backups/{id}/progress ──▶ hub (optional)
//!                  appliance ── POST /api/v1/backups/{id}/complete ──▶ hub
//!                          (or) POST /api/v1/backups/{id}/abort
//! ```
//!
//! Unknown fields are ignored in every body (forward compatibility within
//! v1); a field's absence means its default.

use serde::{Deserialize, Serialize};

/// Value of `contract` in every hub → appliance request.
pub const CONTRACT: &str = "nbd-backup-hub/sna/v1";

/// Path of the prepare call, relative to the appliance URL.
pub const PREPARE_PATH: &str = "/v1/backups/prepare";
/// Path of the start call, relative to the appliance URL.
pub const START_PATH: &str = "/v1/backups/start";
/// Path of the cancel call (`{backup_id}` replaced), relative to the
/// appliance URL. Best effort: the hub sends it when a backup it started
/// fails or is aborted on the hub side, and ignores the answer.
pub const CANCEL_PATH: &str = "/v1/backups/{backup_id}/cancel";

/// Full or incremental, per backup and per disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every allocated block of the disk.
    Full,
    /// Only what changed since the parent's change id.
    Incremental,
}

/// One disk in a prepare request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareDisk {
    /// Disk index within the VM (0, 1, ...).
    pub disk_id: u32,
    /// VMware device key (2000 + unit number): the key of the targets string.
    pub disk_key: u32,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// What the hub can take for this disk: `incremental` only when it has
    /// a valid parent restore point with a recorded change id.
    pub mode: Mode,
    /// Change id the appliance reported when the parent restore point was
    /// completed (present exactly when `mode` is incremental).
    #[serde(default)]
    pub parent_change_id: Option<String>,
    /// Why the hub can only take a full (lineage lost, no parent, ...).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST {sna_url}/v1/backups/prepare`: "will you send these disks, and how?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// Always [`CONTRACT`].
    pub contract: String,
    /// The hub's backup id (readable; not a secret).
    pub backup_id: String,
    /// VM name as registered at the hub.
    pub vm_name: String,
    /// VMware context id of the VM.
    pub vm_context_id: String,
    /// What the client asked for.
    pub backup_type: Mode,
    /// Every disk of the VM, in disk order.
    pub disks: Vec<PrepareDisk>,
}

/// The appliance's answer for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDisk {
    /// Disk key, as in the request.
    pub disk_key: u32,
    /// What it will send. `full` where the hub offered incremental is
    /// always allowed (e.g. change tracking was reset); `incremental` where
    /// the hub offered `full` is a contract violation (the hub answers its
    /// client 502 and releases everything).
    pub mode: Mode,
    /// Why it sends a full where an incremental was offered.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Response to prepare (HTTP 200). Must name every disk of the request
/// exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareResponse {
    /// Per disk.
    pub disks: Vec<PreparedDisk>,
}

/// One disk's target in a start request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTarget {
    /// Disk index.
    pub disk_id: u32,
    /// Disk key.
    pub disk_key: u32,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// What to send (the mode agreed at prepare).
    pub mode: Mode,
    /// Base change id for an incremental.
    #[serde(default)]
    pub parent_change_id: Option<String>,
    /// `nbd://host:port/export` or `nbds://…` with TLS. The export name is a
    /// capability: keep it out of logs.
    pub nbd_uri: String,
}

/// Where and how the appliance reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    /// Base URL of this backup at the hub, e.g.
    /// `http://10.0.0.5:8080/api/v1/backups/backup-vm1-…`; the appliance
    /// POSTs to `{url}/progress`, `{url}/complete` and `{url}/abort`.
    pub url: String,
    /// Bearer token valid only for this backup's callbacks (and GET of
    /// it), only while it runs.
    pub token: String,
}

/// `POST {sna_url}/v1/backups/start`: "take the snapshot and stream".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// Always [`CONTRACT`].
    pub contract: String,
    /// Backup id.
    pub backup_id: String,
    /// VM name.
    pub vm_name: String,
    /// VMware context id.
    pub vm_context_id: String,
    /// What the client asked for.
    pub backup_type: Mode,
    /// `disk_key:uri,disk_key:uri,…` in disk order (the original design's
    /// string; the same data as `targets`).
    pub nbd_targets_string: String,
    /// Per disk, in disk order.
    pub targets: Vec<StartTarget>,
    /// How to report.
    pub callback: Callback,
}

/// Response to start (any 2xx means accepted; the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartResponse {
    /// The appliance's own job id, for its logs.
    #[serde(default)]
    pub job_id: Option<String>,
}

/// Error body the appliance may return with any non-2xx status; `message`
/// is passed on to the hub's client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceError {
    /// Human-readable reason.
    pub message: String,
}

/// One disk in a progress report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct DiskProgress {
    /// Disk index.
    pub disk_id: u32,
    /// Bytes of the disk handled so far (sent or skipped as unchanged/zero).
    pub bytes_done: u64,
    /// Bytes to handle in total (the virtual size).
    pub bytes_total: u64,
}

/// `POST {callback.url}/progress` (optional, any rate; the hub keeps the
/// latest per disk and shows it in `GET /api/v1/backups/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ProgressRequest {
    /// Disks with news.
    pub disks: Vec<DiskProgress>,
}

/// One disk in a complete callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedDisk {
    /// Disk index.
    pub disk_id: u32,
    /// Change id of the disk as sent (the base of the next incremental).
    /// Required for an incremental disk; without it on a full disk, the
    /// next incremental of that disk is a full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// `blake3-tree-v1` root digest of the whole disk as read (64 hex
    /// digits); a mismatch with what the hub received fails the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// `POST {callback.url}/complete` (the hub's existing complete body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteRequest {
    /// Per disk.
    pub disks: Vec<CompletedDisk>,
}

/// `POST {callback.url}/abort`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRequest {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_round_trips_and_tolerates_unknown_fields() {
        let req = PrepareRequest {
            contract: CONTRACT.into(),
            backup_id: "backup-vm1-1-0001".into(),
            vm_name: "vm1".into(),
            vm_context_id: "vm-42".into(),
            backup_type: Mode::Incremental,
            disks: vec![PrepareDisk {
                disk_id: 0,
                disk_key: 2000,
                size_bytes: 1 << 30,
                mode: Mode::Incremental,
                parent_change_id: Some("52 1a/7".into()),
                reason: None,
            }],
        };
        let mut v = serde_json::to_value(&req).unwrap();
        v["future_field"] = serde_json::json!(1);
        let back: PrepareRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
        let resp: PrepareResponse =
            serde_json::from_str(r#"{"disks":[{"disk_key":2000,"mode":"full"}]}"#).unwrap();
        assert_eq!(resp.disks[0].mode, Mode::Full);
        assert_eq!(resp.disks[0].reason, None);
    }

    #[test]
    fn bad_mode_is_an_error_not_a_default() {
        assert!(serde_json::from_str::<PreparedDisk>(r#"{"disk_key":1,"mode":"diff"}"#).is_err());
    }
}
