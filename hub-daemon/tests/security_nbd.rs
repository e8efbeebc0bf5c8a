//! Exports only their owner can reach (issue "Security", part 2), judged
//! by nbdinfo: export names are unguessable capabilities, the shared port
//! lists nothing unless the operator asks, the old predictable names reach
//! nothing, and no server-side path is ever sent to a client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::hub::{config, free_port, Hub};
use common::Exporter;
use hub_daemon::app::Daemon;
use integration_tests::support::{require, run, run_ok};
use serde_json::Value;

const MIB: u64 = 1 << 20;

async fn list(addr: &str) -> Vec<String> {
    let out = run_ok("nbdinfo", &["--list", "--json", &format!("nbd://{addr}")]).await;
    let j: Value = serde_json::from_str(&out).unwrap();
    j["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["export-name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// nbdinfo's verdict on `uri`: exit status and what it said, with the
/// requested name blanked (so refusals of different names compare equal).
async fn refusal(uri: &str, name: &str) -> (Option<i32>, String) {
    let out = run("nbdinfo", &["--size", uri]).await;
    let err = String::from_utf8_lossy(&out.stderr).replace(name, "NAME");
    (out.status.code(), err)
}

async fn info(uri: &str) -> Value {
    let out = run_ok("nbdinfo", &["--json", uri]).await;
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_exports_are_capabilities() {
    if !require("nbdinfo") || !require("nbdcopy") {
        return;
    }
    let shared = free_port();
    let mut hub = Hub::start_with(8, shared, Duration::from_secs(3600)).await;
    hub.register("web01", &[4 * MIB, 2 * MIB]).await;
    let b = hub.backup("web01", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let disks = b["disk_results"].as_array().unwrap().clone();
    let name0 = disks[0]["nbd_export_name"].as_str().unwrap().to_owned();
    let name1 = disks[1]["nbd_export_name"].as_str().unwrap().to_owned();
    let port0 = disks[0]["nbd_port"].as_u64().unwrap();

    // <backup_id>-disk0-<32 hex>: 128 random bits after the readable part.
    let random = name0
        .strip_prefix(&format!("{id}-disk0-"))
        .unwrap_or_else(|| panic!("{name0}"));
    assert_eq!(random.len(), 32, "{name0}");
    assert!(random.bytes().all(|c| c.is_ascii_hexdigit()), "{name0}");

    // Listing the shared port (or a disk's own port) shows nothing.
    let shared_addr = format!("127.0.0.1:{shared}");
    assert_eq!(list(&shared_addr).await, Vec::<String>::new());
    assert_eq!(
        list(&format!("127.0.0.1:{port0}")).await,
        Vec::<String>::new()
    );

    // The old predictable name, the default name and a near miss reach
    // nothing, on the shared port and on the disk's own port; and another
    // disk's (valid) name on disk 0's port is refused the same way.
    let guessed = format!("{id}-disk0");
    let unknown = refusal(&format!("nbd://{shared_addr}/{guessed}"), &guessed).await;
    assert_ne!(unknown.0, Some(0), "guessed name reached an export");
    for (uri, name) in [
        (format!("nbd://{shared_addr}/"), String::new()),
        (
            format!("nbd://127.0.0.1:{port0}/{guessed}"),
            guessed.clone(),
        ),
        (format!("nbd://127.0.0.1:{port0}/"), String::new()),
        (format!("nbd://127.0.0.1:{port0}/{name1}"), name1.clone()),
        (
            format!("nbd://{shared_addr}/{}", &name0[..name0.len() - 1]),
            name0[..name0.len() - 1].to_owned(),
        ),
    ] {
        let r = refusal(&uri, &name).await;
        assert_ne!(r.0, Some(0), "{uri} reached an export");
        if !name.is_empty() {
            assert_eq!(r, unknown, "{uri} is refused differently");
        }
    }

    // The capability works, and the description carries no path and no
    // VM internals.
    let j = info(&format!("nbd://{shared_addr}/{name0}")).await;
    let desc = j["exports"][0]["description"].as_str().unwrap_or("");
    assert_eq!(desc, "backup disk 0");
    assert!(!j.to_string().contains(hub.repo().to_str().unwrap()));
    assert!(!j.to_string().contains("Hard disk"), "{j}");
    assert_eq!(
        run_ok(
            "nbdinfo",
            &["--size", disks[0]["nbd_uri"].as_str().unwrap()]
        )
        .await
        .trim(),
        (4 * MIB).to_string()
    );
    hub.complete(&id).await;

    // Restore exports: random names too, read-only, not listed, no paths.
    let r = hub
        .post(&format!("/api/v1/backups/{id}/restore"), Value::Null)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = r.json();
    let rd = &r["disk_results"][0];
    let rname = rd["nbd_export_name"].as_str().unwrap();
    let rrandom = rname
        .strip_prefix(&format!("restore-{id}-disk0-"))
        .unwrap_or_else(|| panic!("{rname}"));
    assert_eq!(rrandom.len(), 32);
    assert_ne!(rrandom, random);
    let ruri = rd["nbd_uri"].as_str().unwrap();
    let out = run("nbdinfo", &["--can", "write", ruri]).await;
    assert_eq!(out.status.code(), Some(2), "restore export is writable");
    let guessed = format!("restore-{id}-disk0");
    let r2 = refusal(&format!("nbd://{shared_addr}/{guessed}"), &guessed).await;
    assert_eq!(r2, unknown);
    assert_eq!(list(&shared_addr).await, Vec::<String>::new());
    let j = info(ruri).await;
    assert_eq!(j["exports"][0]["description"], "restore disk 0");
    assert!(!j.to_string().contains(hub.repo().to_str().unwrap()));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_can_turn_listing_on() {
    if !require("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = free_port();
    let mut c = config(
        &dir.path().join("data"),
        4,
        shared,
        Duration::from_secs(3600),
    );
    c.nbd_list_exports = true;
    let daemon = Daemon::start(c).await.unwrap();
    let hub = Hub {
        addr: daemon.api_addr,
        daemon: Some(daemon),
        dir,
        token: None,
    };
    hub.register("vm1", &[MIB]).await;
    let b = hub.backup("vm1", "full").await;
    let name = b["disk_results"][0]["nbd_export_name"].as_str().unwrap();
    assert_eq!(
        list(&format!("127.0.0.1:{shared}")).await,
        vec![name.to_owned()]
    );
    let mut hub = hub;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_command_never_sends_image_paths() {
    if !require("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("secret-location.qcow2");
    let spec = format!("disk0={}", img.display());
    let ex = Exporter::start(&["--listen", "127.0.0.1:0", "--create", "1M", &spec]);
    let (_, addr, uri) = ex.exports[0].clone();
    // Listing stays on by default (qemu-nbd drop-in); described by name.
    let out = run_ok("nbdinfo", &["--list", "--json", &format!("nbd://{addr}")]).await;
    assert!(!out.contains("secret-location"), "{out}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["exports"][0]["export-name"], "disk0");
    assert_eq!(j["exports"][0]["description"], "disk0");
    let j = info(&uri).await;
    assert!(!j.to_string().contains("secret-location"), "{j}");
    assert_eq!(ex.terminate(), 0);

    // --description TEXT, and --no-list.
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--no-list",
        "--description",
        "nightly disk",
        &spec,
    ]);
    let (_, addr, uri) = ex.exports[0].clone();
    assert_eq!(list(&addr.to_string()).await, Vec::<String>::new());
    let j = info(&uri).await;
    assert_eq!(j["exports"][0]["description"], "nightly disk");
    assert_eq!(ex.terminate(), 0);
}
