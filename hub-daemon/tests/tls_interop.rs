//! NBD over TLS judged by real clients (issue "Security", part 1): nbdinfo,
//! nbdcopy, qemu-img, qemu-io and qemu-nbd -L against `hub-daemon export`
//! and the hub's backup exports, with and without client certificates;
//! plaintext clients against `--tls require`, clients with a certificate
//! from another CA, clients without one, and the STARTTLS injection attack
//! are all refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::hub::{config, parse_targets};
use common::Exporter;
use hub_daemon::app::Daemon;
use hub_daemon::tls::{NbdTls, TlsSetting};
use integration_tests::support::{assert_identical, disk_like, require, run, run_ok, write_file};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

fn tools() -> bool {
    ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd"]
        .iter()
        .all(|t| require(t))
}

/// `hub-daemon tls init` into `dir`.
fn init(dir: &Path) {
    hub_daemon::tls::init(dir, &[]).unwrap();
}

/// A client credentials directory: the CA it trusts from `ca`, and the
/// client certificate and key from `client` (if any).
fn client_dir(at: &Path, ca: &Path, client: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(at).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), at.join("ca-cert.pem")).unwrap();
    if let Some(c) = client {
        for f in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(c.join(f), at.join(f)).unwrap();
        }
    }
    at.to_path_buf()
}

fn tls_uri(uri: &str, dir: &Path) -> String {
    format!("{uri}?tls-certificates={}", dir.display())
}

fn qemu_obj(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    )
}

fn qemu_opts(port: u16, name: &str) -> String {
    format!("driver=nbd,host=127.0.0.1,port={port},export={name},tls-creds=tls0")
}

async fn nbdinfo_size(uri: &str) -> Result<u64, String> {
    let out = run("nbdinfo", &["--size", uri]).await;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Everything a client with the right credentials does, through each tool.
async fn exercise(uri: &str, port: u16, name: &str, creds: &Path, work: &Path, size: usize) {
    let src = write_file(work, "src.raw", &disk_like(7, size));
    // nbdcopy writes the whole disk over TLS.
    run_ok("nbdcopy", &[src.to_str().unwrap(), &tls_uri(uri, creds)]).await;
    assert_eq!(
        nbdinfo_size(&tls_uri(uri, creds)).await.unwrap(),
        size as u64
    );
    // qemu-img reads it back over TLS, byte for byte.
    let back = work.join("back.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &qemu_obj(creds),
            "--image-opts",
            &qemu_opts(port, name),
            "-O",
            "raw",
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert_identical("raw", src.to_str().unwrap(), "raw", back.to_str().unwrap()).await;
    let info = run_ok(
        "qemu-img",
        &[
            "info",
            "--object",
            &qemu_obj(creds),
            "--image-opts",
            &qemu_opts(port, name),
        ],
    )
    .await;
    assert!(info.contains(&format!("({size} bytes)")), "{info}");
    // qemu-io writes and verifies a pattern over TLS.
    let io = run_ok(
        "qemu-io",
        &[
            "--object",
            &qemu_obj(creds),
            "--image-opts",
            &qemu_opts(port, name),
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
        ],
    )
    .await;
    assert!(!io.contains("Pattern verification failed"), "{io}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_with_required_tls_and_client_certificates() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("tls");
    let other = tmp.path().join("other-ca");
    init(&creds);
    init(&other);
    let size = 8 * MIB;
    let image = tmp.path().join("disk.qcow2");
    let spec = format!("d={}", image.display());
    let size_arg = size.to_string();
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--create",
        &size_arg,
        "--tls",
        "require",
        "--tls-certificates",
        creds.to_str().unwrap(),
        "--tls-verify-peer",
        &spec,
    ]);
    let (name, addr, uri) = ex.exports[0].clone();
    assert!(uri.starts_with("nbds://"), "{uri}");
    exercise(&uri, addr.port(), &name, &creds, tmp.path(), size).await;

    // qemu-nbd -L lists over TLS (listing is on for `export`).
    let listed = run_ok(
        "qemu-nbd",
        &[
            "-L",
            "-b",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "--object",
            &qemu_obj(&creds),
            "--tls-creds",
            "tls0",
        ],
    )
    .await;
    assert!(listed.contains(&format!("export: '{name}'")), "{listed}");

    // Refusals, each clean (an error, not a hang), and the server keeps
    // serving afterwards.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let e = nbdinfo_size(&plain).await.unwrap_err();
    assert!(!e.is_empty());
    let out = run(
        "qemu-img",
        &[
            "info",
            "--image-opts",
            &format!(
                "driver=nbd,host=127.0.0.1,port={},export={name}",
                addr.port()
            ),
        ],
    )
    .await;
    assert!(!out.status.success(), "plaintext qemu-img got in");
    let wrong_client = client_dir(&tmp.path().join("c-wrong"), &creds, Some(&other));
    assert!(
        nbdinfo_size(&tls_uri(&uri, &wrong_client)).await.is_err(),
        "a certificate from another CA got in"
    );
    let no_client = client_dir(&tmp.path().join("c-none"), &creds, None);
    assert!(
        nbdinfo_size(&tls_uri(&uri, &no_client)).await.is_err(),
        "no client certificate got in"
    );
    let wrong_server = client_dir(&tmp.path().join("c-untrusting"), &other, Some(&creds));
    assert!(
        nbdinfo_size(&tls_uri(&uri, &wrong_server)).await.is_err(),
        "client trusted a server it has no CA for"
    );
    let out = run(
        "qemu-img",
        &[
            "info",
            "--object",
            &qemu_obj(&wrong_client),
            "--image-opts",
            &qemu_opts(addr.port(), &name),
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "qemu with a foreign client certificate got in"
    );

    assert_eq!(
        nbdinfo_size(&tls_uri(&uri, &creds)).await.unwrap(),
        size as u64
    );
    assert_eq!(ex.terminate(), 0);
    run_ok("qemu-img", &["check", image.to_str().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_with_tls_on_without_client_certificates() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("tls");
    init(&creds);
    let size = 4 * MIB;
    let image = write_file(tmp.path(), "disk.raw", &vec![0u8; size]);
    let spec = format!("d={}", image.display());
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "on",
        "--tls-certificates",
        creds.to_str().unwrap(),
        &spec,
    ]);
    let (name, addr, uri) = ex.exports[0].clone();
    // A client holding only the CA (no certificate of its own).
    let ca_only = client_dir(&tmp.path().join("ca-only"), &creds, None);
    exercise(&uri, addr.port(), &name, &ca_only, tmp.path(), size).await;
    // `on` still serves plaintext clients.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    assert_eq!(nbdinfo_size(&plain).await.unwrap(), size as u64);
    assert_eq!(ex.terminate(), 0);
}

/// Read until EOF or 5 s; returns what came.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "server kept the connection open");
    got
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_piggybacked_on_starttls_is_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("tls");
    init(&creds);
    let image = write_file(tmp.path(), "disk.raw", &vec![0u8; MIB]);
    let spec = format!("d={}", image.display());
    let ex = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "require",
        "--tls-certificates",
        creds.to_str().unwrap(),
        &spec,
    ]);
    let addr = ex.exports[0].1;
    // Client flags, STARTTLS and a plaintext GO in one segment.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend(option(5, &[]));
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"d");
    go.extend_from_slice(&0u16.to_be_bytes());
    msg.extend(option(7, &go));
    s.write_all(&msg).await.unwrap();
    let got = read_to_close(&mut s).await;
    // At most the STARTTLS ACK (20 bytes); never an export reply.
    assert!(
        got.len() <= 20,
        "server answered plaintext after STARTTLS: {got:?}"
    );

    // EXPORT_NAME before TLS closes at once with nothing sent.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.read_exact(&mut greeting).await.unwrap();
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend(option(1, b"d"));
    s.write_all(&msg).await.unwrap();
    assert!(read_to_close(&mut s).await.is_empty());
    assert_eq!(ex.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_backup_over_required_tls_uses_nbds_targets() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let creds = data.join("tls");
    init(&creds);
    let mut c = config(&data, 8, 0, Duration::from_secs(3600));
    // Default directory: <data dir>/tls.
    c.nbd_tls = NbdTls {
        setting: TlsSetting::Require,
        certificates: None,
        verify_peer: true,
    };
    let daemon = Daemon::start(c).await.unwrap();
    let api = daemon.api_addr;
    let call = |m: &'static str, p: String, b: Option<serde_json::Value>| async move {
        integration_tests::http::call(api, m, &p, b.as_ref()).await
    };
    let r = call(
        "PUT",
        "/api/v1/vms/tlsvm".into(),
        Some(json!({"vm_context_id": "c", "disks": [
            {"disk_id": 0, "size_bytes": 4 * MIB, "unit_number": 0},
            {"disk_id": 1, "size_bytes": 2 * MIB, "unit_number": 1}]})),
    )
    .await;
    assert!(r.status < 300, "{}", r.text());
    let r = call(
        "POST",
        "/api/v1/backups".into(),
        Some(json!({"vm_name": "tlsvm", "backup_type": "full", "repository_id": "default"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let targets = parse_targets(b["nbd_targets_string"].as_str().unwrap());
    let mut sources = Vec::new();
    for (i, (_, uri)) in targets.iter().enumerate() {
        assert!(uri.starts_with("nbds://"), "{uri}");
        let size = if i == 0 { 4 * MIB } else { 2 * MIB };
        let src = write_file(
            tmp.path(),
            &format!("src{i}.raw"),
            &disk_like(i as u64, size),
        );
        // Plaintext is refused on a backup export too.
        let plain = uri.replacen("nbds://", "nbd://", 1);
        assert!(nbdinfo_size(&plain).await.is_err());
        run_ok("nbdcopy", &[src.to_str().unwrap(), &tls_uri(uri, &creds)]).await;
        sources.push(src);
    }
    let r = call(
        "POST",
        format!("/api/v1/backups/{id}/complete"),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let done = r.json();
    for (i, d) in done["disks"].as_array().unwrap().iter().enumerate() {
        let file = data.join("repository").join(d["file"].as_str().unwrap());
        run_ok("qemu-img", &["check", file.to_str().unwrap()]).await;
        assert_identical(
            "raw",
            sources[i].to_str().unwrap(),
            "qcow2",
            file.to_str().unwrap(),
        )
        .await;
    }
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_over_https_with_the_same_certificates() {
    if !require("curl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let creds = tmp.path().join("creds");
    init(&creds);
    let mut c = config(&data, 4, 0, Duration::from_secs(3600));
    c.api_tls = true;
    c.nbd_tls.certificates = Some(creds.clone());
    let daemon = Daemon::start(c).await.unwrap();
    assert_eq!(daemon.api_scheme, "https");
    let port = daemon.api_addr.port();
    // A client that says nothing does not hold up the others.
    let _silent = tokio::net::TcpStream::connect(daemon.api_addr)
        .await
        .unwrap();
    let ca = creds.join("ca-cert.pem");
    let body = run_ok(
        "curl",
        &[
            "-sS",
            "--fail",
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://localhost:{port}/api/v1/vms"),
        ],
    )
    .await;
    assert!(body.starts_with('['), "{body}");
    // Plain HTTP to the HTTPS port gets no API answer.
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}/api/v1/vms"),
        ],
    )
    .await;
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).starts_with('['));
    // A client that does not trust the CA refuses the hub.
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            &format!("https://localhost:{port}/healthz"),
        ],
    )
    .await;
    assert!(!out.status.success());
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_speaks_tls_to_our_server_and_qemu_nbd_and_never_falls_back() {
    if !require("qemu-nbd") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("tls");
    init(&creds);
    let data = disk_like(3, 2 * MIB);
    let image = write_file(tmp.path(), "disk.raw", &data);
    let spec = format!("d={}", image.display());
    let ours = Exporter::start(&[
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "require",
        "--tls-certificates",
        creds.to_str().unwrap(),
        "--tls-verify-peer",
        &spec,
    ]);
    let uri = tls_uri(&ours.exports[0].2, &creds);
    let c = nbd_client::connect_uri(&uri).await.unwrap();
    assert_eq!(c.size(), data.len() as u64);
    let got = c.read_bytes(MIB as u64, 65536).await.unwrap();
    assert_eq!(&got[..], &data[MIB..MIB + 65536]);
    c.write(0, bytes::Bytes::from(vec![9u8; 4096]), true)
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    // Without the client certificate the verifying server refuses us.
    let ca_only = client_dir(&tmp.path().join("ca-only"), &creds, None);
    assert!(
        nbd_client::connect_uri(&tls_uri(&ours.exports[0].2, &ca_only))
            .await
            .is_err()
    );
    assert_eq!(ours.terminate(), 0);

    // qemu-nbd with x509 credentials.
    let port = common::hub::free_port();
    let mut q = tokio::process::Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "q",
            "-p",
            &port.to_string(),
            "-b",
            "127.0.0.1",
            "-t",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server",
                creds.display()
            ),
            "--tls-creds",
            "tls0",
            image.to_str().unwrap(),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let quri = tls_uri(&format!("nbds://127.0.0.1:{port}/q"), &creds);
    let c = common::hub::eventually(20, || {
        let quri = quri.clone();
        async move { nbd_client::connect_uri(&quri).await.ok() }
    })
    .await;
    let got = c.read_bytes(4096, 4096).await.unwrap();
    assert_eq!(&got[..], &data[4096..8192]);
    c.disconnect().await.unwrap();
    // A plaintext-only server: nbds:// fails instead of sending in clear.
    // (Another file: qemu-nbd holds a lock on the first.)
    let other = write_file(tmp.path(), "other.raw", &data);
    let plain = Exporter::start(&["--listen", "127.0.0.1:0", &format!("d={}", other.display())]);
    let p = plain.exports[0].2.replacen("nbd://", "nbds://", 1);
    let e = nbd_client::connect_uri(&tls_uri(&p, &creds))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert_eq!(plain.terminate(), 0);
    q.kill().await.unwrap();
}
