//! NBD port allocation for per-disk exports.
//!
//! A port is handed out together with its bound listener ("bind, then
//! report"), so a port another process grabbed is skipped instead of
//! failing later. Leases return their port when dropped; allocation is
//! all-or-nothing, so a backup never holds some of its ports.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use crate::config::PortRange;
use crate::error::{DaemonError, Result};

#[derive(Debug, Default)]
struct State {
    held: BTreeSet<u16>,
}

/// The pool of NBD ports.
#[derive(Debug, Clone)]
pub struct PortPool {
    state: Arc<Mutex<State>>,
    range: PortRange,
    bind: IpAddr,
}

/// A held port; released on drop.
#[derive(Debug)]
pub struct PortLease {
    state: Arc<Mutex<State>>,
    port: u16,
}

impl PortLease {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .remove(&self.port);
    }
}

impl PortPool {
    /// A pool over `range`, binding on `bind`.
    pub fn new(range: PortRange, bind: IpAddr) -> Self {
        PortPool {
            state: Arc::default(),
            range,
            bind,
        }
    }

    /// Ports held now.
    pub fn in_use(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .len()
    }

    /// Ports in the pool.
    pub fn capacity(&self) -> usize {
        self.range.capacity()
    }

    fn bind_std(&self, port: u16) -> Option<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(SocketAddr::new(self.bind, port)).ok()?;
        l.set_nonblocking(true).ok()?;
        Some(l)
    }

    /// Bind `n` ports, or none: `Unavailable` when the range cannot supply them.
    pub fn allocate(&self, n: usize) -> Result<Vec<(PortLease, TcpListener)>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut got: Vec<(u16, std::net::TcpListener)> = Vec::with_capacity(n);
        match self.range {
            PortRange::Range { first, last } => {
                for port in first..=last {
                    if got.len() == n {
                        break;
                    }
                    if st.held.contains(&port) {
                        continue;
                    }
                    // Taken by another process: skip it.
                    if let Some(l) = self.bind_std(port) {
                        got.push((port, l));
                    }
                }
            }
            PortRange::Ephemeral { capacity } => {
                while got.len() < n && st.held.len() + got.len() < capacity {
                    let l = self.bind_std(0).ok_or_else(|| {
                        DaemonError::Unavailable("cannot bind an NBD port".into())
                    })?;
                    let port = l
                        .local_addr()
                        .map_err(|e| DaemonError::io("NBD listener", e))?
                        .port();
                    got.push((port, l));
                }
            }
        }
        if got.len() < n {
            return Err(DaemonError::Unavailable(format!(
                "NBD port range exhausted: need {n} ports, {} free ({} of {} in use)",
                got.len(),
                st.held.len(),
                self.capacity()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for (port, l) in got {
            st.held.insert(port);
            let lease = PortLease {
                state: Arc::clone(&self.state),
                port,
            };
            let l = TcpListener::from_std(l).map_err(|e| DaemonError::io("NBD listener", e))?;
            out.push((lease, l));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[tokio::test]
    async fn ephemeral_pool_is_all_or_nothing_and_leases_return() {
        let pool = PortPool::new(
            PortRange::Ephemeral { capacity: 3 },
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        );
        let a = pool.allocate(2).unwrap();
        assert_eq!(pool.in_use(), 2);
        assert!(matches!(pool.allocate(2), Err(DaemonError::Unavailable(_))));
        assert_eq!(pool.in_use(), 2, "failed allocation holds nothing");
        drop(a);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.allocate(3).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn range_pool_skips_ports_taken_elsewhere() {
        // Find two adjacent free ports, occupy the first from "another process".
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let first = probe.local_addr().unwrap().port();
        drop(probe);
        let Some(last) = first.checked_add(2) else {
            return;
        };
        let squatter = std::net::TcpListener::bind(("127.0.0.1", first));
        let pool = PortPool::new(
            PortRange::Range { first, last },
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        );
        if let Ok(leases) = pool.allocate(1) {
            if squatter.is_ok() {
                assert_ne!(leases[0].0.port(), first);
            }
        }
    }
}
