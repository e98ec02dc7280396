//! [`Runtime`], the handle every interface uses: submit a request and read its
//! stream of events, cancel, query status and health, drain and stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use embody_engine::chat_template::ChatMessage;
use embody_engine::generate::encode_chat;
use embody_engine::sampling::SamplingParams;
use embody_protocol::{ErrorCode, Event, Fault, Message, Request, Status};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::cache::CacheMsg;
use crate::cameras::Cameras;
use crate::config::{Limits, RuntimeConfig};
use crate::device::{DeviceError, ModelSource};
use crate::shared::{lock, EventTx, Pending, Shared};
use crate::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::vision::VisionMsg;
use crate::{call, Children, RuntimeError};

/// The handle to a running runtime. Cheap to clone; every clone talks to the
/// same actors.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    supervisor: ActorRef<SupervisorMsg>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shared: Arc<Shared>,
    children: Arc<Mutex<Children>>,
    source: Arc<ModelSource>,
    next_id: AtomicU64,
    call_timeout: Duration,
    cameras: Arc<Cameras>,
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
pub struct EventStream {
    id: u64,
    rx: UnboundedReceiver<Event>,
    done: bool,
    shared: Arc<Shared>,
}

impl EventStream {
    /// The runtime's id of the request (for [`Runtime::cancel`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().await.unwrap_or_else(|| {
            // Every path that drops a request sends its terminal event first;
            // this is the last line of defence against a stream that hangs.
            Event::error(ErrorCode::Internal, "the request ended without a result")
        });
        self.done = ev.is_terminal();
        Some(ev)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.done {
            self.shared.cancel(self.id);
        }
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

/// Health of the shared decoder state.
pub(crate) fn healthy(shared: &Shared) -> bool {
    shared.since_beat() < shared.limits().stall_timeout
}

impl Runtime {
    /// Starts the supervisor and its children: loads the model, plans the KV
    /// cache and starts the decoder. Must run inside a tokio runtime.
    pub async fn start(cfg: RuntimeConfig) -> Result<Self, RuntimeError> {
        let shared = Arc::new(Shared::new(cfg.limits.clone()));
        let children = Arc::new(Mutex::new(Children::default()));
        let call_timeout = cfg.call_timeout;
        let args = SupervisorArgs {
            cfg,
            shared: shared.clone(),
            children: children.clone(),
        };
        let (supervisor, task) =
            Actor::spawn(None, Supervisor, args)
                .await
                .map_err(|e| match e {
                    ractor::SpawnErr::StartupFailed(inner) => match inner.downcast::<DeviceError>()
                    {
                        Ok(d) => RuntimeError::Model {
                            path: d.path,
                            source: d.source,
                        },
                        Err(other) => RuntimeError::Start(other.to_string()),
                    },
                    other => RuntimeError::Start(other.to_string()),
                })?;
        let source = call(
            &supervisor,
            SupervisorMsg::Source,
            call_timeout,
            "supervisor",
        )
        .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                supervisor,
                task: Mutex::new(Some(task)),
                shared,
                children,
                source,
                next_id: AtomicU64::new(1),
                call_timeout,
                cameras: Arc::new(Cameras::new()),
            }),
        })
    }

    /// Submits a request. The answer is always a stream: a request that is
    /// refused (invalid, images on a text-only model, a full queue, a
    /// draining daemon) gets a stream of one [`Event::Error`].
    pub async fn submit(&self, req: Request) -> EventStream {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let stream = EventStream {
            id,
            rx,
            done: false,
            shared: self.inner.shared.clone(),
        };
        if let Err(refusal) = self.admit(id, req, tx.clone()).await {
            tracing::debug!(id, "request refused: {refusal:?}");
            let _ = tx.send(refusal);
        }
        stream
    }

    async fn admit(&self, id: u64, req: Request, tx: EventTx) -> Result<(), Event> {
        let shared = &self.inner.shared;
        let bad = |m: String| Event::error(ErrorCode::BadRequest, m);
        if shared.draining.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) {
            return Err(Event::error(
                ErrorCode::Unavailable,
                "embodyd is shutting down and takes no new requests",
            ));
        }
        let limits = shared.limits();
        if req.messages.is_empty() {
            return Err(bad("a request needs at least one message".into()));
        }
        if req.response_format.is_some() {
            return Err(bad(
                "response_format (constrained output) is not supported by this version of embodyd"
                    .into(),
            ));
        }
        let max_tokens = match req.max_tokens {
            None => limits.default_max_tokens,
            Some(0) => return Err(bad("max_tokens must be at least 1".into())),
            Some(n) if n > limits.max_tokens_limit => {
                return Err(bad(format!(
                    "max_tokens = {n} is over this daemon's limit of {}",
                    limits.max_tokens_limit
                )))
            }
            Some(n) => n,
        };
        let mut images = req.images;
        if !req.cameras.is_empty() {
            let now = SystemTime::now();
            for cam in &req.cameras {
                let attached = self
                    .inner
                    .cameras
                    .attach(cam, now)
                    .map_err(|e| bad(e.to_string()))?;
                tracing::debug!(
                    id,
                    camera = %cam.name,
                    age_ms = attached.age.as_millis() as u64,
                    "camera frame attached"
                );
                images.push(attached.frame.image.clone());
            }
        }
        if !images.is_empty() {
            self.check_images(images).await?;
        }
        let sampling = engine_sampling(&req.sampling);
        sampling.validate().map_err(|e| bad(e.to_string()))?;
        let source = self.inner.source.clone();
        let (messages, tools) = (req.messages, req.tools);
        // Rendering and tokenizing a long prompt is CPU work: not on an async worker.
        let prompt = tokio::task::spawn_blocking(move || render_prompt(&source, &messages, tools))
            .await
            .map_err(|e| {
                Event::error(ErrorCode::Internal, format!("prompt rendering failed: {e}"))
            })?
            .map_err(bad)?;
        let context = self.inner.source.info.context_length;
        if prompt.len() >= context {
            return Err(bad(format!(
                "the prompt is {} tokens, the context holds {context}: shorten the conversation",
                prompt.len()
            )));
        }
        let pending = Pending {
            id,
            prompt,
            sampling,
            max_tokens: max_tokens as usize,
            stop: req.stop,
            priority: req.priority,
            tx,
        };
        shared.enqueue(pending, limits.max_queued).map_err(|n| {
            Event::error(
                ErrorCode::Overloaded,
                format!(
                    "{n} requests are already queued (max_queued = {}); retry later",
                    limits.max_queued
                ),
            )
        })
    }

    async fn check_images(&self, images: Vec<embody_protocol::Image>) -> Result<(), Event> {
        let vision = lock(&self.inner.children).vision.clone();
        let Some(vision) = vision else {
            return Err(Event::error(
                ErrorCode::Unavailable,
                "the vision actor is restarting; retry shortly",
            ));
        };
        let result = call(
            &vision,
            |reply| VisionMsg::Encode { images, reply },
            self.inner.call_timeout,
            "vision",
        )
        .await
        .map_err(|e| Event::error(ErrorCode::Internal, e.to_string()))?;
        result.map_err(|e| Event::error(ErrorCode::VisionUnsupported, e.to_string()))
    }

    /// The camera registry: interfaces that receive frames store them here,
    /// and requests attach them by name ([`Request::cameras`]).
    pub fn cameras(&self) -> Arc<Cameras> {
        self.inner.cameras.clone()
    }

    /// Cancels a request by its runtime id ([`EventStream::id`]). Its stream
    /// ends with [`Event::Finished`] and reason `cancelled`. Returns whether
    /// the request was still live.
    pub fn cancel(&self, id: u64) -> bool {
        self.inner.shared.cancel(id)
    }

    /// The daemon's status. Answers while the decoder restarts.
    pub async fn status(&self) -> Result<Status, RuntimeError> {
        call(
            &self.inner.supervisor,
            SupervisorMsg::Status,
            self.inner.call_timeout,
            "supervisor",
        )
        .await
    }

    /// Drops every cached prompt prefix that no running request uses, and
    /// returns the KV blocks dropped. Their memory goes back to the pool on
    /// the decoder's next turn.
    pub async fn flush_cache(&self) -> Result<u64, RuntimeError> {
        let cache = lock(&self.inner.children).cache.clone();
        let cache = cache.ok_or(RuntimeError::ActorGone("cache"))?;
        let blocks = call(&cache, CacheMsg::Flush, self.inner.call_timeout, "cache").await?;
        Ok(blocks as u64)
    }

    /// Whether the decoder makes progress.
    pub fn health(&self) -> Health {
        let shared = &self.inner.shared;
        Health {
            healthy: healthy(shared),
            since_progress: shared.since_beat(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.inner.shared.limits()
    }

    /// Replaces the limits; they apply to requests admitted from now on.
    pub fn set_limits(&self, limits: Limits) {
        *lock(&self.inner.shared.limits) = limits;
    }

    /// Injects a fault into the decoder. Refused unless the limits'
    /// `fault_injection` switch is on.
    pub fn inject_fault(&self, fault: Fault) -> Result<(), RuntimeError> {
        let shared = &self.inner.shared;
        if !shared.limits().fault_injection {
            return Err(RuntimeError::FaultInjectionOff);
        }
        tracing::warn!(?fault, "fault injection requested");
        lock(&shared.inbox).fault = Some(fault);
        shared.wake.notify_all();
        Ok(())
    }

    /// Stops admitting requests and waits up to `deadline` for those queued
    /// and running to finish. New requests are refused as `unavailable` from
    /// the first moment.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        let shared = &self.inner.shared;
        shared.draining.store(true, Ordering::SeqCst);
        let start = Instant::now();
        loop {
            let left = shared.queued() + shared.inflight();
            if left == 0 {
                return DrainReport {
                    complete: true,
                    left,
                };
            }
            if start.elapsed() >= deadline {
                return DrainReport {
                    complete: false,
                    left,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the actors. Requests still queued or running end with an
    /// `unavailable` error.
    pub async fn shutdown(&self) {
        let shared = &self.inner.shared;
        shared.draining.store(true, Ordering::SeqCst);
        shared.fail_queued(
            ErrorCode::Unavailable,
            "embodyd stopped before this request ran",
        );
        let timeout = self.inner.call_timeout;
        if let Err(e) = call(
            &self.inner.supervisor,
            SupervisorMsg::Shutdown,
            timeout,
            "supervisor",
        )
        .await
        {
            tracing::warn!("supervisor did not stop cleanly: {e}");
        }
        // A thread that did not leave (wedged) keeps its requests: end them here.
        shared.fail_inflight(
            None,
            ErrorCode::Unavailable,
            "embodyd stopped before this request finished",
        );
        let task = lock(&self.inner.task).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(timeout, task).await;
        }
    }
}

/// The engine's sampling parameters for the protocol's.
fn engine_sampling(s: &embody_protocol::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n as usize,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
    }
}

/// Renders the conversation with the model's chat template and tokenizes it.
fn render_prompt(
    src: &ModelSource,
    messages: &[Message],
    tools: Option<serde_json::Value>,
) -> Result<Vec<u32>, String> {
    let Some(template) = &src.template else {
        return Err("the model file has no chat template (tokenizer.chat_template), so chat requests cannot be formatted".into());
    };
    let messages: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), m.content.clone()))
        .collect();
    let tok = &src.tokenizer;
    let bos = tok.bos_id().and_then(|b| tok.token_text(b)).unwrap_or("");
    let eos = tok.eos_id().and_then(|e| tok.token_text(e)).unwrap_or("");
    let extra = tools.map(|t| serde_json::json!({ "tools": t }));
    let text = template
        .render(&messages, true, bos, eos, extra.as_ref())
        .map_err(|e| e.to_string())?;
    encode_chat(tok, &text).map_err(|e| e.to_string())
}
