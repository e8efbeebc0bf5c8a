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
            s.parse::<postgres::Config>()
                .map_err(|e| format!("bad catalog URL {}: {e}", redact(s)))?;
            return Ok(CatalogUrl::Postgres(s.to_owned()));
        }
        Err(format!(
            "catalog URL {} is neither sqlite:PATH nor postgres://…",
            redact(s)
        ))
    }
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
