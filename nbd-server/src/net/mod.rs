//! The only place sockets and tokio I/O appear: accept loops, the handshake
//! driver, and the per-connection transmission loop.

pub(crate) mod frames;
pub(crate) mod listener;
pub(crate) mod negotiate;
pub(crate) mod transmission;
