//! Read-ahead under TLS: one socket read per window instead of one per
//! 4 KiB.
//!
//! rustls pulls ciphertext in reads of at most 4 KiB (its deframer's
//! `READ_SIZE`), so a 16 KiB record costs four `recvfrom` calls and a
//! backup stream over TLS spends much of its time in the kernel: at four
//! connections this, not decryption, bounded our TLS receive rate. Under
//! the TLS stream sits this wrapper, which reads the socket a window at a
//! time and hands rustls its 4 KiB reads from memory.
//!
//! An idle connection holds no window: the buffer is released whenever it
//! is empty and the socket has nothing to read, so thousands of idle TLS
//! clients cost no more than before. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at once.
pub(crate) const WINDOW: usize = 64 * 1024;

/// A byte stream whose reads go through a window-sized buffer.
pub(crate) struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// Capacity held right now (for tests).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= WINDOW {
                // A large read gains nothing from a copy.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(WINDOW);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: `out` stays unfilled, which says so.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_come_from_one_socket_read_and_idle_holds_nothing() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut ra = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = ra.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        // Drained and nothing more to read: the window is released.
        let pending = futures_util::FutureExt::now_or_never(ra.read(&mut chunk));
        assert!(pending.is_none());
        assert_eq!(ra.capacity(), 0);
        // Writes pass through; the end of stream reads as 0.
        ra.write_all(b"reply").await.unwrap();
        let mut back = [0u8; 5];
        tx.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"reply");
        drop(tx);
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn large_reads_bypass_the_window() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&vec![7u8; 3 * WINDOW]).await.unwrap();
        drop(tx);
        let mut ra = ReadAhead::new(rx);
        let mut big = vec![0u8; 2 * WINDOW];
        let n = ra.read(&mut big).await.unwrap();
        assert!(n > 0);
        assert_eq!(ra.capacity(), 0);
        let mut rest = Vec::new();
        ra.read_to_end(&mut rest).await.unwrap();
        assert_eq!(n + rest.len(), 3 * WINDOW);
    }
}
