//! The NBD backup hub daemon: a VM-level backup API in front of one NBD
//! server that writes every disk of a VM into qcow2 images.
//!
//! # Layout
//! * [`api`]: axum handlers (thin) and the router; one error shape.
//! * [`backup`]: orchestration — start/complete/abort state machine, restore
//!   exports, idle watchdog, startup reconciliation, repository layout.
//! * [`catalog`]: SQLite store of VMs, repositories and backups.
//! * [`nbd`]: the NBD server, per-export ports and the shared port.
//! * [`ports`]: NBD port allocation with RAII leases.
//! * [`sna`]: the client of a backup appliance (the hand-off contract).
//! * [`tier`]: the object-storage tier (S3): offload, evict, re-hydrate.
//! * [`http_client`]: the one HTTP client (appliance calls, the CLI's calls).
//! * [`config`], [`model`], [`names`], [`error`], [`time`], [`secret`]: plumbing.
//! * [`app`]: assembling and running it all; [`cli`]: the binary's commands.
#![deny(missing_docs)]

pub mod api;
pub mod app;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod confined;
pub mod error;
pub mod http_client;
pub mod lifecycle;
pub mod model;
pub mod names;
pub mod nbd;
pub mod ports;
pub mod secret;
pub mod shared_repo;
pub mod sna;
pub mod space;
pub mod tier;
pub mod time;
pub mod tls;
