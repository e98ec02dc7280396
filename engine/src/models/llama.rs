//! The Llama decoder family: Llama 2/3, SmolLM/SmolLM2, Mistral (without
//! sliding window), and anything else GGUF files label `llama`.
//!
//! Traits: pre-norm RMSNorm blocks, rotary position embeddings (the file's base,
//! optional Llama 3 frequency factors `rope_freqs.weight`, linear scaling),
//! grouped-query attention, SwiGLU MLP, tied or separate output head.
//! Paper: <https://arxiv.org/abs/2302.13971>; GGUF names as llama.cpp writes them.

use std::sync::Arc;

use crate::backend::cpu::dequantize_row;
use crate::backend::{AttnParams, AttnSeq, Backend, Workspace};
use crate::gguf::Gguf;
use crate::kv_cache::{KvCache, KvLayout};
use crate::models::{LoadOptions, Model, ModelInfo, SeqBatch};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::{Error, Result};

/// Hyper-parameters, read from the file's `llama.*` keys.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// MLP hidden width.
    pub d_ff: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (GQA).
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Elements of a head that rotate.
    pub rope_dim: usize,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Positions are divided by this (linear RoPE scaling).
    pub rope_linear_factor: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Trained context.
    pub context_length: usize,
}

impl LlamaConfig {
    fn from_gguf(g: &Gguf) -> Result<Self> {
        let p = "llama";
        let key = |k: &str| format!("{p}.{k}");
        let u = |k: &str| g.get_u32(&key(k)).map(|v| v as usize);
        let n_heads = u("attention.head_count")?;
        let d_model = u("embedding_length")?;
        let n_kv_heads = if g.get(&key("attention.head_count_kv")).is_some() {
            u("attention.head_count_kv")?
        } else {
            n_heads
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || d_model % n_heads != 0 {
            return Err(Error::Metadata {
                path: g.path().to_path_buf(),
                key: key("attention.head_count_kv"),
                message: format!("{n_heads} query heads cannot be grouped over {n_kv_heads} KV heads"),
            });
        }
        let head_dim = if g.get(&key("attention.key_length")).is_some() {
            u("attention.key_length")?
        } else {
            d_model / n_heads
        };
        let rope_dim = if g.get(&key("rope.dimension_count")).is_some() {
            u("rope.dimension_count")?
        } else {
            head_dim
        };
        let opt_f32 = |k: &str, d: f32| -> Result<f32> {
            if g.get(&key(k)).is_some() {
                g.get_f32(&key(k))
            } else {
                Ok(d)
            }
        };
        let scaling = match g.get(&key("rope.scaling.type")) {
            Some(_) => g.get_str(&key("rope.scaling.type"))?,
            None => "none",
        };
        let rope_linear_factor = match scaling {
            "linear" => opt_f32("rope.scaling.factor", 1.0)?,
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
        let vocab_size = match g.get(&key("vocab_size")) {
            Some(_) => u("vocab_size")?,
            None => g.tensor_info("token_embd.weight").map_or(0, |t| t.shape[1]),
        };
        let n_layers = u("block_count")?;
        let context_length = u("context_length")?;
        // Scratch buffers are sized from these before any tensor bounds them.
        for (k, v, max) in [("block_count", n_layers, 4096), ("context_length", context_length, 1 << 22)] {
            if v == 0 || v > max {
                return Err(Error::Metadata {
                    path: g.path().to_path_buf(),
                    key: key(k),
                    message: format!("{v} is outside 1..={max}"),
                });
            }
        }
        Ok(Self {
            n_layers,
            d_model,
            d_ff: u("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim: rope_dim.min(head_dim),
            rope_base: opt_f32("rope.freq_base", 10000.0)?,
            rope_linear_factor,
            rms_eps: opt_f32("attention.layer_norm_rms_epsilon", 1e-5)?,
            vocab_size,
            context_length,
        })
    }
}

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>, // [d_model]
    wq: QTensor,         // [d_model -> n_heads * head_dim]
    wk: QTensor,         // [d_model -> n_kv_heads * head_dim]
    wv: QTensor,         // [d_model -> n_kv_heads * head_dim]
    wo: QTensor,         // [n_heads * head_dim -> d_model]
    ffn_norm: Vec<f32>,  // [d_model]
    w_gate: QTensor,     // [d_model -> d_ff]
    w_up: QTensor,       // [d_model -> d_ff]
    w_down: QTensor,     // [d_ff -> d_model]
}

/// Read-only weights.
struct Weights {
    tok_embd: QTensor,            // [d_model, vocab] (row per token)
    layers: Vec<Layer>,
    output_norm: Vec<f32>,        // [d_model]
    output: QTensor,              // [d_model -> vocab], maybe tok_embd itself
    rope_freqs: Option<Vec<f32>>, // [rope_dim / 2]
}

/// Per-forward scratch, sized at load for `max_batch_tokens` rows.
struct Scratch {
    x: Vec<f32>,          // [T, d_model] residual stream
    xn: Vec<f32>,         // [T, d_model] normed input
    q: Vec<f32>,          // [T, n_heads * head_dim]
    k: Vec<f32>,          // [T, n_kv_heads * head_dim]
    v: Vec<f32>,          // [T, n_kv_heads * head_dim]
    attn: Vec<f32>,       // [T, n_heads * head_dim]
    proj: Vec<f32>,       // [T, d_model]
    gate: Vec<f32>,       // [T, d_ff]
    up: Vec<f32>,         // [T, d_ff]
    rope: Vec<(f32, f32)>, // [T, rope_dim / 2]
    out_x: Vec<f32>,      // [T, d_model] rows that want logits
}

/// A loaded Llama-family model.
pub struct Llama {
    cfg: LlamaConfig,
    info: ModelInfo,
    w: Weights,
    backend: Arc<dyn Backend>,
    s: Scratch,
    ws: Workspace,
}

fn tensor(g: &Gguf, name: &str, shape: &[usize]) -> Result<QTensor> {
    let t = g.tensor(name)?;
    if t.shape != shape {
        return Err(Error::Tensor {
            path: g.path().to_path_buf(),
            tensor: name.into(),
            message: format!("shape {:?}, expected {:?}", t.shape, shape),
        });
    }
    Ok(t)
}

fn vector(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = tensor(g, name, &[len])?;
    let mut v = vec![0.0; len];
    dequantize_row(&t, 0, &mut v);
    Ok(v)
}

impl Llama {
    /// Loads a `llama` GGUF file.
    pub fn from_gguf(g: &Gguf, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let tok_embd = tensor(g, "token_embd.weight", &[d, cfg.vocab_size])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm"), d)?,
                wq: tensor(g, &n("attn_q"), &[d, qd])?,
                wk: tensor(g, &n("attn_k"), &[d, kvd])?,
                wv: tensor(g, &n("attn_v"), &[d, kvd])?,
                wo: tensor(g, &n("attn_output"), &[qd, d])?,
                ffn_norm: vector(g, &n("ffn_norm"), d)?,
                w_gate: tensor(g, &n("ffn_gate"), &[d, cfg.d_ff])?,
                w_up: tensor(g, &n("ffn_up"), &[d, cfg.d_ff])?,
                w_down: tensor(g, &n("ffn_down"), &[cfg.d_ff, d])?,
            });
        }
        let output = match g.tensor_info("output.weight") {
            Some(_) => tensor(g, "output.weight", &[d, cfg.vocab_size])?,
            None => tok_embd.clone(),
        };
        let rope_freqs = match g.tensor_info("rope_freqs.weight") {
            Some(_) => Some(vector(g, "rope_freqs.weight", cfg.rope_dim / 2)?),
            None => None,
        };
        let w = Weights {
            tok_embd,
            layers,
            output_norm: vector(g, "output_norm.weight", d)?,
            output,
            rope_freqs,
        };

        let ctx = if opts.context_length == 0 {
            cfg.context_length
        } else {
            opts.context_length
        };
        let t = opts.max_batch_tokens.max(1);
        let s = Scratch {
            x: vec![0.0; t * d],
            xn: vec![0.0; t * d],
            q: vec![0.0; t * qd],
            k: vec![0.0; t * kvd],
            v: vec![0.0; t * kvd],
            attn: vec![0.0; t * qd],
            proj: vec![0.0; t * d],
            gate: vec![0.0; t * cfg.d_ff],
            up: vec![0.0; t * cfg.d_ff],
            rope: vec![(0.0, 0.0); t * (cfg.rope_dim / 2)],
            out_x: vec![0.0; t * d],
        };
        let ws = backend.workspace(t, d.max(cfg.d_ff).max(qd), ctx);
        let info = ModelInfo {
            arch: "llama".into(),
            name: g.get("general.name").and_then(|_| g.get_str("general.name").ok()).map(String::from),
            vocab_size: cfg.vocab_size,
            context_length: ctx,
            kv: KvLayout {
                n_layers: cfg.n_layers,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: hd,
                block_size: opts.block_size,
            },
            max_batch_tokens: t,
        };
        Ok(Self {
            cfg,
            info,
            w,
            backend,
            s,
            ws,
        })
    }
}

impl Model for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &[SeqBatch<'_>], kv: &mut KvCache, logits: &mut [f32]) -> Result<()> {
        let c = &self.cfg;
        let (d, hd) = (c.d_model, c.head_dim);
        let (qd, kvd) = (c.n_heads * hd, c.n_kv_heads * hd);
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let n_out: usize = batch.iter().map(SeqBatch::logit_rows).sum();
        check_batch(batch, n, n_out, &self.info, kv, logits.len())?;
        let (s, w, be, ws) = (&mut self.s, &self.w, &*self.backend, &mut self.ws);

        // Embeddings and rotary angles for every new token.
        let half = c.rope_dim / 2;
        let mut row = 0;
        for b in batch {
            for (i, &tok) in b.tokens.iter().enumerate() {
                dequantize_row(&w.tok_embd, tok as usize, &mut s.x[row * d..(row + 1) * d]);
                let pos = (b.start_pos + i) as f32 / c.rope_linear_factor;
                let cs = &mut s.rope[row * half..(row + 1) * half];
                ops::rope_angles(pos, c.rope_base, c.rope_dim, w.rope_freqs.as_deref(), cs);
                row += 1;
            }
        }

        for (li, l) in w.layers.iter().enumerate() {
            // Attention: norm, project, rotate, store K/V, attend, project back.
            ops::rms_norm(&s.x[..n * d], &l.attn_norm, c.rms_eps, &mut s.xn[..n * d]);
            be.matmul(&l.wq, &s.xn[..n * d], n, &mut s.q, ws);
            be.matmul(&l.wk, &s.xn[..n * d], n, &mut s.k, ws);
            be.matmul(&l.wv, &s.xn[..n * d], n, &mut s.v, ws);
            for r in 0..n {
                let cs = &s.rope[r * half..(r + 1) * half];
                ops::rope_apply(&mut s.q[r * qd..(r + 1) * qd], hd, RopeStyle::Interleaved, cs);
                ops::rope_apply(&mut s.k[r * kvd..(r + 1) * kvd], hd, RopeStyle::Interleaved, cs);
            }
            let mut r = 0;
            for b in batch {
                for i in 0..b.tokens.len() {
                    let (k, v) = (&s.k[r * kvd..(r + 1) * kvd], &s.v[r * kvd..(r + 1) * kvd]);
                    kv.write(li, b.table, b.start_pos + i, k, v);
                    r += 1;
                }
            }
            let p = AttnParams {
                layer: li,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window: None,
            };
            with_attn_seqs(batch, |seqs| {
                be.attention(&p, &s.q[..n * qd], kv, seqs, &mut s.attn, ws)
            });
            be.matmul(&l.wo, &s.attn[..n * qd], n, &mut s.proj, ws);
            ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);

            // MLP: norm, SwiGLU, project back.
            ops::rms_norm(&s.x[..n * d], &l.ffn_norm, c.rms_eps, &mut s.xn[..n * d]);
            be.matmul(&l.w_gate, &s.xn[..n * d], n, &mut s.gate, ws);
            be.matmul(&l.w_up, &s.xn[..n * d], n, &mut s.up, ws);
            ops::swiglu_inplace(&mut s.gate[..n * c.d_ff], &s.up[..n * c.d_ff]);
            be.matmul(&l.w_down, &s.gate[..n * c.d_ff], n, &mut s.proj, ws);
            ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
        }

        // Final norm and output head, only for the rows asked for.
        gather_logit_rows(batch, &s.x, d, &mut s.out_x);
        ops::rms_norm_inplace(&mut s.out_x[..n_out * d], &w.output_norm, c.rms_eps);
        be.matmul(&w.output, &s.out_x[..n_out * d], n_out, logits, ws);
        Ok(())
    }
}

/// Calls `f` with the batch described as attention sequences, without allocating
/// for the common small batches.
pub(crate) fn with_attn_seqs<R>(batch: &[SeqBatch<'_>], f: impl FnOnce(&[AttnSeq<'_>]) -> R) -> R {
    const INLINE: usize = 16;
    fn to_seq<'a>(b: &SeqBatch<'a>) -> AttnSeq<'a> {
        AttnSeq {
            table: b.table,
            start_pos: b.start_pos,
            n_tokens: b.tokens.len(),
        }
    }
    if batch.len() <= INLINE {
        let empty = crate::kv_cache::BlockTable::new();
        let mut arr = [AttnSeq {
            table: &empty,
            start_pos: 0,
            n_tokens: 0,
        }; INLINE];
        for (a, b) in arr.iter_mut().zip(batch) {
            *a = to_seq(b);
        }
        f(&arr[..batch.len()])
    } else {
        let v: Vec<AttnSeq<'_>> = batch.iter().map(to_seq).collect();
        f(&v)
    }
}

/// Copies the residual rows whose logits were asked for into `out`, in batch order.
pub(crate) fn gather_logit_rows(batch: &[SeqBatch<'_>], x: &[f32], d: usize, out: &mut [f32]) {
    let (mut row, mut o) = (0, 0);
    for b in batch {
        let n = b.tokens.len();
        let first = n - b.logit_rows();
        for r in row + first..row + n {
            out[o * d..(o + 1) * d].copy_from_slice(&x[r * d..(r + 1) * d]);
            o += 1;
        }
        row += n;
    }
}

/// Rejects a batch the model cannot run, before any state changes.
pub(crate) fn check_batch(
    batch: &[SeqBatch<'_>],
    n: usize,
    n_out: usize,
    info: &ModelInfo,
    kv: &KvCache,
    logits_len: usize,
) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidRequest("empty batch".into()));
    }
    if n > info.max_batch_tokens {
        return Err(Error::InvalidRequest(format!(
            "batch of {n} tokens exceeds max_batch_tokens {}",
            info.max_batch_tokens
        )));
    }
    if logits_len < n_out * info.vocab_size {
        return Err(Error::InvalidRequest("logits buffer too small".into()));
    }
    if kv.layout() != info.kv {
        return Err(Error::InvalidRequest("KV cache layout does not match the model".into()));
    }
    for b in batch {
        let end = b.start_pos + b.tokens.len();
        if end > info.context_length {
            return Err(Error::InvalidRequest(format!(
                "sequence of {end} positions exceeds the context length {}",
                info.context_length
            )));
        }
        if end > b.table.capacity(info.kv.block_size) {
            return Err(Error::InvalidRequest(format!(
                "block table holds {} positions, batch needs {end}",
                b.table.capacity(info.kv.block_size)
            )));
        }
        if let Some(&t) = b.tokens.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "token id {t} outside the vocabulary ({})",
                info.vocab_size
            )));
        }
    }
    Ok(())
}
