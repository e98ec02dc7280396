//! Model architectures, one file each, behind one forward signature.
//!
//! A forward pass takes a ragged batch of sequences (new tokens, start position,
//! KV block table, which logits to return) and writes logits only for the rows
//! asked for. Generation, perplexity and the scheduler all drive this one call.

pub mod llama;

use std::path::Path;
use std::sync::Arc;

use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::kv_cache::{BlockTable, KvLayout};
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
    /// New tokens to run.
    pub tokens: &'a [u32],
    /// Absolute position of `tokens[0]`; earlier positions are in the cache.
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()`.
    pub table: &'a BlockTable,
    /// Rows of logits to return.
    pub logits: Logits,
}

impl SeqBatch<'_> {
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
    /// The architecture name as the file writes it ("llama").
    pub arch: String,
    /// The model's display name, when the file has one.
    pub name: Option<String>,
    /// Rows of logits (the vocabulary size).
    pub vocab_size: usize,
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            context_length: 0,
            block_size: crate::kv_cache::DEFAULT_BLOCK_SIZE,
        }
    }
}

/// Architectures this build runs.
pub const SUPPORTED: &[&str] = &["llama"];

/// Loads the model in a GGUF file for the given backend.
pub fn load_gguf(
    gguf: &Gguf,
    backend: Arc<dyn Backend>,
    opts: LoadOptions,
) -> Result<Box<dyn Model>> {
    let arch = gguf.get_str("general.architecture")?;
    match arch {
        "llama" => Ok(Box::new(llama::Llama::from_gguf(gguf, backend, opts)?)),
        other => Err(Error::UnsupportedArchitecture {
            path: gguf.path().to_path_buf(),
            arch: other.to_string(),
            supported: SUPPORTED.join(", "),
        }),
    }
}

/// Opens a GGUF model file.
pub fn open_gguf(path: &Path) -> Result<Gguf> {
    Gguf::open(path)
}
