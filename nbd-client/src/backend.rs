//! [`NbdBackend`]: a remote export as an [`nbd_server::BlockBackend`], so
//! anything that consumes a backend (the digest reader, an export of our
//! own server) can work on a remote disk.

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::try_join_all;
use nbd_server::proto::consts::tx_flags;
use nbd_server::proto::NbdErrno;
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags,
};

use crate::client::{Client, ZeroOptions};
use crate::error::ClientError;

/// A connected remote export.
#[derive(Debug, Clone)]
pub struct NbdBackend {
    client: Client,
}

impl NbdBackend {
    /// Wrap a connected client.
    pub fn new(client: Client) -> Self {
        NbdBackend { client }
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Split `[offset, offset+len)` into pieces of at most the maximum payload.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let step = u64::from(self.client.info().max_payload.max(1));
        let end = offset.saturating_add(len);
        (0..len.div_ceil(step)).map(move |i| {
            let at = offset + i * step;
            (at, (end - at).min(step) as u32)
        })
    }
}

/// The backend error for a client error: server errnos map back to the
/// kinds the server side maps from.
pub fn to_backend_error(op: &'static str, e: ClientError) -> BackendError {
    let kind = match &e {
        ClientError::Server { errno, .. } => match *errno {
            NbdErrno::EPERM => BackendErrorKind::ReadOnly,
            NbdErrno::ENOSPC => BackendErrorKind::NoSpace,
            NbdErrno::EINVAL => BackendErrorKind::InvalidArgument,
            NbdErrno::ENOTSUP => BackendErrorKind::Unsupported,
            NbdErrno::ESHUTDOWN => BackendErrorKind::Shutdown,
            _ => BackendErrorKind::Io,
        },
        ClientError::OutOfRange { .. } => BackendErrorKind::OutOfRange,
        ClientError::Unsupported(_) | ClientError::NoMetaContext(_) => {
            BackendErrorKind::Unsupported
        }
        ClientError::TooLarge { .. } => BackendErrorKind::InvalidArgument,
        ClientError::Closed => BackendErrorKind::Shutdown,
        _ => BackendErrorKind::Io,
    };
    BackendError::new(kind, op).with_source(e)
}

#[async_trait]
impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn caps(&self) -> Caps {
        let i = self.client.info();
        Caps {
            read_only: i.has(tx_flags::READ_ONLY),
            can_flush: i.has(tx_flags::SEND_FLUSH),
            can_trim: i.has(tx_flags::SEND_TRIM),
            can_zero: i.has(tx_flags::SEND_WRITE_ZEROES),
            can_fast_zero: i.has(tx_flags::SEND_FAST_ZERO),
            can_cache: i.has(tx_flags::SEND_CACHE),
            can_multi_conn: i.has(tx_flags::CAN_MULTI_CONN),
            can_block_status: i.base_allocation.is_some(),
            can_allocation_depth: false,
            min_block: i.min_block,
            preferred_block: i.preferred_block,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let parts = try_join_all(self.pieces(offset, u64::from(len)).map(|(at, n)| {
            let c = &self.client;
            async move { c.read(at, n).await }
        }))
        .await
        .map_err(|e| to_backend_error("read", e).at(offset))?;
        Ok(parts.into_iter().flatten().collect())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        let base = offset;
        try_join_all(self.pieces(offset, data.len() as u64).map(|(at, n)| {
            let start = (at - base) as usize;
            let piece = data.slice(start..start + n as usize);
            let c = &self.client;
            async move { c.write(at, piece, false).await }
        }))
        .await
        .map_err(|e| to_backend_error("write", e).at(offset))?;
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        let opts = ZeroOptions {
            fua: false,
            no_hole: !flags.may_trim,
            fast: flags.fast,
        };
        self.client
            .write_zeroes(offset, len, opts)
            .await
            .map_err(|e| to_backend_error("write_zeroes", e).at(offset))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.client
            .trim(offset, len, false)
            .await
            .map_err(|e| to_backend_error("trim", e).at(offset))
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.client
            .flush()
            .await
            .map_err(|e| to_backend_error("flush", e))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        if self.client.info().base_allocation.is_none() {
            return Ok(vec![Extent::data(len.max(1))]);
        }
        let ext = self
            .client
            .block_status(offset, len)
            .await
            .map_err(|e| to_backend_error("block_status", e).at(offset))?;
        Ok(ext
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                hole: e.is_hole(),
                zero: e.is_zero(),
                depth: u32::from(!e.is_hole()),
            })
            .collect())
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if !self.client.info().has(tx_flags::SEND_CACHE) {
            return Ok(());
        }
        self.client
            .cache(offset, len)
            .await
            .map_err(|e| to_backend_error("cache", e).at(offset))
    }

    async fn close(&self) -> Result<(), BackendError> {
        self.client
            .disconnect()
            .await
            .map_err(|e| to_backend_error("disconnect", e))
    }
}
