//! A blocking wrapper for programs without an async runtime: the same
//! operations as [`crate::Client`], and streams that are iterators.
//!
//! ```no_run
//! use embody_client::blocking::Client;
//! use embody_client::{Event, Request};
//!
//! let client = Client::connect_default()?;
//! for event in client.chat(Request::user("Is the gripper open?").max_tokens(32))? {
//!     if let Event::Delta { text, .. } = event {
//!         print!("{text}");
//!     }
//! }
//! # Ok::<(), embody_client::ClientError>(())
//! ```
//!
//! It runs its own small tokio runtime (one worker thread); do not call it
//! from inside an async runtime, use [`crate::Client`] there.

use std::path::Path;
use std::sync::Arc;

use crate::{ClientError, Event, Fault, ModelSpec, Request, Status};

/// A blocking connection to embodyd.
pub struct Client {
    rt: Arc<tokio::runtime::Runtime>,
    inner: crate::Client,
}

fn runtime() -> Result<Arc<tokio::runtime::Runtime>, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("embody-client")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| ClientError::Closed(format!("cannot start the client's runtime: {e}")))
}

impl Client {
    /// Connects to the daemon's socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let rt = runtime()?;
        let inner = rt.block_on(crate::Client::connect(path))?;
        Ok(Self { rt, inner })
    }

    /// Finds the socket ([`crate::find_socket`]) and connects to it.
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect(crate::find_socket()?)
    }

    /// Sends a chat request; the stream iterates over its events.
    pub fn chat(&self, req: Request) -> Result<ChatStream, ClientError> {
        let inner = self.rt.block_on(self.inner.chat(req))?;
        Ok(ChatStream {
            rt: self.rt.clone(),
            inner,
        })
    }

    /// Cancels the request with this id.
    pub fn cancel(&self, id: u64) -> Result<(), ClientError> {
        self.inner.cancel(id)
    }

    /// The daemon's status.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.rt.block_on(self.inner.status())
    }

    /// Drops the unused cached prompt prefixes (see [`crate::Client::flush_cache`]).
    pub fn flush_cache(&self) -> Result<u64, ClientError> {
        self.rt.block_on(self.inner.flush_cache())
    }

    /// Loads or replaces a model (see [`crate::Client::load_model`]).
    pub fn load_model(&self, spec: ModelSpec) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.load_model(spec))
    }

    /// Unloads a model (see [`crate::Client::unload_model`]).
    pub fn unload_model(&self, name: &str) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.unload_model(name))
    }

    /// Makes the daemon's decoder fail (tests only; see [`crate::Client::inject_fault`]).
    pub fn inject_fault(&self, fault: Fault) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.inject_fault(fault))
    }
}

/// The events answering one chat request, as an iterator. Dropping it
/// before the end cancels the request.
pub struct ChatStream {
    rt: Arc<tokio::runtime::Runtime>,
    inner: crate::ChatStream,
}

impl ChatStream {
    /// The request's id on this connection.
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// Asks the daemon to cancel this request.
    pub fn cancel(&self) -> Result<(), ClientError> {
        self.inner.cancel()
    }
}

impl Iterator for ChatStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.rt.block_on(self.inner.next())
    }
}
