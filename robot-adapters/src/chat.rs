//! The JSON a zenoh caller sends to ask a question: an OpenAI chat request
//! (`messages`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`,
//! `response_format`, `tools`, ...), read exactly as the HTTP API reads it,
//! plus `cameras` to attach the latest frame of configured cameras by name;
//! and what a run of the event stream collects to.

use embody_actors::metrics::{self, Tracker};
use embody_actors::{EventStream, Runtime};
use embody_protocol::openai::ChatCompletionRequest;
use embody_protocol::{CameraRef, ErrorCode, Event, FinishReason, Request, Usage};

/// Reads a chat request: the fields of an OpenAI chat request (read by
/// [`ChatCompletionRequest`], as the HTTP API reads them) plus `cameras`.
/// The error is the message for a `bad_request` event.
pub fn parse_request(json: &[u8]) -> Result<Request, String> {
    let shape = |e: serde_json::Error| {
        format!("the chat request is not valid JSON of the expected shape: {e}")
    };
    let mut obj = match serde_json::from_slice::<serde_json::Value>(json).map_err(shape)? {
        serde_json::Value::Object(o) => o,
        _ => return Err("the chat request must be a JSON object".into()),
    };
    let cameras: Vec<CameraRef> = match obj.remove("cameras") {
        None => Vec::new(),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            format!("cameras: a list of {{\"name\", \"max_age_ms\"}} objects is expected: {e}")
        })?,
    };
    let chat: ChatCompletionRequest =
        serde_json::from_value(serde_json::Value::Object(obj)).map_err(shape)?;
    let mut req = chat.into_request().map_err(|e| match e.param {
        Some(p) => format!("{p}: {}", e.message),
        None => e.message,
    })?;
    req.cameras.extend(cameras);
    Ok(req)
}

/// The body of the zenoh chat payload fuzz target and its corpus replay:
/// a payload is a request or a `bad_request` message, never a panic; a
/// request that reads back serializes and reads again to itself.
pub fn exercise(json: &[u8]) {
    if let Ok(req) = parse_request(json) {
        let again = serde_json::to_vec(&req).expect("a request serializes");
        let back: Request = serde_json::from_slice(&again).expect("reads back");
        assert_eq!(back, req);
    }
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

/// Submits `req` and reads its answer to the end, counted in the runtime's
/// metrics under `interface`.
pub async fn ask(rt: &Runtime, req: Request, interface: &'static str) -> Outcome {
    let tracker = Tracker::new(rt.metrics(), interface);
    collect(rt.submit(req).await, tracker).await
}

/// Reads a stream to its end, each event noted by `tracker`.
async fn collect(mut events: EventStream, mut tracker: Tracker) -> Outcome {
    let mut out = Outcome::default();
    while let Some(ev) = events.next().await {
        track(&mut tracker, &ev);
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

/// Notes an event of a request's stream, and its outcome when it ends it.
pub fn track(tracker: &mut Tracker, ev: &Event) {
    tracker.event(ev);
    if let Some(outcome) = metrics::outcome(ev) {
        tracker.finish(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_fields_map_onto_the_request() {
        let r = parse_request(
            br#"{"messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"what now?"}]}],
                "max_tokens":8,"temperature":0,"top_p":0.5,"seed":3,"stop":"\n",
                "cameras":[{"name":"front","max_age_ms":200}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[1].content, "what now?");
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
