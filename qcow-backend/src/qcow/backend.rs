//! The [`BlockBackend`] operations of a qcow2 image.

use std::fs::File as StdFile;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use imago::StorageExt;
use nbd_server::{BackendError, BlockBackend, Caps, Extent, ReadChunk, SocketChunk, ZeroFlags};

use super::mapping::{map_runs, own_descriptor, plan_hints, Source};
use super::run_cache::{window_of, RunCache, WINDOW};
use super::status::status_walk;
use super::status_cache::WINDOW_SPAN;
use super::zeroes::zero_range;
use super::*;
use crate::buf::AlignedBuf;
use crate::cached_read::read_misses;
use crate::direct_read::{read_direct, read_or_miss, without_pipes, Direct, DirectRun};
use crate::readahead::ReadAhead;
use crate::splice_read::{splice_runs, FileRun, MIN_SPLICED};

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
        // No pipes without asking for them.
        let chunks = self.read_chunks(offset, len, false).await?;
        without_pipes(chunks).map_err(|e| BackendError::from_io("read", e).at(offset))
    }

    async fn read_for_socket(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<SocketChunk>, BackendError> {
        // Only read-only layers have their own descriptors to splice from.
        let splice = !self.readahead.is_empty();
        self.read_chunks(offset, len, splice).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        let n = data.len() as u64;
        // Writes stay with the image's thread however large (0: the stall
        // rule only): they take the image's allocation and L2 locks, so a
        // second thread mostly waits and adds wake-ups; sequential writes
        // measured the same either way.
        self.with_image("write", 0, move |img| async move {
            let a = img.access.read().await;
            a.write(&data[..], offset).await
        })
        .await
        .map_err(|e| e.at(offset))?;
        self.written(offset, n);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        let cluster = self.cluster_size;
        self.with_image("write_zeroes", 0, move |img| async move {
            let a = img.access.read().await;
            zero_range(&a, offset, len, cluster, flags.fast).await
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.with_image("trim", 0, move |img| async move {
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
        self.with_image("flush", 0, |img| async move {
            let a = img.access.read().await;
            // flush() writes back imago's metadata caches; sync() is the fsync.
            a.flush().await?;
            a.sync().await
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let size = self.size;
        self.with_image("block_status", 0, move |img| async move {
            let a = img.access.read().await;
            status_walk(&a, offset, offset.saturating_add(len).min(size), false).await
        })
        .await
    }

    async fn block_status_first(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let size = self.size;
        let end = offset.saturating_add(len).min(size);
        let Some(cache) = &self.status_cache else {
            return self
                .with_image("block_status", 0, move |img| async move {
                    let a = img.access.read().await;
                    status_walk(&a, offset, end, true).await
                })
                .await;
        };
        if let Some(e) = cache.first(offset, end) {
            return Ok(e);
        }
        // Walk ahead of the request (qemu's next ones follow it), remember.
        let ahead = offset.saturating_add(WINDOW_SPAN).min(size);
        let walked = self
            .with_image("block_status", 0, move |img| async move {
                let a = img.access.read().await;
                status_walk(&a, offset, ahead, false).await
            })
            .await?;
        cache.insert(offset, &walked);
        Ok(cache.first(offset, end).unwrap_or(walked))
    }

    async fn close(&self) -> Result<(), BackendError> {
        if self.image.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let read_only = self.read_only;
        self.with_image("close", 0, move |img| async move {
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

impl QcowBackend {
    /// A READ on the image's I/O thread; with `splice`, data of read-only
    /// layers may come as pipes ([`splice_runs`]).
    async fn read_chunks(
        &self,
        offset: u64,
        len: u32,
        splice: bool,
    ) -> Result<Vec<SocketChunk>, BackendError> {
        self.read_ahead(offset, len);
        let fail = |e| BackendError::from_io("read", e).at(offset);
        // Known runs: read here, no hop to the I/O thread.
        if let Some((cache, runs)) = self
            .run_cache
            .as_ref()
            .and_then(|c| Some((c, c.lookup(offset, u64::from(len))?)))
        {
            if self.image.closed.load(Ordering::Acquire) {
                return Err(BackendError::new(BackendErrorKind::Shutdown, "read"));
            }
            cache.served_one();
            return read_direct(&runs, splice, Some(&self.readahead))
                .await
                .map_err(fail);
        }
        let readahead = Arc::clone(&self.readahead);
        let cache = self.run_cache.clone();
        let size = self.size;
        self.with_image("read", len as usize, move |img| async move {
            let a = img.access.read().await;
            if let Some(cache) = &cache {
                let request = offset..offset + u64::from(len);
                if let Some(runs) = remember_window(&a, cache, &readahead, request, size).await {
                    return read_direct(&runs, splice, Some(&readahead)).await;
                }
            }
            read_resolved(&a, &readahead, offset, len, splice).await
        })
        .await
        .map_err(|e| e.at(offset))
    }

    /// Hint a sequential reader's next window (`readahead.rs`) from the
    /// next I/O thread: the walk through the mappings (in a chain, the
    /// first touch of every layer's L2 tables reads them from the disk) and
    /// the `fadvise` calls (each waits for room in the device queue) then
    /// never hold up the reads queued on the image's own thread.
    fn read_ahead(&self, offset: u64, len: u32) {
        let Some(window) = self.readahead.due(offset, u64::from(len)) else {
            return;
        };
        let (image, readahead) = (Arc::clone(&self.image), Arc::clone(&self.readahead));
        let _ = self.pool.spawn(self.home + 1, move || async move {
            if image.closed.load(Ordering::Acquire) {
                return;
            }
            let a = image.access.read().await;
            let runs = plan_hints(&a, window).await;
            drop(a);
            readahead.hint_window(&runs);
        });
    }
}

/// Read `len` bytes at `offset`, resolving each cluster mapping once: the
/// runs are mapped first (zero runs become [`ReadChunk::Zero`]), adjacent
/// data runs share one buffer, and plain data is read straight from the
/// layer file the mapping names (runs contiguous in one file in one
/// `preadv`) instead of through `FormatAccess::read`, which would look
/// every mapping up a second time. Read-only layers are read from the page
/// cache on this thread and from the disk on the blocking pool
/// (`cached_read.rs`), so a cold read never holds the I/O thread. With
/// `splice`, data runs that all lie in read-only layers' cached pages go
/// into pipes instead of a buffer (`splice_read.rs`).
pub(super) async fn read_resolved(
    a: &Access,
    readahead: &ReadAhead,
    offset: u64,
    len: u32,
    splice: bool,
) -> std::io::Result<Vec<SocketChunk>> {
    let (runs, failed) = map_runs(a, offset..offset + u64::from(len)).await;
    if let Some(e) = failed {
        return Err(e);
    }
    // Read-only layers' own descriptors, per run (None: read through
    // imago).
    let mut direct: Vec<Option<Arc<StdFile>>> = Vec::with_capacity(runs.len());
    for (_, _, src) in &runs {
        direct.push(match src {
            Source::Raw(f, _) if !readahead.is_empty() => own_descriptor(readahead, f),
            _ => None,
        });
    }
    let mut chunks = Vec::with_capacity(runs.len());
    let mut i = 0;
    while i < runs.len() {
        if matches!(runs[i].2, Source::Zero) {
            // n ≤ len ≤ u32::MAX.
            chunks.push(SocketChunk::Read(ReadChunk::Zero(runs[i].1 as u32)));
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
        if splice && total >= MIN_SPLICED {
            if let Some(pieces) =
                file_runs(&runs[i..j], &direct[i..j]).and_then(|r| splice_runs(&r))
            {
                chunks.extend(pieces.into_iter().map(SocketChunk::Piped));
                i = j;
                continue;
            }
        }
        // Every byte is read into below (the runs tile it), so a recycled
        // buffer needs no zeroing.
        let mut buf = AlignedBuf::for_overwrite(total as usize);
        let mut misses = Vec::new();
        let whole = buf.as_mut_slice();
        for ((at, n, src), file) in runs[i..j].iter().zip(&direct[i..j]) {
            let lo = (*at - start) as usize;
            let n = *n as usize;
            let part = &mut whole[lo..lo + n];
            match (src, file) {
                // The rest waits on the disk, off this thread.
                (Source::Raw(_, host), Some(file)) => {
                    read_or_miss(file, part, *host, lo, &mut misses)
                }
                (Source::Raw(f, host), None) => f.read(part, *host).await?,
                _ => a.read(part, *at).await?,
            }
        }
        if !misses.is_empty() {
            readahead.missed();
            buf = read_misses(buf, misses).await?;
        }
        chunks.push(SocketChunk::Read(ReadChunk::Data(buf.freeze())));
        i = j;
    }
    Ok(chunks)
}

/// The runs as plain data in read-only layer files, if all of them are.
fn file_runs<'a>(
    runs: &[(u64, u64, Source<'_>)],
    direct: &'a [Option<Arc<StdFile>>],
) -> Option<Vec<FileRun<'a>>> {
    runs.iter()
        .zip(direct)
        .map(|((_, len, src), file)| match (src, file) {
            (Source::Raw(_, host), Some(file)) => Some(FileRun {
                file,
                offset: *host,
                len: *len,
            }),
            _ => None,
        })
        .collect()
}

/// Resolve and remember the window `request` lies in (if it lies in one
/// and is not yet remembered): the request's runs from it, if every run of
/// the window is zeroes or plain data in a read-only layer. `None` leaves
/// the request to [`read_resolved`].
async fn remember_window(
    a: &Access,
    cache: &RunCache,
    readahead: &ReadAhead,
    request: std::ops::Range<u64>,
    size: u64,
) -> Option<Vec<DirectRun>> {
    let index = window_of(request.start, request.end - request.start)?;
    if !cache.contains(index) {
        let start = index.checked_mul(WINDOW)?;
        let window = start..start.saturating_add(WINDOW).min(size);
        let (runs, failed) = map_runs(a, window).await;
        if failed.is_some() {
            // The request's own resolution reports it.
            return None;
        }
        // Compressed clusters, or a layer without its own descriptor: the
        // window is remembered as one whose READs go the usual way.
        let direct = runs
            .iter()
            .map(|(at, len, src)| {
                let src = match src {
                    Source::Zero => Direct::Zero,
                    Source::Raw(f, host) => Direct::File(own_descriptor(readahead, f)?, *host),
                    Source::Other => return None,
                };
                Some(DirectRun {
                    at: *at,
                    len: *len,
                    src,
                })
            })
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        cache.insert(index, direct);
    }
    cache.lookup(request.start, request.end - request.start)
}
