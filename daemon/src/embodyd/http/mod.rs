//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, plus `GET /health` and
//! `GET /metrics`.
//!
//! Bodies are untrusted: they are read up to `http.max_body_bytes` (413
//! beyond), parsed strictly into `embody_protocol::openai` types and turned
//! into the one `Request` every interface uses, so a bad body is a 400 that
//! names the parameter, never a crash. Answers stream as server-sent events
//! when asked; a client that goes away drops its event stream, which cancels
//! the generation in the runtime.
//!
//! Connections are bounded too: at most `http.max_connections` at once (more
//! get a 503 and are closed at once, so a flood of idle sockets costs no
//! more open files than that), and a request's head must arrive within
//! `http.header_timeout_ms`, which also closes idle keep-alive connections.
//!
//! This module holds the router, the connection loop, the shared state and
//! the bearer-token check; each endpoint family has its own file.

mod chat;
mod completions;
mod errors;
pub use embody_actors::metrics;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use embody_actors::{EventStream, Runtime};
use embody_protocol::openai::{ModelList, ModelObject};
use embody_protocol::{ErrorCode, Event};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use errors::ApiError;
use metrics::{Metrics, Tracker};

/// Settings of the HTTP server.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// The bearer token clients must send; none means no check.
    pub api_key: Option<String>,
    /// Most bytes of a request body.
    pub max_body_bytes: usize,
    /// Most connections at once; more get 503 and are closed.
    pub max_connections: usize,
    /// Time for a request's line and headers, from the connection's opening
    /// or its previous response.
    pub header_timeout: Duration,
    /// Host names (besides IP literals and `localhost`) requests may name.
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may send requests (none: no web page may).
    pub allowed_origins: Vec<String>,
}

/// What every handler shares.
pub(crate) struct AppState {
    rt: Runtime,
    metrics: Arc<Metrics>,
    opts: HttpOptions,
    /// Unix seconds when the server started.
    created: u64,
}

type Shared = Arc<AppState>;

impl AppState {
    /// Checks a request's `model` field.
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model.is_empty() {
            return Err(ApiError::bad_request(
                "you must provide a model parameter",
                Some("model"),
            ));
        }
        if self.rt.knows_model(model) {
            Ok(())
        } else {
            Err(ApiError::unknown_model(
                model,
                &self.rt.model_names().join(", "),
            ))
        }
    }
}

/// Unix seconds now.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh response id: `prefix-` and 24 hex digits.
fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    format!("{prefix}-{x:016x}{:08x}", n as u32)
}

/// How long a streamed answer waits for its first event before the 200
/// goes out: long enough for every refusal (a bad request, a full queue) to
/// arrive as an HTTP error; a request still queued after it streams from
/// then on, and a later failure comes as an error event in the stream.
const FIRST_EVENT_WAIT: Duration = Duration::from_secs(1);

/// Submits a request and reads its first event: a refusal (bad request,
/// full queue, draining) becomes an HTTP error before any byte of an answer.
/// With `bounded`, gives up waiting after [`FIRST_EVENT_WAIT`] and returns
/// no event.
async fn start(
    st: &AppState,
    req: embody_protocol::Request,
    tracker: &mut Tracker,
    bounded: bool,
) -> Result<(EventStream, Option<Event>), ApiError> {
    let mut events = st.rt.submit(req).await;
    let first = if bounded {
        match tokio::time::timeout(FIRST_EVENT_WAIT, events.next()).await {
            Ok(ev) => ev,
            Err(_) => return Ok((events, None)),
        }
    } else {
        events.next().await
    };
    match first {
        Some(Event::Error { code, message }) => {
            let e = ApiError::from_code(code, message);
            tracker.finish(e.outcome());
            Err(e)
        }
        Some(ev) => {
            tracker.event(&ev);
            Ok((events, Some(ev)))
        }
        None => {
            let e = ApiError::from_code(ErrorCode::Internal, "the request ended without a result");
            tracker.finish(e.outcome());
            Err(e)
        }
    }
}

/// Binds the listening socket.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding the HTTP API to {addr}; set http.bind to a free address or http.enabled = false")
    })?;
    Ok(listener)
}

/// Serves until `stop` turns true, then lets open requests finish for up to
/// `grace`.
pub async fn serve(
    listener: TcpListener,
    rt: Runtime,
    metrics: Arc<Metrics>,
    opts: HttpOptions,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<()> {
    let state = Arc::new(AppState {
        rt,
        metrics,
        created: unix_now(),
        opts,
    });
    let limits = (state.opts.max_connections, state.opts.header_timeout);
    let app = router(state);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(
        "http: listening on {}",
        addr.map_or("?".into(), |a| a.to_string())
    );
    let stop2 = stop.clone();
    let mut task = tokio::spawn(accept_loop(listener, app, limits, stop2));
    tokio::select! {
        r = &mut task => return Ok(r?),
        _ = stopped(&mut stop) => {}
    }
    // Open streams hold the graceful shutdown: give them `grace`, then cut
    // them (aborting the loop aborts every connection's task).
    match tokio::time::timeout(grace, &mut task).await {
        Ok(r) => r?,
        Err(_) => {
            tracing::warn!("http: connections still open after {grace:?}; closing them");
            task.abort();
        }
    }
    Ok(())
}

/// The answer to a connection past `http.max_connections`, in OpenAI's
/// error shape.
static OVERLOADED: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = serde_json::json!({"error": {
        "message": "too many HTTP connections open (http.max_connections); retry later",
        "type": "overloaded",
        "param": null,
        "code": "overloaded",
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Connection: close\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Accepts connections until `stop`, each served on a task of its own with
/// the head timeout; then asks every connection to finish its request and
/// close, and waits for them.
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    (max_connections, header_timeout): (usize, Duration),
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let places = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut refused = 0u64;
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of open files, say: wait instead of spinning.
                    tracing::warn!("http: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        while conns.try_join_next().is_some() {}
        let Ok(place) = places.clone().try_acquire_owned() else {
            // Answered without a task and closed: its file is back at once.
            let _ = tcp.try_write(&OVERLOADED);
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!("http: {refused} connections refused so far: {max_connections} open (http.max_connections)");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown_rx.clone();
        conns.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(place);
        });
    }
    let _ = shutdown.send(true);
    while conns.join_next().await.is_some() {}
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The router with every route, the body limit and the token check.
fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/models", get(models).post(load_model))
        .route("/v1/models/{id}", get(model).delete(unload_model))
        .route("/v1/models/{id}/status", get(model_status))
        .route("/flush_cache", post(flush_cache))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), same_site))
        .with_state(state)
}

/// Refuses what a web page could send through a visitor's browser: a
/// request whose `Host` is a name other than `localhost` or one allowed
/// (DNS rebinding points an attacker's name at 127.0.0.1; an IP literal
/// cannot be rebound), and a request from a page (`Origin`) not allowed.
/// Programs (curl, the openai client, robots) send no `Origin`.
async fn same_site(
    State(st): State<Shared>,
    headers: HeaderMap,
    req: HttpRequest,
    next: Next,
) -> Response {
    let forbid = |message: String| {
        st.metrics.request("http", "client_error");
        ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            message,
            "forbidden",
        )
        .into_response()
    };
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !host_allowed(host, &st.opts.allowed_hosts) {
            return forbid(format!(
                "the Host {host:?} is not this server's: use an IP address or localhost, or add the name to http.allowed_hosts"
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !st.opts.allowed_origins.iter().any(|o| o == origin) {
            return forbid(format!(
                "requests from web pages (Origin {origin:?}) are refused; add the origin to http.allowed_origins to allow it"
            ));
        }
    }
    next.run(req).await
}

/// Whether a `Host` value names this server without a DNS name an attacker
/// could rebind: an IP literal, `localhost`, or a name in `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(host))
}

/// Checks `Authorization: Bearer <api_key>` when a key is configured.
async fn auth(
    State(st): State<Shared>,
    headers: HeaderMap,
    req: HttpRequest,
    next: Next,
) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            st.metrics.request("http", "client_error");
            let message = if given.is_none() {
                "no API key given: send it as Authorization: Bearer <key>"
            } else {
                "the API key is not valid"
            };
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                message,
                "invalid_api_key",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so timing does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// Reads a JSON body into `T`: 413 past the size limit, 400 for anything
/// that is not the expected JSON.
pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than this server accepts (http.max_body_bytes)",
                "request_too_large",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"), None)
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::from(embody_protocol::openai::json_error(e)))
}

/// `GET /health`: 200 while the decoder makes progress and the daemon
/// serves, 503 otherwise.
async fn health(State(st): State<Shared>) -> Response {
    let h = st.rt.health();
    let status = st.rt.status().await.ok();
    let draining = status.as_ref().is_some_and(|s| s.draining);
    let ready = status.as_ref().is_some_and(|s| s.ready);
    let state = if draining {
        "draining"
    } else if !ready {
        "starting"
    } else if !h.healthy {
        "stalled"
    } else {
        "ok"
    };
    let code = if state == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": state,
        "healthy": h.healthy,
        "ms_since_progress": h.since_progress.as_millis() as u64,
        "running": status.as_ref().map_or(0, |s| s.running),
        "queued": status.as_ref().map_or(0, |s| s.queued),
    });
    (code, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text.
async fn metrics_text(State(st): State<Shared>) -> Response {
    let status = st.rt.status().await.ok();
    let text = st.metrics.render(status.as_ref(), st.rt.health().healthy);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `POST /flush_cache`: drops every cached prompt prefix that no request is
/// using, and answers how many KV blocks that freed.
async fn flush_cache(State(st): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    let freed = st.rt.flush_cache().await.map_err(|e| {
        ApiError::from_code(ErrorCode::Unavailable, format!("cache flush failed: {e}"))
    })?;
    Ok(Json(serde_json::json!({ "freed_blocks": freed })))
}

fn model_object(st: &AppState, id: String) -> ModelObject {
    ModelObject {
        id,
        object: "model".into(),
        created: st.created,
        owned_by: "embodyd".into(),
    }
}

/// `GET /v1/models`: every model the daemon knows (one not loaded now is
/// loaded by the first request that names it); `embody status` and
/// `GET /v1/models/{id}/status` show their states.
async fn models(State(st): State<Shared>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: st
            .rt
            .model_names()
            .into_iter()
            .map(|id| model_object(&st, id))
            .collect(),
    })
}

/// `GET /v1/models/{id}`.
async fn model(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    st.check_model(&id)?;
    Ok(Json(model_object(&st, id)))
}

/// `GET /v1/models/{id}/status`: the model's state, capabilities and load.
async fn model_status(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<embody_protocol::ModelEntry>, ApiError> {
    st.check_model(&id)?;
    let status =
        st.rt.status().await.map_err(|e| {
            ApiError::from_code(ErrorCode::Unavailable, format!("status failed: {e}"))
        })?;
    let entry = st.rt.model_entry(&id).map(|e| e.name);
    status
        .models
        .into_iter()
        .find(|m| Some(&m.name) == entry.as_ref())
        .map(Json)
        .ok_or_else(|| ApiError::unknown_model(&id, &st.rt.model_names().join(", ")))
}

/// `POST /v1/models`: loads a model (a [`embody_protocol::ModelSpec`]), or
/// replaces the one served under its name; answers once it serves.
async fn load_model(
    State(st): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<embody_protocol::ModelEntry>, ApiError> {
    let spec: embody_protocol::ModelSpec = parse_body(body)?;
    let entry = st
        .rt
        .load(spec)
        .await
        .map_err(|e| ApiError::from_code(e.code, e.message))?;
    Ok(Json(entry))
}

/// `DELETE /v1/models/{id}`: unloads a model once its running requests
/// have finished; answers when its memory is free.
async fn unload_model(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<embody_protocol::ModelEntry>, ApiError> {
    let entry = st
        .rt
        .unload(&id)
        .await
        .map_err(|e| ApiError::from_code(e.code, e.message))?;
    Ok(Json(entry))
}

async fn not_found(req: HttpRequest) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("unknown route {} {}", req.method(), req.uri().path()),
        "unknown_url",
    )
}

async fn method_not_allowed(req: HttpRequest) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
        "method_not_allowed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_an_attacker_cannot_rebind() {
        let none: &[String] = &[];
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "10.0.0.7:80",
        ] {
            assert!(host_allowed(ok, none), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "127.0.0.1.evil.example:8080",
            "[evil]:80",
            "",
        ] {
            assert!(!host_allowed(bad, none), "{bad}");
        }
        let robot = ["robot.local".to_string()];
        assert!(host_allowed("robot.local:8080", &robot));
        assert!(!host_allowed("other.local:8080", &robot));
    }

    #[test]
    fn keys_compare_by_content_only() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"x", b""));
    }
}
