//! A persistent worker pool for the token loop.
//!
//! Spawning threads per operation costs tens of microseconds, and a decode step
//! runs hundreds of parallel operations, so the workers live as long as the
//! backend. A dispatch publishes a job and bumps a generation counter; workers
//! spin briefly on it (the next operation usually follows within microseconds)
//! and park when the engine goes idle. Dispatch takes no lock and allocates
//! nothing.
//!
//! On a robot the cores are shared with perception and control processes. A
//! worker the host has descheduled holds up every operation for a time slice
//! (milliseconds), hundreds of times per token, while the waiting thread
//! spins away its own share. So a dispatch that waits long for its workers
//! switches the pool to running jobs on the calling thread alone for a
//! while ([`SOLO_FOR`]), every thread's part in turn (the same parts, so the
//! same bits); then it tries its workers again.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Spins before a waiting worker parks.
const SPIN_LIMIT: u32 = 1 << 16;

/// Spins of the dispatching thread before it also yields while it waits (a
/// worker on its own core gets to run).
const YIELD_AFTER: u32 = 1 << 12;

/// A wait for workers this long (and longer than the dispatching thread's
/// own part took) means the host took a worker's core: a quiet machine's
/// workers finish within microseconds of each other.
const LATE: Duration = Duration::from_millis(1);

/// How long the pool runs jobs on the calling thread alone after a late wait.
pub const SOLO_FOR: Duration = Duration::from_millis(250);

type Job = *const (dyn Fn(usize, usize) + Sync);

struct Shared {
    generation: AtomicUsize,
    pending: AtomicUsize,
    shutdown: AtomicBool,
    job: UnsafeCell<Option<Job>>,
}

// SAFETY: `job` is written only by the dispatching thread while no worker reads
// it (between generations), and read by workers only after they observe the new
// generation with Acquire ordering, which the Release increment publishes.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of worker threads that run one job at a time on every thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes dispatch when the backend is shared between callers.
    busy: AtomicBool,
    /// Jobs run on the calling thread alone until this many ns after `born`.
    solo_until: AtomicU64,
    born: Instant,
    /// Times the pool went solo (for tests and figures).
    solo_spells: AtomicU64,
}

impl Pool {
    /// A pool of `n_threads` threads in total, the caller's thread included.
    pub fn new(n_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: UnsafeCell::new(None),
        });
        let n = n_threads.max(1);
        let workers = (1..n)
            .map(|idx| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("embody-cpu-{idx}"))
                    .spawn(move || worker(shared, idx, n))
                    .expect("spawning a CPU worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            busy: AtomicBool::new(false),
            solo_until: AtomicU64::new(0),
            born: Instant::now(),
            solo_spells: AtomicU64::new(0),
        }
    }

    /// Times the pool has switched to running jobs on the calling thread
    /// alone because its workers were late.
    pub fn solo_spells(&self) -> u64 {
        self.solo_spells.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// Threads that run each job, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(thread_index, n_threads)` for every thread index and returns
    /// when all are done: each on its own thread, or all on the calling
    /// thread while the host keeps the workers from running.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        if n == 1 {
            f(0, 1);
            return;
        }
        if self.now_ns() < self.solo_until.load(Ordering::Relaxed) {
            for i in 0..n {
                f(i, n);
            }
            return;
        }
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: no worker is reading `job` (pending was 0 and the generation has not
        // moved); the lifetime is erased only until the wait below returns.
        unsafe {
            let job: Job = std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), Job>(
                f as *const _,
            );
            *self.shared.job.get() = Some(job);
        }
        self.shared.pending.store(n - 1, Ordering::Relaxed);
        self.shared.generation.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            w.thread().unpark();
        }
        let t0 = Instant::now();
        f(0, n);
        let own = t0.elapsed();
        let mut spins = 0u32;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            if spins < YIELD_AFTER {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let waited = t0.elapsed() - own;
        if waited > LATE.max(own) {
            let until = self.now_ns() + SOLO_FOR.as_nanos() as u64;
            self.solo_until.store(until, Ordering::Relaxed);
            self.solo_spells.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: every worker has finished with the job.
        unsafe { *self.shared.job.get() = None };
        self.busy.store(false, Ordering::Release);
    }
}

fn worker(shared: Arc<Shared>, idx: usize, n: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(Duration::from_millis(5));
            }
        }
        // SAFETY: the job was published before the generation we observed.
        let job = unsafe { (*shared.job.get()).expect("job set for a new generation") };
        // A panic in a job would leave the dispatcher waiting forever; abort the
        // job's effects by still counting this worker as done.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(idx, n) }));
        shared.pending.fetch_sub(1, Ordering::Release);
        if result.is_err() {
            eprintln!("embody-cpu-{idx}: a kernel panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

/// The half-open range of `0..total` that thread `idx` of `n` handles.
pub fn split(total: usize, idx: usize, n: usize) -> std::ops::Range<usize> {
    let per = total / n;
    let extra = total % n;
    let start = idx * per + idx.min(extra);
    start..start + per + usize::from(idx < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once() {
        for total in [0, 1, 7, 64, 1001] {
            for n in 1..5 {
                let mut next = 0;
                for i in 0..n {
                    let r = split(total, i, n);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn a_late_worker_sends_the_pool_solo_and_every_part_still_runs() {
        let pool = Pool::new(2);
        let hits = AtomicUsize::new(0);
        // Worker 1 is held up as a descheduled one would be.
        pool.run(&|i, n| {
            assert_eq!(n, 2);
            if i == 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
            hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
        });
        assert_eq!(pool.solo_spells(), 1);
        // Solo: both parts run, on this thread.
        let me = std::thread::current().id();
        let on_caller = AtomicUsize::new(0);
        pool.run(&|i, n| {
            assert_eq!(n, 2);
            if std::thread::current().id() == me {
                on_caller.fetch_add(1, Ordering::Relaxed);
            }
            hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
        });
        assert_eq!(on_caller.load(Ordering::Relaxed), 2);
        assert_eq!(hits.load(Ordering::Relaxed), 2 * (1 + (1 << 8)));
        // After the spell the workers take their parts again.
        std::thread::sleep(SOLO_FOR + Duration::from_millis(20));
        let on_worker = AtomicUsize::new(0);
        pool.run(&|_, _| {
            if std::thread::current().id() != me {
                on_worker.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert_eq!(on_worker.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn every_thread_runs_each_job() {
        let pool = Pool::new(3);
        let hits = AtomicUsize::new(0);
        for round in 1..=200 {
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
            });
            assert_eq!(
                hits.load(Ordering::Relaxed),
                round * (1 + (1 << 8) + (1 << 16))
            );
        }
    }
}
