//! Reading requests off the socket in two steps — header, then payload — so
//! the transmission loop can reserve a request's budget from its header
//! before a byte of its payload is read or allocated.
//!
//! Memory held here is bounded independently of what clients send: the
//! header buffer reads at most [`WINDOW`] bytes ahead, and a payload larger
//! than what is already buffered gets its own exact-size buffer (so the
//! header buffer never grows to 32 MiB and keeps that capacity for the
//! life of the connection). Payloads stay on the heap: a memory map per
//! request (as READ buffers get, see [`crate::buffer`]) cost 2 MiB writes
//! about 40% of their throughput in page faults, while heap buffers are
//! reused from one write to the next. What the allocator keeps of them is
//! bounded by the budgets.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::request::FrameError;
use crate::proto::RequestHeader;

/// Most bytes read ahead while looking for a header.
pub(crate) const WINDOW: usize = 64 * 1024;

/// Above this capacity an emptied header buffer is replaced by a fresh one
/// (the handshake's leftover, or a window that a split payload pinned).
const SHRINK_ABOVE: usize = 2 * WINDOW;

/// Reads requests from `rd`. Cancel-safe: partial input stays in the
/// reader, so each step can sit in a `select!` without losing bytes.
pub(crate) struct RequestReader<R> {
    rd: R,
    buf: BytesMut,
    extended: bool,
    /// The payload being read for the current header, when it did not fit
    /// in `buf`.
    body: Option<Body>,
}

/// A payload being read (its length is how much has arrived).
struct Body {
    buf: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed inside a request ({0} bytes pending)")]
    Truncated(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    pub fn new(rd: R, leftover: BytesMut, extended: bool) -> Self {
        RequestReader {
            rd,
            buf: leftover,
            extended,
            body: None,
        }
    }

    /// Capacity held by the reader's buffers (for tests).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity() + self.body.as_ref().map_or(0, |b| b.buf.capacity())
    }

    /// Wait for the next header without consuming it; `None` at a clean
    /// end of stream.
    pub async fn header(&mut self) -> Result<Option<RequestHeader>, ReadError> {
        loop {
            if let Some(h) = RequestHeader::decode(&self.buf, self.extended)? {
                return Ok(Some(h));
            }
            if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                self.buf = BytesMut::new();
            }
            if self.buf.capacity() == 0 {
                // Released while idle: wait for the client with a few
                // bytes on the stack, and take a window only once it talks.
                let mut first = [0u8; 64];
                let n = self.rd.read(&mut first).await?;
                if n == 0 {
                    return Ok(None);
                }
                self.buf.reserve(WINDOW);
                self.buf.extend_from_slice(&first[..n]);
                continue;
            }
            if self.buf.capacity() - self.buf.len() < RequestHeader::wire_len(self.extended) {
                self.buf.reserve(WINDOW);
            }
            let room = WINDOW.saturating_sub(self.buf.len()).max(1) as u64;
            if (&mut self.rd).take(room).read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.buf.len()))
                };
            }
        }
    }

    /// Drop the read-ahead window if nothing is buffered, so an idle
    /// connection holds no buffer (the next [`header`](Self::header) takes
    /// one when the client talks again).
    pub fn release_if_idle(&mut self) {
        if self.buf.is_empty() && self.body.is_none() {
            self.buf = BytesMut::new();
        }
    }

    /// Consume the header [`header`](Self::header) returned and read its
    /// payload (empty for commands without one). Call only after the
    /// request's budget is reserved.
    pub async fn body(&mut self, h: &RequestHeader) -> Result<Bytes, ReadError> {
        let hlen = RequestHeader::wire_len(self.extended);
        // decode() bounded the payload by MAX_PAYLOAD.
        let plen = usize::try_from(h.payload_len(self.extended)).unwrap_or(usize::MAX);
        if self.body.is_none() {
            if hlen
                .checked_add(plen)
                .is_some_and(|need| self.buf.len() >= need)
            {
                self.buf.advance(hlen);
                return Ok(self.buf.split_to(plen).freeze());
            }
            // The payload gets its own buffer of exactly its size (≤
            // MAX_PAYLOAD, and already reserved from the budgets).
            let mut buf = BytesMut::with_capacity(plen);
            self.buf.advance(hlen.min(self.buf.len()));
            let have = self.buf.len().min(plen);
            buf.extend_from_slice(&self.buf[..have]);
            self.buf.advance(have);
            self.body = Some(Body { buf });
        }
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(Bytes::new());
            };
            let missing = plen.saturating_sub(body.buf.len());
            if missing == 0 {
                return Ok(self.body.take().map(|b| b.buf.freeze()).unwrap_or_default());
            }
            if (&mut self.rd)
                .take(missing as u64)
                .read_buf(&mut body.buf)
                .await?
                == 0
            {
                return Err(ReadError::Truncated(body.buf.len() + hlen));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::consts::cmd;
    use tokio::io::AsyncWriteExt;

    fn write_req(len: u32, cookie: u64) -> Vec<u8> {
        let mut out = Vec::new();
        RequestHeader {
            flags: 0,
            kind: cmd::WRITE,
            cookie,
            offset: 0,
            length: u64::from(len),
        }
        .encode(false, &mut out);
        out.resize(out.len() + len as usize, cookie as u8);
        out
    }

    #[tokio::test]
    async fn header_peek_reads_no_further_than_the_window() {
        let (mut client, server) = tokio::io::duplex(8 << 20);
        let big = write_req(4 << 20, 1);
        client.write_all(&big).await.unwrap();
        let mut r = RequestReader::new(server, BytesMut::new(), false);
        let h = r.header().await.unwrap().unwrap();
        assert_eq!(h.length, 4 << 20);
        assert!(r.capacity() <= 2 * WINDOW, "read ahead {}", r.capacity());
        let body = r.body(&h).await.unwrap();
        assert_eq!(body.len(), 4 << 20);
        assert!(body.iter().all(|b| *b == 1));
        drop(body);
        // Small requests after the big one: the buffer stays window-sized.
        let mut small = write_req(512, 2);
        small.extend(write_req(512, 3));
        client.write_all(&small).await.unwrap();
        for cookie in [2, 3] {
            let h = r.header().await.unwrap().unwrap();
            assert_eq!(h.cookie, cookie);
            assert_eq!(r.body(&h).await.unwrap().len(), 512);
            assert!(r.capacity() <= 2 * WINDOW, "capacity {}", r.capacity());
        }
        drop(client);
        assert!(r.header().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer_and_reads_on_afterwards() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut r = RequestReader::new(server, BytesMut::with_capacity(4096), false);
        client.write_all(&write_req(512, 1)).await.unwrap();
        let h = r.header().await.unwrap().unwrap();
        r.body(&h).await.unwrap();
        r.release_if_idle();
        assert_eq!(r.capacity(), 0);
        // The client talks again: a header and payload split over the
        // small first read and the window after it.
        let mut two = write_req(4096, 2);
        two.extend(write_req(100, 3));
        client.write_all(&two).await.unwrap();
        for (cookie, len) in [(2, 4096), (3, 100)] {
            let h = r.header().await.unwrap().unwrap();
            assert_eq!((h.cookie, h.length), (cookie, len));
            let body = r.body(&h).await.unwrap();
            assert_eq!(body.len() as u64, len);
            assert!(body.iter().all(|b| *b == cookie as u8));
        }
        r.release_if_idle();
        drop(client);
        assert!(r.header().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_payload_is_an_error() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let req = write_req(4096, 1);
        client.write_all(&req[..28 + 100]).await.unwrap();
        drop(client);
        let mut r = RequestReader::new(server, BytesMut::new(), false);
        let h = r.header().await.unwrap().unwrap();
        assert!(matches!(r.body(&h).await, Err(ReadError::Truncated(_))));
    }
}
