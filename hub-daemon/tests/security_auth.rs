//! API authentication (issue "Security", part 3): bearer tokens with
//! roles, through a real `hub-daemon serve` process and in-process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use common::hub::Hub;
use common::DaemonProcess;
use hub_daemon::catalog::Role;
use integration_tests::http::{call_as, Response};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn hub_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hub-daemon"))
        .args(args)
        .output()
        .unwrap()
}

fn create_token(data: &str, name: &str, role: &str) -> String {
    let out = hub_cli(&[
        "token",
        "create",
        "--data-dir",
        data,
        "--name",
        name,
        "--role",
        role,
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the token alone on stdout: {stdout:?}");
    lines[0].to_owned()
}

fn assert_refused(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    assert_eq!(j["error"]["status"], status, "{j}");
    assert_eq!(j["error"]["code"], code, "{j}");
    if status == 401 {
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
}

fn vm_body() -> Value {
    json!({"vm_context_id": "c", "disks": [{"disk_id": 0, "size_bytes": MIB, "unit_number": 0}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_and_revocation_is_immediate() {
    let mut hub = Hub::start().await;
    // No token yet, loopback: open (local admin).
    hub.register("vm0", &[MIB]).await;
    assert_eq!(hub.get("/api/v1/vms").await.status, 200);

    let catalog = hub.daemon.as_ref().unwrap().backups().catalog().clone();
    let admin = catalog.create_token("root", Role::Admin).await.unwrap();
    let operator = catalog.create_token("sna", Role::Operator).await.unwrap();
    let reader = catalog.create_token("grafana", Role::Reader).await.unwrap();
    let a = hub.addr;

    // Now every request needs a token; /healthz stays open.
    assert_refused(&hub.get("/api/v1/vms").await, 401, "unauthorized");
    assert_refused(&hub.get("/metrics").await, 401, "unauthorized");
    assert_refused(&hub.get("/api/v1/nope").await, 401, "unauthorized");
    assert_eq!(hub.get("/healthz").await.status, 200);
    for bad in ["hub_0000", "", "Bearer"] {
        let r = call_as(a, Some(bad), "GET", "/api/v1/vms", None).await;
        assert_refused(&r, 401, "unauthorized");
    }
    // A token in another scheme is not a bearer token.
    let basic = format!("Basic {admin}");
    let r = integration_tests::http::request(
        a,
        "GET",
        "/api/v1/vms",
        &[("Authorization", basic.as_str())],
        b"",
    )
    .await;
    assert_refused(&r, 401, "unauthorized");

    // reader: GETs and /metrics, nothing else.
    let r = call_as(a, Some(&reader), "GET", "/api/v1/backups", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call_as(a, Some(&reader), "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    let start = json!({"vm_name": "vm0", "backup_type": "full", "repository_id": "default"});
    let r = call_as(a, Some(&reader), "POST", "/api/v1/backups", Some(&start)).await;
    assert_refused(&r, 403, "forbidden");

    // operator: backups and restores, not VMs or repositories.
    let r = call_as(
        a,
        Some(&operator),
        "PUT",
        "/api/v1/vms/vm1",
        Some(&vm_body()),
    )
    .await;
    assert_refused(&r, 403, "forbidden");
    let repo = json!({"id": "r2", "path": hub.dir.path().join("r2").to_str().unwrap()});
    let r = call_as(
        a,
        Some(&operator),
        "POST",
        "/api/v1/repositories",
        Some(&repo),
    )
    .await;
    assert_refused(&r, 403, "forbidden");
    let r = call_as(a, Some(&operator), "POST", "/api/v1/backups", Some(&start)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let r = call_as(
        a,
        Some(&operator),
        "POST",
        &format!("/api/v1/backups/{id}/abort"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // admin: everything.
    let r = call_as(a, Some(&admin), "PUT", "/api/v1/vms/vm1", Some(&vm_body())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call_as(
        a,
        Some(&admin),
        "DELETE",
        &format!("/api/v1/backups/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());

    // Revoked: 401 on the very next request.
    catalog.revoke_token("sna").await.unwrap();
    let r = call_as(a, Some(&operator), "GET", "/api/v1/vms", None).await;
    assert_refused(&r, 401, "unauthorized");
    // The list shows names and roles, never secrets; use was recorded.
    let listed = catalog.tokens().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["grafana", "root"]);
    assert!(listed.iter().all(|t| t.last_used_at.is_some()));
    hub.token = Some(admin);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_process_with_cli_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_s,
        "--nbd-ports",
        "0",
        "--nbd-shared-port",
        "0",
    ];
    // No token: open on loopback.
    let d = DaemonProcess::start(&args, &[]);
    let r = call_as(d.api, None, "GET", "/api/v1/vms", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(d.terminate(), 0);

    // Tokens created while the daemon is stopped.
    let admin = create_token(data_s, "root", "admin");
    let reader = create_token(data_s, "ro", "reader");
    assert!(admin.starts_with("hub_") && admin.len() == 68, "{admin}");
    assert_ne!(admin, reader);
    let bad = hub_cli(&[
        "token",
        "create",
        "--data-dir",
        data_s,
        "--name",
        "x",
        "--role",
        "root",
    ]);
    assert!(!bad.status.success());

    let log = dir.path().join("daemon.log");
    let d = DaemonProcess::start_logged(
        &args,
        &[("RUST_LOG", "debug")],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let r = call_as(d.api, None, "GET", "/api/v1/vms", None).await;
    assert_refused(&r, 401, "unauthorized");
    let r = call_as(d.api, Some(&reader), "GET", "/api/v1/vms", None).await;
    assert_eq!(r.status, 200);
    let r = call_as(
        d.api,
        Some(&reader),
        "PUT",
        "/api/v1/vms/v",
        Some(&vm_body()),
    )
    .await;
    assert_refused(&r, 403, "forbidden");
    let r = call_as(
        d.api,
        Some(&admin),
        "PUT",
        "/api/v1/vms/v",
        Some(&vm_body()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // list: names and roles, never the secret.
    let out = hub_cli(&["token", "list", "--data-dir", data_s]);
    assert!(out.status.success());
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.contains("root") && listed.contains("admin") && listed.contains("reader"));
    assert!(!listed.contains(&admin[4..]) && !listed.contains(&reader[4..]));

    // Revoked while the daemon runs: refused at once.
    let out = hub_cli(&["token", "revoke", "--data-dir", data_s, "ro"]);
    assert!(out.status.success(), "{out:?}");
    let r = call_as(d.api, Some(&reader), "GET", "/api/v1/vms", None).await;
    assert_refused(&r, 401, "unauthorized");
    assert!(!hub_cli(&["token", "revoke", "--data-dir", data_s, "ro"])
        .status
        .success());
    assert_eq!(d.terminate(), 0);

    // Tokens never reach the log, even at debug level.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("authenticated"), "debug log lacks auth lines");
    for t in [&admin, &reader] {
        assert!(!text.contains(&t[4..]), "a token leaked into the log");
    }
}

#[test]
fn refuses_a_non_loopback_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data_s,
            "--nbd-ports",
            "0",
            "--nbd-shared-port",
            "0",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let out = hub_cli(&serve(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve the API on 0.0.0.0:0 without authentication")
            && err.contains("--insecure-no-auth"),
        "{err}"
    );
    // Through the environment too: HUB_INSECURE_NO_AUTH lets it start.
    let args = serve(&[]);
    let argv: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = DaemonProcess::start(&argv, &[("HUB_INSECURE_NO_AUTH", "true")]);
    assert!(!d.api.ip().is_loopback());
    let api = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), d.api.port());
    let r = rt.block_on(call_as(api, None, "GET", "/api/v1/vms", None));
    assert_eq!(r.status, 200, "--insecure-no-auth serves openly");
    assert_eq!(d.terminate(), 0);
    // With a token it starts, and the token is required.
    let _ = create_token(data_s, "root", "admin");
    let d = DaemonProcess::start(&argv, &[]);
    let api = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), d.api.port());
    let r = rt.block_on(call_as(api, None, "GET", "/api/v1/vms", None));
    assert_refused(&r, 401, "unauthorized");
    assert_eq!(d.terminate(), 0);
}
