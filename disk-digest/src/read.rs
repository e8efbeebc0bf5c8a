//! Computing leaves and digests by reading any [`BlockBackend`]: the
//! read-back of partly written blocks, `verify`, and the `digest` command.
//! Reads and hashing overlap: several ranges are read at once and each is
//! hashed on the blocking pool, so one core hashes while the other reads.

use std::sync::Arc;

use bytes::Bytes;
use nbd_server::{BackendError, BlockBackend, ReadChunk};

use crate::algo::{root, segment_hash, zero_leaf, Geometry, Hash, BLOCK_SIZE, SEGMENT_BLOCKS};

/// Bytes per read request.
pub const READ_SIZE: u64 = 4 << 20;
/// Reads in flight at once.
pub const READ_CONCURRENCY: usize = 4;

/// Leaves of blocks `[first, end)` from data chunks read at the first
/// block's offset (zero chunks are never materialized).
fn leaves_of_chunks(g: &Geometry, first: u64, end: u64, chunks: &[ReadChunk]) -> Vec<Hash> {
    let mut out = Vec::with_capacity((end - first) as usize);
    // Walk the chunks with a cursor, block by block.
    let mut idx = 0usize;
    let mut within = 0u64;
    for b in first..end {
        let mut need = g.block_len(b);
        let mut hasher: Option<blake3::Hasher> = None;
        let mut zero_prefix = 0u64;
        while need > 0 {
            let Some(c) = chunks.get(idx) else { break };
            let avail = c.len() - within;
            let take = avail.min(need);
            match c {
                ReadChunk::Zero(_) => match &mut hasher {
                    None => zero_prefix += take,
                    Some(h) => update_zeroes(h, take),
                },
                ReadChunk::Data(d) => {
                    let h = hasher.get_or_insert_with(|| {
                        let mut h = blake3::Hasher::new();
                        update_zeroes(&mut h, zero_prefix);
                        h
                    });
                    let s = within as usize;
                    h.update(&d[s..s + take as usize]);
                }
            }
            need -= take;
            within += take;
            if within == c.len() {
                idx += 1;
                within = 0;
            }
        }
        out.push(match hasher {
            Some(h) => h.finalize().into(),
            None => zero_leaf(g.block_len(b)),
        });
    }
    out
}

fn update_zeroes(h: &mut blake3::Hasher, mut n: u64) {
    static Z: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(Z.len() as u64);
        h.update(&Z[..k as usize]);
        n -= k;
    }
}

/// Read blocks `[first, end)` of `backend` and return their leaves.
pub async fn read_leaves(
    backend: &Arc<dyn BlockBackend>,
    g: Geometry,
    first: u64,
    end: u64,
) -> Result<Vec<Hash>, BackendError> {
    let mut out = Vec::with_capacity(end.saturating_sub(first) as usize);
    let per = READ_SIZE / BLOCK_SIZE;
    let mut b = first;
    while b < end {
        let e = (b + per).min(end);
        let off = g.block_offset(b);
        let len = g.block_offset(e).min(g.size()) - off;
        // len ≤ READ_SIZE, fits u32.
        let chunks = backend.read(off, len as u32).await?;
        let leaves = tokio::task::spawn_blocking(move || leaves_of_chunks(&g, b, e, &chunks))
            .await
            .map_err(|e| {
                BackendError::new(nbd_server::BackendErrorKind::Io, "hashing").with_source(e)
            })?;
        out.extend(leaves);
        b = e;
    }
    Ok(out)
}

/// The leaves of one segment.
pub async fn segment_leaves(
    backend: &Arc<dyn BlockBackend>,
    g: Geometry,
    s: u64,
) -> Result<Vec<Hash>, BackendError> {
    let (first, end) = g.segment_blocks(s);
    read_leaves(backend, g, first, end).await
}

/// The digest of everything `backend` reads as: root and segment hashes.
/// `progress` is called with bytes done after each segment.
pub async fn digest_backend(
    backend: Arc<dyn BlockBackend>,
    mut progress: impl FnMut(u64),
) -> Result<(Hash, Vec<Hash>), BackendError> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let g = Geometry::new(backend.size());
    let mut segs = Vec::with_capacity(g.segments() as usize);
    let mut stream = stream::iter(0..g.segments())
        .map(|s| {
            let backend = Arc::clone(&backend);
            async move { segment_leaves(&backend, g, s).await }
        })
        .buffered(READ_CONCURRENCY);
    let mut done = 0u64;
    while let Some(leaves) = stream.try_next().await? {
        segs.push(segment_hash(&leaves));
        done = done
            .saturating_add(leaves.len() as u64 * BLOCK_SIZE)
            .min(g.size());
        progress(done);
    }
    Ok((root(g.size(), &segs), segs))
}

/// Digest of raw bytes already in memory (for small tools and tests).
pub fn digest_bytes(data: Bytes) -> Hash {
    let g = Geometry::new(data.len() as u64);
    let chunks = [ReadChunk::Data(data)];
    let leaves = leaves_of_chunks(&g, 0, g.blocks(), &chunks);
    let segs: Vec<Hash> = leaves
        .chunks(SEGMENT_BLOCKS as usize)
        .map(segment_hash)
        .collect();
    root(g.size(), &segs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::digest_of_bytes;
    use nbd_server::MemoryBackend;

    #[test]
    fn chunk_walk_matches_reference() {
        let g = Geometry::new(3 * BLOCK_SIZE);
        let mut data = vec![0u8; (3 * BLOCK_SIZE) as usize];
        data[70_000] = 9;
        let chunks = vec![
            ReadChunk::Zero(65_000),
            ReadChunk::Data(Bytes::copy_from_slice(&data[65_000..80_000])),
            ReadChunk::Zero((3 * BLOCK_SIZE - 80_000) as u32),
        ];
        let l = leaves_of_chunks(&g, 0, 3, &chunks);
        let want: Vec<Hash> = data
            .chunks(BLOCK_SIZE as usize)
            .map(crate::algo::leaf)
            .collect();
        assert_eq!(l, want);
    }

    #[tokio::test]
    async fn backend_digest_matches_reference() {
        let size = BLOCK_SIZE * SEGMENT_BLOCKS + 3 * 4096;
        let m = MemoryBackend::new(size);
        let mut data = vec![0u8; size as usize];
        for (i, x) in data.iter_mut().enumerate().skip(1000).step_by(7919) {
            *x = (i % 251) as u8 + 1;
        }
        m.write(0, Bytes::from(data.clone())).await.unwrap();
        let be: Arc<dyn BlockBackend> = Arc::new(m);
        let (r, _) = digest_backend(be, |_| {}).await.unwrap();
        assert_eq!(r, digest_of_bytes(&data));
        assert_eq!(r, digest_bytes(Bytes::from(data)));
    }
}
