//! Vision: camera frames into rows of the language model's embedding width.
//!
//! [`preprocess`] turns encoded bytes into patches exactly as transformers'
//! image processor does; an encoder ([`qwen2vl`]) turns patches into rows
//! over the same [`Backend`](crate::backend::Backend) the decoder uses;
//! [`prompt`] lays those rows into a prompt: placeholder tokens expanded to
//! one per row, and the multimodal RoPE position of every row.

pub mod preprocess;
pub mod prompt;
pub mod qwen2vl;
pub mod resize;

pub use preprocess::{ImageError, Pixels, Processor};
pub use qwen2vl::{Family, VisionEncoder};

use std::sync::Arc;

use serde::Deserialize;

use std::path::Path;

use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::hf::HfFolder;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A vision-language model's image side: the encoder and the tokens that
/// frame an image in the prompt.
#[derive(Debug)]
pub struct VisionModel {
    /// The encoder (and its image processor).
    pub encoder: VisionEncoder,
    /// The placeholder each of an image's rows takes in the prompt.
    pub image_token: u32,
    /// The text that stands for one image in a user message: the image's
    /// opening token, one placeholder, its closing token.
    pub slot: String,
}

/// The image tokens of a Qwen2-VL `config.json`.
#[derive(Deserialize)]
struct HfImageTokens {
    image_token_id: u32,
    vision_start_token_id: u32,
    vision_end_token_id: u32,
}

impl VisionModel {
    /// The image side of a Hugging Face folder, or `None` when its
    /// architecture takes text only; `tok` is the folder's tokenizer.
    pub fn load_hf(
        folder: &HfFolder,
        tok: &Tokenizer,
        backend: Arc<dyn Backend>,
    ) -> Result<Option<Self>> {
        let family = match folder.architecture()?.as_str() {
            "Qwen2VLForConditionalGeneration" | "qwen2_vl" => Family::Qwen2Vl,
            "Qwen2_5_VLForConditionalGeneration" | "qwen2_5_vl" => Family::Qwen25Vl,
            _ => return Ok(None),
        };
        let encoder = VisionEncoder::load_hf(folder, family, backend)?;
        let ids: HfImageTokens = folder.config()?;
        let text = |id: u32| -> Result<String> {
            let piece = tok.piece(id)?;
            String::from_utf8(piece.into_owned()).map_err(|_| Error::Metadata {
                path: folder.config_path().to_path_buf(),
                key: "image_token_id".into(),
                message: format!("token {id} is not text"),
            })
        };
        let slot = format!(
            "{}{}{}",
            text(ids.vision_start_token_id)?,
            text(ids.image_token_id)?,
            text(ids.vision_end_token_id)?
        );
        Ok(Some(Self {
            encoder,
            image_token: ids.image_token_id,
            slot,
        }))
    }

    /// The image side of a GGUF model: the encoder from llama.cpp's
    /// `mmproj` file, the image tokens from the text model's vocabulary
    /// (`<|image_pad|>` framed by `<|vision_start|>` and `<|vision_end|>`);
    /// `tok` is the text model's tokenizer.
    pub fn load_gguf(
        text: &Gguf,
        tok: &Tokenizer,
        mmproj: &Path,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        let g = Gguf::open(mmproj)?;
        let encoder = VisionEncoder::load_gguf(&g, backend)?;
        let one = |t: &str| -> Result<u32> {
            match tok.encode(t, false, true)?.as_slice() {
                &[id] => Ok(id),
                _ => Err(Error::Metadata {
                    path: text.path().to_path_buf(),
                    key: "tokenizer.ggml.tokens".into(),
                    message: format!(
                        "no {t} token: the text model does not go with a Qwen2-VL projector"
                    ),
                }),
            }
        };
        let image_token = one("<|image_pad|>")?;
        one("<|vision_start|>")?;
        one("<|vision_end|>")?;
        Ok(Self {
            encoder,
            image_token,
            slot: "<|vision_start|><|image_pad|><|vision_end|>".into(),
        })
    }

    /// Merged tokens along time, height and width of a preprocessed image:
    /// the grid its rows fill in the prompt.
    pub fn token_grid(&self, px: &Pixels) -> [usize; 3] {
        let m = self.encoder.processor().merge;
        [px.grid[0], px.grid[1] / m, px.grid[2] / m]
    }

    /// Decodes, preprocesses and encodes one image. Bad bytes and unusable
    /// sizes are [`Error::Image`].
    pub fn encode(&self, bytes: &[u8]) -> Result<EncodedImage> {
        let px = self.encoder.processor().process(bytes)?;
        let rows = self.encoder.encode(&px)?;
        Ok(EncodedImage {
            hash: content_hash(bytes),
            grid: self.token_grid(&px),
            rows: rows.into(),
        })
    }
}

/// An image turned into rows for the prompt.
#[derive(Clone, Debug)]
pub struct EncodedImage {
    /// Hash of the image's bytes: the prefix cache keys its rows by it.
    pub hash: u64,
    /// Merged tokens along time, height and width.
    pub grid: [usize; 3],
    /// `[t * h * w, d_model]` values.
    pub rows: Arc<[f32]>,
}

impl EncodedImage {
    /// Bytes the rows take.
    pub fn bytes(&self) -> usize {
        self.rows.len() * std::mem::size_of::<f32>()
    }
}

/// A 64-bit hash of an image's bytes (FNV-1a folded through a 64-bit
/// finalizer): equal bytes, equal hash, in every process.
pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
