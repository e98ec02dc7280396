//! The JSON key space under the prefix (`embody/<node>` by default):
//!
//! | key | kind | what |
//! |---|---|---|
//! | `<prefix>/chat` | queryable | a chat request in, one reply per event out |
//! | `<prefix>/status` | queryable | `protocol::Status` as JSON |
//! | `<prefix>/alive` | liveliness token | present while the daemon serves |
//! | `<prefix>/requests` | subscriber | a chat request with an `id` |
//! | `<prefix>/responses/<id>` | publications | the events of that request |
//! | `<prefix>/models/load` | queryable | `protocol::ModelSpec` in, the model's `ModelEntry` out once it serves |
//! | `<prefix>/models/unload` | queryable | `{"name": ...}` in, the `ModelEntry` out once it is unloaded |
//! | `<prefix>/models/events` | publications | a `ModelEntry` at each change of a model's state |
//!
//! Streamed replies all carry the key `<prefix>/chat`, so a querier must turn
//! reply consolidation off or it keeps only the last of them.

use embody_actors::Runtime;
use embody_protocol::{ErrorCode, Event};
use zenoh::liveliness::LivelinessToken;
use zenoh::pubsub::Subscriber;
use zenoh::query::{Query, Queryable};

use crate::chat::{event_json, parse_request, track};
use crate::Error;
use embody_actors::metrics::Tracker;

/// The declared key space. Dropping it undeclares everything.
pub(crate) struct KeySpace {
    alive: Option<LivelinessToken>,
    _chat: Queryable<()>,
    _status: Queryable<()>,
    _requests: Subscriber<()>,
    _load: Queryable<()>,
    _unload: Queryable<()>,
    events: tokio::task::JoinHandle<()>,
}

impl Drop for KeySpace {
    fn drop(&mut self) {
        self.events.abort();
    }
}

impl KeySpace {
    /// Declares the key space under `prefix`.
    pub async fn declare(
        session: &zenoh::Session,
        prefix: &str,
        runtime: Runtime,
    ) -> Result<Self, Error> {
        let zerr = |what: String| move |e: zenoh::Error| Error::Zenoh(format!("{what}: {e}"));
        let handle = tokio::runtime::Handle::current();

        let chat_key = format!("{prefix}/chat");
        let (rt, h, reply_key) = (runtime.clone(), handle.clone(), chat_key.clone());
        let chat = session
            .declare_queryable(chat_key.clone())
            .callback(move |query| {
                let (rt, key) = (rt.clone(), reply_key.clone());
                h.spawn(async move { serve_chat(&rt, query, &key).await });
            })
            .await
            .map_err(zerr(format!("declaring the queryable {chat_key}")))?;

        let status_key = format!("{prefix}/status");
        let (rt, h, reply_key) = (runtime.clone(), handle.clone(), status_key.clone());
        let status = session
            .declare_queryable(status_key.clone())
            .callback(move |query| {
                let (rt, key) = (rt.clone(), reply_key.clone());
                h.spawn(async move { serve_status(&rt, query, &key).await });
            })
            .await
            .map_err(zerr(format!("declaring the queryable {status_key}")))?;

        let requests_key = format!("{prefix}/requests");
        let (rt, h, s, responses) = (
            runtime.clone(),
            handle.clone(),
            session.clone(),
            format!("{prefix}/responses"),
        );
        let requests = session
            .declare_subscriber(requests_key.clone())
            .callback(move |sample| {
                let payload = sample.payload().to_bytes().into_owned();
                let (rt, s, responses) = (rt.clone(), s.clone(), responses.clone());
                h.spawn(async move { serve_published(&rt, &s, &responses, &payload).await });
            })
            .await
            .map_err(zerr(format!("subscribing to {requests_key}")))?;

        let load_key = format!("{prefix}/models/load");
        let (rt, h, reply_key) = (runtime.clone(), handle.clone(), load_key.clone());
        let load = session
            .declare_queryable(load_key.clone())
            .callback(move |query| {
                let (rt, key) = (rt.clone(), reply_key.clone());
                h.spawn(async move { serve_load(&rt, query, &key).await });
            })
            .await
            .map_err(zerr(format!("declaring the queryable {load_key}")))?;

        let unload_key = format!("{prefix}/models/unload");
        let (rt, h, reply_key) = (runtime.clone(), handle.clone(), unload_key.clone());
        let unload = session
            .declare_queryable(unload_key.clone())
            .callback(move |query| {
                let (rt, key) = (rt.clone(), reply_key.clone());
                h.spawn(async move { serve_unload(&rt, query, &key).await });
            })
            .await
            .map_err(zerr(format!("declaring the queryable {unload_key}")))?;

        let events_key = format!("{prefix}/models/events");
        let mut changes = runtime.model_events();
        let publisher = session.clone();
        let events = handle.spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match changes.recv().await {
                    Ok(entry) => {
                        let json = serde_json::to_vec(&entry).expect("a model entry serializes");
                        if let Err(e) = publisher.put(&events_key, json).await {
                            tracing::warn!("publishing on {events_key} failed: {e}");
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("{n} model events were not published (too many at once)")
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });

        let alive_key = format!("{prefix}/alive");
        let alive = session
            .liveliness()
            .declare_token(alive_key.clone())
            .await
            .map_err(zerr(format!("declaring the liveliness token {alive_key}")))?;
        tracing::info!(
            "zenoh key space {prefix}/{{chat,status,requests,responses/*,alive,models/{{load,unload,events}}}}"
        );
        Ok(Self {
            alive: Some(alive),
            _chat: chat,
            _status: status,
            _requests: requests,
            _load: load,
            _unload: unload,
            events,
        })
    }

    /// Withdraws the `alive` token (the daemon is draining).
    pub async fn withdraw_alive(&mut self) {
        if let Some(t) = self.alive.take() {
            if let Err(e) = t.undeclare().await {
                tracing::warn!("undeclaring the alive token: {e}");
            }
        }
    }
}

async fn serve_chat(rt: &Runtime, query: Query, key: &str) {
    let payload = query
        .payload()
        .map(|p| p.to_bytes().into_owned())
        .unwrap_or_default();
    let mut tracker = Tracker::new(rt.metrics(), "zenoh");
    let req = match parse_request(&payload) {
        Ok(r) => r,
        Err(msg) => {
            tracing::warn!("zenoh chat request refused: {msg}");
            let ev = Event::error(ErrorCode::BadRequest, msg);
            track(&mut tracker, &ev);
            let _ = query.reply(key, event_json(&ev)).await;
            return;
        }
    };
    let mut events = rt.submit(req).await;
    while let Some(ev) = events.next().await {
        track(&mut tracker, &ev);
        if let Event::Error { code, message } = &ev {
            tracing::debug!("zenoh chat request ended with {code}: {message}");
        }
        if let Err(e) = query.reply(key, event_json(&ev)).await {
            // The querier is gone (timeout, closed): dropping the stream cancels.
            tracing::debug!("a zenoh chat reply failed, cancelling: {e}");
            return;
        }
    }
}

async fn serve_status(rt: &Runtime, query: Query, key: &str) {
    let result = match rt.status().await {
        Ok(s) => {
            query
                .reply(key, serde_json::to_vec(&s).expect("status serializes"))
                .await
        }
        Err(e) => query.reply_err(e.to_string()).await,
    };
    if let Err(e) = result {
        tracing::debug!("a zenoh status reply failed: {e}");
    }
}

/// The answer to a model load or unload: the entry, or an error body
/// (`{"code", "message"}`) as the reply's error.
async fn reply_model(
    query: &Query,
    key: &str,
    result: Result<embody_protocol::ModelEntry, embody_protocol::wire::ErrorBody>,
) {
    let sent = match result {
        Ok(entry) => {
            let json = serde_json::to_vec(&entry).expect("a model entry serializes");
            query.reply(key, json).await
        }
        Err(e) => {
            let json = serde_json::to_vec(&e).expect("an error serializes");
            query.reply_err(json).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!("a zenoh model reply failed: {e}");
    }
}

fn payload_of(query: &Query) -> Vec<u8> {
    query
        .payload()
        .map(|p| p.to_bytes().into_owned())
        .unwrap_or_default()
}

fn bad(message: String) -> embody_protocol::wire::ErrorBody {
    embody_protocol::wire::ErrorBody {
        code: ErrorCode::BadRequest,
        message,
    }
}

async fn serve_load(rt: &Runtime, query: Query, key: &str) {
    let result = match serde_json::from_slice::<embody_protocol::ModelSpec>(&payload_of(&query)) {
        Ok(spec) => rt.load(spec).await,
        Err(e) => Err(bad(format!(
            "a model load is a JSON object with name, path and optional settings: {e}"
        ))),
    };
    reply_model(&query, key, result).await;
}

async fn serve_unload(rt: &Runtime, query: Query, key: &str) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Unload {
        name: String,
    }
    let result = match serde_json::from_slice::<Unload>(&payload_of(&query)) {
        Ok(u) => rt.unload(&u.name).await,
        Err(e) => Err(bad(format!(
            "a model unload is a JSON object {{\"name\": ...}}: {e}"
        ))),
    };
    reply_model(&query, key, result).await;
}

/// A request published on `<prefix>/requests`: the chat fields and an `id`
/// (letters, digits, `-`, `_`, `.`) naming `<prefix>/responses/<id>`.
async fn serve_published(rt: &Runtime, session: &zenoh::Session, responses: &str, payload: &[u8]) {
    let mut obj = match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => {
            tracing::warn!("a request on the requests topic is not a JSON object; it has no id to answer to, dropped");
            return;
        }
    };
    let id = match obj.remove("id") {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let id_ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !id_ok {
        tracing::warn!("a request on the requests topic has no usable id (letters, digits, '-', '_', '.'; at most 128), dropped: {id:?}");
        return;
    }
    let key = format!("{responses}/{id}");
    let rest = serde_json::to_vec(&obj).expect("a JSON object serializes");
    let mut tracker = Tracker::new(rt.metrics(), "zenoh");
    let mut events = match parse_request(&rest) {
        Ok(req) => rt.submit(req).await,
        Err(msg) => {
            tracing::warn!("request {id} on the requests topic refused: {msg}");
            let ev = Event::error(ErrorCode::BadRequest, msg);
            track(&mut tracker, &ev);
            let _ = session.put(&key, event_json(&ev)).await;
            return;
        }
    };
    while let Some(ev) = events.next().await {
        track(&mut tracker, &ev);
        if let Err(e) = session.put(&key, event_json(&ev)).await {
            tracing::warn!("publishing on {key} failed: {e}");
        }
    }
}
