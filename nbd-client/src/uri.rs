//! `nbd://host[:port]/export` and `nbds://…` addresses (the NBD URI
//! specification without Unix sockets; of the query, libnbd's
//! `tls-certificates=DIR`, and our own `dirty-bitmap=NAME`, which selects
//! the metadata context `qemu:dirty-bitmap:NAME` as well).

/// Default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// A parsed `nbd://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Export name (percent-decoded; "" is the default export).
    pub export: String,
    /// `nbds://`: TLS required.
    pub tls: bool,
    /// `tls-certificates=DIR` from the query (percent-decoded).
    pub tls_certificates: Option<String>,
    /// `dirty-bitmap=NAME` from the query (percent-decoded): a qemu dirty
    /// bitmap to select as `qemu:dirty-bitmap:NAME` (not part of the NBD
    /// URI specification; other clients ignore it).
    pub dirty_bitmap: Option<String>,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Not `nbd://` or `nbds://`.
    #[error("not an nbd:// or nbds:// URI (Unix sockets are not supported)")]
    Scheme,
    /// Empty host, bad port or bad escape.
    #[error("malformed nbd:// URI: {0}")]
    Malformed(&'static str),
}

impl NbdUri {
    /// Parse `nbd[s]://host[:port][/export][?tls-certificates=DIR][&dirty-bitmap=NAME]`.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("nbds://") {
            (true, r)
        } else {
            (false, s.strip_prefix("nbd://").ok_or(UriError::Scheme)?)
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or(UriError::Malformed("unclosed ["))?;
            (h, tail.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UriError::Malformed("empty host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| UriError::Malformed("bad port"))?,
            None => DEFAULT_PORT,
        };
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let path = path.split('#').next().unwrap_or("");
        let query = query.split('#').next().unwrap_or("");
        let mut tls_certificates = None;
        let mut dirty_bitmap = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            if let Some(v) = pair.strip_prefix("tls-certificates=") {
                tls_certificates = Some(percent_decode(v)?);
            } else if let Some(v) = pair.strip_prefix("dirty-bitmap=") {
                let name = percent_decode(v)?;
                // An empty name would select qemu's whole bitmap namespace.
                if name.is_empty() {
                    return Err(UriError::Malformed("empty dirty-bitmap name"));
                }
                dirty_bitmap = Some(name);
            }
        }
        Ok(NbdUri {
            host: host.to_owned(),
            port,
            export: percent_decode(path)?,
            tls,
            tls_certificates,
            dirty_bitmap,
        })
    }

    /// `host:port` for connecting.
    pub fn authority(&self) -> (String, u16) {
        (self.host.clone(), self.port)
    }

    /// The metadata context of [`NbdUri::dirty_bitmap`]:
    /// `qemu:dirty-bitmap:NAME`.
    pub fn dirty_bitmap_context(&self) -> Option<String> {
        self.dirty_bitmap
            .as_ref()
            .map(|n| format!("qemu:dirty-bitmap:{n}"))
    }
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(UriError::Malformed("bad % escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Malformed("export name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_hosts_ports_and_exports() {
        let u = NbdUri::parse("nbd://127.0.0.1:10105/vm-disk0").unwrap();
        assert_eq!(u.authority(), ("127.0.0.1".into(), 10105));
        assert_eq!(u.export, "vm-disk0");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!((u.port, u.export.as_str()), (DEFAULT_PORT, ""));
        let u = NbdUri::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("::1", 99, "a b")
        );
        assert_eq!(NbdUri::parse("nbdx://h/x"), Err(UriError::Scheme));
        let u = NbdUri::parse("nbds://h:1/x?tls-certificates=/etc/a%20b&x=1").unwrap();
        assert!(u.tls);
        assert_eq!(u.export, "x");
        assert_eq!(u.tls_certificates.as_deref(), Some("/etc/a b"));
        assert!(!NbdUri::parse("nbd://h/x?y").unwrap().tls);
        assert!(NbdUri::parse("nbd://:1/x").is_err());
        assert!(NbdUri::parse("nbd://h:99999/x").is_err());
        assert!(NbdUri::parse("nbd://h/%zz").is_err());
        let u = NbdUri::parse("nbd://h/x?dirty-bitmap=b%200").unwrap();
        assert_eq!(u.dirty_bitmap.as_deref(), Some("b 0"));
        assert_eq!(
            u.dirty_bitmap_context().as_deref(),
            Some("qemu:dirty-bitmap:b 0")
        );
        assert_eq!(u.export, "x");
        assert!(NbdUri::parse("nbd://h/x").unwrap().dirty_bitmap.is_none());
        assert!(NbdUri::parse("nbd://h/x?dirty-bitmap=").is_err());
    }
}
