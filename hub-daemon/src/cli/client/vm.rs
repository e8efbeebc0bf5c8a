//! `hub-daemon vm put|list|show|rm`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Map, Value};

use super::http::encode;
use super::table::{field, pairs, size, size_field, Table};
use super::{read_json, ClientError, ClientOpts, Session};

/// VMs.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Register a VM or replace its disks (PUT /api/v1/vms/NAME).
    Put {
        /// VM name.
        name: String,
        /// VMware context id.
        #[arg(long, value_name = "ID", required_unless_present = "from")]
        context: Option<String>,
        /// A disk, in disk_id order (repeat per disk):
        /// SIZE[,unit=N][,key=N][,label=TEXT] with SIZE like 40G; unit
        /// defaults to the disk's position, label must come last.
        #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk, required_unless_present = "from")]
        disks: Vec<Disk>,
        /// The VM's own backup appliance (http://host:port).
        #[arg(long, value_name = "URL")]
        sna_url: Option<String>,
        /// The request body as a JSON file (`-`: stdin) instead of the flags.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["context", "disks", "sna_url"])]
        from: Option<PathBuf>,
    },
    /// List VMs.
    List,
    /// Show a VM and its disks.
    Show {
        /// VM name.
        name: String,
    },
    /// Remove a VM (its backups stay).
    Rm {
        /// VM name.
        name: String,
    },
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Disk {
    size: u64,
    unit: Option<u32>,
    key: Option<u32>,
    label: Option<String>,
}

fn parse_disk(s: &str) -> Result<Disk, String> {
    let (size, mut rest) = s.split_once(',').unwrap_or((s, ""));
    let mut d = Disk {
        size: crate::cli::size::parse_size(size)?,
        unit: None,
        key: None,
        label: None,
    };
    while !rest.is_empty() {
        // label= takes the rest, commas included.
        if let Some(label) = rest.strip_prefix("label=") {
            d.label = Some(label.to_owned());
            break;
        }
        let (item, tail) = rest.split_once(',').unwrap_or((rest, ""));
        rest = tail;
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{item:?}: not a number in {s:?}"))
        };
        match item.split_once('=') {
            Some(("unit", v)) => d.unit = Some(number(v)?),
            Some(("key", v)) => d.key = Some(number(v)?),
            _ => {
                return Err(format!(
                    "{item:?} in {s:?}: expected unit=N, key=N or label=TEXT"
                ))
            }
        }
    }
    Ok(d)
}

/// The PUT body from the flags: disk_id is the position.
fn body(context: &str, disks: &[Disk], sna_url: Option<&str>) -> Value {
    let disks: Vec<Value> = disks
        .iter()
        .zip(0u32..)
        .map(|(d, i)| {
            let mut o = Map::new();
            o.insert("disk_id".into(), json!(i));
            o.insert("size_bytes".into(), json!(d.size));
            o.insert("unit_number".into(), json!(d.unit.unwrap_or(i)));
            if let Some(k) = d.key {
                o.insert("disk_key".into(), json!(k));
            }
            if let Some(l) = &d.label {
                o.insert("label".into(), json!(l));
            }
            Value::Object(o)
        })
        .collect();
    let mut b = json!({"vm_context_id": context, "disks": disks});
    if let (Some(u), Some(o)) = (sna_url, b.as_object_mut()) {
        o.insert("sna_url".into(), json!(u));
    }
    b
}

/// Run the command.
pub async fn run(a: VmArgs) -> Result<(), ClientError> {
    let s = Session::new(&a.opts)?;
    match a.cmd {
        VmCommand::Put {
            name,
            context,
            disks,
            sna_url,
            from,
        } => {
            let body = match (from, context) {
                (Some(f), _) => read_json(&f)?,
                (None, Some(c)) => body(&c, &disks, sna_url.as_deref()),
                // clap demands one of the two.
                (None, None) => {
                    return Err(ClientError::Usage(
                        "give --context and --disk, or --from".into(),
                    ))
                }
            };
            let raw = s
                .send(
                    Method::PUT,
                    &format!("/api/v1/vms/{}", encode(&name)),
                    &body,
                )
                .await?;
            s.print(&raw, show)
        }
        VmCommand::List => {
            let raw = s.get("/api/v1/vms").await?;
            s.print(&raw, list)
        }
        VmCommand::Show { name } => {
            let raw = s.get(&format!("/api/v1/vms/{}", encode(&name))).await?;
            s.print(&raw, show)
        }
        VmCommand::Rm { name } => {
            s.call(Method::DELETE, &format!("/api/v1/vms/{}", encode(&name)))
                .await?;
            s.done(&format!("VM {name} removed"))
        }
    }
}

fn disks(v: &Value) -> &[Value] {
    v.get("disks")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

fn list(v: &Value) -> String {
    let mut t = Table::new(&["NAME", "CONTEXT", "DISKS", "SIZE", "APPLIANCE", "UPDATED"]);
    for vm in v.as_array().map_or(&[][..], Vec::as_slice) {
        let d = disks(vm);
        let total: u64 = d.iter().filter_map(|d| d["size_bytes"].as_u64()).sum();
        t.row(vec![
            field(vm, "vm_name"),
            field(vm, "vm_context_id"),
            d.len().to_string(),
            size(total),
            field(vm, "sna_url"),
            field(vm, "updated_at"),
        ]);
    }
    t.render()
}

fn show(vm: &Value) -> String {
    let mut out = pairs(&[
        ("name", field(vm, "vm_name")),
        ("context", field(vm, "vm_context_id")),
        ("appliance", field(vm, "sna_url")),
        ("updated", field(vm, "updated_at")),
    ]);
    let mut t = Table::new(&["DISK", "KEY", "UNIT", "SIZE", "LABEL"]);
    for d in disks(vm) {
        t.row(vec![
            field(d, "disk_id"),
            field(d, "disk_key"),
            field(d, "unit_number"),
            size_field(d, "size_bytes"),
            field(d, "label"),
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
    fn disk_specs() {
        assert_eq!(
            parse_disk("8G").unwrap(),
            Disk {
                size: 8 << 30,
                unit: None,
                key: None,
                label: None
            }
        );
        assert_eq!(
            parse_disk("1M,unit=3,key=2010,label=Hard disk 1, boot").unwrap(),
            Disk {
                size: 1 << 20,
                unit: Some(3),
                key: Some(2010),
                label: Some("Hard disk 1, boot".into())
            }
        );
        for bad in ["", "8X", "8G,unit=x", "8G,foo=1", "8G,unit"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        let b = body(
            "ctx",
            &[parse_disk("1M").unwrap(), parse_disk("2M,unit=5").unwrap()],
            None,
        );
        assert_eq!(
            b,
            json!({"vm_context_id": "ctx", "disks": [
                {"disk_id": 0, "size_bytes": 1 << 20, "unit_number": 0},
                {"disk_id": 1, "size_bytes": 2 << 20, "unit_number": 5},
            ]})
        );
    }
}
