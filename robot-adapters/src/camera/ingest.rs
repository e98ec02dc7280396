//! One camera's feed: its zenoh subscriber and its decoding thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use embody_actors::Cameras;
use zenoh::bytes::ZBytes;
use zenoh::pubsub::Subscriber;

use super::decode::{decode, FrameError};
use crate::config::CameraConfig;
use crate::Error;

/// The newest message not yet decoded: one slot, replaced by each arrival.
#[derive(Default)]
struct Mailbox {
    slot: Mutex<Option<(ZBytes, SystemTime)>>,
    ready: Condvar,
    stop: AtomicBool,
    /// Messages replaced before the thread got to them.
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running camera feed. Dropping it stops the subscriber and the thread.
pub(crate) struct CameraFeed {
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
    _subscriber: Subscriber<()>,
}

impl CameraFeed {
    /// Subscribes to `key` and starts the camera's decoding thread.
    pub async fn start(
        session: &zenoh::Session,
        key: &str,
        cfg: CameraConfig,
        cameras: Arc<Cameras>,
    ) -> Result<Self, Error> {
        cameras.register(&cfg.name);
        let mailbox = Arc::new(Mailbox::default());
        let mb = mailbox.clone();
        let subscriber = session
            .declare_subscriber(key)
            .callback(move |sample| {
                let arrived = SystemTime::now();
                let old = lock(&mb.slot).replace((sample.payload().clone(), arrived));
                if old.is_some() {
                    mb.dropped.fetch_add(1, Ordering::Relaxed);
                }
                mb.ready.notify_one();
            })
            .await
            .map_err(|e| {
                Error::Zenoh(format!("subscribing camera '{}' to {key}: {e}", cfg.name))
            })?;
        let mb = mailbox.clone();
        let thread = std::thread::Builder::new()
            .name(format!("camera-{}", cfg.name))
            .spawn(move || run(&cfg, &mb, &cameras))
            .map_err(|e| Error::Zenoh(format!("starting a camera thread: {e}")))?;
        tracing::info!(key, "camera subscribed");
        Ok(Self {
            mailbox,
            thread: Some(thread),
            _subscriber: subscriber,
        })
    }
}

impl Drop for CameraFeed {
    fn drop(&mut self) {
        self.mailbox.stop.store(true, Ordering::SeqCst);
        self.mailbox.ready.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The decoding thread: newest message in, checked frame out.
fn run(cfg: &CameraConfig, mb: &Mailbox, cameras: &Cameras) {
    let mut last_error = String::new();
    loop {
        let (payload, arrived) = {
            let mut slot = lock(&mb.slot);
            loop {
                if mb.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(msg) = slot.take() {
                    break msg;
                }
                slot = mb.ready.wait(slot).unwrap_or_else(|p| p.into_inner());
            }
        };
        let bytes = payload.to_bytes();
        // A decoder bug must cost one frame, not the camera: the thread lives on.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode(cfg, &bytes, arrived)
        }))
        .unwrap_or_else(|_| {
            Err(FrameError::Layout(
                "the frame made the decoder fail (a bug; the frame is dropped)".into(),
            ))
        });
        match decoded {
            Ok(frame) => {
                if cameras.put(&cfg.name, frame).is_ok() && !last_error.is_empty() {
                    tracing::info!(camera = %cfg.name, "camera frames are accepted again");
                    last_error.clear();
                }
            }
            Err(e) => {
                let why = e.to_string();
                // Each new reason is logged once, not at the camera's frame rate.
                if why != last_error {
                    tracing::warn!(camera = %cfg.name, "camera frame refused: {why}");
                } else {
                    tracing::debug!(camera = %cfg.name, "camera frame refused: {why}");
                }
                cameras.refuse(&cfg.name, why.clone());
                last_error = why;
            }
        }
    }
}
