//! The [`BlockBackend`] operations of a qcow2 image.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use imago::file::File;
use imago::{Mapping, Storage, StorageExt};
use nbd_server::{BackendError, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags};

use super::status::{status_at, MAX_STATUS_EXTENTS};
use super::zeroes::zero_range;
use super::*;
use crate::buf::AlignedBuf;
use crate::readahead::ReadAhead;

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
        let readahead = Arc::clone(&self.readahead);
        self.with_image("read", move |img| async move {
            let a = img.access.read().await;
            read_resolved(&a, &readahead, offset, len).await
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

/// Where one run of a read comes from.
enum Source<'a> {
    /// Reads as zeroes (unallocated, zero clusters, past the end).
    Zero,
    /// Plain data at this offset of this layer's file.
    Raw(&'a File, u64),
    /// Anything else (compressed clusters): imago's own read path.
    Other,
}

/// Read `len` bytes at `offset`, resolving each cluster mapping once: the
/// runs are mapped first (zero runs become [`ReadChunk::Zero`]), adjacent
/// data runs share one buffer, and plain data is read straight from the
/// layer file the mapping names (runs contiguous in one file in one
/// `preadv`) instead of through `FormatAccess::read`, which would look
/// every mapping up a second time.
pub(super) async fn read_resolved(
    a: &Access,
    readahead: &ReadAhead,
    offset: u64,
    len: u32,
) -> std::io::Result<Vec<ReadChunk>> {
    let end = offset + u64::from(len);
    let mut runs: Vec<(u64, u64, Source<'_>)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (m, n) = a.get_mapping(pos, end - pos).await?;
        let (n, src) = match m {
            Mapping::Eof { .. } => (end - pos, Source::Zero),
            Mapping::Zero { .. } => (n, Source::Zero),
            Mapping::Raw {
                storage, offset, ..
            } => (n, Source::Raw(storage, offset)),
            _ => (n, Source::Other),
        };
        let n = n.clamp(1, end - pos);
        match (runs.last_mut(), &src) {
            (Some((_, ln, Source::Zero)), Source::Zero) => *ln += n,
            // The next cluster follows in the same file: one read.
            (Some((_, ln, Source::Raw(f, host))), Source::Raw(g, h))
                if std::ptr::eq(*f, *g) && host.checked_add(*ln) == Some(*h) =>
            {
                *ln += n
            }
            _ => runs.push((pos, n, src)),
        }
        pos += n;
    }
    if !readahead.is_empty() {
        // Queue what a sequential reader needs next before waiting on this.
        for (_, n, src) in &runs {
            if let Source::Raw(f, host) = src {
                if let Some(path) = f.get_filename() {
                    readahead.reading(&path, *host, *n);
                }
            }
        }
    }
    let mut chunks = Vec::with_capacity(runs.len());
    let mut i = 0;
    while i < runs.len() {
        if matches!(runs[i].2, Source::Zero) {
            // n ≤ len ≤ u32::MAX.
            chunks.push(ReadChunk::Zero(runs[i].1 as u32));
            i += 1;
            continue;
        }
        // Data runs up to the next zero run fill one buffer.
        let start = runs[i].0;
        let mut j = i;
        while j < runs.len() && !matches!(runs[j].2, Source::Zero) {
            j += 1;
        }
        let total: u64 = runs[i..j].iter().map(|r| r.1).sum();
        // Every byte is read into below (the runs tile it), so a recycled
        // buffer needs no zeroing.
        let mut buf = AlignedBuf::for_overwrite(total as usize);
        let whole = buf.as_mut_slice();
        for (at, n, src) in &runs[i..j] {
            let lo = (*at - start) as usize;
            let part = &mut whole[lo..lo + *n as usize];
            match src {
                Source::Raw(f, host) => f.read(part, *host).await?,
                _ => a.read(part, *at).await?,
            }
        }
        chunks.push(ReadChunk::Data(buf.freeze()));
        i = j;
    }
    Ok(chunks)
}
