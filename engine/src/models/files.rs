//! The files a model comes in: one GGUF file, or a Hugging Face folder
//! (`config.json`, safetensors, `tokenizer.json`, and for vision-language
//! models `preprocessor_config.json`). The daemon and the CLI open models
//! through this one type.

use std::path::Path;
use std::sync::Arc;

use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::hf::HfFolder;
use crate::models::{self, LoadOptions, Model};
use crate::tokenizer::Tokenizer;
use crate::vision::VisionModel;
use crate::Result;

/// An opened model: a GGUF file or a Hugging Face folder.
pub enum ModelFiles {
    /// A GGUF file.
    Gguf(Gguf),
    /// A Hugging Face folder.
    Hf(HfFolder),
}

impl ModelFiles {
    /// Opens a GGUF file, or a Hugging Face folder when the path is a
    /// directory, its weights copied into memory to run the model.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(if path.is_dir() {
            Self::Hf(HfFolder::open(path)?)
        } else {
            Self::Gguf(Gguf::open(path)?)
        })
    }

    /// [`ModelFiles::open`] with the weights left in the file maps, for
    /// callers that only read metadata or the tokenizer.
    pub fn open_mapped(path: &Path) -> Result<Self> {
        Ok(if path.is_dir() {
            Self::Hf(HfFolder::open_mapped(path)?)
        } else {
            Self::Gguf(Gguf::open_mapped(path)?)
        })
    }

    /// The model's tokenizer (with its chat template, where the files carry one).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Self::Gguf(g) => Tokenizer::from_gguf(g),
            Self::Hf(f) => Tokenizer::from_hf_dir(f.dir()),
        }
    }

    /// A model instance on `backend`.
    pub fn load(&self, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Box<dyn Model>> {
        match self {
            Self::Gguf(g) => models::load_gguf(g, backend, opts),
            Self::Hf(f) => models::load_hf(f, backend, opts),
        }
    }

    /// The vision encoder, for vision-language models: a folder whose config
    /// has a `vision_config`, or a GGUF text model with llama.cpp's `mmproj`
    /// file beside it; `None` for text-only models. `tok` is the model's
    /// tokenizer ([`ModelFiles::tokenizer`]), which holds the image tokens.
    pub fn vision(
        &self,
        tok: &Tokenizer,
        mmproj: Option<&Path>,
        backend: Arc<dyn Backend>,
    ) -> Result<Option<VisionModel>> {
        match (self, mmproj) {
            (Self::Gguf(g), Some(m)) => VisionModel::load_gguf(g, tok, m, backend).map(Some),
            (Self::Gguf(_), None) => Ok(None),
            (Self::Hf(f), None) => VisionModel::load_hf(f, tok, backend),
            (Self::Hf(f), Some(_)) => Err(crate::Error::Metadata {
                path: f.config_path().to_path_buf(),
                key: "mmproj".into(),
                message: "a Hugging Face folder carries its own vision encoder; mmproj is for GGUF models".into(),
            }),
        }
    }

    /// The architecture: GGUF's `general.architecture`, a folder's first
    /// `architectures` entry.
    pub fn arch(&self) -> Result<String> {
        match self {
            Self::Gguf(g) => Ok(g.get_str("general.architecture")?.to_string()),
            Self::Hf(f) => f.architecture(),
        }
    }

    /// The context length the model was trained for, when the files say.
    pub fn trained_context(&self) -> Option<usize> {
        match self {
            Self::Gguf(g) => {
                let arch = g.get_str("general.architecture").ok()?;
                g.get_u32(&format!("{arch}.context_length"))
                    .ok()
                    .map(|v| v as usize)
            }
            Self::Hf(f) => {
                let c = f.config_json();
                let text = c.get("text_config").unwrap_or(c);
                text["max_position_embeddings"].as_u64().map(|v| v as usize)
            }
        }
    }

    /// The model's own name: GGUF's `general.name`; none for a folder.
    pub fn name(&self) -> Option<String> {
        match self {
            Self::Gguf(g) => g.get_str("general.name").ok().map(str::to_string),
            Self::Hf(_) => None,
        }
    }

    /// Bytes of weights.
    pub fn weights_bytes(&self) -> u64 {
        match self {
            Self::Gguf(g) => g.tensors().iter().map(|t| t.size as u64).sum(),
            Self::Hf(f) => f.weights_bytes(),
        }
    }

    /// Bytes of weights copied into memory of their own (the rest is read
    /// through the file map).
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Self::Gguf(g) => g.resident_bytes() as u64,
            Self::Hf(f) => f.resident_bytes(),
        }
    }
}
