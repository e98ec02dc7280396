//! The vocabulary shared by every interface of embodyd and by the client library:
//! chat messages, image inputs, sampling parameters, the [`Request`] type and the
//! stream of [`Event`]s that answers it, plus the IPC [`wire`] format.
//!
//! The one thing to understand first: **every request is answered by a stream
//! that ends with exactly one terminal event**, [`Event::Finished`] or
//! [`Event::Error`]. A refusal (a bad request, a full queue) is not a different
//! kind of answer: it is a stream holding one `Error` event. Interfaces (the
//! Unix socket, HTTP, zenoh) map this stream onto their own transport and invent
//! no semantics of their own.
//!
//! This crate stays free of heavy dependencies (serde and serde_json only) so
//! that the client library linked into robot programs stays light.
#![warn(missing_docs)]

pub mod openai;
pub mod wire;

use serde::{Deserialize, Serialize};

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person or program asking.
    User,
    /// The model's earlier answers.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// The role as chat templates spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The tools an assistant message called (empty for plain answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a `tool` message: the tool's name; otherwise the speaker's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A message with this role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// The answer of a tool to the call `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// A call of a tool, as the model made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// The call's id, to match the tool's answer to it.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, as JSON (an object when the model followed the schema).
    pub arguments: serde_json::Value,
}

/// Whether and which tool the model must call (OpenAI `tool_choice`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolChoice {
    /// The model answers in text or calls tools, as it sees fit.
    #[default]
    Auto,
    /// The model answers in text; the tools are not shown to it.
    None,
    /// The model must call one of the tools; its arguments follow the
    /// tool's JSON schema.
    Required,
    /// The model must call this tool; its arguments follow its JSON schema.
    Function {
        /// The tool's name.
        name: String,
    },
}

/// The log-probability of one token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopLogprob {
    /// The token's text (lossy where it holds part of a UTF-8 character).
    pub token: String,
    /// The token's bytes.
    #[serde(default)]
    pub bytes: Vec<u8>,
    /// Natural log of its probability under the model.
    pub logprob: f32,
}

/// The log-probability of a sampled token and of its most likely alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenLogprob {
    /// The sampled token's text (lossy where it holds part of a UTF-8 character).
    pub token: String,
    /// The sampled token's bytes.
    #[serde(default)]
    pub bytes: Vec<u8>,
    /// Natural log of its probability under the model.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// An image given with a request: encoded bytes (PNG, JPEG, ...) and their
/// media type.
///
/// The bytes never appear in serialized metadata (no base64): on the IPC wire
/// they travel as a raw attachment after the frame's JSON (see [`wire`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// The media type, such as `image/png` or `image/jpeg`.
    pub media_type: String,
    /// The encoded image.
    #[serde(skip)]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("media_type", &self.media_type)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The latest frame of a configured camera, attached to a request by the
/// camera's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraRef {
    /// The camera's name in the configuration.
    pub name: String,
    /// Refuse the request when the latest frame is older than this, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
}

/// Sampling parameters. Missing fields take their defaults, the same as
/// llama.cpp's common sampler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy decoding. Default 0.8.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns it off. Default 40.
    pub top_k: u32,
    /// Nucleus threshold in (0, 1]; 1 turns it off. Default 0.95.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability, in [0, 1]. Default 0.05.
    pub min_p: f32,
    /// Repeat penalty (> 0; 1 turns it off). Default 1.
    pub repeat_penalty: f32,
    /// Recent tokens the penalties look at; 0 turns them off. Default 64.
    pub repeat_last_n: u32,
    /// OpenAI presence penalty, in [-2, 2]. Default 0.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, in [-2, 2]. Default 0.
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling; none seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range, once for every door. The error names the
    /// field, its allowed range and the value given, so a client can fix its
    /// request.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |field, range, value| {
            Err(SamplingError {
                field,
                range,
                value,
            })
        };
        if !self.temperature.is_finite() {
            return bad(
                "temperature",
                "a finite number (<= 0 means greedy)",
                self.temperature,
            );
        }
        // Written as negated "inside" tests so that NaN fails them.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1] (1 turns it off)", self.top_p);
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad("min_p", "in [0, 1] (0 turns it off)", self.min_p);
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(
                "repeat_penalty",
                "finite and > 0 (1 turns it off)",
                self.repeat_penalty,
            );
        }
        if !(self.presence_penalty >= -2.0 && self.presence_penalty <= 2.0) {
            return bad("presence_penalty", "in [-2, 2]", self.presence_penalty);
        }
        if !(self.frequency_penalty >= -2.0 && self.frequency_penalty <= 2.0) {
            return bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty);
        }
        Ok(())
    }

    /// Whether decoding is greedy (`temperature <= 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }

    /// The first field holding infinity or NaN, which JSON cannot carry
    /// (a number beyond `f32`'s range reads as infinity).
    pub fn non_finite_field(&self) -> Option<&'static str> {
        [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_finite())
        .map(|(name, _)| name)
    }
}

/// A sampling parameter outside its range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("sampling parameter {field} must be {range}, got {value}")]
pub struct SamplingError {
    /// The field, as the wire names it.
    pub field: &'static str,
    /// What it must be.
    pub range: &'static str,
    /// What it was.
    pub value: f32,
}

/// One chat request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Caller-chosen id, unique among the caller's live requests on one
    /// connection; events and cancellation refer to it.
    #[serde(default)]
    pub id: u64,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// Images that go with the conversation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    /// Configured cameras whose latest frame goes with the conversation,
    /// after `images`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cameras: Vec<CameraRef>,
    /// How to pick tokens.
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Most tokens to generate; none takes the daemon's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Strings that end generation (not included in the output).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// A constraint on the output (OpenAI `response_format`), kept as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<serde_json::Value>,
    /// Tools the model may call (OpenAI `tools`), kept as JSON and handed to
    /// the chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<serde_json::Value>,
    /// Whether and which tool must be called; none means `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Report each sampled token's log-probability, with this many of the
    /// most likely alternatives (0 to 20); none reports nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// A raw prompt, tokenized as it is instead of rendering `messages`
    /// through the chat template (OpenAI `/v1/completions`). `messages`
    /// must then be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Higher runs first; equal priorities run in arrival order.
    #[serde(default)]
    pub priority: i32,
    /// End the request with a [`ErrorCode::Timeout`] error when it has not
    /// finished this many ms after it arrived (queueing included); the
    /// daemon's `decoder.request_timeout_ms` applies when it is shorter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The model to run it on, by the name the daemon serves it under (its
    /// `[[models]]` name, file name or the model's own name); none takes the
    /// daemon's default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Request {
    /// A request holding these messages, with default settings.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            id: 0,
            messages,
            images: Vec::new(),
            cameras: Vec::new(),
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            response_format: None,
            tools: None,
            tool_choice: None,
            logprobs: None,
            prompt: None,
            priority: 0,
            timeout_ms: None,
            model: None,
        }
    }

    /// A request of one user message.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new(vec![Message::user(text)])
    }

    /// Sets the most tokens to generate.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sets the sampling parameters.
    pub fn sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Sets the request's deadline, counted from its arrival.
    pub fn timeout(mut self, t: std::time::Duration) -> Self {
        self.timeout_ms = Some(t.as_millis().max(1) as u64);
        self
    }

    /// Names the model to run on.
    pub fn on_model(mut self, name: impl Into<String>) -> Self {
        self.model = Some(name.into());
        self
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its answer or a stop string appeared.
    Stop,
    /// The token limit or the context length was reached.
    Length,
    /// The caller cancelled the request.
    Cancelled,
}

/// Tokens a request used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
}

/// Stable error codes. Clients match on these; the message is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or cannot be served as asked.
    BadRequest,
    /// An IPC frame could not be decoded; the daemon closes the connection.
    BadFrame,
    /// The peer speaks a wire version this side does not.
    UnsupportedVersion,
    /// The queue is full; retry later.
    Overloaded,
    /// The daemon is not serving requests now (starting, shutting down).
    Unavailable,
    /// The request has images and the loaded model has no vision support.
    VisionUnsupported,
    /// The model failed while running the request.
    ModelError,
    /// The decoder failed while it ran this request and was restarted;
    /// the request may be sent again.
    DecoderRestarted,
    /// The daemon does not allow the operation (a switch is off).
    Forbidden,
    /// The request ran past its deadline (its `timeout_ms`, or the
    /// daemon's `decoder.request_timeout_ms`) and was ended.
    Timeout,
    /// A bug or an unexpected condition in the daemon.
    Internal,
    /// The request names a model the daemon does not serve.
    ModelNotFound,
    /// A model load was refused: its memory is over the daemon's budget.
    OutOfMemory,
    /// A code this version does not know (from a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::VisionUnsupported => "vision_unsupported",
            ErrorCode::ModelError => "model_error",
            ErrorCode::DecoderRestarted => "decoder_restarted",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::OutOfMemory => "out_of_memory",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether sending the same request again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Overloaded | ErrorCode::Unavailable | ErrorCode::DecoderRestarted
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of the stream that answers a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The request was admitted and its prompt is being processed.
    Started {
        /// Prompt tokens.
        prompt_tokens: u32,
    },
    /// New text and the tokens that produced it. The text may be empty while
    /// a multi-byte character or a possible stop string is pending.
    Delta {
        /// Text.
        text: String,
        /// Token ids sampled since the last delta.
        token_ids: Vec<u32>,
        /// Log-probabilities of `token_ids`, when the request asked for them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprob>,
    },
    /// The model asked to call a tool.
    ToolCall {
        /// The call's id, to match the tool's answer to it.
        id: String,
        /// The tool's name.
        name: String,
        /// The arguments, as JSON.
        arguments: serde_json::Value,
    },
    /// The request ended normally. Terminal.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Tokens used.
        usage: Usage,
    },
    /// The request failed. Terminal.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// What went wrong and what to do, for people.
        message: String,
    },
}

impl Event {
    /// An error event.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Event::Error {
            code,
            message: message.into(),
        }
    }

    /// Whether this event ends the stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Error { .. })
    }
}

/// What a status query answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// The model is loaded and the decoder is running: requests are served.
    pub ready: bool,
    /// The decoder is making progress (what the systemd watchdog follows).
    pub healthy: bool,
    /// The daemon is shutting down and takes no new requests.
    pub draining: bool,
    /// The loaded model.
    pub model: ModelStatus,
    /// The backend running the model ("cpu").
    pub backend: String,
    /// Compute threads.
    pub threads: u32,
    /// Requests decoding now.
    pub running: u32,
    /// Requests waiting for a decoding slot.
    pub queued: u32,
    /// Most requests that may wait; more are refused as overloaded.
    pub max_queued: u32,
    /// KV cache blocks in use, those the prefix cache holds included.
    pub kv_blocks_used: u32,
    /// KV cache blocks in the pool.
    pub kv_blocks_total: u32,
    /// Tokens per KV block.
    pub kv_block_tokens: u32,
    /// How the KV cache stores keys and values ("f16", "q8_0", "q4_0").
    #[serde(default)]
    pub kv_cache_type: String,
    /// KV blocks the prefix cache holds (counted in `kv_blocks_used`; freed
    /// when the pool needs them).
    pub kv_blocks_cached: u32,
    /// Prompt tokens served from the prefix cache instead of prefilled.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_lookup_tokens: u64,
    /// KV blocks evicted from the prefix cache (for room or by a flush).
    pub prefix_evicted_blocks: u64,
    /// Forward passes run since the start.
    pub steps: u64,
    /// Tokens drafted by prompt lookup (speculative decoding) since the start.
    #[serde(default)]
    pub draft_tokens: u64,
    /// Drafted tokens the model confirmed: each saved a forward pass.
    #[serde(default)]
    pub draft_accepted_tokens: u64,
    /// Times the decoder was restarted after a failure.
    pub decoder_restarts: u64,
    /// Resident memory of the daemon, in bytes.
    pub rss_bytes: u64,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Every model the daemon knows, in its configured order (the first is
    /// the default): those served, loading, failed and unloaded. The fields
    /// above describe the default model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelEntry>,
}

/// Where a model is in its life in the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Being loaded (or, while another copy serves, being replaced).
    Loading,
    /// Serving requests.
    Ready,
    /// Finishing the requests it holds before it is unloaded; takes no new ones.
    Draining,
    /// Known (configured or loaded before) and not in memory.
    #[default]
    Unloaded,
    /// Its last load failed; `error` says why.
    Failed,
    /// A state this version does not know (from a newer peer).
    #[serde(other)]
    Unknown,
}

impl ModelState {
    /// The state as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Draining => "draining",
            ModelState::Unloaded => "unloaded",
            ModelState::Failed => "failed",
            ModelState::Unknown => "unknown",
        }
    }
}

/// One model in [`Status::models`] and in the daemon's model events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelEntry {
    /// The name requests use (`model`).
    pub name: String,
    /// Where it is.
    pub state: ModelState,
    /// The model file or folder.
    pub path: String,
    /// The architecture, once loaded ("llama").
    pub arch: String,
    /// The backend and device that run it.
    pub backend: String,
    /// Longest context served, in tokens (0 until loaded).
    pub context_length: u32,
    /// Accepts images.
    pub vision: bool,
    /// Its chat template can offer tools.
    pub tools: bool,
    /// Requests decoding now.
    pub running: u32,
    /// Requests waiting for a decoding slot.
    pub queued: u32,
    /// Memory counted against the daemon's budget: weights, KV cache and
    /// image cache, in bytes.
    pub memory_bytes: u64,
    /// Unloaded after this many ms without requests; 0 means never.
    pub keep_alive_ms: u64,
    /// Why its last load failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A model to load at run time (HTTP `POST /v1/models`, IPC, zenoh, `embody
/// load`). Fields left out take the daemon's `[model]` and `[cache]` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// The name requests will use. Loading under the name of a served model
    /// replaces it: requests running on the old one finish there.
    pub name: String,
    /// A GGUF file, a Hugging Face folder, or a Hugging Face id
    /// (`org/name[@revision][:QUANT]`) found in the local Hugging Face
    /// cache. Empty: the configured entry of that name.
    pub path: String,
    /// llama.cpp's vision projector GGUF that goes with a GGUF model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmproj: Option<String>,
    /// "cpu", "vulkan", ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The GPU of a GPU backend: an index or part of its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Compute threads; 0 means one per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Longest context, in tokens; 0 means the model's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// Memory for its KV cache, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_mb: Option<usize>,
    /// How its KV cache stores keys and values ("f16", "q8_0", "q4_0").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_type: Option<String>,
    /// Quantize a Hugging Face folder's float weights as they load ("q8_0").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    /// Unload after this many ms without requests; 0 means never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<u64>,
}

/// The loaded model, as [`Status`] reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStatus {
    /// The model's name from its file, or the file name.
    pub name: String,
    /// The architecture ("llama").
    pub arch: String,
    /// The model file.
    pub path: String,
    /// Longest context served, in tokens.
    pub context_length: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Bytes of weights.
    pub weights_bytes: u64,
    /// Whether the model accepts images.
    pub vision: bool,
}

/// A deliberate failure, for tests of the daemon's fault tolerance. The
/// daemon refuses these with [`ErrorCode::Forbidden`] unless its
/// `fault_injection` switch is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Panic the decoder's thread before its next step.
    PanicDecoder,
    /// Stop the decoder's thread from making progress for this long.
    WedgeDecoder {
        /// Milliseconds.
        ms: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_a_type_tag_and_snake_case_codes() {
        let e = Event::error(ErrorCode::VisionUnsupported, "no vision");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"error","code":"vision_unsupported","message":"no vision"}"#
        );
        let f = Event::Finished {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
            },
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"type":"finished","reason":"length","usage":{"prompt_tokens":3,"completion_tokens":4}}"#
        );
        assert!(f.is_terminal() && e.is_terminal());
        assert!(!Event::Started { prompt_tokens: 1 }.is_terminal());
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_read_as_unknown() {
        let e: Event =
            serde_json::from_str(r#"{"type":"error","code":"gpu_on_fire","message":"m"}"#).unwrap();
        assert_eq!(e, Event::error(ErrorCode::Unknown, "m"));
    }

    #[test]
    fn request_defaults_and_strictness() {
        let r: Request =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r, Request::user("hi"));
        assert_eq!(r.sampling.top_k, 40);
        let err = serde_json::from_str::<Request>(r#"{"messages":[],"max_token":3}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_token`"),
            "{err}"
        );
        let err =
            serde_json::from_str::<Request>(r#"{"messages":[{"role":"robot","content":""}]}"#)
                .unwrap_err();
        assert!(err.to_string().contains("unknown variant `robot`"), "{err}");
    }

    #[test]
    fn image_bytes_never_reach_json() {
        let mut r = Request::user("what is this?");
        r.images.push(Image {
            media_type: "image/png".into(),
            data: vec![0x89, b'P', b'N', b'G'],
        });
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""images":[{"media_type":"image/png"}]"#),
            "{json}"
        );
        assert_eq!(
            format!("{:?}", r.images[0]),
            r#"Image { media_type: "image/png", bytes: 4 }"#
        );
    }

    #[test]
    fn retryable_codes() {
        assert!(ErrorCode::Overloaded.is_retryable());
        assert!(ErrorCode::DecoderRestarted.is_retryable());
        assert!(!ErrorCode::BadRequest.is_retryable());
        assert_eq!(ErrorCode::DecoderRestarted.to_string(), "decoder_restarted");
    }
}
