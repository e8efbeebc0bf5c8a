//! Backend-neutral data access for the catalog: one interface over SQLite
//! (rusqlite) and PostgreSQL (the sync `postgres` client), so every
//! catalog method is written once.
//!
//! # Writing a catalog method
//! A method runs a closure on the blocking pool with the connection
//! ([`Conn`]); inside it, [`Sql::execute`], [`Sql::query`],
//! [`Sql::query_opt`] and [`Sql::query_one`] take SQL text and
//! `params![…]` (this module's macro); rows come back as [`Row`]s
//! whose typed getter returns an error (never panics) on a wrong type or
//! an unexpected NULL:
//!
//! ```ignore
//! pub async fn thing(&self, id: &str) -> Result<Option<Thing>> {
//!     let id = id.to_owned();
//!     self.with(move |c| {
//!         let tx = c.transaction()?; // only when several statements must commit together
//!         let row = tx.query_opt("SELECT a, b FROM things WHERE id = ?1", params![id])?;
//!         let thing = row.map(|r| Ok::<_, DbError>(Thing { a: r.get(0)?, b: r.get(1)? })).transpose()?;
//!         tx.commit()?;
//!         Ok(thing)
//!     })
//!     .await
//! }
//! ```
//!
//! # Portable SQL (the rules that keep one text valid on both)
//! * Placeholders are numbered, `?1`, `?2`, …: SQLite takes them as they
//!   are; PostgreSQL gets them rewritten to `$1`, `$2`, … PostgreSQL must
//!   know each parameter's type where it first appears: `?N IS NULL` alone
//!   does not say, so write `CAST(?1 AS TEXT) IS NULL OR vm_name = ?1`.
//! * Every integer column is `BIGINT` (PostgreSQL's `INTEGER` is 32 bits;
//!   on SQLite both are the same 64-bit integer). Booleans are `BIGINT`
//!   0/1 ([`ToValue`] turns a `bool` into one, [`FromValue`] back).
//! * Upserts are `INSERT … ON CONFLICT (cols) DO UPDATE SET x = excluded.x`
//!   or `… DO NOTHING`; never `INSERT OR IGNORE/REPLACE`.
//! * No SQLite-only functions; `SUM` is wrapped in `CAST(… AS BIGINT)`
//!   (PostgreSQL's sum of BIGINT is NUMERIC, which is not read back).
//! * `ORDER BY … DESC` on a nullable column sorts NULLs differently
//!   (first on PostgreSQL, last on SQLite): filter them or `COALESCE`.
//! * A unique violation is [`DbError::Unique`] on both backends, a
//!   foreign-key violation [`DbError::ForeignKey`]: match those, not
//!   backend codes.
//! * Schema changes go into `schema::MIGRATIONS` (one entry each, applied
//!   in order on both backends).

mod pg;
mod pg_tls;
mod sqlite;
mod url;

pub use pg::PgConn;
pub use url::CatalogUrl;

use std::fmt;

/// What the catalog's data access can fail with, the same for both
/// backends.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A unique (or primary-key) constraint refused a row.
    #[error("unique constraint violated: {0}")]
    Unique(String),
    /// A foreign-key constraint refused a change.
    #[error("foreign key constraint violated: {0}")]
    ForeignKey(String),
    /// The database's disk is full.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// A query that must return a row returned none.
    #[error("query returned no row")]
    NoRow,
    /// A column held a value of another type than the one asked for (or
    /// a NULL where none is allowed).
    #[error("column {index}: {message}")]
    Column {
        /// Column index.
        index: usize,
        /// What was wrong.
        message: String,
    },
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    /// PostgreSQL failed (or the connection to it).
    #[error("postgres: {0}")]
    Postgres(postgres::Error),
    /// A bad catalog URL, or anything else.
    #[error("{0}")]
    Other(String),
}

/// A parameter or column value: the three kinds the catalog stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer (also booleans, as 0/1).
    Int(i64),
    /// Text.
    Text(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(v) => write!(f, "integer {v}"),
            Value::Text(_) => f.write_str("text"),
        }
    }
}

/// A Rust value that can be bound as a parameter.
pub trait ToValue {
    /// The value to bind.
    fn to_value(&self) -> Value;
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8);
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}
impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

/// Parameters for [`Sql`] calls: `params![a, b]` binds `?1 = a, ?2 = b`.
/// Each is taken by reference and turned into a [`Value`].
macro_rules! params {
    ($($x:expr),* $(,)?) => {
        &[$($crate::catalog::db::ToValue::to_value(&$x)),*] as &[$crate::catalog::db::Value]
    };
}
pub(crate) use params;

/// A Rust value a column can be read as.
pub trait FromValue: Sized {
    /// Convert, or say why not.
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("expected text, found {other}")),
        }
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            other => Err(format!("expected 0 or 1, found {other}")),
        }
    }
}
macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i)
                        .map_err(|_| format!("{i} is out of range for {}", stringify!($t))),
                    other => Err(format!("expected an integer, found {other}")),
                }
            }
        }
    )*};
}
int_from_value!(i64, i32, u64, u32, u16);
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// A row of these values.
    pub fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    /// Column `index` as `T`; an error (not a panic) for a missing column,
    /// a wrong type, or a NULL read as a non-`Option`.
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T, DbError> {
        let v = self.values.get(index).ok_or_else(|| DbError::Column {
            index,
            message: format!("the row has {} columns", self.values.len()),
        })?;
        T::from_value(v).map_err(|message| DbError::Column { index, message })
    }
}

/// Statements on a connection or inside a transaction.
pub trait Sql {
    /// Run one statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    /// Run a query; every row.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
    /// Run statements without parameters (schema scripts).
    fn batch(&mut self, sql: &str) -> Result<(), DbError>;
    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
    /// The first row; [`DbError::NoRow`] if there is none.
    fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?.ok_or(DbError::NoRow)
    }
}

/// Which database a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A catalog connection.
#[derive(Debug)]
pub enum Conn {
    /// SQLite.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL (boxed: the client is large, and a catalog holds one
    /// connection for its life).
    Postgres(Box<PgConn>),
}

impl Conn {
    /// Open a connection to `url` (blocking: call it off the async threads).
    pub fn open(url: &CatalogUrl) -> Result<Conn, DbError> {
        match url {
            CatalogUrl::Sqlite(path) => Ok(Conn::Sqlite(sqlite::open(path)?)),
            CatalogUrl::Postgres(u) => Ok(Conn::Postgres(Box::new(PgConn::connect(u)?))),
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    /// Reconnect a PostgreSQL connection the server or network closed
    /// (a restarted server must not take the hub down with it).
    pub fn ensure_open(&mut self) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(_) => Ok(()),
            Conn::Postgres(p) => p.ensure_open(),
        }
    }

    /// Begin a transaction; it rolls back unless [`Tx::commit`] is called.
    /// On PostgreSQL it is READ COMMITTED: where two hubs could race, a
    /// constraint (unique index, foreign key) decides, not a read.
    pub fn transaction(&mut self) -> Result<Tx<'_>, DbError> {
        match self {
            Conn::Sqlite(c) => Ok(Tx::Sqlite(c.transaction().map_err(DbError::from)?)),
            Conn::Postgres(p) => Ok(Tx::Postgres(p.transaction()?)),
        }
    }
}

impl Sql for Conn {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            Conn::Sqlite(c) => sqlite::execute(c, sql, params),
            Conn::Postgres(p) => p.execute(sql, params),
        }
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Conn::Sqlite(c) => sqlite::query(c, sql, params),
            Conn::Postgres(p) => p.query(sql, params),
        }
    }
    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sql).map_err(DbError::from),
            Conn::Postgres(p) => p.batch(sql),
        }
    }
}

/// A transaction; dropping it without [`Tx::commit`] rolls back.
#[derive(Debug)]
pub enum Tx<'a> {
    /// SQLite.
    Sqlite(rusqlite::Transaction<'a>),
    /// PostgreSQL.
    Postgres(pg::PgTx<'a>),
}

impl Tx<'_> {
    /// Commit.
    pub fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(t) => t.commit().map_err(DbError::from),
            Tx::Postgres(t) => t.commit(),
        }
    }
}

impl Sql for Tx<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            Tx::Sqlite(t) => sqlite::execute(t, sql, params),
            Tx::Postgres(t) => t.execute(sql, params),
        }
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Tx::Sqlite(t) => sqlite::query(t, sql, params),
            Tx::Postgres(t) => t.query(sql, params),
        }
    }
    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(t) => t.execute_batch(sql).map_err(DbError::from),
            Tx::Postgres(t) => t.batch(sql),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_refuse_wrong_types_and_nulls() {
        let r = Row::new(vec![
            Value::Int(7),
            Value::Null,
            Value::Text("x".into()),
            Value::Int(-1),
        ]);
        assert_eq!(r.get::<u32>(0).unwrap(), 7);
        assert_eq!(r.get::<Option<String>>(1).unwrap(), None);
        assert!(matches!(
            r.get::<String>(1),
            Err(DbError::Column { index: 1, .. })
        ));
        assert!(matches!(r.get::<i64>(2), Err(DbError::Column { .. })));
        assert!(matches!(r.get::<u64>(3), Err(DbError::Column { .. })));
        assert!(matches!(r.get::<bool>(0), Err(DbError::Column { .. })));
        assert!(matches!(
            r.get::<i64>(9),
            Err(DbError::Column { index: 9, .. })
        ));
    }

    #[test]
    fn params_bind_by_reference() {
        let name = String::from("a");
        let port: Option<u16> = None;
        let p = params![name, 5u32, true, port, "t"];
        assert_eq!(
            p,
            &[
                Value::Text("a".into()),
                Value::Int(5),
                Value::Int(1),
                Value::Null,
                Value::Text("t".into())
            ]
        );
        assert_eq!(name, "a");
    }
}
