//! The Llama decoder family: Llama 2/3, SmolLM/SmolLM2, Mistral (without
//! sliding window), and anything else GGUF files label `llama` or Hugging Face
//! folders `LlamaForCausalLM`.
//!
//! Traits: pre-norm RMSNorm blocks, rotary position embeddings (the file's base,
//! optional Llama 3 frequency factors, linear scaling), grouped-query attention,
//! SwiGLU MLP, tied or separate output head.
//! Paper: <https://arxiv.org/abs/2302.13971>; GGUF names as llama.cpp writes them,
//! Hugging Face names as transformers' `modeling_llama.py`.
//!
//! llama.cpp's converter permutes the Q and K rows so that rotary pairs are
//! adjacent (interleaved rope); Hugging Face checkpoints keep the original order
//! and rotate halves of each head. The weights are used as stored and the
//! rotation follows the source.

use serde::Deserialize;

use crate::models::trunk::{Act, BlockSpec, RopeSpec, Spec};
use crate::models::{gguf_f32, gguf_usize, Dims, HfCommon, Source};
use crate::ops::RopeStyle;
use crate::{Error, Result};

/// The fields of a Hugging Face Llama `config.json` beyond the common ones
/// ([`HfCommon`]).
#[derive(Deserialize)]
struct HfLlamaConfig {
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
}

/// The trunk's description of a Llama model: one RoPE, full attention,
/// plain pre-norm blocks.
fn assemble(dims: Dims, rms_eps: f32, rope: RopeSpec) -> Spec {
    let n = dims.n_layers;
    Spec {
        arch: "llama",
        attn_scale: 1.0 / (dims.head_dim as f32).sqrt(),
        dims,
        rms_eps,
        ropes: vec![rope],
        layer_rope: vec![0; n],
        windows: vec![None; n],
        window_key: "sliding_window",
        blocks: BlockSpec::default(),
        act: Act::SwiGlu,
        embed_scale: None,
        final_softcap: None,
    }
}

/// The trunk's description of a `llama` GGUF file or a `LlamaForCausalLM` folder.
pub(crate) fn spec(src: &Source<'_>) -> Result<Spec> {
    match src.gguf() {
        Some(g) => spec_from_gguf(src, g),
        None => spec_from_hf(src),
    }
}

/// From the file's `llama.*` keys.
fn spec_from_gguf(src: &Source<'_>, g: &crate::gguf::Gguf) -> Result<Spec> {
    let key = |k: &str| format!("llama.{k}");
    let d = Dims::from_gguf(g, "llama")?;
    let rope_dim = gguf_usize(g, &key("rope.dimension_count"), Some(d.head_dim))?;
    let scaling = match g.get(&key("rope.scaling.type")) {
        Some(_) => g.get_str(&key("rope.scaling.type"))?,
        None => "none",
    };
    let linear_factor = match scaling {
        "linear" => gguf_f32(g, &key("rope.scaling.factor"), 1.0)?,
        // Llama 3 scaling arrives as the rope_freqs tensor instead.
        "none" | "llama3" => 1.0,
        other => {
            return Err(Error::Metadata {
                path: g.path().to_path_buf(),
                key: key("rope.scaling.type"),
                message: format!("RoPE scaling '{other}' is not supported"),
            })
        }
    };
    let dim = rope_dim.min(d.head_dim);
    let freq_factors = if src.has("rope_freqs.weight") {
        Some(src.vector("rope_freqs.weight", dim / 2)?)
    } else {
        None
    };
    let rope = RopeSpec {
        base: gguf_f32(g, &key("rope.freq_base"), 10000.0)?,
        linear_factor,
        dim,
        // The converter permuted Q and K into adjacent pairs.
        style: RopeStyle::Interleaved,
        freq_factors,
        sections: None,
    };
    let eps = gguf_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-5)?;
    Ok(assemble(d, eps, rope))
}

/// From `config.json`.
fn spec_from_hf(src: &Source<'_>) -> Result<Spec> {
    let folder = src.hf().expect("a Hugging Face source");
    // Read twice so that errors name the field (serde's flatten loses the path).
    let common: HfCommon = src.hf_config()?;
    let c: HfLlamaConfig = src.hf_config()?;
    let d = Dims::from_hf(&common, folder.config_path())?;
    for (field, on) in [
        ("attention_bias", c.attention_bias),
        ("mlp_bias", c.mlp_bias),
    ] {
        if on == Some(true) {
            return Err(src.meta_err(field, "biases are not supported for Llama"));
        }
    }
    let rope = common.rope(src, d.head_dim)?;
    let rope = rope.spec(d.head_dim, RopeStyle::Halves);
    Ok(assemble(d, common.rms_norm_eps, rope))
}
