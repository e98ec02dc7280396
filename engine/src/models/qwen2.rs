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

use std::sync::Arc;

use serde::Deserialize;

use crate::backend::cpu::dequantize_row;
use crate::backend::{AttnParams, Backend, MatIn, MatOut, Workspace};
use crate::kv_cache::{KvCache, KvLayout};
use crate::models::{
    check_batch, gather_logit_rows, gguf_f32, hf_sliding_layers, rope_rows, sliding_window,
    with_attn_seqs, Dims, HfCommon, LoadOptions, Model, ModelInfo, Rope, SeqBatch, Source,
};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::Result;

/// Hyper-parameters, from the file's `qwen2.*` keys or `config.json`.
#[derive(Clone, Debug)]
pub struct Qwen2Config {
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
    /// Per layer: the sliding window, or `None` for full attention.
    pub windows: Vec<Option<usize>>,
}

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

impl Qwen2Config {
    /// Reads the `<arch>.*` keys; Qwen2 and Qwen3 files share them.
    pub(crate) fn from_gguf(g: &crate::gguf::Gguf, arch: &str) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let d = Dims::from_gguf(g, arch)?;
        let rope_linear_factor = match g.get(&key("rope.scaling.type")) {
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
        Ok(Self {
            n_layers: d.n_layers,
            d_model: d.d_model,
            d_ff: d.d_ff,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            rope_base: gguf_f32(g, &key("rope.freq_base"), 10000.0)?,
            rope_linear_factor,
            rms_eps: gguf_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-6)?,
            vocab_size: d.vocab_size,
            context_length: d.context_length,
            // llama.cpp runs these files with full attention on every layer.
            windows: vec![None; d.n_layers],
        })
    }

    /// Reads `config.json`; `family` names the model in errors.
    pub(crate) fn from_hf(src: &Source<'_>, family: &str) -> Result<Self> {
        let folder = src.hf().expect("a Hugging Face source");
        // Read twice so that errors name the field (serde's flatten loses the path).
        let common: HfCommon = src.hf_config()?;
        let c: HfQwen2Config = src.hf_config()?;
        let d = Dims::from_hf(&common, folder.config_path())?;
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
        Ok(Self {
            n_layers: d.n_layers,
            d_model: d.d_model,
            d_ff: d.d_ff,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            rope_base: rope.base,
            rope_linear_factor: rope.linear_factor,
            rms_eps: common.rms_norm_eps,
            vocab_size: d.vocab_size,
            context_length: d.context_length,
            windows,
        })
    }
}

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>, // [d_model]
    wq: QTensor,         // [d_model -> n_heads * head_dim]
    bq: Vec<f32>,        // [n_heads * head_dim]
    wk: QTensor,         // [d_model -> n_kv_heads * head_dim]
    bk: Vec<f32>,        // [n_kv_heads * head_dim]
    wv: QTensor,         // [d_model -> n_kv_heads * head_dim]
    bv: Vec<f32>,        // [n_kv_heads * head_dim]
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

/// A loaded Qwen2 model.
pub struct Qwen2 {
    cfg: Qwen2Config,
    info: ModelInfo,
    w: Weights,
    backend: Arc<dyn Backend>,
    s: Scratch,
    ws: Workspace,
}

impl Qwen2 {
    /// Loads a `qwen2` GGUF file or a `Qwen2ForCausalLM` folder.
    pub fn load(src: &Source<'_>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Self> {
        let cfg = match src.gguf() {
            Some(g) => Qwen2Config::from_gguf(g, "qwen2")?,
            None => Qwen2Config::from_hf(src, "Qwen2")?,
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
                bq: src.vector(&n("attn_q.bias", "self_attn.q_proj.bias"), qd)?,
                wk: src.tensor(&n("attn_k.weight", "self_attn.k_proj.weight"), &[d, kvd])?,
                bk: src.vector(&n("attn_k.bias", "self_attn.k_proj.bias"), kvd)?,
                wv: src.tensor(&n("attn_v.weight", "self_attn.v_proj.weight"), &[d, kvd])?,
                bv: src.vector(&n("attn_v.bias", "self_attn.v_proj.bias"), kvd)?,
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
            arch: "qwen2".into(),
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

impl Model for Qwen2 {
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
            // Attention: norm, project with bias, rotate halves, store K/V, attend, project back.
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
            ops::add_bias_rows(q, &l.bq);
            ops::add_bias_rows(k, &l.bk);
            ops::add_bias_rows(v, &l.bv);
            rope_rows(
                be,
                &mut q[..],
                &mut k[..],
                (qd, kvd),
                hd,
                RopeStyle::Halves,
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
