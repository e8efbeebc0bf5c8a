//! An async NBD (Network Block Device) server.
//!
//! Speaks the fixed-newstyle protocol as real clients expect it (qemu-img,
//! qemu-io, nbdinfo, nbdcopy, nbdsh, the Linux kernel): `GO`/`INFO` with
//! block sizes, structured replies with sparse reads, `base:allocation`
//! block status, 64-bit extended headers, FUA/FLUSH, TRIM, WRITE_ZEROES
//! with FAST_ZERO, CACHE, and out-of-order replies with many requests in
//! flight per connection.
//!
//! # Layout
//! * [`proto`]: the protocol without I/O — handshake state machine, request
//!   decoding and validation, reply encoding. Unit-tested on byte literals
//!   and fuzzed directly.
//! * [`backend`]: the [`BlockBackend`] trait the server needs, with a sparse
//!   [`MemoryBackend`] and a [`NullBackend`].
//! * [`Export`]: a named backend with its policy, counters and lifecycle.
//! * [`Server`]: exports plus listeners. A listener serves every export by
//!   name ([`Server::serve`]) or one export on its own port
//!   ([`Server::serve_export`]); both kinds can run in one process, and
//!   exports come and go at run time.
//! * `net` (private): sockets, the handshake driver, the transmission loop.
//! * [`errno_map`]: the one mapping from backend errors to NBD errors.
//! * [`buffer`]: page-aligned data buffers whose memory goes back to the OS
//!   when they are dropped.
//! * [`splice`]: READ data parked in kernel pipes, spliced from a file's
//!   page cache into a TCP socket without a copy
//!   ([`BlockBackend::read_for_socket`], [`SpliceReads`]).
//!
//! # Embedding
//! ```
//! use std::sync::Arc;
//! use nbd_server::{Export, MemoryBackend, Server, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::new(ServerConfig::default());
//! let disk = Arc::new(MemoryBackend::new(64 << 20));
//! let export = server.add_export(Export::new("disk0", disk).with_description("scratch disk"))?;
//!
//! // One port for this export alone...
//! let own = server.serve_export(tokio::net::TcpListener::bind("127.0.0.1:0").await?, &export)?;
//! // ...and one port serving every export by name.
//! let shared = server.serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?)?;
//! println!("nbd://{}/disk0 and nbd://{}/disk0", own.local_addr(), shared.local_addr());
//!
//! // Clients connect here. Later: remove one export, or stop everything.
//! let stats = server.remove_export("disk0").await?;
//! assert_eq!(stats.connections_active, 0);
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! * Nothing a client sends can panic the process or make it allocate more
//!   than the negotiated limits (64 KiB per option, 32 MiB per request);
//!   bad requests get the errno the spec names and the connection
//!   continues, garbage ends only that connection.
//! * Memory: a request's budget is reserved from its header, before its
//!   payload is read or its READ issued, and held until its reply is
//!   written. Per connection the bytes held never exceed
//!   [`ServerConfig::max_inflight_bytes_per_connection`], WRITEs half of it
//!   (one request larger than that runs alone); over all connections they never exceed
//!   [`ServerConfig::max_buffer_memory`], of which up to 1/8 (≤ 64 MiB) is
//!   kept for connections holding under 1 MiB, so clients that never read
//!   their replies cannot starve the others. Beyond the budgets a
//!   connection buffers at most a 64 KiB read-ahead window, released when
//!   it has been quiet for a check period (a quarter of the shortest of
//!   the idle and send timeouts, at most 15 s). A connection
//!   whose replies go unread for [`ServerConfig::send_timeout`] is closed,
//!   returning what it held.
//! * Connections: at [`ServerConfig::max_connections`],
//!   [`ServerConfig::max_connections_per_listener`] or
//!   [`ServerConfig::max_connections_per_export`], the longest-idle
//!   connection in that scope (nothing in flight; one in the handshake is
//!   idle since its last byte) is closed for the newcomer, and if none is
//!   idle the newcomer is closed: idle floods cannot lock anyone out, and a
//!   flood on one port cannot starve another. Connections with no request
//!   for [`ServerConfig::idle_timeout`] are closed; the handshake must make
//!   progress (a reply to each option) every
//!   [`ServerConfig::handshake_timeout`].
//! * FLUSH returns only after every write replied to before it is durable;
//!   FUA is a write followed by a flush. All connections to an export share
//!   one backend, so `CAN_MULTI_CONN` is advertised when the backend says
//!   its flush covers every handle.
#![deny(missing_docs)]

pub mod backend;
pub mod buffer;
mod dispatch;
pub mod errno_map;
mod error;
mod export;
mod net;
pub mod proto;
mod server;
pub mod splice;
pub mod tls;
mod zeroes;

pub use backend::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, MemoryBackend, NullBackend,
    ReadChunk, SocketChunk, ZeroFlags,
};
pub use error::ServerError;
pub use export::{Export, ExportRegistry, ExportStats, ExportStatsSnapshot};
pub use server::{
    ListenerHandle, Server, ServerConfig, SpliceReads, DEFAULT_INFLIGHT_PER_CONNECTION,
};
pub use tls::{ServerTls, TlsSetupError};
