//! Data reads of read-only layers that never hold an I/O thread on the disk.
//!
//! The I/O threads (`pool.rs`) run many jobs of one image on its home
//! thread, and a plain `preadv` of data that is not in the page cache
//! blocks that thread for the disk's latency: every other job queued there
//! (further reads, and the block-status requests a client such as
//! `qemu-img convert` waits on before it reads on) waits behind it, so a
//! cold restore ran one disk read at a time. Here a read first asks the
//! page cache only (`preadv2(RWF_NOWAIT)`: same cost as `preadv` when the
//! data is cached); whatever is not cached is read by
//! [`read_misses`] on tokio's blocking pool while the I/O thread serves
//! other jobs, so cold reads of one image reach the disk in parallel.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::io::{preadv2, Errno, ReadWriteFlags};

use crate::buf::AlignedBuf;

/// What a page-cache-only read got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// This many bytes from the start (all of them, or fewer when the rest
    /// is not in the page cache: the caller reads that with
    /// [`read_misses`]).
    Read(usize),
    /// The file does not take `RWF_NOWAIT` reads: read as before.
    Unsupported,
}

/// Fill as much of `buf` as the page cache holds from `file` at `offset`,
/// without waiting for the disk.
pub fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> Cached {
    let mut done = 0;
    while done < buf.len() {
        let Some(at) = offset.checked_add(done as u64) else {
            return Cached::Read(done);
        };
        match preadv2(
            file,
            &mut [IoSliceMut::new(&mut buf[done..])],
            at,
            ReadWriteFlags::NOWAIT,
        ) {
            // End of file: the blocking read zero-fills the rest.
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(Errno::OPNOTSUPP | Errno::NOSYS) if done == 0 => return Cached::Unsupported,
            // Not cached (EAGAIN), or a real error the blocking read
            // reports with its context.
            Err(_) => break,
        }
    }
    Cached::Read(done)
}

/// A part of a buffer the page cache could not fill.
#[derive(Debug)]
pub struct Miss {
    /// Where in the buffer it starts.
    pub at: usize,
    /// Its length.
    pub len: usize,
    /// The layer file and the offset in it.
    pub file: Arc<File>,
    pub offset: u64,
}

/// Read every miss into `buf` on the blocking pool (the calling I/O thread
/// stays free) and give the buffer back.
pub async fn read_misses(mut buf: AlignedBuf, misses: Vec<Miss>) -> io::Result<AlignedBuf> {
    tokio::task::spawn_blocking(move || {
        let whole = buf.as_mut_slice();
        for m in &misses {
            let part =
                m.at.checked_add(m.len)
                    .and_then(|end| whole.get_mut(m.at..end))
                    .ok_or_else(|| io::Error::other("read miss outside its buffer"))?;
            read_full(&m.file, part, m.offset)?;
        }
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
}

/// Fill `buf` from `file` at `offset`, zeroes past the end of the file (as
/// imago's own reads do).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::other("read offset overflow"))?;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.flush().unwrap();
        let h = Arc::new(f.reopen().unwrap());
        (f, h)
    }

    #[test]
    fn cached_data_is_read_without_the_pool() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        // Just written: the pages are in the page cache.
        let (_f, h) = file_with(&data);
        let mut buf = vec![0u8; 8192];
        match read_cached(&h, &mut buf, 4096) {
            Cached::Read(n) => {
                assert_eq!(n, 8192);
                assert_eq!(buf, data[4096..12288]);
            }
            // A filesystem without RWF_NOWAIT: the caller reads as before.
            Cached::Unsupported => {}
        }
    }

    #[test]
    fn a_read_past_the_end_stops_short() {
        let (_f, h) = file_with(&[7u8; 4096]);
        let mut buf = vec![1u8; 8192];
        match read_cached(&h, &mut buf, 0) {
            Cached::Read(n) => assert_eq!(n, 4096, "the rest is for read_misses"),
            Cached::Unsupported => {}
        }
    }

    #[tokio::test]
    async fn misses_are_filled_and_zeroed_past_the_end() {
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 253) as u8).collect();
        let (_f, h) = file_with(&data);
        let mut buf = AlignedBuf::for_overwrite(16384);
        buf.as_mut_slice().fill(0xee);
        let misses = vec![
            Miss {
                at: 0,
                len: 4096,
                file: Arc::clone(&h),
                offset: 8192,
            },
            // Half inside the file, half past its end.
            Miss {
                at: 8192,
                len: 8192,
                file: Arc::clone(&h),
                offset: 8192,
            },
        ];
        let b = read_misses(buf, misses).await.unwrap().freeze();
        assert_eq!(&b[..4096], &data[8192..]);
        assert!(b[4096..8192].iter().all(|&x| x == 0xee), "untouched");
        assert_eq!(&b[8192..12288], &data[8192..]);
        assert!(b[12288..].iter().all(|&x| x == 0), "zero past the end");
    }

    #[tokio::test]
    async fn a_miss_outside_the_buffer_is_an_error() {
        let (_f, h) = file_with(&[0u8; 4096]);
        let misses = vec![Miss {
            at: 4096,
            len: 4096,
            file: h,
            offset: 0,
        }];
        assert!(read_misses(AlignedBuf::for_overwrite(4096), misses)
            .await
            .is_err());
    }
}
