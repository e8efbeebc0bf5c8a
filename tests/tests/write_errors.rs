//! Every WRITE / WRITE_ZEROES / TRIM / FLUSH answered with an error is
//! counted on its export with the last message — whether the backend
//! failed (injected I/O errors) or the request was refused — so a backup
//! hub can refuse to call such a backup complete. Driven by qemu-io and
//! nbdsh, real clients that see the errors too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use integration_tests::support::{export, require, run, TestServer};
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, MemoryBackend, ReadChunk, ZeroFlags,
};

const MIB: u64 = 1 << 20;

/// Memory that fails every mutation touching [1 MiB, 2 MiB) with EIO.
#[derive(Debug)]
struct Faulty(MemoryBackend);

fn bad(off: u64, len: u64) -> Result<(), BackendError> {
    if off < 2 * MIB && off + len > MIB {
        return Err(BackendError::new(
            BackendErrorKind::Io,
            "injected media error",
        ));
    }
    Ok(())
}

#[async_trait]
impl BlockBackend for Faulty {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn caps(&self) -> Caps {
        self.0.caps()
    }
    async fn read(&self, o: u64, l: u32) -> Result<Vec<ReadChunk>, BackendError> {
        self.0.read(o, l).await
    }
    async fn write(&self, o: u64, d: Bytes) -> Result<(), BackendError> {
        bad(o, d.len() as u64)?;
        self.0.write(o, d).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> Result<(), BackendError> {
        bad(o, l)?;
        self.0.write_zeroes(o, l, f).await
    }
    async fn trim(&self, o: u64, l: u64) -> Result<(), BackendError> {
        bad(o, l)?;
        self.0.trim(o, l).await
    }
    async fn flush(&self) -> Result<(), BackendError> {
        self.0.flush().await
    }
    async fn block_status(&self, o: u64, l: u64) -> Result<Vec<Extent>, BackendError> {
        self.0.block_status(o, l).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_refused_mutations_are_counted_per_export() {
    if !require("qemu-io") || !require("nbdsh") {
        return;
    }
    let s = TestServer::start(vec![
        export("bad", Arc::new(Faulty(MemoryBackend::new(4 * MIB)))),
        export("good", Arc::new(MemoryBackend::new(4 * MIB))),
    ])
    .await;
    let stats = |name: &str| s.server.export(name).unwrap().stats().snapshot();
    let uri = s.uri("bad");
    // Succeeds: nothing counted.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 64k"]).await;
    assert!(out.status.success());
    assert_eq!(stats("bad").write_errors, 0);
    // Injected I/O errors on write, write-zeroes and discard.
    for cmd in ["write -P 2 1M 64k", "write -z 1M 128k", "discard 1536k 64k"] {
        let out = run("qemu-io", &["-f", "raw", &uri, "-c", cmd]).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("error") || !out.status.success(),
            "{cmd}: {text}"
        );
    }
    let after = stats("bad");
    assert_eq!(after.write_errors, 3, "{after:?}");
    let last = s
        .server
        .export("bad")
        .unwrap()
        .stats()
        .last_write_error()
        .unwrap();
    assert!(last.contains("TRIM") && last.contains("EIO"), "{last}");
    // Refused before reaching the backend (write past the end, strict
    // checking off so the client sends it): counted too.
    let script = format!(
        "h.set_strict_mode(0)\nh.connect_uri('{}')\ntry:\n    h.pwrite(b'x' * 512, 4 * 1024 * 1024)\nexcept nbd.Error as e:\n    print('refused', e.errno)\n",
        s.uri("good")
    );
    let out = run("nbdsh", &["-c", &script]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("refused"),
        "{out:?}"
    );
    let good = stats("good");
    assert_eq!(good.write_errors, 1);
    assert!(s
        .server
        .export("good")
        .unwrap()
        .stats()
        .last_write_error()
        .unwrap()
        .contains("ENOSPC"));
    // Reads never count, not even failed ones.
    let before = stats("good").write_errors;
    let _ = run(
        "qemu-io",
        &["-f", "raw", "-r", &s.uri("good"), "-c", "read 0 64k"],
    )
    .await;
    assert_eq!(stats("good").write_errors, before);
    s.server.shutdown().await.unwrap();
}
