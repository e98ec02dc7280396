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

use std::sync::Arc;

use serde::Deserialize;

use crate::backend::cpu::dequantize_row;
use crate::backend::{AttnParams, Backend, MatIn, MatOut, Workspace};
use crate::kv_cache::{KvCache, KvLayout};
use crate::models::{
    check_batch, gather_logit_rows, gguf_f32, gguf_usize, rope_rows, with_attn_seqs, Dims,
    HfCommon, LoadOptions, Model, ModelInfo, Rope, SeqBatch, Source,
};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::{Error, Result};

/// Hyper-parameters, from the file's `llama.*` keys or `config.json`.
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
    /// How rotary pairs are laid out in the stored Q/K rows.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Trained context.
    pub context_length: usize,
}

/// The fields of a Hugging Face Llama `config.json` beyond the common ones
/// ([`HfCommon`]).
#[derive(Deserialize)]
struct HfLlamaConfig {
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
}

impl LlamaConfig {
    fn from_gguf(g: &crate::gguf::Gguf) -> Result<Self> {
        let key = |k: &str| format!("llama.{k}");
        let d = Dims::from_gguf(g, "llama")?;
        let rope_dim = gguf_usize(g, &key("rope.dimension_count"), Some(d.head_dim))?;
        let scaling = match g.get(&key("rope.scaling.type")) {
            Some(_) => g.get_str(&key("rope.scaling.type"))?,
            None => "none",
        };
        let rope_linear_factor = match scaling {
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
        Ok(Self {
            n_layers: d.n_layers,
            d_model: d.d_model,
            d_ff: d.d_ff,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            rope_dim: rope_dim.min(d.head_dim),
            rope_base: gguf_f32(g, &key("rope.freq_base"), 10000.0)?,
            rope_linear_factor,
            rope_style: RopeStyle::Interleaved,
            rms_eps: gguf_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-5)?,
            vocab_size: d.vocab_size,
            context_length: d.context_length,
        })
    }

    fn from_hf(src: &Source<'_>) -> Result<(Self, Option<Vec<f32>>)> {
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
        let scaling = common
            .rope_parameters
            .as_ref()
            .or(common.rope_scaling.as_ref());
        let rope = Rope::from_hf(common.rope_theta, scaling, d.head_dim, 10000.0, |k| {
            src.meta_err(
                &format!("rope_parameters.{k}"),
                "missing or unsupported RoPE scaling parameter",
            )
        })?;
        let cfg = Self {
            n_layers: d.n_layers,
            d_model: d.d_model,
            d_ff: d.d_ff,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            rope_dim: d.head_dim,
            rope_base: rope.base,
            rope_linear_factor: rope.linear_factor,
            rope_style: RopeStyle::Halves,
            rms_eps: common.rms_norm_eps,
            vocab_size: d.vocab_size,
            context_length: d.context_length,
        };
        Ok((cfg, rope.freq_factors))
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
    tok_embd: QTensor, // [d_model, vocab] (row per token)
    layers: Vec<Layer>,
    output_norm: Vec<f32>,        // [d_model]
    output: QTensor,              // [d_model -> vocab], maybe tok_embd itself
    rope_freqs: Option<Vec<f32>>, // [rope_dim / 2]
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
    rope: Vec<(f32, f32)>, // [T, rope_dim / 2]
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

impl Llama {
    /// Loads a `llama` GGUF file or a `LlamaForCausalLM` folder.
    pub fn load(src: &Source<'_>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Self> {
        let (cfg, hf_rope_freqs) = match src.gguf() {
            Some(g) => (LlamaConfig::from_gguf(g)?, None),
            None => LlamaConfig::from_hf(src)?,
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
        let rope_freqs = match src.gguf() {
            Some(_) if src.has("rope_freqs.weight") => {
                Some(src.vector("rope_freqs.weight", cfg.rope_dim / 2)?)
            }
            _ => hf_rope_freqs,
        };
        let w = Weights {
            tok_embd,
            layers,
            output_norm: src.vector(&src.name("output_norm.weight", "model.norm.weight"), d)?,
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
            gate: vec![0.0; t * cfg.d_ff.max(2 * (qd + kvd))],
            up: vec![0.0; t * cfg.d_ff.max(d)],
            rope: vec![(0.0, 0.0); t * (cfg.rope_dim / 2)],
        };
        let ws = backend.workspace(t, d.max(cfg.d_ff).max(qd), ctx);
        let name = match src.gguf() {
            Some(g) => g
                .get("general.name")
                .and_then(|_| g.get_str("general.name").ok())
                .map(String::from),
            None => None,
        };
        let info = ModelInfo {
            arch: "llama".into(),
            name,
            vocab_size: cfg.vocab_size,
            context_length: ctx,
            kv: KvLayout {
                n_layers: cfg.n_layers,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: hd,
                block_size: opts.block_size,
                window: None,
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
            rope_rows(
                be,
                &mut q[..],
                &mut k[..],
                (qd, kvd),
                hd,
                c.rope_style,
                &s.rope,
                half,
                None,
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
                window: None,
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
