//! How rmw_zenoh (ROS 2 Jazzy and later) lays ROS 2 out on zenoh: the key of
//! a topic, the attachment on every message, and the liveliness tokens that
//! make nodes, publishers and subscriptions visible to `ros2 node list` and
//! `ros2 topic list`.
//!
//! - topic key: `<domain>/<topic without its leading slash>/<pkg::msg::dds_::Type_>/<RIHS01 hash>`
//! - attachment: sequence number (i64 LE), source timestamp in ns (i64 LE),
//!   then the 16-byte GID as a sequence (length byte 16, then the bytes): 33 bytes
//! - liveliness token: `@ros2_lv/<domain>/<zid>/<node id>/<entity id>/<NN|MP|MS>/<enclave>/<namespace>/<node>`
//!   and, for publishers and subscriptions, `/<topic>/<type>/<hash>/<qos>`, where
//!   every `/` inside a name is written `%`.

use std::hash::{Hash, Hasher};

use super::msgs::RosType;

/// Bytes of a GID (`RMW_GID_STORAGE_SIZE` since Jazzy).
pub const GID_LEN: usize = 16;

/// Bytes of an attachment.
pub const ATTACHMENT_LEN: usize = 8 + 8 + 1 + GID_LEN;

/// What rmw_zenoh attaches to each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The publisher's message counter, from 1.
    pub sequence_number: i64,
    /// When the message was published, in ns since the Unix epoch.
    pub source_timestamp: i64,
    /// The publisher's GID.
    pub gid: [u8; GID_LEN],
}

/// Why an attachment could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed rmw_zenoh attachment: {0}")]
pub struct AttachmentError(String);

impl Attachment {
    /// The attachment's bytes.
    pub fn encode(&self) -> [u8; ATTACHMENT_LEN] {
        let mut out = [0u8; ATTACHMENT_LEN];
        out[..8].copy_from_slice(&self.sequence_number.to_le_bytes());
        out[8..16].copy_from_slice(&self.source_timestamp.to_le_bytes());
        out[16] = GID_LEN as u8;
        out[17..].copy_from_slice(&self.gid);
        out
    }

    /// Reads an attachment.
    pub fn decode(b: &[u8]) -> Result<Self, AttachmentError> {
        if b.len() != ATTACHMENT_LEN {
            return Err(AttachmentError(format!(
                "{} bytes, {ATTACHMENT_LEN} expected",
                b.len()
            )));
        }
        if b[16] as usize != GID_LEN {
            return Err(AttachmentError(format!(
                "GID length {}, {GID_LEN} expected",
                b[16]
            )));
        }
        Ok(Self {
            sequence_number: i64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            source_timestamp: i64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            gid: b[17..].try_into().expect("16 bytes"),
        })
    }
}

/// The key expression of a topic.
pub fn topic_key(domain: u32, topic: &str, ty: &RosType) -> String {
    format!(
        "{domain}/{}/{}/{}",
        topic.trim_matches('/'),
        ty.dds_name,
        ty.hash
    )
}

/// `/` inside a name becomes `%`, so a name is one chunk of a key.
pub fn mangle(name: &str) -> String {
    name.replace('/', "%")
}

/// A node as the graph knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The ROS domain.
    pub domain: u32,
    /// The zenoh session's id, as zenoh prints it.
    pub zid: String,
    /// The node's id within the session.
    pub node_id: u32,
    /// The node's namespace ("/" for none).
    pub namespace: String,
    /// The node's name.
    pub name: String,
}

/// What an entity is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntityKind {
    /// A publisher.
    Publisher,
    /// A subscription.
    Subscription,
}

impl NodeIdentity {
    fn head(&self, entity_id: u32, kind: &str) -> String {
        // The enclave is "/" (no security enclave), mangled like any name.
        format!(
            "@ros2_lv/{}/{}/{}/{entity_id}/{kind}/%/{}/{}",
            self.domain,
            self.zid,
            self.node_id,
            mangle(&self.namespace),
            mangle(&self.name)
        )
    }

    /// The node's liveliness token (its entity id is its node id).
    pub fn node_token(&self) -> String {
        self.head(self.node_id, "NN")
    }

    /// The liveliness token of a publisher or subscription of this node:
    /// reliable, volatile, keep-last 10 (ROS 2's default QoS).
    pub fn entity_token(
        &self,
        entity_id: u32,
        kind: EntityKind,
        topic: &str,
        ty: &RosType,
    ) -> String {
        let kind = match kind {
            EntityKind::Publisher => "MP",
            EntityKind::Subscription => "MS",
        };
        // Empty QoS fields take rmw_zenoh's defaults; the depth is given.
        format!(
            "{}/{}/{}/{}/::,10:,:,:,,",
            self.head(entity_id, kind),
            mangle(topic),
            ty.dds_name,
            ty.hash
        )
    }
}

/// A GID for an entity, derived from its liveliness token (as rmw_zenoh
/// derives it, though with another hash: it only needs to be unique).
pub fn gid_for(token: &str) -> [u8; GID_LEN] {
    let mut out = [0u8; GID_LEN];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (i, token).hash(&mut h);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::msgs::STRING;
    use super::*;

    #[test]
    fn attachments_are_33_bytes_and_round_trip() {
        let a = Attachment {
            sequence_number: 1,
            source_timestamp: 1_700_000_000_123_456_789,
            gid: [7; GID_LEN],
        };
        let b = a.encode();
        assert_eq!(b.len(), 33);
        assert_eq!(&b[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[16], 16);
        assert_eq!(Attachment::decode(&b), Ok(a));
        assert!(Attachment::decode(&b[..32]).is_err());
        let mut bad = b;
        bad[16] = 24;
        assert!(Attachment::decode(&bad).is_err());
    }

    #[test]
    fn keys_and_tokens_follow_rmw_zenoh() {
        assert_eq!(
            topic_key(0, "/embodyd/answer", &STRING),
            "0/embodyd/answer/std_msgs::msg::dds_::String_/RIHS01_df668c740482bbd48fb39d76a70dfd4bd59db1288021743503259e948f6b1a18"
        );
        let node = NodeIdentity {
            domain: 3,
            zid: "aa11".into(),
            node_id: 0,
            namespace: "/".into(),
            name: "embodyd".into(),
        };
        assert_eq!(node.node_token(), "@ros2_lv/3/aa11/0/0/NN/%/%/embodyd");
        assert_eq!(
            node.entity_token(2, EntityKind::Publisher, "/embodyd/answer", &STRING),
            format!(
                "@ros2_lv/3/aa11/0/2/MP/%/%/embodyd/%embodyd%answer/std_msgs::msg::dds_::String_/{}/::,10:,:,:,,",
                STRING.hash
            )
        );
        assert_ne!(gid_for("a"), gid_for("b"));
    }
}
