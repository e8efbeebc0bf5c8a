//! Real NBD clients against our server: nbdinfo, qemu-img, qemu-io, nbdcopy
//! and nbdsh. qemu 10 negotiates extended headers; libnbd 1.14 structured
//! replies; so both reply modes are exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use integration_tests::support::{
    self, export, pattern, require, run, run_ok, write_file, TestServer,
};
use nbd_server::backend::conformance::read_flat;
use nbd_server::{BlockBackend, Export, MemoryBackend};
use serde_json::Value;

const MIB: u64 = 1 << 20;

async fn nbdinfo_json(uri: &str) -> Value {
    let out = run_ok("nbdinfo", &["--json", uri]).await;
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_json_reports_size_flags_and_block_sizes() {
    if !require("nbdinfo") {
        return;
    }
    let rw = Arc::new(MemoryBackend::new(64 * MIB));
    let ro = Arc::new(MemoryBackend::read_only_from(&[1u8; 1 << 20]));
    let srv = TestServer::start(vec![
        export("rw", rw).with_description("writable disk"),
        export("ro", ro),
    ])
    .await;

    let j = nbdinfo_json(&srv.uri("rw")).await;
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "rw");
    assert_eq!(e["description"], "writable disk");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["is_rotational"], false);
    for can in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[can], true, "{can}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(e["contexts"][0], "base:allocation");

    let j = nbdinfo_json(&srv.uri("ro")).await;
    let e = &j["exports"][0];
    assert_eq!(e["is_read_only"], true);
    for can in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
    ] {
        assert_eq!(e[can], false, "{can} on a read-only export");
    }
    // `--can` exit codes: 0 yes, 2 no.
    let out = run("nbdinfo", &["--can", "write", &srv.uri("ro")]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = run("nbdinfo", &["--can", "write", &srv.uri("rw")]).await;
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_shows_every_export() {
    if !require("nbdinfo") {
        return;
    }
    let srv = TestServer::start(vec![
        export("disk0", Arc::new(MemoryBackend::new(MIB))).with_description("first"),
        export("disk1", Arc::new(MemoryBackend::new(2 * MIB))).with_description("second"),
    ])
    .await;
    let out = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", srv.addr)],
    )
    .await;
    let j: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = j["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["disk0", "disk1"]);
    assert_eq!(j["exports"][1]["description"], "second");
    assert_eq!(j["exports"][1]["export-size"], 2 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_is_refused_and_default_name_resolves_single_export() {
    if !require("nbdinfo") {
        return;
    }
    let srv = TestServer::start(vec![export("only", Arc::new(MemoryBackend::new(MIB)))]).await;
    let out = run("nbdinfo", &[&srv.uri("nope")]).await;
    assert!(!out.status.success());
    let j = nbdinfo_json(&format!("nbd://{}", srv.addr)).await;
    assert_eq!(j["exports"][0]["export-size"], MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_reports_data_and_holes() {
    if !require("nbdinfo") {
        return;
    }
    let mem = Arc::new(MemoryBackend::new(8 * MIB));
    mem.write(2 * MIB, Bytes::from(vec![7u8; MIB as usize]))
        .await
        .unwrap();
    let srv = TestServer::start(vec![export("d", mem)]).await;
    let out = run_ok("nbdinfo", &["--map", "--json", &srv.uri("d")]).await;
    let j: Value = serde_json::from_str(&out).unwrap();
    let extents: Vec<(u64, u64, u64)> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![(0, 2 * MIB, 3), (2 * MIB, MIB, 0), (3 * MIB, 5 * MIB, 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_in_and_out_and_compare() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = support::disk_like(11, 24 * MIB as usize);
    let src_path = write_file(dir.path(), "src.raw", &src);
    let mem = Arc::new(MemoryBackend::new(24 * MIB));
    let srv = TestServer::start(vec![export("d", mem.clone())]).await;
    let uri = srv.uri("d");

    let info = run_ok("qemu-img", &["info", "--output=json", &uri]).await;
    let j: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j["virtual-size"], 24 * MIB);

    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src_path.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert_eq!(
        read_flat(&*mem, 0, src.len() as u32).await,
        src,
        "backend holds what qemu-img wrote"
    );
    support::assert_identical("raw", src_path.to_str().unwrap(), "raw", &uri).await;

    let out_path = dir.path().join("out.qcow2");
    support::qemu_img_raw_to_qcow2(&uri, &out_path).await;
    support::assert_identical(
        "qcow2",
        out_path.to_str().unwrap(),
        "raw",
        src_path.to_str().unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_reads_zeroes_discards_and_flushes() {
    if !require("qemu-io") {
        return;
    }
    let mem = Arc::new(MemoryBackend::new(16 * MIB));
    let srv = TestServer::start(vec![export("d", mem.clone())]).await;
    let uri = srv.uri("d");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 1000 3000",
            "-c",
            "read -P 0xcd 1000 3000",
            "-c",
            "write -P 0x11 1M 2M",
            "-c",
            "write -z 1536k 512k",
            "-c",
            "write -z -u 2560k 256k",
            "-c",
            "discard 8M 1M",
            "-c",
            "write -P 0x22 12M 4k",
            "-c",
            "write -f -P 0x33 13M 4k",
            "-c",
            "flush",
            "-c",
            "read -P 0 1536k 512k",
            "-c",
            "read -P 0x11 2048k 512k",
            "-c",
            "read -P 0x22 12M 4k",
            &uri,
        ],
    )
    .await;
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Check the backend directly, not only through qemu.
    let v = read_flat(&*mem, 0, 1000).await;
    assert!(v.iter().all(|b| *b == 0xab));
    let v = read_flat(&*mem, 1000, 3000).await;
    assert!(v.iter().all(|b| *b == 0xcd));
    let v = read_flat(&*mem, 1536 * 1024, 512 * 1024).await;
    assert!(v.iter().all(|b| *b == 0));
    let v = read_flat(&*mem, 2560 * 1024, 256 * 1024).await;
    assert!(v.iter().all(|b| *b == 0));
    let v = read_flat(&*mem, 13 * MIB, 4096).await;
    assert!(v.iter().all(|b| *b == 0x33), "FUA write landed");
    let stats = srv.server.export("d").unwrap().stats().snapshot();
    assert!(stats.requests >= 13 && stats.errors == 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_with_one_and_four_connections() {
    if !require("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB as usize;
    let src = support::disk_like(5, size);
    let src_path = write_file(dir.path(), "src.raw", &src);
    for conns in ["1", "4"] {
        let mem = Arc::new(MemoryBackend::new(size as u64));
        let srv = TestServer::start(vec![export("d", mem.clone())]).await;
        let uri = srv.uri("d");
        run_ok(
            "nbdcopy",
            &["--flush", "-C", conns, src_path.to_str().unwrap(), &uri],
        )
        .await;
        let back = dir.path().join(format!("back{conns}.raw"));
        run_ok("nbdcopy", &["-C", conns, &uri, back.to_str().unwrap()]).await;
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), src.len());
        assert!(
            got == src,
            "nbdcopy round trip with {conns} connection(s) differs"
        );
        let stats = srv.server.export("d").unwrap().stats().snapshot();
        if conns == "4" {
            assert!(
                stats.connections_total >= 4,
                "nbdcopy used multi-conn: {stats:?}"
            );
        }
        // Zero extents in the source must not have been sent as data.
        assert!(stats.bytes_written < size as u64, "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_bad_requests_get_spec_errnos_and_connection_survives() {
    if !require("nbdsh") {
        return;
    }
    let srv = TestServer::start(vec![
        export("rw", Arc::new(MemoryBackend::new(MIB))),
        export("ro", Arc::new(MemoryBackend::read_only_from(&[5u8; 65536]))),
    ])
    .await;
    let script = r#"
# libnbd reports errno by name ("EINVAL").
h.set_strict_mode(0)
size = h.get_size()
def expect(code, what, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == code, "%s: got %s (%s), want %s" % (what, e.errno, e.string, code)
        return
    raise AssertionError("%s: no error" % what)
expect("EINVAL", "read past end", lambda: h.pread(4096, size - 512))
expect("ENOSPC", "write past end", lambda: h.pwrite(b"x" * 4096, size - 512))
expect("ENOSPC", "zero past end", lambda: h.zero(4096, size - 512))
expect("EINVAL", "trim past end", lambda: h.trim(4096, size - 512))
expect("EINVAL", "unknown flag", lambda: h.pread(512, 0, 0x80))
expect("EINVAL", "flag of another command", lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_REQ_ONE))
expect("EINVAL", "block status past end", lambda: h.block_status(4096, size, lambda *a: 0))
# The connection still works after every error.
h.pwrite(b"a" * 512, 0)
assert h.pread(512, 0) == b"a" * 512
h.flush()
h.pwrite(b"b" * 512, 512, nbd.CMD_FLAG_FUA)
assert h.pread(1024, 0) == b"a" * 512 + b"b" * 512
print("OK")
"#;
    let out = run_ok("nbdsh", &["-u", &srv.uri("rw"), "-c", script]).await;
    assert!(out.contains("OK"), "{out}");

    let script_ro = r#"
h.set_strict_mode(0)
for what, fn in [("write", lambda: h.pwrite(b"x" * 512, 0)),
                 ("zero", lambda: h.zero(512, 0)),
                 ("trim", lambda: h.trim(512, 0))]:
    try:
        fn()
        raise AssertionError(what + " on read-only export succeeded")
    except nbd.Error as e:
        assert e.errno == "EPERM", "%s: %s" % (what, e.errno)
assert h.pread(512, 0) == b"\x05" * 512
print("OK")
"#;
    let out = run_ok("nbdsh", &["-u", &srv.uri("ro"), "-c", script_ro]).await;
    assert!(out.contains("OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_structured_reads_block_status_and_cache() {
    if !require("nbdsh") {
        return;
    }
    let mem = Arc::new(MemoryBackend::new(4 * MIB));
    mem.write(MIB, Bytes::from(pattern(3, 65536)))
        .await
        .unwrap();
    let srv = TestServer::start(vec![export("d", mem)]).await;
    let script = r#"
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.can_meta_context("base:allocation")
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
h.pread_structured(2 * 1048576, 0, chunk)
kinds = sorted(set(c[2] for c in chunks))
assert kinds == [nbd.READ_DATA, nbd.READ_HOLE], chunks
# DF: one content chunk even across data and hole.
chunks.clear()
h.pread_structured(1048576 + 65536 * 2, 0, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks
ext = []
h.block_status(4 * 1048576, 0, lambda meta, off, e, err: ext.extend(e) or 0)
assert ext == [1048576, 3, 65536, 0, 4 * 1048576 - 1048576 - 65536, 3], ext
one = []
h.block_status(4 * 1048576, 0, lambda meta, off, e, err: one.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
assert one == [1048576, 3], one
h.cache(65536, 0)
print("OK")
"#
    .replace("URI", &format!("{:?}", srv.uri("d")));
    let out = run_ok("nbdsh", &["-c", &script]).await;
    assert!(out.contains("OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_come_and_go_at_run_time() {
    if !require("nbdinfo") {
        return;
    }
    let srv = TestServer::start(vec![]).await;
    let out = run("nbdinfo", &[&srv.uri("late")]).await;
    assert!(!out.status.success());
    srv.server
        .add_export(Export::new("late", Arc::new(MemoryBackend::new(MIB))))
        .unwrap();
    run_ok("nbdinfo", &[&srv.uri("late")]).await;
    let stats = srv.server.remove_export("late").await.unwrap();
    assert_eq!(stats.connections_active, 0);
    let out = run("nbdinfo", &[&srv.uri("late")]).await;
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_per_export_and_shared_port_in_one_process() {
    if !require("nbdinfo") {
        return;
    }
    let srv = TestServer::start(vec![]).await;
    let e = srv
        .server
        .add_export(Export::new("own", Arc::new(MemoryBackend::new(3 * MIB))))
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = srv.server.serve_export(l, &e).unwrap();
    let own = format!("nbd://{}/own", h.local_addr());
    assert_eq!(
        nbdinfo_json(&own).await["exports"][0]["export-size"],
        3 * MIB
    );
    assert_eq!(
        nbdinfo_json(&srv.uri("own")).await["exports"][0]["export-size"],
        3 * MIB
    );
    // Removing the export closes its port.
    srv.server.remove_export("own").await.unwrap();
    support::assert_export_gone(&own).await;
}
