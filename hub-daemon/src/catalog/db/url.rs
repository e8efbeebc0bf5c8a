//! Where the catalog lives: `sqlite:PATH` or `postgres://…`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A catalog location. Its `Display` never shows a password.
#[derive(Clone, PartialEq, Eq)]
pub enum CatalogUrl {
    /// An SQLite file (`sqlite:PATH`).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://user:password@host:port/db`, or
    /// `postgresql://`); the text as given, password included.
    Postgres(String),
}

impl FromStr for CatalogUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("sqlite:") {
            // `sqlite://PATH` is accepted too (the path starts after it).
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("catalog URL sqlite: needs a path (sqlite:PATH)".into());
            }
            return Ok(CatalogUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            // Let the client check the rest now: a typo fails at start-up
            // with a message, not at the first connection attempt.
            pg_target(s)?;
            return Ok(CatalogUrl::Postgres(s.to_owned()));
        }
        Err(format!(
            "catalog URL {} is neither sqlite:PATH nor postgres://…",
            redact(s)
        ))
    }
}

/// How to reach a PostgreSQL catalog: the client's configuration (the URL
/// without the TLS parameters this module reads itself) and, with TLS,
/// the CA file that must have signed the server's certificate.
#[derive(Debug)]
pub struct PgTarget {
    /// For `postgres::Config` (password included: never shown).
    pub config: postgres::Config,
    /// `Some((mode, CA file))` to encrypt and verify; `None`: plaintext.
    pub tls: Option<(postgres::config::SslMode, PathBuf)>,
}

/// Read a `postgres://` URL. TLS follows libpq's parameters, with one
/// rule: the server is verified whenever the connection is encrypted.
/// * `sslmode=disable` (or none): plaintext.
/// * `sslmode=prefer`: TLS if the server offers it, when `sslrootcert` is
///   given; without it, plaintext (nothing to verify against).
/// * `sslmode=require` / `verify-full`: TLS or no connection; needs
///   `sslrootcert=CAFILE` (PEM); the server's certificate must chain to it
///   and name the URL's host.
/// * `verify-ca` (chain without the name) and `allow` are refused.
pub fn pg_target(url: &str) -> Result<PgTarget, String> {
    let bad = |why: String| format!("bad catalog URL {}: {why}", redact(url));
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let (mut mode, mut root) = (None, None);
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => {
                root = Some(PathBuf::from(percent_decode(v).map_err(|e| bad(e.into()))?))
            }
            _ => rest.push(kv),
        }
    }
    let client_url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let config: postgres::Config = client_url.parse().map_err(|e| bad(format!("{e}")))?;
    use postgres::config::SslMode;
    let tls = match (mode.as_deref().unwrap_or("disable"), root) {
        ("disable", _) | ("prefer", None) => None,
        ("prefer", Some(ca)) => Some((SslMode::Prefer, ca)),
        ("require" | "verify-full", Some(ca)) => Some((SslMode::Require, ca)),
        ("require" | "verify-full", None) => return Err(bad(
            "sslmode=require needs sslrootcert=CAFILE: the hub verifies the server it encrypts to"
                .into(),
        )),
        (other, _) => {
            return Err(bad(format!(
                "sslmode={other} is not supported (disable, prefer, require or verify-full)"
            )))
        }
    };
    Ok(PgTarget { config, tls })
}

/// `%XX` escapes of a URL parameter decoded.
fn percent_decode(v: &str) -> Result<String, &'static str> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or("a % escape is cut short")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "bad % escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad % escape")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a parameter is not UTF-8")
}

/// `url` with the password (between `user:` and `@` in the authority, or
/// a `password=` query parameter) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl fmt::Display for CatalogUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CatalogUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            CatalogUrl::Postgres(u) => f.write_str(&redact(u)),
        }
    }
}

impl fmt::Debug for CatalogUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CatalogUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_read_here_and_verified_always() {
        let t = pg_target("postgres://hub@db/hub").unwrap();
        assert!(t.tls.is_none());
        let t = pg_target("postgres://hub:pw@db/hub?sslmode=require&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5")
            .unwrap();
        let (mode, ca) = t.tls.unwrap();
        assert_eq!(mode, postgres::config::SslMode::Require);
        assert_eq!(ca, PathBuf::from("/etc/ca.pem"));
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
        assert!(pg_target("postgres://hub@db/hub?sslmode=prefer")
            .unwrap()
            .tls
            .is_none());
        for bad in [
            "postgres://hub:pw@db/hub?sslmode=require",
            "postgres://hub@db/hub?sslmode=verify-ca&sslrootcert=/ca",
            "postgres://hub@db/hub?sslmode=allow",
            "postgres://hub@db/hub?sslrootcert=%2",
            "postgres://hub@db/hub?bogus=1",
        ] {
            let e = pg_target(bad).unwrap_err();
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn parses_both_kinds() {
        assert_eq!(
            "sqlite:/var/lib/hub/c.sqlite"
                .parse::<CatalogUrl>()
                .unwrap(),
            CatalogUrl::Sqlite("/var/lib/hub/c.sqlite".into())
        );
        assert_eq!(
            "sqlite:rel.db".parse::<CatalogUrl>().unwrap(),
            CatalogUrl::Sqlite("rel.db".into())
        );
        for u in ["postgres://hub@db:5432/hub", "postgresql://hub:pw@db/hub"] {
            assert_eq!(
                u.parse::<CatalogUrl>().unwrap(),
                CatalogUrl::Postgres(u.into())
            );
        }
        assert!("sqlite:".parse::<CatalogUrl>().is_err());
        assert!("mysql://x/y".parse::<CatalogUrl>().is_err());
        assert!("/plain/path".parse::<CatalogUrl>().is_err());
    }

    #[test]
    fn never_shows_a_password() {
        let u: CatalogUrl = "postgres://hub:s3cret@db:5432/hub?sslmode=disable&password=s3cret"
            .parse()
            .unwrap();
        let shown = format!("{u} {u:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("hub:***@db:5432/hub"), "{shown}");
        assert_eq!(redact("postgres://hub@db/x"), "postgres://hub@db/x");
        // An error message about a bad URL does not show it either.
        let e = "postgres://hub:s3cret@db:notaport/x".parse::<CatalogUrl>();
        if let Err(e) = e {
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
