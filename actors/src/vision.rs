//! The vision actor: turns images into embedding rows with the model's
//! vision encoder, and keeps the rows of recent images by content hash.
//!
//! Encoding runs on a blocking thread over the decoder's backend, so the
//! async workers stay free and the decoder keeps stepping its sequences
//! between the encoder's operations. The same frame asked about again (a
//! camera polled by a perception task, a conversation that repeats its
//! image) is found in the cache and costs nothing; the prefix cache then
//! finds its rows' KV by the same hash.
//!
//! Text-only models answer every image with a clear "no vision support"
//! error, before the request takes a decoding slot.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use embody_engine::vision::{content_hash, EncodedImage, VisionModel};
use embody_protocol::Image;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

pub(crate) struct VisionArgs {
    /// The loaded model's name, for messages.
    pub model: String,
    /// The loaded model's architecture.
    pub arch: String,
    /// The model's image side, if it has one.
    pub vision: Option<Arc<VisionModel>>,
    /// Bytes of encoded rows the cache keeps.
    pub cache_bytes: usize,
}

/// Why images cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VisionError {
    /// The loaded model takes text only.
    #[error("the loaded model '{model}' ({arch}) has no vision support: send the request without images, or serve a vision-language model")]
    Unsupported { model: String, arch: String },
    /// An image cannot be decoded or has an unusable size.
    #[error("image {index}: {message}")]
    BadImage { index: usize, message: String },
    /// The encoder failed.
    #[error("encoding image {index} failed: {message}")]
    Failed { index: usize, message: String },
}

/// The vision actor.
pub(crate) struct VisionActor;

pub(crate) struct VisionState {
    model: String,
    arch: String,
    vision: Option<Arc<VisionModel>>,
    cache: RowCache,
}

pub(crate) enum VisionMsg {
    /// Encode these images for a request (or find them in the cache).
    Encode {
        images: Vec<Image>,
        reply: RpcReplyPort<Result<Vec<EncodedImage>, VisionError>>,
    },
}

impl Actor for VisionActor {
    type Msg = VisionMsg;
    type State = VisionState;
    type Arguments = VisionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: VisionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(VisionState {
            model: args.model,
            arch: args.arch,
            vision: args.vision,
            cache: RowCache::new(args.cache_bytes),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: VisionMsg,
        state: &mut VisionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VisionMsg::Encode { images, reply } => {
                let Some(vision) = state.vision.clone() else {
                    tracing::debug!(images = images.len(), "images refused: text-only model");
                    let _ = reply.send(Err(VisionError::Unsupported {
                        model: state.model.clone(),
                        arch: state.arch.clone(),
                    }));
                    return Ok(());
                };
                let mut out = Vec::with_capacity(images.len());
                for (index, img) in images.into_iter().enumerate() {
                    let hash = content_hash(&img.data);
                    if let Some(hit) = state.cache.get(hash) {
                        tracing::debug!(index, hash, "image rows from the cache");
                        out.push(hit);
                        continue;
                    }
                    let v = vision.clone();
                    let started = std::time::Instant::now();
                    let encoded = tokio::task::spawn_blocking(move || v.encode(&img.data)).await?;
                    match encoded {
                        Ok(e) => {
                            tracing::debug!(
                                index,
                                hash,
                                tokens = e.rows.len() / vision.encoder.out_width(),
                                ms = started.elapsed().as_millis() as u64,
                                "image encoded"
                            );
                            state.cache.put(e.clone());
                            out.push(e);
                        }
                        Err(embody_engine::Error::Image(e)) => {
                            let _ = reply.send(Err(VisionError::BadImage {
                                index,
                                message: e.to_string(),
                            }));
                            return Ok(());
                        }
                        Err(e) => {
                            let _ = reply.send(Err(VisionError::Failed {
                                index,
                                message: e.to_string(),
                            }));
                            return Ok(());
                        }
                    }
                }
                let _ = reply.send(Ok(out));
            }
        }
        Ok(())
    }
}

/// Encoded images by content hash, least recently used dropped first when
/// their rows pass the byte budget.
struct RowCache {
    budget: usize,
    used: usize,
    map: HashMap<u64, EncodedImage>,
    /// Hashes, least recently used first (a hash may appear more than once;
    /// only its last entry counts).
    order: VecDeque<u64>,
}

impl RowCache {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, hash: u64) -> Option<EncodedImage> {
        let hit = self.map.get(&hash).cloned()?;
        self.touch(hash);
        Some(hit)
    }

    fn touch(&mut self, hash: u64) {
        self.order.push_back(hash);
        // Stale entries are dropped as they reach the front; keep the queue
        // from growing without bound on a cache of a few hot images.
        if self.order.len() > 4 * self.map.len() + 16 {
            let live: Vec<u64> = self.order.drain(..).collect();
            let mut seen = std::collections::HashSet::new();
            for h in live.into_iter().rev() {
                if self.map.contains_key(&h) && seen.insert(h) {
                    self.order.push_front(h);
                }
            }
        }
    }

    fn put(&mut self, e: EncodedImage) {
        let size = e.bytes();
        if size > self.budget {
            return;
        }
        if let Some(old) = self.map.insert(e.hash, e.clone()) {
            self.used -= old.bytes();
        }
        self.used += size;
        self.touch(e.hash);
        while self.used > self.budget {
            let Some(h) = self.order.pop_front() else {
                break;
            };
            // Only the last entry of a hash evicts it.
            if self.order.contains(&h) {
                continue;
            }
            if let Some(old) = self.map.remove(&h) {
                self.used -= old.bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(hash: u64, floats: usize) -> EncodedImage {
        EncodedImage {
            hash,
            grid: [1, 1, 1],
            rows: vec![0.0; floats].into(),
        }
    }

    #[test]
    fn the_cache_keeps_recent_images_within_its_budget() {
        let mut c = RowCache::new(3 * 400);
        for h in 0..3 {
            c.put(img(h, 100));
        }
        // Touch 0, so 1 is now the least recently used.
        assert!(c.get(0).is_some());
        c.put(img(3, 100));
        assert!(c.get(1).is_none(), "least recently used dropped");
        assert!(c.get(0).is_some() && c.get(2).is_some() && c.get(3).is_some());
        assert!(c.used <= c.budget);
        // Larger than the whole budget: not kept, nothing evicted.
        c.put(img(9, 1000));
        assert!(c.get(9).is_none() && c.get(3).is_some());
        for _ in 0..1000 {
            c.get(0);
        }
        assert!(c.order.len() <= 4 * c.map.len() + 16);
    }
}
