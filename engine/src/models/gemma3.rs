//! Gemma 3 (text): GGUF files labelled `gemma3`, Hugging Face folders
//! `Gemma3ForCausalLM` (270M, 1B) and the language model of
//! `Gemma3ForConditionalGeneration` (4B and up).
//!
//! Traits: sliding-window attention on most layers (five local layers, then one
//! global, by default) with two RoPE bases (10,000 local, the file's base global,
//! linear scaling on global layers only), grouped-query attention with an
//! RMSNorm over each query and key head, query scaling by
//! `query_pre_attn_scalar^-1/2`, RMSNorm before *and after* both the attention and
//! the MLP, a GeGLU MLP (tanh GELU), embeddings scaled by `sqrt(hidden_size)`,
//! tied output head over a 262k vocabulary, and final logit soft-capping where
//! the config sets it. Hugging Face norms scale by `1 + w`; llama.cpp's converter
//! stores `1 + w` already, so only folder weights get the offset at load.
//! Technical report: <https://arxiv.org/abs/2503.19786>; Hugging Face names as
//! transformers' `modeling_gemma3.py`.
//!
//! The sliding layers keep their K/V in the cache's window pool, which holds only
//! the window (see [`crate::kv_cache`]); the global layers keep the whole history.

use serde::Deserialize;

use crate::gguf::{Gguf, Value};
use crate::models::trunk::{Act, BlockSpec, Spec};
use crate::models::{gguf_f32, gguf_usize, hf_sliding_layers, Dims, HfRope, Rope, Source};
use crate::ops::RopeStyle;
use crate::{Error, Result};

/// One RoPE variant: base frequency and linear position scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeBase {
    /// Base frequency.
    pub base: f32,
    /// Positions are divided by this.
    pub linear_factor: f32,
}

/// Gemma 3's text config as `config.json` writes it, with transformers'
/// `Gemma3TextConfig` defaults for the fields vision-language checkpoints omit.
#[derive(Deserialize)]
struct HfGemma3Config {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    #[serde(default = "defaults::heads")]
    num_attention_heads: usize,
    #[serde(default = "defaults::kv_heads")]
    num_key_value_heads: usize,
    #[serde(default = "defaults::head_dim")]
    head_dim: usize,
    #[serde(default = "defaults::vocab")]
    vocab_size: usize,
    #[serde(default = "defaults::context")]
    max_position_embeddings: usize,
    #[serde(default = "defaults::eps")]
    rms_norm_eps: f32,
    #[serde(default = "defaults::head_dim")]
    query_pre_attn_scalar: usize,
    #[serde(default = "defaults::window")]
    sliding_window: usize,
    /// transformers 5: `"sliding_attention"` / `"full_attention"` per layer.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    /// transformers 4: every n-th layer is global.
    #[serde(default, alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    /// transformers 4: the global base.
    #[serde(default)]
    rope_theta: Option<f32>,
    /// transformers 4: the local base.
    #[serde(default)]
    rope_local_base_freq: Option<f32>,
    /// transformers 4: scaling of the global layers.
    #[serde(default)]
    rope_scaling: Option<HfRope>,
    /// transformers 5: RoPE per layer type.
    #[serde(default)]
    rope_parameters: Option<HfGemma3Rope>,
    #[serde(default)]
    final_logit_softcapping: Option<f32>,
    #[serde(default)]
    attn_logit_softcapping: Option<f32>,
    #[serde(default)]
    hidden_activation: Option<String>,
}

#[derive(Deserialize)]
struct HfGemma3Rope {
    #[serde(default)]
    full_attention: Option<HfRope>,
    #[serde(default)]
    sliding_attention: Option<HfRope>,
}

mod defaults {
    pub fn heads() -> usize {
        8
    }
    pub fn kv_heads() -> usize {
        4
    }
    pub fn head_dim() -> usize {
        256
    }
    pub fn vocab() -> usize {
        262_208
    }
    pub fn context() -> usize {
        131_072
    }
    pub fn eps() -> f32 {
        1e-6
    }
    pub fn window() -> usize {
        4096
    }
}

/// Global layers come every `pattern` layers: layer `i` slides unless
/// `i % pattern == pattern - 1` (transformers and llama.cpp agree).
fn pattern_slides(pattern: usize, i: usize) -> bool {
    pattern == 0 || i % pattern < pattern - 1
}

/// The parts of Gemma 3's config the trunk's [`Spec`] is made from.
struct Parts {
    dims: Dims,
    attn_scale: f32,
    rope_global: RopeBase,
    rope_local: RopeBase,
    rms_eps: f32,
    windows: Vec<Option<usize>>,
    final_softcap: Option<f32>,
}

impl Parts {
    /// Two RoPE variants (global, local), each layer's chosen by whether it
    /// slides; post-norms and head norms in every block; embeddings scaled by
    /// `sqrt(d_model)`.
    fn spec(self, is_hf: bool) -> Spec {
        let hd = self.dims.head_dim;
        let rope = |r: RopeBase| {
            Rope {
                base: r.base,
                linear_factor: r.linear_factor,
                freq_factors: None,
            }
            .spec(hd, RopeStyle::Halves)
        };
        Spec {
            arch: "gemma3",
            embed_scale: Some((self.dims.d_model as f32).sqrt()),
            dims: self.dims,
            rms_eps: self.rms_eps,
            attn_scale: self.attn_scale,
            ropes: vec![rope(self.rope_global), rope(self.rope_local)],
            layer_rope: self
                .windows
                .iter()
                .map(|w| usize::from(w.is_some()))
                .collect(),
            windows: self.windows,
            window_key: if is_hf {
                "sliding_window"
            } else {
                "gemma3.attention.sliding_window"
            },
            blocks: BlockSpec {
                qkv_bias: false,
                head_norms: true,
                post_norms: true,
                // Folder norms store w for a scale of (1 + w); GGUF files store 1 + w.
                norm_shift: if is_hf { 1.0 } else { 0.0 },
            },
            act: Act::GeGlu,
            final_softcap: self.final_softcap,
        }
    }

    fn from_gguf(g: &Gguf) -> Result<Self> {
        let key = |k: &str| format!("gemma3.{k}");
        let d = Dims::from_gguf(g, "gemma3")?;
        let window = gguf_usize(g, &key("attention.sliding_window"), Some(0))?;
        let sliding: Vec<bool> = match g.get(&key("attention.sliding_window_pattern")) {
            _ if window == 0 => vec![false; d.n_layers],
            Some(Value::Array(a)) => {
                let flags: Option<Vec<bool>> = a
                    .iter()
                    .map(|v| match v {
                        Value::Bool(b) => Some(*b),
                        _ => None,
                    })
                    .collect();
                match flags {
                    Some(f) if f.len() == d.n_layers => f,
                    _ => {
                        return Err(Error::Metadata {
                            path: g.path().to_path_buf(),
                            key: key("attention.sliding_window_pattern"),
                            message: format!("expected {} booleans", d.n_layers),
                        })
                    }
                }
            }
            Some(_) => {
                let p = gguf_usize(g, &key("attention.sliding_window_pattern"), None)?;
                (0..d.n_layers).map(|i| pattern_slides(p, i)).collect()
            }
            None => (0..d.n_layers).map(|i| pattern_slides(6, i)).collect(),
        };
        let rope_linear_factor = match g.get(&key("rope.scaling.type")) {
            Some(_) if g.get_str(&key("rope.scaling.type"))? == "linear" => {
                gguf_f32(g, &key("rope.scaling.factor"), 1.0)?
            }
            Some(_) if g.get_str(&key("rope.scaling.type"))? != "none" => {
                return Err(Error::Metadata {
                    path: g.path().to_path_buf(),
                    key: key("rope.scaling.type"),
                    message: "only linear RoPE scaling is supported".into(),
                })
            }
            _ => 1.0,
        };
        // llama.cpp: Gemma 3 27B (62 layers) scales by hidden_size / heads.
        let attn_scale = if d.n_layers == 62 {
            1.0 / ((d.d_model / d.n_heads) as f32).sqrt()
        } else {
            1.0 / (d.head_dim as f32).sqrt()
        };
        let softcap = gguf_f32(g, &key("final_logit_softcapping"), 0.0)?;
        Ok(Self {
            attn_scale,
            rope_global: RopeBase {
                base: gguf_f32(g, &key("rope.freq_base"), 1_000_000.0)?,
                linear_factor: rope_linear_factor,
            },
            rope_local: RopeBase {
                base: gguf_f32(g, &key("rope.freq_base_swa"), 10_000.0)?,
                linear_factor: 1.0,
            },
            rms_eps: gguf_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-6)?,
            windows: sliding.iter().map(|&s| s.then_some(window)).collect(),
            final_softcap: (softcap > 0.0).then_some(softcap),
            dims: d,
        })
    }

    fn from_hf(src: &Source<'_>) -> Result<Self> {
        let c: HfGemma3Config = src.hf_config()?;
        let path = src.path();
        let common = crate::models::HfCommon {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: Some(c.num_key_value_heads),
            head_dim: Some(c.head_dim),
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
        };
        let d = Dims::from_hf(&common, path)?;
        if c.attn_logit_softcapping.is_some() {
            return Err(src.meta_err(
                "attn_logit_softcapping",
                "attention soft-capping is not supported",
            ));
        }
        if let Some(act) = c
            .hidden_activation
            .as_deref()
            .filter(|a| *a != "gelu_pytorch_tanh")
        {
            return Err(src.meta_err(
                "hidden_activation",
                format!("'{act}' is not supported (gelu_pytorch_tanh)"),
            ));
        }
        let pattern = c.sliding_window_pattern.unwrap_or(6);
        let sliding = hf_sliding_layers(c.layer_types.as_deref(), d.n_layers, path, |i| {
            pattern_slides(pattern, i)
        })?;
        let rope = |theta: Option<f32>,
                    scaling: Option<&HfRope>,
                    default: f32,
                    field: &str|
         -> Result<RopeBase> {
            let r = Rope::from_hf(theta, scaling, d.head_dim, default, |k| {
                src.meta_err(
                    &format!("{field}.{k}"),
                    "missing or unsupported RoPE scaling parameter",
                )
            })?;
            if r.freq_factors.is_some() {
                return Err(
                    src.meta_err(field, "Llama 3 RoPE scaling is not supported for Gemma 3")
                );
            }
            Ok(RopeBase {
                base: r.base,
                linear_factor: r.linear_factor,
            })
        };
        let (rope_global, rope_local) = match &c.rope_parameters {
            Some(p) => (
                rope(
                    None,
                    p.full_attention.as_ref(),
                    1_000_000.0,
                    "rope_parameters.full_attention",
                )?,
                rope(
                    None,
                    p.sliding_attention.as_ref(),
                    10_000.0,
                    "rope_parameters.sliding_attention",
                )?,
            ),
            None => (
                rope(
                    c.rope_theta,
                    c.rope_scaling.as_ref(),
                    1_000_000.0,
                    "rope_scaling",
                )?,
                RopeBase {
                    base: c.rope_local_base_freq.unwrap_or(10_000.0),
                    linear_factor: 1.0,
                },
            ),
        };
        Ok(Self {
            attn_scale: 1.0 / (c.query_pre_attn_scalar as f32).sqrt(),
            rope_global,
            rope_local,
            rms_eps: c.rms_norm_eps,
            windows: sliding
                .iter()
                .map(|&s| s.then_some(c.sliding_window))
                .collect(),
            final_softcap: c.final_logit_softcapping.filter(|&v| v > 0.0),
            dims: d,
        })
    }
}

/// The trunk's description of a `gemma3` GGUF file or a Gemma 3 folder.
pub(crate) fn spec(src: &Source<'_>) -> Result<Spec> {
    let parts = match src.gguf() {
        Some(g) => Parts::from_gguf(g)?,
        None => Parts::from_hf(src)?,
    };
    Ok(parts.spec(src.is_hf()))
}

#[cfg(test)]
mod tests {
    use super::pattern_slides;

    #[test]
    fn every_sixth_layer_is_global() {
        let global: Vec<usize> = (0..18).filter(|&i| !pattern_slides(6, i)).collect();
        assert_eq!(global, [5, 11, 17]);
        assert!(
            (0..4).all(|i| pattern_slides(0, i)),
            "pattern 0: every layer slides"
        );
    }
}
