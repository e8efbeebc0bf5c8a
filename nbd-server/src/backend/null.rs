//! A disk that reads as zeroes and forgets every write: measures the cost of
//! the protocol and the server alone (nbdkit's `null` plugin).

use async_trait::async_trait;
use bytes::Bytes;

use super::{BackendError, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct NullBackend {
    size: u64,
    sparse_reads: bool,
}

impl NullBackend {
    /// A null disk of `size` bytes whose reads are reported as holes.
    pub fn new(size: u64) -> Self {
        NullBackend {
            size,
            sparse_reads: true,
        }
    }

    /// A null disk whose reads send real zero bytes, as nbdkit's null plugin
    /// does; use this to compare wire throughput with it.
    pub fn with_dense_reads(size: u64) -> Self {
        NullBackend {
            size,
            sparse_reads: false,
        }
    }
}

#[async_trait]
impl BlockBackend for NullBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            can_fast_zero: true,
            ..Caps::default()
        }
    }

    async fn read(&self, _offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.sparse_reads {
            Ok(vec![ReadChunk::Zero(len)])
        } else {
            // Real zero bytes on the wire, borrowed from the static zero page.
            Ok(crate::zeroes::zero_segments(u64::from(len))
                .map(ReadChunk::Data)
                .collect())
        }
    }

    async fn write(&self, _offset: u64, _data: Bytes) -> Result<(), BackendError> {
        Ok(())
    }

    async fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let n = len.min(self.size - offset.min(self.size));
        Ok(vec![Extent::hole(n.max(1))])
    }
}
