//! A fresh catalog on each backend: SQLite in a temporary directory, or a
//! PostgreSQL database of its own (random name, dropped afterwards) on the
//! server at `HUB_TEST_POSTGRES_URL`, so tests run in parallel.
// Each test binary uses a part of this.
#![allow(dead_code)]

use hub_daemon::catalog::{Catalog, CatalogUrl};

/// The server the PostgreSQL cases use (`postgres://user@host:port`; a
/// database name in it is ignored: each test makes its own).
pub const PG_ENV: &str = "HUB_TEST_POSTGRES_URL";

/// One test's database.
pub struct Fixture {
    pub url: CatalogUrl,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

impl Fixture {
    /// A fresh SQLite catalog.
    pub fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            url: CatalogUrl::Sqlite(dir.path().join("catalog.sqlite")),
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A fresh PostgreSQL database, or `None` (after printing a skip
    /// line) when no server is configured; with `NBD_INTEROP_REQUIRED=1`
    /// a missing server fails the test instead.
    pub fn postgres() -> Option<Fixture> {
        let Ok(server) = std::env::var(PG_ENV) else {
            if std::env::var("NBD_INTEROP_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("{PG_ENV} is not set (NBD_INTEROP_REQUIRED=1): no PostgreSQL to test on");
            }
            eprintln!("SKIP: {PG_ENV} not set, PostgreSQL cases not run");
            return None;
        };
        let db = PgDatabase::create(&server);
        Some(Fixture {
            url: CatalogUrl::Postgres(db.url.clone()),
            _dir: None,
            pg: Some(db),
        })
    }

    /// A new catalog handle (a connection of its own: another hub).
    pub async fn open(&self) -> Catalog {
        Catalog::connect(&self.url).await.unwrap()
    }

    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }
}

/// A database created for one test, dropped with it.
pub struct PgDatabase {
    admin: String,
    name: String,
    pub url: String,
}

/// `url` without its path (database) but with its query.
fn server_part(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    (format!("{scheme}://{authority}"), query)
}

/// Run `f` on a thread of its own: the sync client must not run (or be
/// dropped) on an async thread.
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

impl PgDatabase {
    fn create(server: &str) -> PgDatabase {
        let (base, query) = server_part(server);
        let admin = format!("{base}/postgres{query}");
        let name = format!(
            "hubtest_{}",
            hub_daemon::secret::hex(&hub_daemon::secret::random_bytes::<8>().unwrap())
        );
        let (a, n) = (admin.clone(), name.clone());
        off_runtime(move || {
            let mut c = postgres::Client::connect(&a, postgres::NoTls)
                .unwrap_or_else(|e| panic!("connecting to the test server: {e}"));
            // C collation: text sorts by bytes, as on SQLite.
            c.batch_execute(&format!(
                "CREATE DATABASE {n} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .unwrap();
        });
        PgDatabase {
            url: format!("{base}/{name}{query}"),
            admin,
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (a, n) = (self.admin.clone(), self.name.clone());
        off_runtime(move || {
            if let Ok(mut c) = postgres::Client::connect(&a, postgres::NoTls) {
                // FORCE: a catalog handle may still be closing its connection.
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"));
            }
        });
    }
}

/// `catalog_case!(name)`: run `cases::name(&Fixture)` once on SQLite and
/// once on PostgreSQL, as `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! catalog_cases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = $crate::catalog::fixture::Fixture::sqlite();
                    $crate::cases::$name(&f).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(f) = $crate::catalog::fixture::Fixture::postgres() else {
                        return;
                    };
                    $crate::cases::$name(&f).await;
                }
            )*
        }
    };
}
