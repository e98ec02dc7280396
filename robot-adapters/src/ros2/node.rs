//! The daemon's ROS 2 node: its liveliness tokens, its publishers (with
//! rmw_zenoh's attachment on every message) and the prompt → answer loop.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use embody_actors::Runtime;
use embody_protocol::{CameraRef, Request};
use zenoh::liveliness::LivelinessToken;
use zenoh::pubsub::{Publisher, Subscriber};

use super::msgs::{self, RosType};
use super::wire::{self, Attachment, EntityKind, NodeIdentity};
use crate::chat::ask;
use crate::config::Ros2Config;
use crate::Error;

/// The node: its identity and its liveliness token. Entities declared
/// through it get the next entity id.
pub(crate) struct RosNode {
    pub identity: NodeIdentity,
    next_entity: AtomicU32,
    _token: LivelinessToken,
}

impl RosNode {
    /// Declares the node on the ROS graph.
    pub async fn declare(session: &zenoh::Session, cfg: &Ros2Config) -> Result<Self, Error> {
        let identity = NodeIdentity {
            domain: cfg.domain_id,
            zid: session.zid().to_string(),
            node_id: 0,
            namespace: cfg.namespace.clone(),
            name: cfg.node.clone(),
        };
        let token = declare_token(session, &identity.node_token()).await?;
        Ok(Self {
            identity,
            next_entity: AtomicU32::new(1),
            _token: token,
        })
    }

    /// Declares a subscription's liveliness token (the subscriber itself is
    /// declared by whoever reads it).
    pub async fn subscription_token(
        &self,
        session: &zenoh::Session,
        topic: &str,
        ty: &RosType,
    ) -> Result<LivelinessToken, Error> {
        let id = self.next_entity.fetch_add(1, Ordering::Relaxed);
        let token = self
            .identity
            .entity_token(id, EntityKind::Subscription, topic, ty);
        declare_token(session, &token).await
    }

    /// Declares a publisher of `ty` on `topic`.
    pub async fn publisher(
        &self,
        session: &zenoh::Session,
        topic: &str,
        ty: &RosType,
    ) -> Result<RosPublisher, Error> {
        let id = self.next_entity.fetch_add(1, Ordering::Relaxed);
        let token_key = self
            .identity
            .entity_token(id, EntityKind::Publisher, topic, ty);
        let key = wire::topic_key(self.identity.domain, topic, ty);
        let publisher = session
            .declare_publisher(key.clone())
            .await
            .map_err(|e| Error::Zenoh(format!("declaring a publisher on {key}: {e}")))?;
        Ok(RosPublisher {
            gid: wire::gid_for(&token_key),
            token: declare_token(session, &token_key).await?,
            publisher,
            sequence: AtomicI64::new(0),
            topic: topic.to_string(),
        })
    }
}

async fn declare_token(session: &zenoh::Session, key: &str) -> Result<LivelinessToken, Error> {
    session
        .liveliness()
        .declare_token(key.to_string())
        .await
        .map_err(|e| Error::Zenoh(format!("declaring the liveliness token {key}: {e}")))
}

/// A ROS 2 publisher: CDR payloads with rmw_zenoh's attachment.
pub(crate) struct RosPublisher {
    gid: [u8; wire::GID_LEN],
    #[allow(dead_code)] // held for its liveliness
    token: LivelinessToken,
    publisher: Publisher<'static>,
    sequence: AtomicI64,
    topic: String,
}

impl RosPublisher {
    /// Publishes one CDR message.
    pub async fn put(&self, cdr: Vec<u8>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let att = Attachment {
            sequence_number: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            source_timestamp: now.as_nanos() as i64,
            gid: self.gid,
        };
        if let Err(e) = self
            .publisher
            .put(cdr)
            .attachment(att.encode().to_vec())
            .await
        {
            tracing::warn!(topic = %self.topic, "publishing on ROS 2 failed: {e}");
        }
    }

    /// Publishes a `std_msgs/msg/String`.
    pub async fn put_string(&self, text: &str) {
        self.put(msgs::write_string(text)).await;
    }
}

/// The prompt → answer loop: a subscriber on the prompt topic, answers on
/// the answer topic. Dropping it stops both.
pub(crate) struct PromptLoop {
    _subscriber: Subscriber<()>,
    _token: LivelinessToken,
    _answers: Arc<RosPublisher>,
}

impl PromptLoop {
    /// Starts answering prompts.
    pub async fn start(
        session: &zenoh::Session,
        node: &RosNode,
        cfg: &Ros2Config,
        runtime: Runtime,
    ) -> Result<Self, Error> {
        let answers = Arc::new(
            node.publisher(session, &cfg.answer_topic, &msgs::STRING)
                .await?,
        );
        let token = node
            .subscription_token(session, &cfg.prompt_topic, &msgs::STRING)
            .await?;
        let key = wire::topic_key(cfg.domain_id, &cfg.prompt_topic, &msgs::STRING);
        let handle = tokio::runtime::Handle::current();
        let (out, cfg2) = (answers.clone(), cfg.clone());
        let subscriber = session
            .declare_subscriber(key.clone())
            .callback(move |sample| {
                let payload = sample.payload().to_bytes().into_owned();
                let (rt, out, cfg) = (runtime.clone(), out.clone(), cfg2.clone());
                handle.spawn(async move { answer(&rt, &out, &cfg, &payload).await });
            })
            .await
            .map_err(|e| Error::Zenoh(format!("subscribing to {key}: {e}")))?;
        tracing::info!(
            "ROS 2 node {} answers {} on {}",
            cfg.node,
            cfg.prompt_topic,
            cfg.answer_topic
        );
        Ok(Self {
            _subscriber: subscriber,
            _token: token,
            _answers: answers,
        })
    }
}

/// Answers one prompt message: the generated text, or `error (<code>): <message>`.
async fn answer(rt: &Runtime, out: &RosPublisher, cfg: &Ros2Config, payload: &[u8]) {
    let prompt = match msgs::read_string(payload) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("malformed std_msgs/msg/String on {}: {e}", cfg.prompt_topic);
            tracing::warn!("{msg}");
            out.put_string(&format!("error (bad_request): {msg}")).await;
            return;
        }
    };
    let mut req = Request::user(prompt);
    req.model = Some(cfg.prompt_model.clone()).filter(|m| !m.is_empty());
    if cfg.max_tokens > 0 {
        req.max_tokens = Some(cfg.max_tokens);
    }
    if !cfg.prompt_camera.is_empty() {
        req.cameras.push(CameraRef {
            name: cfg.prompt_camera.clone(),
            max_age_ms: None,
        });
    }
    let outcome = ask(rt, req, "ros2").await;
    let text = match outcome.error {
        Some((code, message)) => {
            tracing::warn!("ROS 2 prompt failed: {code}: {message}");
            format!("error ({code}): {message}")
        }
        None => outcome.text,
    };
    out.put_string(&text).await;
}
