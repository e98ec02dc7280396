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

use std::sync::Arc;

use serde::Deserialize;

use crate::backend::cpu::dequantize_row;
use crate::backend::par_chunks;
use crate::backend::{AttnParams, Backend, MatIn, MatOut, Workspace};
use crate::gguf::{Gguf, Value};
use crate::kv_cache::{KvCache, KvLayout};
use crate::models::{
    check_batch, gather_logit_rows, gguf_f32, gguf_usize, hf_sliding_layers, rope_rows,
    sliding_window, with_attn_seqs, Dims, HeadNorms, HfRope, LoadOptions, Model, ModelInfo, Rope,
    SeqBatch, Source,
};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::{Error, Result};

/// Hyper-parameters, from the file's `gemma3.*` keys or `config.json`.
#[derive(Clone, Debug)]
pub struct Gemma3Config {
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
    /// Elements per head (all of them rotate).
    pub head_dim: usize,
    /// Multiplier of q·k.
    pub attn_scale: f32,
    /// RoPE of the global (full-attention) layers.
    pub rope_global: RopeBase,
    /// RoPE of the sliding-window layers.
    pub rope_local: RopeBase,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Trained context.
    pub context_length: usize,
    /// Per layer: the sliding window, or `None` for a global layer.
    pub windows: Vec<Option<usize>>,
    /// `cap * tanh(logit / cap)` on the output, when set.
    pub final_logit_softcap: Option<f32>,
}

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

impl Gemma3Config {
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
            n_layers: d.n_layers,
            d_model: d.d_model,
            d_ff: d.d_ff,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
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
            vocab_size: d.vocab_size,
            context_length: d.context_length,
            windows: sliding.iter().map(|&s| s.then_some(window)).collect(),
            final_logit_softcap: (softcap > 0.0).then_some(softcap),
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
            n_layers: d.n_layers,
            d_model: d.d_model,
            d_ff: d.d_ff,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            attn_scale: 1.0 / (c.query_pre_attn_scalar as f32).sqrt(),
            rope_global,
            rope_local,
            rms_eps: c.rms_norm_eps,
            vocab_size: d.vocab_size,
            context_length: d.context_length,
            windows: sliding
                .iter()
                .map(|&s| s.then_some(c.sliding_window))
                .collect(),
            final_logit_softcap: c.final_logit_softcapping.filter(|&v| v > 0.0),
        })
    }
}

/// One transformer block's weights. Norm vectors hold the full scale (`1 + w`
/// of the Hugging Face weights).
struct Layer {
    attn_norm: Vec<f32>,      // [d_model]
    wq: QTensor,              // [d_model -> n_heads * head_dim]
    wk: QTensor,              // [d_model -> n_kv_heads * head_dim]
    wv: QTensor,              // [d_model -> n_kv_heads * head_dim]
    q_norm: Vec<f32>,         // [head_dim]
    k_norm: Vec<f32>,         // [head_dim]
    wo: QTensor,              // [n_heads * head_dim -> d_model]
    post_attn_norm: Vec<f32>, // [d_model]
    ffn_norm: Vec<f32>,       // [d_model]
    w_gate: QTensor,          // [d_model -> d_ff]
    w_up: QTensor,            // [d_model -> d_ff]
    w_down: QTensor,          // [d_ff -> d_model]
    post_ffn_norm: Vec<f32>,  // [d_model]
}

/// Read-only weights.
struct Weights {
    tok_embd: QTensor, // [d_model, vocab] (row per token)
    layers: Vec<Layer>,
    output_norm: Vec<f32>, // [d_model]
    output: QTensor,       // [d_model -> vocab], tok_embd unless the file has its own
}

/// Per-forward scratch, sized at load for `max_batch_tokens` rows. Buffers
/// whose lives do not overlap share one: the queries and the attention
/// output live in `gate` until the MLP needs it, the projections back to the
/// residual in `up`, the rows that want logits in `xn` after the last layer.
struct Scratch {
    x: Vec<f32>,                  // [T, d_model] residual stream
    xn: Vec<f32>,                 // [T, d_model] normed input; then logit rows
    k: Vec<f32>,                  // [T, n_kv_heads * head_dim]
    v: Vec<f32>,                  // [T, n_kv_heads * head_dim]
    gate: Vec<f32>, // [T, max(d_ff, 2 * n_heads * head_dim)]: q and attention, then gate
    up: Vec<f32>,   // [T, max(d_ff, d_model)]: projections, then up
    rope_global: Vec<(f32, f32)>, // [T, head_dim / 2]
    rope_local: Vec<(f32, f32)>, // [T, head_dim / 2]
}

/// A loaded Gemma 3 model.
pub struct Gemma3 {
    cfg: Gemma3Config,
    info: ModelInfo,
    w: Weights,
    backend: Arc<dyn Backend>,
    s: Scratch,
    ws: Workspace,
}

impl Gemma3 {
    /// Loads a `gemma3` GGUF file or a Gemma 3 folder.
    pub fn load(src: &Source<'_>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Self> {
        let cfg = match src.gguf() {
            Some(g) => Gemma3Config::from_gguf(g)?,
            None => Gemma3Config::from_hf(src)?,
        };
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        // Folder norms store w for a scale of (1 + w); GGUF files store 1 + w.
        let shift = if src.is_hf() { 1.0 } else { 0.0 };
        let norm = |name: &str, len: usize| -> Result<Vec<f32>> {
            let mut v = src.vector(name, len)?;
            v.iter_mut().for_each(|x| *x += shift);
            Ok(v)
        };
        let tok_embd = src.tensor(
            &src.name("token_embd.weight", "model.embed_tokens.weight"),
            &[d, cfg.vocab_size],
        )?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |gguf: &str, hf: &str| src.layer_name(i, gguf, hf);
            layers.push(Layer {
                attn_norm: norm(&n("attn_norm.weight", "input_layernorm.weight"), d)?,
                wq: src.tensor(&n("attn_q.weight", "self_attn.q_proj.weight"), &[d, qd])?,
                wk: src.tensor(&n("attn_k.weight", "self_attn.k_proj.weight"), &[d, kvd])?,
                wv: src.tensor(&n("attn_v.weight", "self_attn.v_proj.weight"), &[d, kvd])?,
                q_norm: norm(&n("attn_q_norm.weight", "self_attn.q_norm.weight"), hd)?,
                k_norm: norm(&n("attn_k_norm.weight", "self_attn.k_norm.weight"), hd)?,
                wo: src.tensor(
                    &n("attn_output.weight", "self_attn.o_proj.weight"),
                    &[qd, d],
                )?,
                post_attn_norm: norm(
                    &n(
                        "post_attention_norm.weight",
                        "post_attention_layernorm.weight",
                    ),
                    d,
                )?,
                ffn_norm: norm(&n("ffn_norm.weight", "pre_feedforward_layernorm.weight"), d)?,
                w_gate: src.tensor(
                    &n("ffn_gate.weight", "mlp.gate_proj.weight"),
                    &[d, cfg.d_ff],
                )?,
                w_up: src.tensor(&n("ffn_up.weight", "mlp.up_proj.weight"), &[d, cfg.d_ff])?,
                w_down: src.tensor(
                    &n("ffn_down.weight", "mlp.down_proj.weight"),
                    &[cfg.d_ff, d],
                )?,
                post_ffn_norm: norm(
                    &n("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
                    d,
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
            output_norm: norm(&src.name("output_norm.weight", "model.norm.weight"), d)?,
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
            k: vec![0.0; t * kvd],
            v: vec![0.0; t * kvd],
            gate: vec![0.0; t * cfg.d_ff.max(2 * qd)],
            up: vec![0.0; t * cfg.d_ff.max(d)],
            rope_global: vec![(0.0, 0.0); t * (hd / 2)],
            rope_local: vec![(0.0, 0.0); t * (hd / 2)],
        };
        let ws = backend.workspace(t, d.max(cfg.d_ff).max(qd), ctx);
        let sliding: Vec<bool> = cfg.windows.iter().map(Option::is_some).collect();
        let size = cfg.windows.iter().flatten().copied().next().unwrap_or(0);
        let key = if src.is_hf() {
            "sliding_window"
        } else {
            "gemma3.attention.sliding_window"
        };
        let window = sliding_window(&sliding, size, |m| src.meta_err(key, m))?;
        let name = match src.gguf() {
            Some(g) => g
                .get("general.name")
                .and_then(|_| g.get_str("general.name").ok())
                .map(String::from),
            None => None,
        };
        let info = ModelInfo {
            arch: "gemma3".into(),
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

impl Model for Gemma3 {
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

        // Embeddings scaled by sqrt(d_model), and both sets of rotary angles.
        let half = hd / 2;
        let embed_scale = (d as f32).sqrt();
        let mut row = 0;
        for b in batch {
            for (i, &tok) in b.tokens.iter().enumerate() {
                let x = &mut s.x[row * d..(row + 1) * d];
                dequantize_row(&w.tok_embd, tok as usize, x);
                ops::scale_inplace(x, embed_scale);
                let pos = (b.start_pos + i) as f32;
                let (g, l) = (c.rope_global, c.rope_local);
                let rows = row * half..(row + 1) * half;
                ops::rope_angles(
                    pos / g.linear_factor,
                    g.base,
                    hd,
                    None,
                    &mut s.rope_global[rows.clone()],
                );
                ops::rope_angles(
                    pos / l.linear_factor,
                    l.base,
                    hd,
                    None,
                    &mut s.rope_local[rows],
                );
                row += 1;
            }
        }

        for (li, l) in w.layers.iter().enumerate() {
            // Attention: norm, project, norm each Q/K head, rotate (local or global
            // base), store K/V, attend (through the window on sliding layers),
            // project back, post-norm, add.
            let (q, attn) = s.gate.split_at_mut(n * qd);
            let qkv = &mut [
                MatOut {
                    w: &l.wq,
                    y: &mut *q,
                },
                MatOut {
                    w: &l.wk,
                    y: &mut s.k,
                },
                MatOut {
                    w: &l.wv,
                    y: &mut s.v,
                },
            ];
            // The norm is made row by row as the input is quantized.
            let normed = MatIn::RmsNorm {
                x: &s.x[..n * d],
                weight: &l.attn_norm,
                eps: c.rms_eps,
            };
            be.matmul_group_in(normed, n, qkv, ws);
            let window = c.windows[li];
            let rope = if window.is_some() {
                &s.rope_local
            } else {
                &s.rope_global
            };
            rope_rows(
                be,
                &mut q[..],
                &mut s.k[..n * kvd],
                (qd, kvd),
                hd,
                RopeStyle::Halves,
                rope,
                half,
                Some(HeadNorms {
                    q: &l.q_norm,
                    k: &l.k_norm,
                    eps: c.rms_eps,
                }),
            );
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
                scale: c.attn_scale,
                window,
            };
            with_attn_seqs(batch, |seqs| be.attention(&p, q, kv, seqs, attn, ws));
            be.matmul(&l.wo, &attn[..n * qd], n, &mut s.up, ws);
            par_chunks(be, &mut s.up[..n * d], l.post_attn_norm.len(), &|_, r| {
                ops::rms_norm_inplace(r, &l.post_attn_norm, c.rms_eps)
            });
            ops::add_inplace(&mut s.x[..n * d], &s.up[..n * d]);

            // MLP: norm, GeGLU, project back, post-norm, add.
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
            // gelu(gate) * up is made row by row as the input is quantized.
            let act = MatIn::GeGlu {
                gate: &s.gate[..n * c.d_ff],
                up: &s.up[..n * c.d_ff],
            };
            be.matmul_in(&l.w_down, act, n, &mut s.xn[..n * d], ws);
            par_chunks(be, &mut s.xn[..n * d], l.post_ffn_norm.len(), &|_, r| {
                ops::rms_norm_inplace(r, &l.post_ffn_norm, c.rms_eps)
            });
            ops::add_inplace(&mut s.x[..n * d], &s.xn[..n * d]);
        }

        // Final norm, output head and soft-capping, only for the rows asked for.
        gather_logit_rows(batch, &s.x, d, &mut s.xn);
        ops::rms_norm_inplace(&mut s.xn[..n_out * d], &w.output_norm, c.rms_eps);
        be.matmul(&w.output, &s.xn[..n_out * d], n_out, logits, ws);
        if let Some(cap) = c.final_logit_softcap {
            ops::softcap_inplace(&mut logits[..n_out * c.vocab_size], cap);
        }
        Ok(())
    }
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
