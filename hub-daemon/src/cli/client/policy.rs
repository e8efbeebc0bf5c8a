//! `hub-daemon policy put|list|show|rm`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Map, Value};

use super::http::encode;
use super::table::{field, pairs, Table};
use super::{read_json, ClientError, ClientOpts, Session};

/// Retention policies.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: PolicyCommand,
}

/// The options of a policy; each left out is 0 (off).
#[derive(Debug, Clone, Default, Args)]
struct Options {
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest of each of the N most recent hours.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// … days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// … ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// … months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// … years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Longest image chain before a forced full.
    #[arg(long, value_name = "N")]
    max_chain_length: Option<u32>,
    /// Remove nothing younger than N days.
    #[arg(long, value_name = "DAYS")]
    min_retention_days: Option<u32>,
    /// Re-verify every N days.
    #[arg(long, value_name = "DAYS")]
    verify_every_days: Option<u32>,
}

impl Options {
    fn body(&self) -> Value {
        let mut o = Map::new();
        for (k, v) in [
            ("keep_last", self.keep_last),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
            ("keep_monthly", self.keep_monthly),
            ("keep_yearly", self.keep_yearly),
            ("max_chain_length", self.max_chain_length),
            ("min_retention_days", self.min_retention_days),
            ("verify_every_days", self.verify_every_days),
        ] {
            if let Some(v) = v {
                o.insert(k.into(), v.into());
            }
        }
        Value::Object(o)
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Create or replace a policy (options left out are 0, off).
    Put {
        /// Policy id.
        id: String,
        #[command(flatten)]
        options: Options,
        /// The request body as a JSON file (`-`: stdin) instead of the flags.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },
    /// List policies.
    List,
    /// Show a policy.
    Show {
        /// Policy id.
        id: String,
    },
    /// Remove a policy (refused while a backup names it).
    Rm {
        /// Policy id.
        id: String,
    },
}

/// Run the command.
pub async fn run(a: PolicyArgs) -> Result<(), ClientError> {
    let s = Session::new(&a.opts)?;
    let path = |id: &str| format!("/api/v1/policies/{}", encode(id));
    match a.cmd {
        PolicyCommand::Put { id, options, from } => {
            let body = match from {
                Some(f) if options.body().as_object().is_some_and(|o| o.is_empty()) => {
                    read_json(&f)?
                }
                Some(_) => {
                    return Err(ClientError::Usage(
                        "--from replaces the option flags; give one or the other".into(),
                    ))
                }
                None => options.body(),
            };
            let raw = s.send(Method::PUT, &path(&id), &body).await?;
            s.print(&raw, show)
        }
        PolicyCommand::List => {
            let raw = s.get("/api/v1/policies").await?;
            s.print(&raw, list)
        }
        PolicyCommand::Show { id } => {
            let raw = s.get(&path(&id)).await?;
            s.print(&raw, show)
        }
        PolicyCommand::Rm { id } => {
            s.call(Method::DELETE, &path(&id)).await?;
            s.done(&format!("policy {id} removed"))
        }
    }
}

const COLUMNS: [(&str, &str); 9] = [
    ("LAST", "keep_last"),
    ("HOURLY", "keep_hourly"),
    ("DAILY", "keep_daily"),
    ("WEEKLY", "keep_weekly"),
    ("MONTHLY", "keep_monthly"),
    ("YEARLY", "keep_yearly"),
    ("MAX-CHAIN", "max_chain_length"),
    ("MIN-DAYS", "min_retention_days"),
    ("VERIFY-DAYS", "verify_every_days"),
];

fn list(v: &Value) -> String {
    let mut header = vec!["ID"];
    header.extend(COLUMNS.iter().map(|(h, _)| *h));
    let mut t = Table::new(&header);
    for p in v.as_array().map_or(&[][..], Vec::as_slice) {
        let mut row = vec![field(p, "id")];
        row.extend(COLUMNS.iter().map(|(_, k)| field(p, k)));
        t.row(row);
    }
    t.render()
}

fn show(p: &Value) -> String {
    let mut items = vec![("id", field(p, "id"))];
    items.extend(COLUMNS.iter().map(|(_, k)| (*k, field(p, k))));
    pairs(&items)
}
