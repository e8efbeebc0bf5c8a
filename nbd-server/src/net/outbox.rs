//! Replies waiting to be written, with the budget each one holds until its
//! last byte is on the socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::Buf;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use super::budget::Grant;
use super::frames::{Frame, Segment};

/// Most segments handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// The write half of a connection.
pub(crate) trait ReplySink: AsyncWrite + Unpin {
    /// The TCP socket under this writer, when file pages may be spliced
    /// straight into it. `None` (TLS, Unix sockets, in-memory streams):
    /// piped data is read into a buffer first.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl ReplySink for OwnedWriteHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: tokio::io::AsyncRead + AsyncWrite> ReplySink for tokio::io::WriteHalf<T> {}

/// Budget a request holds: `conn` bytes of its connection's budget and,
/// when it came through the process-wide budget, a grant (returned to the
/// process when this is dropped).
#[derive(Debug)]
pub(crate) struct Held {
    pub conn: u64,
    pub _grant: Option<Grant>,
}

/// Reply segments in wire order, and per frame the budget to give back
/// once the frame is written.
#[derive(Default)]
pub(crate) struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes ever queued / ever written; a frame is done when `written`
    /// reaches its end.
    queued: u64,
    written: u64,
    frames: VecDeque<(u64, Held)>,
    /// Bytes were written since the last flush. A TLS stream keeps
    /// encrypted records it could not send yet until it is flushed (a
    /// plain socket's flush is a no-op), so an empty queue is not done
    /// until it has been flushed.
    unflushed: bool,
}

impl Outbox {
    /// Queue a frame; `held` is released when its last byte is written.
    pub fn push(&mut self, frame: Frame, held: Held) {
        for s in frame.segments {
            if s.len() > 0 {
                self.queued += s.len() as u64;
                self.segments.push_back(s);
            }
        }
        self.frames.push_back((self.queued, held));
    }

    /// Nothing left to write or flush.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.segments.is_empty() && !self.unflushed
    }

    /// Frames whose bytes are all written (an empty frame is done at once).
    pub fn take_done(&mut self) -> Vec<Held> {
        let mut done = Vec::new();
        while let Some((end, _)) = self.frames.front() {
            if *end > self.written {
                break;
            }
            if let Some((_, held)) = self.frames.pop_front() {
                done.push(held);
            }
        }
        done
    }

    /// Drop everything queued (the client is being disconnected) and
    /// return the budget it held. Pipes with data in them are closed.
    pub fn discard(&mut self) -> Vec<Held> {
        self.segments.clear();
        self.unflushed = false;
        self.written = self.queued;
        self.take_done()
    }

    /// Write some of the queued bytes, or flush once the queue is empty.
    /// Cancel-safe: the queue advances only by what a completed write
    /// reported, and the flush is owed until one completes. Returns the
    /// bytes written (0 for a flush).
    pub async fn write_some<W: ReplySink>(&mut self, wr: &mut W) -> io::Result<usize> {
        if matches!(self.segments.front(), Some(Segment::Piped(_))) {
            if let Some(socket) = wr.socket() {
                return self.splice_front(socket).await;
            }
            // This writer cannot take pages: copy them out once.
            if let Some(Segment::Piped(p)) = self.segments.pop_front() {
                self.segments.push_front(Segment::Bytes(p.into_bytes()?));
            }
        }
        let slices: Vec<IoSlice<'_>> = self
            .segments
            .iter()
            .take(MAX_IOVECS)
            .map_while(|s| match s {
                Segment::Bytes(b) => Some(IoSlice::new(b)),
                Segment::Piped(_) => None,
            })
            .collect();
        if slices.is_empty() {
            if self.unflushed {
                wr.flush().await?;
                self.unflushed = false;
            }
            return Ok(0);
        }
        let written = wr.write_vectored(&slices).await?;
        self.unflushed = true;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.written += written as u64;
        let mut n = written;
        while n > 0 {
            let Some(Segment::Bytes(front)) = self.segments.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        Ok(written)
    }

    /// Splice the front segment's pages into `socket`, waiting until it
    /// takes some.
    async fn splice_front(&mut self, socket: &TcpStream) -> io::Result<usize> {
        let more = self.segments.len() > 1;
        let Some(Segment::Piped(p)) = self.segments.front_mut() else {
            return Ok(0);
        };
        let n = loop {
            socket.writable().await?;
            match socket.try_io(Interest::WRITABLE, || p.splice_into(socket, more)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if p.is_empty() {
            self.segments.pop_front();
        }
        self.unflushed = true;
        self.written += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;

    use super::*;

    /// A writer like a TLS stream: it accepts bytes into a buffer and sends
    /// them only when flushed.
    #[derive(Default)]
    struct HoldsUntilFlush {
        held: Vec<u8>,
        sent: Vec<u8>,
    }

    impl AsyncWrite for HoldsUntilFlush {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.sent.extend(held);
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl ReplySink for HoldsUntilFlush {}

    /// Regression: replies written into a TLS stream sat in its buffer
    /// because nothing flushed it, and the client waited forever.
    #[tokio::test]
    async fn an_emptied_queue_is_flushed_before_it_counts_as_empty() {
        let mut o = Outbox::default();
        let held = Held {
            conn: 0,
            _grant: None,
        };
        o.push(
            Frame {
                segments: vec![
                    Segment::Bytes(Bytes::from_static(b"reply one")),
                    Segment::Bytes(Bytes::from_static(b"+two")),
                ],
            },
            held,
        );
        let mut w = HoldsUntilFlush::default();
        let mut rounds = 0;
        let mut done = 0;
        // As the connection loop does: write, collect finished frames.
        while !o.is_empty() {
            o.write_some(&mut w).await.unwrap();
            done += o.take_done().len();
            rounds += 1;
            assert!(rounds < 10);
        }
        assert_eq!(w.sent, b"reply one+two", "queue empty but bytes never sent");
        assert_eq!(done, 1);
    }

    /// A pipe reaching a writer that cannot take pages (TLS, in-memory)
    /// is sent as bytes, in its place in the reply.
    #[tokio::test]
    async fn a_pipe_for_a_writer_without_a_socket_is_sent_as_bytes() {
        use std::io::Write;

        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(&[7u8; 8192]).unwrap();
        let mut fill = crate::splice::PipeFill::new(2).unwrap();
        fill.append(t.as_file(), 4096, 4096).unwrap();
        let mut o = Outbox::default();
        o.push(
            Frame {
                segments: vec![
                    Segment::Bytes(Bytes::from_static(b"head")),
                    Segment::Piped(fill.finish()),
                    Segment::Bytes(Bytes::from_static(b"tail")),
                ],
            },
            Held {
                conn: 0,
                _grant: None,
            },
        );
        let mut w = HoldsUntilFlush::default();
        let mut rounds = 0;
        while !o.is_empty() {
            o.write_some(&mut w).await.unwrap();
            o.take_done();
            rounds += 1;
            assert!(rounds < 10);
        }
        let mut want = b"head".to_vec();
        want.extend_from_slice(&[7u8; 4096]);
        want.extend_from_slice(b"tail");
        assert!(w.sent == want, "pipe bytes lost or out of place");
    }
}
