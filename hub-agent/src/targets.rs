//! The small text formats of the command line: the hub's targets string
//! (`2000:nbd://127.0.0.1:10105/name,2001:nbd://…`) and source arguments
//! (`2000=/dev/sdb` for `push`, `vm1/2000=/images/a.qcow2` for `serve`).

/// Why an argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// One item of a targets string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// VMware disk key.
    pub disk_key: u32,
    /// Where to write.
    pub uri: String,
}

/// Parse `KEY:URI,KEY:URI,…`. Each item is split at its *first* `:` since
/// the URI has colons of its own; export names never contain `,`.
pub fn parse_targets(s: &str) -> Result<Vec<Target>, ParseError> {
    let mut out: Vec<Target> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, uri) = item
            .split_once(':')
            .ok_or_else(|| ParseError(format!("target {item:?} is not KEY:URI")))?;
        let disk_key = parse_key(key)?;
        if uri.is_empty() {
            return Err(ParseError(format!(
                "target for disk key {disk_key} has no URI"
            )));
        }
        if out.iter().any(|t| t.disk_key == disk_key) {
            return Err(ParseError(format!("disk key {disk_key} appears twice")));
        }
        out.push(Target {
            disk_key,
            uri: uri.to_owned(),
        });
    }
    if out.is_empty() {
        return Err(ParseError("the targets string names no disk".into()));
    }
    Ok(out)
}

fn parse_key(s: &str) -> Result<u32, ParseError> {
    s.trim()
        .parse()
        .map_err(|_| ParseError(format!("disk key {s:?} is not a number")))
}

/// `KEY=SOURCE` (split at the first `=`).
pub fn parse_key_source(s: &str) -> Result<(u32, String), ParseError> {
    let (k, src) = s
        .split_once('=')
        .ok_or_else(|| ParseError(format!("{s:?} is not KEY=SOURCE")))?;
    if src.is_empty() {
        return Err(ParseError(format!("{s:?} names no source")));
    }
    Ok((parse_key(k)?, src.to_owned()))
}

/// `VM/KEY=SOURCE`: the VM name is everything before the last `/` of the
/// part before `=` (VM names have no `/` at the hub, but be lenient).
pub fn parse_vm_key_source(s: &str) -> Result<(String, u32, String), ParseError> {
    let (left, src) = s
        .split_once('=')
        .ok_or_else(|| ParseError(format!("{s:?} is not VM/DISK_KEY=SOURCE")))?;
    let (vm, key) = left
        .rsplit_once('/')
        .ok_or_else(|| ParseError(format!("{s:?} is not VM/DISK_KEY=SOURCE")))?;
    if vm.is_empty() || src.is_empty() {
        return Err(ParseError(format!("{s:?} is not VM/DISK_KEY=SOURCE")));
    }
    Ok((vm.to_owned(), parse_key(key)?, src.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_split_at_the_first_colon() {
        let t = parse_targets("2000:nbd://127.0.0.1:10105/a,2001:nbd://[::1]:7/b:c").unwrap();
        assert_eq!(t[0].disk_key, 2000);
        assert_eq!(t[0].uri, "nbd://127.0.0.1:10105/a");
        assert_eq!(t[1].uri, "nbd://[::1]:7/b:c");
        assert!(parse_targets("").is_err());
        assert!(parse_targets("x:nbd://h/a").is_err());
        assert!(parse_targets("2000:nbd://h/a,2000:nbd://h/b").is_err());
        assert!(parse_targets("2000").is_err());
    }

    #[test]
    fn source_arguments() {
        assert_eq!(
            parse_key_source("2000=/dev/sdb").unwrap(),
            (2000, "/dev/sdb".into())
        );
        assert_eq!(
            parse_vm_key_source("vm1/2001=nbd://h:1/x=y").unwrap(),
            ("vm1".into(), 2001, "nbd://h:1/x=y".into())
        );
        assert!(parse_vm_key_source("2001=/x").is_err());
        assert!(parse_key_source("a=/x").is_err());
    }
}
