//! The client subcommands (`vm`, `repo`, `policy`, `backup`, `restore`,
//! `prune`, `completion`) run as the real binary against a hub in this
//! process, and the README's walkthrough run as written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::hub::Hub;
use integration_tests::support::{
    self, assert_export_gone, assert_identical, require, run_ok, write_file,
};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// `hub-daemon ARGS` with exactly the client environment given (none of
/// the caller's HUB_* variables leak in).
async fn hubd(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub-daemon"));
    c.args(args).kill_on_drop(true);
    for v in [
        "HUB_URL",
        "HUB_TOKEN",
        "HUB_TOKEN_FILE",
        "HUB_CA_CERT",
        "HUB_TIMEOUT",
    ] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().await.unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A client of one hub.
struct Client {
    url: String,
}

impl Client {
    fn of(hub: &Hub) -> Client {
        Client {
            url: format!("http://{}", hub.addr),
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        hubd(&[("HUB_URL", &self.url)], args).await
    }

    /// Must exit 0; stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}:\nstdout: {}\nstderr: {}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// With `--json`: must exit 0 and print JSON.
    async fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}:\n{out}"))
    }

    /// Must exit `code`; stderr.
    async fn fails(&self, code: i32, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert_eq!(
            o.status.code(),
            Some(code),
            "{args:?}:\nstdout: {}\nstderr: {}",
            stdout(&o),
            stderr(&o)
        );
        assert!(o.stdout.is_empty(), "{args:?} printed {}", stdout(&o));
        stderr(&o)
    }
}

/// The line of a human table or `key: value` block starting with `first`.
fn line<'a>(text: &'a str, first: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no line starting with {first:?} in:\n{text}"))
}

fn words(l: &str) -> Vec<&str> {
    l.split_whitespace().collect()
}

fn uris(v: &Value) -> Vec<String> {
    v["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["nbd_uri"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_vm_from_registration_to_a_restored_disk() {
    if !require("nbdcopy") || !require("qemu-img") || !require("nbdinfo") {
        return;
    }
    let mut hub = Hub::start().await;
    let cli = Client::of(&hub);
    let dir = hub.dir.path().to_path_buf();

    // Repositories.
    let offsite = dir.join("offsite");
    let out = cli
        .ok(&["repo", "add", "offsite", offsite.to_str().unwrap()])
        .await;
    assert!(out.contains("offsite"), "{out}");
    let list = cli.ok(&["repo", "list"]).await;
    assert_eq!(words(line(&list, "ID")), ["ID", "PATH"]);
    assert_eq!(
        words(line(&list, "offsite")),
        ["offsite", offsite.canonicalize().unwrap().to_str().unwrap()]
    );
    let repos = cli.json(&["repo", "list"]).await;
    assert!(repos
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "offsite"));
    let show = cli.ok(&["repo", "show", "offsite"]).await;
    assert!(line(&show, "capacity:").ends_with("iB"), "{show}");

    // VMs: from flags, and from a JSON file.
    let out = cli
        .ok(&[
            "vm",
            "put",
            "web01",
            "--context",
            "vm-42",
            "--disk",
            "8M",
            "--disk",
            "4M,label=Data disk",
        ])
        .await;
    assert_eq!(words(line(&out, "context:")), ["context:", "vm-42"]);
    let list = cli.ok(&["vm", "list"]).await;
    assert_eq!(words(line(&list, "web01"))[1..4], ["vm-42", "2", "12.0"]);
    let vm = cli.json(&["vm", "show", "web01"]).await;
    assert_eq!(vm, hub.get("/api/v1/vms/web01").await.json());
    assert_eq!(vm["disks"][1]["disk_key"], 2001);
    assert_eq!(vm["disks"][1]["label"], "Data disk");
    assert_eq!(vm["disks"][1]["size_bytes"], 4 * MIB);
    let body = write_file(
        &dir,
        "web02.json",
        br#"{"vm_context_id": "vm-43", "disks": [{"disk_id": 0, "size_bytes": 1048576}]}"#,
    );
    cli.ok(&["vm", "put", "web02", "--from", body.to_str().unwrap()])
        .await;
    assert_eq!(
        cli.json(&["vm", "show", "web02"]).await["vm_context_id"],
        "vm-43"
    );
    assert_eq!(cli.json(&["vm", "list"]).await.as_array().unwrap().len(), 2);

    // A policy.
    cli.ok(&[
        "policy",
        "put",
        "daily",
        "--keep-last",
        "2",
        "--keep-daily",
        "7",
    ])
    .await;
    let p = cli.json(&["policy", "show", "daily"]).await;
    assert_eq!(
        (p["keep_last"].as_u64(), p["keep_daily"].as_u64()),
        (Some(2), Some(7))
    );
    let list = cli.ok(&["policy", "list"]).await;
    assert_eq!(words(line(&list, "daily"))[1..4], ["2", "0", "7"]);

    // A full backup, written through NBD.
    let started = cli
        .json(&[
            "backup", "start", "web01", "--type", "full", "--repo", "offsite", "--policy", "daily",
            "--tag", "env=prod",
        ])
        .await;
    let id = started["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(started["backup_type"], "full");
    let targets = uris(&started);
    assert_eq!(targets.len(), 2);
    let sources: Vec<PathBuf> = [8 * MIB, 4 * MIB]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            write_file(
                &dir,
                &format!("src{i}.raw"),
                &support::disk_like(7 + i as u64, *n),
            )
        })
        .collect();
    for (src, uri) in sources.iter().zip(&targets) {
        run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), uri]).await;
    }
    let running = cli.ok(&["backup", "list", "--status", "running"]).await;
    assert_eq!(
        words(line(&running, &id))[1..4],
        ["web01", "full", "running"]
    );
    assert!(!cli
        .ok(&["backup", "list", "--status", "completed"])
        .await
        .contains(&id));

    let done = cli
        .ok(&[
            "backup",
            "complete",
            &id,
            "--change-id",
            "0=cid-a",
            "--change-id",
            "1=cid-b",
        ])
        .await;
    assert_eq!(words(line(&done, "status:")), ["status:", "completed"]);
    assert!(words(line(&done, "0")).contains(&"cid-a"), "{done}");
    assert!(words(line(&done, "1")).contains(&"cid-b"), "{done}");

    let list = cli.json(&["backup", "list", "--vm", "web01"]).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["status"], "completed");
    assert_eq!(list[0]["repository_id"], "offsite");
    assert_eq!(list[0]["policy_id"], "daily");
    assert_eq!(list[0]["tags"]["env"], "prod");
    let human = cli.ok(&["backup", "list"]).await;
    assert_eq!(
        words(line(&human, &id))[1..5],
        ["web01", "full", "completed", "offsite"]
    );
    // --json is the API's answer, nothing added or lost.
    let shown = cli.json(&["backup", "show", &id]).await;
    assert_eq!(
        shown,
        hub.get(&format!("/api/v1/backups/{id}")).await.json()
    );
    let human = cli.ok(&["backup", "show", &id]).await;
    assert_eq!(words(line(&human, "tags:")), ["tags:", "env=prod"]);

    // Restore and read back.
    let restore = cli.json(&["restore", "start", &id]).await;
    let served = uris(&restore);
    assert_eq!(served.len(), 2);
    for (i, (src, uri)) in sources.iter().zip(&served).enumerate() {
        let back = dir.join(format!("back{i}.raw"));
        run_ok("nbdcopy", &[uri, back.to_str().unwrap()]).await;
        assert_identical("raw", src.to_str().unwrap(), "raw", back.to_str().unwrap()).await;
    }
    let out = cli.ok(&["restore", "stop", &id]).await;
    assert!(out.contains("stopped"), "{out}");
    for uri in &served {
        assert_export_gone(uri).await;
    }
    // Instant restore: writable exports, writes read back, the restore
    // point unchanged afterwards.
    let restore = cli.json(&["restore", "start", "--writable", &id]).await;
    assert_eq!(restore["writable"], true);
    let served = uris(&restore);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 64k",
            "-c",
            "read -P 0x77 0 64k",
            &served[0],
        ],
    )
    .await;
    assert!(!out.contains("failed"), "{out}");
    let out = cli.ok(&["restore", "stop", &id]).await;
    assert!(out.contains("stopped"), "{out}");
    let restore = cli.json(&["restore", "start", &id]).await;
    assert_eq!(restore["writable"], false);
    let back = dir.join("back-after-instant.raw");
    run_ok("nbdcopy", &[&uris(&restore)[0], back.to_str().unwrap()]).await;
    assert_identical(
        "raw",
        sources[0].to_str().unwrap(),
        "raw",
        back.to_str().unwrap(),
    )
    .await;
    cli.ok(&["restore", "stop", &id]).await;

    // Retention plan: the one backup is kept by the "last" rule.
    let plan = cli.json(&["prune", "--dry-run", "--vm", "web01"]).await;
    let report = &plan.as_array().unwrap()[0];
    assert_eq!(report["repository_id"], "offsite");
    assert_eq!(report["keep"][0]["backup_id"], id.as_str());
    assert_eq!(report["remove"].as_array().unwrap().len(), 0);
    let human = cli.ok(&["prune", "--dry-run"]).await;
    assert!(human.starts_with("dry run"), "{human}");
    assert_eq!(words(line(&human, "keep"))[1], id);

    // A real prune: with the policy down to one restore point and a newer
    // full backup, the first one goes.
    cli.ok(&["policy", "put", "daily", "--keep-last", "1"])
        .await;
    let newer = cli
        .json(&[
            "backup", "start", "web01", "--type", "full", "--repo", "offsite", "--policy", "daily",
        ])
        .await;
    let newer_id = newer["backup_id"].as_str().unwrap().to_owned();
    for (src, uri) in sources.iter().zip(&uris(&newer)) {
        run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), uri]).await;
    }
    cli.ok(&["backup", "complete", &newer_id]).await;
    let out = cli.ok(&["prune", "--vm", "web01"]).await;
    assert!(out.contains("1 kept, 1 removed"), "{out}");
    assert_eq!(words(line(&out, "remove")), ["remove", id.as_str()]);
    let left = cli.json(&["backup", "list", "--vm", "web01"]).await;
    let left: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [newer_id.as_str()]);

    // A policy named by a backup stays; an unused one goes.
    let err = cli.fails(1, &["policy", "rm", "daily"]).await;
    assert!(err.contains("HTTP 409 conflict"), "{err}");
    cli.ok(&["policy", "put", "spare"]).await;
    assert!(cli.ok(&["policy", "rm", "spare"]).await.contains("removed"));
    let policies = cli.json(&["policy", "list"]).await;
    assert_eq!(policies.as_array().unwrap().len(), 1, "{policies}");

    // Verify in the background; show tells "verifying" or the outcome.
    let out = cli.ok(&["backup", "verify", &newer_id]).await;
    assert!(
        out.starts_with(&format!("verification of {newer_id} started")),
        "{out}"
    );

    // Abort and delete a second backup.
    let second = cli
        .json(&["backup", "start", "web02", "--type", "full"])
        .await;
    let id2 = second["backup_id"].as_str().unwrap().to_owned();
    let aborted = cli
        .json(&["backup", "abort", &id2, "--reason", "changed my mind"])
        .await;
    assert_eq!(aborted["status"], "failed");
    assert_eq!(aborted["error"], "changed my mind");
    let out = cli.ok(&["backup", "rm", &id2]).await;
    assert!(out.contains("deleted"), "{out}");
    let err = cli.fails(1, &["backup", "show", &id2]).await;
    assert!(err.contains(&format!("backup {id2:?} not found")), "{err}");

    // And the VM.
    assert!(cli.ok(&["vm", "rm", "web02"]).await.contains("removed"));
    let err = cli.fails(1, &["vm", "show", "web02"]).await;
    assert!(
        err.contains("VM \"web02\" not found") && err.contains("404"),
        "{err}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_with_their_code_and_the_api_message() {
    let mut hub = Hub::start().await;
    let cli = Client::of(&hub);

    // 1: the API refused; its message, not ours.
    let err = cli.fails(1, &["backup", "show", "nope"]).await;
    assert_eq!(
        err.trim(),
        "error: backup \"nope\" not found (HTTP 404 not_found)"
    );
    let err = cli
        .fails(
            1,
            &["vm", "put", "bad/name", "--context", "c", "--disk", "1M"],
        )
        .await;
    assert!(err.contains("HTTP 4"), "{err}");
    let err = cli
        .fails(1, &["vm", "put", "v", "--context", "c", "--disk", "1000"])
        .await;
    assert!(
        err.contains("multiple of 512") && err.contains("HTTP 400"),
        "{err}"
    );

    // 2: usage, before any request.
    cli.fails(2, &["backup", "start"]).await;
    cli.fails(2, &["vm", "put", "v", "--context", "c", "--disk", "8X"])
        .await;
    cli.fails(2, &["backup", "list", "--status", "sleeping"])
        .await;
    let missing = hub.dir.path().join("missing.json");
    let err = cli
        .fails(2, &["vm", "put", "v", "--from", missing.to_str().unwrap()])
        .await;
    assert!(err.contains("missing.json"), "{err}");
    let err = cli.fails(2, &["vm", "list", "--hub", "ftp://x"]).await;
    assert!(err.contains("http://"), "{err}");

    // 3: nobody listening.
    let port = common::hub::free_port();
    let down = format!("http://127.0.0.1:{port}");
    let o = hubd(&[], &["vm", "list", "--hub", &down]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the hub"),
        "{}",
        stderr(&o)
    );

    // Tokens: 401 without or with a bad one, through with the right one
    // from the environment or a file.
    let catalog = hub.daemon.as_ref().unwrap().backups().catalog().clone();
    let admin = catalog
        .create_token("root", hub_daemon::catalog::Role::Admin)
        .await
        .unwrap();
    let err = cli.fails(1, &["vm", "list"]).await;
    assert!(err.contains("HTTP 401 unauthorized"), "{err}");
    let url = cli.url.as_str();
    let o = hubd(
        &[("HUB_URL", url), ("HUB_TOKEN", "hub_0000")],
        &["vm", "list"],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("HTTP 401 unauthorized"),
        "{}",
        stderr(&o)
    );
    let o = hubd(&[("HUB_URL", url), ("HUB_TOKEN", &admin)], &["vm", "list"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("NAME"), "{}", stdout(&o));
    let file = write_file(hub.dir.path(), "token", format!("{admin}\n").as_bytes());
    let o = hubd(
        &[("HUB_URL", url), ("HUB_TOKEN", "hub_0000")],
        &["vm", "list", "--token-file", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "the file wins: {}", stderr(&o));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_hub_is_reached_through_its_ca_only() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("creds");
    let other = tmp.path().join("other");
    hub_daemon::tls::init(&creds, &[]).unwrap();
    hub_daemon::tls::init(&other, &[]).unwrap();
    let mut hub = Hub::start_configured(|c| {
        c.api_tls = true;
        c.nbd_tls.certificates = Some(creds.clone());
    })
    .await;
    let url = format!("https://localhost:{}", hub.addr.port());
    let ca = creds.join("ca-cert.pem");
    let o = hubd(
        &[("HUB_URL", &url), ("HUB_CA_CERT", ca.to_str().unwrap())],
        &["vm", "list", "--json"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[]\n");
    // No CA: a usage error that says what to give.
    let o = hubd(&[("HUB_URL", &url)], &["vm", "list"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--ca-cert"), "{}", stderr(&o));
    // Another CA: the handshake fails, the hub is not reached.
    let wrong = other.join("ca-cert.pem");
    let o = hubd(
        &[("HUB_URL", &url)],
        &["vm", "list", "--ca-cert", wrong.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_scripts_know_the_client_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let o = hubd(&[], &["completion", shell]).await;
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let script = stdout(&o);
        for word in [
            "backup",
            "restore",
            "prune",
            "dry-run",
            "change-id",
            "serve",
        ] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let o = hubd(&[], &["completion", "tcsh"]).await;
    assert_eq!(o.status.code(), Some(2));
}

/// The README's shell block after `<!-- walkthrough: NAME`.
fn readme_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- walkthrough: {name}"))
        .unwrap_or_else(|| panic!("README has no {name} walkthrough"));
    let rest = &readme[start..];
    let open = rest.find("```sh\n").unwrap() + "```sh\n".len();
    let len = rest[open..].find("```\n").unwrap();
    rest[open..open + len].to_owned()
}

/// Run a README block with bash (-e: every command must succeed) in a
/// fresh directory against a fresh hub, the binary first on PATH.
async fn run_walkthrough(name: &str) {
    let mut hub = Hub::start().await;
    let work = hub.dir.path().join(format!("walk-{name}"));
    std::fs::create_dir(&work).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_hub-daemon"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:/usr/bin:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = readme_block(name);
    let o = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&work)
        .env("PATH", path)
        .env("HUB_URL", format!("http://{}", hub.addr))
        .env_remove("HUB_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(
        o.status.success(),
        "{name} walkthrough failed:\n{script}\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).ends_with("restored\n"), "{}", stdout(&o));
    // It really went through the hub: one completed backup of web01.
    let list = hub
        .get("/api/v1/backups?vm_name=web01&status=completed")
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_as_written() {
    for tool in ["nbdcopy", "jq", "curl", "cmp", "head"] {
        if !require(tool) {
            return;
        }
    }
    run_walkthrough("cli").await;
    run_walkthrough("curl").await;
}
