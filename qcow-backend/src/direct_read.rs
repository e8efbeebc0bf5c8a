//! READs of read-only files without imago: zero runs and data runs in
//! files (a qcow2 chain's layer files, a raw image), read with a
//! page-cache-only `preadv2` (what is not cached on the blocking pool) or
//! moved into pipes. The future is `Send`, so such a READ runs on the
//! connection's own thread: a qcow2 READ whose runs are known
//! (the run cache of `qcow`), and every READ of a read-only raw image.

use std::fs::File as StdFile;
use std::io;
use std::sync::Arc;

use nbd_server::{ReadChunk, SocketChunk};

use crate::buf::AlignedBuf;
use crate::cached_read::{read_cached, read_misses, Cached, Miss};
use crate::readahead::ReadAhead;
use crate::splice_read::{splice_runs, FileRun, MIN_SPLICED};

/// Where one run of a READ comes from.
#[derive(Debug, Clone)]
pub(crate) enum Direct {
    /// Reads as zeroes.
    Zero,
    /// Plain data at this offset of a read-only file.
    File(Arc<StdFile>, u64),
}

/// One run: its disk offset, its length, where it comes from.
#[derive(Debug, Clone)]
pub(crate) struct DirectRun {
    pub at: u64,
    pub len: u64,
    pub src: Direct,
}

/// The READ of `runs` (in disk order, tiling the request): zero runs as
/// zero chunks, the data runs between them in one buffer each, or with
/// `splice` in pipes when they are cached and large enough. A read that
/// waited for the disk tells `readahead` (a qcow2 chain's hints).
pub(crate) async fn read_direct(
    runs: &[DirectRun],
    splice: bool,
    readahead: Option<&ReadAhead>,
) -> io::Result<Vec<SocketChunk>> {
    let mut chunks = Vec::with_capacity(runs.len());
    let mut i = 0;
    while i < runs.len() {
        if matches!(runs[i].src, Direct::Zero) {
            let n = u32::try_from(runs[i].len).map_err(io::Error::other)?;
            chunks.push(SocketChunk::Read(ReadChunk::Zero(n)));
            i += 1;
            continue;
        }
        let start = runs[i].at;
        let mut j = i;
        while j < runs.len() && !matches!(runs[j].src, Direct::Zero) {
            j += 1;
        }
        let group = &runs[i..j];
        i = j;
        let total: u64 = group.iter().map(|r| r.len).sum();
        if splice && total >= MIN_SPLICED {
            let files: Vec<FileRun<'_>> = group
                .iter()
                .filter_map(|r| match &r.src {
                    Direct::File(file, offset) => Some(FileRun {
                        file,
                        offset: *offset,
                        len: r.len,
                    }),
                    Direct::Zero => None,
                })
                .collect();
            if let Some(pieces) = splice_runs(&files) {
                chunks.extend(pieces.into_iter().map(SocketChunk::Piped));
                continue;
            }
        }
        // The group is one request's part: at most u32::MAX bytes, and
        // every byte is read into below, so no zeroing.
        let mut buf = AlignedBuf::for_overwrite(usize::try_from(total).map_err(io::Error::other)?);
        let mut misses = Vec::new();
        let whole = buf.as_mut_slice();
        for r in group {
            if let Direct::File(file, host) = &r.src {
                let lo = (r.at - start) as usize;
                let part = &mut whole[lo..lo + r.len as usize];
                read_or_miss(file, part, *host, lo, &mut misses);
            }
        }
        if !misses.is_empty() {
            if let Some(r) = readahead {
                r.missed();
            }
            buf = read_misses(buf, misses).await?;
        }
        chunks.push(SocketChunk::Read(ReadChunk::Data(buf.freeze())));
    }
    Ok(chunks)
}

/// Fill `part` (at `lo` in its buffer) from `file` at `host` as far as the
/// page cache holds it; the rest becomes a [`Miss`] for the blocking pool,
/// so this thread never waits on the disk.
pub(crate) fn read_or_miss(
    file: &Arc<StdFile>,
    part: &mut [u8],
    host: u64,
    lo: usize,
    misses: &mut Vec<Miss>,
) {
    let done = match read_cached(file, part, host) {
        Cached::Read(done) => done,
        // No page-cache-only reads here (tmpfs): all of it, off this thread.
        Cached::Unsupported => 0,
    };
    if done < part.len() {
        misses.push(Miss {
            at: lo + done,
            len: part.len() - done,
            file: Arc::clone(file),
            offset: host + done as u64,
        });
    }
}

/// A READ's chunks for a caller that asked for no pipes (`read`); were
/// there one, its bytes.
pub(crate) fn without_pipes(chunks: Vec<SocketChunk>) -> io::Result<Vec<ReadChunk>> {
    chunks
        .into_iter()
        .map(|c| match c {
            SocketChunk::Read(r) => Ok(r),
            SocketChunk::Piped(p) => p.into_bytes().map(ReadChunk::Data),
        })
        .collect()
}
