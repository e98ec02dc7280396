//! Compute backends behind one trait.
//!
//! The model code calls the heavy operations (matrix products over stacked
//! token rows, attention through block tables) through [`Backend`]; each backend
//! decides how to run them. The CPU backend is always built; GPU backends are
//! cargo features, and asking for one that is not compiled in gives
//! [`Error::NotCompiled`](crate::Error::NotCompiled).

pub mod cpu;
pub mod reference;

use crate::kv_cache::{BlockTable, KvCache};
use crate::ops::{self, RopeStyle};
use crate::tensor::QTensor;
use crate::{Error, Result};

/// One sequence's slice of a batched attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    /// The sequence's KV blocks.
    pub table: &'a BlockTable,
    /// Absolute position of the first new token.
    pub start_pos: usize,
    /// New tokens of this sequence in the batch.
    pub n_tokens: usize,
}

/// Shape and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    /// KV layer to read.
    pub layer: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Multiplier applied to q·k.
    pub scale: f32,
    /// Attend only to the last `window` positions (sliding-window layers).
    pub window: Option<usize>,
}

/// RMSNorm weights of each query and key head (Qwen3, Gemma 3), applied
/// before the rotation in [`Backend::rope_qk`].
#[derive(Clone, Copy, Debug)]
pub struct HeadNorms<'a> {
    /// Query head norm, `[head_dim]`.
    pub q: &'a [f32],
    /// Key head norm, `[head_dim]`.
    pub k: &'a [f32],
    /// Added to the mean square.
    pub eps: f32,
}

/// The input rows of a [`Backend::matmul_group_in`]: as they are, or made
/// by an element-wise step on their way into the activation quantize, where
/// the step costs no pass over the batch and no synchronisation of its own.
#[derive(Clone, Copy, Debug)]
pub enum MatIn<'a> {
    /// `[n, k]` values.
    Rows(&'a [f32]),
    /// [`ops::rms_norm`](crate::ops::rms_norm) of each `[n, k]` row of `x`.
    RmsNorm {
        /// The rows to normalise.
        x: &'a [f32],
        /// The norm's weight (`k` values).
        weight: &'a [f32],
        /// Added to the mean square.
        eps: f32,
    },
    /// `silu(gate) * up`, element-wise ([`ops::swiglu_inplace`](crate::ops::swiglu_inplace)).
    SwiGlu {
        /// `[n, k]` gate projections.
        gate: &'a [f32],
        /// `[n, k]` up projections.
        up: &'a [f32],
    },
    /// `gelu(gate) * up`, element-wise ([`ops::geglu_inplace`](crate::ops::geglu_inplace)).
    GeGlu {
        /// `[n, k]` gate projections.
        gate: &'a [f32],
        /// `[n, k]` up projections.
        up: &'a [f32],
    },
}

impl MatIn<'_> {
    /// Values over all rows (`n * k`).
    pub fn len(&self) -> usize {
        match self {
            MatIn::Rows(x) | MatIn::RmsNorm { x, .. } => x.len(),
            MatIn::SwiGlu { gate, up } | MatIn::GeGlu { gate, up } => gate.len().min(up.len()),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `t` of `k` values: the input's own, or made in `tmp` (`k` long).
    pub fn row<'b>(&'b self, t: usize, k: usize, tmp: &'b mut [f32]) -> &'b [f32] {
        let at = t * k..(t + 1) * k;
        match *self {
            MatIn::Rows(x) => &x[at],
            MatIn::RmsNorm { x, weight, eps } => {
                crate::ops::rms_norm(&x[at], weight, eps, tmp);
                tmp
            }
            MatIn::SwiGlu { gate, up } => {
                tmp.copy_from_slice(&gate[at.clone()]);
                crate::ops::swiglu_inplace(tmp, &up[at]);
                tmp
            }
            MatIn::GeGlu { gate, up } => {
                tmp.copy_from_slice(&gate[at.clone()]);
                crate::ops::geglu_inplace(tmp, &up[at]);
                tmp
            }
        }
    }
}

/// One matrix of a [`Backend::matmul_group`] and where its product goes.
pub struct MatOut<'a> {
    /// The weight, `[cols, rows]`.
    pub w: &'a QTensor,
    /// The product, `[n, w.rows()]`.
    pub y: &'a mut [f32],
}

/// Buffers a backend needs for one forward pass, sized once at load.
#[derive(Default)]
pub struct Workspace {
    /// Activations quantized for the integer dot products.
    pub(crate) act: Vec<u8>,
    /// Per-block activation metadata of the tiled products.
    pub(crate) meta: Vec<u8>,
    /// Per-thread weight panels of the tiled products.
    pub(crate) panels: Vec<u8>,
    /// Per-thread results of the tiled products (tokens × panel rows).
    pub(crate) tile_out: Vec<f32>,
    /// Attention scratch per thread (sized at the first call).
    pub(crate) attn: Vec<f32>,
    /// Attention work items of the current call.
    pub(crate) attn_items: Vec<cpu::attention::Item>,
    /// One input row per thread, made by a [`MatIn`] step.
    pub(crate) rows: Vec<f32>,
    pub(crate) max_ctx: usize,
}

/// The operations a model needs from a device.
///
/// Matrix products and attention carry the cost and every backend writes its
/// own. The element-wise steps between them have host implementations here
/// that the CPU and reference backends use as they are; a device backend
/// replaces them all, so that the decoder trunk (`models/trunk.rs`) calls
/// nothing but this trait.
pub trait Backend: Send + Sync {
    /// A short name ("cpu").
    fn name(&self) -> &'static str;

    /// Threads (or streams) the backend runs on.
    fn threads(&self) -> usize;

    /// A workspace for batches of up to `max_tokens` rows of at most `max_cols`
    /// elements, attending over at most `max_ctx` positions.
    fn workspace(&self, max_tokens: usize, max_cols: usize, max_ctx: usize) -> Workspace;

    /// `y[t][r] = w.row(r) · x[t]` for `t < n`: x is `[n, w.cols()]`, y is `[n, w.rows()]`.
    fn matmul(&self, w: &QTensor, x: &[f32], n: usize, y: &mut [f32], ws: &mut Workspace) {
        self.matmul_group_in(MatIn::Rows(x), n, &mut [MatOut { w, y }], ws);
    }

    /// [`Backend::matmul`] of rows an element-wise step makes on the way in.
    fn matmul_in(&self, w: &QTensor, x: MatIn<'_>, n: usize, y: &mut [f32], ws: &mut Workspace) {
        self.matmul_group_in(x, n, &mut [MatOut { w, y }], ws);
    }

    /// Several matrices applied to the same input (Q, K and V; gate and up): the
    /// input is quantized once per format and all their rows are shared out in
    /// one pass, instead of one synchronisation per matrix.
    fn matmul_group(&self, x: &[f32], n: usize, outs: &mut [MatOut<'_>], ws: &mut Workspace) {
        self.matmul_group_in(MatIn::Rows(x), n, outs, ws);
    }

    /// `y[t][r] += w.row(r) · x[t]`: a product added into the residual
    /// stream where it is made, instead of stored and added in a pass of
    /// its own (the same bits as that pass).
    fn matmul_add_in(&self, w: &QTensor, x: MatIn<'_>, n: usize, y: &mut [f32], ws: &mut Workspace);

    /// [`Backend::matmul_group`] of rows an element-wise step makes on the way in.
    fn matmul_group_in(&self, x: MatIn<'_>, n: usize, outs: &mut [MatOut<'_>], ws: &mut Workspace);

    /// Runs `f` on contiguous ranges that together cover `0..n` once, one per
    /// thread where the backend has several; by default `f(0..n)` here.
    fn for_ranges(&self, n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        f(0..n)
    }

    /// `x[r] = scale · w.row(ids[r])`: token embedding rows, `x` is
    /// `[ids.len(), w.cols()]`.
    fn embed_rows(&self, w: &QTensor, ids: &[u32], scale: Option<f32>, x: &mut [f32]) {
        for (&id, xr) in ids.iter().zip(x.chunks_exact_mut(w.cols())) {
            cpu::dequantize_row(w, id as usize, xr);
            if let Some(scale) = scale {
                ops::scale_inplace(xr, scale);
            }
        }
    }

    /// Copies `n` rows of `d` values from `src` (starting at row `from`) into
    /// `dst` (starting at row `to`): given embedding rows, the rows that want logits.
    fn copy_rows(&self, src: &[f32], from: usize, dst: &mut [f32], to: usize, n: usize, d: usize) {
        dst[to * d..(to + n) * d].copy_from_slice(&src[from * d..(from + n) * d]);
    }

    /// `x[r] += bias` for every `bias.len()`-wide row of `x`.
    fn add_bias(&self, x: &mut [f32], bias: &[f32]) {
        ops::add_bias_rows(x, bias);
    }

    /// Rotates every head of the rows of `q` (`[n, qd]`) and `k` (`[n, kvd]`),
    /// row `r` by `angles[r * half..][..half]` (cos, sin) over the first
    /// `2 * half` elements of each `head_dim`-wide head, paired as `style`
    /// says; each head is RMS-normalised first where `norms` are given.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        q: &mut [f32],
        k: &mut [f32],
        (qd, kvd): (usize, usize),
        head_dim: usize,
        style: RopeStyle,
        angles: &[(f32, f32)],
        half: usize,
        norms: Option<HeadNorms<'_>>,
    ) {
        par_rows2(self.as_dyn(), (q, qd), (k, kvd), &|r0, q, k| {
            let rows = q.chunks_exact_mut(qd).zip(k.chunks_exact_mut(kvd));
            for (r, (qr, kr)) in (r0..).zip(rows) {
                if let Some(n) = norms {
                    ops::rms_norm_inplace(qr, n.q, n.eps);
                    ops::rms_norm_inplace(kr, n.k, n.eps);
                }
                let cs = &angles[r * half..(r + 1) * half];
                ops::rope_apply(qr, head_dim, style, cs);
                ops::rope_apply(kr, head_dim, style, cs);
            }
        });
    }

    /// Stores the batch's keys and values (`[tokens, n_kv_heads * head_dim]`,
    /// sequences in order) in `layer` of the cache, each token at its
    /// sequence's next position.
    fn kv_write(&self, kv: &mut KvCache, layer: usize, seqs: &[AttnSeq<'_>], k: &[f32], v: &[f32]) {
        let w = kv.layout().n_kv_heads * kv.layout().head_dim;
        let mut row = 0;
        for s in seqs {
            for i in 0..s.n_tokens {
                let (kr, vr) = (&k[row * w..(row + 1) * w], &v[row * w..(row + 1) * w]);
                kv.write(layer, s.table, s.start_pos + i, kr, vr);
                row += 1;
            }
        }
    }

    /// RMSNorm in place of every `weight.len()`-wide row of `x`.
    fn rms_norm(&self, x: &mut [f32], weight: &[f32], eps: f32) {
        ops::rms_norm_inplace(x, weight, eps);
    }

    /// `x += rms_norm(y)` row by row (a block's output normalised before the
    /// residual add); `y` is left normalised.
    fn norm_add(&self, x: &mut [f32], y: &mut [f32], weight: &[f32], eps: f32) {
        par_chunks(self.as_dyn(), y, weight.len(), &|_, r| {
            ops::rms_norm_inplace(r, weight, eps)
        });
        ops::add_inplace(x, y);
    }

    /// `cap · tanh(x / cap)` element-wise (logit soft-capping).
    fn softcap(&self, x: &mut [f32], cap: f32) {
        ops::softcap_inplace(x, cap);
    }

    /// [`Backend::matmul`] for large batches of F32, F16 or BF16 weights (a
    /// vision encoder's projections over every patch of an image): the
    /// backend may use f32 arithmetic blocked for the batch, whose bits depend
    /// on the batch's size (the text decoder never calls it).
    fn matmul_dense(&self, w: &QTensor, x: &[f32], n: usize, y: &mut [f32], ws: &mut Workspace) {
        self.matmul(w, x, n, y, ws);
    }

    /// LayerNorm in place of every `weight.len()`-wide row of `x` (vision encoders).
    fn layer_norm(&self, x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        par_chunks(self.as_dyn(), x, weight.len(), &|_, r| {
            ops::layer_norm_inplace(r, weight, bias, eps)
        });
    }

    /// An activation in place, element-wise.
    fn activate(&self, x: &mut [f32], act: Activation) {
        let f = match act {
            Activation::GeluErf => ops::gelu_erf,
            Activation::QuickGelu => ops::quick_gelu,
        };
        par_chunks(self.as_dyn(), x, 1, &|_, r| {
            r.iter_mut().for_each(|v| *v = f(*v))
        });
    }

    /// Bidirectional attention inside segments (the patches of one image, or
    /// one window of them): `q`, `k` and `v` are `[n, n_heads * head_dim]`,
    /// and row `i` of segment `s` attends to every row of `s`. The result
    /// goes to `out` (`[n, n_heads * head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attention_segments(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (n_heads, head_dim): (usize, usize),
        scale: f32,
        segments: &[std::ops::Range<usize>],
        out: &mut [f32],
    ) {
        let w = n_heads * head_dim;
        par_chunks(self.as_dyn(), out, w, &|off, rows| {
            let mut scores = Vec::new();
            for (i, o) in (off / w..).zip(rows.chunks_exact_mut(w)) {
                let seg = segments
                    .iter()
                    .find(|s| s.contains(&i))
                    .expect("segments cover every row");
                ops::attend_row(
                    &q[i * w..(i + 1) * w],
                    (
                        &k[seg.start * w..seg.end * w],
                        &v[seg.start * w..seg.end * w],
                    ),
                    (n_heads, head_dim),
                    scale,
                    &mut scores,
                    o,
                );
            }
        });
    }

    /// This backend as a trait object (for the helpers that spread work).
    fn as_dyn(&self) -> &dyn Backend;

    /// Causal attention of the batch's queries `q` (`[tokens, n_heads * head_dim]`,
    /// sequences in order) over the cache, whose K/V for these tokens are already
    /// written; the result goes to `out` (same shape as `q`).
    fn attention(
        &self,
        p: &AttnParams,
        q: &[f32],
        kv: &KvCache,
        seqs: &[AttnSeq<'_>],
        out: &mut [f32],
        ws: &mut Workspace,
    );
}

/// An element-wise activation ([`Backend::activate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// [`ops::gelu_erf`].
    GeluErf,
    /// [`ops::quick_gelu`].
    QuickGelu,
}

/// Fewest elements worth spreading an element-wise operation over threads.
const PAR_MIN_LEN: usize = 2048;

/// A pointer that threads share to write disjoint parts of one slice.
#[derive(Clone, Copy)]
struct Disjoint(*mut f32);
// SAFETY: `par_chunks` and `par_rows2` hand each thread a range no other
// thread touches.
unsafe impl Send for Disjoint {}
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// The pointer (a method, so that closures capture the whole wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `f(offset, chunk)` over disjoint chunks of `a` that together cover it, each
/// a whole number of `unit`-long rows, spread over `be`'s threads (small
/// slices stay on the calling thread): element-wise work between the matrix
/// products.
///
/// # Panics
/// If `unit` is 0 or does not divide `a.len()`.
pub fn par_chunks(
    be: &dyn Backend,
    a: &mut [f32],
    unit: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    assert!(unit > 0 && a.len().is_multiple_of(unit), "par_chunks: unit");
    let units = a.len() / unit;
    if a.len() < PAR_MIN_LEN || units < 2 || be.threads() < 2 {
        return f(0, a);
    }
    let p = Disjoint(a.as_mut_ptr());
    be.for_ranges(units, &|r| {
        if r.is_empty() {
            return;
        }
        // SAFETY: the ranges are disjoint and within `a`, which stays borrowed
        // mutably until every thread is done.
        let chunk =
            unsafe { std::slice::from_raw_parts_mut(p.get().add(r.start * unit), r.len() * unit) };
        f(r.start * unit, chunk)
    });
}

/// What [`par_rows2`] runs: the first row's index and the rows of each buffer.
pub type RowsFn<'a> = dyn Fn(usize, &mut [f32], &mut [f32]) + Sync + 'a;

/// `f(row, a_rows, b_rows)` over rows of two buffers with as many rows each
/// (`a` of `a_width`, `b` of `b_width`), the same rows of both on one
/// thread: one pass and one synchronisation for both (queries and keys).
///
/// # Panics
/// If a width is 0 or the buffers do not have the same number of rows.
pub fn par_rows2(
    be: &dyn Backend,
    (a, a_width): (&mut [f32], usize),
    (b, b_width): (&mut [f32], usize),
    f: &RowsFn<'_>,
) {
    assert!(a_width > 0 && b_width > 0, "par_rows2: width");
    let rows = a.len() / a_width;
    assert!(
        a.len() == rows * a_width && b.len() == rows * b_width,
        "par_rows2: row counts"
    );
    if a.len() + b.len() < PAR_MIN_LEN || rows < 2 || be.threads() < 2 {
        return f(0, a, b);
    }
    let (pa, pb) = (Disjoint(a.as_mut_ptr()), Disjoint(b.as_mut_ptr()));
    be.for_ranges(rows, &|r| {
        if r.is_empty() {
            return;
        }
        // SAFETY: the ranges are disjoint rows of `a` and `b`, which stay
        // borrowed mutably until every thread is done.
        let (ra, rb) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.get().add(r.start * a_width), r.len() * a_width),
                std::slice::from_raw_parts_mut(pb.get().add(r.start * b_width), r.len() * b_width),
            )
        };
        f(r.start, ra, rb)
    });
}

/// Which backend to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The CPU, with the best SIMD path the processor supports.
    #[default]
    Cpu,
    /// The scalar reference of every operation, one thread: the oracle.
    Reference,
    /// NVIDIA GPUs through CUDA.
    Cuda,
    /// GPUs through Vulkan compute.
    Vulkan,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "reference" => Ok(Self::Reference),
            "cuda" => Ok(Self::Cuda),
            "vulkan" => Ok(Self::Vulkan),
            other => Err(Error::InvalidRequest(format!(
                "unknown backend '{other}' (cpu, reference, cuda, vulkan)"
            ))),
        }
    }
}

/// Creates a backend; `threads` of 0 means one per available core.
pub fn create(kind: BackendKind, threads: usize) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(cpu::CpuBackend::new(threads))),
        BackendKind::Reference => Ok(Box::new(reference::ReferenceBackend)),
        BackendKind::Cuda => Err(Error::NotCompiled("cuda")),
        BackendKind::Vulkan => Err(Error::NotCompiled("vulkan")),
    }
}
