//! CI runs the harness with tiny sizes: it must run every workload and
//! verify every image it wrote. Timings are never asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn harness_smoke_runs_and_verifies() {
    if Command::new("qemu-nbd").arg("--version").output().is_err()
        || Command::new("nbdcopy").arg("--version").output().is_err()
    {
        assert!(
            std::env::var("NBD_INTEROP_REQUIRED").is_err(),
            "qemu-nbd and nbdcopy are required"
        );
        eprintln!("SKIP: qemu-nbd/nbdcopy missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_nbd-bench"))
        .args([
            "--smoke",
            "--servers",
            "ours,ours-digest,qemu-nbd",
            "--workdir",
            dir.path().to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbd-bench --smoke failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(j["failures"].as_array().unwrap().len(), 0);
    let samples = j["samples"].as_array().unwrap();
    let tests: std::collections::BTreeSet<String> = samples
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["server"].as_str().unwrap(),
                s["test"].as_str().unwrap()
            )
        })
        .collect();
    // Every workload ran for both servers and its data was verified.
    for server in ["ours", "qemu-nbd"] {
        for t in [
            "write_fresh_qcow2_c1_verified",
            "write_fresh_qcow2_c4_verified",
            "overlay_write_verified",
            "multi4_disk3_verified",
            "restore_warm_seq_file_verified",
            "restore_warm_seq_file_no_extents_verified",
            "restore_warm_convert_qcow2_verified",
            "restore_chain20_verified",
            "restore_warm_chain20_null",
            "idle4_pss_per_export",
        ] {
            assert!(
                tests.contains(&format!("{server}/{t}")),
                "missing {server}/{t} in {tests:?}"
            );
        }
    }
    // The digest our server recorded while ingesting equals the source's.
    assert!(tests.contains("ours-digest/write_fresh_qcow2_c1_digest_ok"));
    assert!(tests.contains("ours-digest/write_fresh_qcow2_c4_digest_ok"));
    assert!(tests.contains("ours/null_write_c1"));
    assert!(tests.contains("system/dd_conv_fsync_write"));
    for t in [
        "ours/digest_qcow2_warm",
        "sha256sum/digest_qcow2_warm",
        "ours/digest_raw_warm",
        "ours/digest_nbd_warm",
        "ours/digest_verified",
    ] {
        assert!(tests.contains(t), "missing {t} in {tests:?}");
    }
    for s in samples {
        if s["unit"] == "bool" {
            assert_eq!(s["value"], 1.0, "{s}");
        }
    }
}
