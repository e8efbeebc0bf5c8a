//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`)
//! through the same target bodies the fuzzers run (`fuzz/common/bodies.rs`),
//! so plain `cargo test` keeps every seed and every past crash input passing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/common/bodies.rs"]
mod bodies;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Panics anywhere in the process, including ones tokio catches in spawned
/// tasks (libFuzzer aborts on those; a test would otherwise miss them).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Replays run one at a time, so a panic is charged to the right input.
static SERIAL: Mutex<()> = Mutex::new(());

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn replay(target: &str, body: fn(&[u8])) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let before = PANICS.load(Ordering::SeqCst);
        let r = std::panic::catch_unwind(|| body(&data));
        assert!(
            r.is_ok() && PANICS.load(Ordering::SeqCst) == before,
            "{target}: {} panicked",
            f.display()
        );
    }
    eprintln!("{target}: replayed {} inputs", files.len());
}

#[test]
fn nbd_handshake_corpus() {
    replay("nbd_handshake", bodies::handshake);
}

#[test]
fn nbd_request_corpus() {
    replay("nbd_request", bodies::request);
}

#[test]
fn nbd_session_corpus() {
    replay("nbd_session", bodies::session);
}

#[test]
fn qcow2_header_corpus() {
    replay("qcow2_header", bodies::qcow2_header);
}

#[test]
fn qcow2_open_corpus() {
    replay("qcow2_open", bodies::qcow2_open);
}

#[test]
fn nbd_reply_corpus() {
    replay("nbd_reply", bodies::reply);
}
