//! The catalog over TLS to PostgreSQL: a throw-away cluster of its own
//! (`initdb`/`pg_ctl` from Debian's `postgresql`, as the `postgres` user
//! when run as root) with `ssl = on` and a `pg_hba.conf` that admits only
//! TLS connections (`hostssl`), its certificate from `hub-daemon tls init`.
//! * `sslmode=verify-full&sslrootcert=CA`: connects (by name and by IP),
//!   and the catalog works;
//! * plaintext: refused by the server (so the first case really was TLS);
//! * a CA that did not sign the server's certificate: no connection;
//! * `require` without a CA: refused before connecting.
//!
//! Skipped without PostgreSQL's binaries, failed when
//! `NBD_INTEROP_REQUIRED=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use hub_daemon::catalog::{Catalog, CatalogUrl};
use hub_daemon::model::Repository;

fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Run a PostgreSQL tool, as `postgres` when root (the server refuses to
/// run as root).
fn pg(bin: &Path, tool: &str, args: &[&str]) {
    let exe = bin.join(tool);
    let out = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&exe)
            .args(args)
            .output()
    } else {
        Command::new(&exe).args(args).output()
    }
    .unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cluster that speaks only TLS; stopped when dropped.
struct TlsCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    certs: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    fn start() -> Option<TlsCluster> {
        let Some(bin) = pg_bin() else {
            if std::env::var("NBD_INTEROP_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("PostgreSQL binaries missing (NBD_INTEROP_REQUIRED=1)");
            }
            eprintln!("SKIP: no PostgreSQL binaries under /usr/lib/postgresql");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        hub_daemon::tls::init(&certs, &[]).unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        pg(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        for (from, to) in [
            ("server-cert.pem", "server.crt"),
            ("server-key.pem", "server.key"),
        ] {
            std::fs::copy(certs.join(from), data.join(to)).unwrap();
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let port = integration_tests::ports::loopback_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=localhost -c ssl=on -c fsync=off",
            dir.path().display()
        );
        pg(
            &bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                dir.path().join("log").to_str().unwrap(),
                "-w",
                "-s",
                "-o",
                &opts,
                "start",
            ],
        );
        Some(TlsCluster {
            bin,
            data,
            port,
            certs,
            _dir: dir,
        })
    }

    fn url(&self, host: &str, query: &str) -> CatalogUrl {
        format!("postgres://postgres@{host}:{}/postgres{query}", self.port)
            .parse()
            .unwrap()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.data.to_str().unwrap().to_owned();
        pg(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "-s", "stop"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_speaks_tls_to_postgresql_and_verifies_it() {
    let Some(pg) = TlsCluster::start() else {
        return;
    };
    let ca = pg.certs.join("ca-cert.pem");
    let verified = format!("?sslmode=verify-full&sslrootcert={}", ca.display());
    for host in ["localhost", "127.0.0.1"] {
        let cat = Catalog::connect(&pg.url(host, &verified)).await.unwrap();
        cat.ensure_repository(Repository {
            id: format!("over-tls-{}", host.len()),
            path: "/srv/r".into(),
            node_id: cat.node_id().into(),
            shared: false,
            s3: None,
        })
        .await
        .unwrap();
        assert!(!cat.repositories().await.unwrap().is_empty());
    }

    // The server admits TLS only: plaintext gets nowhere.
    let e = Catalog::connect(&pg.url("localhost", ""))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no encryption"), "{e}");

    // A CA that did not sign the server's certificate: no connection.
    let other = pg._dir.path().join("other");
    hub_daemon::tls::init(&other, &[]).unwrap();
    let wrong = format!(
        "?sslmode=require&sslrootcert={}",
        other.join("ca-cert.pem").display()
    );
    let e = Catalog::connect(&pg.url("localhost", &wrong))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Encryption without verification is not offered.
    let e = "postgres://postgres@localhost/postgres?sslmode=require"
        .parse::<CatalogUrl>()
        .unwrap_err();
    assert!(e.contains("sslrootcert"), "{e}");
}
