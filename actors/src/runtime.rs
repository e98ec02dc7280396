//! [`Runtime`], the handle every interface uses: submit a request and read its
//! stream of events, cancel, query status and health, load and unload
//! models, drain and stop.
//!
//! A runtime serves one or more models, each with its own supervisor and
//! actors ([`Served`]); requests pick one by name ([`Request::model`]) and
//! the first configured model answers those that name none. The registry of
//! models and their life (load, swap, unload, idle unload, the memory
//! budget) is in `models.rs`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embody_engine::tool_calls::{Piece, ToolCallParser};
use embody_protocol::{ErrorCode, Event, Fault, ModelEntry, Request, Status};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::{broadcast, Notify};

use crate::cameras::Cameras;
use crate::config::{Limits, RuntimeConfig};
use crate::models::{Registry, RuntimeOptions};
use crate::served::{Stopped, SHUTTING_DOWN};
use crate::shared::{lock, Shared};
use crate::RuntimeError;

/// The handle to a running runtime. Cheap to clone; every clone talks to the
/// same actors.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub models: Mutex<Registry>,
    /// Woken at every change of a model's state (loads waited on).
    pub changed: Notify,
    pub events: broadcast::Sender<ModelEntry>,
    pub options: RuntimeOptions,
    pub limits: Mutex<Limits>,
    pub draining: AtomicBool,
    /// Event streams handed out and not yet dropped: requests whose door
    /// has not finished delivering their events.
    streams: Arc<AtomicUsize>,
    next_id: AtomicU64,
    pub cameras: Arc<Cameras>,
    metrics: Arc<crate::metrics::Metrics>,
    pub idle_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Whether the decoder makes progress: what the systemd watchdog follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    /// The decoder loop turned within the stall timeout.
    pub healthy: bool,
    /// Time since the decoder loop last turned.
    pub since_progress: Duration,
}

/// What a drain left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Every request finished before the deadline.
    pub complete: bool,
    /// Requests still running or queued at the deadline.
    pub left: usize,
}

/// The events answering one request. It ends after exactly one terminal
/// event ([`Event::Finished`] or [`Event::Error`]). Dropping it before the end
/// cancels the request.
///
/// When the request offered tools, the model's calls are read out of its text
/// here, so every interface gets them as [`Event::ToolCall`]s and the text of
/// a call never appears in a [`Event::Delta`].
pub struct EventStream {
    id: u64,
    rx: UnboundedReceiver<Event>,
    done: bool,
    /// The model's queue; none for a request refused before one was chosen.
    shared: Option<Arc<Shared>>,
    streams: Arc<AtomicUsize>,
    tools: Option<ToolCallParser>,
    ready: VecDeque<Event>,
    /// When the request is ended with a `timeout` error, and the limit in ms.
    deadline: Option<(tokio::time::Instant, u64)>,
}

impl EventStream {
    /// The runtime's id of the request (for [`Runtime::cancel`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            let ev = match self.deadline {
                None => self.rx.recv().await,
                Some((at, ms)) => match tokio::time::timeout_at(at, self.rx.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        // Queued or running, it goes; what it sends after this is dropped.
                        if let Some(shared) = &self.shared {
                            shared.cancel(self.id);
                        }
                        Some(Event::error(
                            ErrorCode::Timeout,
                            format!("the request did not finish within its deadline of {ms} ms (timeout_ms, or decoder.request_timeout_ms)"),
                        ))
                    }
                },
            };
            let ev = ev.unwrap_or_else(|| {
                // Every path that drops a request sends its terminal event first;
                // this is the last line of defence against a stream that hangs.
                Event::error(ErrorCode::Internal, "the request ended without a result")
            });
            self.done = ev.is_terminal();
            match self.tools.as_mut() {
                None => return Some(ev),
                Some(parser) => route(parser, ev, &mut self.ready),
            }
        }
    }
}

/// Passes an event through the tool call parser into `out`.
fn route(parser: &mut ToolCallParser, ev: Event, out: &mut VecDeque<Event>) {
    let (pieces, mut carried) = match ev {
        Event::Delta {
            text,
            token_ids,
            logprobs,
        } => (parser.push(&text), Some((token_ids, logprobs))),
        ev @ Event::Finished { .. } => {
            let pieces = parser.finish();
            emit(pieces, &mut None, out);
            out.push_back(ev);
            return;
        }
        ev => {
            out.push_back(ev);
            return;
        }
    };
    emit(pieces, &mut carried, out);
    // Tokens that produced no visible text still count.
    if let Some((token_ids, logprobs)) = carried {
        out.push_back(Event::Delta {
            text: String::new(),
            token_ids,
            logprobs,
        });
    }
}

/// Events for parsed pieces; the first text delta carries the token ids.
fn emit(
    pieces: Vec<Piece>,
    carried: &mut Option<(Vec<u32>, Vec<embody_protocol::TokenLogprob>)>,
    out: &mut VecDeque<Event>,
) {
    for piece in pieces {
        match piece {
            Piece::Text(text) => {
                let (token_ids, logprobs) = carried.take().unwrap_or_default();
                out.push_back(Event::Delta {
                    text,
                    token_ids,
                    logprobs,
                });
            }
            Piece::Call { name, arguments } => out.push_back(Event::ToolCall {
                id: call_id(),
                name,
                arguments,
            }),
        }
    }
}

/// A fresh tool call id: `call_` and 24 hex digits, unique within the process
/// and unlikely to repeat across restarts.
fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    format!("call_{x:016x}{:08x}", n as u32)
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.as_ref().filter(|_| !self.done) {
            shared.cancel(self.id);
        }
        self.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish()
    }
}
impl Runtime {
    /// Starts the runtime with one model: loads it, plans its KV cache and
    /// starts its decoder. Must run inside a tokio runtime.
    pub async fn start(cfg: RuntimeConfig) -> Result<Self, RuntimeError> {
        Self::start_models(vec![cfg], RuntimeOptions::default()).await
    }

    /// Starts the runtime with these models (the first is the default);
    /// those with `load_at_start` are loaded now, and if one fails the
    /// runtime does not start. Must run inside a tokio runtime.
    pub async fn start_models(
        models: Vec<RuntimeConfig>,
        options: RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        let Some(first) = models.first() else {
            return Err(RuntimeError::Start("no model is configured".into()));
        };
        let limits = first.limits.clone();
        let rt = Self {
            inner: Arc::new(Inner {
                models: Mutex::new(Registry::new(&models)?),
                changed: Notify::new(),
                events: broadcast::channel(64).0,
                options,
                limits: Mutex::new(limits),
                draining: AtomicBool::new(false),
                streams: Arc::default(),
                next_id: AtomicU64::new(1),
                cameras: Arc::new(Cameras::new()),
                metrics: Arc::default(),
                idle_task: Mutex::new(None),
            }),
        };
        let preload = rt.preloaded_names();
        for name in preload {
            if let Err(e) = rt.load_configured(&name).await {
                rt.shutdown().await;
                return Err(e);
            }
        }
        rt.start_idle_unloader();
        Ok(rt)
    }

    /// Submits a request to the model it names (or the default one). The
    /// answer is always a stream: a request that is refused (invalid, an
    /// unknown model, images on a text-only model, a full queue, a draining
    /// daemon) gets a stream of one [`Event::Error`]. A request naming a
    /// configured model that is not loaded waits for it to load.
    pub async fn submit(&self, req: Request) -> EventStream {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        self.inner.streams.fetch_add(1, Ordering::SeqCst);
        let mut stream = EventStream {
            id,
            rx,
            done: false,
            shared: None,
            streams: self.inner.streams.clone(),
            tools: None,
            ready: VecDeque::new(),
            deadline: None,
        };
        let arrived = tokio::time::Instant::now();
        let served = if self.inner.draining.load(Ordering::SeqCst) {
            Err(Event::error(ErrorCode::Unavailable, SHUTTING_DOWN))
        } else {
            self.pick(req.model.as_deref(), req.timeout_ms).await
        };
        let served = match served {
            Ok(s) => s,
            Err(refusal) => {
                tracing::debug!(id, "request refused: {refusal:?}");
                let _ = tx.send(refusal);
                return stream;
            }
        };
        *lock(&served.last_used) = Instant::now();
        let limit = [
            req.timeout_ms.map(Duration::from_millis),
            served.limits().request_timeout,
        ]
        .into_iter()
        .flatten()
        .min();
        stream.deadline = limit.map(|d| (arrived + d, d.as_millis() as u64));
        stream.shared = Some(served.shared.clone());
        match served.admit(id, req, tx.clone()).await {
            Ok(format) => stream.tools = format.map(ToolCallParser::new),
            Err(refusal) => {
                tracing::debug!(id, "request refused: {refusal:?}");
                let _ = tx.send(refusal);
            }
        }
        stream
    }

    /// The camera registry: interfaces that receive frames store them here,
    /// and requests attach them by name ([`Request::cameras`]).
    pub fn cameras(&self) -> Arc<Cameras> {
        self.inner.cameras.clone()
    }

    /// The serving metrics every interface counts its requests in
    /// (`GET /metrics` shows them).
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.inner.metrics.clone()
    }

    /// Cancels a request by its runtime id ([`EventStream::id`]). Its stream
    /// ends with [`Event::Finished`] and reason `cancelled`. Returns whether
    /// the request was still live.
    pub fn cancel(&self, id: u64) -> bool {
        self.all_served().iter().any(|s| s.shared.cancel(id))
    }

    /// The daemon's status: the default model's figures at the top, and
    /// every model in [`Status::models`]. Answers while a decoder restarts.
    pub async fn status(&self) -> Result<Status, RuntimeError> {
        let served = self.serving();
        let mut top = None;
        let mut figures = Vec::with_capacity(served.len());
        for (name, s) in &served {
            let st = s.status().await?;
            if top.is_none() {
                top = Some(st.clone());
            }
            figures.push((name.clone(), st));
        }
        // With every model unloaded (idle, or loaded on first use) the daemon
        // still serves: the next request loads its model.
        let mut status = top.unwrap_or_else(|| Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: true,
            healthy: true,
            rss_bytes: crate::device::resident_bytes(),
            ..Status::default()
        });
        let draining = self.inner.draining.load(Ordering::SeqCst);
        status.draining = draining;
        status.ready &= !draining;
        status.models = self.entries(&figures);
        Ok(status)
    }

    /// Drops every cached prompt prefix that no running request uses, on
    /// every model, and returns the KV blocks dropped. Their memory goes back
    /// to the pool on each decoder's next turn.
    pub async fn flush_cache(&self) -> Result<u64, RuntimeError> {
        let mut blocks = 0;
        for (_, s) in self.serving() {
            blocks += s.flush_cache().await?;
        }
        Ok(blocks)
    }

    /// Whether every served model's decoder makes progress.
    pub fn health(&self) -> Health {
        let mut health = Health {
            healthy: true,
            since_progress: Duration::ZERO,
        };
        for (_, s) in self.serving() {
            let h = s.health();
            health.healthy &= h.healthy;
            health.since_progress = health.since_progress.max(h.since_progress);
        }
        health
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        lock(&self.inner.limits).clone()
    }

    /// Replaces the limits of every model; they apply to requests admitted
    /// from now on, and to models loaded later.
    pub fn set_limits(&self, limits: Limits) {
        for s in self.all_served() {
            s.set_limits(limits.clone());
        }
        *lock(&self.inner.limits) = limits;
    }

    /// Injects a fault into the default model's decoder. Refused unless the
    /// limits' `fault_injection` switch is on.
    pub fn inject_fault(&self, fault: Fault) -> Result<(), RuntimeError> {
        let served = self.serving();
        let (_, s) = served.first().ok_or(RuntimeError::ActorGone("decoder"))?;
        s.inject_fault(fault)
    }

    /// Stops admitting requests and waits up to `deadline` for those queued
    /// and running on every model to finish. New requests are refused as
    /// `unavailable` from the first moment.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.inner.draining.store(true, Ordering::SeqCst);
        let mut drains = tokio::task::JoinSet::new();
        for s in self.all_served() {
            drains.spawn(async move { s.drain(deadline).await });
        }
        let mut report = DrainReport {
            complete: true,
            left: 0,
        };
        while let Some(r) = drains.join_next().await {
            let r = r.unwrap_or(DrainReport {
                complete: false,
                left: 0,
            });
            report.complete &= r.complete;
            report.left += r.left;
        }
        report
    }

    /// Waits up to `within` for every event stream to be dropped: each door
    /// drops a request's stream once it has delivered the terminal event (or
    /// its client is gone). Returns how many are still open.
    pub async fn streams_closed(&self, within: Duration) -> usize {
        let start = Instant::now();
        loop {
            let open = self.inner.streams.load(Ordering::SeqCst);
            if open == 0 || start.elapsed() >= within {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every model's actors. Requests still queued or running end with
    /// an `unavailable` error.
    pub async fn shutdown(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        if let Some(task) = lock(&self.inner.idle_task).take() {
            task.abort();
        }
        let mut stops = tokio::task::JoinSet::new();
        for s in self.all_served() {
            stops.spawn(async move { s.shutdown(Stopped::Daemon).await });
        }
        while stops.join_next().await.is_some() {}
    }
}
