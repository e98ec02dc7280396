//! The IPC server: the Unix socket local programs talk to through
//! `embody-client`.
//!
//! Each connection has a reader (this task) and a writer task; every chat
//! request gets a task that forwards its event stream to the writer. Requests
//! on one connection are independent: a connection may run many at once. A
//! frame that cannot be decoded gets an error frame, and the connection is
//! closed (after a bad frame the byte stream cannot be trusted); the daemon
//! goes on serving every other connection. When a connection ends, its
//! requests are cancelled.
//!
//! What one client may cost is bounded: its writer queue holds
//! [`OUT_QUEUE`] frames, after which the connection stops reading its
//! requests until it reads its replies; it may run [`MAX_REQUESTS`] at once;
//! a client that takes none of a reply's bytes for `write_timeout` is
//! closed. When every connection is taken, a new client takes the place of
//! the one idle the longest (no request running, no frame for
//! [`IDLE_EVICT_AFTER`]) instead of being refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use embody_actors::{Runtime, RuntimeError};
use embody_client::framing::{read_frame, write_frame, ReadError};
use embody_protocol::wire::{ErrorBody, Frame};
use embody_protocol::{ErrorCode, Event};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

use embody_actors::metrics::{self, Tracker};

/// Frames waiting for one connection's writer.
pub const OUT_QUEUE: usize = 256;
/// Requests one connection may have running at once.
pub const MAX_REQUESTS: usize = 256;
/// A connection with no request running and no frame for this long gives
/// its place to a new client when every place is taken.
pub const IDLE_EVICT_AFTER: Duration = Duration::from_secs(5);
/// How long a new client waits for an evicted connection's place.
const EVICT_WAIT: Duration = Duration::from_secs(2);

/// A frame for a connection's writer; `written` hears when it is written
/// (or dropped with the connection).
struct Outgoing {
    frame: Frame,
    written: Option<oneshot::Sender<()>>,
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Self {
            frame,
            written: None,
        }
    }
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct IpcOptions {
    /// Most connections at once.
    pub max_connections: usize,
    /// Time limit for the rest of a frame once it has begun.
    pub frame_timeout: Duration,
    /// A client that takes none of a reply's bytes for this long is closed.
    pub write_timeout: Duration,
}

/// What the accept loop knows of a connection.
struct ConnState {
    /// Milliseconds since the server started, at the last frame read.
    last_frame_ms: AtomicU64,
    /// The connection's requests (empty: idle).
    live: Slots,
    /// Set once chosen to give its place up.
    evicting: AtomicBool,
    evict: Notify,
}

type Registry = Arc<Mutex<HashMap<u64, Arc<ConnState>>>>;

/// The connection idle the longest, if one has been idle long enough; it is
/// marked as evicting, so that two new clients do not pick the same one.
fn pick_idle(reg: &Registry, now_ms: u64) -> Option<Arc<ConnState>> {
    let reg = reg.lock().unwrap_or_else(|e| e.into_inner());
    let idle_ms = IDLE_EVICT_AFTER.as_millis() as u64;
    let victim = reg
        .values()
        .filter(|c| !c.evicting.load(Ordering::SeqCst) && slots(&c.live).is_empty())
        .map(|c| (c.last_frame_ms.load(Ordering::SeqCst), c))
        .filter(|(last, _)| now_ms.saturating_sub(*last) >= idle_ms)
        .min_by_key(|(last, _)| *last)
        .map(|(_, c)| c.clone())?;
    victim.evicting.store(true, Ordering::SeqCst);
    Some(victim)
}

/// Binds the socket at `path` with mode 0660, creating its folder. A stale
/// socket file (nobody listening) is replaced; a live one is an error.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket's folder {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another embodyd is already serving on {}; stop it or choose another socket (--socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections until `stop` turns true.
pub async fn serve(
    listener: UnixListener,
    rt: Runtime,
    opts: IpcOptions,
    mut stop: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(opts.max_connections));
    let registry: Registry = Arc::default();
    let started = Instant::now();
    let mut next_id = 0u64;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let peer = peer_name(&stream);
        next_id += 1;
        let (id, rt, opts, registry, places) = (
            next_id,
            rt.clone(),
            opts.clone(),
            registry.clone(),
            places.clone(),
        );
        tokio::spawn(async move {
            let permit = match places.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let now = started.elapsed().as_millis() as u64;
                    let Some(victim) = pick_idle(&registry, now) else {
                        tracing::warn!(%peer, "connection refused: {} connections already open and busy", opts.max_connections);
                        return refuse(stream, opts.max_connections).await;
                    };
                    victim.evict.notify_one();
                    match tokio::time::timeout(EVICT_WAIT, places.acquire_owned()).await {
                        Ok(Ok(p)) => p,
                        _ => return refuse(stream, opts.max_connections).await,
                    }
                }
            };
            let state = Arc::new(ConnState {
                last_frame_ms: AtomicU64::new(started.elapsed().as_millis() as u64),
                live: Arc::default(),
                evicting: AtomicBool::new(false),
                evict: Notify::new(),
            });
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, state.clone());
            tracing::debug!(%peer, "client connected");
            connection(stream, rt, opts, &peer, &state, started).await;
            tracing::debug!(%peer, "client disconnected");
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            drop(permit);
        });
    }
}

fn peer_name(s: &UnixStream) -> String {
    match s.peer_cred() {
        Ok(c) => match c.pid() {
            Some(pid) => format!("pid {pid} uid {}", c.uid()),
            None => format!("uid {}", c.uid()),
        },
        Err(_) => "unknown peer".into(),
    }
}

async fn refuse(mut stream: UnixStream, max: usize) {
    let frame = Frame::Error(ErrorBody {
        code: ErrorCode::Overloaded,
        message: format!(
            "embodyd already has {max} connections open (ipc.max_connections); retry later"
        ),
    });
    let _ = write_frame(&mut stream, &frame).await;
}

/// A request's place on its connection.
enum Slot {
    /// Submitted; its runtime id is not known yet. `true` once cancelled.
    Submitting(bool),
    /// Running under this runtime id.
    Live(u64),
}

type Slots = Arc<Mutex<HashMap<u64, Slot>>>;

fn slots(s: &Slots) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connection(
    stream: UnixStream,
    rt: Runtime,
    opts: IpcOptions,
    peer: &str,
    state: &ConnState,
    started: Instant,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut out_rx) = mpsc::channel::<Outgoing>(OUT_QUEUE);
    let write_timeout = opts.write_timeout;
    let who = peer.to_string();
    let writer = tokio::spawn(async move {
        while let Some(Outgoing { frame, written }) = out_rx.recv().await {
            let result = tokio::time::timeout(write_timeout, write_frame(&mut wr, &frame)).await;
            if let Some(w) = written {
                let _ = w.send(());
            }
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!("client gone: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        peer = who,
                        "closing a connection whose client read nothing for {} ms (ipc.write_timeout_ms)",
                        write_timeout.as_millis()
                    );
                    return;
                }
            }
        }
    });
    let live = state.live.clone();
    let mut forwarders = tokio::task::JoinSet::new();
    loop {
        let frame = tokio::select! {
            read = read_frame(&mut rd, opts.frame_timeout) => read,
            // The writer stops when the client is gone or stopped reading.
            _ = out.closed() => break,
            _ = state.evict.notified() => {
                tracing::info!(peer, "closing an idle connection: a new client needs its place (ipc.max_connections)");
                let _ = out.try_send(Frame::Error(ErrorBody {
                    code: ErrorCode::Overloaded,
                    message: "closed while idle: every connection was taken and a new client needed one (ipc.max_connections)".into(),
                }).into());
                break;
            }
        };
        state
            .last_frame_ms
            .store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(ReadError::Io(e)) => {
                tracing::debug!(peer, "connection failed: {e}");
                break;
            }
            Err(e) => {
                let code = match &e {
                    ReadError::Frame(f) => f.code(),
                    _ => ErrorCode::BadFrame,
                };
                tracing::warn!(peer, "bad frame, closing the connection: {e}");
                let _ = out
                    .send(
                        Frame::Error(ErrorBody {
                            code,
                            message: e.to_string(),
                        })
                        .into(),
                    )
                    .await;
                break;
            }
        };
        match frame {
            Frame::Chat(req) => {
                let client_id = req.id;
                let refusal = {
                    let mut l = slots(&live);
                    if l.contains_key(&client_id) {
                        Some((
                            ErrorCode::BadRequest,
                            format!("request id {client_id} is already in use on this connection"),
                        ))
                    } else if l.len() >= MAX_REQUESTS {
                        Some((
                            ErrorCode::Overloaded,
                            format!("this connection already has {MAX_REQUESTS} requests running"),
                        ))
                    } else {
                        l.insert(client_id, Slot::Submitting(false));
                        None
                    }
                };
                if let Some((code, message)) = refusal {
                    let event = Event::error(code, message);
                    let frame = Frame::Event {
                        id: client_id,
                        event,
                    };
                    if out.send(frame.into()).await.is_err() {
                        break;
                    }
                    continue;
                }
                let (rt, out, live) = (rt.clone(), out.clone(), live.clone());
                let mut tracker = Tracker::new(rt.metrics(), "ipc");
                forwarders.spawn(async move {
                    let mut events = rt.submit(req).await;
                    let cancelled = {
                        let mut l = slots(&live);
                        let cancelled = matches!(l.get(&client_id), Some(Slot::Submitting(true)));
                        l.insert(client_id, Slot::Live(events.id()));
                        cancelled
                    };
                    if cancelled {
                        rt.cancel(events.id());
                    }
                    while let Some(event) = events.next().await {
                        let terminal = event.is_terminal();
                        tracker.event(&event);
                        if let Some(outcome) = metrics::outcome(&event) {
                            tracker.finish(outcome);
                        }
                        // The stream is held until its last event is written:
                        // the daemon waits for open streams before it exits.
                        let (written, wrote) = if terminal {
                            let (tx, rx) = oneshot::channel();
                            (Some(tx), Some(rx))
                        } else {
                            (None, None)
                        };
                        let frame = Frame::Event {
                            id: client_id,
                            event,
                        };
                        if out.send(Outgoing { frame, written }).await.is_err() {
                            // The connection is gone: dropping the stream cancels it.
                            break;
                        }
                        if let Some(wrote) = wrote {
                            let _ = wrote.await;
                            break;
                        }
                    }
                    slots(&live).remove(&client_id);
                });
            }
            Frame::Cancel { id } => {
                let runtime_id = match slots(&live).get_mut(&id) {
                    Some(Slot::Live(rid)) => Some(*rid),
                    Some(Slot::Submitting(c)) => {
                        *c = true;
                        None
                    }
                    None => None,
                };
                if let Some(rid) = runtime_id {
                    rt.cancel(rid);
                }
            }
            // Answered in turn: a client asking faster than it reads waits
            // for its own replies instead of queueing tasks here.
            Frame::Status { id } => {
                let frame = match rt.status().await {
                    Ok(status) => Frame::StatusReply {
                        id,
                        status: Box::new(status),
                    },
                    Err(e) => Frame::Ack {
                        id,
                        error: Some(ErrorBody {
                            code: ErrorCode::Internal,
                            message: e.to_string(),
                        }),
                    },
                };
                if out.send(frame.into()).await.is_err() {
                    break;
                }
            }
            Frame::FlushCache { id } => {
                let frame = match rt.flush_cache().await {
                    Ok(blocks) => Frame::FlushReply {
                        id,
                        blocks,
                        error: None,
                    },
                    Err(e) => Frame::FlushReply {
                        id,
                        blocks: 0,
                        error: Some(ErrorBody {
                            code: ErrorCode::Internal,
                            message: e.to_string(),
                        }),
                    },
                };
                if out.send(frame.into()).await.is_err() {
                    break;
                }
            }
            // A load takes seconds: it runs beside the connection's other
            // requests, and its answer comes when it is done.
            Frame::LoadModel { id, spec } => {
                let (rt, out) = (rt.clone(), out.clone());
                forwarders.spawn(async move {
                    tracing::info!(model = %spec.name, path = %spec.path, "model load asked");
                    let error = rt.load(spec).await.err();
                    let _ = out.send(Frame::Ack { id, error }.into()).await;
                });
            }
            Frame::UnloadModel { id, name } => {
                let (rt, out) = (rt.clone(), out.clone());
                forwarders.spawn(async move {
                    tracing::info!(model = %name, "model unload asked");
                    let error = rt.unload(&name).await.err();
                    let _ = out.send(Frame::Ack { id, error }.into()).await;
                });
            }
            Frame::Fault { id, fault } => {
                let error = match rt.inject_fault(fault) {
                    Ok(()) => {
                        tracing::warn!(peer, ?fault, "fault injected");
                        None
                    }
                    Err(e @ RuntimeError::FaultInjectionOff) => Some(ErrorBody {
                        code: ErrorCode::Forbidden,
                        message: e.to_string(),
                    }),
                    Err(e) => Some(ErrorBody {
                        code: ErrorCode::Internal,
                        message: e.to_string(),
                    }),
                };
                if out.send(Frame::Ack { id, error }.into()).await.is_err() {
                    break;
                }
            }
            other => {
                let message = format!(
                    "a {:?} frame is sent by the daemon, not to it",
                    other.kind()
                );
                tracing::warn!(peer, "bad frame, closing the connection: {message}");
                let _ = out
                    .send(
                        Frame::Error(ErrorBody {
                            code: ErrorCode::BadFrame,
                            message,
                        })
                        .into(),
                    )
                    .await;
                break;
            }
        }
    }
    // Cancel what is still running: each forwarder drops its stream.
    forwarders.abort_all();
    while forwarders.join_next().await.is_some() {}
    // Let the writer flush what is queued (an error frame), then close.
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

/// Removes the socket file when dropped.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
