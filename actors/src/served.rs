//! One served model: its supervisor with the device, cache, vision and
//! decoder actors, the model's tokenizer and template, and the admission of
//! requests to its queue. [`crate::Runtime`] holds one per model it serves.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use embody_engine::chat_template::ChatMessage;
use embody_engine::constraint::{Constraint, GrammarSpec};
use embody_engine::message_text::MessageText;
use embody_engine::tool_calls::{call_grammar, json_format_messages, ForcedCall, ToolFormat};
use embody_engine::vision::prompt::{lay_out, Laid};
use embody_engine::vision::EncodedImage;
use embody_protocol::openai::ResponseFormat;
use embody_protocol::{ErrorCode, Event, Fault, Message, Request, Status, ToolChoice};
use ractor::{Actor, ActorRef};

use crate::cache::CacheMsg;
use crate::cameras::Cameras;
use crate::config::{Limits, RuntimeConfig};
use crate::device::{DeviceError, ModelSource};
use crate::runtime::{DrainReport, Health};
use crate::shared::{lock, EventTx, NotQueued, Pending, Shared};
use crate::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::vision::{VisionError, VisionMsg};
use crate::{call, Children, RuntimeError};

/// One model and the actors that serve it.
pub(crate) struct Served {
    supervisor: ActorRef<SupervisorMsg>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub shared: Arc<Shared>,
    children: Arc<Mutex<Children>>,
    pub source: Arc<ModelSource>,
    call_timeout: Duration,
    cameras: Arc<Cameras>,
    /// When a request last arrived (what the idle unload follows).
    pub last_used: Mutex<Instant>,
}

impl Served {
    /// Starts the supervisor and its children: loads the model, plans the KV
    /// cache and starts the decoder. Must run inside a tokio runtime.
    pub async fn start(cfg: RuntimeConfig, cameras: Arc<Cameras>) -> Result<Self, RuntimeError> {
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
            supervisor,
            task: Mutex::new(Some(task)),
            shared,
            children,
            source,
            call_timeout,
            cameras,
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Checks, renders and queues a request; returns the tool call format to
    /// parse its answer with, if it offered tools.
    pub async fn admit(
        &self,
        id: u64,
        mut req: Request,
        tx: EventTx,
    ) -> Result<Option<ToolFormat>, Event> {
        let shared = &self.shared;
        let bad = |m: String| Event::error(ErrorCode::BadRequest, m);
        if shared.draining.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) {
            return Err(Event::error(ErrorCode::Unavailable, SHUTTING_DOWN));
        }
        let limits = shared.limits();
        let raw = req.prompt.take();
        match (&raw, req.messages.is_empty()) {
            (None, true) => return Err(bad("a request needs at least one message".into())),
            (Some(_), false) => {
                return Err(bad(
                    "a request has either messages or a raw prompt, not both".into(),
                ))
            }
            _ => {}
        }
        // Text past what the context can hold is refused before it is
        // rendered or tokenized (both cost many times the text's size).
        let text = prompt_text_bytes(raw.as_deref(), &req.messages, req.tools.as_ref());
        let max_text = self.source.max_prompt_bytes;
        if text > max_text {
            return Err(bad(format!(
                "the prompt's text is {text} bytes; no text over {max_text} bytes fits this model's \
                 context of {} tokens: shorten the conversation",
                self.source.info.context_length
            )));
        }
        let logprobs = match req.logprobs {
            Some(n) if n > MAX_TOP_LOGPROBS => {
                return Err(bad(format!(
                    "logprobs asks for {n} alternatives; at most {MAX_TOP_LOGPROBS}"
                )))
            }
            n => n.map(|n| n as usize),
        };
        let format = self.source.tool_format;
        let (tools, forced) = tool_setup(req.tools.take(), req.tool_choice.take())?;
        let grammar = match (&forced, &tools) {
            (Some(f), Some(t)) => Some(call_grammar(format, t, f).ok_or_else(|| {
                bad("tool_choice names a function that is not among the tools".into())
            })?),
            _ => None,
        };
        let grammar = match (grammar, req.response_format.take()) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "response_format cannot be combined with a required tool call".into(),
                ))
            }
            (Some(g), None) => Some(g),
            (None, Some(f)) => response_grammar(f)?,
            (None, None) => None,
        };
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
        let sampling = req.sampling;
        sampling.validate().map_err(|e| bad(e.to_string()))?;
        // Encoding is the costly step: after every cheap check.
        let encoded = if images.is_empty() {
            Vec::new()
        } else {
            self.encode_images(images).await?
        };
        let source = self.source.clone();
        let messages = req.messages;
        let parse_calls = tools.is_some();
        // Rendering and tokenizing a long prompt, and compiling a grammar, are
        // CPU work: not on an async worker.
        let (prompt, constraint) = tokio::task::spawn_blocking(move || {
            let tokens = match raw {
                Some(text) => source
                    .tokenizer
                    .encode(&text, true, true)
                    .map_err(|e| e.to_string())?,
                None => render_prompt(
                    &source,
                    &messages,
                    encoded.len(),
                    tools.as_ref(),
                    forced.as_ref(),
                )?,
            };
            let prompt = match &source.vision {
                Some(v) if !encoded.is_empty() => {
                    lay_out(&tokens, v.image_token, &encoded, source.info.mrope).map_err(|e| {
                        match e {
                            embody_engine::Error::InvalidRequest(m) => m,
                            e => e.to_string(),
                        }
                    })?
                }
                _ => Laid {
                    tokens,
                    ..Laid::default()
                },
            };
            let constraint = grammar.map(|g| compile(&source, &g)).transpose()?;
            Ok::<_, String>((prompt, constraint))
        })
        .await
        .map_err(|e| Event::error(ErrorCode::Internal, format!("prompt rendering failed: {e}")))?
        .map_err(bad)?;
        let context = self.source.info.context_length;
        if prompt.tokens.len() >= context {
            return Err(bad(format!(
                "the prompt is {} tokens, the context holds {context}: shorten the conversation",
                prompt.tokens.len()
            )));
        }
        let pending = Pending {
            id,
            prompt,
            sampling,
            max_tokens: max_tokens as usize,
            stop: req.stop,
            priority: req.priority,
            constraint,
            logprobs,
            tx,
        };
        shared
            .enqueue(pending, limits.max_queued)
            .map_err(|why| match why {
                NotQueued::Full(n) => Event::error(
                    ErrorCode::Overloaded,
                    format!(
                        "{n} requests are already queued (max_queued = {}); retry later",
                        limits.max_queued
                    ),
                ),
                NotQueued::Closed => Event::error(ErrorCode::Unavailable, SHUTTING_DOWN),
            })?;
        Ok(parse_calls.then_some(format))
    }

    /// The rows of each image, from the vision actor (its cache, or its encoder).
    async fn encode_images(
        &self,
        images: Vec<embody_protocol::Image>,
    ) -> Result<Vec<EncodedImage>, Event> {
        let vision = lock(&self.children).vision.clone();
        let Some(vision) = vision else {
            return Err(Event::error(
                ErrorCode::Unavailable,
                "the vision actor is restarting; retry shortly",
            ));
        };
        // Encoding a large image takes longer than an ordinary call.
        let timeout = self.call_timeout.max(ENCODE_TIMEOUT);
        let result = call(
            &vision,
            |reply| VisionMsg::Encode { images, reply },
            timeout,
            "vision",
        )
        .await
        .map_err(|e| Event::error(ErrorCode::Internal, e.to_string()))?;
        result.map_err(|e| {
            let code = match e {
                VisionError::Unsupported { .. } => ErrorCode::VisionUnsupported,
                VisionError::BadImage { .. } => ErrorCode::BadRequest,
                VisionError::Failed { .. } => ErrorCode::ModelError,
            };
            Event::error(code, e.to_string())
        })
    }

    /// The model's status, as its supervisor reports it.
    pub async fn status(&self) -> Result<Status, RuntimeError> {
        call(
            &self.supervisor,
            SupervisorMsg::Status,
            self.call_timeout,
            "supervisor",
        )
        .await
    }

    /// Drops every cached prompt prefix that no running request uses, and
    /// returns the KV blocks dropped. Their memory goes back to the pool on
    /// the decoder's next turn.
    pub async fn flush_cache(&self) -> Result<u64, RuntimeError> {
        let cache = lock(&self.children).cache.clone();
        let cache = cache.ok_or(RuntimeError::ActorGone("cache"))?;
        let blocks = call(&cache, CacheMsg::Flush, self.call_timeout, "cache").await?;
        Ok(blocks as u64)
    }

    /// Whether the decoder makes progress.
    pub fn health(&self) -> Health {
        let shared = &self.shared;
        Health {
            healthy: shared.healthy(),
            since_progress: shared.since_beat(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared.limits()
    }

    /// Replaces the limits; they apply to requests admitted from now on.
    pub fn set_limits(&self, limits: Limits) {
        *lock(&self.shared.limits) = limits;
    }

    /// Injects a fault into the decoder. Refused unless the limits'
    /// `fault_injection` switch is on.
    pub fn inject_fault(&self, fault: Fault) -> Result<(), RuntimeError> {
        let shared = &self.shared;
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
        let shared = &self.shared;
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
    /// `unavailable` error that says why.
    pub async fn shutdown(&self, why: Stopped) {
        let shared = &self.shared;
        shared.draining.store(true, Ordering::SeqCst);
        let (queued, running) = why.messages();
        shared.close_queue(ErrorCode::Unavailable, queued);
        let timeout = self.call_timeout;
        if let Err(e) = call(
            &self.supervisor,
            SupervisorMsg::Shutdown,
            timeout,
            "supervisor",
        )
        .await
        {
            tracing::warn!("supervisor did not stop cleanly: {e}");
        }
        // A thread that did not leave (wedged) keeps its requests: end them here.
        shared.fail_inflight(None, ErrorCode::Unavailable, running);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(timeout, task).await;
        }
    }
}

/// Why a model's actors stop, for the requests they still hold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stopped {
    /// The daemon stops.
    Daemon,
    /// The model was unloaded or replaced, and its drain time ran out.
    Model,
}

impl Stopped {
    /// The messages of a queued and of a running request.
    fn messages(self) -> (&'static str, &'static str) {
        match self {
            Stopped::Daemon => (
                "embodyd stopped before this request ran",
                "embodyd stopped before this request finished",
            ),
            Stopped::Model => (
                "the model was unloaded or replaced before this request ran",
                "the model was unloaded or replaced, and this request did not finish within the drain time (service.drain_timeout_ms)",
            ),
        }
    }
}

/// The refusal of a request that arrives while the daemon stops.
pub(crate) const SHUTTING_DOWN: &str = "embodyd is shutting down and takes no new requests";

/// Most alternatives a request may ask log-probabilities of.
const MAX_TOP_LOGPROBS: u32 = 20;

/// The tools to show the model and the call it must make: `none` hides the
/// tools, `required` and a named function force a call.
fn tool_setup(
    tools: Option<serde_json::Value>,
    choice: Option<ToolChoice>,
) -> Result<(Option<serde_json::Value>, Option<ForcedCall>), Event> {
    let bad = |m: &str| Event::error(ErrorCode::BadRequest, m);
    let tools = tools.filter(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()));
    if tools.as_ref().is_some_and(|t| !t.is_array()) {
        return Err(bad("tools must be a list of tools"));
    }
    let forced = match choice.unwrap_or_default() {
        ToolChoice::None => return Ok((None, None)),
        ToolChoice::Auto => None,
        ToolChoice::Required => Some(ForcedCall::Any),
        ToolChoice::Function { name } => Some(ForcedCall::Named(name)),
    };
    if forced.is_some() && tools.is_none() {
        return Err(bad(
            "tool_choice asks for a tool call but no tools are given",
        ));
    }
    Ok((tools, forced))
}

/// The grammar of an OpenAI `response_format`; `None` for free text.
fn response_grammar(format: serde_json::Value) -> Result<Option<GrammarSpec>, Event> {
    let format: ResponseFormat = serde_json::from_value(format).map_err(|e| {
        Event::error(
            ErrorCode::BadRequest,
            format!("response_format is not one of text, json_object, json_schema: {e}"),
        )
    })?;
    Ok(match format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(GrammarSpec::JsonSchema(
            serde_json::json!({"type": "object"}),
        )),
        ResponseFormat::JsonSchema { json_schema } => Some(GrammarSpec::JsonSchema(
            json_schema.schema.unwrap_or_else(|| serde_json::json!({})),
        )),
    })
}

/// Compiles a grammar against the model's tokenizer.
fn compile(src: &ModelSource, spec: &GrammarSpec) -> Result<Constraint, String> {
    let what = match spec {
        GrammarSpec::JsonSchema(_) => "the JSON schema",
        GrammarSpec::Lark(_) => "the tool call grammar",
    };
    src.grammars()?
        .compile(spec)
        .map_err(|e| format!("{what} cannot be enforced: {e}"))
}

/// A protocol message as chat templates read it (tool calls in OpenAI's shape).
fn chat_message(m: &Message) -> ChatMessage {
    let mut c = ChatMessage::new(m.role.as_str(), m.content.clone());
    c.tool_calls = m
        .tool_calls
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": t.id,
                "type": "function",
                "function": {"name": t.name, "arguments": t.arguments}
            })
        })
        .collect();
    c.tool_call_id = m.tool_call_id.clone();
    c.name = m.name.clone();
    c
}

/// Longest wait for the vision actor to encode a request's images.
const ENCODE_TIMEOUT: Duration = Duration::from_secs(300);

/// Renders the conversation with the model's chat template and tokenizes it,
/// with one image slot per image at the start of the last user message (where
/// the images of a request go; the placeholders are expanded after
/// tokenization). Templates without tool support get the tools in a system
/// prompt block. Unless the model is configured otherwise, control-token text
/// in the messages and tools stays text.
fn render_prompt(
    src: &ModelSource,
    messages: &[Message],
    images: usize,
    tools: Option<&serde_json::Value>,
    forced: Option<&ForcedCall>,
) -> Result<Vec<u32>, String> {
    let Some(template) = &src.template else {
        return Err("the model file has no chat template (tokenizer.chat_template), so chat requests cannot be formatted".into());
    };
    let mut messages: Vec<ChatMessage> = messages.iter().map(chat_message).collect();
    let tok = &src.tokenizer;
    let bos = tok.bos_id().and_then(|b| tok.token_text(b)).unwrap_or("");
    let eos = tok.eos_id().and_then(|e| tok.token_text(e)).unwrap_or("");
    let mut guard = MessageText::new(tok, template);
    let mut guarded_tools = None;
    if !src.special_tokens_in_messages {
        let err = |e: embody_engine::Error| e.to_string();
        messages = messages
            .iter()
            .map(|m| guard.message(m))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        guarded_tools = tools.map(|t| guard.value(t)).transpose().map_err(err)?;
    }
    let tools = guarded_tools.as_ref().or(tools);
    // The slots are the template's markup: placed after the guard.
    if let Some(v) = src.vision.as_ref().filter(|_| images > 0) {
        let Some(last_user) = messages.iter_mut().rev().find(|m| m.role == "user") else {
            return Err("images need a user message to go with".into());
        };
        last_user.content = format!("{}{}", v.slot.repeat(images), last_user.content);
    }
    let mut extra = None;
    let json_format = src.tool_format == ToolFormat::Json;
    let has_tool_turns = messages
        .iter()
        .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
    if json_format && (tools.is_some() || has_tool_turns) {
        messages = json_format_messages(&messages, tools, forced);
    } else if let Some(t) = tools {
        extra = Some(serde_json::json!({ "tools": t }));
    }
    let text = template
        .render(&messages, true, bos, eos, extra.as_ref())
        .map_err(|e| e.to_string())?;
    guard.encode(&text).map_err(|e| e.to_string())
}

/// Bytes of the text a request puts in its prompt: the raw prompt or the
/// messages (their content, names and tool-call arguments), and the tool
/// definitions.
fn prompt_text_bytes(
    raw: Option<&str>,
    messages: &[embody_protocol::Message],
    tools: Option<&serde_json::Value>,
) -> usize {
    /// Counts what serde would write, without keeping it.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let json = |v: &serde_json::Value| {
        let mut c = Count(0);
        let _ = serde_json::to_writer(&mut c, v);
        c.0
    };
    let messages: usize = messages
        .iter()
        .map(|m| {
            let calls: usize = m
                .tool_calls
                .iter()
                .map(|c| c.name.len() + json(&c.arguments))
                .sum();
            m.content.len() + m.name.as_ref().map_or(0, String::len) + calls
        })
        .sum();
    raw.map_or(0, str::len) + messages + tools.map_or(0, json)
}
