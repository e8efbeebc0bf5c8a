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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
    /// Jobs queued or running, and when each thread last showed progress.
    threads: Vec<Arc<ThreadState>>,
    next: AtomicUsize,
    /// The origin of [`ThreadState::progress`] stamps.
    epoch: Instant,
}

/// What the picker knows of one I/O thread.
#[derive(Debug, Default)]
struct ThreadState {
    /// Jobs queued or running.
    load: AtomicUsize,
    /// Microseconds after the pool's epoch at which the thread last finished
    /// a job or went from idle to busy.
    progress: AtomicU64,
}

/// A job's home thread takes it unless this many are already waiting there.
/// Past that, a job that moves at least [`COPY_BYTES`] goes to an idle
/// thread if there is one (copying is work other cores can share, but a
/// thread that is another image's home is left to that image), and a
/// smaller job leaves only a stalled home thread (see [`STALL`]). An image's
/// jobs thus batch on a thread that is awake anyway (no wake-up per
/// request).
const SPILL_DEPTH: usize = 4;

/// Jobs of at least this many bytes are bound by copying them (a 256 KiB
/// read takes tens of microseconds from the page cache), so a deep queue of
/// them is spread over idle threads: sequential reads of a restore point
/// were 12–22 % slower on the home thread alone.
const COPY_BYTES: usize = 64 << 10;

/// A home thread that finished nothing for this long is blocked in a
/// syscall (a cold read, an fsync, writeback throttling): only then do its
/// small jobs spill to other threads. Spilling small jobs from a queue that
/// is moving does not make it faster: 4k random writes on a fresh image ran
/// at 52k IOPS spread over 8 threads (each woken per request, all
/// contending for the image's locks) against 80k on the home thread alone.
const STALL: Duration = Duration::from_micros(200);

/// The pool is gone (only after [`IoPool`] was dropped everywhere) or a job
/// panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("I/O thread unavailable")]
pub struct PoolGone;

impl IoPool {
    /// Start `threads` I/O threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let n = threads.max(1);
        let epoch = Instant::now();
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let state = Arc::new(ThreadState::default());
            let state2 = Arc::clone(&state);
            std::thread::Builder::new()
                .name(format!("qcow-io-{i}"))
                .stack_size(4 << 20)
                .spawn(move || run_thread(rt, rx, state2, epoch))?;
            senders.push(tx);
            threads.push(state);
        }
        Ok(IoPool {
            inner: Arc::new(Inner {
                senders,
                threads,
                next: AtomicUsize::new(0),
                epoch,
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
        self.run_sized(home, 0, make).await
    }

    /// [`IoPool::run`] for a job that reads or writes `bytes` of data (it
    /// decides how readily the job leaves a busy home thread).
    pub async fn run_sized<F, Fut, T>(
        &self,
        home: usize,
        bytes: usize,
        make: F,
    ) -> Result<T, PoolGone>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(home, bytes, move || async move {
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
        self.submit(home, 0, make)
    }

    fn submit<F, Fut>(&self, home: usize, bytes: usize, make: F) -> Result<(), PoolGone>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        let i = self.pick(home, bytes);
        let t = &self.inner.threads[i];
        if t.load.fetch_add(1, Ordering::Relaxed) == 0 {
            // Idle until now: its stall clock starts here, not at its
            // last job long ago.
            t.progress
                .store(micros_since(self.inner.epoch), Ordering::Relaxed);
        }
        self.inner.senders[i].send(job).map_err(|_| {
            t.load.fetch_sub(1, Ordering::Relaxed);
            PoolGone
        })
    }

    fn pick(&self, home: usize, bytes: usize) -> usize {
        let n = self.inner.senders.len();
        let home = home % n;
        let t = &self.inner.threads[home];
        if t.load.load(Ordering::Relaxed) < SPILL_DEPTH {
            return home;
        }
        if bytes >= COPY_BYTES {
            return (0..n)
                .find(|i| self.inner.threads[*i].load.load(Ordering::Relaxed) == 0)
                .unwrap_or(home);
        }
        let idle_for =
            micros_since(self.inner.epoch).saturating_sub(t.progress.load(Ordering::Relaxed));
        if idle_for < STALL.as_micros() as u64 {
            return home;
        }
        (0..n)
            .min_by_key(|i| self.inner.threads[*i].load.load(Ordering::Relaxed))
            .unwrap_or(home)
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
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
    state: Arc<ThreadState>,
    epoch: Instant,
) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        while let Some(job) = rx.recv().await {
            let fut = job();
            let state = Arc::clone(&state);
            tokio::task::spawn_local(async move {
                // Decrement even if the job panics (the guard drops on unwind).
                struct Done(Arc<ThreadState>, Instant);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0
                            .progress
                            .store(micros_since(self.1), Ordering::Relaxed);
                        self.0.load.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                let _done = Done(state, epoch);
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

    /// A job blocked in a syscall must not hold up the jobs queued behind
    /// it: once the home thread has shown no progress for [`STALL`], new
    /// jobs go to another thread. (Without the spill this test hangs: the
    /// blocked job is released only by a job that ran elsewhere.)
    #[tokio::test]
    async fn a_stalled_home_thread_spills_to_another() {
        let pool = IoPool::new(2).unwrap();
        let (release_tx, blocked) = block_thread_0(&pool).await;
        let mut home = None;
        for _ in 0..10_000 {
            // Queued behind the blocked job until the picker sees the stall.
            let h = pool.run(0, || async {
                std::thread::current().name().map(String::from)
            });
            if let Ok(ran_on) = tokio::time::timeout(Duration::from_millis(1), h).await {
                home = Some(ran_on.unwrap());
                break;
            }
        }
        let home = home.expect("no job got past the blocked one in 10 s");
        assert_eq!(
            home.as_deref(),
            Some("qcow-io-1"),
            "ran on the other thread"
        );
        release_tx.send(()).unwrap();
        assert_eq!(
            blocked.await.unwrap().unwrap().as_deref(),
            Some("qcow-io-0"),
            "the blocked job ran at home"
        );
    }

    /// Jobs that copy data leave a deep home queue for an idle thread at
    /// once, stalled or not: other cores can share the copying.
    #[tokio::test]
    async fn a_big_job_spreads_from_a_deep_queue_without_waiting() {
        let pool = IoPool::new(2).unwrap();
        let (release_tx, blocked) = block_thread_0(&pool).await;
        // Three more small jobs wait at home: its queue is SPILL_DEPTH deep.
        for _ in 1..SPILL_DEPTH {
            pool.spawn(0, || async {}).unwrap();
        }
        let big = pool.run_sized(0, COPY_BYTES, || async {
            std::thread::current().name().map(String::from)
        });
        let ran_on = tokio::time::timeout(Duration::from_secs(10), big)
            .await
            .expect("the big job waited behind the blocked one")
            .unwrap();
        assert_eq!(ran_on.as_deref(), Some("qcow-io-1"));
        release_tx.send(()).unwrap();
        blocked.await.unwrap().unwrap();
    }

    /// Occupy thread 0 with a job that blocks it, as a cold pread or an
    /// fsync would, until the returned sender sends; the handle yields the
    /// name of the thread the job ran on.
    async fn block_thread_0(
        pool: &IoPool,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<Option<String>, PoolGone>>,
    ) {
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let p = pool.clone();
        let blocked = tokio::spawn(async move {
            p.run(0, move || async move {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                std::thread::current().name().map(String::from)
            })
            .await
        });
        started_rx.await.unwrap();
        (release_tx, blocked)
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
            if pool.inner.threads[0].load.load(Ordering::Relaxed) == 0 {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(
            pool.inner.threads[0].load.load(Ordering::Relaxed),
            0,
            "load accounting survives a panic"
        );
    }
}
