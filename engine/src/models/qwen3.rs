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

use crate::backend::cpu::dequantize_row;
use crate::backend::{AttnParams, Backend, MatIn, MatOut, Workspace};
use crate::kv_cache::{KvCache, KvLayout};
use crate::models::{
    check_batch, gather_logit_rows, rope_rows, sliding_window, with_attn_seqs, HeadNorms,
    LoadOptions, Model, ModelInfo, SeqBatch, Source,
};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::Result;

/// Hyper-parameters: Qwen3 files and folders carry Qwen2's (the per-head
/// query/key norms and the missing biases show in the weights, not the config).
pub type Qwen3Config = super::qwen2::Qwen2Config;

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>, // [d_model]
    wq: QTensor,         // [d_model -> n_heads * head_dim]
    wk: QTensor,         // [d_model -> n_kv_heads * head_dim]
    wv: QTensor,         // [d_model -> n_kv_heads * head_dim]
    q_norm: Vec<f32>,    // [head_dim]
    k_norm: Vec<f32>,    // [head_dim]
    wo: QTensor,         // [n_heads * head_dim -> d_model]
    ffn_norm: Vec<f32>,  // [d_model]
    w_gate: QTensor,     // [d_model -> d_ff]
    w_up: QTensor,       // [d_model -> d_ff]
    w_down: QTensor,     // [d_ff -> d_model]
}

/// Read-only weights.
struct Weights {
    tok_embd: QTensor, // [d_model, vocab] (row per token)
    layers: Vec<Layer>,
    output_norm: Vec<f32>, // [d_model]
    output: QTensor,       // [d_model -> vocab], maybe tok_embd itself
}

/// Per-forward scratch, sized at load for `max_batch_tokens` rows. Buffers
/// whose lives do not overlap share one: the queries, keys, values and the
/// attention output live in `gate` until the MLP needs it, the projections
/// back to the residual in `up`, the rows that want logits in `xn` after the
/// last layer.
struct Scratch {
    x: Vec<f32>,           // [T, d_model] residual stream
    xn: Vec<f32>,          // [T, d_model] normed input; then logit rows
    gate: Vec<f32>,        // [T, max(d_ff, 2 * (q + kv width))]: q, k, v and attention, then gate
    up: Vec<f32>,          // [T, max(d_ff, d_model)]: projections, then up
    rope: Vec<(f32, f32)>, // [T, head_dim / 2]
}

/// A loaded Qwen3 model.
pub struct Qwen3 {
    cfg: Qwen3Config,
    info: ModelInfo,
    w: Weights,
    backend: Arc<dyn Backend>,
    s: Scratch,
    ws: Workspace,
}

impl Qwen3 {
    /// Loads a `qwen3` GGUF file or a `Qwen3ForCausalLM` folder.
    pub fn load(src: &Source<'_>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Self> {
        let cfg = match src.gguf() {
            Some(g) => Qwen3Config::from_gguf(g, "qwen3")?,
            None => Qwen3Config::from_hf(src, "Qwen3")?,
        };
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let tok_embd = src.tensor(
            &src.name("token_embd.weight", "model.embed_tokens.weight"),
            &[d, cfg.vocab_size],
        )?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |gguf: &str, hf: &str| src.layer_name(i, gguf, hf);
            layers.push(Layer {
                attn_norm: src.vector(&n("attn_norm.weight", "input_layernorm.weight"), d)?,
                wq: src.tensor(&n("attn_q.weight", "self_attn.q_proj.weight"), &[d, qd])?,
                wk: src.tensor(&n("attn_k.weight", "self_attn.k_proj.weight"), &[d, kvd])?,
                wv: src.tensor(&n("attn_v.weight", "self_attn.v_proj.weight"), &[d, kvd])?,
                q_norm: src.vector(&n("attn_q_norm.weight", "self_attn.q_norm.weight"), hd)?,
                k_norm: src.vector(&n("attn_k_norm.weight", "self_attn.k_norm.weight"), hd)?,
                wo: src.tensor(
                    &n("attn_output.weight", "self_attn.o_proj.weight"),
                    &[qd, d],
                )?,
                ffn_norm: src
                    .vector(&n("ffn_norm.weight", "post_attention_layernorm.weight"), d)?,
                w_gate: src.tensor(
                    &n("ffn_gate.weight", "mlp.gate_proj.weight"),
                    &[d, cfg.d_ff],
                )?,
                w_up: src.tensor(&n("ffn_up.weight", "mlp.up_proj.weight"), &[d, cfg.d_ff])?,
                w_down: src.tensor(
                    &n("ffn_down.weight", "mlp.down_proj.weight"),
                    &[cfg.d_ff, d],
                )?,
            });
        }
        let output = src.output_or_tied(
            "output.weight",
            "lm_head.weight",
            &[d, cfg.vocab_size],
            &tok_embd,
        )?;
        let w = Weights {
            tok_embd,
            layers,
            output_norm: src.vector(&src.name("output_norm.weight", "model.norm.weight"), d)?,
            output,
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
            gate: vec![0.0; t * cfg.d_ff.max(2 * (qd + kvd))],
            up: vec![0.0; t * cfg.d_ff.max(d)],
            rope: vec![(0.0, 0.0); t * (hd / 2)],
        };
        let ws = backend.workspace(t, d.max(cfg.d_ff).max(qd), ctx);
        let sliding: Vec<bool> = cfg.windows.iter().map(Option::is_some).collect();
        let size = cfg.windows.iter().flatten().copied().next().unwrap_or(0);
        let window = sliding_window(&sliding, size, |m| src.meta_err("sliding_window", m))?;
        let name = match src.gguf() {
            Some(g) => g
                .get("general.name")
                .and_then(|_| g.get_str("general.name").ok())
                .map(String::from),
            None => None,
        };
        let info = ModelInfo {
            arch: "qwen3".into(),
            name,
            vocab_size: cfg.vocab_size,
            context_length: ctx,
            kv: KvLayout {
                n_layers: cfg.n_layers,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: hd,
                block_size: opts.block_size,
                window,
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

impl Model for Qwen3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(
        &mut self,
        batch: &[SeqBatch<'_>],
        kv: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<()> {
        let c = &self.cfg;
        let (d, hd) = (c.d_model, c.head_dim);
        let (qd, kvd) = (c.n_heads * hd, c.n_kv_heads * hd);
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let n_out: usize = batch.iter().map(SeqBatch::logit_rows).sum();
        check_batch(batch, n, n_out, &self.info, kv, logits.len())?;
        let (s, w, be, ws) = (&mut self.s, &self.w, &*self.backend, &mut self.ws);

        // Embeddings and rotary angles for every new token.
        let half = hd / 2;
        let mut row = 0;
        for b in batch {
            for (i, &tok) in b.tokens.iter().enumerate() {
                dequantize_row(&w.tok_embd, tok as usize, &mut s.x[row * d..(row + 1) * d]);
                let pos = (b.start_pos + i) as f32 / c.rope_linear_factor;
                ops::rope_angles(
                    pos,
                    c.rope_base,
                    hd,
                    None,
                    &mut s.rope[row * half..(row + 1) * half],
                );
                row += 1;
            }
        }

        for (li, l) in w.layers.iter().enumerate() {
            // Attention: norm, project, norm each Q/K head, rotate halves, store K/V,
            // attend, project back.
            let (q, rest) = s.gate.split_at_mut(n * qd);
            let (k, rest) = rest.split_at_mut(n * kvd);
            let (v, attn) = rest.split_at_mut(n * kvd);
            let qkv = &mut [
                MatOut {
                    w: &l.wq,
                    y: &mut *q,
                },
                MatOut {
                    w: &l.wk,
                    y: &mut *k,
                },
                MatOut {
                    w: &l.wv,
                    y: &mut *v,
                },
            ];
            // The norm is made row by row as the input is quantized.
            let normed = MatIn::RmsNorm {
                x: &s.x[..n * d],
                weight: &l.attn_norm,
                eps: c.rms_eps,
            };
            be.matmul_group_in(normed, n, qkv, ws);
            let norms = HeadNorms {
                q: &l.q_norm,
                k: &l.k_norm,
                eps: c.rms_eps,
            };
            rope_rows(
                be,
                &mut q[..],
                &mut k[..],
                (qd, kvd),
                hd,
                RopeStyle::Halves,
                &s.rope,
                half,
                Some(norms),
            );
            let mut r = 0;
            for b in batch {
                for i in 0..b.tokens.len() {
                    let (kr, vr) = (&k[r * kvd..(r + 1) * kvd], &v[r * kvd..(r + 1) * kvd]);
                    kv.write(li, b.table, b.start_pos + i, kr, vr);
                    r += 1;
                }
            }
            let p = AttnParams {
                layer: li,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window: c.windows[li],
            };
            with_attn_seqs(batch, |seqs| be.attention(&p, q, kv, seqs, attn, ws));
            // Added into the residual stream as the products are made.
            be.matmul_add_in(
                &l.wo,
                MatIn::Rows(&attn[..n * qd]),
                n,
                &mut s.x[..n * d],
                ws,
            );

            // MLP: norm, SwiGLU, project back.
            let gate_up = &mut [
                MatOut {
                    w: &l.w_gate,
                    y: &mut s.gate,
                },
                MatOut {
                    w: &l.w_up,
                    y: &mut s.up,
                },
            ];
            let normed = MatIn::RmsNorm {
                x: &s.x[..n * d],
                weight: &l.ffn_norm,
                eps: c.rms_eps,
            };
            be.matmul_group_in(normed, n, gate_up, ws);
            // silu(gate) * up is made row by row as the input is quantized.
            let act = MatIn::SwiGlu {
                gate: &s.gate[..n * c.d_ff],
                up: &s.up[..n * c.d_ff],
            };
            be.matmul_add_in(&l.w_down, act, n, &mut s.x[..n * d], ws);
        }

        // Final norm and output head, only for the rows asked for.
        gather_logit_rows(batch, &s.x, d, &mut s.xn);
        ops::rms_norm_inplace(&mut s.xn[..n_out * d], &w.output_norm, c.rms_eps);
        be.matmul(&w.output, &s.xn[..n_out * d], n_out, logits, ws);
        Ok(())
    }
}
