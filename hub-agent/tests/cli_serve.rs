//! `hub-agent serve` as a process: configuration file, token from the
//! environment, command-line sources added to the file's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

use integration_tests::http::call_as;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn serve_reads_its_config_and_checks_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.raw");
    std::fs::write(&disk, vec![0u8; 65536]).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[sources]\n\"vm1/2000\" = {:?}\n",
            dir.path().join("state"),
            disk
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub-agent"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .arg("--source")
        .arg(format!("vm1/2001={}", disk.display()))
        .env("HUB_AGENT_TOKEN", "tok")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let l = lines.next_line().await.unwrap().expect("serve exited");
        if let Some(a) = l.split("listening on ").nth(1) {
            break a.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let body = json!({
        "contract": sna_contract::CONTRACT, "backup_id": "b", "vm_name": "vm1",
        "vm_context_id": "c", "backup_type": "full",
        "disks": [
            {"disk_id": 0, "disk_key": 2000, "size_bytes": 65536, "mode": "full"},
            {"disk_id": 1, "disk_key": 2001, "size_bytes": 65536, "mode": "incremental", "parent_change_id": "x"},
        ],
    });
    let r = call_as(
        addr,
        Some("tok"),
        "POST",
        "/v1/backups/prepare",
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["disks"][1]["mode"], "full");
    let r = call_as(addr, None, "POST", "/v1/backups/prepare", Some(&body)).await;
    assert_eq!(r.status, 401);
    child.kill().await.unwrap();
}
