//! Several connections to one export, used as one: requests are spread
//! round-robin over the connections, a FLUSH goes to every connection.
//!
//! Opened only when the server advertises `CAN_MULTI_CONN`: the spec then
//! promises that a flush on one connection covers the writes completed on
//! all of them, so spreading writes cannot lose durability. Without it a
//! pool of one connection is returned and nothing changes.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use nbd_server::proto::consts::tx_flags;
use nbd_server::ReadChunk;

use crate::client::{Client, ZeroOptions};
use crate::error::ClientError;
use crate::handshake::{ConnectOptions, ExportInfo};
use crate::reply::Extent;

/// One export over up to N connections.
#[derive(Debug)]
pub struct MultiConn {
    clients: Vec<Client>,
    next: AtomicUsize,
}

impl MultiConn {
    /// Connect once; if the server allows multi-conn, open up to `n - 1`
    /// more connections with the same options (a failure of those is an
    /// error: the caller asked for them).
    pub async fn connect(
        host: &str,
        port: u16,
        opts: &ConnectOptions,
        n: usize,
    ) -> Result<MultiConn, ClientError> {
        let first = Client::connect_host(host, port, opts).await?;
        let mut clients = vec![first];
        if clients[0].info().flags & tx_flags::CAN_MULTI_CONN != 0 {
            let more = (1..n.max(1)).map(|_| Client::connect_host(host, port, opts));
            clients.extend(futures_util::future::try_join_all(more).await?);
        }
        Ok(MultiConn {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.clients.len()
    }

    /// What the first handshake settled (every connection negotiated the
    /// same export).
    pub fn info(&self) -> &ExportInfo {
        self.clients[0].info()
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.clients[0].size()
    }

    /// The connection for the next request.
    pub fn pick(&self) -> &Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    /// READ on the next connection.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, ClientError> {
        self.pick().read(offset, len).await
    }

    /// WRITE on the next connection.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.pick().write(offset, data, fua).await
    }

    /// WRITE_ZEROES on the next connection.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        opts: ZeroOptions,
    ) -> Result<(), ClientError> {
        self.pick().write_zeroes(offset, len, opts).await
    }

    /// TRIM on the next connection.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.pick().trim(offset, len, fua).await
    }

    /// BLOCK_STATUS on the next connection.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ClientError> {
        self.pick().block_status(offset, len).await
    }

    /// FLUSH on every connection (one would do under multi-conn; all is
    /// cheap and does not depend on the server keeping its promise).
    pub async fn flush(&self) -> Result<(), ClientError> {
        futures_util::future::try_join_all(self.clients.iter().map(Client::flush)).await?;
        Ok(())
    }

    /// Disconnect every connection.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        futures_util::future::try_join_all(self.clients.iter().map(Client::disconnect)).await?;
        Ok(())
    }
}
