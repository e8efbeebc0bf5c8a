//! The only place sockets and tokio I/O appear: accept loops, the handshake
//! driver, and the per-connection transmission loop.

pub(crate) mod budget;
pub(crate) mod frames;
pub(crate) mod listener;
pub(crate) mod negotiate;
pub(crate) mod outbox;
pub(crate) mod registry;
pub(crate) mod request_reader;
pub(crate) mod transmission;
