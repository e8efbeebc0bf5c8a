//! The [`BlockBackend`] operations of a qcow2 image.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use imago::Mapping;
use nbd_server::{BackendError, BlockBackend, Caps, Extent, ReadChunk, WriteObserver, ZeroFlags};

use super::status::{status_at, MAX_STATUS_EXTENTS};
use super::zeroes::zero_range;
use super::*;
use crate::buf::AlignedBuf;

#[async_trait]
impl BlockBackend for QcowBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            can_fast_zero: true,
            can_allocation_depth: true,
            // One image instance (and metadata cache) serves every connection.
            can_multi_conn: true,
            ..Caps::default()
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        self.with_image("read", move |img| async move {
            let a = img.access.read().await;
            let end = offset + u64::from(len);
            // Split into zero and data runs first, then read only the data.
            let mut runs: Vec<(u64, u64, bool)> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let (m, n) = a.get_mapping(pos, end - pos).await?;
                let (n, zero) = match m {
                    Mapping::Eof { .. } => (end - pos, true),
                    Mapping::Zero { .. } => (n, true),
                    _ => (n, false),
                };
                let n = n.clamp(1, end - pos);
                match runs.last_mut() {
                    Some(last) if last.2 == zero => last.1 += n,
                    _ => runs.push((pos, n, zero)),
                }
                pos += n;
            }
            let mut chunks = Vec::with_capacity(runs.len());
            for (start, n, zero) in runs {
                // n ≤ len ≤ 32 MiB.
                if zero {
                    chunks.push(ReadChunk::Zero(n as u32));
                } else {
                    let mut buf = AlignedBuf::zeroed(n as usize);
                    a.read(buf.as_mut_slice(), start).await?;
                    chunks.push(ReadChunk::Data(buf.freeze()));
                }
            }
            Ok(chunks)
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        let n = data.len() as u64;
        self.with_image("write", move |img| async move {
            let a = img.access.read().await;
            a.write(&data[..], offset).await
        })
        .await
        .map_err(|e| e.at(offset))?;
        self.written(n);
        Ok(())
    }

    /// `observe` runs on the I/O thread right before imago's write, so a
    /// digest is computed while the payload is hot in that core's cache and
    /// off the connection's task (which goes back to reading the socket).
    async fn write_observed(
        &self,
        offset: u64,
        data: Bytes,
        observe: WriteObserver,
    ) -> Result<(), BackendError> {
        let n = data.len() as u64;
        self.with_image("write", move |img| async move {
            let a = img.access.read().await;
            observe(&data[..]);
            a.write(&data[..], offset).await
        })
        .await
        .map_err(|e| e.at(offset))?;
        self.written(n);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        let cluster = self.cluster_size;
        self.with_image("write_zeroes", move |img| async move {
            let a = img.access.read().await;
            zero_range(&a, offset, len, cluster, flags.fast).await
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.with_image("trim", move |img| async move {
            // discard needs &mut: exclusive against all other I/O on the image.
            let mut a = img.access.write().await;
            // Zero, not "any": in an overlay the range must not fall back to
            // the parent's old data.
            a.discard_to_zero(offset, len).await
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.with_image("flush", |img| async move {
            let a = img.access.read().await;
            // flush() writes back imago's metadata caches; sync() is the fsync.
            a.flush().await?;
            a.sync().await
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let size = self.size;
        self.with_image("block_status", move |img| async move {
            let a = img.access.read().await;
            let end = offset.saturating_add(len).min(size);
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end && out.len() < MAX_STATUS_EXTENTS {
                let Some(e) = status_at(&a, pos, end - pos).await? else {
                    break;
                };
                pos += e.length;
                match out.last_mut() {
                    Some(l) if l.hole == e.hole && l.zero == e.zero && l.depth == e.depth => {
                        l.length += e.length
                    }
                    _ => out.push(e),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn close(&self) -> Result<(), BackendError> {
        if self.image.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let read_only = self.read_only;
        self.with_image("close", move |img| async move {
            // Exclusive: waits for every in-flight operation.
            let a = img.access.write().await;
            img.closed.store(true, Ordering::Release);
            if !read_only {
                a.flush().await?;
                a.sync().await?;
            }
            Ok(())
        })
        .await
    }
}
