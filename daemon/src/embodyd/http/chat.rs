//! `POST /v1/chat/completions`: whole answers and streamed chunks.

use std::collections::VecDeque;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use embody_protocol::openai::{
    self, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChoiceLogprobs, ChunkChoice, ChunkDelta, FunctionCallDelta, FunctionKind, LogprobEntry,
    ToolCallDelta, UsageInfo,
};
use embody_protocol::{Event, ToolCall, Usage};

use super::errors::ApiError;
use super::metrics::Tracker;
use super::sse::{self, Chunks};
use super::{new_id, parse_body, start, unix_now, Shared};

/// The handler.
pub(crate) async fn handle(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut tracker = Tracker::new(st.metrics.clone(), "http");
    let parsed: Result<ChatCompletionRequest, ApiError> = parse_body(body);
    let chat = match parsed.and_then(|c| st.check_model(&c.model).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            tracker.finish(e.outcome());
            return e.into_response();
        }
    };
    if let Some(user) = &chat.user {
        tracing::debug!(%user, "chat completion");
    }
    let (stream, include_usage) = (chat.is_stream(), chat.include_usage());
    let logprobs = chat.logprobs.unwrap_or(false);
    let model = chat.model.clone();
    let req = match chat.into_request() {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::from(e);
            tracker.finish(e.outcome());
            return e.into_response();
        }
    };
    let (events, first) = match start(&st, req, &mut tracker, stream).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let id = new_id("chatcmpl");
    if stream {
        let chunks = ChatChunks {
            template: ChatCompletionChunk {
                id,
                object: "chat.completion.chunk".into(),
                created: unix_now(),
                model: model.clone(),
                system_fingerprint: None,
                choices: Vec::new(),
                usage: include_usage.then_some(None),
            },
            include_usage,
            logprobs,
            calls: 0,
        };
        return sse::response(events, tracker, first, chunks);
    }
    let mut events = events;
    let mut next = first;
    let mut text = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut entries: Vec<LogprobEntry> = Vec::new();
    let (reason, usage) = loop {
        let ev = match next.take() {
            Some(ev) => ev,
            None => match events.next().await {
                Some(ev) => {
                    tracker.event(&ev);
                    ev
                }
                None => {
                    let e = ApiError::from_code(
                        embody_protocol::ErrorCode::Internal,
                        "the answer ended without a result",
                    );
                    tracker.finish(e.outcome());
                    return e.into_response();
                }
            },
        };
        match ev {
            Event::Started { .. } => {}
            Event::Delta {
                text: t, logprobs, ..
            } => {
                text.push_str(&t);
                entries.extend(logprobs.iter().map(LogprobEntry::from));
            }
            Event::ToolCall {
                id,
                name,
                arguments,
            } => calls.push(ToolCall {
                id,
                name,
                arguments,
            }),
            Event::Finished { reason, usage } => break (reason, usage),
            Event::Error { code, message } => {
                let e = ApiError::from_code(code, message);
                tracker.finish(e.outcome());
                return e.into_response();
            }
        }
    };
    tracker.finish("ok");
    let called = !calls.is_empty();
    let content = if called && text.trim().is_empty() {
        None
    } else {
        Some(text)
    };
    Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: unix_now(),
        model: model.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content,
                refusal: None,
                tool_calls: calls.iter().map(openai::tool_call_param).collect(),
            },
            logprobs: logprobs.then_some(ChoiceLogprobs {
                content: entries,
                refusal: None,
            }),
            finish_reason: Some(openai::finish_reason(reason, called).into()),
        }],
        usage: UsageInfo::from(usage),
        system_fingerprint: None,
    })
    .into_response()
}

/// Chat completion chunks.
struct ChatChunks {
    /// id, created, model and usage as every chunk repeats them.
    template: ChatCompletionChunk,
    include_usage: bool,
    logprobs: bool,
    /// Tool calls sent so far (the index of the next one).
    calls: u32,
}

impl ChatChunks {
    fn chunk(
        &self,
        delta: ChunkDelta,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<String>,
    ) -> Bytes {
        let mut c = self.template.clone();
        c.choices = vec![ChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish,
        }];
        sse::data(&c)
    }
}

impl Chunks for ChatChunks {
    fn event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) {
        match ev {
            Event::Started { .. } => out.push_back(self.chunk(
                ChunkDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    tool_calls: Vec::new(),
                },
                None,
                None,
            )),
            Event::Delta { text, logprobs, .. } => {
                if text.is_empty() && (logprobs.is_empty() || !self.logprobs) {
                    return;
                }
                let lp = self.logprobs.then(|| ChoiceLogprobs {
                    content: logprobs.iter().map(LogprobEntry::from).collect(),
                    refusal: None,
                });
                out.push_back(self.chunk(
                    ChunkDelta {
                        content: Some(text),
                        ..ChunkDelta::default()
                    },
                    lp,
                    None,
                ));
            }
            Event::ToolCall {
                id,
                name,
                arguments,
            } => {
                let call = openai::tool_call_param(&ToolCall {
                    id,
                    name,
                    arguments,
                });
                let delta = ChunkDelta {
                    tool_calls: vec![ToolCallDelta {
                        index: self.calls,
                        id: Some(call.id),
                        kind: Some(FunctionKind::Function),
                        function: FunctionCallDelta {
                            name: Some(call.function.name),
                            arguments: Some(call.function.arguments),
                        },
                    }],
                    ..ChunkDelta::default()
                };
                self.calls += 1;
                out.push_back(self.chunk(delta, None, None));
            }
            Event::Finished { reason, usage } => {
                let finish = openai::finish_reason(reason, self.calls > 0);
                out.push_back(self.chunk(ChunkDelta::default(), None, Some(finish.into())));
                if self.include_usage {
                    out.push_back(usage_chunk(&self.template, usage));
                }
            }
            Event::Error { code, message } => out.push_back(sse::error_data(code, message)),
        }
    }
}

/// The last chunk of a stream with `include_usage`: no choices, the usage.
fn usage_chunk(template: &ChatCompletionChunk, usage: Usage) -> Bytes {
    let mut c = template.clone();
    c.choices = Vec::new();
    c.usage = Some(Some(UsageInfo::from(usage)));
    sse::data(&c)
}
