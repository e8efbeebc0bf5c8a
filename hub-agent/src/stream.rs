//! Streaming one disk: read the source in chunks, hash every block read
//! (the digest and the next change-tracking state need every leaf), and
//! write to the NBD target only what the target lacks: for a full, every
//! block that is not zero (the hub's fresh image reads zeroes); for an
//! incremental, every block whose leaf differs from the base state, blocks
//! that became zero as WRITE_ZEROES.
//!
//! What is read: the whole source, except for an incremental of a source
//! with a dirty bitmap ([`crate::source::DirtyBitmap`]): then only the
//! blocks the bitmap marks dirty, and the leaves of the others come from
//! the base state (the operator's contract: the bitmap records every write
//! since the data of the base was read). Dirty blocks are still hashed and
//! skipped when unchanged, so a bitmap that says too much costs reads, not
//! correctness. A bitmap that cannot be queried means a whole read.
//!
//! Several chunks are in flight at once (read, hash, write), and their
//! writes are pipelined on the one NBD connection; memory is bounded by
//! `in_flight × chunk` per disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use disk_digest::algo::{root, segment_hash, Geometry};
use disk_digest::{Hash, BLOCK_SIZE, SEGMENT_BLOCKS};
use futures_util::future::try_join_all;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use nbd_client::{Client, ClientError, ZeroOptions};
use nbd_server::proto::consts::tx_flags;
use nbd_server::{BackendError, BlockBackend, ReadChunk};
use tokio::sync::Semaphore;

use crate::blocks::{classify, slice_of, BlockInfo};
use crate::rawfile::RawFile;
use crate::source::DirtyBitmap;
use crate::tracking::DiskState;

/// Tuning of one disk's stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Bytes per source read (a multiple of the 64 KiB block).
    pub chunk: u64,
    /// Chunks in flight per disk.
    pub in_flight: usize,
    /// Largest WRITE request (also capped by the target's maximum payload).
    pub max_write: u64,
    /// Credentials for `nbds://` targets (the hub's CA, and a client
    /// certificate when the hub verifies peers).
    pub tls: Option<nbd_client::ClientTls>,
    /// Read and hash a raw file's chunk in one blocking task, so the
    /// hashing finds the bytes still in the CPU's cache (else the read is
    /// one task and the hashing another, typically after other chunks
    /// have pushed the bytes out to memory).
    pub fused_read_hash: bool,
    /// At most this many chunks are being read-and-hashed at once across
    /// all disks of a push (0: no bound). The work is CPU-bound; more
    /// tasks than cores only time-slice and evict each other's bytes.
    pub cpu_tasks: usize,
}

impl Default for StreamOptions {
    /// 1 MiB reads × 32 in flight (≤ 32 MiB of data per disk), 256 KiB
    /// writes: against qemu-nbd on tmpfs these were the fastest of the
    /// shapes tried (4 MiB × 4, 2 MiB × 8/16, 4 MiB × 16; 1 MiB writes) on
    /// a loaded 2-core machine, if only by noise-sized margins.
    fn default() -> Self {
        StreamOptions {
            chunk: 1 << 20,
            in_flight: 32,
            max_write: 256 << 10,
            tls: None,
            fused_read_hash: true,
            cpu_tasks: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What a stream did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    /// Payload bytes written.
    pub bytes_written: u64,
    /// Bytes zeroed with WRITE_ZEROES.
    pub bytes_zeroed: u64,
    /// WRITE requests.
    pub write_requests: u64,
    /// WRITE_ZEROES requests.
    pub zero_requests: u64,
    /// Blocks not sent: zero in a full, unchanged in an incremental
    /// (read and found unchanged, or clean in the dirty bitmap).
    pub blocks_skipped: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Blocks the dirty bitmap marked clean: neither read nor sent (their
    /// leaves came from the base state).
    pub blocks_clean: u64,
}

impl StreamStats {
    fn add(&mut self, o: &StreamStats) {
        self.bytes_written += o.bytes_written;
        self.bytes_zeroed += o.bytes_zeroed;
        self.write_requests += o.write_requests;
        self.zero_requests += o.zero_requests;
        self.blocks_skipped += o.blocks_skipped;
        self.bytes_read += o.bytes_read;
        self.blocks_clean += o.blocks_clean;
    }
}

/// Why a stream failed. Messages never carry target URIs.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The target export is not the source's size.
    #[error("source is {source_size} bytes but the target export is {target_size}")]
    SizeMismatch {
        /// Source size.
        source_size: u64,
        /// Target size.
        target_size: u64,
    },
    /// The base state is for a disk of another size.
    #[error("change tracking state is for {state} bytes, the source has {source_size}")]
    StateSize {
        /// Size in the state.
        state: u64,
        /// Source size.
        source_size: u64,
    },
    /// Reading the source.
    #[error("reading source at offset {offset}: {source}")]
    Read {
        /// Chunk offset.
        offset: u64,
        /// Cause.
        source: BackendError,
    },
    /// Writing the target.
    #[error("writing target at offset {offset}: {source}")]
    Write {
        /// Request offset.
        offset: u64,
        /// Cause.
        source: ClientError,
    },
    /// Flushing the target.
    #[error("flushing target: {0}")]
    Flush(ClientError),
    /// The hashing task died.
    #[error("hashing task failed: {0}")]
    Hashing(String),
}

/// The result of streaming one disk.
#[derive(Debug, Clone)]
pub struct StreamOutcome {
    /// `blake3-tree-v1` root of the source as read.
    pub digest: Hash,
    /// Leaf of every block (the next change-tracking state).
    pub leaves: Vec<Hash>,
    /// Counters.
    pub stats: StreamStats,
}

/// One disk to stream.
#[derive(Debug)]
pub struct DiskStream {
    /// The opened source.
    pub source: Arc<dyn BlockBackend>,
    /// The same source when it is a raw file to read and hash in one
    /// blocking task ([`StreamOptions::fused_read_hash`]); `None`: read
    /// through `source`.
    pub raw: Option<Arc<RawFile>>,
    /// Permits for reading-and-hashing, shared by the disks of a push
    /// ([`StreamOptions::cpu_tasks`]); `None`: no bound.
    pub cpu: Option<Arc<Semaphore>>,
    /// The connected target.
    pub target: Client,
    /// Base of an incremental; `None` for a full.
    pub base: Option<Arc<DiskState>>,
    /// The source's dirty bitmap (used only with a base).
    pub dirty: Option<DirtyBitmap>,
    /// Progress of this disk.
    pub progress: Arc<DiskCounter>,
}

/// Progress of one disk, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct DiskCounter {
    /// Bytes handled so far (read and sent or skipped).
    pub done: AtomicU64,
    /// Disk size, once the source is open (0 before).
    pub total: AtomicU64,
}

/// What to do with a run of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Skip,
    Write,
    Zero,
}

fn action(b: &BlockInfo, base: Option<&Hash>) -> Action {
    match base {
        Some(old) if *old == b.leaf => Action::Skip,
        Some(_) if b.zero => Action::Zero,
        None if b.zero => Action::Skip,
        _ => Action::Write,
    }
}

/// Stream the whole disk; the target is flushed before this returns.
pub async fn stream_disk(d: DiskStream, opts: StreamOptions) -> Result<StreamOutcome, StreamError> {
    let size = d.source.size();
    d.progress.total.store(size, Ordering::Relaxed);
    if d.target.size() != size {
        return Err(StreamError::SizeMismatch {
            source_size: size,
            target_size: d.target.size(),
        });
    }
    if let Some(b) = &d.base {
        if b.size != size {
            return Err(StreamError::StateSize {
                state: b.size,
                source_size: size,
            });
        }
    }
    let g = Geometry::new(size);
    // Whole blocks, and at most 32 MiB so one read's length fits its u32.
    let chunk = opts.chunk.clamp(BLOCK_SIZE, 32 << 20) / BLOCK_SIZE * BLOCK_SIZE;
    let per = chunk / BLOCK_SIZE;
    let dirty = match (&d.base, &d.dirty) {
        (Some(_), Some(bm)) => match dirty_blocks(bm, &g).await {
            Ok(set) => Some(set),
            // Reading everything is what a source without a bitmap gets:
            // slower, never wrong.
            Err(e) => {
                tracing::warn!(error = %e, "dirty bitmap unusable; reading the whole disk");
                None
            }
        },
        _ => None,
    };
    let mut stats = StreamStats::default();
    // With a bitmap, clean blocks keep the base's leaves and only dirty
    // runs are read; without, every block is read, in order.
    let (mut leaves, jobs): (Vec<Hash>, Box<dyn Iterator<Item = (u64, u64)> + Send>) =
        match (&dirty, &d.base) {
            (Some(set), Some(base)) => {
                let clean = set.iter().filter(|x| !**x).count() as u64;
                stats.blocks_clean = clean;
                stats.blocks_skipped = clean;
                let clean_bytes: u64 = set
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| !**x)
                    .map(|(b, _)| g.block_len(b as u64))
                    .sum();
                d.progress.done.fetch_add(clean_bytes, Ordering::Relaxed);
                (base.leaves.clone(), Box::new(dirty_runs(set.clone(), per)))
            }
            _ => {
                let blocks = g.blocks();
                (
                    Vec::with_capacity(blocks as usize),
                    Box::new((0..blocks.div_ceil(per)).map(move |i| {
                        let first = i * per;
                        (first, per.min(blocks - first))
                    })),
                )
            }
        };
    let in_order = dirty.is_none();
    let d = &d;
    let mut results = stream::iter(jobs)
        .map(|(first, n)| chunk_job(d, g, first, n, opts.max_write))
        .buffered(opts.in_flight.max(1));
    while let Some((first, l, s, bytes)) = results.try_next().await? {
        if in_order {
            leaves.extend(l);
        } else {
            let at = first as usize;
            let slot = at
                .checked_add(l.len())
                .and_then(|end| leaves.get_mut(at..end))
                .ok_or_else(|| StreamError::Hashing("dirty run outside the disk".into()))?;
            slot.copy_from_slice(&l);
        }
        stats.add(&s);
        d.progress.done.fetch_add(bytes, Ordering::Relaxed);
    }
    drop(results);
    if d.target.info().has(tx_flags::SEND_FLUSH) {
        d.target.flush().await.map_err(StreamError::Flush)?;
    }
    let segs: Vec<Hash> = leaves
        .chunks(SEGMENT_BLOCKS as usize)
        .map(segment_hash)
        .collect();
    Ok(StreamOutcome {
        digest: root(size, &segs),
        leaves,
        stats,
    })
}

/// Which blocks of a disk of geometry `g` the bitmap marks dirty: those
/// with at least one dirty byte (the bitmap's granularity need not be the
/// block size). Extents are clamped to the disk; the client refuses
/// zero-length ones, so every reply moves forward.
pub async fn dirty_blocks(bm: &DirtyBitmap, g: &Geometry) -> Result<Vec<bool>, ClientError> {
    let size = g.size();
    let mut set = vec![false; g.blocks() as usize];
    let mut at = 0u64;
    while at < size {
        let extents = bm
            .client
            .block_status_of(&bm.context, at, size - at)
            .await?;
        for e in extents {
            // at < size here, so at + len ≤ size cannot overflow.
            let len = e.length.min(size - at);
            if e.is_dirty() {
                let first = (at / BLOCK_SIZE) as usize;
                let last = ((at + len - 1) / BLOCK_SIZE) as usize;
                if let Some(s) = set.get_mut(first..=last) {
                    s.fill(true);
                }
            }
            at += len;
            if at >= size {
                break;
            }
        }
    }
    Ok(set)
}

/// Runs of dirty blocks, each at most `per` blocks: `(first, n)`.
fn dirty_runs(set: Vec<bool>, per: u64) -> impl Iterator<Item = (u64, u64)> + Send {
    let mut b = 0usize;
    std::iter::from_fn(move || {
        while set.get(b) == Some(&false) {
            b += 1;
        }
        let first = b;
        while b < set.len() && set[b] && ((b - first) as u64) < per {
            b += 1;
        }
        (b > first).then(|| (first as u64, (b - first) as u64))
    })
}

/// A read-and-hash permit, when the push bounds them.
async fn cpu_permit(
    d: &DiskStream,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, StreamError> {
    match &d.cpu {
        Some(s) => Arc::clone(s)
            .acquire_owned()
            .await
            .map(Some)
            .map_err(|e| StreamError::Hashing(e.to_string())),
        None => Ok(None),
    }
}

/// Read, hash and send blocks `[first, first+n)`.
async fn chunk_job(
    d: &DiskStream,
    g: Geometry,
    first: u64,
    n: u64,
    max_write: u64,
) -> Result<(u64, Vec<Hash>, StreamStats, u64), StreamError> {
    let offset = g.block_offset(first);
    let len = g.block_offset(first + n).min(g.size()) - offset;
    let hashing = |e: tokio::task::JoinError| StreamError::Hashing(e.to_string());
    // len ≤ chunk ≤ 32 MiB.
    let (chunks, info) = match &d.raw {
        Some(raw) => {
            // Reading from the page cache is CPU work too: the permit
            // covers both.
            let _permit = cpu_permit(d).await?;
            let raw = Arc::clone(raw);
            tokio::task::spawn_blocking(move || {
                let chunks = raw.read_blocking(offset, len as u32)?;
                let info = classify(&g, first, n, &chunks);
                Ok((chunks, info))
            })
            .await
            .map_err(hashing)?
            .map_err(|source| StreamError::Read { offset, source })?
        }
        None => {
            let chunks = d
                .source
                .read(offset, len as u32)
                .await
                .map_err(|source| StreamError::Read { offset, source })?;
            let chunks = Arc::new(chunks);
            let _permit = cpu_permit(d).await?;
            let c = Arc::clone(&chunks);
            let info = tokio::task::spawn_blocking(move || classify(&g, first, n, &c))
                .await
                .map_err(hashing)?;
            // The task is done with its clone.
            let chunks = Arc::try_unwrap(chunks).unwrap_or_else(|a| (*a).clone());
            (chunks, info)
        }
    };
    let base = d.base.as_deref();
    let actions: Vec<Action> = info
        .iter()
        .enumerate()
        .map(|(i, b)| action(b, base.and_then(|s| s.leaves.get(first as usize + i))))
        .collect();
    let mut stats = send_runs(d, &g, first, &actions, &chunks, max_write).await?;
    stats.bytes_read = len;
    Ok((
        first,
        info.into_iter().map(|b| b.leaf).collect(),
        stats,
        len,
    ))
}

/// Coalesce equal actions on adjacent blocks into requests (each at most
/// the target's maximum payload) and send them all at once.
async fn send_runs(
    d: &DiskStream,
    g: &Geometry,
    first: u64,
    actions: &[Action],
    chunks: &[ReadChunk],
    max_write: u64,
) -> Result<StreamStats, StreamError> {
    let base_off = g.block_offset(first);
    let max = u64::from(d.target.info().max_payload)
        .min(max_write)
        .max(512);
    let can_zero = d.target.info().has(tx_flags::SEND_WRITE_ZEROES);
    let mut stats = StreamStats::default();
    let mut reqs = Vec::new();
    let mut i = 0usize;
    while i < actions.len() {
        let a = actions[i];
        let mut j = i + 1;
        while j < actions.len() && actions[j] == a {
            j += 1;
        }
        let start = g.block_offset(first + i as u64);
        let end = g.block_offset(first + j as u64).min(g.size());
        match a {
            Action::Skip => stats.blocks_skipped += (j - i) as u64,
            Action::Zero if can_zero => {
                stats.bytes_zeroed += end - start;
                stats.zero_requests += 1;
                reqs.push(Req::Zero(start, end - start));
            }
            Action::Write | Action::Zero => {
                let mut at = start;
                while at < end {
                    let n = (end - at).min(max);
                    let data = if a == Action::Zero {
                        Bytes::from(vec![0u8; n as usize])
                    } else {
                        slice_of(chunks, at - base_off, n)
                    };
                    stats.bytes_written += n;
                    stats.write_requests += 1;
                    reqs.push(Req::Write(at, data));
                    at += n;
                }
            }
        }
        i = j;
    }
    try_join_all(reqs.into_iter().map(|r| async move {
        let (offset, res) = match r {
            Req::Write(off, data) => (off, d.target.write(off, data, false).await),
            Req::Zero(off, len) => (
                off,
                d.target
                    .write_zeroes(off, len, ZeroOptions::default())
                    .await,
            ),
        };
        res.map_err(|source| StreamError::Write { offset, source })
    }))
    .await?;
    Ok(stats)
}

#[derive(Debug)]
enum Req {
    Write(u64, Bytes),
    Zero(u64, u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_split_at_clean_blocks_and_at_the_chunk() {
        let (t, f) = (true, false);
        let runs: Vec<(u64, u64)> = dirty_runs(vec![f, t, t, t, f, f, t, t], 2).collect();
        assert_eq!(runs, vec![(1, 2), (3, 1), (6, 2)]);
        assert_eq!(dirty_runs(vec![f, f], 4).count(), 0);
        assert_eq!(dirty_runs(Vec::new(), 4).count(), 0);
        assert_eq!(dirty_runs(vec![t; 5], 8).collect::<Vec<_>>(), vec![(0, 5)]);
    }
}
