//! Qwen3 (dense): GGUF files labelled `qwen3`, Hugging Face folders
//! `Qwen3ForCausalLM`.
//!
//! Traits: the Qwen2 block without projection biases, plus an RMSNorm over each
//! query and key head (before the rotation), a head size set on its own
//! (`head_dim` 128, not `hidden_size / heads`), rotary embeddings over halves of
//! each head (GPT-NeoX style), a large vocabulary (151,936), tied or separate
//! output head, and optional sliding-window attention (off in released models).
//! Technical report: <https://arxiv.org/abs/2505.09388>; Hugging Face names as
//! transformers' `modeling_qwen3.py`.

use crate::models::trunk::{BlockSpec, Spec};
use crate::models::Source;
use crate::Result;

/// Qwen3's blocks: no biases, an RMSNorm over each query and key head. Its
/// files and folders carry Qwen2's config keys.
const BLOCKS: BlockSpec = BlockSpec {
    qkv_bias: false,
    head_norms: true,
    post_norms: false,
    norm_shift: 0.0,
};

/// The trunk's description of a `qwen3` GGUF file or a `Qwen3ForCausalLM` folder.
pub(crate) fn spec(src: &Source<'_>) -> Result<Spec> {
    super::qwen2::spec_for(src, "qwen3", "Qwen3", BLOCKS)
}
