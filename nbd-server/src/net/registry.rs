//! Every live connection of a server, for connection limits.
//!
//! Limits apply globally, per listener and per export. When one is reached
//! the longest-idle connection in its scope is closed to make room: idle
//! means nothing in flight and no reply queued, and connections still in
//! the handshake count as idle since their last byte. If nothing in scope
//! is idle, the newcomer is refused instead. So a flood of idle
//! connections on one port can neither starve another port nor lock out
//! new clients on the same port.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Which limit a connection was refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("too many connections on this listener, none idle")]
    Listener,
    #[error("too many connections to this export, none idle")]
    Export,
    #[error("too many connections, none idle")]
    Global,
}

/// The limits, as configured on the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub global: usize,
    pub per_listener: usize,
    pub per_export: usize,
}

/// Listener id for streams handed over by [`crate::Server::serve_connection`]
/// (no per-listener limit applies to them).
pub(crate) const NO_LISTENER: u64 = 0;

/// One connection as the registry and its own task see it.
#[derive(Debug)]
pub(crate) struct ConnEntry {
    id: u64,
    listener: u64,
    export: Mutex<Option<String>>,
    /// Milliseconds since the registry's epoch of the last byte in the
    /// handshake, or of the last request after it.
    last_activity_ms: AtomicU64,
    /// Requests in flight plus replies queued.
    busy: AtomicUsize,
    /// Fires when the connection is evicted.
    cancel: CancellationToken,
    epoch: Instant,
}

impl ConnEntry {
    /// Record activity now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Record how much the connection has in flight.
    pub fn set_busy(&self, n: usize) {
        self.busy.store(n, Ordering::Relaxed);
    }

    /// Fires when the registry closes this connection to make room.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    fn idle_since(&self) -> Option<u64> {
        (self.busy.load(Ordering::Relaxed) == 0)
            .then(|| self.last_activity_ms.load(Ordering::Relaxed))
    }

    fn export_is(&self, name: &str) -> bool {
        self.export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(name)
    }
}

/// The registry. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ConnRegistry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: ConnLimits,
    conns: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    next_id: AtomicU64,
    next_listener: AtomicU64,
    epoch: Instant,
}

/// Membership of one connection; dropping it leaves the registry.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    registry: ConnRegistry,
    entry: Arc<ConnEntry>,
}

impl ConnGuard {
    pub fn entry(&self) -> &Arc<ConnEntry> {
        &self.entry
    }

    /// The connection chose `export`: apply the per-export limit.
    pub fn assign_export(&self, export: &str) -> Result<(), Refused> {
        let reg = &self.registry.inner;
        let mut conns = reg.conns.lock().unwrap_or_else(|e| e.into_inner());
        let count = conns
            .values()
            .filter(|c| c.id != self.entry.id && c.export_is(export))
            .count();
        if count >= reg.limits.per_export.max(1) {
            evict_one(&mut conns, |c| c.id != self.entry.id && c.export_is(export))
                .ok_or(Refused::Export)?;
        }
        *self.entry.export.lock().unwrap_or_else(|e| e.into_inner()) = Some(export.to_owned());
        Ok(())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.entry.id);
    }
}

/// Close the longest-idle connection matching `scope`; `None` if none is idle.
fn evict_one(
    conns: &mut HashMap<u64, Arc<ConnEntry>>,
    scope: impl Fn(&ConnEntry) -> bool,
) -> Option<()> {
    let victim = conns
        .values()
        .filter(|c| scope(c))
        .filter_map(|c| c.idle_since().map(|t| (t, c.id)))
        .min()?
        .1;
    let entry = conns.remove(&victim)?;
    tracing::debug!(
        conn = victim,
        "closing the longest-idle connection to make room"
    );
    entry.cancel.cancel();
    Some(())
}

impl ConnRegistry {
    pub fn new(limits: ConnLimits) -> Self {
        ConnRegistry {
            inner: Arc::new(Inner {
                limits,
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                next_listener: AtomicU64::new(NO_LISTENER + 1),
                epoch: Instant::now(),
            }),
        }
    }

    /// An id for a new listener.
    pub fn listener_id(&self) -> u64 {
        self.inner.next_listener.fetch_add(1, Ordering::Relaxed)
    }

    /// Admit a new connection on `listener`, closing idle ones if a limit
    /// is reached.
    pub fn admit(&self, listener: u64) -> Result<ConnGuard, Refused> {
        let reg = &self.inner;
        let mut conns = reg.conns.lock().unwrap_or_else(|e| e.into_inner());
        if listener != NO_LISTENER {
            let on_listener = conns.values().filter(|c| c.listener == listener).count();
            if on_listener >= reg.limits.per_listener.max(1) {
                evict_one(&mut conns, |c| c.listener == listener).ok_or(Refused::Listener)?;
            }
        }
        if conns.len() >= reg.limits.global.max(1) {
            evict_one(&mut conns, |_| true).ok_or(Refused::Global)?;
        }
        let id = reg.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ConnEntry {
            id,
            listener,
            export: Mutex::new(None),
            last_activity_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            epoch: reg.epoch,
        });
        entry.touch();
        conns.insert(id, Arc::clone(&entry));
        Ok(ConnGuard {
            registry: self.clone(),
            entry,
        })
    }

    /// Live connections.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// How often a connection checks its idle and stall deadlines: often enough
/// to act within a quarter of the shortest one, rarely enough to cost
/// nothing for thousands of idle connections.
pub(crate) fn check_period(timeouts: &[Duration]) -> Duration {
    timeouts
        .iter()
        .filter(|t| !t.is_zero())
        .min()
        .map_or(Duration::from_secs(3600), |t| *t / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(global: usize, per_listener: usize, per_export: usize) -> ConnRegistry {
        ConnRegistry::new(ConnLimits {
            global,
            per_listener,
            per_export,
        })
    }

    fn set_idle(c: &ConnGuard, ms: u64) {
        c.entry.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    #[test]
    fn listener_limit_evicts_the_longest_idle_on_that_listener_only() {
        let r = reg(100, 2, 100);
        let (l1, l2) = (r.listener_id(), r.listener_id());
        let other = r.admit(l2).unwrap();
        set_idle(&other, 0);
        let a = r.admit(l1).unwrap();
        let b = r.admit(l1).unwrap();
        set_idle(&a, 20);
        set_idle(&b, 10);
        let c = r.admit(l1).unwrap();
        assert!(
            b.entry.cancel.is_cancelled(),
            "oldest idle on l1 not evicted"
        );
        assert!(!a.entry.cancel.is_cancelled());
        assert!(!other.entry.cancel.is_cancelled(), "other listener touched");
        assert_eq!(r.len(), 3);
        // Busy connections are never evicted: refuse instead.
        a.entry.set_busy(1);
        c.entry.set_busy(2);
        assert_eq!(r.admit(l1).unwrap_err(), Refused::Listener);
        drop((a, b, c, other));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn global_and_export_limits() {
        let r = reg(2, 10, 1);
        let l = r.listener_id();
        let a = r.admit(l).unwrap();
        let b = r.admit(l).unwrap();
        set_idle(&a, 5);
        set_idle(&b, 50);
        let c = r.admit(l).unwrap();
        assert!(a.entry.cancel.is_cancelled());
        b.assign_export("x").unwrap();
        b.entry.set_busy(1);
        assert_eq!(c.assign_export("x").unwrap_err(), Refused::Export);
        b.entry.set_busy(0);
        c.assign_export("x").unwrap();
        assert!(b.entry.cancel.is_cancelled());
    }

    #[test]
    fn check_period_follows_the_shortest_timeout() {
        let p = check_period(&[Duration::from_secs(60), Duration::ZERO]);
        assert_eq!(p, Duration::from_secs(15));
        let p = check_period(&[Duration::from_millis(400), Duration::from_secs(3600)]);
        assert_eq!(p, Duration::from_millis(100));
        assert_eq!(check_period(&[]), Duration::from_secs(15));
    }
}
