//! The storage interface the server needs, and two backends that ship with it.
//!
//! The trait lives here, with its consumer (vm-memory's rule: the crate that
//! uses an interface defines it). Implementations elsewhere — qcow2 and raw
//! files in `qcow-backend` — depend on this crate for the trait only.
//!
//! The server validates every request before calling a backend, so a
//! backend may assume `offset + len <= size()` for every call and never sees
//! writes on a read-only export.

mod error;
mod memory;
mod null;

pub use error::{classify_io, BackendError, BackendErrorKind};
pub use memory::MemoryBackend;
pub use null::NullBackend;

use async_trait::async_trait;
use bytes::Bytes;

use crate::splice::Piped;

/// What a backend supports. The export's transmission flags are computed
/// from this (nbdkit's `can_*` callbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Writes are refused.
    pub read_only: bool,
    /// FLUSH (and FUA, emulated by a flush after the write) is meaningful.
    pub can_flush: bool,
    /// TRIM does something.
    pub can_trim: bool,
    /// WRITE_ZEROES is efficient (advertised either way; the server falls
    /// back to writing zero buffers only inside the backend).
    pub can_zero: bool,
    /// WRITE_ZEROES with FAST_ZERO can succeed.
    pub can_fast_zero: bool,
    /// CACHE does something.
    pub can_cache: bool,
    /// FLUSH on one handle covers writes from every handle of this backend,
    /// so several connections may share it (`NBD_FLAG_CAN_MULTI_CONN`).
    pub can_multi_conn: bool,
    /// `block_status` reports real allocation (`base:allocation`).
    pub can_block_status: bool,
    /// `block_status` reports backing-chain depth (`qemu:allocation-depth`).
    pub can_allocation_depth: bool,
    /// Smallest useful alignment (advertised as the minimum block size).
    pub min_block: u32,
    /// Alignment that avoids read-modify-write.
    pub preferred_block: u32,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            read_only: false,
            can_flush: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: false,
            can_cache: false,
            can_multi_conn: true,
            can_block_status: true,
            can_allocation_depth: false,
            min_block: 1,
            preferred_block: 4096,
        }
    }
}

/// One piece of a read result, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes read.
    Data(Bytes),
    /// A run of this many bytes that reads as zeroes (sent as a hole when
    /// structured replies allow it).
    Zero(u32),
}

impl ReadChunk {
    /// Bytes this chunk covers.
    pub fn len(&self) -> u64 {
        match self {
            ReadChunk::Data(b) => b.len() as u64,
            ReadChunk::Zero(n) => u64::from(*n),
        }
    }

    /// Whether the chunk covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One piece of a READ reply on its way to a socket: read data, or pages
/// parked in a pipe to be spliced into the socket without a copy
/// ([`crate::splice`]).
#[derive(Debug)]
pub enum SocketChunk {
    /// Data or zeroes, as [`BlockBackend::read`] returns them.
    Read(ReadChunk),
    /// File pages in a pipe.
    Piped(Piped),
}

impl SocketChunk {
    /// Bytes this chunk covers.
    pub fn len(&self) -> u64 {
        match self {
            SocketChunk::Read(c) => c.len(),
            SocketChunk::Piped(p) => p.len() as u64,
        }
    }

    /// Whether the chunk covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range may be deallocated (client did not send NO_HOLE).
    pub may_trim: bool,
    /// Fail with [`BackendErrorKind::Unsupported`] unless this is faster
    /// than writing zero buffers, and change nothing in that case.
    pub fast: bool,
}

/// Allocation status of one extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Not allocated in the top layer's storage.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Backing-chain depth the data comes from: 0 unallocated everywhere,
    /// 1 the top layer, 2 its backing file, ...
    pub depth: u32,
}

impl Extent {
    /// An allocated data extent in the top layer.
    pub fn data(length: u64) -> Self {
        Extent {
            length,
            hole: false,
            zero: false,
            depth: 1,
        }
    }

    /// An unallocated extent that reads as zeroes.
    pub fn hole(length: u64) -> Self {
        Extent {
            length,
            hole: true,
            zero: true,
            depth: 0,
        }
    }
}

/// A block device as the NBD server sees it.
///
/// Buffers are owned (`Bytes`) so a backend can hand them to its own I/O
/// threads without copying. All methods may be called concurrently from
/// many connections.
#[async_trait]
pub trait BlockBackend: Send + Sync + std::fmt::Debug + 'static {
    /// Size in bytes; fixed for the backend's lifetime.
    fn size(&self) -> u64;

    /// Capabilities, fixed for the backend's lifetime.
    fn caps(&self) -> Caps;

    /// Read `len` bytes at `offset`. The chunks cover exactly `len` bytes.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError>;

    /// [`read`](Self::read) for a reply that goes to a plain TCP socket:
    /// data may come as [`SocketChunk::Piped`], file pages the socket sends
    /// without a copy. The default is `read`. The chunks cover exactly
    /// `len` bytes.
    async fn read_for_socket(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<SocketChunk>, BackendError> {
        Ok(self
            .read(offset, len)
            .await?
            .into_iter()
            .map(SocketChunk::Read)
            .collect())
    }

    /// Write `data` at `offset`.
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError>;

    /// Make `len` bytes at `offset` read as zeroes.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError>;

    /// Discard hint; afterwards the range may read as anything.
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError>;

    /// Persist everything written so far (data and metadata).
    async fn flush(&self) -> Result<(), BackendError>;

    /// Allocation status starting at `offset`. Returns at least one extent
    /// covering `offset`; extents are consecutive and may end before or
    /// after `offset + len`.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError>;

    /// [`block_status`](Self::block_status) for a client that uses only the
    /// first extent (`NBD_CMD_FLAG_REQ_ONE`, what qemu's client always
    /// sends, with `len` up to the end of the disk): the answer may end
    /// where the `hole`/`zero` status first changes, so a backend can stop
    /// walking there instead of describing the whole range once per
    /// request. The default describes the whole range.
    async fn block_status_first(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.block_status(offset, len).await
    }

    /// Prefetch hint. The default does nothing.
    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }

    /// Called once when the export is removed or the server shuts down:
    /// persist and release. The default flushes (when writable).
    async fn close(&self) -> Result<(), BackendError> {
        if self.caps().read_only {
            Ok(())
        } else {
            self.flush().await
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
