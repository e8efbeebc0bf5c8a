//! Dedicated I/O threads for imago.
//!
//! imago's futures are not `Send`, and its file I/O blocks the calling
//! thread (plain `preadv`/`pwritev` inside `async fn`). Polling them on
//! tokio's worker threads would stall the network side, so every image
//! operation runs here instead: N OS threads, each a current-thread runtime
//! with a `LocalSet`. A job is a `Send` closure that builds its (non-`Send`)
//! future on the I/O thread; many jobs interleave on one thread wherever
//! imago awaits a lock, and jobs are spread round-robin so one image gets
//! the parallelism of all threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce() -> LocalFuture + Send>;

/// A pool of I/O threads. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IoPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    /// Jobs queued or running per thread.
    load: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
}

/// A job's home thread takes it unless this many are already waiting there;
/// then the least-loaded thread does. An image's jobs thus batch on a thread
/// that is awake anyway (no wake-up per request) and spread out only under
/// real load.
const SPILL_DEPTH: usize = 4;

/// The pool is gone (only after [`IoPool`] was dropped everywhere) or a job
/// panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("I/O thread unavailable")]
pub struct PoolGone;

impl IoPool {
    /// Start `threads` I/O threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let n = threads.max(1);
        let mut senders = Vec::with_capacity(n);
        let mut load = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let l = Arc::new(AtomicUsize::new(0));
            let l2 = Arc::clone(&l);
            std::thread::Builder::new()
                .name(format!("qcow-io-{i}"))
                .stack_size(4 << 20)
                .spawn(move || run_thread(rt, rx, l2))?;
            senders.push(tx);
            load.push(l);
        }
        Ok(IoPool {
            inner: Arc::new(Inner {
                senders,
                load,
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// The process-wide default pool, started on first use: 8 threads, or
    /// `QCOW_IO_THREADS`.
    pub fn global() -> std::io::Result<IoPool> {
        static GLOBAL: OnceLock<IoPool> = OnceLock::new();
        if let Some(p) = GLOBAL.get() {
            return Ok(p.clone());
        }
        let pool = IoPool::new(default_threads())?;
        Ok(GLOBAL.get_or_init(|| pool).clone())
    }

    /// A home-thread hint for a new user of the pool (say, an image):
    /// spreads users over the threads.
    pub fn affinity(&self) -> usize {
        self.inner.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Run `make()`'s future on an I/O thread (preferably `home`'s) and wait
    /// for its output.
    pub async fn run<F, Fut, T>(&self, home: usize, make: F) -> Result<T, PoolGone>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.spawn(home, move || async move {
            let out = make().await;
            let _ = tx.send(out);
        })?;
        rx.await.map_err(|_| PoolGone)
    }

    /// Start `make()`'s future on an I/O thread without waiting for it.
    pub fn spawn<F, Fut>(&self, home: usize, make: F) -> Result<(), PoolGone>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        let i = self.pick(home);
        self.inner.load[i].fetch_add(1, Ordering::Relaxed);
        self.inner.senders[i].send(job).map_err(|_| {
            self.inner.load[i].fetch_sub(1, Ordering::Relaxed);
            PoolGone
        })
    }

    fn pick(&self, home: usize) -> usize {
        let n = self.inner.senders.len();
        let home = home % n;
        if self.inner.load[home].load(Ordering::Relaxed) < SPILL_DEPTH {
            return home;
        }
        (0..n)
            .min_by_key(|i| self.inner.load[*i].load(Ordering::Relaxed))
            .unwrap_or(home)
    }
}

fn default_threads() -> usize {
    std::env::var("QCOW_IO_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(8)
}

fn run_thread(
    rt: tokio::runtime::Runtime,
    mut rx: mpsc::UnboundedReceiver<Job>,
    load: Arc<AtomicUsize>,
) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        while let Some(job) = rx.recv().await {
            let fut = job();
            let load = Arc::clone(&load);
            tokio::task::spawn_local(async move {
                // Decrement even if the job panics (the guard drops on unwind).
                struct Done(Arc<AtomicUsize>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                let _done = Done(load);
                fut.await
            });
        }
    });
    // Let jobs already started finish (their callers are waiting).
    rt.block_on(local);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[tokio::test]
    async fn runs_non_send_futures_and_returns_results() {
        let pool = IoPool::new(2).unwrap();
        let v = pool
            .run(0, || async {
                // Rc is !Send: this future could not run on tokio's workers.
                let rc = Rc::new(21);
                tokio::task::yield_now().await;
                *rc * 2
            })
            .await
            .unwrap();
        assert_eq!(v, 42);
    }

    #[tokio::test]
    async fn many_jobs_in_parallel() {
        let pool = IoPool::new(3).unwrap();
        let mut hs = Vec::new();
        for i in 0..100u64 {
            let p = pool.clone();
            hs.push(tokio::spawn(async move {
                p.run(i as usize, move || async move { i * i })
                    .await
                    .unwrap()
            }));
        }
        let mut sum = 0;
        for h in hs {
            sum += h.await.unwrap();
        }
        assert_eq!(sum, (0..100u64).map(|i| i * i).sum::<u64>());
    }

    #[tokio::test]
    async fn a_panicking_job_reports_pool_gone_and_the_thread_survives() {
        let pool = IoPool::new(1).unwrap();
        let r: Result<(), PoolGone> = pool.run(0, || async { panic!("boom") }).await;
        assert_eq!(r, Err(PoolGone));
        assert_eq!(pool.run(0, || async { 7 }).await, Ok(7));
        // The load guard drops on the I/O thread right after the result is
        // sent, so let that thread finish before looking.
        for _ in 0..100_000 {
            if pool.inner.load[0].load(Ordering::Relaxed) == 0 {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(
            pool.inner.load[0].load(Ordering::Relaxed),
            0,
            "load accounting survives a panic"
        );
    }
}
