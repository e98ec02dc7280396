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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use embody_actors::{Runtime, RuntimeError};
use embody_client::framing::{read_frame, write_frame, ReadError};
use embody_protocol::wire::{ErrorBody, Frame};
use embody_protocol::{ErrorCode, Event};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};

/// Server settings.
#[derive(Clone, Debug)]
pub struct IpcOptions {
    /// Most connections at once.
    pub max_connections: usize,
    /// Time limit for the rest of a frame once it has begun.
    pub frame_timeout: Duration,
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
    let slots = Arc::new(Semaphore::new(opts.max_connections));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: {} connections already open", opts.max_connections);
            tokio::spawn(refuse(stream, opts.max_connections));
            continue;
        };
        let (rt, opts) = (rt.clone(), opts.clone());
        tokio::spawn(async move {
            tracing::debug!(%peer, "client connected");
            connection(stream, rt, opts, &peer).await;
            tracing::debug!(%peer, "client disconnected");
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

async fn connection(stream: UnixStream, rt: Runtime, opts: IpcOptions, peer: &str) {
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if let Err(e) = write_frame(&mut wr, &frame).await {
                tracing::debug!("client gone: {e}");
                return;
            }
        }
    });
    let live: Slots = Arc::default();
    let mut forwarders = tokio::task::JoinSet::new();
    loop {
        let frame = tokio::select! {
            read = read_frame(&mut rd, opts.frame_timeout) => read,
            // The writer stops when the client stops reading (it is gone).
            _ = out.closed() => break,
        };
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
                let _ = out.send(Frame::Error(ErrorBody {
                    code,
                    message: e.to_string(),
                }));
                break;
            }
        };
        match frame {
            Frame::Chat(req) => {
                let client_id = req.id;
                {
                    let mut l = slots(&live);
                    if l.contains_key(&client_id) {
                        let _ = out.send(Frame::Event {
                            id: client_id,
                            event: Event::error(
                                ErrorCode::BadRequest,
                                format!(
                                    "request id {client_id} is already in use on this connection"
                                ),
                            ),
                        });
                        continue;
                    }
                    l.insert(client_id, Slot::Submitting(false));
                }
                let (rt, out, live) = (rt.clone(), out.clone(), live.clone());
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
                        if out
                            .send(Frame::Event {
                                id: client_id,
                                event,
                            })
                            .is_err()
                        {
                            // The connection is gone: dropping the stream cancels it.
                            break;
                        }
                        if terminal {
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
            Frame::Status { id } => {
                let (rt, out) = (rt.clone(), out.clone());
                tokio::spawn(async move {
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
                    let _ = out.send(frame);
                });
            }
            Frame::FlushCache { id } => {
                let (rt, out) = (rt.clone(), out.clone());
                tokio::spawn(async move {
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
                    let _ = out.send(frame);
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
                let _ = out.send(Frame::Ack { id, error });
            }
            other => {
                let message = format!(
                    "a {:?} frame is sent by the daemon, not to it",
                    other.kind()
                );
                tracing::warn!(peer, "bad frame, closing the connection: {message}");
                let _ = out.send(Frame::Error(ErrorBody {
                    code: ErrorCode::BadFrame,
                    message,
                }));
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
