//! The local client library for embodyd: connects to the daemon's Unix socket
//! and streams answers. It depends on `embody-protocol` only, so robot
//! programs that link it stay light.
//!
//! One connection carries many requests at once: each [`Client::chat`] returns
//! its own [`ChatStream`], and frames for all of them share the socket. A
//! stream ends after exactly one terminal event ([`Event::Finished`] or
//! [`Event::Error`]); dropping it early cancels the request in the daemon.
//!
//! ```no_run
//! use embody_client::{Client, Event, Request};
//!
//! # async fn demo() -> Result<(), embody_client::ClientError> {
//! // Finds the socket the way the daemon chose it ($RUNTIME_DIRECTORY,
//! // $XDG_RUNTIME_DIR, /run/embodyd); `Client::connect(path)` takes one.
//! let client = Client::connect_default().await?;
//! let mut answer = client.chat(Request::user("What does a lidar measure?").max_tokens(64)).await?;
//! while let Some(event) = answer.next().await {
//!     match event {
//!         Event::Delta { text, .. } => print!("{text}"),
//!         Event::Finished { usage, .. } => println!("\n[{} tokens]", usage.completion_tokens),
//!         Event::Error { code, message } => eprintln!("{code}: {message}"),
//!         _ => {}
//!     }
//! }
//! let status = client.status().await?;
//! println!("{} ready: {}", status.model.name, status.ready);
//! # Ok(()) }
//! ```
//!
//! Programs without an async runtime use [`blocking::Client`], whose streams
//! are iterators.
#![warn(missing_docs)]

pub mod blocking;
pub mod framing;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use embody_protocol::wire::ErrorBody;
use embody_protocol::wire::Frame;
pub use embody_protocol::{
    ErrorCode, Event, Fault, FinishReason, Image, Message, ModelEntry, ModelSpec, ModelState,
    Request, Role, SamplingParams, Status, Usage,
};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// The socket's file name inside the runtime directory.
pub const SOCKET_NAME: &str = "embodyd.sock";

/// Where the system service's socket lives (`RuntimeDirectory=embodyd`), and
/// the daemon's default when no runtime directory is set.
pub const SYSTEM_SOCKET: &str = "/run/embodyd/embodyd.sock";

/// How long the rest of a frame may take once its first byte arrived.
const FRAME_STALL: Duration = Duration::from_secs(10);

/// The places the daemon's socket may be, in the order they are tried:
/// `$EMBODY_SOCKET`, `$RUNTIME_DIRECTORY/embodyd.sock` (systemd sets it for
/// the service), `$XDG_RUNTIME_DIR/embodyd.sock`, then [`SYSTEM_SOCKET`].
pub fn socket_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("EMBODY_SOCKET").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
        if let Some(dir) = runtime_dir(var) {
            out.push(dir.join(SOCKET_NAME));
        }
    }
    out.push(PathBuf::from(SYSTEM_SOCKET));
    out
}

/// The first folder of a runtime-directory variable (systemd separates
/// several with ':'), if it is set.
pub fn runtime_dir(var: &str) -> Option<PathBuf> {
    let v = std::env::var(var).ok()?;
    let first = v.split(':').next()?.trim();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// The first of [`socket_candidates`] that exists.
pub fn find_socket() -> Result<PathBuf, ClientError> {
    let tried = socket_candidates();
    tried
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or(ClientError::NoSocket { tried })
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket was found where the daemon puts it.
    #[error("no embodyd socket found (tried {}); is embodyd running? Set EMBODY_SOCKET or pass the socket's path", display_paths(.tried))]
    NoSocket {
        /// The paths tried.
        tried: Vec<PathBuf>,
    },
    /// Connecting failed.
    #[error("cannot connect to embodyd at {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The connection is closed (the daemon stopped, or refused a frame).
    #[error("the connection to embodyd is closed: {0}")]
    Closed(String),
    /// A request cannot be sent (it is over the frame size limits).
    #[error("the request cannot be sent: {0}")]
    Encode(#[from] embody_protocol::wire::FrameError),
    /// The daemon refused the operation.
    #[error("embodyd refused: {code}: {message}")]
    Refused {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

fn display_paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

enum Reply {
    Status(Box<Status>),
    Ack(Option<ErrorBody>),
    Flushed(u64, Option<ErrorBody>),
}

#[derive(Default)]
struct Routes {
    streams: HashMap<u64, mpsc::UnboundedSender<Event>>,
    replies: HashMap<u64, oneshot::Sender<Reply>>,
    /// Why the connection closed, once it has.
    closed: Option<ErrorBody>,
}

struct Conn {
    out: mpsc::UnboundedSender<Frame>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
}

impl Conn {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Ends every stream and pending reply: the connection is gone.
    fn close(&self, why: ErrorBody) {
        let mut r = self.routes();
        for (_, tx) in r.streams.drain() {
            let _ = tx.send(Event::error(why.code, why.message.clone()));
        }
        r.replies.clear();
        r.closed.get_or_insert(why);
    }

    fn closed_error(&self) -> Option<ClientError> {
        self.routes()
            .closed
            .as_ref()
            .map(|b| ClientError::Closed(format!("{}: {}", b.code, b.message)))
    }

    fn send(&self, frame: Frame) -> Result<(), ClientError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        self.out
            .send(frame)
            .map_err(|_| ClientError::Closed("the writer stopped".into()))
    }

    async fn request(&self, id: u64, frame: Frame) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut r = self.routes();
            if let Some(b) = &r.closed {
                return Err(ClientError::Closed(format!("{}: {}", b.code, b.message)));
            }
            r.replies.insert(id, tx);
        }
        self.send(frame)?;
        rx.await.map_err(|_| {
            self.closed_error()
                .unwrap_or_else(|| ClientError::Closed("no reply".into()))
        })
    }
}

/// A connection to embodyd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

impl Client {
    /// Connects to the daemon's socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::from_stream(stream))
    }

    /// Finds the socket ([`find_socket`]) and connects to it.
    pub async fn connect_default() -> Result<Self, ClientError> {
        Self::connect(find_socket()?).await
    }

    fn from_stream(stream: UnixStream) -> Self {
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
        let conn = Arc::new(Conn {
            out,
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if framing::write_frame(&mut wr, &frame).await.is_err() {
                    break;
                }
            }
        });
        // The reader holds the connection weakly, so dropping every Client
        // and stream closes the socket.
        let weak = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let why = loop {
                let frame = match framing::read_frame(&mut rd, FRAME_STALL).await {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        break ErrorBody {
                            code: ErrorCode::Unavailable,
                            message: "embodyd closed the connection".into(),
                        }
                    }
                    Err(e) => {
                        break ErrorBody {
                            code: ErrorCode::Unavailable,
                            message: e.to_string(),
                        }
                    }
                };
                let Some(conn) = weak.upgrade() else { return };
                match frame {
                    Frame::Event { id, event } => {
                        let mut r = conn.routes();
                        let terminal = event.is_terminal();
                        if let Some(tx) = r.streams.get(&id) {
                            let _ = tx.send(event);
                        }
                        if terminal {
                            r.streams.remove(&id);
                        }
                    }
                    Frame::StatusReply { id, status } => {
                        if let Some(tx) = conn.routes().replies.remove(&id) {
                            let _ = tx.send(Reply::Status(status));
                        }
                    }
                    Frame::Ack { id, error } => {
                        if let Some(tx) = conn.routes().replies.remove(&id) {
                            let _ = tx.send(Reply::Ack(error));
                        }
                    }
                    Frame::FlushReply { id, blocks, error } => {
                        if let Some(tx) = conn.routes().replies.remove(&id) {
                            let _ = tx.send(Reply::Flushed(blocks, error));
                        }
                    }
                    Frame::Error(body) => break body,
                    // Client-bound frames only; anything else is ignored.
                    _ => {}
                }
            };
            if let Some(conn) = weak.upgrade() {
                conn.close(why);
            }
        });
        Self { conn }
    }

    /// Sends a chat request and returns its stream of events. The request's
    /// `id` is replaced by one unique on this connection
    /// ([`ChatStream::id`]).
    pub async fn chat(&self, mut req: Request) -> Result<ChatStream, ClientError> {
        let id = self.conn.id();
        req.id = id;
        let frame = Frame::Chat(req);
        // Check the size before registering, so a too-large request fails here.
        embody_protocol::wire::encode(&frame)?;
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut r = self.conn.routes();
            if let Some(b) = &r.closed {
                return Err(ClientError::Closed(format!("{}: {}", b.code, b.message)));
            }
            r.streams.insert(id, tx);
        }
        if let Err(e) = self.conn.send(frame) {
            self.conn.routes().streams.remove(&id);
            return Err(e);
        }
        Ok(ChatStream {
            id,
            rx,
            done: false,
            conn: self.conn.clone(),
        })
    }

    /// Cancels the request with this id ([`ChatStream::id`]); its stream ends
    /// with [`Event::Finished`] and reason `cancelled`.
    pub fn cancel(&self, id: u64) -> Result<(), ClientError> {
        self.conn.send(Frame::Cancel { id })
    }

    /// The daemon's status.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let id = self.conn.id();
        match self.conn.request(id, Frame::Status { id }).await? {
            Reply::Status(s) => Ok(*s),
            Reply::Ack(e) | Reply::Flushed(_, e) => Err(refused(e)),
        }
    }

    /// Drops every cached prompt prefix that no running request uses;
    /// returns the KV blocks dropped.
    pub async fn flush_cache(&self) -> Result<u64, ClientError> {
        let id = self.conn.id();
        match self.conn.request(id, Frame::FlushCache { id }).await? {
            Reply::Flushed(blocks, None) => Ok(blocks),
            Reply::Flushed(_, e) | Reply::Ack(e) => Err(refused(e)),
            Reply::Status(_) => Err(refused(None)),
        }
    }

    /// Loads a model, or replaces the one served under its name; returns
    /// once it serves. A load over the daemon's memory budget is refused
    /// with [`ErrorCode::OutOfMemory`]; a failed replacement leaves the old
    /// copy serving.
    pub async fn load_model(&self, spec: ModelSpec) -> Result<(), ClientError> {
        let id = self.conn.id();
        match self.conn.request(id, Frame::LoadModel { id, spec }).await? {
            Reply::Ack(None) => Ok(()),
            Reply::Ack(Some(e)) => Err(refused(Some(e))),
            Reply::Status(_) | Reply::Flushed(..) => Err(refused(None)),
        }
    }

    /// Unloads a model once the requests it holds have finished.
    pub async fn unload_model(&self, name: &str) -> Result<(), ClientError> {
        let id = self.conn.id();
        let frame = Frame::UnloadModel {
            id,
            name: name.to_string(),
        };
        match self.conn.request(id, frame).await? {
            Reply::Ack(None) => Ok(()),
            Reply::Ack(Some(e)) => Err(refused(Some(e))),
            Reply::Status(_) | Reply::Flushed(..) => Err(refused(None)),
        }
    }

    /// Makes the daemon's decoder fail (tests of fault tolerance only). The
    /// daemon refuses with [`ErrorCode::Forbidden`] unless its
    /// `fault_injection` switch is on.
    pub async fn inject_fault(&self, fault: Fault) -> Result<(), ClientError> {
        let id = self.conn.id();
        match self.conn.request(id, Frame::Fault { id, fault }).await? {
            Reply::Ack(None) => Ok(()),
            Reply::Ack(Some(e)) => Err(refused(Some(e))),
            Reply::Status(_) | Reply::Flushed(..) => Err(refused(None)),
        }
    }
}

fn refused(e: Option<ErrorBody>) -> ClientError {
    let e = e.unwrap_or(ErrorBody {
        code: ErrorCode::Internal,
        message: "unexpected reply".into(),
    });
    ClientError::Refused {
        code: e.code,
        message: e.message,
    }
}

/// The events answering one chat request. Dropping it before its terminal
/// event cancels the request.
pub struct ChatStream {
    id: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    done: bool,
    conn: Arc<Conn>,
}

impl ChatStream {
    /// The request's id on this connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().await.unwrap_or_else(|| {
            Event::error(ErrorCode::Unavailable, "the connection to embodyd closed")
        });
        self.done = ev.is_terminal();
        Some(ev)
    }

    /// Asks the daemon to cancel this request; the stream then ends with
    /// [`Event::Finished`] and reason `cancelled`.
    pub fn cancel(&self) -> Result<(), ClientError> {
        self.conn.send(Frame::Cancel { id: self.id })
    }

    /// Reads the stream to its end and returns the text and the terminal event.
    pub async fn collect_text(mut self) -> (String, Event) {
        let mut text = String::new();
        loop {
            match self.next().await {
                Some(Event::Delta { text: t, .. }) => text.push_str(&t),
                Some(ev) if ev.is_terminal() => return (text, ev),
                Some(_) => {}
                None => unreachable!("a stream ends with its terminal event"),
            }
        }
    }
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        if !self.done {
            self.conn.routes().streams.remove(&self.id);
            let _ = self.conn.out.send(Frame::Cancel { id: self.id });
        }
    }
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStream")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}
