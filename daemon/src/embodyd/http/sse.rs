//! Server-sent events: a request's event stream as `data: {json}` lines,
//! ended by `data: [DONE]`.
//!
//! The body is pulled by the connection: when the client goes away, hyper
//! drops the body, which drops the runtime's `EventStream` and so cancels
//! the generation, and the tracker counts the request as cancelled.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use embody_actors::EventStream;
use embody_protocol::openai::ErrorResponse;
use embody_protocol::Event;
use serde::Serialize;

use super::errors::ApiError;
use super::metrics::Tracker;

/// Turns the events of one request into SSE payloads (OpenAI's chunk
/// objects for one endpoint).
pub(crate) trait Chunks: Send + 'static {
    /// Payloads for one event, in order (often one, sometimes none).
    fn event(&mut self, ev: Event, out: &mut VecDeque<Bytes>);
}

/// One `data:` line holding `v` as JSON.
pub(crate) fn data<T: Serialize>(v: &T) -> Bytes {
    let mut b = b"data: ".to_vec();
    // Our response types always serialize.
    serde_json::to_writer(&mut b, v).expect("response types serialize");
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

/// The error payload a stream ends with when generation fails midway.
pub(crate) fn error_data(ev_code: embody_protocol::ErrorCode, message: String) -> Bytes {
    data(&ErrorResponse::from_code(ev_code, message))
}

struct State<C> {
    events: EventStream,
    tracker: Tracker,
    first: Option<Event>,
    chunks: C,
    out: VecDeque<Bytes>,
    ended: bool,
}

/// The streaming response. `first` is the stream's first event if it was
/// already read (and noted by `tracker`) to decide the status code.
pub(crate) fn response<C: Chunks>(
    events: EventStream,
    tracker: Tracker,
    first: Option<Event>,
    chunks: C,
) -> Response {
    let state = State {
        events,
        tracker,
        first,
        chunks,
        out: VecDeque::new(),
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(b) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(b), s));
            }
            if s.ended {
                return None;
            }
            let ev = match s.first.take() {
                Some(ev) => ev,
                None => match s.events.next().await {
                    Some(ev) => {
                        s.tracker.event(&ev);
                        ev
                    }
                    None => {
                        s.ended = true;
                        continue;
                    }
                },
            };
            match &ev {
                Event::Finished { .. } => s.tracker.finish("ok"),
                Event::Error { code, message } => s
                    .tracker
                    .finish(ApiError::from_code(*code, message.clone()).outcome()),
                _ => {}
            }
            let terminal = ev.is_terminal();
            s.chunks.event(ev, &mut s.out);
            if terminal {
                s.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                s.ended = true;
            }
        }
    });
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}
