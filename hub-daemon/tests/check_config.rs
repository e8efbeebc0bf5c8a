//! `hub-daemon serve --check-config`: 0 for a config the hub would start
//! with, non-zero naming the offending key otherwise; and the log format.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn check(config: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hub-daemon"))
        .args(["serve", "--config", path.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--check-config")
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_good_config_passes_and_a_bad_key_is_named() {
    let (ok, text) = check(
        "nbd_ports = \"10100-10200\"\nmax_buffer_memory = \"512M\"\n",
        &[],
    );
    assert!(ok, "{text}");
    assert!(text.contains("config ok"), "{text}");

    let (ok, text) = check("nbd_portz = \"1-2\"\n", &[]);
    assert!(!ok);
    assert!(text.contains("nbd_portz"), "{text}");

    let (ok, text) = check("nbd_ports = \"9-3\"\n", &[]);
    assert!(!ok);
    assert!(text.contains("9-3"), "{text}");

    // TLS required but no credentials where the config says.
    let (ok, text) = check(
        "tls = \"require\"\ntls_certificates = \"/nonexistent/tls\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/tls") && text.contains("tls init"),
        "{text}"
    );

    let (ok, text) = check("sna_url = \"ftp://x\"\n", &[]);
    assert!(!ok);
    assert!(text.contains("sna_url"), "{text}");
}

#[test]
fn logs_off_a_terminal_have_no_colour_and_json_is_one_object_per_line() {
    // A config that fails: an error line is logged either way.
    let (_, text) = check(
        "repository_roots = [\"/nonexistent/root\"]\n",
        &["--log-format", "text"],
    );
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes in a log file: {text:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hub-daemon"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--check-config")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .next()
        .expect("a warning about the non-loopback API");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "WARN");
}
