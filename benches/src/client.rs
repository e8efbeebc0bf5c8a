//! A pipelined NBD writer for the incremental workload: scattered extents
//! with many requests in flight, the same client for every server.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// One change.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// Write `len` bytes at `off`, taken from the payload buffer at `at`.
    Data { off: u64, len: u32, at: usize },
    /// Zero `len` bytes at `off`.
    Zero { off: u64, len: u32 },
}

async fn go(addr: SocketAddr, name: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await?;
    s.write_all(&3u32.to_be_bytes()).await?;
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&((name.len() + 6) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).await?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await?;
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await?;
        match kind {
            1 => return Ok(s),
            3 => {}
            k => bail!("GO refused: {k:#x}"),
        }
    }
}

fn header(kind: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&off.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Apply `changes` (data taken from `payload`) with `depth` requests in
/// flight, then FLUSH and disconnect.
pub async fn apply(
    uri: &str,
    payload: Arc<Vec<u8>>,
    changes: &[Change],
    depth: usize,
) -> anyhow::Result<()> {
    let rest = uri.strip_prefix("nbd://").context("nbd:// URI")?;
    let (addr, name) = rest.split_once('/').context("export name")?;
    let addr: SocketAddr = addr.parse()?;
    let s = go(addr, name).await?;
    let (mut rd, mut wr) = s.into_split();
    let slots = Arc::new(Semaphore::new(depth));
    let total = changes.len() + 1;
    let slots2 = Arc::clone(&slots);
    let reader = tokio::spawn(async move {
        for _ in 0..total {
            let mut r = [0u8; 16];
            rd.read_exact(&mut r).await?;
            let err = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
            if err != 0 {
                bail!(
                    "request {} failed with NBD error {err}",
                    u64::from_be_bytes(r[8..16].try_into()?)
                );
            }
            slots2.add_permits(1);
        }
        anyhow::Ok(())
    });
    for (i, c) in changes.iter().enumerate() {
        slots.acquire().await?.forget();
        match *c {
            Change::Data { off, len, at } => {
                wr.write_all(&header(1, i as u64, off, len)).await?;
                wr.write_all(&payload[at..at + len as usize]).await?;
            }
            Change::Zero { off, len } => wr.write_all(&header(6, i as u64, off, len)).await?,
        }
    }
    // FLUSH only after every write is acknowledged (it covers replied writes).
    let _ = slots.acquire_many(depth as u32).await?;
    wr.write_all(&header(3, u64::MAX, 0, 0)).await?;
    reader.await??;
    wr.write_all(&header(2, 0, 0, 0)).await?;
    Ok(())
}
