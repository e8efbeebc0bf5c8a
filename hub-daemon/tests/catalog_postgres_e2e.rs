//! A real `hub-daemon serve --catalog postgres://…` process: a full backup
//! through NBD (nbdcopy), its completion, the second-backup refusal, and a
//! restart that finds it all again — with nothing written to an SQLite
//! file. Needs `HUB_TEST_POSTGRES_URL` (see tests/catalog/fixture.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog {
    pub mod fixture;
}
mod common;

use catalog::fixture::Fixture;
use common::hub::parse_targets;
use common::DaemonProcess;
use hub_daemon::catalog::{Catalog, CatalogUrl};
use integration_tests::http::call;
use integration_tests::support::{self, require, run_ok, write_file};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_a_postgres_catalog() {
    if !require("nbdcopy") {
        return;
    }
    let Some(f) = Fixture::postgres() else {
        return;
    };
    let CatalogUrl::Postgres(url) = &f.url else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The URL through the environment (HUB_CATALOG), as a service would.
    let d = DaemonProcess::start_in_with(&data, &["--node-id", "pg1"], &[("HUB_CATALOG", url)]);
    let r = call(
        d.api,
        "PUT",
        "/api/v1/vms/pgvm",
        Some(&json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": 4 * MIB, "unit_number": 0}]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // On PostgreSQL each node has its own built-in repository.
    let start = json!({"vm_name": "pgvm", "backup_type": "full", "repository_id": "default-pg1"});
    let r = call(d.api, "POST", "/api/v1/backups", Some(&start)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    assert_eq!(b["node_id"], "pg1", "{b}");
    let id = b["backup_id"].as_str().unwrap().to_owned();
    // A second backup of the VM while this one runs: the database refuses.
    let r = call(d.api, "POST", "/api/v1/backups", Some(&start)).await;
    assert_eq!(r.status, 409, "{}", r.text());

    let src = write_file(
        dir.path(),
        "s0.raw",
        &support::disk_like(7, 4 * MIB as usize),
    );
    let targets = parse_targets(b["nbd_targets_string"].as_str().unwrap());
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &targets[0].1],
    )
    .await;
    let r = call(
        d.api,
        "POST",
        &format!("/api/v1/backups/{id}/complete"),
        Some(&json!({"disks": [{"disk_id": 0, "change_id": "c0"}]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.terminate(), 0);

    // The rows are in PostgreSQL, and no SQLite catalog was made.
    assert!(!data.join("catalog.sqlite").exists());
    let cat = Catalog::connect(&f.url).await.unwrap();
    let rec = cat.backup(&id).await.unwrap().unwrap();
    assert_eq!(rec.status, "completed");
    assert!(rec.disks[0].digest.is_some());
    assert!(rec.disks[0].nbd_port.is_none());
    drop(cat);

    // A restarted hub on the same catalog serves the restore point.
    let d = DaemonProcess::start_in_with(&data, &["--node-id", "pg1"], &[("HUB_CATALOG", url)]);
    let r = call(d.api, "GET", &format!("/api/v1/backups/{id}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "completed");
    assert_eq!(d.terminate(), 0);
}
