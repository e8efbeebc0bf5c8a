//! Block backends that write qcow2 (and raw) images directly, for the NBD
//! server, with no qemu process involved.
//!
//! # Layout
//! * [`QcowBackend`]: a qcow2 image and its backing chain, on the `imago`
//!   engine; [`QcowBackend::create`] makes fresh images and incremental
//!   overlays.
//! * [`RawBackend`]: raw files and block devices.
//! * [`open_image`]: pick the backend by file content.
//! * [`header`]: our own qcow2 header validation (pure, fuzzed).
//! * [`chain`]: backing-chain resolution under a [`BackingPolicy`].
//! * [`merge`]: fold layers of a chain into a new image (retention:
//!   removing a restore point others depend on, synthetic fulls).
//! * [`IoPool`]: the threads imago runs on.
//! * `lock`, `buf`: OFD image locks and page-aligned buffers.
//! * `cached_read`, `direct_read`, `splice_read`, `readahead`: the read
//!   path of read-only files (qcow2 layers, raw images): page cache first
//!   on the caller's thread, misses on the blocking pool, pipes for a
//!   zero-copy send.
//!
//! # Threading
//! imago's futures are not `Send` and its file I/O blocks, so no imago call
//! ever runs on a tokio worker: each operation is shipped to an [`IoPool`]
//! thread (a current-thread runtime with a `LocalSet`) and its result comes
//! back on a oneshot channel. Many operations run at once per image, across
//! the pool's threads, bounded per image.
//!
//! # Durability
//! `flush` writes imago's metadata caches back and then fsyncs the file;
//! the NBD server maps FLUSH and FUA onto it. `close` does the same after
//! waiting for in-flight I/O. A backend dropped without `close` still gets
//! a best-effort flush. While data streams in, write-behind
//! (`posix_fadvise(DONTNEED)` every 64 MiB written, when those writes were
//! mostly streams rather than random) starts the kernel's writeback early,
//! so the final flush has little left to do. New images are synced,
//! directory included, before `create` returns.
//!
//! # Safety against hostile images
//! Every layer's header, refcount table and L1 table are checked by
//! [`header`] before imago opens it. Backing files are resolved like qemu
//! does (relative to the image's directory), must lie in an allowed
//! directory, must have a recorded format (never probed), and the chain is
//! loop-checked and depth-limited. Encrypted images, internal snapshots,
//! external data files and dirty images are refused. Writers take an
//! exclusive OFD lock, readers a shared one.
#![deny(missing_docs)]

mod buf;
mod cached_read;
pub mod chain;
mod direct_read;
mod error;
pub mod header;
mod lock;
mod merge;
mod merge_plan;
mod open;
mod pool;
mod qcow;
mod raw;
mod readahead;
mod splice_read;
mod writeback;

pub use chain::{BackingPolicy, DEFAULT_MAX_DEPTH};
pub use error::{ImageError, ImageErrorKind};
pub use lock::{lock_file, LockMode};
pub use merge::{merge, MergeOptions, MergeReport, DEFAULT_MERGE_CHUNK, DEFAULT_MERGE_INFLIGHT};
pub use open::{open_image, ImageFormat};
pub use pool::{IoPool, PoolGone};
pub use qcow::{CreateOptions, OpenOptions, QcowBackend, DEFAULT_CLUSTER_SIZE, MAX_INFLIGHT};
pub use raw::RawBackend;
pub use writeback::WRITE_BEHIND_CHUNK;
