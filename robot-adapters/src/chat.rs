//! The JSON a zenoh caller sends to ask a question: an OpenAI chat request's
//! fields (`messages`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`,
//! `response_format`, `tools`), plus `cameras` to attach the latest frame of
//! configured cameras by name; and what a run of the event stream collects to.

use embody_actors::EventStream;
use embody_protocol::{CameraRef, ErrorCode, Event, FinishReason, Message, Request, Role, Usage};
use serde::Deserialize;

/// A chat request as zenoh callers send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatPayload {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    response_format: Option<serde_json::Value>,
    #[serde(default)]
    tools: Option<serde_json::Value>,
    #[serde(default)]
    cameras: Vec<CameraRef>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: Role,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Part {
    Text { text: String },
}

/// Reads a chat request; the error is the message for a `bad_request` event.
pub fn parse_request(json: &[u8]) -> Result<Request, String> {
    let p: ChatPayload = serde_json::from_slice(json)
        .map_err(|e| format!("the chat request is not valid JSON of the expected shape: {e}"))?;
    let _ = p.model; // one model is served; the name is accepted and ignored
    let messages = p
        .messages
        .into_iter()
        .map(|m| {
            let text = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => parts
                    .into_iter()
                    .map(|Part::Text { text }| text)
                    .collect::<Vec<_>>()
                    .join(""),
            };
            Message::new(m.role, text)
        })
        .collect();
    let mut req = Request::new(messages);
    req.max_tokens = p.max_completion_tokens.or(p.max_tokens);
    if let Some(t) = p.temperature {
        req.sampling.temperature = t;
    }
    if let Some(t) = p.top_p {
        req.sampling.top_p = t;
    }
    req.sampling.seed = p.seed;
    req.stop = match p.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    req.response_format = p.response_format;
    req.tools = p.tools;
    req.cameras = p.cameras;
    Ok(req)
}

/// One event as JSON (its `type` field names the kind).
pub fn event_json(ev: &Event) -> Vec<u8> {
    serde_json::to_vec(ev).expect("events serialize")
}

/// What a whole stream came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The generated text.
    pub text: String,
    /// Why it finished, if it did.
    pub finish: Option<FinishReason>,
    /// Tokens used.
    pub usage: Usage,
    /// The error that ended it, if one did.
    pub error: Option<(ErrorCode, String)>,
}

/// Reads a stream to its end.
pub async fn collect(mut events: EventStream) -> Outcome {
    let mut out = Outcome::default();
    while let Some(ev) = events.next().await {
        match ev {
            Event::Delta { text, .. } => out.text.push_str(&text),
            Event::Finished { reason, usage } => {
                out.finish = Some(reason);
                out.usage = usage;
            }
            Event::Error { code, message } => out.error = Some((code, message)),
            Event::Started { .. } | Event::ToolCall { .. } => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_fields_map_onto_the_request() {
        let r = parse_request(
            br#"{"messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"what"},{"type":"text","text":" now?"}]}],
                "max_tokens":8,"temperature":0,"top_p":0.5,"seed":3,"stop":"\n",
                "cameras":[{"name":"front","max_age_ms":200}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[1], Message::user("what now?"));
        assert_eq!(r.max_tokens, Some(8));
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_p, 0.5);
        assert_eq!(r.sampling.seed, Some(3));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.cameras[0].max_age_ms, Some(200));
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let e = parse_request(b"{").unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = parse_request(br#"{"messages":[],"max_token":3}"#).unwrap_err();
        assert!(e.contains("unknown field `max_token`"), "{e}");
    }
}
