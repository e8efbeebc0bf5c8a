//! Replies waiting to be written, with the budget each one holds until its
//! last byte is on the socket.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::budget::Grant;
use super::frames::Frame;

/// Most segments handed to one vectored write.
const MAX_IOVECS: usize = 64;

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
    segments: VecDeque<Bytes>,
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
            if !s.is_empty() {
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
    /// return the budget it held.
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
    pub async fn write_some<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
    ) -> std::io::Result<usize> {
        let slices: Vec<IoSlice<'_>> = self
            .segments
            .iter()
            .take(MAX_IOVECS)
            .map(|b| IoSlice::new(b))
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
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.written += written as u64;
        let mut n = written;
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
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
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

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
                    Bytes::from_static(b"reply one"),
                    Bytes::from_static(b"+two"),
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
}
