//! The PostgreSQL side of [`super::Sql`], on the sync `postgres` client.
//!
//! `?N` placeholders become `$N`; statements are prepared once per
//! connection and cached (a catalog call is a few round trips, and an
//! unprepared query costs one more each). Parameters adapt to the type
//! the server inferred (an integer binds to INT2/4/8 with a range check).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;

use bytes::BytesMut;
use postgres::error::SqlState;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::url::{pg_target, redact};
use super::{DbError, Row, Value};

/// Most statements kept prepared (the catalog has far fewer distinct
/// ones; the bound only guards against SQL built from data).
const CACHE_MAX: usize = 512;

/// A PostgreSQL connection with its prepared statements.
pub struct PgConn {
    /// `None` only while being dropped (see `Drop`).
    client: Option<Client>,
    cache: HashMap<String, Statement>,
    /// Kept for reconnecting; contains the password, so never shown.
    url: String,
}

impl fmt::Debug for PgConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConn")
            .field("url", &redact(&self.url))
            .finish_non_exhaustive()
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        // The sync client owns a tokio runtime, and dropping a runtime (or
        // blocking on it to say goodbye) panics on an async thread, where
        // the last catalog handle may well go. A thread of its own is
        // always a safe place.
        if let Some(c) = self.client.take() {
            let _ = std::thread::Builder::new()
                .name("catalog-close".into())
                .spawn(move || drop(c));
        }
    }
}

fn translate(sql: &str) -> String {
    // `?N` outside string literals and quoted identifiers becomes `$N`.
    let mut out = String::with_capacity(sql.len() + 8);
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(ch) = chars.next() {
        match quote {
            Some(q) => {
                if ch == q {
                    quote = None;
                }
                out.push(ch);
            }
            None => match ch {
                '\'' | '"' => {
                    quote = Some(ch);
                    out.push(ch);
                }
                '?' if chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
                _ => out.push(ch),
            },
        }
    }
    out
}

impl PgConn {
    /// Connect (blocking).
    pub fn connect(url: &str) -> Result<PgConn, DbError> {
        let target = pg_target(url).map_err(DbError::Other)?;
        let failed =
            |e: &dyn fmt::Display| DbError::Other(format!("connecting to {}: {e}", redact(url)));
        let mut client = match target.tls {
            None => target
                .config
                .connect(NoTls)
                .map_err(|e| failed(&crate::http_client::error_chain(&e)))?,
            Some((mode, ca)) => {
                let tls = crate::http_client::connector(&ca).map_err(|e| failed(&e))?;
                let mut config = target.config;
                config.ssl_mode(mode);
                config
                    .connect(super::pg_tls::RustlsConnect(tls))
                    .map_err(|e| failed(&crate::http_client::error_chain(&e)))?
            }
        };
        // The schema script's `IF NOT EXISTS` notices would otherwise be
        // logged at every start.
        client.batch_execute("SET client_min_messages TO warning")?;
        Ok(PgConn {
            client: Some(client),
            cache: HashMap::new(),
            url: url.to_owned(),
        })
    }

    fn client(&mut self) -> Result<&mut Client, DbError> {
        self.client
            .as_mut()
            .ok_or_else(|| DbError::Other("catalog connection is closed".into()))
    }

    /// Reconnect if the connection is gone.
    pub(super) fn ensure_open(&mut self) -> Result<(), DbError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        tracing::warn!(catalog = %redact(&self.url), "catalog connection lost; reconnecting");
        let fresh = PgConn::connect(&self.url)?;
        // Statements belong to the old connection.
        self.cache.clear();
        if let Some(old) = self.client.take() {
            let _ = std::thread::Builder::new()
                .name("catalog-close".into())
                .spawn(move || drop(old));
        }
        let mut fresh = fresh;
        self.client = fresh.client.take();
        Ok(())
    }

    pub(super) fn transaction(&mut self) -> Result<PgTx<'_>, DbError> {
        let PgConn { client, cache, .. } = self;
        let client = client
            .as_mut()
            .ok_or_else(|| DbError::Other("catalog connection is closed".into()))?;
        Ok(PgTx {
            tx: client.transaction()?,
            cache,
        })
    }

    pub(super) fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let st = self.prepare(sql)?;
        Ok(self.client()?.execute(&st, &refs(params))?)
    }

    pub(super) fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let st = self.prepare(sql)?;
        let rows = self.client()?.query(&st, &refs(params))?;
        rows.iter().map(read_row).collect()
    }

    pub(super) fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.client()?.batch_execute(sql)?)
    }

    fn prepare(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(st) = self.cache.get(sql) {
            return Ok(st.clone());
        }
        let st = self.client()?.prepare(&translate(sql))?;
        remember(&mut self.cache, sql, &st);
        Ok(st)
    }
}

fn remember(cache: &mut HashMap<String, Statement>, sql: &str, st: &Statement) {
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    cache.insert(sql.to_owned(), st.clone());
}

/// A PostgreSQL transaction (rolled back on drop unless committed).
pub struct PgTx<'a> {
    tx: postgres::Transaction<'a>,
    cache: &'a mut HashMap<String, Statement>,
}

impl fmt::Debug for PgTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTx").finish_non_exhaustive()
    }
}

impl PgTx<'_> {
    fn prepare(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(st) = self.cache.get(sql) {
            return Ok(st.clone());
        }
        let st = self.tx.prepare(&translate(sql))?;
        remember(self.cache, sql, &st);
        Ok(st)
    }

    pub(super) fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let st = self.prepare(sql)?;
        Ok(self.tx.execute(&st, &refs(params))?)
    }

    pub(super) fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let st = self.prepare(sql)?;
        let rows = self.tx.query(&st, &refs(params))?;
        rows.iter().map(read_row).collect()
    }

    pub(super) fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.tx.batch_execute(sql)?)
    }

    pub(super) fn commit(self) -> Result<(), DbError> {
        Ok(self.tx.commit()?)
    }
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

fn read_row(r: &postgres::Row) -> Result<Row, DbError> {
    let mut values = Vec::with_capacity(r.len());
    for (index, col) in r.columns().iter().enumerate() {
        let bad = |e: postgres::Error| DbError::Column {
            index,
            message: e.to_string(),
        };
        let ty = col.type_();
        let v = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(index)
                .map_err(bad)?
                .map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(index)
                .map_err(bad)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(index)
                .map_err(bad)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(index)
                .map_err(bad)?
                .map(|v| Value::Int(v.into()))
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            r.try_get::<_, Option<String>>(index)
                .map_err(bad)?
                .map(Value::Text)
        } else {
            return Err(DbError::Column {
                index,
                message: format!(
                    "PostgreSQL type {ty} is not one the catalog reads (CAST it to BIGINT or TEXT)"
                ),
            });
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row::new(values))
}

type BoxError = Box<dyn StdError + Sync + Send>;

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => {
                if *ty == Type::INT8 {
                    v.to_sql(ty, out)
                } else if *ty == Type::INT4 {
                    i32::try_from(*v)?.to_sql(ty, out)
                } else if *ty == Type::INT2 {
                    i16::try_from(*v)?.to_sql(ty, out)
                } else if *ty == Type::BOOL {
                    (*v != 0).to_sql(ty, out)
                } else {
                    Err(format!("an integer given for a {ty} parameter").into())
                }
            }
            Value::Text(s) => {
                if [
                    Type::TEXT,
                    Type::VARCHAR,
                    Type::BPCHAR,
                    Type::NAME,
                    Type::UNKNOWN,
                ]
                .contains(ty)
                {
                    s.as_str().to_sql(ty, out)
                } else {
                    Err(format!("text given for a {ty} parameter").into())
                }
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        // Checked per value in `to_sql`.
        true
    }

    to_sql_checked!();
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbError::Unique(e.to_string()),
            Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => DbError::ForeignKey(e.to_string()),
            Some(c) if *c == SqlState::DISK_FULL => DbError::NoSpace(e.to_string()),
            _ => DbError::Postgres(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::translate;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            translate("SELECT a FROM t WHERE x = ?1 AND y = '?2' AND \"?3\" = ?12"),
            "SELECT a FROM t WHERE x = $1 AND y = '?2' AND \"?3\" = $12"
        );
        assert_eq!(translate("a ? b"), "a ? b");
    }
}
