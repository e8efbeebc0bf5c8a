//! `hub-daemon prune`.

use clap::Args;
use hyper::Method;
use serde_json::{json, Value};

use super::table::{field, text};
use super::{ClientError, ClientOpts, Session};

/// Apply retention.
#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    opts: ClientOpts,
    /// Only this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only this repository.
    #[arg(long, value_name = "ID")]
    repo: Option<String>,
    /// Show what would be kept, removed and merged; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Run the command.
pub async fn run(a: PruneArgs) -> Result<(), ClientError> {
    let s = Session::new(&a.opts)?;
    // The API has no default for dry_run (a destructive default would be
    // a trap); the CLI's flag makes the choice explicit either way.
    let body = json!({"vm_name": a.vm, "repository_id": a.repo, "dry_run": a.dry_run});
    let raw = s.send(Method::POST, "/api/v1/prune", &body).await?;
    s.print(&raw, |v| report(v, a.dry_run))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(text)
        .collect()
}

fn report(v: &Value, dry_run: bool) -> String {
    let reports = v.as_array().map_or(&[][..], Vec::as_slice);
    let mut out = String::new();
    if dry_run {
        out.push_str("dry run: nothing changed\n");
    }
    if reports.is_empty() {
        out.push_str("no VM has backups under a policy\n");
    }
    let (will, did) = if dry_run {
        ("would remove", "would merge")
    } else {
        ("removed", "merged")
    };
    for r in reports {
        let remove = strings(&r["remove"]);
        out.push_str(&format!(
            "{} in {}: {} kept, {} {}\n",
            field(r, "vm_name"),
            field(r, "repository_id"),
            r["keep"].as_array().map_or(0, Vec::len),
            remove.len(),
            will
        ));
        for k in r["keep"].as_array().map_or(&[][..], Vec::as_slice) {
            out.push_str(&format!(
                "  keep    {} ({})\n",
                field(k, "backup_id"),
                field(k, "rule")
            ));
        }
        for id in &remove {
            out.push_str(&format!("  remove  {id}\n"));
        }
        for m in r["merges"].as_array().map_or(&[][..], Vec::as_slice) {
            out.push_str(&format!(
                "  {did}  disk {} of {}: folds in {}, parent now {}\n",
                field(m, "disk_id"),
                field(m, "into"),
                strings(&m["drop"]).join(", "),
                m.get("new_parent")
                    .and_then(Value::as_str)
                    .unwrap_or("none (a full)")
            ));
        }
    }
    out
}
