//! The `catalog` workload (opt-in): API latency of `POST /api/v1/backups`
//! with the catalog in SQLite and in PostgreSQL (issue 14).
//!
//! A hub runs in this process (2 workers, ephemeral NBD ports) on each
//! catalog; a VM of one 1 GiB disk is registered, then `--catalog-cycles`
//! times: `POST /api/v1/backups` (timed, from sending the request to the
//! answer: plan, catalog insert, export bring-up, port record) and `POST
//! …/abort` (not timed). Figures: median and p99 in milliseconds per
//! repetition. PostgreSQL is the server at `--catalog-postgres` (e.g. the
//! throw-away cluster `scripts/test.sh` makes); each repetition uses a
//! fresh database on it, created and dropped here.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::report::Sample;
use crate::workloads::Run;

/// A hub on one catalog.
struct Hub {
    rt: tokio::runtime::Runtime,
    daemon: Option<hub_daemon::app::Daemon>,
}

/// The bench hub's node id (its built-in repository is named after it on
/// PostgreSQL).
const BENCH_NODE: &str = "bench";

impl Hub {
    fn start(data_dir: &Path, catalog: hub_daemon::catalog::CatalogUrl) -> anyhow::Result<Hub> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let config = hub_daemon::config::Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data_dir.to_path_buf(),
            catalog: Some(catalog),
            nbd_ports: hub_daemon::config::PortRange::Ephemeral { capacity: 64 },
            nbd_shared_port: 0,
            prune_interval: None,
            node_id: BENCH_NODE.into(),
            ..Default::default()
        };
        let daemon = rt.block_on(hub_daemon::app::Daemon::start(config))?;
        Ok(Hub {
            rt,
            daemon: Some(daemon),
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let addr = self.daemon.as_ref().context("hub stopped")?.api_addr;
        let (status, v) = self
            .rt
            .block_on(crate::handoff::call(addr, method, path, body))?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(d) = self.daemon.take() {
            self.rt.block_on(d.shutdown())?;
        }
        Ok(())
    }
}

/// A database of its own on the server at `server` (created now, dropped
/// by `drop_database`).
fn create_database(server: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = split_server(server)?;
    let mut c = postgres::Client::connect(&format!("{base}/postgres{query}"), postgres::NoTls)
        .context("connecting to --catalog-postgres")?;
    c.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))?;
    Ok(format!("{base}/{name}{query}"))
}

fn drop_database(server: &str, name: &str) -> anyhow::Result<()> {
    let (base, query) = split_server(server)?;
    let mut c = postgres::Client::connect(&format!("{base}/postgres{query}"), postgres::NoTls)?;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
    Ok(())
}

/// `postgres://user@host:port[/db][?query]` as (without path, `?query`).
fn split_server(url: &str) -> anyhow::Result<(String, String)> {
    let (scheme, rest) = url
        .split_once("://")
        .context("--catalog-postgres is not a postgres:// URL")?;
    let (before, query) = match rest.split_once('?') {
        Some((a, q)) => (a, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before.split('/').next().unwrap_or_default();
    Ok((format!("{scheme}://{authority}"), query))
}

/// The `p`-quantile (0..=1) of sorted `v` (nearest rank).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Run {
    /// One repetition on SQLite and, with `postgres`, on PostgreSQL.
    pub fn catalog(
        &mut self,
        rep: usize,
        cycles: usize,
        postgres: Option<&str>,
    ) -> anyhow::Result<()> {
        let dir = self.workdir.join("catalog");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut backends = vec![(
            "sqlite",
            hub_daemon::catalog::CatalogUrl::Sqlite(dir.join("sqlite-data/catalog.sqlite")),
            None,
        )];
        if let Some(server) = postgres {
            let name = format!("hub_bench_{}_{rep}", std::process::id());
            let url = create_database(server, &name)?;
            backends.push((
                "postgres",
                hub_daemon::catalog::CatalogUrl::Postgres(url),
                Some(name),
            ));
        }
        for (server, url, db) in backends {
            self.progress(format!("catalog: {server}, {cycles} POST /backups"));
            let result = self.catalog_one(&dir.join(format!("{server}-data")), url, cycles);
            if let (Some(name), Some(s)) = (db, postgres) {
                drop_database(s, &name)?;
            }
            let mut ms = result.with_context(|| format!("catalog on {server}"))?;
            ms.sort_by(f64::total_cmp);
            for (test, v) in [
                ("catalog_post_backups_p50_ms", quantile(&ms, 0.5)),
                ("catalog_post_backups_p99_ms", quantile(&ms, 0.99)),
            ] {
                self.samples.push(Sample {
                    server: server.into(),
                    test: test.into(),
                    rep,
                    value: v,
                    unit: "ms".into(),
                });
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn catalog_one(
        &mut self,
        data_dir: &Path,
        url: hub_daemon::catalog::CatalogUrl,
        cycles: usize,
    ) -> anyhow::Result<Vec<f64>> {
        std::fs::create_dir_all(data_dir)?;
        let backend = match url {
            hub_daemon::catalog::CatalogUrl::Sqlite(_) => hub_daemon::catalog::Backend::Sqlite,
            hub_daemon::catalog::CatalogUrl::Postgres(_) => hub_daemon::catalog::Backend::Postgres,
        };
        let repo = hub_daemon::app::builtin_repository_id(backend, BENCH_NODE);
        let hub = Hub::start(data_dir, url)?;
        let vm = json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 1u64 << 30, "unit_number": 0}]});
        hub.call("PUT", "/api/v1/vms/catvm", Some(&vm))?;
        let body = json!({"vm_name": "catvm", "backup_type": "full", "repository_id": repo});
        let mut ms = Vec::with_capacity(cycles);
        for _ in 0..cycles {
            let t = Instant::now();
            let b = hub.call("POST", "/api/v1/backups", Some(&body))?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            let id = b["backup_id"].as_str().context("no backup_id")?;
            hub.call("POST", &format!("/api/v1/backups/{id}/abort"), None)?;
        }
        hub.stop()?;
        Ok(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_urls() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 100.0);
        assert_eq!(quantile(&v, 0.99), 198.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        let (b, q) = split_server("postgres://u@h:5/db?sslmode=disable").unwrap();
        assert_eq!(
            (b.as_str(), q.as_str()),
            ("postgres://u@h:5", "?sslmode=disable")
        );
    }
}
