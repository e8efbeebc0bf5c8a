//! The connection in transmission: many requests in flight.
//!
//! Requests go through a channel to one writer task (so a caller dropping
//! its future can never leave half a request on the wire); replies are
//! read by one reader task that decodes them ([`crate::reply`]), feeds each
//! to its request's [`Assembly`] found by cookie, and completes the
//! request's oneshot. Two semaphores bound what is in flight: a count and
//! payload bytes; a request's permits are released when its reply is
//! complete, not when its caller gives up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use nbd_server::proto::consts::{cmd, cmd_flags, tx_flags};
use nbd_server::proto::reply::MAX_COMPACT_EXTENT;
use nbd_server::proto::{ReplyMode, RequestHeader};
use nbd_server::ReadChunk;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::assemble::{Assembly, Output};
use crate::error::{ClientError, ProtocolError};
use crate::handshake::{
    greet, haggle, handshake, starttls, ConnectOptions, ExportInfo, MetaContext, Negotiated,
};
use crate::reply::{decode_reply, Decoded, Extent};

/// One request on its way to the socket.
#[derive(Debug)]
struct Outgoing {
    header: Vec<u8>,
    payload: Bytes,
    /// `NBD_CMD_DISC`: the writer stops after it.
    last: bool,
}

/// A request waiting for its reply.
#[derive(Debug)]
struct Pending {
    assembly: Assembly,
    done: oneshot::Sender<Result<Output, ClientError>>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

#[derive(Debug, Default)]
struct Table {
    map: HashMap<u64, Pending>,
    /// Set once the connection is dead: why.
    closed: Option<ClientError>,
}

type Shared = Arc<Mutex<Table>>;

fn lock(t: &Shared) -> MutexGuard<'_, Table> {
    // A panic while holding the lock cannot leave the table inconsistent
    // (every update is a single insert or remove), so poisoning is ignored.
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fail every pending request and refuse new ones.
fn fail_all(t: &Shared, err: ClientError) {
    let pending: Vec<Pending> = {
        let mut g = lock(t);
        g.closed.get_or_insert(err.clone());
        g.map.drain().map(|(_, p)| p).collect()
    };
    for p in pending {
        let _ = p.done.send(Err(err.clone()));
    }
}

#[derive(Debug)]
struct Inner {
    info: ExportInfo,
    /// Metadata contexts the server selected.
    contexts: Vec<MetaContext>,
    /// Their ids: every id a block-status reply may carry.
    context_ids: Arc<[u32]>,
    tx: mpsc::UnboundedSender<Outgoing>,
    table: Shared,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    bytes_budget: u32,
    next_cookie: AtomicU64,
    reader: JoinHandle<()>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An NBD connection in transmission. Cheap to clone; clones share the
/// connection and may issue requests concurrently.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connect over TCP and negotiate.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        opts: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let s = TcpStream::connect(addr).await?;
        Self::from_stream(s, opts).await
    }

    /// Connect over TCP to `host:port` and negotiate; with
    /// [`ConnectOptions::tls`], the server's certificate must name `host`.
    pub async fn connect_host(
        host: &str,
        port: u16,
        opts: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let s = TcpStream::connect((host, port)).await?;
        Self::from_stream_named(s, host, opts).await
    }

    /// Negotiate on an already connected socket (TLS, if asked for, checks
    /// the certificate against the peer's IP address).
    pub async fn from_stream(s: TcpStream, opts: &ConnectOptions) -> Result<Client, ClientError> {
        let host = s.peer_addr()?.ip().to_string();
        Self::from_stream_named(s, &host, opts).await
    }

    async fn from_stream_named(
        mut s: TcpStream,
        host: &str,
        opts: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        s.set_nodelay(true)?;
        match &opts.tls {
            None => {
                let neg = handshake(&mut s, opts).await?;
                let (rd, wr) = s.into_split();
                Ok(Self::start(rd, wr, neg, opts))
            }
            Some(tls) => {
                let no_zeroes = greet(&mut s).await?;
                starttls(&mut s).await?;
                let name = crate::tls::server_name(host)
                    .map_err(|e| ClientError::Io(Arc::new(std::io::Error::other(e))))?;
                let mut t = tls.connector().connect(name, s).await?;
                let neg = haggle(&mut t, opts, no_zeroes).await?;
                let (rd, wr) = tokio::io::split(t);
                Ok(Self::start(rd, wr, neg, opts))
            }
        }
    }

    fn start<R, W>(rd: R, wr: W, (info, contexts): Negotiated, opts: &ConnectOptions) -> Client
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let table: Shared = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(wr, rx, Arc::clone(&table)));
        let reader = tokio::spawn(read_loop(rd, info.mode, Arc::clone(&table)));
        let budget = opts
            .max_in_flight_bytes
            .max(info.max_payload as usize)
            .min(u32::MAX as usize) as u32;
        Client {
            inner: Arc::new(Inner {
                info,
                context_ids: contexts.iter().map(|c| c.id).collect(),
                contexts,
                tx,
                table,
                count: Arc::new(Semaphore::new(opts.max_in_flight.max(1))),
                bytes: Arc::new(Semaphore::new(budget as usize)),
                bytes_budget: budget,
                next_cookie: AtomicU64::new(1),
                reader,
                writer: Mutex::new(Some(writer)),
            }),
        }
    }

    /// What the handshake settled.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// The metadata contexts the server selected.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.inner.contexts
    }

    /// The id of the selected context `name`, if the server selected it.
    pub fn meta_context(&self, name: &str) -> Option<u32> {
        self.inner
            .contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Whether the connection is dead (and why).
    pub fn closed(&self) -> Option<ClientError> {
        lock(&self.inner.table).closed.clone()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ClientError::OutOfRange { offset, len, size }),
        }
    }

    fn check_payload(&self, len: u64) -> Result<u32, ClientError> {
        let max = self.inner.info.max_payload;
        u32::try_from(len)
            .ok()
            .filter(|l| *l <= max)
            .ok_or(ClientError::TooLarge { len, max })
    }

    fn require(&self, flag: u16, what: &'static str) -> Result<(), ClientError> {
        if self.inner.info.has(flag) {
            Ok(())
        } else {
            Err(ClientError::Unsupported(what))
        }
    }

    fn writable(&self) -> Result<(), ClientError> {
        if self.inner.info.has(tx_flags::READ_ONLY) {
            Err(ClientError::Unsupported("writes (read-only export)"))
        } else {
            Ok(())
        }
    }

    /// Send one request and wait for its complete reply.
    async fn submit(
        &self,
        header: RequestHeader,
        payload: Bytes,
        assembly: Assembly,
        payload_bytes: u32,
    ) -> Result<Output, ClientError> {
        let inner = &self.inner;
        let closed = |_| ClientError::Closed;
        let count = Arc::clone(&inner.count)
            .acquire_owned()
            .await
            .map_err(closed)?;
        let bytes = match payload_bytes.min(inner.bytes_budget) {
            0 => None,
            n => Some(
                Arc::clone(&inner.bytes)
                    .acquire_many_owned(n)
                    .await
                    .map_err(closed)?,
            ),
        };
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let header = RequestHeader { cookie, ..header };
        let (done, rx) = oneshot::channel();
        {
            // Registered before it is sent: the reply may beat this task.
            let mut t = lock(&inner.table);
            if let Some(e) = &t.closed {
                return Err(e.clone());
            }
            t.map.insert(
                cookie,
                Pending {
                    assembly,
                    done,
                    _permits: (count, bytes),
                },
            );
        }
        let mut wire = Vec::with_capacity(32);
        header.encode(inner.info.mode == ReplyMode::Extended, &mut wire);
        let out = Outgoing {
            header: wire,
            payload,
            last: false,
        };
        if inner.tx.send(out).is_err() {
            lock(&inner.table).map.remove(&cookie);
            return Err(self.closed().unwrap_or(ClientError::Closed));
        }
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    fn header(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 0,
            offset,
            length,
        }
    }

    /// Read `len` bytes at `offset` (≤ the maximum payload). Holes come back
    /// as [`ReadChunk::Zero`] when the server sends them.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ClientError> {
        self.check_range(offset, u64::from(len))?;
        self.check_payload(u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let h = Self::header(cmd::READ, 0, offset, u64::from(len));
        match self
            .submit(h, Bytes::new(), Assembly::read(offset, len), len)
            .await?
        {
            Output::Read(chunks) => Ok(chunks),
            // A read assembly only ever completes with Output::Read.
            _ => Err(ClientError::Closed),
        }
    }

    /// Read into one buffer (holes as zeroes).
    pub async fn read_bytes(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        Ok(crate::assemble::flatten(&self.read(offset, len).await?))
    }

    /// Write `data` at `offset` (≤ the maximum payload); `fua` makes it
    /// durable before the reply.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.writable()?;
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let n = self.check_payload(len)?;
        let mut flags = 0;
        if fua {
            self.require(tx_flags::SEND_FUA, "FUA")?;
            flags |= cmd_flags::FUA;
        }
        let h = Self::header(cmd::WRITE, flags, offset, len);
        self.submit(h, data, Assembly::plain("WRITE"), n)
            .await
            .map(drop)
    }

    /// Flush everything written so far to stable storage.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.require(tx_flags::SEND_FLUSH, "FLUSH")?;
        let h = Self::header(cmd::FLUSH, 0, 0, 0);
        self.submit(h, Bytes::new(), Assembly::plain("FLUSH"), 0)
            .await
            .map(drop)
    }

    /// Largest effect length of one request: 64-bit with extended headers,
    /// else 32-bit rounded down to the minimum block size.
    fn max_effect(&self) -> u64 {
        if self.inner.info.mode == ReplyMode::Extended {
            u64::MAX
        } else {
            let align = u64::from(self.inner.info.min_block.max(4096));
            u64::from(MAX_COMPACT_EXTENT) / align * align
        }
    }

    /// Issue a payload-less range command, split to what one header holds.
    async fn ranged(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        name: &'static str,
    ) -> Result<(), ClientError> {
        self.check_range(offset, len)?;
        let step = self.max_effect();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(step);
            let h = Self::header(kind, flags, at, n);
            self.submit(h, Bytes::new(), Assembly::plain(name), 0)
                .await?;
            at += n;
        }
        Ok(())
    }

    /// Discard hint.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.writable()?;
        self.require(tx_flags::SEND_TRIM, "TRIM")?;
        let mut flags = 0;
        if fua {
            self.require(tx_flags::SEND_FUA, "FUA")?;
            flags |= cmd_flags::FUA;
        }
        self.ranged(cmd::TRIM, flags, offset, len, "TRIM").await
    }

    /// Make a range read as zeroes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        opts: ZeroOptions,
    ) -> Result<(), ClientError> {
        self.writable()?;
        self.require(tx_flags::SEND_WRITE_ZEROES, "WRITE_ZEROES")?;
        let mut flags = 0;
        if opts.fua {
            self.require(tx_flags::SEND_FUA, "FUA")?;
            flags |= cmd_flags::FUA;
        }
        if opts.no_hole {
            flags |= cmd_flags::NO_HOLE;
        }
        if opts.fast {
            self.require(tx_flags::SEND_FAST_ZERO, "FAST_ZERO")?;
            flags |= cmd_flags::FAST_ZERO;
        }
        self.ranged(cmd::WRITE_ZEROES, flags, offset, len, "WRITE_ZEROES")
            .await
    }

    /// Prefetch hint.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.require(tx_flags::SEND_CACHE, "CACHE")?;
        self.ranged(cmd::CACHE, 0, offset, len, "CACHE").await
    }

    /// `base:allocation` extents from `offset` (at least one; the server
    /// may describe less than `len`, and the last extent may run past it).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ClientError> {
        let Some(ctx) = self.inner.info.base_allocation else {
            return Err(ClientError::Unsupported("block status (base:allocation)"));
        };
        self.status_of(ctx, offset, len).await
    }

    /// Extents of the selected metadata context `context` (for example
    /// `qemu:dirty-bitmap:NAME`, whose flag bit 0 means dirty: see
    /// [`Extent::is_dirty`]) from `offset`: at least one; the server may
    /// describe less than `len`, and the last extent may run past it.
    /// [`ClientError::NoMetaContext`] if the server did not select it.
    pub async fn block_status_of(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, ClientError> {
        let ctx = self
            .meta_context(context)
            .ok_or_else(|| ClientError::NoMetaContext(context.to_owned()))?;
        self.status_of(ctx, offset, len).await
    }

    async fn status_of(&self, ctx: u32, offset: u64, len: u64) -> Result<Vec<Extent>, ClientError> {
        self.check_range(offset, len)?;
        let len = len.min(self.max_effect());
        let h = Self::header(cmd::BLOCK_STATUS, 0, offset, len);
        // The server answers for every selected context; the assembly
        // keeps `ctx`'s extents and checks the others' ids.
        let assembly = Assembly::status(ctx, Arc::clone(&self.inner.context_ids));
        match self.submit(h, Bytes::new(), assembly, 0).await? {
            Output::Status(e) => Ok(e),
            // A status assembly only ever completes with Output::Status.
            _ => Err(ClientError::Closed),
        }
    }

    /// Soft disconnect: send `NBD_CMD_DISC` after every request already
    /// queued, and close the write side. Requests still waiting for replies
    /// may get them or fail with [`ClientError::Closed`].
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let h = Self::header(cmd::DISC, 0, 0, 0);
        let mut wire = Vec::with_capacity(32);
        h.encode(self.inner.info.mode == ReplyMode::Extended, &mut wire);
        let _ = self.inner.tx.send(Outgoing {
            header: wire,
            payload: Bytes::new(),
            last: true,
        });
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = writer {
            let _ = w.await;
        }
        Ok(())
    }
}

/// Flags of [`Client::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroOptions {
    /// Durable before the reply.
    pub fua: bool,
    /// Do not punch a hole (`NO_HOLE`).
    pub no_hole: bool,
    /// Fail with ENOTSUP unless zeroing is fast (`FAST_ZERO`).
    pub fast: bool,
}

async fn write_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    table: Shared,
) {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    let result: std::io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            // Batch whatever is queued into one flush.
            let mut next = Some(first);
            while let Some(m) = next.take() {
                w.write_all(&m.header).await?;
                if !m.payload.is_empty() {
                    w.write_all(&m.payload).await?;
                }
                if m.last {
                    w.flush().await?;
                    return w.shutdown().await;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = result {
        fail_all(&table, e.into());
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, mode: ReplyMode, table: Shared) {
    let mut buf = BytesMut::with_capacity(256 << 10);
    loop {
        let decoded = {
            let t = lock(&table);
            decode_reply(&mut buf, mode, |c| {
                t.map.get(&c).map(|p| p.assembly.expect())
            })
        };
        match decoded {
            Err(e) => return fail_all(&table, e.into()),
            Ok(Decoded::Need(n)) => {
                // n is bounded by the request being answered.
                buf.reserve(n.saturating_sub(buf.len()).max(64 << 10));
                match rd.read_buf(&mut buf).await {
                    Ok(0) => return fail_all(&table, ClientError::Closed),
                    Ok(_) => {}
                    Err(e) => return fail_all(&table, e.into()),
                }
            }
            Ok(Decoded::Reply(reply)) => {
                let cookie = reply.cookie();
                let mut t = lock(&table);
                let Some(p) = t.map.get_mut(&cookie) else {
                    drop(t);
                    return fail_all(&table, ProtocolError::UnknownCookie(cookie).into());
                };
                match p.assembly.feed(reply) {
                    Err(e) => {
                        drop(t);
                        return fail_all(&table, e.into());
                    }
                    Ok(None) => {}
                    Ok(Some(result)) => {
                        if let Some(p) = t.map.remove(&cookie) {
                            drop(t);
                            let _ = p.done.send(result);
                        }
                    }
                }
            }
        }
    }
}
