//! The OpenAI API's JSON, as embodyd speaks it: chat and text completion
//! requests, their answers (whole and streamed), model lists and errors, and
//! the conversion of a request into the one [`Request`] every interface uses.
//!
//! The HTTP server serves these types; the zenoh interface reads its `chat`
//! payloads with [`ChatCompletionRequest`] too, so both interfaces accept the
//! same fields with the same meaning. Requests are strict where OpenAI is
//! strict: unknown fields are refused, and so are values embodyd cannot honour
//! (`n` > 1, `logit_bias`, image URLs on the network) rather than being
//! silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    CameraRef, ErrorCode, FinishReason, Image, Message, Request, Role, SamplingParams,
    TokenLogprob, ToolCall, ToolChoice, Usage,
};

/// Most stop strings in one request.
pub const MAX_STOP: usize = 16;
/// Most alternatives `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Why a request cannot be turned into a [`Request`]: a message for people
/// and the offending parameter, as OpenAI's error `param` names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConversionError {
    /// What is wrong and what to do.
    pub message: String,
    /// The parameter at fault (`messages[1].content`), if one is.
    pub param: Option<String>,
}

impl ConversionError {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param.into()),
        }
    }
}

type Result<T> = std::result::Result<T, ConversionError>;

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// `POST /v1/chat/completions`: a chat completion request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// The model to use; must name the loaded model.
    #[serde(default)]
    pub model: String,
    /// The conversation, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Penalty in [-2, 2] on tokens by how often they appeared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Penalty in [-2, 2] on tokens that appeared at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Not supported; refused unless empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// embodyd's extension: end the request with a `timeout` error when it
    /// has not finished this many ms after it arrived (queueing included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Return the log-probability of each output token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// With `logprobs`: also this many most likely alternatives (0 to 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Most tokens to generate (older name of `max_completion_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Choices to generate; only 1 is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Constrain the output: `text`, `json_object` or `json_schema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Up to [`MAX_STOP`] strings that end generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopParam>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Options of a streamed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Softmax temperature in [0, 2]; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool the model must call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoiceParam>,
    /// Accepted; calls are made one at a time in the order the model writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// An id of the end user, for the caller's own records; accepted and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Accepted and ignored (nothing is stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    /// Accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    /// Extension (llama.cpp): keep only the `top_k` most likely tokens; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Extension (llama.cpp): drop tokens below `min_p` times the top probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Extension (llama.cpp): repeat penalty (1 turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
}

/// Who speaks a chat message, as OpenAI names roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    /// Instructions (newer name of `system`).
    Developer,
    /// Instructions.
    System,
    /// The person or program asking.
    User,
    /// The model's earlier answers.
    Assistant,
    /// A tool's answer to a call.
    Tool,
}

/// One message of a chat request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: ChatRole,
    /// Text, or parts of text and images; may be null on an assistant
    /// message that calls tools.
    #[serde(default)]
    pub content: Option<Content>,
    /// The speaker's name (ignored, except on `tool` messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallParam>>,
    /// A tool message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant message's refusal (kept as its text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// A message's content: a string or a list of parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts, in order.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image: a `data:` URL or `camera:NAME[?max_age_ms=N]`.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
}

/// An image part's location.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    /// `data:image/png;base64,...` or `camera:NAME[?max_age_ms=N]`.
    pub url: String,
    /// `auto`, `low` or `high`; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool call in an assistant message of the conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallParam {
    /// The call's id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    /// The function called.
    pub function: FunctionCall,
}

/// The only kind of tool: `function`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// A function tool.
    #[default]
    Function,
}

/// A function call: its name and its arguments as a JSON string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments, JSON text.
    pub arguments: String,
}

/// A tool the model may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    /// The function.
    pub function: FunctionDef,
}

/// A function tool's signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    /// Its name: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of its arguments object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Accepted: arguments of forced calls always follow the schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode or one named function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceParam {
    /// `none`, `auto` or `required`.
    Mode(ToolChoiceMode),
    /// `{"type": "function", "function": {"name": ...}}`.
    Named(NamedToolChoice),
}

/// The modes of `tool_choice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// Answer in text.
    None,
    /// Text or calls.
    Auto,
    /// At least one call.
    Required,
}

/// `tool_choice` naming one function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    /// The function.
    pub function: FunctionName,
}

/// A function named by `tool_choice`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    /// Its name.
    pub name: String,
}

/// `response_format`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON that follows a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// The schema of a `json_schema` response format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name.
    pub name: String,
    /// What the output is, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema; none allows any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Accepted: the schema is always enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopParam {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk carrying the usage (every other chunk has `usage: null`).
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`: a text completion request (the prompt is
/// continued as it is, without a chat template).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The model to use; must name the loaded model.
    #[serde(default)]
    pub model: String,
    /// The prompt: a string, or a list holding one string.
    pub prompt: PromptParam,
    /// Most tokens to generate; OpenAI's default is 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Softmax temperature in [0, 2]; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Choices to generate; only 1 is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Candidates to pick the best of; only 1 is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Options of a streamed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// embodyd's extension: end the request with a `timeout` error when it
    /// has not finished this many ms after it arrived (queueing included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Log-probabilities of each token and of this many alternatives (0 to 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Not supported; refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Not supported; refused when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Up to [`MAX_STOP`] strings that end generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopParam>,
    /// Penalty in [-2, 2] on tokens that appeared at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Penalty in [-2, 2] on tokens by how often they appeared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Not supported; refused unless empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// An id of the end user; accepted and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Extension (llama.cpp): keep only the `top_k` most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Extension (llama.cpp): drop tokens below `min_p` times the top probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Extension (llama.cpp): repeat penalty (1 turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
}

/// A completion prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptParam {
    /// One prompt.
    Text(String),
    /// A list of prompts (only one is supported) or token ids (refused).
    List(Vec<Value>),
}

impl Default for PromptParam {
    fn default() -> Self {
        PromptParam::Text(String::new())
    }
}

// ---------------------------------------------------------------------------
// Conversion to the protocol's request
// ---------------------------------------------------------------------------

/// The sampling fields both kinds of request share.
struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
}

impl SamplingFields {
    /// Starts from the daemon's defaults (llama.cpp's) and takes what is given.
    fn into_params(self) -> Result<SamplingParams> {
        let mut s = SamplingParams::default();
        let range = |name: &str, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(v)
            } else {
                Err(ConversionError::new(
                    name,
                    format!("{name} must be between {lo} and {hi}, not {v}"),
                ))
            }
        };
        if let Some(t) = self.temperature {
            s.temperature = range("temperature", t, 0.0, 2.0)?;
        }
        if let Some(p) = self.top_p {
            s.top_p = range("top_p", p, 0.0, 1.0)?;
            if s.top_p == 0.0 {
                return Err(ConversionError::new("top_p", "top_p must be above 0"));
            }
        }
        if let Some(p) = self.presence_penalty {
            s.presence_penalty = range("presence_penalty", p, -2.0, 2.0)?;
        }
        if let Some(p) = self.frequency_penalty {
            s.frequency_penalty = range("frequency_penalty", p, -2.0, 2.0)?;
        }
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        if let Some(p) = self.min_p {
            s.min_p = range("min_p", p, 0.0, 1.0)?;
        }
        if let Some(p) = self.repeat_penalty {
            s.repeat_penalty = range("repeat_penalty", p, 0.0, f32::MAX)?;
            if s.repeat_penalty == 0.0 {
                return Err(ConversionError::new(
                    "repeat_penalty",
                    "repeat_penalty must be above 0",
                ));
            }
        }
        // A negative seed keeps its bits: any integer is a valid seed.
        s.seed = self.seed.map(|v| v as u64);
        Ok(s)
    }
}

fn check_n(n: Option<u32>, param: &str) -> Result<()> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ConversionError::new(
            param,
            format!("{param} = {n} is not supported: embodyd generates one choice per request"),
        )),
    }
}

fn check_logit_bias(bias: &Option<serde_json::Map<String, Value>>) -> Result<()> {
    match bias {
        Some(m) if !m.is_empty() => Err(ConversionError::new(
            "logit_bias",
            "logit_bias is not supported by embodyd",
        )),
        _ => Ok(()),
    }
}

fn stops(stop: Option<StopParam>) -> Result<Vec<String>> {
    let list = match stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    if list.len() > MAX_STOP {
        return Err(ConversionError::new(
            "stop",
            format!("at most {MAX_STOP} stop strings, not {}", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ConversionError::new(
            "stop",
            "stop strings must not be empty",
        ));
    }
    Ok(list)
}

fn max_tokens(value: Option<u32>, param: &str) -> Result<Option<u32>> {
    match value {
        Some(0) => Err(ConversionError::new(
            param,
            format!("{param} must be at least 1"),
        )),
        v => Ok(v),
    }
}

/// A request's own deadline: at least 1 ms when given.
fn check_timeout(ms: Option<u64>) -> Result<Option<u64>> {
    match ms {
        Some(0) => Err(ConversionError::new(
            "timeout_ms",
            "timeout_ms must be at least 1 (leave it out for no deadline)",
        )),
        ms => Ok(ms),
    }
}

/// Whether a tool name is one OpenAI accepts: `[A-Za-z0-9_-]{1,64}`.
fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ChatCompletionRequest {
    /// Whether the answer is to be streamed.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }

    /// Checks the request and turns it into the protocol's [`Request`].
    /// Every way it can be wrong is a [`ConversionError`] naming the parameter.
    pub fn into_request(self) -> Result<Request> {
        check_n(self.n, "n")?;
        check_logit_bias(&self.logit_bias)?;
        if self.stream_options.is_some() && !self.is_stream() {
            return Err(ConversionError::new(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        if self.messages.is_empty() {
            return Err(ConversionError::new(
                "messages",
                "messages must hold at least one message",
            ));
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ConversionError::new(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true",
                ))
            }
            (true, Some(n)) if n > MAX_TOP_LOGPROBS => {
                return Err(ConversionError::new(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {n}"),
                ))
            }
            (true, n) => Some(n.unwrap_or(0)),
        };
        let max_tokens = match self.max_completion_tokens {
            Some(n) => max_tokens(Some(n), "max_completion_tokens")?,
            None => max_tokens(self.max_tokens, "max_tokens")?,
        };
        let sampling = SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            top_k: self.top_k,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
        }
        .into_params()?;

        let (tools, tool_choice) = convert_tools(self.tools, self.tool_choice)?;
        let response_format = match self.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(f) => {
                if matches!(
                    tool_choice,
                    Some(ToolChoice::Required | ToolChoice::Function { .. })
                ) {
                    return Err(ConversionError::new(
                        "response_format",
                        "response_format cannot be combined with a required tool call",
                    ));
                }
                if let ResponseFormat::JsonSchema { json_schema } = &f {
                    if let Some(s) = &json_schema.schema {
                        if !s.is_object() && !s.is_boolean() {
                            return Err(ConversionError::new(
                                "response_format.json_schema.schema",
                                "a JSON schema must be an object",
                            ));
                        }
                    }
                }
                Some(serde_json::to_value(f).expect("response formats serialize"))
            }
        };

        let mut req = Request::new(Vec::with_capacity(self.messages.len()));
        for (i, m) in self.messages.into_iter().enumerate() {
            let msg = convert_message(i, m, &mut req.images, &mut req.cameras)?;
            req.messages.push(msg);
        }
        req.sampling = sampling;
        req.max_tokens = max_tokens;
        req.stop = stops(self.stop)?;
        req.response_format = response_format;
        req.tools = tools;
        req.tool_choice = tool_choice;
        req.logprobs = logprobs;
        req.timeout_ms = check_timeout(self.timeout_ms)?;
        req.model = Some(self.model.clone()).filter(|m| !m.is_empty());
        Ok(req)
    }
}

/// Checks the tools and the choice among them; `tool_choice: none` hides
/// the tools from the model.
fn convert_tools(
    tools: Option<Vec<Tool>>,
    choice: Option<ToolChoiceParam>,
) -> Result<(Option<Value>, Option<ToolChoice>)> {
    let tools = tools.unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        let f = &t.function;
        if !valid_tool_name(&f.name) {
            return Err(ConversionError::new(
                format!("tools[{i}].function.name"),
                format!(
                    "tool name {:?} must be 1 to 64 letters, digits, '_' or '-'",
                    f.name
                ),
            ));
        }
        if tools[..i].iter().any(|o| o.function.name == f.name) {
            return Err(ConversionError::new(
                format!("tools[{i}].function.name"),
                format!("two tools are named {:?}", f.name),
            ));
        }
        if let Some(p) = &f.parameters {
            if !p.is_object() {
                return Err(ConversionError::new(
                    format!("tools[{i}].function.parameters"),
                    "a tool's parameters must be a JSON schema object",
                ));
            }
        }
    }
    let choice = match choice {
        None => None,
        Some(ToolChoiceParam::Mode(ToolChoiceMode::Auto)) => Some(ToolChoice::Auto),
        Some(ToolChoiceParam::Mode(ToolChoiceMode::None)) => Some(ToolChoice::None),
        Some(ToolChoiceParam::Mode(ToolChoiceMode::Required)) => Some(ToolChoice::Required),
        Some(ToolChoiceParam::Named(n)) => {
            if !tools.iter().any(|t| t.function.name == n.function.name) {
                return Err(ConversionError::new(
                    "tool_choice",
                    format!(
                        "tool_choice names {:?}, which is not among the tools",
                        n.function.name
                    ),
                ));
            }
            Some(ToolChoice::Function {
                name: n.function.name,
            })
        }
    };
    if tools.is_empty() {
        if matches!(choice, Some(ToolChoice::Required)) {
            return Err(ConversionError::new(
                "tool_choice",
                "tool_choice is required but no tools are given",
            ));
        }
        return Ok((None, None));
    }
    if choice == Some(ToolChoice::None) {
        return Ok((None, Some(ToolChoice::None)));
    }
    let value = serde_json::to_value(tools).expect("tools serialize");
    Ok((Some(value), choice))
}

fn convert_message(
    i: usize,
    m: ChatMessage,
    images: &mut Vec<Image>,
    cameras: &mut Vec<CameraRef>,
) -> Result<Message> {
    let param = |field: &str| format!("messages[{i}].{field}");
    let role = match m.role {
        ChatRole::Developer | ChatRole::System => Role::System,
        ChatRole::User => Role::User,
        ChatRole::Assistant => Role::Assistant,
        ChatRole::Tool => Role::Tool,
    };
    let mut text = String::new();
    match m.content {
        None => {
            let calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
            if role != Role::Assistant || (!calls && m.refusal.is_none()) {
                return Err(ConversionError::new(
                    param("content"),
                    format!("a {} message needs content", role.as_str()),
                ));
            }
        }
        Some(Content::Text(t)) => text = t,
        Some(Content::Parts(parts)) => {
            for (j, part) in parts.into_iter().enumerate() {
                match part {
                    ContentPart::Text { text: t } => {
                        if !text.is_empty() && !t.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&t);
                    }
                    ContentPart::ImageUrl { image_url } => {
                        let at = param(&format!("content[{j}].image_url.url"));
                        if role != Role::User {
                            return Err(ConversionError::new(
                                at,
                                "images may only appear in user messages",
                            ));
                        }
                        match parse_image_url(&image_url.url).map_err(|e| ConversionError {
                            param: Some(at),
                            ..e
                        })? {
                            ImageSource::Inline(img) => images.push(img),
                            ImageSource::Camera(cam) => cameras.push(cam),
                        }
                    }
                }
            }
        }
    }
    if let Some(r) = m.refusal {
        if text.is_empty() {
            text = r;
        }
    }
    let mut msg = Message::new(role, text);
    if let Some(calls) = m.tool_calls {
        if role != Role::Assistant && !calls.is_empty() {
            return Err(ConversionError::new(
                param("tool_calls"),
                "only assistant messages carry tool_calls",
            ));
        }
        msg.tool_calls = calls
            .into_iter()
            .map(|c| ToolCall {
                id: c.id,
                name: c.function.name,
                // Arguments that are not JSON stay as the string the model wrote.
                arguments: serde_json::from_str(&c.function.arguments)
                    .unwrap_or(Value::String(c.function.arguments)),
            })
            .collect();
    }
    match (role, m.tool_call_id) {
        (Role::Tool, None) => {
            return Err(ConversionError::new(
                param("tool_call_id"),
                "a tool message needs the tool_call_id of the call it answers",
            ))
        }
        (Role::Tool, id) => msg.tool_call_id = id,
        (_, Some(_)) => {
            return Err(ConversionError::new(
                param("tool_call_id"),
                "only tool messages carry a tool_call_id",
            ))
        }
        (_, None) => {}
    }
    msg.name = m.name;
    Ok(msg)
}

/// Where an image part's bytes come from.
#[derive(Debug)]
enum ImageSource {
    Inline(Image),
    Camera(CameraRef),
}

/// Reads `data:<media type>;base64,<data>` or `camera:NAME[?max_age_ms=N]`.
fn parse_image_url(url: &str) -> Result<ImageSource> {
    let bad = |m: String| ConversionError {
        message: m,
        param: None,
    };
    if let Some(rest) = url.strip_prefix("camera:") {
        let (name, query) = match rest.split_once('?') {
            Some((n, q)) => (n, Some(q)),
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("camera: URLs name a camera, as camera:front".into()));
        }
        let mut cam = CameraRef {
            name: name.to_string(),
            max_age_ms: None,
        };
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("max_age_ms", v)) => {
                    cam.max_age_ms = Some(v.parse().map_err(|_| {
                        bad(format!(
                            "max_age_ms must be a whole number of milliseconds, not {v:?}"
                        ))
                    })?)
                }
                _ => {
                    return Err(bad(format!(
                        "unknown camera URL parameter {pair:?}; only max_age_ms is known"
                    )))
                }
            }
        }
        return Ok(ImageSource::Camera(cam));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(40).collect();
        return Err(bad(format!(
            "image URL {shown:?} is neither a data: URL nor camera:NAME; embodyd fetches nothing from the network"
        )));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(bad("a data: URL needs a ',' before its data".into()));
    };
    let Some(media_type) = meta.strip_suffix(";base64") else {
        return Err(bad(
            "image data: URLs must be base64 (data:image/png;base64,...)".into(),
        ));
    };
    if !media_type.starts_with("image/") {
        return Err(bad(format!(
            "a data: URL of media type {media_type:?} is not an image"
        )));
    }
    let data = base64_decode(data.as_bytes())
        .ok_or_else(|| bad("the data: URL's base64 is malformed".into()))?;
    if data.is_empty() {
        return Err(bad("the data: URL holds no bytes".into()));
    }
    Ok(ImageSource::Inline(Image {
        media_type: media_type.to_string(),
        data,
    }))
}

/// Standard base64 (RFC 4648 §4), padding optional. `None` on any other byte.
pub fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let trimmed = match input {
        [rest @ .., b'=', b'='] => rest,
        [rest @ .., b'='] => rest,
        all => all,
    };
    if trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() / 4 * 3 + 2);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        let bits = 6 * chunk.len() as u32;
        acc <<= 24 - bits;
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..1 + (bits / 8) as usize]);
    }
    Some(out)
}

impl CompletionRequest {
    /// Whether the answer is to be streamed.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }

    /// Checks the request and turns it into the protocol's [`Request`], with
    /// the prompt in [`Request::prompt`].
    pub fn into_request(self) -> Result<Request> {
        check_n(self.n, "n")?;
        check_n(self.best_of, "best_of")?;
        check_logit_bias(&self.logit_bias)?;
        if self.echo == Some(true) {
            return Err(ConversionError::new(
                "echo",
                "echo is not supported by embodyd",
            ));
        }
        if self.suffix.is_some() {
            return Err(ConversionError::new(
                "suffix",
                "suffix is not supported by embodyd",
            ));
        }
        if self.stream_options.is_some() && !self.is_stream() {
            return Err(ConversionError::new(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let prompt = match self.prompt {
            PromptParam::Text(t) => t,
            PromptParam::List(mut l) if l.len() == 1 => match l.pop() {
                Some(Value::String(s)) => s,
                _ => {
                    return Err(ConversionError::new(
                        "prompt",
                        "prompts of token ids are not supported; send the text",
                    ))
                }
            },
            PromptParam::List(l) => {
                return Err(ConversionError::new(
                    "prompt",
                    format!("embodyd completes one prompt per request, not {}", l.len()),
                ))
            }
        };
        if prompt.is_empty() {
            return Err(ConversionError::new("prompt", "the prompt is empty"));
        }
        let logprobs = match self.logprobs {
            Some(n) if n > 5 => {
                return Err(ConversionError::new(
                    "logprobs",
                    format!("logprobs must be between 0 and 5, not {n}"),
                ))
            }
            n => n,
        };
        let sampling = SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            top_k: self.top_k,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
        }
        .into_params()?;
        let mut req = Request::new(Vec::new());
        req.prompt = Some(prompt);
        req.timeout_ms = check_timeout(self.timeout_ms)?;
        req.model = Some(self.model.clone()).filter(|m| !m.is_empty());
        req.sampling = sampling;
        req.max_tokens = Some(max_tokens(self.max_tokens, "max_tokens")?.unwrap_or(16));
        req.stop = stops(self.stop)?;
        req.logprobs = logprobs;
        Ok(req)
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageInfo {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl From<Usage> for UsageInfo {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// The answer to a non-streamed chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The one choice.
    pub choices: Vec<ChatChoice>,
    /// Tokens used.
    pub usage: UsageInfo,
    /// Identifies the daemon build and model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The model's message.
    pub message: AssistantMessage,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: Option<String>,
}

/// The model's message in a chat completion.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text; null when the message only calls tools.
    pub content: Option<String>,
    /// Always null: embodyd does not refuse in a separate field.
    pub refusal: Option<String>,
    /// The calls the model made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallParam>,
}

/// `logprobs` of a chat choice.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    /// One entry per generated token.
    pub content: Vec<LogprobEntry>,
    /// Always null.
    pub refusal: Option<Vec<LogprobEntry>>,
}

/// The log-probability of one generated token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogprobEntry {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Option<Vec<u8>>,
    /// The most likely alternatives.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprobEntry>,
}

/// One alternative token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprobEntry {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Option<Vec<u8>>,
}

impl From<&TokenLogprob> for LogprobEntry {
    fn from(t: &TokenLogprob) -> Self {
        Self {
            token: t.token.clone(),
            logprob: t.logprob,
            bytes: Some(t.bytes.clone()),
            top_logprobs: t
                .top
                .iter()
                .map(|a| TopLogprobEntry {
                    token: a.token.clone(),
                    logprob: a.logprob,
                    bytes: Some(a.bytes.clone()),
                })
                .collect(),
        }
    }
}

/// One chunk of a streamed chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of one answer.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// Identifies the daemon build and model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// The one choice's delta; empty in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// With `include_usage`: null on every chunk but the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageInfo>>,
}

/// A choice's change in one chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: ChunkDelta,
    /// Log-probabilities of this chunk's tokens, when asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set on the last chunk of the choice.
    pub finish_reason: Option<String>,
}

/// What a chunk adds to the message.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkDelta {
    /// `assistant` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New or continued tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A tool call in a stream: its index, and on its first chunk its id and name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the message.
    pub index: u32,
    /// The call's id (first chunk of the call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first chunk of the call).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FunctionKind>,
    /// The name and a piece of the arguments.
    pub function: FunctionCallDelta,
}

/// A piece of a function call in a stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// The function's name (first chunk of the call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More of the arguments' JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// A protocol tool call as OpenAI shows it (arguments as JSON text).
pub fn tool_call_param(call: &ToolCall) -> ToolCallParam {
    ToolCallParam {
        id: call.id.clone(),
        kind: FunctionKind::Function,
        function: FunctionCall {
            name: call.name.clone(),
            arguments: match &call.arguments {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            },
        },
    }
}

/// The answer to a non-streamed text completion (also each chunk of a
/// streamed one, with `object` `text_completion`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The one choice (none in a usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Tokens used (streams: only the usage chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    /// Identifies the daemon build and model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

/// One choice of a text completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The text.
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null until the last chunk of a stream.
    pub finish_reason: Option<String>,
}

/// The legacy completions' log-probability layout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// For each token, its alternatives by text.
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    /// Each token's offset in the text, in bytes.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends tokens that start at byte `offset` of the text.
    pub fn extend(&mut self, tokens: &[TokenLogprob], mut offset: usize) {
        for t in tokens {
            self.tokens.push(t.token.clone());
            self.token_logprobs.push(t.logprob);
            self.top_logprobs.push(
                t.top
                    .iter()
                    .map(|a| (a.token.clone(), Value::from(a.logprob)))
                    .collect(),
            );
            self.text_offset.push(offset);
            offset += t.bytes.len();
        }
    }
}

/// `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The loaded model.
    pub data: Vec<ModelObject>,
}

/// A model in `/v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelObject {
    /// The name to put in requests' `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds when the daemon loaded it.
    pub created: u64,
    /// Always `embodyd`.
    pub owned_by: String,
}

/// An error answer: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong, in OpenAI's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// For people.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The parameter at fault.
    pub param: Option<String>,
    /// A stable code (embodyd's [`ErrorCode`] names, or OpenAI's where it has one).
    pub code: Option<String>,
}

impl ErrorResponse {
    /// An error answer.
    pub fn new(
        kind: &str,
        message: impl Into<String>,
        param: Option<String>,
        code: Option<&str>,
    ) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param,
                code: code.map(str::to_string),
            },
        }
    }

    /// The answer for a refused conversion.
    pub fn from_conversion(e: ConversionError) -> Self {
        Self::new(
            "invalid_request_error",
            e.message,
            e.param,
            Some("bad_request"),
        )
    }

    /// The answer for a stream's terminal error event.
    pub fn from_code(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(error_type(code), message, None, Some(code.as_str()))
    }
}

/// OpenAI's error `type` for an error code.
pub fn error_type(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest
        | ErrorCode::BadFrame
        | ErrorCode::UnsupportedVersion
        | ErrorCode::VisionUnsupported
        | ErrorCode::ModelNotFound => "invalid_request_error",
        ErrorCode::Overloaded | ErrorCode::OutOfMemory => "rate_limit_error",
        ErrorCode::Forbidden => "permission_error",
        ErrorCode::Unavailable | ErrorCode::DecoderRestarted => "service_unavailable",
        ErrorCode::Timeout => "timeout_error",
        ErrorCode::ModelError | ErrorCode::Internal | ErrorCode::Unknown => "server_error",
    }
}

/// The HTTP status for an error code.
pub fn http_status(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest
        | ErrorCode::BadFrame
        | ErrorCode::UnsupportedVersion
        | ErrorCode::VisionUnsupported => 400,
        ErrorCode::Forbidden => 403,
        ErrorCode::ModelNotFound => 404,
        ErrorCode::OutOfMemory => 507,
        ErrorCode::Overloaded => 429,
        ErrorCode::Unavailable | ErrorCode::DecoderRestarted => 503,
        ErrorCode::Timeout => 504,
        ErrorCode::ModelError | ErrorCode::Internal | ErrorCode::Unknown => 500,
    }
}

/// OpenAI's `finish_reason` for how a request ended.
pub fn finish_reason(reason: FinishReason, called_tools: bool) -> &'static str {
    match reason {
        _ if called_tools => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Reads a chat request from JSON, as the HTTP server and the zenoh `chat`
/// queryable do, and converts it.
pub fn chat_request_from_json(bytes: &[u8]) -> Result<(ChatCompletionRequest, Request)> {
    let parsed: ChatCompletionRequest = serde_json::from_slice(bytes).map_err(json_error)?;
    let req = parsed.clone().into_request()?;
    Ok((parsed, req))
}

/// A JSON error as a conversion error, naming the unknown field if that is
/// what is wrong.
pub fn json_error(e: serde_json::Error) -> ConversionError {
    let message = e.to_string();
    let param = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
        .map(str::to_string);
    ConversionError {
        message: format!("invalid request body: {message}"),
        param,
    }
}

/// The fuzz target's body: reads bytes as a chat request and as a text
/// completion request and converts what parses. A request that parses must
/// survive a round trip through JSON unchanged, conversion included.
/// Returns whether either kind of request was accepted. Never panics on any
/// input (the check is an assertion on our own serialization).
pub fn exercise(bytes: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(chat) = serde_json::from_slice::<ChatCompletionRequest>(bytes) {
        let again: ChatCompletionRequest =
            serde_json::from_slice(&serde_json::to_vec(&chat).expect("serializes"))
                .expect("a serialized request parses");
        let (a, b) = (chat.into_request(), again.into_request());
        assert_eq!(a, b, "conversion differs after a JSON round trip");
        accepted |= a.is_ok();
    }
    if let Ok(c) = serde_json::from_slice::<CompletionRequest>(bytes) {
        accepted |= c.into_request().is_ok();
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Result<Request> {
        chat_request_from_json(v.to_string().as_bytes()).map(|(_, r)| r)
    }

    #[test]
    fn plain_chat_maps_every_field() {
        let r = chat(json!({
            "model": "m", "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}
            ],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": -1,
            "stop": "\n", "presence_penalty": 1.0, "frequency_penalty": -1.0,
            "logprobs": true, "top_logprobs": 3, "user": "u1", "n": 1
        }))
        .unwrap();
        assert_eq!(r.messages[0], Message::system("be brief"));
        assert_eq!(r.messages[1].content, "hi\nthere");
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.sampling.temperature, 0.5);
        assert_eq!(r.sampling.top_p, 0.9);
        assert_eq!(r.sampling.seed, Some(u64::MAX));
        assert_eq!(r.sampling.presence_penalty, 1.0);
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.logprobs, Some(3));
    }

    #[test]
    fn refusals_name_their_parameter() {
        let cases = [
            (json!({"messages": [], "model": "m"}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}),
                "logit_bias",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "foo": 1}),
                "foo",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                "messages[0].content[0].image_url.url",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
        let e = chat(json!({"messages": "hi"})).unwrap_err();
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn images_and_cameras() {
        let r = chat(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "camera:front?max_age_ms=500"}},
            {"type": "image_url", "image_url": {"url": "camera:wrist", "detail": "low"}}
        ]}]}))
        .unwrap();
        assert_eq!(r.images.len(), 1);
        assert_eq!(r.images[0].media_type, "image/png");
        assert_eq!(r.images[0].data, b"\x89PNG\r\n\x1a\n");
        assert_eq!(
            r.cameras,
            vec![
                CameraRef {
                    name: "front".into(),
                    max_age_ms: Some(500)
                },
                CameraRef {
                    name: "wrist".into(),
                    max_age_ms: None
                },
            ]
        );
        for url in [
            "data:image/png;base64,@@@@",
            "data:text/plain;base64,aGk=",
            "camera:",
            "camera:x?fps=3",
            "data:image/png,raw",
        ] {
            let body = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]});
            assert!(chat(body).is_err(), "{url}");
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (enc, dec) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ] {
            assert_eq!(
                base64_decode(enc.as_bytes()).unwrap(),
                dec.as_bytes(),
                "{enc}"
            );
        }
        assert!(base64_decode(b"Z").is_none());
        assert!(base64_decode(b"Zm9v\n").is_none());
    }

    #[test]
    fn tools_round_trip_through_messages() {
        let r = chat(json!({
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4 C"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
        }))
        .unwrap();
        assert_eq!(
            r.messages[1].tool_calls[0].arguments,
            json!({"city": "Oslo"})
        );
        assert_eq!(r.messages[2].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(
            r.tool_choice,
            Some(ToolChoice::Function {
                name: "get_weather".into()
            })
        );
        assert_eq!(
            r.tools.as_ref().unwrap()[0]["function"]["name"],
            "get_weather"
        );
        // `none` hides the tools.
        let r = chat(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}))
        .unwrap();
        assert_eq!((r.tools, r.tool_choice), (None, Some(ToolChoice::None)));
        let e = chat(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = chat(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "bad name"}}]}))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
    }

    #[test]
    fn response_formats() {
        let base = |f: Value| json!({"messages": [{"role": "user", "content": "x"}], "response_format": f});
        assert_eq!(
            chat(base(json!({"type": "text"}))).unwrap().response_format,
            None
        );
        let r = chat(base(json!({"type": "json_object"}))).unwrap();
        assert_eq!(r.response_format, Some(json!({"type": "json_object"})));
        let r = chat(base(json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}, "strict": true}}))).unwrap();
        assert_eq!(
            r.response_format.unwrap()["json_schema"]["schema"],
            json!({"type": "integer"})
        );
        assert!(chat(base(
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": 3}})
        ))
        .is_err());
        assert!(chat(base(json!({"type": "yaml"}))).is_err());
    }

    #[test]
    fn completions() {
        let r: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": ["Once"], "logprobs": 2}))
                .unwrap();
        let r = r.into_request().unwrap();
        assert_eq!(
            (r.prompt.as_deref(), r.max_tokens, r.logprobs),
            (Some("Once"), Some(16), Some(2))
        );
        assert!(r.messages.is_empty());
        for bad in [
            json!({"prompt": [1, 2]}),
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": "x", "echo": true}),
            json!({"prompt": ""}),
        ] {
            let r: CompletionRequest = serde_json::from_value(bad.clone()).unwrap();
            assert!(r.into_request().is_err(), "{bad}");
        }
    }

    #[test]
    fn chunks_spell_usage_null_until_the_end() {
        let chunk = ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk".into(),
            created: 1,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![],
            usage: Some(None),
        };
        assert!(serde_json::to_string(&chunk)
            .unwrap()
            .contains(r#""usage":null"#));
        let chunk = ChatCompletionChunk {
            usage: None,
            ..chunk
        };
        assert!(!serde_json::to_string(&chunk).unwrap().contains("usage"));
    }
}
