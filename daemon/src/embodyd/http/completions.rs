//! `POST /v1/completions`: the prompt continued as it is, no chat template.

use std::collections::VecDeque;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use embody_protocol::openai::{
    self, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, UsageInfo,
};
use embody_protocol::Event;

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
    let parsed: Result<CompletionRequest, ApiError> = parse_body(body);
    let c = match parsed.and_then(|c| st.check_model(&c.model).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            tracker.finish(e.outcome());
            return e.into_response();
        }
    };
    let (stream, include_usage) = (c.is_stream(), c.include_usage());
    let logprobs = c.logprobs.is_some();
    let model = c.model.clone();
    let req = match c.into_request() {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::from(e);
            tracker.finish(e.outcome());
            return e.into_response();
        }
    };
    let (mut events, first) = match start(&st, req, &mut tracker, stream).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let template = Completion {
        id: new_id("cmpl"),
        object: "text_completion".into(),
        created: unix_now(),
        model: model.clone(),
        choices: Vec::new(),
        usage: None,
        system_fingerprint: None,
    };
    if stream {
        let chunks = CompletionChunks {
            template,
            include_usage,
            logprobs,
            offset: 0,
        };
        return sse::response(events, tracker, first, chunks);
    }
    let mut next = first;
    let mut text = String::new();
    let mut lp = CompletionLogprobs::default();
    let (reason, usage) = loop {
        let ev = match next.take() {
            Some(ev) => ev,
            None => match events.next().await {
                Some(ev) => {
                    tracker.event(&ev);
                    ev
                }
                None => break (embody_protocol::FinishReason::Stop, Default::default()),
            },
        };
        match ev {
            Event::Delta {
                text: t, logprobs, ..
            } => {
                lp.extend(&logprobs, text.len());
                text.push_str(&t);
            }
            Event::Finished { reason, usage } => break (reason, usage),
            Event::Error { code, message } => {
                let e = ApiError::from_code(code, message);
                tracker.finish(e.outcome());
                return e.into_response();
            }
            Event::Started { .. } | Event::ToolCall { .. } => {}
        }
    };
    tracker.finish("ok");
    Json(Completion {
        choices: vec![CompletionChoice {
            text,
            index: 0,
            logprobs: logprobs.then_some(lp),
            finish_reason: Some(openai::finish_reason(reason, false).into()),
        }],
        usage: Some(UsageInfo::from(usage)),
        ..template
    })
    .into_response()
}

/// Text completion chunks.
struct CompletionChunks {
    template: Completion,
    include_usage: bool,
    logprobs: bool,
    /// Bytes of text sent so far (for `text_offset`).
    offset: usize,
}

impl CompletionChunks {
    fn chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<String>,
    ) -> Bytes {
        let mut c = self.template.clone();
        c.choices = vec![CompletionChoice {
            text,
            index: 0,
            logprobs,
            finish_reason: finish,
        }];
        sse::data(&c)
    }
}

impl Chunks for CompletionChunks {
    fn event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) {
        match ev {
            Event::Delta { text, logprobs, .. } => {
                if text.is_empty() && (logprobs.is_empty() || !self.logprobs) {
                    return;
                }
                let lp = self.logprobs.then(|| {
                    let mut lp = CompletionLogprobs::default();
                    lp.extend(&logprobs, self.offset);
                    lp
                });
                self.offset += text.len();
                out.push_back(self.chunk(text, lp, None));
            }
            Event::Finished { reason, usage } => {
                let finish = openai::finish_reason(reason, false);
                out.push_back(self.chunk(String::new(), None, Some(finish.into())));
                if self.include_usage {
                    let mut c = self.template.clone();
                    c.usage = Some(UsageInfo::from(usage));
                    out.push_back(sse::data(&c));
                }
            }
            Event::Error { code, message } => out.push_back(sse::error_data(code, message)),
            Event::Started { .. } | Event::ToolCall { .. } => {}
        }
    }
}
