//! The IPC wire format: length-framed, versioned, bounded binary frames.
//!
//! Every frame is a fixed 16-byte header, then JSON metadata, then raw
//! attachment bytes:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "EMBD"
//!      4     1  version (1)
//!      5     1  kind (see FrameKind)
//!      6     2  reserved, zero
//!      8     4  metadata length, u32 little-endian (at most MAX_META_LEN)
//!     12     4  attachment length, u32 little-endian (at most MAX_ATTACHMENT_LEN)
//!     16     …  metadata: one JSON object, UTF-8
//!      …     …  attachments: raw bytes (the images of a chat request, concatenated)
//! ```
//!
//! Images travel as attachments, never as base64: a chat frame's metadata is
//! `{"request": …, "attachments": [len, …]}`, one length per image, and the
//! lengths must add up to the header's attachment length. Only chat frames
//! carry attachments.
//!
//! The header is checked before anything else is read, so a reader never
//! allocates more than the limits for a hostile peer. Every way a frame can be
//! wrong has its own [`FrameError`]; none panics.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, Event, Fault, ModelSpec, Request, Status};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"EMBD";
/// The wire version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Most bytes of JSON metadata in one frame.
pub const MAX_META_LEN: usize = 1 << 20;
/// Most bytes of attachments (images) in one frame.
pub const MAX_ATTACHMENT_LEN: usize = 32 << 20;
/// Most bytes in one frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_META_LEN + MAX_ATTACHMENT_LEN;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → daemon: a chat request.
    Chat = 1,
    /// Client → daemon: cancel a request.
    Cancel = 2,
    /// Client → daemon: ask for the daemon's status.
    Status = 3,
    /// Client → daemon: inject a fault (tests only).
    Fault = 4,
    /// Client → daemon: drop the unused cached prefixes.
    FlushCache = 5,
    /// Client → daemon: load (or replace) a model.
    LoadModel = 6,
    /// Client → daemon: unload a model.
    UnloadModel = 7,
    /// Daemon → client: one event of a request's stream.
    Event = 16,
    /// Daemon → client: the answer to a status query.
    StatusReply = 17,
    /// Daemon → client: the answer to a fault injection.
    Ack = 18,
    /// Daemon → client: the connection failed (a bad frame); the daemon
    /// closes the connection after it.
    Error = 19,
    /// Daemon → client: the answer to a cache flush.
    FlushReply = 20,
}

impl FrameKind {
    /// The kind with this byte value.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Chat,
            2 => FrameKind::Cancel,
            3 => FrameKind::Status,
            4 => FrameKind::Fault,
            5 => FrameKind::FlushCache,
            6 => FrameKind::LoadModel,
            7 => FrameKind::UnloadModel,
            16 => FrameKind::Event,
            17 => FrameKind::StatusReply,
            18 => FrameKind::Ack,
            19 => FrameKind::Error,
            20 => FrameKind::FlushReply,
            _ => return None,
        })
    }
}

/// One message on the IPC socket.
// A frame is built and moved once per message: boxing the request would only
// add an allocation to every chat frame.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A chat request; its images ride as attachments.
    Chat(Request),
    /// Cancel the request with this id (on the same connection).
    Cancel {
        /// The request's id.
        id: u64,
    },
    /// Ask for the daemon's status; the reply carries the same id.
    Status {
        /// Caller-chosen id of the query.
        id: u64,
    },
    /// Inject a fault; the [`Frame::Ack`] reply carries the same id.
    Fault {
        /// Caller-chosen id of the injection.
        id: u64,
        /// What to break.
        fault: Fault,
    },
    /// Drop every cached prefix no running request uses; the
    /// [`Frame::FlushReply`] carries the same id.
    FlushCache {
        /// Caller-chosen id of the flush.
        id: u64,
    },
    /// Load a model, or replace the one served under its name; the
    /// [`Frame::Ack`] reply carries the same id once it serves (or failed).
    LoadModel {
        /// Caller-chosen id of the load.
        id: u64,
        /// The model.
        spec: ModelSpec,
    },
    /// Unload a model once the requests it holds have finished; the
    /// [`Frame::Ack`] reply carries the same id.
    UnloadModel {
        /// Caller-chosen id of the unload.
        id: u64,
        /// The model's name.
        name: String,
    },
    /// One event of request `id`'s stream.
    Event {
        /// The request's id.
        id: u64,
        /// The event.
        event: Event,
    },
    /// The answer to [`Frame::Status`].
    StatusReply {
        /// The query's id.
        id: u64,
        /// The status.
        status: Box<Status>,
    },
    /// The answer to [`Frame::Fault`]: done, or why not.
    Ack {
        /// The injection's id.
        id: u64,
        /// Why it was refused; none when it was done.
        error: Option<ErrorBody>,
    },
    /// The connection failed; nothing follows.
    Error(ErrorBody),
    /// The answer to [`Frame::FlushCache`].
    FlushReply {
        /// The flush's id.
        id: u64,
        /// KV blocks dropped from the prefix cache.
        blocks: u64,
        /// Why it failed; none when it was done.
        error: Option<ErrorBody>,
    },
}

/// An error code with its message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Chat(_) => FrameKind::Chat,
            Frame::Cancel { .. } => FrameKind::Cancel,
            Frame::Status { .. } => FrameKind::Status,
            Frame::Fault { .. } => FrameKind::Fault,
            Frame::FlushCache { .. } => FrameKind::FlushCache,
            Frame::LoadModel { .. } => FrameKind::LoadModel,
            Frame::UnloadModel { .. } => FrameKind::UnloadModel,
            Frame::FlushReply { .. } => FrameKind::FlushReply,
            Frame::Event { .. } => FrameKind::Event,
            Frame::StatusReply { .. } => FrameKind::StatusReply,
            Frame::Ack { .. } => FrameKind::Ack,
            Frame::Error(_) => FrameKind::Error,
        }
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The bytes end before the frame does.
    #[error("truncated frame: {needed} bytes needed, {got} available")]
    Truncated {
        /// Bytes the frame needs in all.
        needed: usize,
        /// Bytes there are.
        got: usize,
    },
    /// The first four bytes are not [`MAGIC`]: the peer does not speak this protocol.
    #[error("not an embodyd frame: magic {0:02x?} (expected \"EMBD\")")]
    BadMagic([u8; 4]),
    /// The frame's version is not [`VERSION`].
    #[error("wire version {got} is not supported (this side speaks version {supported}); upgrade the older side")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The kind byte names no frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A length in the header is over its limit.
    #[error("{part} of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// "metadata" or "attachments".
        part: &'static str,
        /// The length given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The header is well formed but the body is not (bad JSON, wrong fields,
    /// attachment lengths that do not add up, non-zero reserved bytes).
    #[error("malformed {kind:?} frame: {message}")]
    Malformed {
        /// The frame's kind.
        kind: FrameKind,
        /// What is wrong.
        message: String,
    },
    /// The header's reserved bytes are not zero.
    #[error("reserved header bytes are {0:#06x}, not zero")]
    Reserved(u16),
}

impl FrameError {
    /// The error code the daemon answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The frame's kind.
    pub kind: FrameKind,
    /// Bytes of JSON metadata.
    pub meta_len: usize,
    /// Bytes of attachments.
    pub attachment_len: usize,
}

impl Header {
    /// Bytes of the frame after the header.
    pub fn body_len(&self) -> usize {
        self.meta_len + self.attachment_len
    }
}

/// Checks a frame header: magic, version, kind, reserved bytes and both
/// lengths against their limits. Needs at least [`HEADER_LEN`] bytes.
pub fn decode_header(bytes: &[u8]) -> Result<Header, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            got: bytes.len(),
        });
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if bytes[4] != VERSION {
        return Err(FrameError::UnsupportedVersion {
            got: bytes[4],
            supported: VERSION,
        });
    }
    let kind = FrameKind::from_u8(bytes[5]).ok_or(FrameError::UnknownKind(bytes[5]))?;
    let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    let u32_at = |at: usize| {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
    };
    let (meta_len, attachment_len) = (u32_at(8), u32_at(12));
    if meta_len > MAX_META_LEN {
        return Err(FrameError::Oversized {
            part: "metadata",
            len: meta_len,
            max: MAX_META_LEN,
        });
    }
    if attachment_len > MAX_ATTACHMENT_LEN {
        return Err(FrameError::Oversized {
            part: "attachments",
            len: attachment_len,
            max: MAX_ATTACHMENT_LEN,
        });
    }
    if attachment_len > 0 && kind != FrameKind::Chat {
        return Err(FrameError::Malformed {
            kind,
            message: format!("{attachment_len} bytes of attachments on a frame that takes none"),
        });
    }
    Ok(Header {
        kind,
        meta_len,
        attachment_len,
    })
}

// The JSON bodies of each kind.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    request: Request,
    #[serde(default)]
    attachments: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdBody {
    id: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    id: u64,
    fault: Fault,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    id: u64,
    spec: ModelSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadBody {
    id: u64,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    id: u64,
    event: Event,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    id: u64,
    status: Box<Status>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlushReplyBody {
    id: u64,
    blocks: u64,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    id: u64,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// Decodes a frame's body after [`decode_header`] accepted its header:
/// `meta` and `attachments` hold exactly the lengths the header gives.
pub fn decode_body(header: &Header, meta: &[u8], attachments: &[u8]) -> Result<Frame, FrameError> {
    let kind = header.kind;
    if meta.len() != header.meta_len || attachments.len() != header.attachment_len {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN + header.body_len(),
            got: HEADER_LEN + meta.len() + attachments.len(),
        });
    }
    let bad = |message: String| FrameError::Malformed { kind, message };
    fn json<'a, T: Deserialize<'a>>(
        meta: &'a [u8],
        bad: impl Fn(String) -> FrameError,
    ) -> Result<T, FrameError> {
        serde_json::from_slice(meta).map_err(|e| bad(format!("metadata: {e}")))
    }
    Ok(match kind {
        FrameKind::Chat => {
            let ChatBody {
                mut request,
                attachments: lens,
            } = json(meta, bad)?;
            if let Some(field) = request.sampling.non_finite_field() {
                return Err(bad(format!("sampling.{field} is not a finite number")));
            }
            if lens.len() != request.images.len() {
                return Err(bad(format!(
                    "{} attachment lengths for {} images",
                    lens.len(),
                    request.images.len()
                )));
            }
            let mut at = 0usize;
            for (image, &len) in request.images.iter_mut().zip(&lens) {
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| at.checked_add(len))
                    .filter(|&end| end <= attachments.len())
                    .ok_or_else(|| {
                        bad(format!(
                            "attachment lengths run past the {} attachment bytes",
                            attachments.len()
                        ))
                    })?;
                image.data = attachments[at..end].to_vec();
                at = end;
            }
            if at != attachments.len() {
                return Err(bad(format!(
                    "attachment lengths add up to {at} bytes, the header says {}",
                    attachments.len()
                )));
            }
            Frame::Chat(request)
        }
        FrameKind::Cancel => Frame::Cancel {
            id: json::<IdBody>(meta, bad)?.id,
        },
        FrameKind::Status => Frame::Status {
            id: json::<IdBody>(meta, bad)?.id,
        },
        FrameKind::FlushCache => Frame::FlushCache {
            id: json::<IdBody>(meta, bad)?.id,
        },
        FrameKind::LoadModel => {
            let LoadBody { id, spec } = json(meta, bad)?;
            Frame::LoadModel { id, spec }
        }
        FrameKind::UnloadModel => {
            let UnloadBody { id, name } = json(meta, bad)?;
            Frame::UnloadModel { id, name }
        }
        FrameKind::FlushReply => {
            let FlushReplyBody { id, blocks, error } = json(meta, bad)?;
            Frame::FlushReply { id, blocks, error }
        }
        FrameKind::Fault => {
            let FaultBody { id, fault } = json(meta, bad)?;
            Frame::Fault { id, fault }
        }
        FrameKind::Event => {
            let EventBody { id, event } = json(meta, bad)?;
            Frame::Event { id, event }
        }
        FrameKind::StatusReply => {
            let StatusBody { id, status } = json(meta, bad)?;
            Frame::StatusReply { id, status }
        }
        FrameKind::Ack => {
            let AckBody { id, error } = json(meta, bad)?;
            Frame::Ack { id, error }
        }
        FrameKind::Error => Frame::Error(json(meta, bad)?),
    })
}

/// Decodes the frame at the start of `bytes`; returns it and the bytes it
/// took. [`FrameError::Truncated`] says how many bytes a complete frame needs.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    let header = decode_header(bytes)?;
    let total = HEADER_LEN + header.body_len();
    if bytes.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            got: bytes.len(),
        });
    }
    let meta_end = HEADER_LEN + header.meta_len;
    let frame = decode_body(
        &header,
        &bytes[HEADER_LEN..meta_end],
        &bytes[meta_end..total],
    )?;
    Ok((frame, total))
}

/// Encodes a frame. Fails with [`FrameError::Oversized`] when its metadata or
/// attachments are over the limits.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    #[derive(Serialize)]
    struct ChatOut<'a> {
        request: &'a Request,
        attachments: Vec<u64>,
    }
    #[derive(Serialize)]
    struct EventOut<'a> {
        id: u64,
        event: &'a Event,
    }
    #[derive(Serialize)]
    struct StatusOut<'a> {
        id: u64,
        status: &'a Status,
    }
    #[derive(Serialize)]
    struct AckOut<'a> {
        id: u64,
        error: &'a Option<ErrorBody>,
    }
    let kind = frame.kind();
    let meta = match frame {
        Frame::Chat(request) => serde_json::to_vec(&ChatOut {
            request,
            attachments: request.images.iter().map(|i| i.data.len() as u64).collect(),
        }),
        Frame::Cancel { id } | Frame::Status { id } | Frame::FlushCache { id } => {
            serde_json::to_vec(&IdBody { id: *id })
        }
        Frame::FlushReply { id, blocks, error } => serde_json::to_vec(&FlushReplyBody {
            id: *id,
            blocks: *blocks,
            error: error.clone(),
        }),
        Frame::Fault { id, fault } => serde_json::to_vec(&FaultBody {
            id: *id,
            fault: *fault,
        }),
        Frame::LoadModel { id, spec } => serde_json::to_vec(&LoadBody {
            id: *id,
            spec: spec.clone(),
        }),
        Frame::UnloadModel { id, name } => serde_json::to_vec(&UnloadBody {
            id: *id,
            name: name.clone(),
        }),
        Frame::Event { id, event } => serde_json::to_vec(&EventOut { id: *id, event }),
        Frame::StatusReply { id, status } => serde_json::to_vec(&StatusOut { id: *id, status }),
        Frame::Ack { id, error } => serde_json::to_vec(&AckOut { id: *id, error }),
        Frame::Error(body) => serde_json::to_vec(body),
    }
    .map_err(|e| FrameError::Malformed {
        kind,
        message: format!("metadata: {e}"),
    })?;
    let images: &[crate::Image] = match frame {
        Frame::Chat(request) => &request.images,
        _ => &[],
    };
    let attachment_len: usize = images.iter().map(|i| i.data.len()).sum();
    if meta.len() > MAX_META_LEN {
        return Err(FrameError::Oversized {
            part: "metadata",
            len: meta.len(),
            max: MAX_META_LEN,
        });
    }
    if attachment_len > MAX_ATTACHMENT_LEN {
        return Err(FrameError::Oversized {
            part: "attachments",
            len: attachment_len,
            max: MAX_ATTACHMENT_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + attachment_len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(attachment_len as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    for image in images {
        out.extend_from_slice(&image.data);
    }
    Ok(out)
}

/// Decodes arbitrary bytes the way the daemon does; when they hold a frame,
/// re-encodes it and checks that the result decodes to the same frame.
/// Returns whether a frame was decoded. The fuzz target and its corpus replay
/// run this.
///
/// # Panics
/// If a decoded frame does not survive the round trip (a bug in this module).
pub fn exercise(bytes: &[u8]) -> bool {
    let Ok((frame, used)) = decode(bytes) else {
        return false;
    };
    assert!(used <= bytes.len());
    let again = encode(&frame).expect("a decoded frame re-encodes");
    let (back, n) = decode(&again).expect("a re-encoded frame decodes");
    assert_eq!(n, again.len());
    assert_eq!(back, frame, "round trip changed the frame");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FinishReason, Image, Message, SamplingParams, Usage};

    fn chat_with_images() -> Frame {
        let mut r = Request::new(vec![
            Message::system("be brief"),
            Message::user("what is this?"),
        ]);
        r.id = 7;
        r.max_tokens = Some(16);
        r.sampling = SamplingParams::greedy();
        r.stop = vec!["\n\n".into()];
        r.images = vec![
            Image {
                media_type: "image/png".into(),
                data: vec![0x89, b'P', b'N', b'G', 0, 1, 2, 255],
            },
            Image {
                media_type: "image/jpeg".into(),
                data: vec![0xff, 0xd8, 0xff],
            },
        ];
        Frame::Chat(r)
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            chat_with_images(),
            Frame::Chat(Request::user("hi")),
            Frame::Cancel { id: 3 },
            Frame::Status { id: u64::MAX },
            Frame::Fault {
                id: 1,
                fault: Fault::WedgeDecoder { ms: 2500 },
            },
            Frame::Event {
                id: 7,
                event: Event::Delta {
                    text: "héllo \u{1F916}".into(),
                    token_ids: vec![1, 2, 49151],
                    logprobs: Vec::new(),
                },
            },
            Frame::Event {
                id: 7,
                event: Event::Delta {
                    text: " ok".into(),
                    token_ids: vec![3],
                    logprobs: vec![crate::TokenLogprob {
                        token: " ok".into(),
                        bytes: b" ok".to_vec(),
                        logprob: -0.25,
                        top: vec![crate::TopLogprob {
                            token: " no".into(),
                            bytes: b" no".to_vec(),
                            logprob: -1.5,
                        }],
                    }],
                },
            },
            Frame::Event {
                id: 7,
                event: Event::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage {
                        prompt_tokens: 5,
                        completion_tokens: 9,
                    },
                },
            },
            Frame::StatusReply {
                id: 2,
                status: Box::default(),
            },
            Frame::Ack {
                id: 1,
                error: Some(ErrorBody {
                    code: ErrorCode::Forbidden,
                    message: "off".into(),
                }),
            },
            Frame::Error(ErrorBody {
                code: ErrorCode::BadFrame,
                message: "bad".into(),
            }),
            Frame::FlushCache { id: 4 },
            Frame::LoadModel {
                id: 5,
                spec: crate::ModelSpec {
                    name: "planner".into(),
                    path: "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1".into(),
                    kv_cache_mb: Some(64),
                    ..Default::default()
                },
            },
            Frame::UnloadModel {
                id: 6,
                name: "planner".into(),
            },
            Frame::FlushReply {
                id: 4,
                blocks: 63,
                error: None,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for f in all_frames() {
            let bytes = encode(&f).unwrap();
            let (back, n) = decode(&bytes).unwrap();
            assert_eq!(n, bytes.len());
            assert_eq!(back, f);
            assert!(exercise(&bytes));
        }
    }

    #[test]
    fn images_travel_as_raw_bytes_after_the_json() {
        let bytes = encode(&chat_with_images()).unwrap();
        let h = decode_header(&bytes).unwrap();
        assert_eq!(h.kind, FrameKind::Chat);
        assert_eq!(h.attachment_len, 11);
        // The attachment section is exactly the images' bytes, in order.
        assert_eq!(
            &bytes[bytes.len() - 11..],
            &[0x89, b'P', b'N', b'G', 0, 1, 2, 255, 0xff, 0xd8, 0xff]
        );
        let meta = std::str::from_utf8(&bytes[HEADER_LEN..HEADER_LEN + h.meta_len]).unwrap();
        assert!(meta.ends_with(r#""attachments":[8,3]}"#), "{meta}");
        assert!(!meta.contains("iVBOR"), "no base64 in the metadata");
    }

    #[test]
    fn header_layout_is_pinned() {
        let bytes = encode(&Frame::Cancel { id: 9 }).unwrap();
        assert_eq!(&bytes[..4], b"EMBD");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 2);
        assert_eq!(&bytes[6..8], &[0, 0]);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 8);
        assert_eq!(&bytes[12..16], &[0, 0, 0, 0]);
        assert_eq!(&bytes[16..], br#"{"id":9}"#);
    }

    #[test]
    fn truncated_frames_say_how_much_is_missing() {
        let bytes = encode(&chat_with_images()).unwrap();
        for len in 0..bytes.len() {
            match decode(&bytes[..len]) {
                Err(FrameError::Truncated { needed, got }) => {
                    assert_eq!(got, len);
                    assert_eq!(
                        needed,
                        if len < HEADER_LEN {
                            HEADER_LEN
                        } else {
                            bytes.len()
                        }
                    );
                }
                other => panic!("length {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn header_errors_are_typed() {
        let good = encode(&Frame::Status { id: 1 }).unwrap();
        let with = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            decode(&b).unwrap_err()
        };
        assert_eq!(with(0, b"HTTP"), FrameError::BadMagic(*b"HTTP"));
        assert_eq!(
            with(4, &[2]),
            FrameError::UnsupportedVersion {
                got: 2,
                supported: 1
            }
        );
        assert_eq!(with(4, &[2]).code(), ErrorCode::UnsupportedVersion);
        assert_eq!(with(5, &[99]), FrameError::UnknownKind(99));
        assert_eq!(with(6, &[1, 0]), FrameError::Reserved(1));
        assert_eq!(
            with(8, &(MAX_META_LEN as u32 + 1).to_le_bytes()),
            FrameError::Oversized {
                part: "metadata",
                len: MAX_META_LEN + 1,
                max: MAX_META_LEN
            }
        );
        assert_eq!(
            with(12, &u32::MAX.to_le_bytes()),
            FrameError::Oversized {
                part: "attachments",
                len: u32::MAX as usize,
                max: MAX_ATTACHMENT_LEN
            }
        );
        assert!(matches!(
            with(12, &[1, 0, 0, 0]),
            FrameError::Malformed {
                kind: FrameKind::Status,
                ..
            }
        ));
        assert_eq!(with(0, b"HTTP").code(), ErrorCode::BadFrame);
    }

    fn frame(kind: u8, meta: &[u8], attachments: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"EMBD");
        b.extend_from_slice(&[1, kind, 0, 0]);
        b.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        b.extend_from_slice(&(attachments.len() as u32).to_le_bytes());
        b.extend_from_slice(meta);
        b.extend_from_slice(attachments);
        b
    }

    #[test]
    fn garbage_bodies_are_malformed_not_panics() {
        let cases: &[(u8, &[u8], &[u8], &str)] = &[
            (3, b"\xff\xfe", b"", "metadata"),
            (3, b"{}", b"", "missing field `id`"),
            (3, br#"{"id":-1}"#, b"", "metadata"),
            (2, br#"{"id":1,"x":2}"#, b"", "unknown field `x`"),
            (1, br#"{"request":{"messages":[]},"attachments":[1]}"#, b"x", "1 attachment lengths for 0 images"),
            (
                1,
                br#"{"request":{"messages":[],"images":[{"media_type":"a"}]},"attachments":[5]}"#,
                b"abc",
                "run past",
            ),
            (
                1,
                br#"{"request":{"messages":[],"images":[{"media_type":"a"}]},"attachments":[18446744073709551615]}"#,
                b"abc",
                "run past",
            ),
            (
                1,
                br#"{"request":{"messages":[],"images":[{"media_type":"a"}]},"attachments":[1]}"#,
                b"abc",
                "add up to 1 bytes",
            ),
            (4, br#"{"id":1,"fault":{"action":"format_disk"}}"#, b"", "unknown variant"),
            // Out of f32 range: would read as infinity, which JSON cannot carry back.
            (1, br#"{"request":{"messages":[],"sampling":{"top_p":1e39}}}"#, b"", "sampling.top_p"),
        ];
        for (kind, meta, att, want) in cases {
            let err = decode(&frame(*kind, meta, att)).unwrap_err();
            match &err {
                FrameError::Malformed { message, .. } => {
                    assert!(message.contains(want), "{message} lacks {want}")
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(err.code(), ErrorCode::BadFrame);
        }
    }

    #[test]
    fn oversized_frames_are_refused_by_encode() {
        let mut r = Request::user("x");
        r.images.push(Image {
            media_type: "image/raw".into(),
            data: vec![0; MAX_ATTACHMENT_LEN + 1],
        });
        assert!(matches!(
            encode(&Frame::Chat(r)),
            Err(FrameError::Oversized {
                part: "attachments",
                ..
            })
        ));
        let big = Request::user("y".repeat(MAX_META_LEN));
        assert!(matches!(
            encode(&Frame::Chat(big)),
            Err(FrameError::Oversized {
                part: "metadata",
                ..
            })
        ));
    }

    #[test]
    fn two_frames_in_one_buffer_decode_in_turn() {
        let mut bytes = encode(&Frame::Cancel { id: 1 }).unwrap();
        bytes.extend(encode(&Frame::Status { id: 2 }).unwrap());
        let (a, n) = decode(&bytes).unwrap();
        let (b, m) = decode(&bytes[n..]).unwrap();
        assert_eq!((a, b), (Frame::Cancel { id: 1 }, Frame::Status { id: 2 }));
        assert_eq!(n + m, bytes.len());
    }
}
