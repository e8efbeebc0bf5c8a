//! Where a re-hydrated object's bytes go: gathered into page-aligned
//! buffers, hashed on one thread and written on another, the writes
//! bypassing the page cache.
//!
//! Why this shape (measured on the 2-vCPU host against SeaweedFS, whose
//! own work takes half the CPU of a download): the object store yields
//! chunks of tens of KiB, so they are gathered into [`CHUNK`]-sized
//! buffers and the threads wake once per buffer. The copy into the page
//! cache took a fifth of all CPU time of a buffered download, and its
//! dirty pages left the final `fsync` to write the whole file at once;
//! `O_DIRECT` writes of aligned 4 MiB buffers skip both, and leave the
//! page cache to the exports being served. A file system that refuses
//! `O_DIRECT` (tmpfs), and the last, short buffer, are written through the
//! page cache as before. The file is synced either way.

use std::fs::File;
use std::io::{ErrorKind, Write as _};

use bytes::Bytes;
use nbd_server::buffer::PageBuf;
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use tokio::sync::mpsc;

/// Bytes per buffer handed to the threads.
pub const CHUNK: usize = 4 << 20;
/// Alignment `O_DIRECT` needs of offsets, lengths and memory.
const ALIGN: usize = 4096;

/// Gathers a stream's chunks into full page-aligned buffers.
pub struct Gather {
    cur: Option<PageBuf>,
    filled: usize,
}

impl Gather {
    pub fn new() -> Self {
        Gather {
            cur: None,
            filled: 0,
        }
    }

    /// Add `data`; every buffer it fills is passed to `full`.
    pub fn push(&mut self, mut data: &[u8], mut full: impl FnMut(Bytes)) {
        while !data.is_empty() {
            let buf = self
                .cur
                .get_or_insert_with(|| PageBuf::for_overwrite(CHUNK));
            let n = data.len().min(CHUNK - self.filled);
            buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == CHUNK {
                if let Some(b) = self.cur.take() {
                    full(b.freeze());
                }
                self.filled = 0;
            }
        }
    }

    /// What is left at the end of the stream, if anything.
    pub fn finish(mut self) -> Option<Bytes> {
        let filled = self.filled;
        self.cur
            .take()
            .filter(|_| filled > 0)
            .map(|b| b.freeze().slice(..filled))
    }
}

/// Hand every buffer in `bufs` to both threads; `false` once either is
/// gone.
pub async fn send_both(
    bufs: &mut Vec<Bytes>,
    hash: &mpsc::Sender<Bytes>,
    write: &mpsc::Sender<Bytes>,
) -> bool {
    for b in bufs.drain(..) {
        if hash.send(b.clone()).await.is_err() || write.send(b).await.is_err() {
            return false;
        }
    }
    true
}

/// SHA-256 of every buffer received, in hex.
pub fn hash(mut rx: mpsc::Receiver<Bytes>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    while let Some(chunk) = rx.blocking_recv() {
        ctx.update(&chunk);
    }
    super::transfer::hex(ctx.finish().as_ref())
}

/// Write every buffer received to `file` (new, at offset 0), then sync it.
/// Returns the bytes written.
pub fn write(mut file: File, mut rx: mpsc::Receiver<Bytes>) -> std::io::Result<u64> {
    let mut direct = set_direct(&file, true);
    let mut total = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        let aligned = chunk.as_ptr().addr() % ALIGN == 0 && chunk.len() % ALIGN == 0;
        if direct && !aligned {
            set_direct(&file, false);
            direct = false;
        }
        let mut done = 0;
        while done < chunk.len() {
            match file.write(&chunk[done..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // Some file systems accept the flag but not the write.
                Err(e)
                    if direct
                        && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    set_direct(&file, false);
                    direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        total += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok(total)
}

/// Turn `O_DIRECT` on or off; whether it is now on.
fn set_direct(file: &File, on: bool) -> bool {
    let Ok(flags) = fcntl_getfl(file) else {
        return false;
    };
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags.difference(OFlags::DIRECT)
    };
    fcntl_setfl(file, flags).is_ok() && on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_whole_aligned_buffers_and_a_short_tail() {
        let mut g = Gather::new();
        let mut out = Vec::new();
        let data: Vec<u8> = (0..(2 * CHUNK + 1000)).map(|i| (i % 253) as u8).collect();
        for piece in data.chunks(12_345) {
            g.push(piece, |b| out.push(b));
        }
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|b| b.len() == CHUNK && b.as_ptr().addr() % ALIGN == 0));
        let tail = g.finish().unwrap();
        assert_eq!(tail.len(), 1000);
        out.push(tail);
        assert_eq!(out.concat(), data);
        assert!(Gather::new().finish().is_none());
    }

    #[test]
    fn writes_direct_then_buffered_tail_and_the_bytes_are_right() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create_new(&path).unwrap();
        let data: Vec<u8> = (0..(CHUNK + 777)).map(|i| (i % 241) as u8).collect();
        let (tx, rx) = mpsc::channel(4);
        let mut g = Gather::new();
        let mut bufs = Vec::new();
        g.push(&data, |b| bufs.push(b));
        bufs.extend(g.finish());
        for b in bufs {
            tx.try_send(b).unwrap();
        }
        drop(tx);
        assert_eq!(write(file, rx).unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
