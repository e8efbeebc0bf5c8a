//! Block-wise digests of virtual disks.
//!
//! A restore point that says completed must be the source, provably, years
//! later. This crate defines the digest that proves it, computes it while a
//! backup is written (cost proportional to what the backup wrote, not to
//! the disk), keeps it beside each image, and recomputes it from any
//! [`nbd_server::BlockBackend`] for verification.
//!
//! # The algorithm (`blake3-tree-v1`), exactly
//! For a disk of `S` bytes (`S > 0`):
//! 1. Blocks of `B = 65536` bytes: block `i` is bytes `[i·B, min((i+1)·B, S))`,
//!    for `i < n = ⌈S/B⌉` (the last block may be shorter).
//! 2. `leaf_i = BLAKE3(block_i)` (32 bytes). A block of zeroes has a
//!    constant leaf, so a reader may skip reading and hashing holes.
//! 3. Segments of `G = 1024` consecutive blocks (64 MiB):
//!    `seg_j = BLAKE3(leaf_{jG} ‖ … ‖ leaf_{min((j+1)G, n)−1})`, `m = ⌈n/G⌉`.
//! 4. `root = BLAKE3("nbd-backup-hub disk digest v1" ‖ u64le(S) ‖ u32le(B) ‖
//!    u32le(G) ‖ seg_0 ‖ … ‖ seg_{m−1})`, printed as 64 lower-case hex digits.
//!
//! A sender computes it while reading its source: hash each 64 KiB block
//! (in any order, in parallel), then each segment, then the root.
//! [`algo::digest_of_bytes`] is the reference implementation.
//!
//! # Layout
//! * [`algo`]: the definition above, on byte slices.
//! * [`sidecar`]: the per-image file holding segment hashes and the leaves
//!   the image wrote.
//! * [`tracker`]: which blocks a running backup wrote whole (hashed from the
//!   payload) and which must be read back.
//! * [`DigestBackend`]: the wrapper that hashes writes on their way to the
//!   image and finishes the sidecar.
//! * [`DigestChain`]: the sidecars of a restore point's ancestors.
//! * [`read`]: digests and leaves computed by reading a backend.
#![deny(missing_docs)]

pub mod algo;
mod backend;
mod chain;
pub mod read;
pub mod sidecar;
pub mod tracker;
pub mod verify;

pub use algo::{Hash, ALGORITHM, BLOCK_SIZE, SEGMENT_BLOCKS};
pub use backend::{DigestBackend, FinishError};
pub use chain::{DigestChain, Layer};
pub use sidecar::{Header, Sidecar, SidecarError};
