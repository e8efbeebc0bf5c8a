//! Raw files and block devices as a read-only source, read the way a
//! backup reads: whole chunks with `pread` into ordinary heap buffers.
//!
//! `qcow_backend::RawBackend` would do, but it hands out fresh page-aligned
//! buffers that go back to the OS on drop: right for a server holding
//! replies, costly for a reader that streams a whole disk (every chunk
//! page-faults its buffer in again; measured as most of the agent's system
//! time). Heap buffers here are reused by the allocator. A chunk that
//! `SEEK_DATA` says is all hole is answered as zeroes without reading.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags,
};

/// A raw file or block device, read-only. Clones share the open file.
#[derive(Debug, Clone)]
pub struct RawFile {
    file: Arc<File>,
    size: u64,
}

impl RawFile {
    /// Open `path` read-only; the size comes from seeking to the end, which
    /// works for block devices too (their metadata says 0).
    pub fn open(path: &Path) -> std::io::Result<RawFile> {
        let mut file = File::open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        // A backup reads front to back: let the kernel read ahead harder
        // than for random access (a hint; a device or file system that
        // ignores it loses nothing).
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        Ok(RawFile {
            file: Arc::new(file),
            size,
        })
    }
}

impl RawFile {
    /// [`BlockBackend::read`] on the calling thread (it blocks): for a
    /// caller already on the blocking pool that hashes the bytes next,
    /// while they are still in the CPU's cache.
    pub fn read_blocking(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let end = offset.saturating_add(u64::from(len));
        if end > self.size {
            return Err(BackendError::new(BackendErrorKind::OutOfRange, "read"));
        }
        if all_hole(&self.file, offset, end) {
            return Ok(vec![ReadChunk::Zero(len)]);
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| io_err("read", e))?;
        Ok(vec![ReadChunk::Data(Bytes::from(buf))])
    }
}

/// Whether `[offset, end)` holds no data per `SEEK_DATA` (false when the
/// file system or device cannot say).
fn all_hole(file: &File, offset: u64, end: u64) -> bool {
    use rustix::fs::{seek, SeekFrom as RSeek};
    match seek(file, RSeek::Data(offset)) {
        Ok(next) => next >= end,
        // ENXIO: no data at or after offset.
        Err(e) => e == rustix::io::Errno::NXIO,
    }
}

fn io_err(op: &'static str, e: std::io::Error) -> BackendError {
    BackendError::new(BackendErrorKind::Io, op).with_source(e)
}

#[async_trait]
impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: true,
            ..Caps::default()
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_blocking(offset, len))
            .await
            .map_err(|e| io_err("read", std::io::Error::other(e)))?
    }

    async fn write(&self, _: u64, _: Bytes) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "write"))
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::ReadOnly,
            "write_zeroes",
        ))
    }

    async fn trim(&self, _: u64, _: u64) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "trim"))
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        Ok(vec![Extent::data(
            len.min(self.size.saturating_sub(offset)).max(1),
        )])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn reads_data_and_holes_and_refuses_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.raw");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"data", (2 << 20) + 10).unwrap();
        drop(f);
        let r = RawFile::open(&p).unwrap();
        assert_eq!(r.size(), 4 << 20);
        let flat = |c: Vec<ReadChunk>| -> Vec<u8> {
            c.iter()
                .flat_map(|c| match c {
                    ReadChunk::Data(d) => d.to_vec(),
                    ReadChunk::Zero(n) => vec![0; *n as usize],
                })
                .collect()
        };
        let hole = r.read(0, 1 << 20).await.unwrap();
        assert_eq!(flat(hole), vec![0u8; 1 << 20]);
        let data = flat(r.read(2 << 20, 1 << 20).await.unwrap());
        assert_eq!(&data[10..14], b"data");
        assert!(r.read((4 << 20) - 1, 2).await.is_err());
    }
}
