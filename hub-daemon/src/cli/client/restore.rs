//! `hub-daemon restore start|stop`.

use clap::{Args, Subcommand};
use hyper::Method;

use super::backup::exports;
use super::http::encode;
use super::{ClientError, ClientOpts, Session};

/// Restores.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: RestoreCommand,
}

#[derive(Debug, Subcommand)]
enum RestoreCommand {
    /// Serve every disk of a completed backup over NBD and
    /// print where.
    Start {
        /// Backup id.
        id: String,
        /// Instant restore: take writes into throw-away overlays (the
        /// restore point never changes; the overlays go at stop).
        #[arg(long)]
        writable: bool,
    },
    /// Stop serving a backup's disks.
    Stop {
        /// Backup id.
        id: String,
    },
}

/// Run the command.
pub async fn run(a: RestoreArgs) -> Result<(), ClientError> {
    let s = Session::new(&a.opts)?;
    match a.cmd {
        RestoreCommand::Start { id, writable } => {
            let raw = s
                .send(
                    Method::POST,
                    &format!("/api/v1/backups/{}/restore", encode(&id)),
                    &serde_json::json!({ "writable": writable }),
                )
                .await?;
            let how = if writable {
                "writable (instant restore)"
            } else {
                "read-only"
            };
            s.print(&raw, |v| {
                format!("backup {id} is served for restore, {how}\n\n{}", exports(v))
            })
        }
        RestoreCommand::Stop { id } => {
            s.call(
                Method::DELETE,
                &format!("/api/v1/backups/{}/restore", encode(&id)),
            )
            .await?;
            s.done(&format!("restore of {id} stopped"))
        }
    }
}
