//! State that outlives any one actor: the admission queue, the registry of
//! requests the decoder holds, and the progress counters health is judged by.
//!
//! It lives here, not in the decoder, because a decoder restart must not lose
//! what it guards: queued requests wait in [`Inbox`] while a new decoder starts,
//! and every request the failed decoder held is found in the in-flight registry
//! and given its terminal error.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use embody_engine::sampling::SamplingParams;
use embody_protocol::{ErrorCode, Event, FinishReason, Usage};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::Limits;

/// Where a request's events go.
pub(crate) type EventTx = UnboundedSender<Event>;

/// A request that passed validation and waits for a decoding slot.
pub(crate) struct Pending {
    pub id: u64,
    /// Token ids, with the rows and position ids of any images.
    pub prompt: embody_engine::vision::prompt::Laid,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub priority: i32,
    pub constraint: Option<embody_engine::constraint::Constraint>,
    pub logprobs: Option<usize>,
    pub tx: EventTx,
}

/// What the decoder thread picks up on each turn of its loop.
#[derive(Default)]
pub(crate) struct Inbox {
    /// Waiting requests, highest priority first, then arrival order.
    pub queue: VecDeque<Pending>,
    /// Requests to cancel in the scheduler.
    pub cancels: Vec<u64>,
    /// A fault to inject (tests only).
    pub fault: Option<embody_protocol::Fault>,
    /// Set when the runtime stops: nothing more is queued.
    pub closed: bool,
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotQueued {
    /// This many requests are already waiting.
    Full(usize),
    /// The runtime is stopping.
    Closed,
}

/// Counters the decoder publishes after each step.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DecoderStats {
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
}

pub(crate) struct Shared {
    pub inbox: Mutex<Inbox>,
    /// Wakes the decoder thread when the inbox changes.
    pub wake: Condvar,
    /// Requests a decoder thread has taken, by id: the thread's generation and
    /// the request's event sender.
    inflight: Mutex<HashMap<u64, (u64, EventTx)>>,
    pub limits: Mutex<Limits>,
    /// The generation of the decoder thread that may run; older threads exit.
    pub generation: AtomicU64,
    /// Set while the runtime stops: decoder threads exit for good.
    pub stopping: AtomicBool,
    /// Set while draining: no new requests are admitted.
    pub draining: AtomicBool,
    pub restarts: AtomicU64,
    pub steps: AtomicU64,
    /// Tokens drafted, and drafted tokens confirmed, since the start.
    pub drafted: AtomicU64,
    pub accepted: AtomicU64,
    stats: Mutex<DecoderStats>,
    start: Instant,
    /// Milliseconds since `start` of the decoder loop's last turn.
    last_beat_ms: AtomicU64,
    /// Whether a decoder thread is running now.
    pub decoder_up: AtomicBool,
    /// Generations of decoder threads given up for wedged and not yet gone.
    abandoned: Mutex<Vec<u64>>,
}

/// Locks a mutex, recovering the data if a thread panicked while holding it:
/// every structure here stays consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(limits: Limits) -> Self {
        Self {
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            inflight: Mutex::new(HashMap::new()),
            limits: Mutex::new(limits),
            generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            drafted: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            stats: Mutex::new(DecoderStats::default()),
            start: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            decoder_up: AtomicBool::new(false),
            abandoned: Mutex::new(Vec::new()),
        }
    }

    pub fn limits(&self) -> Limits {
        lock(&self.limits).clone()
    }

    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }

    /// The decoder loop turned: it is alive and not wedged.
    pub fn beat(&self) {
        self.last_beat_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the decoder loop last turned.
    pub fn since_beat(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed)))
    }

    /// Gives up the decoder thread of `generation` (wedged): it is left to
    /// leave on its own, if it ever does. Returns how many such threads are
    /// still alive, this one included.
    pub fn abandon(&self, generation: u64) -> usize {
        let mut a = lock(&self.abandoned);
        a.push(generation);
        a.len()
    }

    /// Decoder threads given up and still alive.
    pub fn abandoned(&self) -> usize {
        lock(&self.abandoned).len()
    }

    /// A decoder thread leaves: it is no longer counted as abandoned.
    pub fn thread_left(&self, generation: u64) {
        lock(&self.abandoned).retain(|&g| g != generation);
    }

    /// Health is progress: the decoder loop turned within the stall timeout.
    pub fn healthy(&self) -> bool {
        self.since_beat() < self.limits().stall_timeout
    }

    pub fn publish(&self, stats: DecoderStats) {
        *lock(&self.stats) = stats;
    }

    pub fn stats(&self) -> DecoderStats {
        *lock(&self.stats)
    }

    pub fn queued(&self) -> usize {
        lock(&self.inbox).queue.len()
    }

    /// Adds a request behind every queued request of the same or higher
    /// priority. Refuses it when the queue is at its bound, returning the
    /// queue's length.
    pub fn enqueue(&self, p: Pending, max_queued: usize) -> Result<(), NotQueued> {
        let mut inbox = lock(&self.inbox);
        if inbox.closed {
            return Err(NotQueued::Closed);
        }
        let n = inbox.queue.len();
        if n >= max_queued {
            return Err(NotQueued::Full(n));
        }
        let at = inbox
            .queue
            .iter()
            .position(|w| w.priority < p.priority)
            .unwrap_or(n);
        inbox.queue.insert(at, p);
        drop(inbox);
        self.wake.notify_all();
        Ok(())
    }

    /// Cancels a request: at once if it is still queued, else through the
    /// decoder. Returns whether it was found in the queue or the decoder.
    pub fn cancel(&self, id: u64) -> bool {
        let mut inbox = lock(&self.inbox);
        if let Some(i) = inbox.queue.iter().position(|p| p.id == id) {
            let p = inbox.queue.remove(i).expect("index in range");
            drop(inbox);
            let _ = p.tx.send(Event::Finished {
                reason: FinishReason::Cancelled,
                usage: Usage {
                    prompt_tokens: p.prompt.tokens.len() as u32,
                    completion_tokens: 0,
                },
            });
            return true;
        }
        if !lock(&self.inflight).contains_key(&id) {
            return false;
        }
        inbox.cancels.push(id);
        drop(inbox);
        self.wake.notify_all();
        true
    }

    /// Records that decoder generation `generation` holds request `id`.
    pub fn hold(&self, id: u64, generation: u64, tx: EventTx) {
        lock(&self.inflight).insert(id, (generation, tx));
    }

    /// The request ended (its terminal event was sent).
    pub fn release(&self, id: u64) {
        lock(&self.inflight).remove(&id);
    }

    /// Requests held by decoder threads (running, or preempted and waiting
    /// to resume).
    pub fn inflight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Ends every request held by decoder generation `generation` (every
    /// generation when `None`) with an error event.
    pub fn fail_inflight(&self, generation: Option<u64>, code: ErrorCode, message: &str) -> usize {
        let failed: Vec<EventTx> = {
            let mut map = lock(&self.inflight);
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, (g, _))| generation.is_none_or(|want| *g == want))
                .map(|(&id, _)| id)
                .collect();
            ids.into_iter()
                .filter_map(|id| map.remove(&id).map(|(_, tx)| tx))
                .collect()
        };
        for tx in &failed {
            let _ = tx.send(Event::error(code, message));
        }
        failed.len()
    }

    /// Ends every queued request with an error event.
    pub fn fail_queued(&self, code: ErrorCode, message: &str) -> usize {
        self.end_queued(code, message, false)
    }

    /// Ends every queued request with this error and queues nothing more:
    /// a request still being admitted is refused when it arrives, so every
    /// request gets its terminal event.
    pub fn close_queue(&self, code: ErrorCode, message: &str) -> usize {
        self.end_queued(code, message, true)
    }

    fn end_queued(&self, code: ErrorCode, message: &str, close: bool) -> usize {
        let queued: Vec<Pending> = {
            let mut inbox = lock(&self.inbox);
            inbox.closed |= close;
            inbox.queue.drain(..).collect()
        };
        for p in &queued {
            let _ = p.tx.send(Event::error(code, message));
        }
        queued.len()
    }
}
