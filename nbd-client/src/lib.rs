//! An async NBD (Network Block Device) client on tokio.
//!
//! Negotiates fixed newstyle with 64-bit extended headers (falling back to
//! structured replies, then simple replies), the `base:allocation` metadata
//! context and any others asked for (such as `qemu:dirty-bitmap:NAME`), and `GO` with block sizes; then runs many requests in flight on
//! one connection: READ (sparse, assembled from data and hole chunks),
//! WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+FAST_ZERO, NO_HOLE), CACHE,
//! BLOCK_STATUS and DISC.
//!
//! ```no_run
//! # async fn f() -> Result<(), nbd_client::ClientError> {
//! use nbd_client::{Client, ConnectOptions};
//! let c = Client::connect("127.0.0.1:10809", &ConnectOptions::new("disk0")).await?;
//! let data = c.read_bytes(0, 4096).await?;
//! c.write(4096, data, true).await?;
//! c.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! * [`reply`] and [`assemble`]: replies from bytes and their validation
//!   against the request, without I/O (random bytes never panic them).
//! * [`option_wire`]: handshake messages, without I/O.
//! * `handshake`: the negotiation driver; `client`: the transmission tasks.
//! * [`NbdBackend`]: a remote export as an [`nbd_server::BlockBackend`].
//!
//! Wire constants and request encoding come from `nbd_server::proto`: one
//! definition of the protocol for both sides.
//!
//! # Guarantees
//! Nothing a server sends can panic the client or make it allocate more
//! than the request being answered (bounded by the negotiated maximum
//! payload, itself capped at 32 MiB) or small fixed bounds for metadata.
//! Any protocol violation fails every pending request with a typed
//! [`ProtocolError`] and closes the connection; a server error fails only
//! its request, with the errno.
#![deny(missing_docs)]

pub mod assemble;
mod backend;
mod client;
mod error;
mod handshake;
mod multi;
pub mod option_wire;
pub mod reply;
mod tls;
mod uri;

pub use backend::{to_backend_error, NbdBackend};
pub use client::{Client, ZeroOptions};
pub use error::{ClientError, HandshakeError, ProtocolError};
pub use handshake::{ConnectOptions, ExportInfo, MetaContext};
pub use multi::MultiConn;
pub use reply::Extent;
pub use tls::{ClientTls, TlsConfigError};
pub use uri::{NbdUri, UriError, DEFAULT_PORT};

/// Connect to an `nbd://host:port/export` URI with default options, or
/// to `nbds://…?tls-certificates=DIR` over TLS with DIR's credentials.
pub async fn connect_uri(uri: &str) -> Result<Client, ConnectError> {
    let u = NbdUri::parse(uri)?;
    let opts = options_for(&u)?;
    Ok(Client::connect_host(&u.host, u.port, &opts).await?)
}

/// Default options for a parsed URI (TLS credentials loaded for `nbds://`;
/// `?dirty-bitmap=NAME` selects `qemu:dirty-bitmap:NAME` too).
pub fn options_for(u: &NbdUri) -> Result<ConnectOptions, ConnectError> {
    let mut opts = ConnectOptions::new(u.export.clone());
    opts.meta_contexts.extend(u.dirty_bitmap_context());
    if u.tls {
        let dir = u.tls_certificates.as_deref().ok_or_else(|| {
            TlsConfigError::new(
                "nbds:// needs ?tls-certificates=DIR (the directory with ca-cert.pem)",
            )
        })?;
        opts.tls = Some(ClientTls::from_dir(std::path::Path::new(dir))?);
    }
    Ok(opts)
}

/// Why [`connect_uri`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The URI.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The connection or handshake.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// TLS credentials.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}
