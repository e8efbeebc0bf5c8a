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

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
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
        self.written = self.queued;
        self.take_done()
    }

    /// Write some of the queued bytes. Cancel-safe: the queue advances only
    /// by what a completed write reported. Returns the bytes written.
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
            return Ok(0);
        }
        let written = wr.write_vectored(&slices).await?;
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
