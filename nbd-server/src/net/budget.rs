//! Memory budgets for buffered request and reply bytes.
//!
//! Two layers, both reserved from a request's header before its payload is
//! read or its READ is issued:
//! * per connection ([`ConnBudget`]): strict — the bytes a connection holds
//!   never exceed its limit, except that one request larger than the limit
//!   is admitted when the connection holds nothing else (so a maximum-size
//!   request always works);
//! * process-wide ([`MemoryBudget`]): a byte-counted semaphore shared by
//!   every connection of a server. A small slice of it is kept for
//!   connections that hold little, so clients that pipeline big requests
//!   and never read the replies cannot starve a well-behaved client until
//!   the reply-stall timeout closes them.
//!
//! A reservation is held from the header until the request's reply has been
//! written to the socket, so it covers the WRITE payload, the READ buffer
//! and the queued reply alike.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::proto::consts::{cmd, MAX_PAYLOAD};
use crate::proto::RequestHeader;

/// What a request costs beyond its data: the decoded header, the boxed
/// future running it and its reply header. Also bounds the number of
/// requests a connection can have in flight.
pub(crate) const REQUEST_OVERHEAD: u64 = 512;

/// The most one request can cost.
pub(crate) const MAX_REQUEST_COST: u64 = MAX_PAYLOAD as u64 + REQUEST_OVERHEAD;

/// A process-wide budget is never smaller than this, so a maximum-size
/// request always fits in it.
pub(crate) const MIN_PROCESS_BUDGET: u64 = 40 << 20;

/// A connection that would hold at most this much after admitting a
/// request may draw on the reserved slice of the process-wide budget.
const SMALL_HOLDING: u64 = 1 << 20;

/// Largest reserved slice of the process-wide budget.
const MAX_RESERVED: u64 = 64 << 20;

/// Bytes a request will hold, from its header alone: the WRITE payload or
/// the READ data (other commands carry none, or an extended-header payload
/// bounded by the decoder), plus [`REQUEST_OVERHEAD`].
pub(crate) fn request_cost(h: &RequestHeader, extended: bool) -> u64 {
    let data = if h.kind == cmd::READ {
        // An oversized READ is refused by validation; it never allocates.
        h.length.min(u64::from(MAX_PAYLOAD))
    } else {
        h.payload_len(extended).min(u64::from(MAX_PAYLOAD))
    };
    data + REQUEST_OVERHEAD
}

/// One connection's strict budget (plain counters: one task owns them).
#[derive(Debug)]
pub(crate) struct ConnBudget {
    limit: u64,
    used: u64,
}

impl ConnBudget {
    pub fn new(limit: u64) -> Self {
        ConnBudget {
            limit: limit.max(1),
            used: 0,
        }
    }

    /// Whether a request costing `cost` may be admitted now. A WRITE
    /// (`write`) only while the connection then holds at most half its
    /// limit: a backup stream is bound by the image writes, not by how
    /// much waits for them, so more queued payload only holds memory
    /// (once per connection of every disk being backed up). READs may fill
    /// it all: replies from the page cache are copied out on several
    /// threads, and restores read faster the more are in flight.
    pub fn admits(&self, cost: u64, write: bool) -> bool {
        let limit = if write { self.limit / 2 } else { self.limit };
        self.used == 0 || self.used.checked_add(cost).is_some_and(|t| t <= limit)
    }

    /// Whether admitting `cost` leaves the connection a small holder.
    pub fn is_small_after(&self, cost: u64) -> bool {
        self.used
            .checked_add(cost)
            .is_some_and(|t| t <= SMALL_HOLDING)
    }

    pub fn take(&mut self, n: u64) {
        self.used = self.used.saturating_add(n);
    }

    pub fn release(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }

    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used
    }
}

/// The process-wide budget, shared by every connection of a server.
#[derive(Debug, Clone)]
pub(crate) struct MemoryBudget {
    /// Any connection draws from here (FIFO, so big requests are not
    /// starved by small ones).
    bulk: Arc<Semaphore>,
    /// Only connections holding little draw from here.
    reserved: Arc<Semaphore>,
}

/// Bytes taken from the process-wide budget; dropping gives them back.
#[derive(Debug)]
pub(crate) struct Grant {
    _permit: OwnedSemaphorePermit,
}

impl MemoryBudget {
    /// A budget of `total` bytes (raised to [`MIN_PROCESS_BUDGET`], capped
    /// to what a semaphore can count).
    pub fn new(total: u64) -> Self {
        let max = Semaphore::MAX_PERMITS as u64;
        let total = total.clamp(MIN_PROCESS_BUDGET, max);
        let reserved = (total / 8).min(MAX_RESERVED);
        // total ≥ 40 MiB, so bulk ≥ 35 MiB > MAX_REQUEST_COST.
        let bulk = total - reserved;
        MemoryBudget {
            bulk: Arc::new(Semaphore::new(bulk as usize)),
            reserved: Arc::new(Semaphore::new(reserved as usize)),
        }
    }

    /// Bytes currently free (both pools).
    #[cfg(test)]
    pub fn available(&self) -> u64 {
        (self.bulk.available_permits() + self.reserved.available_permits()) as u64
    }

    /// Take `bytes` now if they are free (and nobody queues before us).
    pub fn try_acquire(&self, bytes: u64, small: bool) -> Option<Grant> {
        let n = u32::try_from(bytes.min(MAX_REQUEST_COST)).unwrap_or(u32::MAX);
        let p = Arc::clone(&self.bulk).try_acquire_many_owned(n).ok();
        let p = match p {
            Some(p) => Some(p),
            None if small => Arc::clone(&self.reserved).try_acquire_many_owned(n).ok(),
            None => None,
        };
        p.map(|p| Grant { _permit: p })
    }

    /// Wait for `bytes` (≤ [`MAX_REQUEST_COST`]). `small`: the caller
    /// holds little and may use the reserved slice. The future owns what it
    /// needs, so a caller can keep it across loop iterations and keep its
    /// place in the (FIFO) queue. A dropped wait takes nothing.
    pub fn acquire(&self, bytes: u64, small: bool) -> impl Future<Output = Grant> + Send + 'static {
        let n = u32::try_from(bytes.min(MAX_REQUEST_COST)).unwrap_or(u32::MAX);
        let (bulk, reserved) = (Arc::clone(&self.bulk), Arc::clone(&self.reserved));
        acquire(bulk, reserved, n, small)
    }
}

/// The wait itself: a small holder takes whichever pool has room first.
async fn acquire(bulk: Arc<Semaphore>, reserved: Arc<Semaphore>, n: u32, small: bool) -> Grant {
    let bulk = bulk.acquire_many_owned(n);
    let permit = if small {
        let reserved = reserved.acquire_many_owned(n);
        tokio::select! {
            biased;
            p = bulk => p,
            p = reserved => p,
        }
    } else {
        bulk.await
    };
    match permit {
        Ok(p) => Grant { _permit: p },
        // The semaphores are never closed.
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn connection_budget_is_strict_but_admits_one_oversized_request_alone() {
        let mut b = ConnBudget::new(10);
        assert!(b.admits(4, false));
        b.take(4);
        assert!(b.admits(6, false));
        b.take(6);
        assert!(!b.admits(1, false), "full budget admitted more");
        b.release(4);
        assert!(!b.admits(5, false));
        assert!(b.admits(4, false));
        b.release(6);
        assert_eq!(b.used(), 0);
        // Larger than the whole budget: only when nothing else is held.
        assert!(b.admits(100, false));
        assert!(b.admits(100, true));
        b.take(100);
        assert!(!b.admits(1, false));
        b.release(100);
        assert!(!b.admits(u64::MAX, false) || b.used() == 0);
        b.take(1);
        assert!(!b.admits(u64::MAX, false), "overflow admitted");
        assert!(!b.admits(u64::MAX, true), "overflow admitted");
        b.release(1);
        // WRITEs fill half of it.
        b.take(3);
        assert!(b.admits(2, true));
        assert!(!b.admits(3, true), "write past half the budget");
        assert!(b.admits(7, false));
    }

    #[test]
    fn cost_comes_from_the_header() {
        let h = |kind, length| RequestHeader {
            flags: 0,
            kind,
            cookie: 0,
            offset: 0,
            length,
        };
        assert_eq!(request_cost(&h(cmd::READ, 4096), false), 4096 + 512);
        assert_eq!(
            request_cost(&h(cmd::WRITE, 1 << 20), false),
            (1 << 20) + 512
        );
        assert_eq!(
            request_cost(&h(cmd::READ, 1 << 40), false),
            MAX_REQUEST_COST
        );
        assert_eq!(request_cost(&h(cmd::FLUSH, 0), false), 512);
        assert_eq!(request_cost(&h(cmd::TRIM, 1 << 40), false), 512);
    }

    #[tokio::test]
    async fn process_budget_blocks_until_grants_return_and_keeps_a_reserve() {
        let total = 64u64 << 20;
        let b = MemoryBudget::new(total);
        let big1 = b.acquire(MAX_REQUEST_COST, false).await;
        // Bulk is 56 MiB: a second maximum request must wait.
        let mut second = Box::pin(b.acquire(MAX_REQUEST_COST, false));
        assert!((&mut second).now_or_never().is_none());
        // A small holder still gets bytes from the reserved slice; a big
        // one cannot jump the queue.
        assert!(b.try_acquire(MAX_REQUEST_COST, false).is_none());
        let small = b.acquire(4096, true).now_or_never();
        assert!(small.is_some(), "small request starved by big ones");
        assert!(b.try_acquire(4096, true).is_some());
        drop(big1);
        let big2 = second.await;
        assert_eq!(b.available(), total - MAX_REQUEST_COST - 4096);
        drop((big2, small));
        assert_eq!(b.available(), total);
    }

    #[test]
    fn process_budget_has_a_floor() {
        let b = MemoryBudget::new(1);
        assert_eq!(b.available(), MIN_PROCESS_BUDGET);
    }
}
