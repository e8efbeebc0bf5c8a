//! `hub-daemon backup start|list|show|complete|abort|verify|rm`.

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Map, Value};

use super::http::encode;
use super::table::{field, pairs, size, size_field, Table};
use super::{key_value, ClientError, ClientOpts, Session};

/// Backups.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: BackupCommand,
}

/// `--type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Every disk in full.
    Full,
    /// Each disk on top of its latest backup (the hub falls back to full
    /// for a disk without one, and says why).
    Incremental,
}

/// `--status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Status {
    Running,
    Completed,
    Failed,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Start a backup of every disk of a VM; prints each disk's NBD
    /// target for the sender.
    Start {
        /// VM name.
        vm: String,
        /// Full or incremental.
        #[arg(long = "type", value_enum, default_value_t = Kind::Incremental)]
        kind: Kind,
        /// Repository to write into.
        #[arg(long, value_name = "ID", default_value = "default")]
        repo: String,
        /// Retention policy governing this backup.
        #[arg(long, value_name = "ID")]
        policy: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = key_value)]
        tags: Vec<(String, String)>,
    },
    /// List backups, newest first.
    List {
        /// Only this VM's.
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Only running, completed or failed ones.
        #[arg(long, value_enum)]
        status: Option<Status>,
    },
    /// Show a backup and its disks.
    Show {
        /// Backup id.
        id: String,
    },
    /// Finish a running backup once every disk is written: the images are
    /// checked and become a restore point.
    Complete {
        /// Backup id.
        id: String,
        /// A disk's VMware CBT change id, for the next incremental
        /// (repeatable).
        #[arg(long = "change-id", value_name = "DISK=ID", value_parser = disk_value)]
        change_ids: Vec<(u32, String)>,
        /// The sender's blake3-tree-v1 digest of a disk; a mismatch fails
        /// the backup (repeatable).
        #[arg(long = "digest", value_name = "DISK=HEX", value_parser = disk_value)]
        digests: Vec<(u32, String)>,
    },
    /// Abort a running backup (its images are removed).
    Abort {
        /// Backup id.
        id: String,
        /// Why (recorded as the backup's error).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Re-read every disk's image chain in the background; `show` tells
    /// the outcome.
    Verify {
        /// Backup id.
        id: String,
    },
    /// Delete a backup and its images (refused while others depend on it).
    Rm {
        /// Backup id.
        id: String,
    },
}

fn disk_value(s: &str) -> Result<(u32, String), String> {
    let (k, v) = key_value(s)?;
    let disk = k
        .parse()
        .map_err(|_| format!("{k:?} in {s:?} is not a disk id"))?;
    Ok((disk, v))
}

/// The `complete` body: one entry per disk named by any flag.
fn complete_body(change_ids: &[(u32, String)], digests: &[(u32, String)]) -> Value {
    let mut disks: std::collections::BTreeMap<u32, Map<String, Value>> = Default::default();
    for (d, c) in change_ids {
        disks
            .entry(*d)
            .or_default()
            .insert("change_id".into(), json!(c));
    }
    for (d, h) in digests {
        disks
            .entry(*d)
            .or_default()
            .insert("digest".into(), json!(h));
    }
    let disks: Vec<Value> = disks
        .into_iter()
        .map(|(d, mut o)| {
            o.insert("disk_id".into(), json!(d));
            Value::Object(o)
        })
        .collect();
    json!({ "disks": disks })
}

/// Run the command.
pub async fn run(a: BackupArgs) -> Result<(), ClientError> {
    let s = Session::new(&a.opts)?;
    let path = |id: &str, tail: &str| format!("/api/v1/backups/{}{tail}", encode(id));
    match a.cmd {
        BackupCommand::Start {
            vm,
            kind,
            repo,
            policy,
            tags,
        } => {
            let kind = match kind {
                Kind::Full => "full",
                Kind::Incremental => "incremental",
            };
            let tags: Map<String, Value> = tags.into_iter().map(|(k, v)| (k, json!(v))).collect();
            let body = json!({
                "vm_name": vm, "backup_type": kind, "repository_id": repo,
                "policy_id": policy, "tags": tags,
            });
            let raw = s.send(Method::POST, "/api/v1/backups", &body).await?;
            s.print(&raw, |v| {
                format!(
                    "backup {} of {} started ({kind}); write each disk to its target, then \
                     `hub-daemon backup complete {}`\n\n{}",
                    field(v, "backup_id"),
                    field(v, "vm_name"),
                    field(v, "backup_id"),
                    exports(v)
                )
            })
        }
        BackupCommand::List { vm, status } => {
            let mut query = Vec::new();
            if let Some(vm) = vm {
                query.push(format!("vm_name={}", encode(&vm)));
            }
            if let Some(st) = status {
                let st = match st {
                    Status::Running => "running",
                    Status::Completed => "completed",
                    Status::Failed => "failed",
                };
                query.push(format!("status={st}"));
            }
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            let raw = s.get(&format!("/api/v1/backups{q}")).await?;
            s.print(&raw, list)
        }
        BackupCommand::Show { id } => {
            let raw = s.get(&path(&id, "")).await?;
            s.print(&raw, show)
        }
        BackupCommand::Complete {
            id,
            change_ids,
            digests,
        } => {
            let raw = s
                .send(
                    Method::POST,
                    &path(&id, "/complete"),
                    &complete_body(&change_ids, &digests),
                )
                .await?;
            s.print(&raw, show)
        }
        BackupCommand::Abort { id, reason } => {
            let body = match reason {
                Some(r) => json!({ "reason": r }),
                None => json!({}),
            };
            let raw = s.send(Method::POST, &path(&id, "/abort"), &body).await?;
            s.print(&raw, show)
        }
        BackupCommand::Verify { id } => {
            let raw = s.call(Method::POST, &path(&id, "/verify")).await?;
            s.print(&raw, |v| {
                format!(
                    "verification of {id} started; `hub-daemon backup show {id}` tells the outcome\n\n{}",
                    show(v)
                )
            })
        }
        BackupCommand::Rm { id } => {
            s.call(Method::DELETE, &path(&id, "")).await?;
            s.done(&format!("backup {id} deleted"))
        }
    }
}

fn disks(v: &Value, key: &str) -> Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The per-disk NBD targets of a backup start or a restore.
pub fn exports(v: &Value) -> String {
    let mut t = Table::new(&["DISK", "KEY", "MODE", "NBD URI"]);
    for d in disks(v, "disk_results") {
        t.row(vec![
            field(&d, "disk_id"),
            field(&d, "disk_key"),
            field(&d, "backup_mode"),
            field(&d, "nbd_uri"),
        ]);
    }
    t.render()
}

/// What a backup holds: image bytes once completed, bytes received while
/// running.
fn stored(b: &Value) -> u64 {
    disks(b, "disks")
        .iter()
        .map(|d| {
            d["image_bytes"]
                .as_u64()
                .or_else(|| d["bytes_written"].as_u64())
                .unwrap_or(0)
        })
        .sum()
}

fn list(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID",
        "VM",
        "TYPE",
        "STATUS",
        "REPO",
        "CREATED",
        "COMPLETED",
        "STORED",
        "VERIFY",
    ]);
    for b in v.as_array().map_or(&[][..], Vec::as_slice) {
        t.row(vec![
            field(b, "backup_id"),
            field(b, "vm_name"),
            field(b, "backup_type"),
            field(b, "status"),
            field(b, "repository_id"),
            field(b, "created_at"),
            field(b, "completed_at"),
            size(stored(b)),
            field(b, "verify_status"),
        ]);
    }
    t.render()
}

fn show(b: &Value) -> String {
    let tags = b
        .get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".into());
    let mut out = pairs(&[
        ("id", field(b, "backup_id")),
        ("vm", field(b, "vm_name")),
        ("repository", field(b, "repository_id")),
        ("type", field(b, "backup_type")),
        ("policy", field(b, "policy_id")),
        ("tags", tags),
        ("status", field(b, "status")),
        ("error", field(b, "error")),
        ("created", field(b, "created_at")),
        ("completed", field(b, "completed_at")),
        ("files missing", field(b, "files_missing")),
        ("verify", field(b, "verify_status")),
        ("verified", field(b, "verified_at")),
        ("stored", size(stored(b))),
    ]);
    let mut t = Table::new(&[
        "DISK",
        "KEY",
        "SIZE",
        "MODE",
        "PARENT",
        "WRITTEN",
        "IMAGE",
        "CHANGE-ID",
        "VERIFY",
        "FILE",
    ]);
    for d in disks(b, "disks") {
        t.row(vec![
            field(&d, "disk_id"),
            field(&d, "disk_key"),
            size_field(&d, "size_bytes"),
            field(&d, "backup_mode"),
            field(&d, "parent_backup_id"),
            size_field(&d, "bytes_written"),
            size_field(&d, "image_bytes"),
            field(&d, "change_id"),
            field(&d, "verify_status"),
            field(&d, "file"),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_bodies() {
        assert_eq!(complete_body(&[], &[]), json!({"disks": []}));
        let b = complete_body(
            &[(1, "52 a/7".into()), (0, "x".into())],
            &[(1, "ab".into())],
        );
        assert_eq!(
            b,
            json!({"disks": [
                {"disk_id": 0, "change_id": "x"},
                {"disk_id": 1, "change_id": "52 a/7", "digest": "ab"},
            ]})
        );
        assert!(disk_value("x=1").is_err());
        assert_eq!(disk_value("3=a=b"), Ok((3, "a=b".into())));
    }
}
