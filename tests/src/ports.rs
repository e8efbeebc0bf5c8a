//! Loopback ports for servers that must be told a port number up front
//! (`weed`, qemu-nbd, nbdkit, a hub's shared NBD port), where binding port 0
//! ourselves is not possible.
//!
//! Why not "bind port 0, read the number, close": that port comes from the
//! kernel's ephemeral range, the same range every outgoing connection takes
//! its local port from. Between our close and the server's bind, any client
//! socket in the machine (a `weed` component dialling another over gRPC, a
//! parallel test) can take it, and the server dies with "address already in
//! use" (CI saw exactly that). Ports are handed out below the ephemeral range
//! instead, where the kernel never assigns one on its own, each checked free
//! by binding it, and never twice in one process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many ports below the ephemeral range are used.
const SPAN: u32 = 8192;
/// Ports handed out are this far apart: a server that finds its port taken
/// may try the next few itself (`weed mini` takes port + 1), which must not
/// be the port just handed to its neighbour listener (CI saw exactly that).
const STRIDE: u32 = 16;

/// The kernel's ephemeral range start (32768 on a stock Linux).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&low: &u32| low > SPAN + 1024)
        .unwrap_or(32768)
}

/// A free loopback TCP port outside the ephemeral range, not returned before
/// by this process, 16 apart (a server that finds its port taken and moves
/// to the next one does not land on another server's port). Processes start
/// at different points (their pid), so two test binaries running at once
/// rarely try the same ports, and the bind check skips one that is taken.
pub fn loopback_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let base = ephemeral_low() - SPAN;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2654435761) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        // Every STRIDE-th port, then the ones next to them, and so on: all
        // SPAN ports before one comes round again.
        let k = u64::from(NEXT.fetch_add(1, Ordering::Relaxed)) * u64::from(STRIDE);
        let i = ((k + k / u64::from(SPAN)) % u64::from(SPAN)) as u32;
        let Ok(port) = u16::try_from(base + i) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{}", base + SPAN);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..200).map(|_| loopback_port()).collect();
        // Apart, so a server's own "port + 1" fallback misses its neighbours.
        for w in ports.windows(2) {
            assert!(w[0].abs_diff(w[1]) >= STRIDE as u16, "{w:?}");
        }
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "a port handed out twice");
        for p in ports {
            assert!(u32::from(p) < low && u32::from(p) >= low - SPAN, "{p}");
        }
        // A port somebody holds is skipped.
        let held = TcpListener::bind(("127.0.0.1", loopback_port() + STRIDE as u16)).ok();
        let next = loopback_port();
        if let Some(h) = held {
            assert_ne!(Some(next), h.local_addr().ok().map(|a| a.port()));
        }
    }
}
