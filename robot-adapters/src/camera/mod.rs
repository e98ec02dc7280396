//! Camera ingestion: a subscriber per `[[cameras]]` entry hands each message
//! to the camera's decoding thread, which keeps only the newest message it
//! has not decoded yet. So frames never queue up: a burst, or a decoder
//! slower than the camera, drops the older messages, and the camera registry
//! ([`embody_actors::Cameras`]) always holds the latest good frame.

pub mod decode;
mod ingest;

pub(crate) use ingest::CameraFeed;
