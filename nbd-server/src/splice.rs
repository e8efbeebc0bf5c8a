//! READ data that goes from a file's page cache to a TCP socket without
//! being copied through user space.
//!
//! A backend moves the pages of a reply into a kernel pipe with
//! `splice(file → pipe)`: the pipe then holds references to the cached
//! pages, not copies. The connection later moves them on with
//! `splice(pipe → socket)`, and the socket sends from those same pages. A
//! warm restore copies every byte twice otherwise (page cache → buffer in
//! `pread`, buffer → socket in `write`); those two copies were 45 % of the
//! server's CPU in a profile of a warm 20-deep chain read. Which clients
//! get spliced replies is [`crate::SpliceReads`]: by default not those on
//! loopback, which would only copy the pages themselves.
//!
//! Only plain TCP connections ask for spliced data
//! ([`crate::BlockBackend::read_for_socket`]); TLS has to encrypt from a
//! buffer. A [`Piped`] that reaches any other writer is read back into a
//! buffer, so misuse costs a copy, never correctness.
//!
//! Pipes are pooled by size: creating one and sizing it costs three
//! syscalls. A pipe returns to the pool only once it is empty; one dropped
//! with data still in it (the client left) is closed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use rustix::pipe::{
    fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags,
};

/// Smallest pipe: the kernel's default size (16 pages of 4 KiB).
const MIN_PIPE: usize = 64 << 10;
/// Largest pipe, and so the most one [`Piped`] carries: the default
/// `/proc/sys/fs/pipe-max-size`, which an unprivileged process may not
/// exceed. A larger read becomes several pieces.
pub const MAX_PIPED: usize = 1 << 20;
/// The unit a pipe holds file data in: each page (or part of one) a
/// splice moves takes one of its slots, and a pipe of N bytes has N / 4096
/// slots. (Where pages are larger, slots are too, so counting 4 KiB pages
/// never overfills a pipe.)
pub const PIPE_PAGE: u64 = 4096;
/// Slots of the largest pipe.
pub const MAX_PIPE_PAGES: u64 = MAX_PIPED as u64 / PIPE_PAGE;

/// The pipe slots `len` bytes at `offset` of a file take: every page they
/// touch, whole or not.
pub fn pages_spanned(offset: u64, len: u64) -> u64 {
    match offset.checked_add(len) {
        Some(end) if len > 0 => (end - 1) / PIPE_PAGE - offset / PIPE_PAGE + 1,
        // Past u64: more than any pipe holds.
        None => u64::MAX,
        Some(_) => 0,
    }
}
/// Pipe sizes, powers of two from [`MIN_PIPE`] to [`MAX_PIPED`].
const CLASSES: usize = 5;
/// Empty pipes kept per size. Sized pipes count against the per-user
/// pipe page limit (`pipe-user-pages-soft`, 64 MiB by default), so the
/// pool keeps few: 16 of each size is 31 MiB at most.
const POOLED_PER_CLASS: usize = 16;

static POOL: Mutex<[Vec<Pipe>; CLASSES]> = Mutex::new([const { Vec::new() }; CLASSES]);
static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);
static PIPES_OPEN: AtomicUsize = AtomicUsize::new(0);

/// Bytes ever moved into sockets by splicing (process-wide): how tests and
/// operators see that the zero-copy path is in use.
pub fn spliced_bytes() -> u64 {
    SPLICED_BYTES.load(Ordering::Relaxed)
}

/// Pipes open now (process-wide), pooled ones included.
pub fn pipes_open() -> usize {
    PIPES_OPEN.load(Ordering::Relaxed)
}

/// Empty pipes kept for reuse (process-wide). When no reply is in flight,
/// every open pipe is one of these: more would be a leak.
pub fn pipes_pooled() -> usize {
    POOL.lock()
        .map_or(0, |pool| pool.iter().map(Vec::len).sum())
}

/// One kernel pipe of a known capacity.
#[derive(Debug)]
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    class: usize,
}

impl Pipe {
    /// A pooled pipe of `class`, or a new one.
    fn take(class: usize) -> Option<Pipe> {
        if let Some(p) = POOL.lock().ok().and_then(|mut pool| pool[class].pop()) {
            return Some(p);
        }
        let (rd, wr) = pipe_with(PipeFlags::CLOEXEC).ok()?;
        PIPES_OPEN.fetch_add(1, Ordering::Relaxed);
        let pipe = Pipe { rd, wr, class };
        let size = MIN_PIPE << class;
        // Past the per-user pipe page limit a new pipe gets 2 slots and
        // growing it is refused: no pipe then, the caller copies.
        let got = if size > MIN_PIPE {
            fcntl_setpipe_size(&pipe.wr, size).ok()?
        } else {
            fcntl_getpipe_size(&pipe.wr).ok()?
        };
        (got >= size).then_some(pipe)
    }

    /// Back to the pool (the caller knows it is empty), or closed if the
    /// pool has enough of this size.
    fn put(self) {
        if let Ok(mut pool) = POOL.lock() {
            let slot = &mut pool[self.class];
            if slot.len() < POOLED_PER_CLASS {
                slot.push(self);
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The size class whose pipes hold `len` bytes, if any does.
fn class_for(len: usize) -> Option<usize> {
    if len > MAX_PIPED {
        return None;
    }
    let size = len.max(MIN_PIPE).next_power_of_two();
    Some((size / MIN_PIPE).trailing_zeros() as usize)
}

/// Fills one pipe with pieces of files, in order. Dropping it unfinished
/// closes the pipe (whatever is in it is not a whole reply).
#[derive(Debug)]
pub struct PipeFill {
    pipe: Option<Pipe>,
    len: usize,
    /// Slots used and available ([`pages_spanned`]).
    pages: u64,
    capacity_pages: u64,
}

impl PipeFill {
    /// A pipe with at least `pages` slots ([`pages_spanned`] of the pieces
    /// it will hold), or `None` when none can be had (more than
    /// [`MAX_PIPE_PAGES`], out of descriptors, over the pipe page limit):
    /// the caller then copies as before.
    pub fn new(pages: u64) -> Option<PipeFill> {
        let bytes = usize::try_from(pages.checked_mul(PIPE_PAGE)?).ok()?;
        let class = class_for(bytes)?;
        let pipe = Pipe::take(class)?;
        Some(PipeFill {
            pipe: Some(pipe),
            len: 0,
            pages: 0,
            capacity_pages: (MIN_PIPE << class) as u64 / PIPE_PAGE,
        })
    }

    /// Bytes in the pipe so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing in the pipe yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Move `len` bytes at `offset` of `file` into the pipe. All or an
    /// error: pieces that would take more slots than are left are
    /// `WouldBlock`, a short file `UnexpectedEof`, and the fill must then
    /// be dropped. Pages not in the cache are read from the disk first, on
    /// the calling thread.
    pub fn append(&mut self, file: impl AsFd, offset: u64, len: usize) -> io::Result<()> {
        let Some(pipe) = &self.pipe else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let pages = pages_spanned(offset, len as u64);
        if self
            .pages
            .checked_add(pages)
            .is_none_or(|n| n > self.capacity_pages)
        {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            // NONBLOCK: a full pipe fails at once instead of waiting for a
            // reader that is this same thread.
            let n = splice(
                file.as_fd(),
                Some(&mut off),
                &pipe.wr,
                None,
                left,
                SpliceFlags::NONBLOCK,
            )?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        self.len += len;
        self.pages += pages;
        Ok(())
    }

    /// The filled pipe, ready to send.
    pub fn finish(mut self) -> Piped {
        Piped {
            pipe: self.pipe.take(),
            left: self.len,
        }
    }
}

/// Bytes waiting in a pipe to be spliced into a socket: part of a READ
/// reply. Dropped with bytes left, the pipe is closed.
#[derive(Debug)]
pub struct Piped {
    pipe: Option<Pipe>,
    left: usize,
}

impl Piped {
    /// Bytes still in the pipe.
    pub fn len(&self) -> usize {
        self.left
    }

    /// All sent.
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// Move up to the rest into `socket` without blocking; `more` says
    /// further reply bytes follow at once (the kernel may then hold a
    /// partial segment back for them). Returns the bytes moved.
    pub(crate) fn splice_into(&mut self, socket: impl AsFd, more: bool) -> io::Result<usize> {
        let Some(pipe) = &self.pipe else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let mut flags = SpliceFlags::NONBLOCK;
        if more {
            flags |= SpliceFlags::MORE;
        }
        let n = splice(&pipe.rd, None, socket.as_fd(), None, self.left, flags)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.left -= n;
        SPLICED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
        self.recycle_if_done();
        Ok(n)
    }

    /// The rest as a buffer, for a writer that cannot take spliced pages
    /// (one copy, as a plain read would have made).
    pub fn into_bytes(mut self) -> io::Result<Bytes> {
        let Some(pipe) = &self.pipe else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let mut buf = BytesMut::zeroed(self.left);
        let mut at = 0;
        while at < buf.len() {
            // The bytes are already in the pipe: this never waits.
            let n = rustix::io::read(&pipe.rd, &mut buf[at..])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            at += n;
        }
        self.left = 0;
        self.recycle_if_done();
        Ok(buf.freeze())
    }

    fn recycle_if_done(&mut self) {
        if self.left == 0 {
            if let Some(p) = self.pipe.take() {
                p.put();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_of(data: &[u8]) -> (tempfile::NamedTempFile, std::fs::File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(data).unwrap();
        t.as_file().sync_all().unwrap();
        let f = std::fs::File::open(t.path()).unwrap();
        (t, f)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn pieces_of_files_come_out_in_order() {
        let data = pattern(1 << 20);
        let (_t, f) = file_of(&data);
        let mut fill = PipeFill::new(48).unwrap();
        fill.append(&f, 512 << 10, 64 << 10).unwrap();
        fill.append(&f, 4096, 128 << 10).unwrap();
        assert_eq!(fill.len(), 192 << 10);
        let got = fill.finish().into_bytes().unwrap();
        let mut want = data[512 << 10..576 << 10].to_vec();
        want.extend_from_slice(&data[4096..4096 + (128 << 10)]);
        assert!(got == want[..], "pipe returned other bytes");
    }

    #[test]
    fn a_fill_never_takes_more_than_its_pipe() {
        let (_t, f) = file_of(&pattern(256 << 10));
        let mut fill = PipeFill::new(16).unwrap();
        let e = fill.append(&f, 0, 128 << 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // 16 slots, 15 pages of bytes: the unaligned start takes a 16th
        // slot, and one more byte a 17th.
        fill.append(&f, 512, 15 * 4096).unwrap();
        let e = fill.append(&f, 0, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(PipeFill::new(MAX_PIPE_PAGES + 1).is_none());
    }

    #[test]
    fn reading_past_the_end_of_the_file_fails_the_fill() {
        let (_t, f) = file_of(&pattern(8192));
        let mut fill = PipeFill::new(16).unwrap();
        let e = fill.append(&f, 4096, 16384).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pages_spanned_counts_partial_pages() {
        assert_eq!(pages_spanned(0, 0), 0);
        assert_eq!(pages_spanned(0, 1), 1);
        assert_eq!(pages_spanned(0, 4096), 1);
        assert_eq!(pages_spanned(4095, 2), 2);
        assert_eq!(pages_spanned(512, 4096), 2);
        assert_eq!(pages_spanned(u64::MAX, 2), u64::MAX);
    }

    #[test]
    fn sizes_map_to_the_smallest_pipe_that_holds_them() {
        assert_eq!(class_for(1), Some(0));
        assert_eq!(class_for(64 << 10), Some(0));
        assert_eq!(class_for((64 << 10) + 1), Some(1));
        assert_eq!(class_for(256 << 10), Some(2));
        assert_eq!(class_for(MAX_PIPED), Some(CLASSES - 1));
        assert_eq!(class_for(MAX_PIPED + 1), None);
    }

    #[test]
    fn a_drained_pipe_is_reused_and_a_full_one_is_not() {
        let (_t, f) = file_of(&pattern(512 << 10));
        // Class 3 (512 KiB) is used by this test only.
        let mut fill = PipeFill::new(128).unwrap();
        fill.append(&f, 0, 4096).unwrap();
        let piped = fill.finish();
        drop(piped); // 4 KiB left in it: closed, not pooled.
        let pooled = |c: usize| POOL.lock().unwrap()[c].len();
        assert_eq!(pooled(3), 0);
        let mut fill = PipeFill::new(128).unwrap();
        fill.append(&f, 0, 4096).unwrap();
        fill.finish().into_bytes().unwrap();
        assert_eq!(pooled(3), 1);
        // The pooled pipe is empty: a new fill reads only its own bytes.
        let mut fill = PipeFill::new(128).unwrap();
        assert_eq!(pooled(3), 0);
        fill.append(&f, 8192, 4096).unwrap();
        let got = fill.finish().into_bytes().unwrap();
        assert!(got[..] == pattern(512 << 10)[8192..12288]);
    }
}
