//! Raw image files (and block devices) as a [`BlockBackend`].
//!
//! pread/pwrite on tokio's blocking pool, `fallocate` for zeroing and
//! trimming, `fdatasync` for flush, `SEEK_DATA`/`SEEK_HOLE` for block status
//! and sparse reads.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags,
};
use rustix::fs::{fallocate, seek, FallocateFlags, SeekFrom};

use crate::buf::AlignedBuf;
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

/// Split `[off, end)` into (start, len, is_data) runs using SEEK_DATA and
/// SEEK_HOLE. Filesystems without them report everything as data.
fn segments(file: &File, off: u64, end: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
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
        self.blocking("read", move |f| {
            let end = offset + u64::from(len);
            let mut chunks = Vec::new();
            for (start, n, is_data) in segments(f, offset, end) {
                // n ≤ len ≤ 32 MiB.
                if is_data {
                    let mut buf = AlignedBuf::zeroed(n as usize);
                    f.read_exact_at(buf.as_mut_slice(), start)?;
                    chunks.push(ReadChunk::Data(buf.freeze()));
                } else {
                    chunks.push(ReadChunk::Zero(n as u32));
                }
            }
            Ok(chunks)
        })
        .await
        .map_err(|e| e.at(offset))
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
        let end = offset.saturating_add(len).min(self.size);
        self.blocking("block_status", move |f| {
            Ok(segments(f, offset, end)
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
