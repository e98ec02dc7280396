//! The camera registry every interface shares: the latest frame of each
//! configured camera, with its timestamp.
//!
//! Latest frame wins: a camera holds one frame, and a new one replaces it, so
//! memory stays at one frame per camera however fast frames arrive and however
//! long the model is busy. Requests name a camera ([`CameraRef`]) and the
//! runtime attaches a copy of its latest frame at admission, refusing a frame
//! older than the request allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use embody_protocol::{CameraRef, Image};

use crate::shared::lock;

/// One frame of a camera: an encoded image (PNG or JPEG) and when it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The encoded image.
    pub image: Image,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// When the frame was taken: the ROS header stamp when the message has
    /// one, else the time it arrived.
    pub stamp: SystemTime,
}

impl Frame {
    /// How old the frame is at `now`; zero when its stamp lies ahead (a
    /// sender's clock slightly ahead of ours).
    pub fn age_at(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stamp).unwrap_or_default()
    }
}

/// A frame attached to a request, and how old it was then.
#[derive(Clone, Debug)]
pub struct Attached {
    /// The frame.
    pub frame: Arc<Frame>,
    /// Its age when it was attached.
    pub age: Duration,
}

/// Why a camera's frame cannot be attached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CameraError {
    /// No camera of this name is configured.
    #[error("unknown camera '{name}': the configured cameras are {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The configured names, for the message.
        known: String,
    },
    /// The camera has not delivered a usable frame yet.
    #[error("camera '{name}' has no frame yet{}", last_error.as_ref().map(|e| format!(" (its last frame was refused: {e})")).unwrap_or_default())]
    NoFrame {
        /// The camera.
        name: String,
        /// Why its last frame was refused, if one was.
        last_error: Option<String>,
    },
    /// The latest frame is older than the request allows.
    #[error("the latest frame of camera '{name}' is {age_ms} ms old, over the request's max_age_ms = {max_age_ms}{}", last_error.as_ref().map(|e| format!(" (its last frame was refused: {e})")).unwrap_or_default())]
    Stale {
        /// The camera.
        name: String,
        /// The frame's age.
        age_ms: u64,
        /// The limit the request set.
        max_age_ms: u64,
        /// Why a newer frame was refused, if one was.
        last_error: Option<String>,
    },
}

#[derive(Default)]
struct Slot {
    frame: Option<Arc<Frame>>,
    /// Why the most recent frame was refused, cleared by the next good one.
    last_error: Option<String>,
    frames: u64,
    refused: u64,
}

/// What one camera has seen, for status reports and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CameraStats {
    /// Frames stored.
    pub frames: u64,
    /// Frames refused (malformed, too large, wrong size).
    pub refused: u64,
    /// The latest frame's age, if there is one.
    pub age: Option<Duration>,
}

/// The latest frame of every configured camera. Shared by reference
/// ([`Arc`]); every method takes `&self`.
#[derive(Default)]
pub struct Cameras {
    slots: Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Cameras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cameras")
            .field("names", &self.names())
            .finish()
    }
}

impl Cameras {
    /// An empty registry: every camera name is unknown until registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a camera known (it has no frame until [`Cameras::put`]).
    pub fn register(&self, name: &str) {
        lock(&self.slots).entry(name.to_string()).or_default();
    }

    /// The configured camera names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.slots).keys().cloned().collect();
        names.sort();
        names
    }

    /// Stores a camera's new frame, replacing the previous one.
    pub fn put(&self, name: &str, frame: Frame) -> Result<(), CameraError> {
        let mut slots = lock(&self.slots);
        let known = known_names(&slots);
        let slot = slots.get_mut(name).ok_or_else(|| CameraError::Unknown {
            name: name.to_string(),
            known,
        })?;
        slot.frame = Some(Arc::new(frame));
        slot.last_error = None;
        slot.frames += 1;
        Ok(())
    }

    /// Records that a camera's frame was refused, and why; the previous
    /// frame stays.
    pub fn refuse(&self, name: &str, why: impl Into<String>) {
        if let Some(slot) = lock(&self.slots).get_mut(name) {
            slot.last_error = Some(why.into());
            slot.refused += 1;
        }
    }

    /// What a camera has seen.
    pub fn stats(&self, name: &str, now: SystemTime) -> Option<CameraStats> {
        lock(&self.slots).get(name).map(|s| CameraStats {
            frames: s.frames,
            refused: s.refused,
            age: s.frame.as_ref().map(|f| f.age_at(now)),
        })
    }

    /// The latest frame of the camera a request names, if it is young
    /// enough at `now`.
    pub fn attach(&self, cam: &CameraRef, now: SystemTime) -> Result<Attached, CameraError> {
        let slots = lock(&self.slots);
        let Some(slot) = slots.get(&cam.name) else {
            return Err(CameraError::Unknown {
                name: cam.name.clone(),
                known: known_names(&slots),
            });
        };
        let Some(frame) = slot.frame.clone() else {
            return Err(CameraError::NoFrame {
                name: cam.name.clone(),
                last_error: slot.last_error.clone(),
            });
        };
        let age = frame.age_at(now);
        if let Some(max) = cam.max_age_ms {
            if age > Duration::from_millis(max) {
                return Err(CameraError::Stale {
                    name: cam.name.clone(),
                    age_ms: age.as_millis() as u64,
                    max_age_ms: max,
                    last_error: slot.last_error.clone(),
                });
            }
        }
        Ok(Attached { frame, age })
    }
}

fn known_names(slots: &HashMap<String, Slot>) -> String {
    if slots.is_empty() {
        return "none (add [[cameras]] entries to the configuration)".into();
    }
    let mut names: Vec<&str> = slots.keys().map(String::as_str).collect();
    names.sort();
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stamp: SystemTime, byte: u8) -> Frame {
        Frame {
            image: Image {
                media_type: "image/png".into(),
                data: vec![byte; 8],
            },
            width: 2,
            height: 1,
            stamp,
        }
    }

    fn cam(name: &str, max_age_ms: Option<u64>) -> CameraRef {
        CameraRef {
            name: name.into(),
            max_age_ms,
        }
    }

    #[test]
    fn the_latest_frame_wins_and_carries_its_age() {
        let c = Cameras::new();
        c.register("front");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        c.put("front", frame(t0, 1)).unwrap();
        c.put("front", frame(t0 + Duration::from_millis(30), 2))
            .unwrap();
        let a = c
            .attach(&cam("front", Some(100)), t0 + Duration::from_millis(80))
            .unwrap();
        assert_eq!(a.frame.image.data[0], 2);
        assert_eq!(a.age, Duration::from_millis(50));
        assert_eq!(
            c.stats("front", t0 + Duration::from_millis(80))
                .unwrap()
                .frames,
            2
        );
    }

    #[test]
    fn unknown_missing_and_stale_frames_are_refused_by_name() {
        let c = Cameras::new();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let e = c.attach(&cam("front", None), t0).unwrap_err();
        assert!(e.to_string().contains("no cameras") || e.to_string().contains("none"));
        c.register("front");
        c.register("wrist");
        let e = c.attach(&cam("rear", None), t0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown camera 'rear': the configured cameras are 'front', 'wrist'"
        );
        assert!(c.put("rear", frame(t0, 0)).is_err());
        c.refuse("front", "corrupt PNG");
        let e = c.attach(&cam("front", None), t0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "camera 'front' has no frame yet (its last frame was refused: corrupt PNG)"
        );
        c.put("front", frame(t0, 0)).unwrap();
        let e = c
            .attach(&cam("front", Some(100)), t0 + Duration::from_millis(250))
            .unwrap_err();
        assert!(matches!(e, CameraError::Stale { age_ms: 250, .. }), "{e}");
        // Without a limit any age is accepted; a stamp ahead of us is age 0.
        assert!(c
            .attach(&cam("front", None), t0 + Duration::from_secs(60))
            .is_ok());
        let a = c
            .attach(&cam("front", Some(0)), t0 - Duration::from_secs(1))
            .unwrap();
        assert_eq!(a.age, Duration::ZERO);
    }
}
