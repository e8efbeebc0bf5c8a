//! The `serve` configuration file (TOML); command-line options override it.
//!
//! ```toml
//! listen = "0.0.0.0:8090"
//! state_dir = "/var/lib/hub-agent"
//! token = "change-me"          # optional: the hub must send it as Bearer
//! chunk_mib = 1                # optional: MiB per source read
//! in_flight = 32               # optional: reads in flight per disk
//!
//! [sources]                    # "VM/DISK_KEY" = raw file, device, qcow2 or nbd://
//! "vm1/2000" = "/dev/vg0/vm1-disk0"
//! "vm1/2001" = "/images/vm1-data.qcow2"
//! "vm2/2000" = "nbd://10.0.0.9:10809/vm2-disk0?dirty-bitmap=b0"  # qemu-nbd -r -B b0
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::source::SourceSpec;
use crate::targets::parse_vm_key_source;

/// The file's contents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address.
    pub listen: Option<String>,
    /// Change-tracking directory.
    pub state_dir: Option<PathBuf>,
    /// Bearer token the hub must send.
    pub token: Option<String>,
    /// MiB per source read.
    pub chunk_mib: Option<u64>,
    /// Reads in flight per disk.
    pub in_flight: Option<usize>,
    /// `"VM/DISK_KEY" = "SOURCE"`.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

/// Read and parse a configuration file.
pub fn load(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Sources by (VM, disk key) from `VM/DISK_KEY` keys.
pub fn sources_of(
    entries: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<(String, u32), SourceSpec>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in entries {
        let (vm, key, src) = parse_vm_key_source(&format!("{k}={v}")).map_err(|e| e.0)?;
        out.insert((vm, key), SourceSpec::parse(&src));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c: FileConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:8090"
            state_dir = "/var/lib/hub-agent"
            token = "t"
            [sources]
            "vm1/2000" = "/dev/vg0/vm1-disk0"
            "vm1/2001" = "nbd://h:1/x"
            "#,
        )
        .unwrap();
        let s = sources_of(c.sources).unwrap();
        assert_eq!(
            s[&("vm1".into(), 2001)],
            SourceSpec::Nbd("nbd://h:1/x".into())
        );
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }
}
