//! The decoder trunk, written once: embeddings (token ids or given rows),
//! the attention block, the MLP block and the logits, over the [`Backend`].
//!
//! A model file reads its config into a [`Spec`] (dimensions, RoPE variants,
//! which layers slide, which optional weights its blocks carry, the MLP's
//! activation) and nothing else: Llama, Qwen2, Qwen3 and Gemma 3 run the
//! same forward ([`Trunk`]'s [`Model`] impl). What differs between them is
//! data: a block with projection biases adds them, one with head norms
//! normalises each query and key head, one with post-norms (Gemma's
//! "sandwich") normalises each block's output before the residual add. A
//! family whose forward differs in its steps (multimodal RoPE positions from
//! image grids, say) writes its own from [`Trunk::embed`],
//! [`Trunk::attention`], [`Trunk::mlp`] and [`Trunk::logits`].
//!
//! Every row of a batch carries its position ids: one stream for text
//! models, three (temporal, height, width) for multimodal RoPE. The KV cache
//! slot of a row is still `start_pos + index`; only the rotation reads the ids.

use std::sync::Arc;

use crate::backend::{AttnParams, AttnSeq, Backend, HeadNorms, MatIn, MatOut, Workspace};
use crate::kv_cache::{BlockTable, KvCache, KvLayout};
use crate::models::{
    sliding_window, Dims, LoadOptions, Model, ModelInfo, Positions, SeqBatch, Source,
};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::{Error, Result};

/// The gated activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    /// `silu(gate) * up` (Llama, Qwen).
    SwiGlu,
    /// `gelu_tanh(gate) * up` (Gemma).
    GeGlu,
}

/// One rotary embedding variant.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RopeSpec {
    /// Base frequency.
    pub base: f32,
    /// Positions are divided by this (linear scaling).
    pub linear_factor: f32,
    /// Elements of a head that rotate.
    pub dim: usize,
    /// How rotary pairs are laid out in the stored Q/K rows.
    pub style: RopeStyle,
    /// Per-pair divisors of the frequency (Llama 3 scaling), `[dim / 2]`.
    pub freq_factors: Option<Vec<f32>>,
    /// Multimodal RoPE: how many pairs, in order, follow each position stream
    /// (temporal, height, width); `None` rotates every pair by stream 0.
    pub sections: Option<[usize; 3]>,
}

/// Which optional weights a family's blocks carry, and how they are stored.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BlockSpec {
    /// Biases on the Q, K and V projections (Qwen2).
    pub qkv_bias: bool,
    /// An RMSNorm over each query and key head before the rotation (Qwen3, Gemma 3).
    pub head_norms: bool,
    /// RMSNorm on each block's output before the residual add (Gemma).
    pub post_norms: bool,
    /// Added to every norm weight at load: Gemma's folders store `w` for a
    /// scale of `1 + w` (its GGUF files store `1 + w`).
    pub norm_shift: f32,
}

/// Everything the trunk needs to know about a model, read from its config.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    /// The architecture name reported in [`ModelInfo::arch`].
    pub arch: &'static str,
    /// Shared dimensions.
    pub dims: Dims,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Multiplier of q·k.
    pub attn_scale: f32,
    /// RoPE variants; layer `i` rotates by `ropes[layer_rope[i]]`.
    pub ropes: Vec<RopeSpec>,
    /// Per layer: which RoPE variant.
    pub layer_rope: Vec<usize>,
    /// Per layer: the sliding window, or `None` for full attention.
    pub windows: Vec<Option<usize>>,
    /// The config key that names the sliding window in errors.
    pub window_key: &'static str,
    /// Optional block weights.
    pub blocks: BlockSpec,
    /// The MLP's gated activation.
    pub act: Act,
    /// Token embeddings are multiplied by this (Gemma: `sqrt(d_model)`).
    pub embed_scale: Option<f32>,
    /// `cap * tanh(logit / cap)` on the output, when set.
    pub final_softcap: Option<f32>,
}

/// One transformer block's weights.
struct Block {
    attn_norm: Vec<f32>,               // [d_model]
    wq: QTensor,                       // [d_model -> n_heads * head_dim]
    wk: QTensor,                       // [d_model -> n_kv_heads * head_dim]
    wv: QTensor,                       // [d_model -> n_kv_heads * head_dim]
    bias: Option<[Vec<f32>; 3]>,       // [n_heads * head_dim], [kv width] twice
    head_norms: Option<[Vec<f32>; 2]>, // [head_dim] for queries, keys
    wo: QTensor,                       // [n_heads * head_dim -> d_model]
    post_attn_norm: Option<Vec<f32>>,  // [d_model]
    ffn_norm: Vec<f32>,                // [d_model]
    w_gate: QTensor,                   // [d_model -> d_ff]
    w_up: QTensor,                     // [d_model -> d_ff]
    w_down: QTensor,                   // [d_ff -> d_model]
    post_ffn_norm: Option<Vec<f32>>,   // [d_model]
}

impl Block {
    /// Layer `i`'s weights by the file's own names (GGUF as llama.cpp writes
    /// them, Hugging Face as transformers does).
    fn load(src: &Source<'_>, i: usize, spec: &Spec) -> Result<Self> {
        let Dims {
            d_model: d,
            d_ff,
            head_dim: hd,
            ..
        } = spec.dims;
        let (qd, kvd) = (spec.dims.n_heads * hd, spec.dims.n_kv_heads * hd);
        let b = spec.blocks;
        let n = |gguf: &str, hf: &str| src.layer_name(i, gguf, hf);
        let norm = |gguf: &str, hf: &str, len: usize| -> Result<Vec<f32>> {
            let mut v = src.vector(&n(gguf, hf), len)?;
            v.iter_mut().for_each(|x| *x += b.norm_shift);
            Ok(v)
        };
        // Loaded in the order of a block's forward, so a broken file names
        // the first tensor the forward would miss.
        let attn_norm = norm("attn_norm.weight", "input_layernorm.weight", d)?;
        let wq = src.tensor(&n("attn_q.weight", "self_attn.q_proj.weight"), &[d, qd])?;
        let wk = src.tensor(&n("attn_k.weight", "self_attn.k_proj.weight"), &[d, kvd])?;
        let wv = src.tensor(&n("attn_v.weight", "self_attn.v_proj.weight"), &[d, kvd])?;
        let bias = if b.qkv_bias {
            Some([
                src.vector(&n("attn_q.bias", "self_attn.q_proj.bias"), qd)?,
                src.vector(&n("attn_k.bias", "self_attn.k_proj.bias"), kvd)?,
                src.vector(&n("attn_v.bias", "self_attn.v_proj.bias"), kvd)?,
            ])
        } else {
            None
        };
        let head_norms = if b.head_norms {
            Some([
                norm("attn_q_norm.weight", "self_attn.q_norm.weight", hd)?,
                norm("attn_k_norm.weight", "self_attn.k_norm.weight", hd)?,
            ])
        } else {
            None
        };
        let wo = src.tensor(
            &n("attn_output.weight", "self_attn.o_proj.weight"),
            &[qd, d],
        )?;
        // With post-norms, Hugging Face calls the pre-MLP norm
        // `pre_feedforward_layernorm` and the attention's post-norm
        // `post_attention_layernorm`; without, the latter is the pre-MLP norm.
        let (ffn_norm, post_attn_norm, post_ffn_norm) = if b.post_norms {
            (
                norm("ffn_norm.weight", "pre_feedforward_layernorm.weight", d)?,
                Some(norm(
                    "post_attention_norm.weight",
                    "post_attention_layernorm.weight",
                    d,
                )?),
                Some(norm(
                    "post_ffw_norm.weight",
                    "post_feedforward_layernorm.weight",
                    d,
                )?),
            )
        } else {
            let ffn = norm("ffn_norm.weight", "post_attention_layernorm.weight", d)?;
            (ffn, None, None)
        };
        Ok(Self {
            attn_norm,
            wq,
            wk,
            wv,
            bias,
            head_norms,
            wo,
            post_attn_norm,
            ffn_norm,
            w_gate: src.tensor(&n("ffn_gate.weight", "mlp.gate_proj.weight"), &[d, d_ff])?,
            w_up: src.tensor(&n("ffn_up.weight", "mlp.up_proj.weight"), &[d, d_ff])?,
            w_down: src.tensor(&n("ffn_down.weight", "mlp.down_proj.weight"), &[d_ff, d])?,
            post_ffn_norm,
        })
    }
}

/// Per-forward scratch, sized at load for `max_batch_tokens` rows. Buffers
/// whose lives do not overlap share one: the queries, keys, values and the
/// attention output live in `gate` until the MLP needs it, the projections
/// back to the residual in `up` (attention) and `xn` (MLP), the rows that
/// want logits in `xn` after the last layer.
struct Scratch {
    x: Vec<f32>,                  // [T, d_model] residual stream
    xn: Vec<f32>,                 // [T, d_model] MLP projections; then logit rows
    gate: Vec<f32>, // [T, max(d_ff, 2 * (q + kv width))]: q, k, v, attention; then gate
    up: Vec<f32>,   // [T, max(d_ff, d_model)]: attention projections; then up
    pos: Vec<[u32; 3]>, // [T] position ids (temporal, height, width)
    angles: Vec<Vec<(f32, f32)>>, // per RoPE variant: [T, dim / 2]
}

/// The weights and scratch of a decoder, and the steps of its forward pass.
pub(crate) struct Trunk {
    spec: Spec,
    info: ModelInfo,
    tok_embd: QTensor, // [d_model, vocab] (row per token)
    blocks: Vec<Block>,
    output_norm: Vec<f32>, // [d_model]
    output: QTensor,       // [d_model -> vocab], maybe tok_embd itself
    backend: Arc<dyn Backend>,
    s: Scratch,
    ws: Workspace,
    /// Rows of the batch in flight and the logit rows it asked for.
    n: usize,
    n_out: usize,
}

impl Trunk {
    /// Loads the weights `spec` describes and sizes the scratch.
    pub(crate) fn load(
        src: &Source<'_>,
        spec: Spec,
        backend: Arc<dyn Backend>,
        opts: LoadOptions,
    ) -> Result<Self> {
        let dm = spec.dims.clone();
        let (d, hd) = (dm.d_model, dm.head_dim);
        let (qd, kvd) = (dm.n_heads * hd, dm.n_kv_heads * hd);
        assert_eq!(spec.layer_rope.len(), dm.n_layers, "a RoPE per layer");
        assert_eq!(spec.windows.len(), dm.n_layers, "a window per layer");
        for r in &spec.ropes {
            if r.dim > hd || r.dim % 2 != 0 {
                return Err(src.meta_err(
                    "rope.dimension_count",
                    format!("{} rotating elements of a {hd}-wide head", r.dim),
                ));
            }
            if let Some(s) = r.sections {
                if s.iter().sum::<usize>() != r.dim / 2 {
                    return Err(src.meta_err(
                        "rope_scaling.mrope_section",
                        format!("sections {s:?} do not cover the {} rotary pairs", r.dim / 2),
                    ));
                }
            }
        }
        let tok_embd = src.tensor(
            &src.name("token_embd.weight", "model.embed_tokens.weight"),
            &[d, dm.vocab_size],
        )?;
        let blocks = (0..dm.n_layers)
            .map(|i| Block::load(src, i, &spec))
            .collect::<Result<Vec<_>>>()?;
        let output = src.output_or_tied(
            "output.weight",
            "lm_head.weight",
            &[d, dm.vocab_size],
            &tok_embd,
        )?;
        let mut output_norm =
            src.vector(&src.name("output_norm.weight", "model.norm.weight"), d)?;
        output_norm
            .iter_mut()
            .for_each(|x| *x += spec.blocks.norm_shift);

        let ctx = if opts.context_length == 0 {
            dm.context_length
        } else {
            opts.context_length
        };
        let t = opts.max_batch_tokens.max(1);
        let s = Scratch {
            x: vec![0.0; t * d],
            xn: vec![0.0; t * d],
            gate: vec![0.0; t * dm.d_ff.max(2 * (qd + kvd))],
            up: vec![0.0; t * dm.d_ff.max(d)],
            pos: vec![[0; 3]; t],
            angles: spec
                .ropes
                .iter()
                .map(|r| vec![(0.0, 0.0); t * (r.dim / 2)])
                .collect(),
        };
        let ws = backend.workspace(t, d.max(dm.d_ff).max(qd), ctx);
        let sliding: Vec<bool> = spec.windows.iter().map(Option::is_some).collect();
        let size = spec.windows.iter().flatten().copied().next().unwrap_or(0);
        let window = sliding_window(&sliding, size, |m| src.meta_err(spec.window_key, m))?;
        let name = src.gguf().and_then(|g| {
            g.get("general.name")
                .and_then(|_| g.get_str("general.name").ok())
                .map(String::from)
        });
        let info = ModelInfo {
            arch: spec.arch.into(),
            name,
            vocab_size: dm.vocab_size,
            d_model: d,
            mrope: spec.ropes.iter().any(|r| r.sections.is_some()),
            context_length: ctx,
            kv: KvLayout {
                n_layers: dm.n_layers,
                n_kv_heads: dm.n_kv_heads,
                head_dim: hd,
                block_size: opts.block_size,
                window,
            },
            max_batch_tokens: t,
        };
        Ok(Self {
            spec,
            info,
            tok_embd,
            blocks,
            output_norm,
            output,
            backend,
            s,
            ws,
            n: 0,
            n_out: 0,
        })
    }

    /// Checks the batch, then fills the residual stream with each row's token
    /// embedding (times the spec's scale) or the row the batch gives for it,
    /// and every RoPE variant's angles at each row's positions.
    pub(crate) fn embed(
        &mut self,
        batch: &[SeqBatch<'_>],
        kv: &KvCache,
        logits: &[f32],
    ) -> Result<()> {
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let n_out: usize = batch.iter().map(SeqBatch::logit_rows).sum();
        check_batch(batch, n, n_out, &self.info, kv, logits.len())?;
        (self.n, self.n_out) = (n, n_out);
        let d = self.spec.dims.d_model;
        let (s, be) = (&mut self.s, &*self.backend);
        let mut row = 0;
        for b in batch {
            let mut spans = b.embeds.iter().peekable();
            let mut i = 0;
            while i < b.tokens.len() {
                // Token rows up to the next given span, then the span as it is
                // (image patches).
                let next = spans.peek().map_or(b.tokens.len(), |e| e.at);
                let x = &mut s.x[(row + i) * d..(row + next) * d];
                be.embed_rows(&self.tok_embd, &b.tokens[i..next], self.spec.embed_scale, x);
                i = next;
                if let Some(e) = spans.next() {
                    let k = e.rows.len() / d;
                    be.copy_rows(e.rows, 0, &mut s.x, row + i, k, d);
                    i += k;
                }
            }
            for (i, p) in s.pos[row..row + b.tokens.len()].iter_mut().enumerate() {
                *p = b.positions.at(b.start_pos, i);
            }
            row += b.tokens.len();
        }
        for (r, out) in self.spec.ropes.iter().zip(&mut s.angles) {
            let half = r.dim / 2;
            for (p, cs) in s.pos[..n].iter().zip(out.chunks_exact_mut(half)) {
                let pos = p.map(|v| v as f32 / r.linear_factor);
                match r.sections {
                    None => ops::rope_angles(pos[0], r.base, r.dim, r.freq_factors.as_deref(), cs),
                    Some(sec) => ops::rope_angles_sections(pos, sec, r.base, r.dim, cs),
                }
            }
        }
        Ok(())
    }

    /// [`Model::token_embeddings`](crate::models::Model::token_embeddings).
    pub(crate) fn token_embeddings(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let (d, vocab) = (self.spec.dims.d_model, self.spec.dims.vocab_size);
        if out.len() != tokens.len() * d {
            return Err(Error::InvalidRequest(format!(
                "{} values for {} rows of {d}",
                out.len(),
                tokens.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "token id {t} outside the vocabulary ({vocab})"
            )));
        }
        let be = &*self.backend;
        be.embed_rows(&self.tok_embd, tokens, self.spec.embed_scale, out);
        Ok(())
    }

    /// Layer `li`'s attention block: pre-norm, Q/K/V (plus biases), head
    /// norms, rotation, K/V into the cache, attention through the block
    /// tables (over the window on sliding layers), the output projection
    /// (post-normed where the block has it) added into the residual stream.
    pub(crate) fn attention(&mut self, li: usize, batch: &[SeqBatch<'_>], kv: &mut KvCache) {
        let Self {
            spec,
            blocks,
            backend,
            s,
            ws,
            n,
            ..
        } = self;
        let (be, l, n) = (&**backend, &blocks[li], *n);
        let Dims {
            d_model: d,
            head_dim: hd,
            n_heads,
            n_kv_heads,
            ..
        } = spec.dims;
        let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
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
            eps: spec.rms_eps,
        };
        be.matmul_group_in(normed, n, qkv, ws);
        if let Some([bq, bk, bv]) = &l.bias {
            be.add_bias(q, bq);
            be.add_bias(k, bk);
            be.add_bias(v, bv);
        }
        let r = spec.layer_rope[li];
        let rope = &spec.ropes[r];
        be.rope_qk(
            &mut q[..],
            &mut k[..],
            (qd, kvd),
            hd,
            rope.style,
            &s.angles[r],
            rope.dim / 2,
            l.head_norms.as_ref().map(|[q, k]| HeadNorms {
                q,
                k,
                eps: spec.rms_eps,
            }),
        );
        let p = AttnParams {
            layer: li,
            n_heads,
            n_kv_heads,
            head_dim: hd,
            scale: spec.attn_scale,
            window: spec.windows[li],
        };
        with_attn_seqs(batch, |seqs| {
            be.kv_write(kv, li, seqs, k, v);
            be.attention(&p, q, kv, seqs, attn, ws)
        });
        let attn = MatIn::Rows(&attn[..n * qd]);
        match &l.post_attn_norm {
            // Added into the residual stream as the products are made.
            None => be.matmul_add_in(&l.wo, attn, n, &mut s.x[..n * d], ws),
            Some(post) => {
                be.matmul_in(&l.wo, attn, n, &mut s.up, ws);
                be.norm_add(&mut s.x[..n * d], &mut s.up[..n * d], post, spec.rms_eps);
            }
        }
    }

    /// Layer `li`'s MLP block: pre-norm, gate and up, the gated activation
    /// (made row by row as the down projection's input is quantized), down,
    /// post-normed where the block has it, added into the residual stream.
    pub(crate) fn mlp(&mut self, li: usize) {
        let Self {
            spec,
            blocks,
            backend,
            s,
            ws,
            n,
            ..
        } = self;
        let (be, l, n) = (&**backend, &blocks[li], *n);
        let (d, d_ff) = (spec.dims.d_model, spec.dims.d_ff);
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
            eps: spec.rms_eps,
        };
        be.matmul_group_in(normed, n, gate_up, ws);
        let (gate, up) = (&s.gate[..n * d_ff], &s.up[..n * d_ff]);
        let act = match spec.act {
            Act::SwiGlu => MatIn::SwiGlu { gate, up },
            Act::GeGlu => MatIn::GeGlu { gate, up },
        };
        match &l.post_ffn_norm {
            None => be.matmul_add_in(&l.w_down, act, n, &mut s.x[..n * d], ws),
            Some(post) => {
                be.matmul_in(&l.w_down, act, n, &mut s.xn[..n * d], ws);
                be.norm_add(&mut s.x[..n * d], &mut s.xn[..n * d], post, spec.rms_eps);
            }
        }
    }

    /// Final norm and output head, only for the rows asked for, soft-capped
    /// where the spec says so.
    pub(crate) fn logits(&mut self, batch: &[SeqBatch<'_>], logits: &mut [f32]) -> Result<()> {
        let (d, n_out) = (self.spec.dims.d_model, self.n_out);
        let (s, be) = (&mut self.s, &*self.backend);
        let (mut row, mut out) = (0, 0);
        for b in batch {
            let (n, want) = (b.tokens.len(), b.logit_rows());
            be.copy_rows(&s.x, row + n - want, &mut s.xn, out, want, d);
            (row, out) = (row + n, out + want);
        }
        be.rms_norm(&mut s.xn[..n_out * d], &self.output_norm, self.spec.rms_eps);
        be.matmul(
            &self.output,
            &s.xn[..n_out * d],
            n_out,
            logits,
            &mut self.ws,
        );
        if let Some(cap) = self.spec.final_softcap {
            be.softcap(&mut logits[..n_out * self.spec.dims.vocab_size], cap);
        }
        Ok(())
    }
}

/// Every family here runs the same forward; what differs is data in the
/// spec and the blocks' weights.
impl Model for Trunk {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn token_embeddings(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        Trunk::token_embeddings(self, tokens, out)
    }

    fn forward(
        &mut self,
        batch: &[SeqBatch<'_>],
        kv: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<()> {
        // Token embeddings (or the rows given), rotary angles at each row's ids.
        self.embed(batch, kv, logits)?;
        for li in 0..self.blocks.len() {
            // Attention: norm, project (+ bias), norm each Q/K head, rotate,
            // store K/V, attend (through the window on sliding layers),
            // project back (post-norm), add.
            self.attention(li, batch, kv);
            // MLP: norm, gate and up, SwiGLU or GeGLU, project back (post-norm), add.
            self.mlp(li);
        }
        // Final norm, output head (soft-capped), only for the rows asked for.
        self.logits(batch, logits)
    }
}

/// Calls `f` with the batch described as attention sequences, without allocating
/// for the common small batches.
fn with_attn_seqs<R>(batch: &[SeqBatch<'_>], f: impl FnOnce(&[AttnSeq<'_>]) -> R) -> R {
    const INLINE: usize = 16;
    fn to_seq<'a>(b: &SeqBatch<'a>) -> AttnSeq<'a> {
        AttnSeq {
            table: b.table,
            start_pos: b.start_pos,
            n_tokens: b.tokens.len(),
        }
    }
    if batch.len() <= INLINE {
        let empty = BlockTable::new();
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

/// Rejects a batch the model cannot run, before any state changes.
fn check_batch(
    batch: &[SeqBatch<'_>],
    n: usize,
    n_out: usize,
    info: &ModelInfo,
    kv: &KvCache,
    logits_len: usize,
) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidRequest(m));
    if n == 0 {
        return bad("empty batch".into());
    }
    if n > info.max_batch_tokens {
        return bad(format!(
            "batch of {n} tokens exceeds max_batch_tokens {}",
            info.max_batch_tokens
        ));
    }
    if logits_len < n_out * info.vocab_size {
        return bad("logits buffer too small".into());
    }
    if kv.layout() != info.kv {
        return bad("KV cache layout does not match the model".into());
    }
    let bs = info.kv.block_size;
    for b in batch {
        let end = b.start_pos + b.tokens.len();
        if end > info.context_length {
            return bad(format!(
                "sequence of {end} positions exceeds the context length {}",
                info.context_length
            ));
        }
        if end > b.table.capacity(bs) {
            return bad(format!(
                "block table holds {} positions, batch needs {end}",
                b.table.capacity(bs)
            ));
        }
        if let Some(w) = info.kv.window {
            let first_visible = (b.start_pos + 1).saturating_sub(w.size);
            if end > b.table.window.len() * bs || first_visible < b.table.window_start(bs) {
                return bad(format!(
                    "block table's sliding-window blocks hold positions {}..{}, batch needs {first_visible}..{end}",
                    b.table.window_start(bs),
                    b.table.window.len() * bs
                ));
            }
        }
        if let Some(&t) = b.tokens.iter().find(|&&t| t as usize >= info.vocab_size) {
            return bad(format!(
                "token id {t} outside the vocabulary ({})",
                info.vocab_size
            ));
        }
        b.positions.check(b.tokens.len())?;
        check_embeds(b, info)?;
    }
    Ok(())
}

/// Given rows must be whole rows of the model's width, in order, inside the
/// sequence's new tokens and not overlapping.
fn check_embeds(b: &SeqBatch<'_>, info: &ModelInfo) -> Result<()> {
    let d = info.d_model;
    let mut next_free = 0;
    for e in b.embeds {
        if e.rows.is_empty() || e.rows.len() % d != 0 {
            return Err(Error::InvalidRequest(format!(
                "{} embedding values at row {} are not whole rows of {d}",
                e.rows.len(),
                e.at
            )));
        }
        let end = e.at + e.rows.len() / d;
        if e.at < next_free || end > b.tokens.len() {
            return Err(Error::InvalidRequest(format!(
                "embedding rows {}..{end} overlap others or pass the sequence's {} new rows",
                e.at,
                b.tokens.len()
            )));
        }
        next_free = end;
    }
    Ok(())
}

impl Positions<'_> {
    /// Row `i`'s ids in the three streams (a single stream repeats).
    fn at(&self, start_pos: usize, i: usize) -> [u32; 3] {
        match *self {
            Positions::Sequential => [(start_pos + i) as u32; 3],
            Positions::Ids(ids) => [ids[i]; 3],
            Positions::MRope(ids) => ids[i],
        }
    }

    /// Ids for every new row.
    fn check(&self, n: usize) -> Result<()> {
        let len = match self {
            Positions::Sequential => return Ok(()),
            Positions::Ids(ids) => ids.len(),
            Positions::MRope(ids) => ids.len(),
        };
        if len != n {
            return Err(Error::InvalidRequest(format!(
                "{len} position ids for {n} new rows"
            )));
        }
        Ok(())
    }
}
