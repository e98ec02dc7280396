//! Qwen2 and Qwen2.5 (and the language half of Qwen2-VL / Qwen2.5-VL): GGUF
//! files labelled `qwen2`, Hugging Face folders `Qwen2ForCausalLM`.
//!
//! Traits: the Llama block (pre-norm RMSNorm, grouped-query attention, SwiGLU
//! MLP) with biases on the Q, K and V projections, rotary embeddings over halves
//! of each head (GPT-NeoX style, in both GGUF and Hugging Face weights), a large
//! vocabulary (151,936), tied or separate output head, and optional sliding-window
//! attention on the layers from `max_window_layers` on (off in released models).
//! Model card: <https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct>; Hugging Face
//! names as transformers' `modeling_qwen2.py`.

use serde::Deserialize;

use crate::models::trunk::{Act, BlockSpec, RopeSpec, Spec};
use crate::models::{gguf_f32, hf_sliding_layers, Dims, HfCommon, Rope, Source};
use crate::ops::RopeStyle;
use crate::Result;

/// The fields of a Hugging Face Qwen2 `config.json` beyond the common ones
/// ([`HfCommon`]).
#[derive(Deserialize)]
struct HfQwen2Config {
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
}

/// The trunk's description of a Qwen2-shaped model: one RoPE over halves
/// of each head, a window per layer, the blocks `blocks` says.
fn assemble(
    arch: &'static str,
    dims: Dims,
    rms_eps: f32,
    rope: RopeSpec,
    windows: Vec<Option<usize>>,
    blocks: BlockSpec,
) -> Spec {
    Spec {
        arch,
        attn_scale: 1.0 / (dims.head_dim as f32).sqrt(),
        layer_rope: vec![0; dims.n_layers],
        dims,
        rms_eps,
        ropes: vec![rope],
        windows,
        window_key: "sliding_window",
        blocks,
        act: Act::SwiGlu,
        embed_scale: None,
        final_softcap: None,
    }
}

/// The trunk's description of a `qwen2` GGUF file or a `Qwen2ForCausalLM` folder.
pub(crate) fn spec(src: &Source<'_>) -> Result<Spec> {
    spec_for(src, "qwen2", "Qwen2", BLOCKS)
}

/// A Qwen2-shaped model's description: `arch` names its GGUF keys, `family`
/// the model in errors, `blocks` the optional weights of its blocks.
pub(crate) fn spec_for(
    src: &Source<'_>,
    arch: &'static str,
    family: &str,
    blocks: BlockSpec,
) -> Result<Spec> {
    match src.gguf() {
        Some(g) => spec_from_gguf(g, arch, blocks),
        None => spec_from_hf(src, family, arch, blocks),
    }
}

/// Reads the `<arch>.*` keys; Qwen2 and Qwen3 files share them.
fn spec_from_gguf(g: &crate::gguf::Gguf, arch: &'static str, blocks: BlockSpec) -> Result<Spec> {
    let key = |k: &str| format!("{arch}.{k}");
    let d = Dims::from_gguf(g, arch)?;
    let linear_factor = match g.get(&key("rope.scaling.type")) {
        Some(_) if g.get_str(&key("rope.scaling.type"))? == "linear" => {
            gguf_f32(g, &key("rope.scaling.factor"), 1.0)?
        }
        Some(_) if g.get_str(&key("rope.scaling.type"))? != "none" => {
            return Err(crate::Error::Metadata {
                path: g.path().to_path_buf(),
                key: key("rope.scaling.type"),
                message: "only linear RoPE scaling is supported".into(),
            })
        }
        _ => 1.0,
    };
    let rope = Rope {
        base: gguf_f32(g, &key("rope.freq_base"), 10000.0)?,
        linear_factor,
        freq_factors: None,
    }
    .spec(d.head_dim, RopeStyle::Halves);
    let eps = gguf_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-6)?;
    // llama.cpp runs these files with full attention on every layer.
    let windows = vec![None; d.n_layers];
    Ok(assemble(arch, d, eps, rope, windows, blocks))
}

/// Reads `config.json`; `family` names the model in errors.
fn spec_from_hf(
    src: &Source<'_>,
    family: &str,
    arch: &'static str,
    blocks: BlockSpec,
) -> Result<Spec> {
    let folder = src.hf().expect("a Hugging Face source");
    // Read twice so that errors name the field (serde's flatten loses the path).
    let common: HfCommon = src.hf_config()?;
    let c: HfQwen2Config = src.hf_config()?;
    let d = Dims::from_hf(&common, folder.config_path())?;
    let rope = common.rope(src, d.head_dim)?;
    if rope.freq_factors.is_some() {
        return Err(src.meta_err(
            "rope_parameters.rope_type",
            format!("Llama 3 RoPE scaling is not supported for {family}"),
        ));
    }
    // transformers: layers from max_window_layers on slide when use_sliding_window is set.
    let window = if c.use_sliding_window == Some(true) {
        c.sliding_window
    } else {
        None
    };
    let first_sliding = c.max_window_layers.unwrap_or(0);
    let sliding = hf_sliding_layers(
        c.layer_types.as_deref(),
        d.n_layers,
        folder.config_path(),
        |i| window.is_some() && i >= first_sliding,
    )?;
    let size = c.sliding_window.unwrap_or(0);
    let windows = sliding.iter().map(|&s| s.then_some(size)).collect();
    let rope = rope.spec(d.head_dim, RopeStyle::Halves);
    Ok(assemble(
        arch,
        d,
        common.rms_norm_eps,
        rope,
        windows,
        blocks,
    ))
}

/// Qwen2's blocks: biases on Q, K and V.
pub(crate) const BLOCKS: BlockSpec = BlockSpec {
    qkv_bias: true,
    head_norms: false,
    post_norms: false,
    norm_shift: 0.0,
};
