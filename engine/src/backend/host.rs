//! Host backends (CPU, reference): the operations on host slices, and the
//! one [`Backend`] implementation every host backend shares, which opens
//! the handles and calls them.
//!
//! A host backend implements [`HostBackend`]: the matrix products and
//! attention it must write, and element-wise steps it may replace. The
//! memory operations, the handle checks and the steps no host backend
//! speeds up (copies, rotary angles, residual adds) are written once here.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::memory::{Buf, Weight, Workspace};
use crate::backend::{Activation, AttnParams, AttnSeq, Backend, HeadNorms, MatIn, MatOut};
use crate::kv_cache::{KvCache, KvLayout};
use crate::ops::{self, RopeSpec, RopeStyle};
use crate::tensor::QTensor;
use crate::Result;

use super::cpu;

/// RMSNorm weights of each query and key head, as host slices.
#[derive(Clone, Copy, Debug)]
pub struct HostNorms<'a> {
    /// Query head norm, `[head_dim]`.
    pub q: &'a [f32],
    /// Key head norm, `[head_dim]`.
    pub k: &'a [f32],
    /// Added to the mean square.
    pub eps: f32,
}

/// The input rows of a [`HostBackend::matmul_group_in`]: as they are, or made
/// by an element-wise step on their way into the activation quantize, where
/// the step costs no pass over the batch and no synchronisation of its own.
#[derive(Clone, Copy, Debug)]
pub enum HostIn<'a> {
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

impl HostIn<'_> {
    /// Values over all rows (`n * k`).
    pub fn len(&self) -> usize {
        match self {
            HostIn::Rows(x) | HostIn::RmsNorm { x, .. } => x.len(),
            HostIn::SwiGlu { gate, up } | HostIn::GeGlu { gate, up } => gate.len().min(up.len()),
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
            HostIn::Rows(x) => &x[at],
            HostIn::RmsNorm { x, weight, eps } => {
                crate::ops::rms_norm(&x[at], weight, eps, tmp);
                tmp
            }
            HostIn::SwiGlu { gate, up } => {
                tmp.copy_from_slice(&gate[at.clone()]);
                crate::ops::swiglu_inplace(tmp, &up[at]);
                tmp
            }
            HostIn::GeGlu { gate, up } => {
                tmp.copy_from_slice(&gate[at.clone()]);
                crate::ops::geglu_inplace(tmp, &up[at]);
                tmp
            }
        }
    }
}

/// One matrix of a [`HostBackend::matmul_group`] and where its product goes.
pub struct HostOut<'a> {
    /// The weight, `[cols, rows]`.
    pub w: &'a QTensor,
    /// The product, `[n, w.rows()]`.
    pub y: &'a mut [f32],
}

/// The scratch of a host backend for one model's forward passes, sized once at load.
#[derive(Default)]
pub struct HostWorkspace {
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
    /// One input row per thread, made by a [`HostIn`] step.
    pub(crate) rows: Vec<f32>,
    pub(crate) max_ctx: usize,
}

/// The operations of a backend on host memory.
///
/// Matrix products and attention carry the cost and every host backend
/// writes its own; the element-wise steps between them have
/// implementations here that a backend may replace.
pub trait HostBackend: Send + Sync {
    /// A short name ("cpu").
    fn name(&self) -> &'static str;

    /// Threads (or streams) the backend runs on.
    fn threads(&self) -> usize;

    /// A workspace for batches of up to `max_tokens` rows of at most `max_cols`
    /// elements, attending over at most `max_ctx` positions.
    fn workspace(&self, max_tokens: usize, max_cols: usize, max_ctx: usize) -> HostWorkspace;

    /// Where the bytes of weights and KV read by this backend's operations
    /// are counted ([`Backend::bytes_read`]); none for a backend that does
    /// not count.
    fn traffic(&self) -> Option<&AtomicU64> {
        None
    }

    /// `y[t][r] = w.row(r) · x[t]` for `t < n`: x is `[n, w.cols()]`, y is `[n, w.rows()]`.
    fn matmul(&self, w: &QTensor, x: &[f32], n: usize, y: &mut [f32], ws: &mut HostWorkspace) {
        self.matmul_group_in(HostIn::Rows(x), n, &mut [HostOut { w, y }], ws);
    }

    /// [`HostBackend::matmul`] of rows an element-wise step makes on the way in.
    fn matmul_in(
        &self,
        w: &QTensor,
        x: HostIn<'_>,
        n: usize,
        y: &mut [f32],
        ws: &mut HostWorkspace,
    ) {
        self.matmul_group_in(x, n, &mut [HostOut { w, y }], ws);
    }

    /// Several matrices applied to the same input (Q, K and V; gate and up): the
    /// input is quantized once per format and all their rows are shared out in
    /// one pass, instead of one synchronisation per matrix.
    fn matmul_group(&self, x: &[f32], n: usize, outs: &mut [HostOut<'_>], ws: &mut HostWorkspace) {
        self.matmul_group_in(HostIn::Rows(x), n, outs, ws);
    }

    /// `y[t][r] += w.row(r) · x[t]`: a product added into the residual
    /// stream where it is made, instead of stored and added in a pass of
    /// its own (the same bits as that pass).
    fn matmul_add_in(
        &self,
        w: &QTensor,
        x: HostIn<'_>,
        n: usize,
        y: &mut [f32],
        ws: &mut HostWorkspace,
    );

    /// [`HostBackend::matmul_group`] of rows an element-wise step makes on the way in.
    fn matmul_group_in(
        &self,
        x: HostIn<'_>,
        n: usize,
        outs: &mut [HostOut<'_>],
        ws: &mut HostWorkspace,
    );

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
        angles: &[[f32; 2]],
        half: usize,
        norms: Option<HostNorms<'_>>,
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

    /// [`HostBackend::matmul`] for large batches of F32, F16 or BF16 weights (a
    /// vision encoder's projections over every patch of an image): the
    /// backend may use f32 arithmetic blocked for the batch, whose bits depend
    /// on the batch's size (the text decoder never calls it).
    fn matmul_dense(
        &self,
        w: &QTensor,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        ws: &mut HostWorkspace,
    ) {
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
    fn as_dyn(&self) -> &dyn HostBackend;

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
        ws: &mut HostWorkspace,
    );
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
    be: &dyn HostBackend,
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
    be: &dyn HostBackend,
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

/// A host backend's scratch inside a [`Workspace`].
///
/// # Panics
/// If another backend made the workspace.
fn scratch(ws: &mut Workspace) -> &mut HostWorkspace {
    ws.get_mut()
        .expect("a workspace made by another backend given to a host backend")
}

/// The host rows of a [`MatIn`]: its first `n` rows of `k` values.
fn host_in(x: MatIn<'_>, n: usize, k: usize) -> HostIn<'_> {
    fn rows(b: &Buf, len: usize) -> &[f32] {
        &b.values()[..len]
    }
    let len = n * k;
    match x {
        MatIn::Rows(x) => HostIn::Rows(rows(x, len)),
        MatIn::RmsNorm { x, weight, eps } => HostIn::RmsNorm {
            x: rows(x, len),
            weight: weight.values(),
            eps,
        },
        MatIn::SwiGlu { gate, up } => HostIn::SwiGlu {
            gate: rows(gate, len),
            up: rows(up, len),
        },
        MatIn::GeGlu { gate, up } => HostIn::GeGlu {
            gate: rows(gate, len),
            up: rows(up, len),
        },
    }
}

/// Calls `f` with the host view of each output's first `n` rows, without
/// allocating for the groups the models make (up to four matrices).
fn with_host_outs<R>(
    outs: &mut [MatOut<'_>],
    n: usize,
    f: impl FnOnce(&mut [HostOut<'_>]) -> R,
) -> R {
    let len = outs.len();
    let mut host = outs.iter_mut().map(|o| HostOut {
        w: o.w.tensor(),
        y: &mut o.y.values_mut()[..n * o.w.rows()],
    });
    let mut next = || host.next().expect("one view per output");
    match len {
        1 => f(&mut [next()]),
        2 => f(&mut [next(), next()]),
        3 => f(&mut [next(), next(), next()]),
        4 => f(&mut [next(), next(), next(), next()]),
        _ => f(&mut host.collect::<Vec<_>>()),
    }
}

/// Every host backend's [`Backend`]: the handles opened to their values,
/// and the operations called on the rows each one names.
/// Adds `bytes` to the backend's count of bytes read, where it counts.
fn count<T: HostBackend + ?Sized>(b: &T, bytes: usize) {
    if let Some(t) = b.traffic() {
        t.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl<T: HostBackend> Backend for T {
    fn name(&self) -> &'static str {
        HostBackend::name(self)
    }

    fn bytes_read(&self) -> u64 {
        self.traffic().map_or(0, |t| t.load(Ordering::Relaxed))
    }

    fn threads(&self) -> usize {
        HostBackend::threads(self)
    }

    fn alloc(&self, len: usize) -> Result<Buf> {
        Ok(Buf::host(vec![0.0; len]))
    }

    fn upload(&self, values: Vec<f32>) -> Result<Buf> {
        Ok(Buf::host(values))
    }

    fn weight(&self, t: QTensor) -> Result<Weight> {
        // The loader's bytes (a resident copy or the mapped file) are the
        // memory the kernels read.
        Ok(Weight::host(t))
    }

    fn write(&self, dst: &mut Buf, at: usize, values: &[f32]) {
        dst.values_mut()[at..at + values.len()].copy_from_slice(values);
    }

    fn read(&self, src: &Buf, at: usize, out: &mut [f32]) {
        out.copy_from_slice(&src.values()[at..at + out.len()]);
    }

    fn kv_cache(
        &self,
        layout: KvLayout,
        n_blocks: usize,
        n_window_blocks: usize,
    ) -> Result<KvCache> {
        layout.check()?;
        Ok(KvCache::with_window_blocks(
            layout,
            n_blocks,
            n_window_blocks,
        ))
    }

    fn workspace(&self, max_tokens: usize, max_cols: usize, max_ctx: usize) -> Workspace {
        Workspace::new(HostBackend::workspace(self, max_tokens, max_cols, max_ctx))
    }

    fn embed_rows(&self, w: &Weight, ids: &[u32], scale: Option<f32>, x: &mut Buf, row: usize) {
        let d = w.cols();
        let x = &mut x.values_mut()[row * d..(row + ids.len()) * d];
        count(self, ids.len() * w.tensor().row_bytes());
        HostBackend::embed_rows(self, w.tensor(), ids, scale, x);
    }

    fn copy_rows(&self, src: &Buf, from: usize, dst: &mut Buf, to: usize, n: usize, d: usize) {
        dst.values_mut()[to * d..(to + n) * d]
            .copy_from_slice(&src.values()[from * d..(from + n) * d]);
    }

    fn matmul_group_in(&self, x: MatIn<'_>, n: usize, outs: &mut [MatOut<'_>], ws: &mut Workspace) {
        let Some(k) = outs.first().map(|o| o.w.cols()) else {
            return;
        };
        count(self, outs.iter().map(|o| o.w.tensor().data.len()).sum());
        let x = host_in(x, n, k);
        with_host_outs(outs, n, |outs| {
            HostBackend::matmul_group_in(self, x, n, outs, scratch(ws))
        });
    }

    fn matmul_add_in(&self, w: &Weight, x: MatIn<'_>, n: usize, y: &mut Buf, ws: &mut Workspace) {
        let x = host_in(x, n, w.cols());
        let y = &mut y.values_mut()[..n * w.rows()];
        count(self, w.tensor().data.len());
        HostBackend::matmul_add_in(self, w.tensor(), x, n, y, scratch(ws));
    }

    fn add_bias(&self, x: &mut Buf, n: usize, bias: &Buf) {
        let x = &mut x.values_mut()[..n * bias.len()];
        HostBackend::add_bias(self, x, bias.values());
    }

    fn rope_angles(&self, rope: &RopeSpec, pos: &[[u32; 3]], out: &mut Buf) {
        let half = rope.dim / 2;
        if half == 0 {
            return;
        }
        let (pairs, _) = out.values_mut()[..pos.len() * half * 2].as_chunks_mut::<2>();
        for (&p, cs) in pos.iter().zip(pairs.chunks_exact_mut(half)) {
            rope.angles(p, cs);
        }
    }

    fn rope_qk(
        &self,
        q: &mut Buf,
        k: &mut Buf,
        n: usize,
        (qd, kvd): (usize, usize),
        head_dim: usize,
        style: RopeStyle,
        (angles, half): (&Buf, usize),
        norms: Option<HeadNorms<'_>>,
    ) {
        let (cs, _) = angles.values()[..n * half * 2].as_chunks::<2>();
        let norms = norms.map(|h| HostNorms {
            q: h.q.values(),
            k: h.k.values(),
            eps: h.eps,
        });
        HostBackend::rope_qk(
            self,
            &mut q.values_mut()[..n * qd],
            &mut k.values_mut()[..n * kvd],
            (qd, kvd),
            head_dim,
            style,
            cs,
            half,
            norms,
        );
    }

    fn kv_write(&self, kv: &mut KvCache, layer: usize, seqs: &[AttnSeq<'_>], k: &Buf, v: &Buf) {
        HostBackend::kv_write(self, kv, layer, seqs, k.values(), v.values());
    }

    fn attention(
        &self,
        p: &AttnParams,
        q: &Buf,
        kv: &KvCache,
        seqs: &[AttnSeq<'_>],
        out: &mut Buf,
        ws: &mut Workspace,
    ) {
        let len = seqs.iter().map(|s| s.n_tokens).sum::<usize>() * p.n_heads * p.head_dim;
        let (q, out) = (&q.values()[..len], &mut out.values_mut()[..len]);
        // Each sequence's visible keys and values, read once.
        let visible = |s: &AttnSeq<'_>| {
            let end = s.start_pos + s.n_tokens;
            p.window.map_or(end, |w| end.min(w))
        };
        let per_position = 2 * p.n_kv_heads * kv.layout().row_bytes();
        count(self, seqs.iter().map(visible).sum::<usize>() * per_position);
        HostBackend::attention(self, p, q, kv, seqs, out, scratch(ws));
    }

    fn rms_norm(&self, x: &mut Buf, n: usize, weight: &Buf, eps: f32) {
        let x = &mut x.values_mut()[..n * weight.len()];
        HostBackend::rms_norm(self, x, weight.values(), eps);
    }

    fn norm_add(&self, x: &mut Buf, y: &mut Buf, n: usize, weight: &Buf, eps: f32) {
        let len = n * weight.len();
        let (x, y) = (&mut x.values_mut()[..len], &mut y.values_mut()[..len]);
        HostBackend::norm_add(self, x, y, weight.values(), eps);
    }

    fn logits(
        &self,
        w: &Weight,
        x: &Buf,
        n: usize,
        softcap: Option<f32>,
        out: &mut [f32],
        ws: &mut Workspace,
    ) {
        let out = &mut out[..n * w.rows()];
        let x = &x.values()[..n * w.cols()];
        count(self, w.tensor().data.len());
        HostBackend::matmul(self, w.tensor(), x, n, out, scratch(ws));
        if let Some(cap) = softcap {
            HostBackend::softcap(self, out, cap);
        }
    }

    fn matmul_dense(&self, w: &Weight, x: &Buf, n: usize, y: &mut Buf, ws: &mut Workspace) {
        let x = &x.values()[..n * w.cols()];
        let y = &mut y.values_mut()[..n * w.rows()];
        HostBackend::matmul_dense(self, w.tensor(), x, n, y, scratch(ws));
    }

    fn layer_norm(&self, x: &mut Buf, n: usize, weight: &Buf, bias: &Buf, eps: f32) {
        let x = &mut x.values_mut()[..n * weight.len()];
        HostBackend::layer_norm(self, x, weight.values(), bias.values(), eps);
    }

    fn activate(&self, x: &mut Buf, len: usize, act: Activation) {
        HostBackend::activate(self, &mut x.values_mut()[..len], act);
    }

    fn swiglu(&self, gate: &mut Buf, up: &Buf, len: usize) {
        ops::swiglu_inplace(&mut gate.values_mut()[..len], &up.values()[..len]);
    }

    fn add(&self, x: &mut Buf, y: &Buf, len: usize) {
        ops::add_inplace(&mut x.values_mut()[..len], &y.values()[..len]);
    }

    fn attention_segments(
        &self,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        heads: (usize, usize),
        scale: f32,
        segments: &[std::ops::Range<usize>],
        out: &mut Buf,
    ) {
        let len = segments.iter().map(|s| s.end).max().unwrap_or(0) * heads.0 * heads.1;
        let (q, k, v) = (&q.values()[..len], &k.values()[..len], &v.values()[..len]);
        let out = &mut out.values_mut()[..len];
        HostBackend::attention_segments(self, q, k, v, heads, scale, segments, out);
    }
}
