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

use std::sync::Arc;

use crate::backend::Backend;
use crate::kv_cache::KvCache;
use crate::models::qwen2::{spec_from_gguf, spec_from_hf};
use crate::models::trunk::{Act, BlockSpec, Trunk};
use crate::models::{LoadOptions, Model, ModelInfo, SeqBatch, Source};
use crate::Result;

/// Qwen3's blocks: no biases, an RMSNorm over each query and key head. Its
/// files and folders carry Qwen2's config keys.
const BLOCKS: BlockSpec = BlockSpec {
    qkv_bias: false,
    head_norms: true,
    post_norms: false,
    norm_shift: 0.0,
};

/// A loaded Qwen3 model.
pub struct Qwen3 {
    t: Trunk,
}

impl Qwen3 {
    /// Loads a `qwen3` GGUF file or a `Qwen3ForCausalLM` folder.
    pub fn load(src: &Source<'_>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Self> {
        let spec = match src.gguf() {
            Some(g) => spec_from_gguf(g, "qwen3", BLOCKS)?,
            None => spec_from_hf(src, "Qwen3", "qwen3", BLOCKS)?,
        };
        Ok(Self {
            t: Trunk::load(src, spec, backend, opts)?,
        })
    }
}

impl Model for Qwen3 {
    fn info(&self) -> &ModelInfo {
        self.t.info()
    }

    fn token_embeddings(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        self.t.token_embeddings(tokens, out)
    }

    fn forward(
        &mut self,
        batch: &[SeqBatch<'_>],
        kv: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<()> {
        let t = &mut self.t;
        // Embeddings and rotary angles for every new row.
        t.embed(batch, kv, logits)?;
        for li in 0..t.n_layers() {
            // Attention: norm, project, norm each Q/K head, rotate halves,
            // store K/V, attend, project back.
            t.attention(li, batch, kv);
            // MLP: norm, SwiGLU, project back.
            t.mlp(li, Act::SwiGlu);
        }
        // Final norm and output head, only for the rows asked for.
        t.logits(batch, logits)
    }
}
