//! Images are created and reopened while the process keeps forking
//! children. A forked child holds copies of our open files — locks included
//! — until it execs; creating must not depend on closing and reopening, and
//! reopening must ride out that window instead of reporting a lock conflict.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nbd_server::BlockBackend;
use qcow_backend::{CreateOptions, OpenOptions, QcowBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_reopen_while_forking() {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let forker = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let _ = std::process::Command::new("true").status();
            n += 1;
        }
        n
    });
    let dir = tempfile::tempdir().unwrap();
    for i in 0..100 {
        let p = dir.path().join(format!("img{i}.qcow2.partial"));
        let b = QcowBackend::create(&p, &CreateOptions::fresh(1 << 20), &OpenOptions::new())
            .await
            .unwrap();
        b.close().await.unwrap();
        drop(b);
        // Closed a moment ago; a child may still hold its locks.
        let b = QcowBackend::open(&p, &OpenOptions::new()).await.unwrap();
        b.close().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(forker.join().unwrap() > 0, "children were forked meanwhile");
}
