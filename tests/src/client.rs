//! A minimal blocking NBD client for tests that need exact control over
//! what was acknowledged (crash tests): fixed newstyle, `GO`, simple
//! replies, one request at a time unless the caller pipelines on purpose.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// A connected client in transmission.
#[derive(Debug)]
pub struct Client {
    s: TcpStream,
    /// Export size.
    pub size: u64,
    next_cookie: u64,
}

fn err(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl Client {
    /// Connect and `GO` into `export`.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if &g[..8] != b"NBDMAGIC" {
            return Err(err("bad greeting".into()));
        }
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[..8].try_into().map_err(|_| err("short".into()))?)
                != REPLY_MAGIC
            {
                return Err(err("bad option reply magic".into()));
            }
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut p = vec![0u8; len];
            s.read_exact(&mut p)?;
            match kind {
                1 => break,
                3 if p.len() >= 12 && p[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(
                        p[2..10].try_into().map_err(|_| err("short".into()))?,
                    ));
                }
                3 => {}
                k => {
                    return Err(err(format!(
                        "GO failed: reply type {k:#x}: {}",
                        String::from_utf8_lossy(&p)
                    )))
                }
            }
        }
        Ok(Client {
            s,
            size: size.ok_or_else(|| err("no export info".into()))?,
            next_cookie: 1,
        })
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut v = Vec::with_capacity(28 + payload.len());
        v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        self.s.write_all(&v)?;
        Ok(cookie)
    }

    /// Wait for the reply to `cookie` (requests are answered in order here
    /// because only one is outstanding); `Ok(errno)`.
    fn reply(&mut self, cookie: u64) -> io::Result<u32> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if h[..4] != [0x67, 0x44, 0x66, 0x98] {
            return Err(err("bad reply magic".into()));
        }
        let got = u64::from_be_bytes(h[8..16].try_into().map_err(|_| err("short".into()))?);
        if got != cookie {
            return Err(err(format!("reply for cookie {got}, expected {cookie}")));
        }
        Ok(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))
    }

    fn check(errno: u32, what: &str) -> io::Result<()> {
        if errno == 0 {
            Ok(())
        } else {
            Err(err(format!("{what} failed with NBD error {errno}")))
        }
    }

    /// Write and wait for the acknowledgement.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let c = self.send(1, 0, offset, data.len() as u32, data)?;
        Self::check(self.reply(c)?, "write")
    }

    /// Send a write without waiting for its reply (the crash test kills the
    /// server with this request in flight).
    pub fn write_unacknowledged(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.send(1, 0, offset, data.len() as u32, data).map(|_| ())
    }

    /// Send a read without waiting for (or ever reading) its reply: a
    /// client that pipelines and does not read, for the memory tests.
    pub fn read_unacknowledged(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.send(0, 0, offset, len, &[]).map(|_| ())
    }

    /// WRITE_ZEROES and wait.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<()> {
        let c = self.send(6, 0, offset, len, &[])?;
        Self::check(self.reply(c)?, "write_zeroes")
    }

    /// FLUSH and wait: everything acknowledged before is now durable.
    pub fn flush(&mut self) -> io::Result<()> {
        let c = self.send(3, 0, 0, 0, &[])?;
        Self::check(self.reply(c)?, "flush")
    }

    /// Read `len` bytes.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let c = self.send(0, 0, offset, len, &[])?;
        Self::check(self.reply(c)?, "read")?;
        let mut v = vec![0u8; len as usize];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// Soft disconnect.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(2, 0, 0, 0, &[]).map(|_| ())
    }
}
