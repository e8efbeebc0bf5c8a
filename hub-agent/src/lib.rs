//! `hub-agent`: the reference backup appliance ("SNA") for the NBD backup
//! hub. It reads a VM's disks (raw files, block devices, qcow2 images or
//! `nbd://` exports), keeps its own change tracking (block hashes of the
//! last completed push), and streams full or incremental backups into the
//! hub's NBD exports, computing each disk's `blake3-tree-v1` digest on the
//! way.
//!
//! # Layout
//! * [`serve`]: the hub-facing HTTP service (prepare / start / cancel);
//!   [`job`]: a started backup's life (push, progress, complete or abort).
//! * [`push`]: pushing a set of disks concurrently — the library entry
//!   point ([`push::push_disks`]) for the CLI, the service and benchmarks.
//! * [`stream`]: one disk: read, hash, send what the target lacks.
//! * [`blocks`]: per-block leaves and zero detection of one read.
//! * [`tracking`]: the change-tracking state files.
//! * [`source`]: opening sources ([`rawfile`]: raw files and devices); [`targets`]: command-line formats.
//! * [`callback`]: complete / abort / progress calls to the hub.
//! * [`config`]: the `serve` configuration file; [`progress`]: the
//!   terminal progress bar of `push`.
#![deny(missing_docs)]

pub mod blocks;
pub mod callback;
pub mod config;
pub mod job;
pub mod progress;
pub mod push;
pub mod rawfile;
pub mod serve;
pub mod source;
pub mod stream;
pub mod targets;
pub mod tracking;
