//! A backup whose client connects and then goes silent fails by the idle
//! timeout: an open connection is not activity, only requests are.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::hub::{eventually, parse_targets, Hub};
use integration_tests::client::Client;

const MIB: u64 = 1 << 20;

/// A hub with a one-disk backup running: (hub, backup id, NBD address,
/// export name).
async fn one_disk_backup(idle: Duration) -> (Hub, String, SocketAddr, String) {
    let hub = Hub::start_with(8, 0, idle).await;
    hub.register("vm", &[MIB]).await;
    let b = hub.backup("vm", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let targets = parse_targets(b["nbd_targets_string"].as_str().unwrap());
    let uri = targets[0].1.trim_start_matches("nbd://").to_owned();
    let (addr, name) = uri.split_once('/').unwrap();
    (hub, id, addr.parse().unwrap(), name.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_keep_a_backup_alive() {
    let idle = Duration::from_secs(2);
    let (mut hub, id, addr, name) = one_disk_backup(idle).await;

    // The SNA finishes the handshake, does one request, then sends nothing.
    let mut client = tokio::task::spawn_blocking(move || {
        let mut c = Client::connect(addr, &name).unwrap();
        c.write(0, &[1u8; 512]).unwrap();
        c
    })
    .await
    .unwrap();
    let silent_since = Instant::now();

    let rec = eventually(30, || {
        let (addr, id) = (hub.addr, id.clone());
        async move {
            let j =
                integration_tests::http::call(addr, "GET", &format!("/api/v1/backups/{id}"), None)
                    .await
                    .json();
            (j["status"] == "failed").then_some(j)
        }
    })
    .await;
    // Not before the idle timeout, counted from the last request.
    assert!(silent_since.elapsed() >= idle, "failed too early");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("no NBD client activity"),
        "{rec}"
    );
    // The failed backup's export is gone, and so is the silent connection.
    let read = tokio::task::spawn_blocking(move || client.read(0, 512))
        .await
        .unwrap();
    assert!(
        read.is_err(),
        "silent connection still served after the abort"
    );
    hub.stop().await;
}

/// Reconnecting over and over without a request is not activity either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_without_requests_does_not_keep_a_backup_alive() {
    let idle = Duration::from_secs(2);
    let (mut hub, id, addr, name) = one_disk_backup(idle).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let churn = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match Client::connect(addr, &name) {
                Ok(c) => {
                    let _ = c.disconnect();
                    n += 1;
                }
                Err(_) => break, // the export is gone
            }
        }
        n
    });
    let rec = eventually(30, || {
        let (addr, id) = (hub.addr, id.clone());
        async move {
            let j =
                integration_tests::http::call(addr, "GET", &format!("/api/v1/backups/{id}"), None)
                    .await
                    .json();
            (j["status"] == "failed").then_some(j)
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let connections = churn.await.unwrap();
    assert!(
        connections > 10,
        "the client kept reconnecting ({connections})"
    );
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("no NBD client activity"),
        "{rec}"
    );
    hub.stop().await;
}
