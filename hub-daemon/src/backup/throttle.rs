//! Rate limit on verification reads, so verifying old restore points does
//! not take the disk bandwidth a running backup needs.
//!
//! One [`Throttle`] is shared by every verification of the daemon (two
//! concurrent verifications share one budget, they do not double it). Its
//! rate is `verify_rate` while no backup runs and the lower
//! `verify_rate_during_backup` while any does, looked up at every read, so a
//! backup starting mid-verification slows it at once. The bucket is a
//! virtual clock (GCRA): each read books `bytes / rate` of time after the
//! previous booking and waits until its slot starts; up to [`BURST`] of
//! unused time may be caught up after a pause, no more.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_server::{
    BackendError, BackendErrorKind, BlockBackend, Caps, Extent, ReadChunk, ZeroFlags,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Unused budget a verification may catch up after a pause.
const BURST: Duration = Duration::from_millis(50);

/// Whether a backup is running now.
pub(crate) type BusyProbe = Box<dyn Fn() -> bool + Send + Sync>;

/// The shared verification read budget.
pub(crate) struct Throttle {
    /// Bytes/s with no backup running (0 = unlimited).
    idle_rate: u64,
    /// Bytes/s while a backup runs (0 = unlimited).
    busy_rate: u64,
    busy: BusyProbe,
    /// When the next read may start (the end of the last booking).
    next: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("idle_rate", &self.idle_rate)
            .field("busy_rate", &self.busy_rate)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    /// A budget of `idle_rate` bytes/s, `busy_rate` while `busy()`.
    pub(crate) fn new(idle_rate: u64, busy_rate: u64, busy: BusyProbe) -> Throttle {
        Throttle {
            idle_rate,
            busy_rate,
            busy,
            next: std::sync::Mutex::new(None),
        }
    }

    /// The rate that applies now (0 = unlimited).
    fn rate(&self) -> u64 {
        if (self.busy)() {
            self.busy_rate
        } else {
            self.idle_rate
        }
    }

    /// Book `bytes` and return when they may be read.
    fn book(&self, bytes: u64, now: Instant) -> Option<Instant> {
        let rate = self.rate();
        if rate == 0 {
            return None;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = next.map_or(now, |n| n.max(earliest));
        *next = Some(start + cost);
        Some(start)
    }

    /// Wait until `bytes` more may be read.
    pub(crate) async fn take(&self, bytes: u64) {
        if let Some(at) = self.book(bytes, Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// A restore point as verification reads it: every read waits for the
/// throttle, and fails once `stop` is cancelled (the verification was
/// abandoned).
#[derive(Debug)]
pub(crate) struct Throttled {
    inner: Arc<dyn BlockBackend>,
    throttle: Arc<Throttle>,
    stop: CancellationToken,
}

impl Throttled {
    /// Wrap `inner`.
    pub(crate) fn wrap(
        inner: Arc<dyn BlockBackend>,
        throttle: Arc<Throttle>,
        stop: CancellationToken,
    ) -> Arc<dyn BlockBackend> {
        Arc::new(Throttled {
            inner,
            throttle,
            stop,
        })
    }
}

#[async_trait]
impl BlockBackend for Throttled {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, BackendError> {
        tokio::select! {
            () = self.throttle.take(u64::from(len)) => {}
            () = self.stop.cancelled() => {}
        }
        if self.stop.is_cancelled() {
            return Err(BackendError::new(BackendErrorKind::Shutdown, "read")
                .with_message("verification abandoned"));
        }
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackendError> {
        self.inner.write(offset, data).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        self.inner.write_zeroes(offset, len, flags).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, len).await
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush().await
    }

    // Metadata only (a few bytes per cluster): not charged.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.inner.block_status(offset, len).await
    }

    async fn block_status_first(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.inner.block_status_first(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The bookings themselves (no sleeping): back to back at the rate,
    /// the busy rate as soon as a backup runs, only `BURST` caught up
    /// after a pause, nothing booked when unlimited.
    #[test]
    fn bookings_follow_the_rate_that_applies() {
        let busy = Arc::new(AtomicBool::new(false));
        let b2 = Arc::clone(&busy);
        let t = Throttle::new(
            100 << 20,
            10 << 20,
            Box::new(move || b2.load(Ordering::SeqCst)),
        );
        let t0 = Instant::now() + Duration::from_secs(10);
        assert_eq!(t.book(1 << 20, t0), Some(t0));
        // 1 MiB at 100 MiB/s is 10 ms.
        assert_eq!(t.book(1 << 20, t0), Some(t0 + Duration::from_millis(10)));
        busy.store(true, Ordering::SeqCst);
        // Booked after the previous slot; 1 MiB at 10 MiB/s is 100 ms.
        assert_eq!(t.book(1 << 20, t0), Some(t0 + Duration::from_millis(20)));
        assert_eq!(t.book(1 << 20, t0), Some(t0 + Duration::from_millis(120)));
        // After a long pause only BURST is caught up.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(t.book(1 << 20, later), Some(later - BURST));
        let u = Throttle::new(0, 0, Box::new(|| false));
        assert_eq!(u.book(1 << 30, t0), None);
    }
}
