//! Model architectures, one file each, behind one forward signature.
//!
//! A forward pass takes a ragged batch of sequences (new tokens, start position,
//! KV block table, which logits to return) and writes logits only for the rows
//! asked for. Generation, perplexity and the scheduler all drive this one call.
//!
//! Every model loads from a GGUF file or a Hugging Face folder through a
//! [`Source`]: the model code is the same, only the tensor names (and a few
//! conventions the converters change, such as GGUF's permuted Llama Q/K or its
//! pre-added Gemma norm offset) differ.

mod files;
mod gemma3;
mod llama;
mod qwen2;
mod qwen2vl;
mod qwen3;
mod trunk;

pub use files::ModelFiles;

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::backend::cpu::dequantize_row;
use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::hf::HfFolder;
use crate::kv_cache::{BlockTable, KvLayout, LayerSet, SlidingWindow};
use crate::quant::GgmlType;
use crate::tensor::QTensor;
use crate::{Error, Result};

/// Which logits a sequence wants back from a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the last).
    None,
    /// The row of the last new token (generation).
    Last,
    /// Every new token's row (perplexity, speculative checks).
    All,
}

/// One sequence's part of a batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqBatch<'a> {
    /// New tokens to run. Rows given in `embeds` keep their placeholder ids
    /// here (an image's pad token), which the prefix cache keys on.
    pub tokens: &'a [u32],
    /// Rows that enter as given embeddings instead of their token's (image
    /// patches after the vision encoder), in order, not overlapping.
    pub embeds: &'a [EmbedRows<'a>],
    /// Absolute position of `tokens[0]` in the cache; earlier positions are
    /// there already.
    pub start_pos: usize,
    /// The position ids each new row is rotated by.
    pub positions: Positions<'a>,
    /// Blocks holding positions `0..start_pos + tokens.len()` (for sliding-window
    /// layers, the window of every new token).
    pub table: &'a BlockTable,
    /// Rows of logits to return.
    pub logits: Logits,
}

/// Embedding rows given for a run of a sequence's new rows.
#[derive(Clone, Copy, Debug)]
pub struct EmbedRows<'a> {
    /// Index of the first row within the sequence's new tokens.
    pub at: usize,
    /// `[k, d_model]` values for rows `at..at + k`.
    pub rows: &'a [f32],
}

/// The position ids of a sequence's new rows.
#[derive(Clone, Copy, Debug, Default)]
pub enum Positions<'a> {
    /// Row `i` is at `start_pos + i` (text).
    #[default]
    Sequential,
    /// One id per new row.
    Ids(&'a [u32]),
    /// Temporal, height and width ids per new row (multimodal RoPE; text rows
    /// carry the same id three times).
    MRope(&'a [[u32; 3]]),
}

impl<'a> SeqBatch<'a> {
    /// `tokens` at positions `start_pos..`, with token embeddings.
    pub fn text(
        tokens: &'a [u32],
        start_pos: usize,
        table: &'a BlockTable,
        logits: Logits,
    ) -> Self {
        Self {
            tokens,
            embeds: &[],
            start_pos,
            positions: Positions::Sequential,
            table,
            logits,
        }
    }

    /// Logit rows this sequence contributes.
    pub fn logit_rows(&self) -> usize {
        match self.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => self.tokens.len(),
        }
    }
}

/// What callers need to know about a loaded model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// The architecture name, as GGUF files write it ("llama", "qwen2", "gemma3").
    pub arch: String,
    /// The model's display name, when the file has one.
    pub name: Option<String>,
    /// Rows of logits (the vocabulary size).
    pub vocab_size: usize,
    /// Width of an embedding row (the residual stream).
    pub d_model: usize,
    /// Whether rows rotate by three position streams (multimodal RoPE):
    /// image rows then take grid positions ([`Positions::MRope`]).
    pub mrope: bool,
    /// Positions the model was trained for.
    pub context_length: usize,
    /// The paged KV cache shape the model needs (block size left to the caller).
    pub kv: KvLayout,
    /// Most tokens one forward call accepts (larger prompts go in chunks).
    pub max_batch_tokens: usize,
}

/// A loaded model ready to run forward passes.
pub trait Model: Send {
    /// Shape and limits.
    fn info(&self) -> &ModelInfo;

    /// Runs the batch, writing `K`/`V` of the new tokens into `kv` and the
    /// requested logit rows, in sequence order, into `logits`
    /// (`[sum of logit_rows, vocab_size]`).
    fn forward(
        &mut self,
        batch: &[SeqBatch<'_>],
        kv: &mut crate::kv_cache::KvCache,
        logits: &mut [f32],
    ) -> Result<()>;

    /// The rows the model's embedding gives `tokens` (`[tokens.len(), d_model]`
    /// into `out`, scaled as its forward scales them): what a batch's
    /// [`EmbedRows`] replace.
    fn token_embeddings(&self, tokens: &[u32], out: &mut [f32]) -> Result<()>;

    /// A KV cache for this model in its backend's memory: `n_blocks`
    /// main-pool blocks and `n_window_blocks` for sliding layers
    /// ([`KvCache::with_window_blocks`](crate::kv_cache::KvCache::with_window_blocks)).
    fn kv_cache(&self, n_blocks: usize, n_window_blocks: usize)
        -> Result<crate::kv_cache::KvCache>;
}

/// Load options.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Most tokens per forward call; scratch buffers are sized for it.
    pub max_batch_tokens: usize,
    /// Longest context to serve (0: the model's own).
    pub context_length: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// How the KV cache stores keys and values.
    pub kv_type: crate::kv_cache::KvType,
    /// Quantize a Hugging Face folder's float weight matrices to this type
    /// as they load (Q8_0 halves BF16 weights' memory); GGUF files keep
    /// their own types.
    pub quantize: Option<GgmlType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            context_length: 0,
            block_size: crate::kv_cache::DEFAULT_BLOCK_SIZE,
            kv_type: crate::kv_cache::KvType::F16,
            quantize: None,
        }
    }
}

/// Architectures this build runs, as GGUF files name them.
pub const SUPPORTED: &[&str] = &["llama", "qwen2", "qwen2vl", "qwen3", "gemma3"];

/// Hugging Face architectures this build runs (`config.json` `architectures`).
pub const SUPPORTED_HF: &[&str] = &[
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
];

/// Loads the model in a GGUF file for the given backend.
pub fn load_gguf(
    gguf: &Gguf,
    backend: Arc<dyn Backend>,
    opts: LoadOptions,
) -> Result<Box<dyn Model>> {
    let arch = gguf.get_str("general.architecture")?;
    let src = Source::Gguf(gguf);
    let spec = match arch {
        "llama" => llama::spec(&src)?,
        "qwen2" => qwen2::spec(&src)?,
        "qwen3" => qwen3::spec(&src)?,
        "qwen2vl" => qwen2vl::spec(&src)?,
        "gemma3" => gemma3::spec(&src)?,
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: gguf.path().to_path_buf(),
                arch: other.to_string(),
                supported: SUPPORTED.join(", "),
            })
        }
    };
    Ok(Box::new(trunk::Trunk::load(&src, spec, backend, opts)?))
}

/// Loads the model in a Hugging Face folder (`config.json`, safetensors weights)
/// for the given backend. The tokenizer loads separately with
/// [`Tokenizer::from_hf_dir`](crate::tokenizer::Tokenizer::from_hf_dir).
pub fn load_hf_dir(
    dir: &Path,
    backend: Arc<dyn Backend>,
    opts: LoadOptions,
) -> Result<Box<dyn Model>> {
    let folder = HfFolder::open(dir)?;
    load_hf(&folder, backend, opts)
}

/// Loads the model of an opened Hugging Face folder.
pub fn load_hf(
    folder: &HfFolder,
    backend: Arc<dyn Backend>,
    opts: LoadOptions,
) -> Result<Box<dyn Model>> {
    let arch = folder.architecture()?;
    let quantize = opts.quantize;
    let mut src = Source::Hf {
        folder,
        prefix: "model.",
        config: "",
        quantize,
    };
    let spec = match arch.as_str() {
        "LlamaForCausalLM" | "llama" => llama::spec(&src)?,
        "Qwen2ForCausalLM" | "qwen2" => qwen2::spec(&src)?,
        "Qwen3ForCausalLM" | "qwen3" => qwen3::spec(&src)?,
        "Gemma3ForCausalLM" | "gemma3_text" => gemma3::spec(&src)?,
        "Gemma3ForConditionalGeneration" | "gemma3" => {
            // The language model of the vision-language checkpoint; transformers
            // 4.52 moved it from `language_model.model.` to `model.language_model.`.
            let prefix = if folder.has("language_model.model.embed_tokens.weight") {
                "language_model.model."
            } else {
                "model.language_model."
            };
            src = Source::Hf {
                folder,
                prefix,
                config: "text_config",
                quantize,
            };
            gemma3::spec(&src)?
        }
        "Qwen2VLForConditionalGeneration"
        | "qwen2_vl"
        | "Qwen2_5_VLForConditionalGeneration"
        | "qwen2_5_vl" => {
            // Qwen's releases keep the language model at `model.` with a flat
            // config; transformers 5 saves it at `model.language_model.` with
            // its fields in `text_config`.
            let prefix = if folder.has("model.language_model.embed_tokens.weight") {
                "model.language_model."
            } else {
                "model."
            };
            let nested = folder
                .config_json()
                .get("text_config")
                .is_some_and(|t| t.get("hidden_size").is_some());
            src = Source::Hf {
                folder,
                prefix,
                config: if nested { "text_config" } else { "" },
                quantize,
            };
            qwen2vl::spec(&src)?
        }
        other => {
            return Err(Error::Metadata {
                path: folder.config_path().to_path_buf(),
                key: "architectures".into(),
                message: format!(
                    "unsupported architecture '{other}' (supported: {})",
                    SUPPORTED_HF.join(", ")
                ),
            })
        }
    };
    Ok(Box::new(trunk::Trunk::load(&src, spec, backend, opts)?))
}

/// A chat template for models whose files carry none, by architecture: Gemma 3
/// GGUF conversions often lack `tokenizer.chat_template`, and Gemma 3's own
/// template (from its `tokenizer_config.json`) is what its users expect.
pub fn default_chat_template(arch: &str) -> Option<&'static str> {
    match arch {
        "gemma3" => Some(include_str!("gemma3_chat_template.jinja")),
        _ => None,
    }
}

/// Opens a GGUF model file.
pub fn open_gguf(path: &Path) -> Result<Gguf> {
    Gguf::open(path)
}

/// Where a model's weights and hyper-parameters come from.
///
/// Tensor shapes are innermost first (GGUF's order) whatever the source; each
/// model names every tensor in both conventions and the source picks its own.
pub enum Source<'a> {
    /// A GGUF file: `blk.N.attn_q.weight`, metadata keys `<arch>.*`.
    Gguf(&'a Gguf),
    /// A Hugging Face folder: `model.layers.N.self_attn.q_proj.weight`, `config.json`.
    Hf {
        /// The opened folder.
        folder: &'a HfFolder,
        /// What stands for `model.` in the folder's tensor names (vision-language
        /// checkpoints nest the language model one level down).
        prefix: &'a str,
        /// Where the language model's fields sit in `config.json` (dotted; empty
        /// for the top level, `text_config` in vision-language checkpoints).
        config: &'a str,
        /// The type float weight matrices are quantized to as they load.
        quantize: Option<GgmlType>,
    },
}

/// A float weight matrix in `ty`, as llama-quantize would write it; vectors
/// (norms, biases), quantized tensors and rows that are not whole blocks stay
/// as they are.
fn quantized(t: QTensor, ty: GgmlType) -> QTensor {
    let float = matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    if !float || t.shape.len() != 2 || !t.name.ends_with("weight") {
        return t;
    }
    let Some(out) = crate::quantize::requantize(&t, ty) else {
        return t;
    };
    let len = out.len();
    QTensor {
        name: t.name,
        ty,
        shape: t.shape,
        data: crate::tensor::Bytes::new(Arc::new(crate::tensor::FileBytes::Owned(out)), 0..len),
    }
}

impl Source<'_> {
    /// The file (GGUF) or `config.json` (Hugging Face) errors should name.
    pub fn path(&self) -> &Path {
        match self {
            Source::Gguf(g) => g.path(),
            Source::Hf { folder, .. } => folder.config_path(),
        }
    }

    /// Whether this is a Hugging Face folder.
    pub fn is_hf(&self) -> bool {
        matches!(self, Source::Hf { .. })
    }

    /// A global tensor's name: `gguf` in a GGUF file, `hf` in a folder (whose
    /// leading `model.` is replaced by the source's prefix).
    pub fn name(&self, gguf: &str, hf: &str) -> String {
        match self {
            Source::Gguf(_) => gguf.to_string(),
            Source::Hf { prefix, .. } => match hf.strip_prefix("model.") {
                Some(rest) => format!("{prefix}{rest}"),
                None => hf.to_string(),
            },
        }
    }

    /// Layer `i`'s tensor: `blk.{i}.{gguf}` or `model.layers.{i}.{hf}`.
    pub fn layer_name(&self, i: usize, gguf: &str, hf: &str) -> String {
        match self {
            Source::Gguf(_) => format!("blk.{i}.{gguf}"),
            Source::Hf { prefix, .. } => format!("{prefix}layers.{i}.{hf}"),
        }
    }

    /// Whether the weights hold a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Gguf(g) => g.tensor_info(name).is_some(),
            Source::Hf { folder, .. } => folder.has(name),
        }
    }

    /// A tensor that must have `shape` (innermost first).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let (t, path) = match self {
            Source::Gguf(g) => (g.tensor(name)?, g.path()),
            Source::Hf { folder, .. } => (folder.tensor(name)?, folder.tensor_path(name)),
        };
        if t.shape != shape {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                tensor: name.into(),
                message: format!(
                    "shape {:?}, expected {:?} (innermost first)",
                    t.shape, shape
                ),
            });
        }
        match self {
            Source::Hf {
                quantize: Some(ty), ..
            } => Ok(quantized(t, *ty)),
            _ => Ok(t),
        }
    }

    /// A vector of `len` values, converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name, &[len])?;
        let mut v = vec![0.0; len];
        dequantize_row(&t, 0, &mut v);
        Ok(v)
    }

    /// The output head: its own tensor when the file has one, else `None`:
    /// the token embeddings are tied to it. A folder whose config says
    /// `tie_word_embeddings: false` must have its own.
    pub fn output_or_tied(&self, gguf: &str, hf: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        #[derive(Deserialize)]
        struct Tie {
            #[serde(default)]
            tie_word_embeddings: Option<bool>,
        }
        let name = self.name(gguf, hf);
        let untied = self.is_hf() && self.hf_config::<Tie>()?.tie_word_embeddings == Some(false);
        if untied || self.has(&name) {
            self.tensor(&name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The GGUF metadata of a GGUF source.
    pub(crate) fn gguf(&self) -> Option<&Gguf> {
        match self {
            Source::Gguf(g) => Some(g),
            Source::Hf { .. } => None,
        }
    }

    /// The folder of a Hugging Face source.
    pub(crate) fn hf(&self) -> Option<&HfFolder> {
        match self {
            Source::Gguf(_) => None,
            Source::Hf { folder, .. } => Some(folder),
        }
    }

    /// The language model's config of a Hugging Face source, deserialized.
    pub(crate) fn hf_config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        match self {
            Source::Hf { folder, config, .. } => folder.config_at(config),
            Source::Gguf(g) => Err(Error::Metadata {
                path: g.path().to_path_buf(),
                key: "config.json".into(),
                message: "a GGUF file has no config.json".into(),
            }),
        }
    }

    /// A metadata error about `key` of this source.
    pub(crate) fn meta_err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path().to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Reads `<arch>.<key>` of a GGUF file as a count, or `default` when absent.
pub(crate) fn gguf_usize(g: &Gguf, key: &str, default: Option<usize>) -> Result<usize> {
    match (g.get(key), default) {
        (None, Some(d)) => Ok(d),
        _ => g.get_u32(key).map(|v| v as usize),
    }
}

/// Reads a GGUF float, or `default` when absent.
pub(crate) fn gguf_f32(g: &Gguf, key: &str, default: f32) -> Result<f32> {
    if g.get(key).is_some() {
        g.get_f32(key)
    } else {
        Ok(default)
    }
}

/// The hyper-parameters every decoder here shares, checked for consistency.
#[derive(Clone, Debug)]
pub(crate) struct Dims {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
}

impl Dims {
    /// Dimensions from a GGUF file's `<arch>.*` keys.
    pub(crate) fn from_gguf(g: &Gguf, arch: &str) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let n_heads = gguf_usize(g, &key("attention.head_count"), None)?;
        let d_model = gguf_usize(g, &key("embedding_length"), None)?;
        let n_kv_heads = gguf_usize(g, &key("attention.head_count_kv"), Some(n_heads))?;
        let head_dim = gguf_usize(
            g,
            &key("attention.key_length"),
            Some(d_model / n_heads.max(1)),
        )?;
        let vocab_size = match g.get(&key("vocab_size")) {
            Some(_) => gguf_usize(g, &key("vocab_size"), None)?,
            None => g.tensor_info("token_embd.weight").map_or(0, |t| t.shape[1]),
        };
        let d = Self {
            n_layers: gguf_usize(g, &key("block_count"), None)?,
            d_model,
            d_ff: gguf_usize(g, &key("feed_forward_length"), None)?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length: gguf_usize(g, &key("context_length"), None)?,
        };
        d.check(|k, m| Error::Metadata {
            path: g.path().to_path_buf(),
            key: key(k),
            message: m,
        })?;
        Ok(d)
    }

    /// Dimensions from the common fields of a Hugging Face config.
    pub(crate) fn from_hf(c: &HfCommon, path: &Path) -> Result<Self> {
        let n_heads = c.num_attention_heads;
        let d = Self {
            n_layers: c.num_hidden_layers,
            d_model: c.hidden_size,
            d_ff: c.intermediate_size,
            n_heads,
            n_kv_heads: c.num_key_value_heads.unwrap_or(n_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / n_heads.max(1)),
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
        };
        // Field names as config.json writes them.
        let hf_key = |k: &str| match k {
            "attention.head_count_kv" => "num_key_value_heads",
            "block_count" => "num_hidden_layers",
            "context_length" => "max_position_embeddings",
            "embedding_length" => "hidden_size",
            "attention.key_length" => "head_dim",
            _ => "vocab_size",
        };
        d.check(|k, m| Error::Metadata {
            path: path.to_path_buf(),
            key: hf_key(k).into(),
            message: m,
        })?;
        Ok(d)
    }

    /// Scratch buffers are sized from these before any tensor bounds them.
    fn check(&self, err: impl Fn(&str, String) -> Error) -> Result<()> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(err(
                "attention.head_count_kv",
                format!(
                    "{} query heads cannot be grouped over {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        for (k, v, max) in [
            ("block_count", self.n_layers, 4096),
            ("context_length", self.context_length, 1 << 22),
            ("embedding_length", self.d_model, 1 << 16),
            ("attention.key_length", self.head_dim, 1 << 12),
            ("vocab_size", self.vocab_size, 1 << 22),
        ] {
            if v == 0 || v > max {
                return Err(err(k, format!("{v} is outside 1..={max}")));
            }
        }
        Ok(())
    }
}

/// The fields of a Hugging Face decoder config that every model here reads,
/// named as `config.json` names them.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct HfCommon {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    /// Older configs (transformers 4): the RoPE base at the top level.
    #[serde(default)]
    pub rope_theta: Option<f32>,
    /// Older configs: RoPE scaling (`null` when none).
    #[serde(default)]
    pub rope_scaling: Option<HfRope>,
    /// Newer configs (transformers 5): base and scaling together.
    #[serde(default)]
    pub rope_parameters: Option<HfRope>,
}

impl HfCommon {
    /// RoPE over `rope_dim` elements from `rope_parameters` (transformers 5)
    /// or `rope_theta` with `rope_scaling`, base 10,000 by default.
    pub(crate) fn rope(&self, src: &Source<'_>, rope_dim: usize) -> Result<Rope> {
        let scaling = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        Rope::from_hf(self.rope_theta, scaling, rope_dim, 10000.0, |k| {
            src.meta_err(
                &format!("rope_parameters.{k}"),
                "missing or unsupported RoPE scaling parameter",
            )
        })
    }
}

/// RoPE parameters as config.json writes them (`rope_scaling` or `rope_parameters`).
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct HfRope {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f32>,
    #[serde(default)]
    pub factor: Option<f32>,
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Multimodal RoPE: rotary pairs per position stream (Qwen2-VL).
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
}

/// RoPE frequencies after the config's scaling.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rope {
    /// Base frequency.
    pub base: f32,
    /// Positions are divided by this (linear scaling).
    pub linear_factor: f32,
    /// Per-pair divisors of the frequency (Llama 3 scaling), `[rope_dim / 2]`.
    pub freq_factors: Option<Vec<f32>>,
}

impl Rope {
    /// The trunk's RoPE over the first `dim` elements of each head, paired as `style` says.
    pub(crate) fn spec(self, dim: usize, style: crate::ops::RopeStyle) -> trunk::RopeSpec {
        trunk::RopeSpec {
            base: self.base,
            linear_factor: self.linear_factor,
            dim,
            style,
            freq_factors: self.freq_factors,
            sections: None,
        }
    }

    /// RoPE from a Hugging Face config: `rope_parameters` (transformers 5) or
    /// `rope_theta` with `rope_scaling`; `field` names the field for errors.
    pub(crate) fn from_hf(
        theta: Option<f32>,
        scaling: Option<&HfRope>,
        rope_dim: usize,
        default_base: f32,
        err: impl Fn(&str) -> Error,
    ) -> Result<Self> {
        let base = theta
            .or(scaling.and_then(|s| s.rope_theta))
            .unwrap_or(default_base);
        let mut rope = Rope {
            base,
            linear_factor: 1.0,
            freq_factors: None,
        };
        let Some(s) = scaling else { return Ok(rope) };
        match s.rope_type.as_deref().unwrap_or("default") {
            // Multimodal RoPE turns at the default frequencies; the model
            // file reads its sections.
            "default" | "mrope" => {}
            "linear" => rope.linear_factor = s.factor.ok_or_else(|| err("factor"))?,
            "llama3" => {
                // As transformers' _compute_llama3_parameters (and llama.cpp's converter).
                let factor = s.factor.ok_or_else(|| err("factor"))?;
                let low = s.low_freq_factor.ok_or_else(|| err("low_freq_factor"))?;
                let high = s.high_freq_factor.ok_or_else(|| err("high_freq_factor"))?;
                let old_ctx = s
                    .original_max_position_embeddings
                    .ok_or_else(|| err("original_max_position_embeddings"))?
                    as f32;
                let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
                let factors = (0..rope_dim / 2)
                    .map(|i| {
                        let freq = 1.0 / base.powf(2.0 * i as f32 / rope_dim as f32);
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            1.0
                        } else if wavelen > low_wavelen {
                            factor
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            1.0 / ((1.0 - smooth) / factor + smooth)
                        }
                    })
                    .collect();
                rope.freq_factors = Some(factors);
            }
            _ => return Err(err("rope_type")),
        }
        Ok(rope)
    }
}

/// Which layers slide, from a Hugging Face config: `layer_types` when the file
/// lists them (`"sliding_attention"` / `"full_attention"`), else `default(i)`.
pub(crate) fn hf_sliding_layers(
    layer_types: Option<&[String]>,
    n_layers: usize,
    path: &Path,
    default: impl Fn(usize) -> bool,
) -> Result<Vec<bool>> {
    let Some(types) = layer_types else {
        return Ok((0..n_layers).map(default).collect());
    };
    if types.len() != n_layers {
        return Err(Error::Metadata {
            path: path.to_path_buf(),
            key: "layer_types".into(),
            message: format!("{} entries for {n_layers} layers", types.len()),
        });
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => Err(Error::Metadata {
                path: path.to_path_buf(),
                key: format!("layer_types[{i}]"),
                message: format!("'{other}' is not supported (sliding_attention, full_attention)"),
            }),
        })
        .collect()
}

/// The cache's sliding-window description for layers that slide over `window`
/// positions (`None` when no layer slides).
pub(crate) fn sliding_window(
    sliding: &[bool],
    window: usize,
    err: impl Fn(String) -> Error,
) -> Result<Option<SlidingWindow>> {
    if !sliding.iter().any(|&s| s) {
        return Ok(None);
    }
    if window == 0 || window > 1 << 22 {
        return Err(err(format!("a sliding window of {window} positions")));
    }
    if sliding.len() > LayerSet::MAX {
        return Err(err(format!(
            "sliding-window models of more than {} layers are not supported",
            LayerSet::MAX
        )));
    }
    let mut layers = LayerSet::default();
    for (i, _) in sliding.iter().enumerate().filter(|(_, &s)| s) {
        layers.insert(i);
    }
    Ok(Some(SlidingWindow {
        size: window,
        layers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_factors_follow_the_wavelength_bands() {
        let s = HfRope {
            rope_type: Some("llama3".into()),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
            ..Default::default()
        };
        let r = Rope::from_hf(Some(500000.0), Some(&s), 128, 10000.0, |k| {
            Error::InvalidRequest(k.into())
        })
        .unwrap();
        let f = r.freq_factors.unwrap();
        assert_eq!(f.len(), 64);
        // High frequencies are untouched, the lowest are divided by the full factor.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "monotonic");
        let e = Rope::from_hf(
            None,
            Some(&HfRope {
                rope_type: Some("yarn".into()),
                ..Default::default()
            }),
            64,
            1.0,
            |k| Error::InvalidRequest(k.into()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rope_type"));
    }
}
