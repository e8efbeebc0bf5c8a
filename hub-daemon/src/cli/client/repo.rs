//! `hub-daemon repo add|list|show`.

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use super::http::encode;
use super::table::{field, pairs, size_field, Table};
use super::{ClientError, ClientOpts, Session};

/// Repositories.
#[derive(Debug, Args)]
pub struct RepoArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: RepoCommand,
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Register a directory as a repository (on the hub's machine, under
    /// one of its repository roots; created if missing).
    Add {
        /// Repository id.
        id: String,
        /// Absolute directory on the hub's machine.
        path: String,
    },
    /// List repositories.
    List,
    /// Show a repository with its space.
    Show {
        /// Repository id.
        id: String,
    },
}

/// Run the command.
pub async fn run(a: RepoArgs) -> Result<(), ClientError> {
    let s = Session::new(&a.opts)?;
    match a.cmd {
        RepoCommand::Add { id, path } => {
            let raw = s
                .send(
                    Method::POST,
                    "/api/v1/repositories",
                    &json!({"id": id, "path": path}),
                )
                .await?;
            s.print(&raw, |r| {
                pairs(&[("id", field(r, "id")), ("path", field(r, "path"))])
            })
        }
        RepoCommand::List => {
            let raw = s.get("/api/v1/repositories").await?;
            s.print(&raw, list)
        }
        RepoCommand::Show { id } => {
            let raw = s
                .get(&format!("/api/v1/repositories/{}", encode(&id)))
                .await?;
            s.print(&raw, show)
        }
    }
}

fn list(v: &Value) -> String {
    let mut t = Table::new(&["ID", "PATH"]);
    for r in v.as_array().map_or(&[][..], Vec::as_slice) {
        t.row(vec![field(r, "id"), field(r, "path")]);
    }
    t.render()
}

fn show(r: &Value) -> String {
    pairs(&[
        ("id", field(r, "id")),
        ("path", field(r, "path")),
        ("capacity", size_field(r, "capacity_bytes")),
        ("used", size_field(r, "used_bytes")),
        ("free", size_field(r, "free_bytes")),
        ("backups", size_field(r, "backup_bytes")),
        ("reserve", size_field(r, "reserve_bytes")),
    ])
}
