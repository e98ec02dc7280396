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

use crate::backend::{
    AttnParams, AttnSeq, Backend, Buf, HeadNorms, MatIn, MatOut, Weight, Workspace,
};
use crate::kv_cache::{BlockTable, KvCache, KvLayout};
use crate::models::{
    sliding_window, Dims, LoadOptions, Model, ModelInfo, Positions, SeqBatch, Source,
};
use crate::{Error, Result};

/// The gated activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    /// `silu(gate) * up` (Llama, Qwen).
    SwiGlu,
    /// `gelu_tanh(gate) * up` (Gemma).
    GeGlu,
}

pub(crate) use crate::ops::RopeSpec;

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
    attn_norm: Buf,               // [d_model]
    wq: Weight,                   // [d_model -> n_heads * head_dim]
    wk: Weight,                   // [d_model -> n_kv_heads * head_dim]
    wv: Weight,                   // [d_model -> n_kv_heads * head_dim]
    bias: Option<[Buf; 3]>,       // [n_heads * head_dim], [kv width] twice
    head_norms: Option<[Buf; 2]>, // [head_dim] for queries, keys
    wo: Weight,                   // [n_heads * head_dim -> d_model]
    post_attn_norm: Option<Buf>,  // [d_model]
    ffn_norm: Buf,                // [d_model]
    w_gate: Weight,               // [d_model -> d_ff]
    w_up: Weight,                 // [d_model -> d_ff]
    w_down: Weight,               // [d_ff -> d_model]
    post_ffn_norm: Option<Buf>,   // [d_model]
}

impl Block {
    /// Layer `i`'s weights by the file's own names (GGUF as llama.cpp writes
    /// them, Hugging Face as transformers does).
    fn load(src: &Source<'_>, i: usize, spec: &Spec, be: &dyn Backend) -> Result<Self> {
        let Dims {
            d_model: d,
            d_ff,
            head_dim: hd,
            ..
        } = spec.dims;
        let (qd, kvd) = (spec.dims.n_heads * hd, spec.dims.n_kv_heads * hd);
        let b = spec.blocks;
        let n = |gguf: &str, hf: &str| src.layer_name(i, gguf, hf);
        let norm = |gguf: &str, hf: &str, len: usize| -> Result<Buf> {
            let mut v = src.vector(&n(gguf, hf), len)?;
            v.iter_mut().for_each(|x| *x += b.norm_shift);
            be.upload(v)
        };
        let vector = |gguf: &str, hf: &str, len: usize| be.upload(src.vector(&n(gguf, hf), len)?);
        let tensor =
            |gguf: &str, hf: &str, shape: &[usize]| be.weight(src.tensor(&n(gguf, hf), shape)?);
        // Loaded in the order of a block's forward, so a broken file names
        // the first tensor the forward would miss.
        let attn_norm = norm("attn_norm.weight", "input_layernorm.weight", d)?;
        let wq = tensor("attn_q.weight", "self_attn.q_proj.weight", &[d, qd])?;
        let wk = tensor("attn_k.weight", "self_attn.k_proj.weight", &[d, kvd])?;
        let wv = tensor("attn_v.weight", "self_attn.v_proj.weight", &[d, kvd])?;
        let bias = if b.qkv_bias {
            Some([
                vector("attn_q.bias", "self_attn.q_proj.bias", qd)?,
                vector("attn_k.bias", "self_attn.k_proj.bias", kvd)?,
                vector("attn_v.bias", "self_attn.v_proj.bias", kvd)?,
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
        let wo = tensor("attn_output.weight", "self_attn.o_proj.weight", &[qd, d])?;
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
            w_gate: tensor("ffn_gate.weight", "mlp.gate_proj.weight", &[d, d_ff])?,
            w_up: tensor("ffn_up.weight", "mlp.up_proj.weight", &[d, d_ff])?,
            w_down: tensor("ffn_down.weight", "mlp.down_proj.weight", &[d_ff, d])?,
            post_ffn_norm,
        })
    }
}

/// Per-forward buffers in the backend's memory, sized at load for
/// `max_batch_tokens` rows. Buffers whose lives do not overlap share one:
/// the queries and then the MLP's gate in `qg`, the keys, the attention's
/// projection back (where a post-norm needs it apart) and then the MLP's up
/// in `ku`. `xn` holds the MLP's projection back, then the rows that want
/// logits after the last layer.
struct Scratch {
    x: Buf,           // [T, d_model] residual stream
    xn: Buf,          // [T, d_model] MLP projections; then logit rows
    qg: Buf,          // [T, max(n_heads * head_dim, d_ff)]: queries; then gate
    ku: Buf,          // [T, max(kv width, d_model, d_ff)]: keys; projections; then up
    v: Buf,           // [T, kv width]
    attn: Buf,        // [T, n_heads * head_dim] attention output
    angles: Vec<Buf>, // per RoPE variant: [T, dim / 2, 2]
    /// Position ids of the batch's rows (temporal, height, width): batch
    /// data on the host, as the token ids are.
    pos: Vec<[u32; 3]>,
}

/// The weights and scratch of a decoder, and the steps of its forward pass.
pub(crate) struct Trunk {
    spec: Spec,
    info: ModelInfo,
    tok_embd: Weight, // [d_model, vocab] (row per token)
    blocks: Vec<Block>,
    output_norm: Buf, // [d_model]
    output: Weight,   // [d_model -> vocab], maybe tok_embd itself
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
        let be = &*backend;
        let tok_embd = src.tensor(
            &src.name("token_embd.weight", "model.embed_tokens.weight"),
            &[d, dm.vocab_size],
        )?;
        let blocks = (0..dm.n_layers)
            .map(|i| Block::load(src, i, &spec, be))
            .collect::<Result<Vec<_>>>()?;
        let output = src.output_or_tied("output.weight", "lm_head.weight", &[d, dm.vocab_size])?;
        let tok_embd = be.weight(tok_embd)?;
        let output = match output {
            Some(t) => be.weight(t)?,
            None => tok_embd.clone(),
        };
        let mut output_norm =
            src.vector(&src.name("output_norm.weight", "model.norm.weight"), d)?;
        output_norm
            .iter_mut()
            .for_each(|x| *x += spec.blocks.norm_shift);
        let output_norm = be.upload(output_norm)?;

        let ctx = if opts.context_length == 0 {
            dm.context_length
        } else {
            opts.context_length
        };
        let t = opts.max_batch_tokens.max(1);
        let s = Scratch {
            x: be.alloc(t * d)?,
            xn: be.alloc(t * d)?,
            qg: be.alloc(t * qd.max(dm.d_ff))?,
            ku: be.alloc(t * kvd.max(d).max(dm.d_ff))?,
            v: be.alloc(t * kvd)?,
            attn: be.alloc(t * qd)?,
            angles: spec
                .ropes
                .iter()
                .map(|r| be.alloc(t * r.dim))
                .collect::<Result<_>>()?,
            pos: vec![[0; 3]; t],
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
                dtype: opts.kv_type,
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
                let ids = &b.tokens[i..next];
                be.embed_rows(
                    &self.tok_embd,
                    ids,
                    self.spec.embed_scale,
                    &mut s.x,
                    row + i,
                );
                i = next;
                if let Some(e) = spans.next() {
                    be.write(&mut s.x, (row + i) * d, e.rows);
                    i += e.rows.len() / d;
                }
            }
            for (i, p) in s.pos[row..row + b.tokens.len()].iter_mut().enumerate() {
                *p = b.positions.at(b.start_pos, i);
            }
            row += b.tokens.len();
        }
        for (r, out) in self.spec.ropes.iter().zip(&mut s.angles) {
            be.rope_angles(r, &s.pos[..n], out);
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
        let mut rows = be.alloc(out.len())?;
        be.embed_rows(&self.tok_embd, tokens, self.spec.embed_scale, &mut rows, 0);
        be.read(&rows, 0, out);
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
            head_dim: hd,
            n_heads,
            n_kv_heads,
            ..
        } = spec.dims;
        let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
        let qkv = &mut [
            MatOut {
                w: &l.wq,
                y: &mut s.qg,
            },
            MatOut {
                w: &l.wk,
                y: &mut s.ku,
            },
            MatOut {
                w: &l.wv,
                y: &mut s.v,
            },
        ];
        // The norm is made row by row as the input is quantized.
        let normed = MatIn::RmsNorm {
            x: &s.x,
            weight: &l.attn_norm,
            eps: spec.rms_eps,
        };
        be.matmul_group_in(normed, n, qkv, ws);
        if let Some([bq, bk, bv]) = &l.bias {
            be.add_bias(&mut s.qg, n, bq);
            be.add_bias(&mut s.ku, n, bk);
            be.add_bias(&mut s.v, n, bv);
        }
        let r = spec.layer_rope[li];
        let rope = &spec.ropes[r];
        be.rope_qk(
            &mut s.qg,
            &mut s.ku,
            n,
            (qd, kvd),
            hd,
            rope.style,
            (&s.angles[r], rope.dim / 2),
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
            be.kv_write(kv, li, seqs, &s.ku, &s.v);
            be.attention(&p, &s.qg, kv, seqs, &mut s.attn, ws)
        });
        let attn = MatIn::Rows(&s.attn);
        match &l.post_attn_norm {
            // Added into the residual stream as the products are made.
            None => be.matmul_add_in(&l.wo, attn, n, &mut s.x, ws),
            Some(post) => {
                be.matmul_in(&l.wo, attn, n, &mut s.ku, ws);
                be.norm_add(&mut s.x, &mut s.ku, n, post, spec.rms_eps);
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
        let gate_up = &mut [
            MatOut {
                w: &l.w_gate,
                y: &mut s.qg,
            },
            MatOut {
                w: &l.w_up,
                y: &mut s.ku,
            },
        ];
        let normed = MatIn::RmsNorm {
            x: &s.x,
            weight: &l.ffn_norm,
            eps: spec.rms_eps,
        };
        be.matmul_group_in(normed, n, gate_up, ws);
        let (gate, up) = (&s.qg, &s.ku);
        let act = match spec.act {
            Act::SwiGlu => MatIn::SwiGlu { gate, up },
            Act::GeGlu => MatIn::GeGlu { gate, up },
        };
        match &l.post_ffn_norm {
            None => be.matmul_add_in(&l.w_down, act, n, &mut s.x, ws),
            Some(post) => {
                be.matmul_in(&l.w_down, act, n, &mut s.xn, ws);
                be.norm_add(&mut s.x, &mut s.xn, n, post, spec.rms_eps);
            }
        }
    }

    /// Final norm and output head, only for the rows asked for, soft-capped
    /// where the spec says so; the logits go to the host.
    pub(crate) fn logits(&mut self, batch: &[SeqBatch<'_>], logits: &mut [f32]) -> Result<()> {
        let (d, n_out) = (self.spec.dims.d_model, self.n_out);
        let (s, be) = (&mut self.s, &*self.backend);
        let (mut row, mut out) = (0, 0);
        for b in batch {
            let (n, want) = (b.tokens.len(), b.logit_rows());
            be.copy_rows(&s.x, row + n - want, &mut s.xn, out, want, d);
            (row, out) = (row + n, out + want);
        }
        be.rms_norm(&mut s.xn, n_out, &self.output_norm, self.spec.rms_eps);
        let cap = self.spec.final_softcap;
        be.logits(&self.output, &s.xn, n_out, cap, logits, &mut self.ws);
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

    fn kv_cache(&self, n_blocks: usize, n_window_blocks: usize) -> Result<KvCache> {
        self.backend
            .kv_cache(self.info.kv, n_blocks, n_window_blocks)
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
