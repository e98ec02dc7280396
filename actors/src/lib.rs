//! The supervised actor runtime: a [`Supervisor`](supervisor) owning the
//! device, cache, vision and decoder actors, and the [`Runtime`] handle
//! through which every interface (IPC, HTTP, zenoh) submits requests.
//!
//! The decision to understand first: **what must survive a crash lives
//! outside the actors.** The admission queue, the registry of requests the
//! decoder holds and the progress counters sit in one shared structure that
//! the supervisor hands to each new decoder. So when the decoder fails, every
//! request it held is found and ended with a `decoder_restarted` error (none
//! hangs), queued requests simply wait for the restarted decoder, and health
//! is judged by progress (the decoder loop turning), not by an actor being
//! alive.
//!
//! Inference never runs on async worker threads: the decoder drives the
//! engine's scheduler on a dedicated OS thread and talks to the actor world
//! through the shared queue and channels. Request/reply between actors always
//! has a timeout.
//!
//! ```no_run
//! # async fn demo() -> Result<(), embody_actors::RuntimeError> {
//! use embody_actors::{Runtime, RuntimeConfig};
//! use embody_protocol::{Event, Request};
//!
//! let rt = Runtime::start(RuntimeConfig {
//!     model_path: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
//!     ..RuntimeConfig::default()
//! })
//! .await?;
//! let mut events = rt.submit(Request::user("Name a sensor.").max_tokens(16)).await;
//! while let Some(ev) = events.next().await {
//!     if let Event::Delta { text, .. } = ev {
//!         print!("{text}");
//!     }
//! }
//! rt.shutdown().await;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod cache;
mod cameras;
mod config;
mod decoder;
mod device;
pub mod metrics;
mod models;
mod runtime;
mod served;
mod shared;
mod supervisor;
mod vision;

use std::path::PathBuf;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};

pub use cameras::{Attached, CameraError, CameraStats, Cameras, Frame};
pub use config::{Limits, RuntimeConfig};
pub use models::{default_name, memory_estimate, PathResolver, RuntimeOptions};
pub use runtime::{DrainReport, EventStream, Health, Runtime};

/// Errors of the runtime itself (a request's failures arrive as events).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The model could not be loaded.
    #[error("cannot load the model {path}: {source}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// What went wrong.
        source: embody_engine::Error,
    },
    /// An actor failed to start.
    #[error("the runtime failed to start: {0}")]
    Start(String),
    /// An actor did not answer in time.
    #[error("the {actor} actor did not answer within {after:?}")]
    Timeout {
        /// Which actor.
        actor: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// An actor is not running.
    #[error("the {0} actor is not running")]
    ActorGone(&'static str),
    /// Fault injection was asked for while it is off.
    #[error("fault injection is off; it is turned on by `fault_injection = true` in the [testing] section of the configuration, for tests only")]
    FaultInjectionOff,
}

/// The children's handles, as the supervisor last started them.
#[derive(Default)]
pub(crate) struct Children {
    pub device: Option<ActorRef<device::DeviceMsg>>,
    pub cache: Option<ActorRef<cache::CacheMsg>>,
    pub vision: Option<ActorRef<vision::VisionMsg>>,
    pub decoder: Option<ActorRef<decoder::DecoderMsg>>,
}

/// Request/reply with a time limit.
pub(crate) async fn call<M, R>(
    actor: &ActorRef<M>,
    msg: impl FnOnce(RpcReplyPort<R>) -> M,
    timeout: Duration,
    who: &'static str,
) -> Result<R, RuntimeError>
where
    M: ractor::Message,
    R: Send + 'static,
{
    match actor.call(msg, Some(timeout)).await {
        Ok(CallResult::Success(r)) => Ok(r),
        Ok(CallResult::Timeout) => Err(RuntimeError::Timeout {
            actor: who,
            after: timeout,
        }),
        Ok(CallResult::SenderError) | Err(_) => Err(RuntimeError::ActorGone(who)),
    }
}
