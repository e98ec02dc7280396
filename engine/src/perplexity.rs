//! Perplexity by llama.cpp's method, so figures compare one to one with
//! `llama-perplexity`: the text is tokenized once (with BOS when the vocabulary
//! adds one), cut into non-overlapping chunks of `ctx` tokens whose first token
//! is replaced by BOS, and only the second half of each chunk is scored.

use crate::kv_cache::BlockTable;
use crate::models::{Logits, Model, SeqBatch};
use crate::{Error, Result};

/// The outcome of a perplexity run.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Standard error of `ppl`, as llama.cpp estimates it.
    pub stderr: f64,
    /// Chunks scored.
    pub chunks: usize,
    /// Tokens scored.
    pub tokens: usize,
}

/// Scores `tokens` in chunks of `ctx`; `bos` replaces each chunk's first token.
/// `max_chunks` limits the run (0: every whole chunk). `on_chunk` sees the
/// running perplexity after each chunk.
pub fn perplexity(
    model: &mut dyn Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_chunks: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity> {
    let info = model.info().clone();
    if ctx < 4 || ctx > info.context_length {
        return Err(Error::InvalidRequest(format!(
            "ctx {ctx} must be between 4 and the context length {}",
            info.context_length
        )));
    }
    let mut n_chunks = tokens.len() / ctx;
    if max_chunks > 0 {
        n_chunks = n_chunks.min(max_chunks);
    }
    if n_chunks == 0 {
        return Err(Error::InvalidRequest(format!(
            "text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let vocab = info.vocab_size;
    let step = info.max_batch_tokens;
    let blocks = info.kv.blocks_for_tokens(ctx);
    let mut kv = model.kv_cache(blocks, if info.kv.window.is_some() { blocks } else { 0 })?;
    let mut logits = vec![0f32; step * vocab];
    let mut chunk = vec![0u32; ctx];
    let first = ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);

    for c in 0..n_chunks {
        chunk.copy_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let mut table = BlockTable::new();
        let mut start = 0;
        while start < ctx {
            let end = (start + step).min(ctx);
            // Sliding-window layers keep only what this chunk's queries see.
            table.slide(&mut kv, start);
            table.reserve(&mut kv, end)?;
            let batch = [SeqBatch {
                tokens: &chunk[start..end],
                start_pos: start,
                embeds: &[],
                positions: Default::default(),
                table: &table,
                logits: Logits::All,
            }];
            model.forward(&batch, &mut kv, &mut logits)?;
            // Row i predicts chunk[start + i + 1]; score positions first..ctx-1.
            for (i, row) in logits.chunks_exact(vocab).take(end - start).enumerate() {
                let pos = start + i;
                if pos < first || pos + 1 >= ctx {
                    continue;
                }
                let lp = log_softmax_at(row, chunk[pos + 1] as usize);
                nll -= lp;
                nll2 += lp * lp;
                count += 1;
            }
            start = end;
        }
        table.release(&mut kv);
        on_chunk(c + 1, (nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        stderr,
        chunks: n_chunks,
        tokens: count,
    })
}

/// log softmax(row)[tok], with the sum in f64 as llama.cpp computes it.
fn log_softmax_at(row: &[f32], tok: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max).exp()) as f64).sum();
    (row[tok] - max) as f64 - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_softmax_of_uniform_row() {
        let row = [2.0f32; 8];
        assert!((log_softmax_at(&row, 3) + (8f64).ln()).abs() < 1e-9);
        let row = [0.0, 1000.0];
        assert!(
            log_softmax_at(&row, 1).abs() < 1e-9,
            "stable for large logits"
        );
    }
}
