//! A sparse in-memory disk, for tests, fuzzing and benchmarks.

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{BackendError, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags};

/// Allocation unit: chunks are allocated on first write and freed when
/// zeroed or trimmed as a whole.
const CHUNK: u64 = 64 * 1024;

/// A sparse RAM disk. Memory use is proportional to the data written, so a
/// large virtual size costs nothing until used.
#[derive(Debug)]
pub struct MemoryBackend {
    size: u64,
    read_only: bool,
    chunks: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl MemoryBackend {
    /// An all-zero disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemoryBackend {
            size,
            read_only: false,
            chunks: RwLock::new(BTreeMap::new()),
        }
    }

    /// A read-only disk holding `data`.
    pub fn read_only_from(data: &[u8]) -> Self {
        let mut m = MemoryBackend::new(data.len() as u64);
        m.put(0, data);
        m.read_only = true;
        m
    }

    /// Bytes of chunk memory currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.lock_read().len() as u64 * CHUNK
    }

    // A poisoned lock only means another request panicked mid-copy; the map
    // itself is still structurally valid, so keep serving.
    fn lock_read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.chunks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_write(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.chunks.write().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, mut offset: u64, mut data: &[u8]) {
        let mut map = self.lock_write();
        while !data.is_empty() {
            let idx = offset / CHUNK;
            let within = (offset % CHUNK) as usize;
            let n = data.len().min(CHUNK as usize - within);
            let chunk = map
                .entry(idx)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            chunk[within..within + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            offset += n as u64;
        }
    }

    fn zero(&self, mut offset: u64, len: u64) {
        let end = offset + len;
        let mut map = self.lock_write();
        while offset < end {
            let idx = offset / CHUNK;
            let within = offset % CHUNK;
            let n = (end - offset).min(CHUNK - within);
            if n == CHUNK {
                map.remove(&idx);
            } else if let Some(chunk) = map.get_mut(&idx) {
                chunk[within as usize..(within + n) as usize].fill(0);
            }
            offset += n;
        }
    }
}

#[async_trait]
impl BlockBackend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: self.read_only,
            can_fast_zero: true,
            can_cache: true,
            ..Caps::default()
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let map = self.lock_read();
        let mut chunks: Vec<ReadChunk> = Vec::new();
        let mut pos = offset;
        let end = offset + u64::from(len);
        let mut data: Option<BytesMut> = None;
        while pos < end {
            let idx = pos / CHUNK;
            let within = pos % CHUNK;
            let n = (end - pos).min(CHUNK - within);
            match map.get(&idx) {
                Some(c) => data
                    .get_or_insert_with(BytesMut::new)
                    .extend_from_slice(&c[within as usize..(within + n) as usize]),
                None => {
                    if let Some(d) = data.take() {
                        chunks.push(ReadChunk::Data(d.freeze()));
                    }
                    // n ≤ CHUNK, so it fits u32; merge consecutive holes.
                    match chunks.last_mut() {
                        Some(ReadChunk::Zero(z)) => *z += n as u32,
                        _ => chunks.push(ReadChunk::Zero(n as u32)),
                    }
                }
            }
            pos += n;
        }
        if let Some(d) = data {
            chunks.push(ReadChunk::Data(d.freeze()));
        }
        Ok(chunks)
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        self.put(offset, &data);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        // Zeroing RAM is always fast.
        self.zero(offset, len);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.zero(offset, len);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let map = self.lock_read();
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / CHUNK;
            let n = (end - pos).min(CHUNK - pos % CHUNK);
            let e = if map.contains_key(&idx) {
                Extent::data(n)
            } else {
                Extent::hole(n)
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole => last.length += n,
                _ => out.push(e),
            }
            pos += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conformance;

    #[tokio::test]
    async fn conformance_suite() {
        conformance::run_all(|size| async move { MemoryBackend::new(size) }).await;
    }

    #[tokio::test]
    async fn whole_chunk_zeroing_frees_memory() {
        let m = MemoryBackend::new(4 * CHUNK);
        m.write(0, Bytes::from(vec![1u8; 2 * CHUNK as usize]))
            .await
            .unwrap();
        assert_eq!(m.allocated_bytes(), 2 * CHUNK);
        m.write_zeroes(0, CHUNK, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(m.allocated_bytes(), CHUNK);
    }

    #[tokio::test]
    async fn read_only_from_reports_caps() {
        let m = MemoryBackend::read_only_from(&[7u8; 1000]);
        assert!(m.caps().read_only);
        let r = m.read(10, 5).await.unwrap();
        assert_eq!(r, vec![ReadChunk::Data(Bytes::from_static(&[7; 5]))]);
    }
}
