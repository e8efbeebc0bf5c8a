//! The NBD protocol without I/O: bytes in, typed values and bytes out.
//!
//! Nothing here touches a socket, a runtime or a clock, which is what lets
//! the codec be unit-tested on byte literals and fuzzed directly.
//!
//! ```text
//!            handshake (handshake.rs, option.rs)         transmission (request.rs, reply.rs)
//! greeting → client flags → options … GO/EXPORT_NAME → request → validate → Command → reply
//! ```

pub mod consts;
pub mod errno;
pub mod handshake;
pub mod option;
pub mod reply;
pub mod request;

pub use errno::NbdErrno;
pub use handshake::{
    ExportCatalog, ExportInfo, Handshake, HandshakeError, HandshakeStep, MetaContext, Negotiated,
    TlsMode,
};
pub use reply::{ReplyEncoder, ReplyMode, ReplyTo, StatusDescriptor};
pub use request::{validate, Command, FrameError, RequestHeader, Session};
