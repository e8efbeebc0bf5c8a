//! Raw image files (and block devices) as a [`BlockBackend`].
//!
//! pwrite on tokio's blocking pool, `fallocate` for zeroing and trimming,
//! `fdatasync` for flush, `SEEK_DATA`/`SEEK_HOLE` for block status and
//! sparse reads.
//!
//! READs of a read-only image (a restore, `export -r`) run on the
//! connection's thread like a qcow2 chain's known runs (`direct_read`):
//! holes found by seeking, data read with a page-cache-only `preadv2`,
//! what is not cached on the blocking pool, and spliced to remote clients.
//! Nothing in this process writes the file while it is open read-only, so
//! the seeks never queue behind a writer's inode lock. A writable image
//! reads on the blocking pool, where those seeks may wait.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, ReadChunk, SocketChunk, ZeroFlags,
};
use rustix::fs::{fallocate, seek, FallocateFlags, SeekFrom};

use crate::buf::AlignedBuf;
use crate::direct_read::{read_direct, without_pipes, Direct, DirectRun};
use crate::error::ImageError;
use crate::lock::{lock_file, LockMode};
use crate::writeback::WriteBehind;

/// A raw file served as-is.
#[derive(Debug)]
pub struct RawBackend {
    file: Arc<File>,
    write_behind: Option<Arc<WriteBehind>>,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl RawBackend {
    /// Open `path` (read-write unless `read_only`), locking it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        let file = File::options()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        let mode = if read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        lock_file(&file, mode).map_err(|e| ImageError::locked(path, e))?;
        let size = file_size(&file).map_err(|e| ImageError::io(path, e))?;
        let write_behind = if read_only {
            None
        } else {
            Some(WriteBehind::new(
                file.try_clone().map_err(|e| ImageError::io(path, e))?,
            ))
        };
        Ok(RawBackend {
            file: Arc::new(file),
            write_behind,
            path: path.to_owned(),
            size,
            read_only,
        })
    }

    /// Create a new sparse raw file of `size` bytes (fails if it exists).
    pub fn create(path: &Path, size: u64) -> Result<Self, ImageError> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        file.set_len(size).map_err(|e| ImageError::io(path, e))?;
        drop(file);
        Self::open(path, false)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, BackendError>
    where
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| BackendError::from_io(op, e)),
            Err(e) => Err(BackendError::new(BackendErrorKind::Io, op).with_source(e)),
        }
    }

    /// A READ: for a read-only image on the caller's thread (holes as zero
    /// runs, data as runs of this file, `splice`: in pipes where cached),
    /// its holes found here when it has few runs, else on the blocking
    /// pool; for a writable image all of it on the pool.
    async fn read_chunks(
        &self,
        offset: u64,
        len: u32,
        splice: bool,
    ) -> Result<Vec<SocketChunk>, BackendError> {
        let end = offset
            .checked_add(u64::from(len))
            .ok_or_else(|| BackendError::new(BackendErrorKind::InvalidArgument, "read"))?;
        if self.read_only {
            // Two seeks per run: a READ across a fragmented stretch would
            // hold this thread for thousands of them, so past
            // MAX_HERE_RUNS the pool walks the rest, from where this
            // walk stopped.
            let mut segs = segments(&self.file, offset, end, MAX_HERE_RUNS + 1);
            if segs.len() > MAX_HERE_RUNS {
                // Runs end at or before `end`.
                let from = segs.last().map_or(offset, |&(at, n, _)| at + n);
                let rest = self
                    .blocking("read", move |f| Ok(segments(f, from, end, usize::MAX)))
                    .await
                    .map_err(|e| e.at(offset))?;
                segs.extend(rest);
            }
            let runs: Vec<DirectRun> = segs
                .into_iter()
                .map(|(at, len, data)| DirectRun {
                    at,
                    len,
                    src: if data {
                        Direct::File(Arc::clone(&self.file), at)
                    } else {
                        Direct::Zero
                    },
                })
                .collect();
            return read_direct(&runs, splice, None)
                .await
                .map_err(|e| BackendError::from_io("read", e).at(offset));
        }
        self.blocking("read", move |f| {
            let mut chunks = Vec::new();
            // A READ is at most 32 MiB: its runs are bounded by its length.
            for (start, n, is_data) in segments(f, offset, end, usize::MAX) {
                // n ≤ len ≤ 32 MiB; every byte is read into, so no zeroing.
                if is_data {
                    let mut buf = AlignedBuf::for_overwrite(n as usize);
                    f.read_exact_at(buf.as_mut_slice(), start)?;
                    chunks.push(SocketChunk::Read(ReadChunk::Data(buf.freeze())));
                } else {
                    chunks.push(SocketChunk::Read(ReadChunk::Zero(n as u32)));
                }
            }
            Ok(chunks)
        })
        .await
        .map_err(|e| e.at(offset))
    }

    /// Block status of at most `limit` extents from `offset`.
    async fn status(
        &self,
        offset: u64,
        len: u64,
        limit: usize,
    ) -> Result<Vec<Extent>, BackendError> {
        let end = offset.saturating_add(len).min(self.size);
        self.blocking("block_status", move |f| {
            Ok(segments(f, offset, end, limit)
                .into_iter()
                .map(|(_, n, data)| {
                    if data {
                        Extent::data(n)
                    } else {
                        Extent::hole(n)
                    }
                })
                .collect())
        })
        .await
    }
}

/// Size of a regular file or block device.
fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        Ok(meta.len())
    } else {
        // Block devices report 0 in metadata; seeking to the end gives the size.
        Ok(seek(file, SeekFrom::End(0))?)
    }
}

/// Most extents one block-status call walks: a client may ask about the
/// whole disk, and each extent costs two seeks, so a fragmented file
/// described to its end on every call (qemu's client asks once per read
/// with `len` up to the end) costs time quadratic in its extents. The
/// client asks again from where the answer ends.
const MAX_STATUS_EXTENTS: usize = 4096;

/// Most runs of a read-only image's READ found by seeking on the caller's
/// thread (about a hundred seeks, tens of microseconds).
const MAX_HERE_RUNS: usize = 64;

/// Split `[off, end)` into (start, len, is_data) runs using SEEK_DATA and
/// SEEK_HOLE, stopping after `limit` runs (which may then end before
/// `end`). Filesystems without them report everything as data.
fn segments(file: &File, off: u64, end: u64, limit: usize) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end && out.len() < limit {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            // ENXIO: no data after pos.
            Err(rustix::io::Errno::NXIO) => end,
            Err(_) => {
                out.push((pos, end - pos, true));
                return out;
            }
        };
        if data > pos {
            out.push((pos, data - pos, false));
            pos = data;
            continue;
        }
        let hole = match seek(file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(end),
            Err(_) => end,
        };
        // A hole at pos would mean data > pos above; guard against a
        // filesystem reporting nonsense so the loop always advances.
        let hole = hole.max(pos + 1).min(end);
        out.push((pos, hole - pos, true));
        pos = hole;
    }
    out
}

fn write_zero_buffers(file: &File, mut off: u64, len: u64) -> io::Result<()> {
    static ZERO: [u8; 1 << 20] = [0; 1 << 20];
    let end = off + len;
    while off < end {
        let n = (end - off).min(ZERO.len() as u64) as usize;
        file.write_all_at(&ZERO[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn is_unsupported(e: &rustix::io::Errno) -> bool {
    matches!(
        *e,
        rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL
    )
}

#[async_trait]
impl BlockBackend for RawBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            can_fast_zero: true,
            can_cache: false,
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
        self.read_chunks(offset, len, true).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        let n = data.len() as u64;
        self.blocking("write", move |f| f.write_all_at(&data, offset))
            .await
            .map_err(|e| e.at(offset))?;
        if let Some(wb) = &self.write_behind {
            if wb.add(offset, n) {
                let wb = Arc::clone(wb);
                tokio::task::spawn_blocking(move || wb.kick());
            }
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        self.blocking("write_zeroes", move |f| {
            let mode = if flags.may_trim {
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            match fallocate(f, mode, offset, len) {
                Ok(()) => Ok(()),
                Err(e) if is_unsupported(&e) => {
                    if flags.fast {
                        Err(io::Error::from_raw_os_error(
                            rustix::io::Errno::OPNOTSUPP.raw_os_error(),
                        ))
                    } else {
                        write_zero_buffers(f, offset, len)
                    }
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
        .map_err(|e| e.at(offset))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.blocking("trim", move |f| {
            match fallocate(
                f,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            ) {
                // TRIM is a hint: nothing to do if the filesystem can't.
                Err(e) if is_unsupported(&e) => Ok(()),
                r => r.map_err(io::Error::from),
            }
        })
        .await
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.blocking("flush", |f| f.sync_data()).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.status(offset, len, MAX_STATUS_EXTENTS).await
    }

    async fn block_status_first(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        // Runs alternate data and hole: the first is where the status
        // first changes.
        self.status(offset, len, 1).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_server::backend::conformance;

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let counter = std::sync::atomic::AtomicUsize::new(0);
        conformance::run_all(|size| {
            let p = dir.path().join(format!(
                "d{}.raw",
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            async move { RawBackend::create(&p, size).unwrap() }
        })
        .await;
    }

    #[tokio::test]
    async fn sparse_regions_read_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let b = RawBackend::create(&dir.path().join("s.raw"), 8 << 20).unwrap();
        b.write(4 << 20, Bytes::from(vec![1u8; 4096]))
            .await
            .unwrap();
        let chunks = b.read(0, 8 << 20).await.unwrap();
        assert!(
            matches!(chunks[0], ReadChunk::Zero(n) if n >= 1 << 20),
            "{chunks:?}"
        );
        let st = b.block_status(0, 8 << 20).await.unwrap();
        assert!(st[0].hole && st[0].zero);
        assert!(st.iter().any(|e| !e.hole));
    }

    /// The bytes of a READ's chunks, pipes read back.
    fn flatten(chunks: Vec<SocketChunk>) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            match c {
                SocketChunk::Read(ReadChunk::Data(b)) => out.extend_from_slice(&b),
                SocketChunk::Read(ReadChunk::Zero(n)) => out.resize(out.len() + n as usize, 0),
                SocketChunk::Piped(p) => out.extend_from_slice(&p.into_bytes().unwrap()),
            }
        }
        out
    }

    /// `read` and `read_for_socket` of `at + len` both give `want`.
    async fn assert_reads(b: &RawBackend, at: u64, len: u32, want: &[u8], what: &str) {
        let plain: Vec<SocketChunk> = b
            .read(at, len)
            .await
            .unwrap()
            .into_iter()
            .map(SocketChunk::Read)
            .collect();
        assert!(flatten(plain) == want, "{what}: read at {at}+{len}");
        let piped = b.read_for_socket(at, len).await.unwrap();
        assert!(
            flatten(piped) == want,
            "{what}: read_for_socket at {at}+{len}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_only_reads_on_the_callers_thread_match_the_file_cached_or_cold() {
        // Data with holes punched at page and sub-page boundaries, and a
        // size that ends inside a page.
        let size = (8u64 << 20) + 1536;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let mut data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8 + 1).collect();
        std::fs::write(&p, &data).unwrap();
        {
            let f = File::options().write(true).open(&p).unwrap();
            for (at, n) in [
                (0u64, 8192u64),
                (1 << 20, 3 << 20),
                ((5 << 20) + 512, 70_000),
            ] {
                fallocate(
                    &f,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    at,
                    n,
                )
                .unwrap();
                data[at as usize..(at + n) as usize].fill(0);
            }
        }
        let b = RawBackend::open(&p, true).unwrap();
        let ranges: Vec<(u64, u32)> = {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut v = vec![
                (0, size as u32),
                (size - 1536, 1536),
                ((1 << 20) - 512, 4096),
            ];
            for _ in 0..120 {
                let len = 1 + next() % (1 << 20);
                let at = next() % (size - len + 1);
                v.push((at, len as u32));
            }
            v
        };
        for round in ["cached", "cold"] {
            if round == "cold" {
                rustix::fs::fadvise(&*b.file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            }
            for &(at, len) in &ranges {
                let want = &data[at as usize..at as usize + len as usize];
                assert_reads(&b, at, len, want, round).await;
            }
        }
        // Holes come back as zero chunks, not as data.
        let chunks = b.read(1 << 20, 3 << 20).await.unwrap();
        assert!(
            matches!(chunks[..], [ReadChunk::Zero(n)] if n == 3 << 20),
            "{chunks:?}"
        );
    }

    #[tokio::test]
    async fn block_status_of_a_fragmented_file_is_bounded_per_call() {
        // 5000 data blocks with a hole after each: 10,000 extents.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.raw");
        let blocks = 5000u64;
        {
            let f = File::create(&p).unwrap();
            f.set_len(blocks * 8192).unwrap();
            for i in 0..blocks {
                f.write_all_at(&[0xa5; 4096], i * 8192).unwrap();
            }
        }
        let b = RawBackend::open(&p, true).unwrap();
        let size = b.size();
        let whole = b.block_status(0, size).await.unwrap();
        assert_eq!(
            whole.len(),
            MAX_STATUS_EXTENTS,
            "one call walked past its bound"
        );
        // The client asks again from where an answer ends, and the whole
        // disk is described in order, alternating data and hole.
        let mut pos = 0;
        let mut n = 0u64;
        while pos < size {
            let ext = b.block_status(pos, size - pos).await.unwrap();
            assert!(!ext.is_empty() && ext.len() <= MAX_STATUS_EXTENTS);
            for e in ext {
                assert_eq!(e.hole, n % 2 == 1, "extent {n} at {pos}");
                assert_eq!(e.length, 4096, "extent {n} at {pos}");
                pos += e.length;
                n += 1;
            }
        }
        assert_eq!((pos, n), (size, 2 * blocks));
        // READs across many runs have their holes found on the pool,
        // across few here: the same bytes either way.
        for (at, len) in [
            (0u64, 8u32 << 20),
            (4096 * 3, 64 * 4096),
            (100_000, 3 * 4096),
        ] {
            let want: Vec<u8> = (at..at + u64::from(len))
                .map(|i| if i / 4096 % 2 == 0 { 0xa5 } else { 0 })
                .collect();
            assert_reads(&b, at, len, &want, "fragmented").await;
        }
        // REQ_ONE: only the first extent, wherever the range ends.
        for at in [0, 4096, 4096 * 77] {
            let one = b.block_status_first(at, size - at).await.unwrap();
            assert_eq!(one.len(), 1, "{one:?}");
            assert_eq!(one[0].length, 4096);
            assert_eq!(one[0].hole, at / 4096 % 2 == 1);
        }
    }

    #[tokio::test]
    async fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.raw");
        let _a = RawBackend::create(&p, 1 << 20).unwrap();
        assert!(matches!(
            RawBackend::open(&p, false),
            Err(ImageError::Locked { .. })
        ));
        assert!(matches!(
            RawBackend::open(&p, true),
            Err(ImageError::Locked { .. })
        ));
    }
}
