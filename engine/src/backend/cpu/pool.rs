//! A persistent worker pool for the token loop.
//!
//! Spawning threads per operation costs tens of microseconds, and a decode step
//! runs hundreds of parallel operations, so the workers live as long as the
//! backend. A dispatch publishes a job and bumps a generation counter; workers
//! spin briefly on it (the next operation usually follows within microseconds)
//! and park when the engine goes idle. Dispatch takes no lock and allocates
//! nothing.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Spins before a waiting worker parks.
const SPIN_LIMIT: u32 = 1 << 16;

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
        }
    }

    /// Threads that run each job, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(thread_index, n_threads)` on every thread and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        if n == 1 {
            f(0, 1);
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
        f(0, n);
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
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
