//! The SQLite side of [`super::Sql`]: numbered `?N` placeholders are
//! SQLite's own, so SQL passes through unchanged.

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode};

use super::{DbError, Row, Value};

/// Open the file and set the connection up.
pub(super) fn open(path: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open(path)?;
    // WAL: readers don't block the writer; FULL: a commit is on disk when
    // COMMIT returns (a completed backup must survive power loss).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
            Value::Int(v) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*v)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

pub(super) fn execute(c: &Connection, sql: &str, params: &[Value]) -> Result<u64, DbError> {
    let n = c
        .prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(params.iter()))?;
    Ok(n as u64)
}

pub(super) fn query(c: &Connection, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
    let mut st = c.prepare_cached(sql)?;
    let n = st.column_count();
    let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut values = Vec::with_capacity(n);
        for index in 0..n {
            values.push(match r.get_ref(index)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => {
                    Value::Text(String::from_utf8(t.to_vec()).map_err(|_| DbError::Column {
                        index,
                        message: "text is not UTF-8".into(),
                    })?)
                }
                ValueRef::Real(_) | ValueRef::Blob(_) => {
                    return Err(DbError::Column {
                        index,
                        message: "a real or blob, which the catalog never stores".into(),
                    })
                }
            });
        }
        out.push(Row::new(values));
    }
    Ok(out)
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi;
        match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    DbError::Unique(e.to_string())
                }
                ffi::SQLITE_CONSTRAINT_FOREIGNKEY => DbError::ForeignKey(e.to_string()),
                _ if f.code == ErrorCode::DiskFull => DbError::NoSpace(e.to_string()),
                _ => DbError::Sqlite(e),
            },
            _ => DbError::Sqlite(e),
        }
    }
}
