//! Robot-side interfaces: the zenoh key space (`embody/<node>/...`), ROS 2 topics
//! as rmw_zenoh puts them on the wire, camera ingestion (latest frame wins) and
//! periodic perception tasks.
//!
//! The decision to understand first: **everything here is a thin adapter over
//! [`embody_actors::Runtime`]**. A zenoh query, a ROS 2 prompt and a
//! perception tick all become one `protocol::Request`, and the answer is the
//! runtime's event stream, mapped onto the transport (one zenoh reply per
//! event, one `std_msgs/String` per answer, one JSON result per tick). Camera
//! frames go into the runtime's shared camera registry, so a request from any
//! interface (IPC, HTTP, zenoh) can attach a camera's latest frame by name.
//!
//! Untrusted bytes (JSON, CDR, images) never panic: each parser returns a
//! typed error, which is logged and, where the caller has a reply channel,
//! sent back to it.
#![warn(missing_docs)]

pub mod camera;
pub mod chat;
pub mod config;
mod keyspace;
pub mod ros2;
pub mod session;
mod tasks;

use std::sync::Arc;

use embody_actors::Runtime;

pub use config::{AdaptersConfig, CameraConfig, CameraFormat, Ros2Config, TaskConfig, ZenohConfig};
pub use tasks::{FrameInfo, TaskError, TaskResult};

use camera::CameraFeed;
use keyspace::KeySpace;
use ros2::{msgs, wire, RosNode};

/// Errors of starting the robot interfaces.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
    /// zenoh refused something.
    #[error("{0}")]
    Zenoh(String),
}

/// The running robot interfaces. [`RobotAdapters::stop`] takes them down;
/// dropping them does too, less gracefully.
pub struct RobotAdapters {
    session: zenoh::Session,
    keyspace: KeySpace,
    prefix: String,
    stop_tasks: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    // Held for their subscriptions, tokens and threads.
    _cameras: Vec<CameraFeed>,
    _ros: Option<RosParts>,
}

/// The ROS 2 node and what hangs on it: the prompt loop and the liveliness
/// tokens of camera subscriptions.
struct RosParts {
    node: RosNode,
    _prompts: ros2::PromptLoop,
    camera_tokens: Vec<zenoh::liveliness::LivelinessToken>,
}

impl RobotAdapters {
    /// Opens the zenoh session and starts everything configured. Must run
    /// inside a tokio runtime.
    pub async fn start(cfg: &AdaptersConfig, runtime: Runtime) -> Result<Self, Error> {
        cfg.validate()?;
        let session = session::open(&cfg.zenoh).await?;
        let prefix = cfg.zenoh.key_prefix();
        tracing::info!(zid = %session.zid(), "zenoh session open (listening on {:?})", cfg.zenoh.listen);

        let mut ros = if cfg.ros2.enabled {
            let node = RosNode::declare(&session, &cfg.ros2).await?;
            let prompts =
                ros2::PromptLoop::start(&session, &node, &cfg.ros2, runtime.clone()).await?;
            Some(RosParts {
                node,
                _prompts: prompts,
                camera_tokens: Vec::new(),
            })
        } else {
            None
        };

        let mut cameras = Vec::new();
        for cam in &cfg.cameras {
            let key = match cam.format {
                CameraFormat::Ros2Image | CameraFormat::Ros2CompressedImage => {
                    let ty = if cam.format == CameraFormat::Ros2Image {
                        &msgs::IMAGE
                    } else {
                        &msgs::COMPRESSED_IMAGE
                    };
                    if let Some(r) = &mut ros {
                        let token = r.node.subscription_token(&session, &cam.key, ty).await?;
                        r.camera_tokens.push(token);
                    }
                    wire::topic_key(cfg.ros2.domain_id, &cam.key, ty)
                }
                _ => cam.key.clone(),
            };
            cameras.push(CameraFeed::start(&session, &key, cam.clone(), runtime.cameras()).await?);
        }

        let (stop_tasks, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for t in &cfg.tasks {
            let key = if t.key.is_empty() {
                format!("{prefix}/tasks/{}", t.name)
            } else {
                t.key.clone()
            };
            let ros_out = match (&ros, t.ros2_topic.is_empty()) {
                (Some(r), false) => Some(Arc::new(
                    r.node
                        .publisher(&session, &t.ros2_topic, &msgs::STRING)
                        .await?,
                )),
                _ => None,
            };
            let out = tasks::TaskOutputs {
                session: session.clone(),
                key,
                ros: ros_out,
            };
            tasks.push(tokio::spawn(tasks::run_task(
                t.clone(),
                runtime.clone(),
                out,
                stop_rx.clone(),
            )));
        }

        let keyspace = KeySpace::declare(&session, &prefix, runtime).await?;
        Ok(Self {
            session,
            keyspace,
            prefix,
            stop_tasks,
            tasks,
            _cameras: cameras,
            _ros: ros,
        })
    }

    /// The key space's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The zenoh session's id.
    pub fn zid(&self) -> String {
        self.session.zid().to_string()
    }

    /// The daemon begins to drain: the `alive` token goes and perception
    /// tasks stop; queries in flight keep their replies flowing.
    pub async fn begin_drain(&mut self) {
        self.keyspace.withdraw_alive().await;
        let _ = self.stop_tasks.send(true);
    }

    /// Stops everything and closes the session.
    pub async fn stop(mut self) {
        self.begin_drain().await;
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let session = self.session.clone();
        drop(self);
        if let Err(e) = session.close().await {
            tracing::warn!("closing the zenoh session: {e}");
        }
    }
}
