//! Compute backends behind one trait.
//!
//! The model code calls every operation of its forward (matrix products
//! over stacked token rows, attention through block tables, the element-wise
//! steps between them) through [`Backend`], on memory the backend owns; each
//! backend decides how to run them. The CPU backend is always built; GPU backends are
//! cargo features, and asking for one that is not compiled in gives
//! [`Error::NotCompiled`](crate::Error::NotCompiled).

pub mod cpu;
pub mod host;
pub mod memory;
pub mod reference;
#[cfg(feature = "vulkan")]
pub mod vulkan;

pub use memory::{Buf, Weight, Workspace};

use crate::kv_cache::{BlockTable, KvCache, KvLayout};
use crate::ops::{RopeSpec, RopeStyle};
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
    pub q: &'a Buf,
    /// Key head norm, `[head_dim]`.
    pub k: &'a Buf,
    /// Added to the mean square.
    pub eps: f32,
}

/// The input rows of a [`Backend::matmul_group_in`]: as they are, or made
/// by an element-wise step on their way into the product, where the step
/// costs no pass over the batch and no synchronisation of its own.
#[derive(Clone, Copy, Debug)]
pub enum MatIn<'a> {
    /// `[n, k]` values (the buffer may hold more rows).
    Rows(&'a Buf),
    /// [`ops::rms_norm`](crate::ops::rms_norm) of each `[n, k]` row of `x`.
    RmsNorm {
        /// The rows to normalise.
        x: &'a Buf,
        /// The norm's weight (`k` values).
        weight: &'a Buf,
        /// Added to the mean square.
        eps: f32,
    },
    /// `silu(gate) * up`, element-wise ([`ops::swiglu_inplace`](crate::ops::swiglu_inplace)).
    SwiGlu {
        /// `[n, k]` gate projections.
        gate: &'a Buf,
        /// `[n, k]` up projections.
        up: &'a Buf,
    },
    /// `gelu(gate) * up`, element-wise ([`ops::geglu_inplace`](crate::ops::geglu_inplace)).
    GeGlu {
        /// `[n, k]` gate projections.
        gate: &'a Buf,
        /// `[n, k]` up projections.
        up: &'a Buf,
    },
}

/// One matrix of a [`Backend::matmul_group_in`] and where its product goes.
pub struct MatOut<'a> {
    /// The weight, `rows` rows of `cols` values.
    pub w: &'a Weight,
    /// The product, `[n, w.rows()]` (the buffer may hold more rows).
    pub y: &'a mut Buf,
}

/// The operations a model needs from a device, over memory the device owns.
///
/// A model holds [`Buf`]s and [`Weight`]s the backend made and passes them
/// here; it never reads their values, so the same forward runs on host
/// memory and on a GPU's. Host data crosses only where it is the batch's
/// own (token ids, position ids, given embedding rows: [`Backend::write`],
/// [`Backend::embed_rows`], [`Backend::rope_angles`]) or its result
/// ([`Backend::logits`], [`Backend::read`]).
///
/// Shapes are in rows: an operation on `n` rows of width `w` reads and
/// writes the first `n * w` values of buffers that may be longer (sized
/// for the largest batch). Host backends implement
/// [`HostBackend`](host::HostBackend) and get this trait from it.
pub trait Backend: Send + Sync {
    /// A short name ("cpu").
    fn name(&self) -> &'static str;

    /// Threads (or streams) the backend runs on.
    fn threads(&self) -> usize;

    /// The backend and, for a device backend, the device it runs on
    /// ("vulkan: NVIDIA Orin"), for status and logs.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// Bytes of weights and KV cache the backend's operations have read since
    /// it was made (each weight matrix once per product, each sequence's
    /// visible KV once per attention); 0 where the backend does not count.
    /// Decode's bytes per token, against the machine's bandwidth, say how
    /// close to the memory wall it runs.
    fn bytes_read(&self) -> u64 {
        0
    }

    /// Whether the device failed (a lost GPU): nothing more runs on this
    /// backend, and a fresh one must be made.
    fn is_lost(&self) -> bool {
        false
    }

    /// A buffer of `len` zeros.
    fn alloc(&self, len: usize) -> Result<Buf>;

    /// A buffer holding `values` (norm weights, biases, angle tables).
    fn upload(&self, values: Vec<f32>) -> Result<Buf>;

    /// A weight matrix in the backend's memory, uploaded once at load.
    fn weight(&self, t: QTensor) -> Result<Weight>;

    /// Host values into `dst` from element `at`.
    fn write(&self, dst: &mut Buf, at: usize, values: &[f32]);

    /// `out.len()` values of `src` from element `at` to the host.
    fn read(&self, src: &Buf, at: usize, out: &mut [f32]);

    /// A KV cache in the backend's memory: `n_blocks` main-pool blocks and
    /// `n_window_blocks` for the sliding layers (see [`KvCache::with_window_blocks`]).
    fn kv_cache(
        &self,
        layout: KvLayout,
        n_blocks: usize,
        n_window_blocks: usize,
    ) -> Result<KvCache>;

    /// Scratch for batches of up to `max_tokens` rows of at most `max_cols`
    /// values, attending over at most `max_ctx` positions.
    fn workspace(&self, max_tokens: usize, max_cols: usize, max_ctx: usize) -> Workspace;

    /// `x[row + r] = scale · w.row(ids[r])`: token embedding rows into the
    /// `w.cols()`-wide rows of `x` from row `row` on.
    fn embed_rows(&self, w: &Weight, ids: &[u32], scale: Option<f32>, x: &mut Buf, row: usize);

    /// Copies `n` rows of `d` values from `src` (from row `from`) into `dst`
    /// (from row `to`): the rows that want logits, a residual stream.
    fn copy_rows(&self, src: &Buf, from: usize, dst: &mut Buf, to: usize, n: usize, d: usize);

    /// Several matrices of the same input width applied to the same `n`
    /// input rows (Q, K and V; gate and up), in one pass:
    /// `outs[j].y[t][r] = outs[j].w.row(r) · x[t]`.
    fn matmul_group_in(&self, x: MatIn<'_>, n: usize, outs: &mut [MatOut<'_>], ws: &mut Workspace);

    /// `y[t][r] += w.row(r) · x[t]` for `t < n`: a product added into the
    /// residual stream where it is made (the same bits as a product stored
    /// and added after).
    fn matmul_add_in(&self, w: &Weight, x: MatIn<'_>, n: usize, y: &mut Buf, ws: &mut Workspace);

    /// `y[t][r] = w.row(r) · x[t]` for `t < n`.
    fn matmul(&self, w: &Weight, x: &Buf, n: usize, y: &mut Buf, ws: &mut Workspace) {
        self.matmul_group_in(MatIn::Rows(x), n, &mut [MatOut { w, y }], ws);
    }

    /// [`Backend::matmul`] of rows an element-wise step makes on the way in.
    fn matmul_in(&self, w: &Weight, x: MatIn<'_>, n: usize, y: &mut Buf, ws: &mut Workspace) {
        self.matmul_group_in(x, n, &mut [MatOut { w, y }], ws);
    }

    /// `x[r] += bias` for the first `n` rows of `x`, `bias.len()` wide.
    fn add_bias(&self, x: &mut Buf, n: usize, bias: &Buf);

    /// The (cos, sin) of every rotary pair of `rope` at each row's position
    /// ids, into `out` (`[pos.len(), rope.dim / 2, 2]`).
    fn rope_angles(&self, rope: &RopeSpec, pos: &[[u32; 3]], out: &mut Buf);

    /// Rotates every head of the first `n` rows of `q` and `k` (`widths`:
    /// `qd` and `kvd` values), row `r` by the `half` pairs of row `r` of the
    /// table in `angles` (`(table, half)`, from
    /// [`Backend::rope_angles`]) over the first `2 * half` values of each
    /// `head_dim`-wide head, paired as `style` says; each head is
    /// RMS-normalised first where `norms` are given.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        q: &mut Buf,
        k: &mut Buf,
        n: usize,
        widths: (usize, usize),
        head_dim: usize,
        style: RopeStyle,
        angles: (&Buf, usize),
        norms: Option<HeadNorms<'_>>,
    );

    /// Stores the batch's keys and values (`[tokens, n_kv_heads * head_dim]`,
    /// sequences in order) in `layer` of the cache, each token at its
    /// sequence's next position.
    fn kv_write(&self, kv: &mut KvCache, layer: usize, seqs: &[AttnSeq<'_>], k: &Buf, v: &Buf);

    /// Causal attention of the batch's queries `q` (`[tokens, n_heads * head_dim]`,
    /// sequences in order) over the cache, whose K/V for these tokens are
    /// already written; the result goes to `out` (same shape as `q`).
    fn attention(
        &self,
        p: &AttnParams,
        q: &Buf,
        kv: &KvCache,
        seqs: &[AttnSeq<'_>],
        out: &mut Buf,
        ws: &mut Workspace,
    );

    /// RMSNorm in place of the first `n` rows of `x`, `weight.len()` wide.
    fn rms_norm(&self, x: &mut Buf, n: usize, weight: &Buf, eps: f32);

    /// `x += rms_norm(y)` over the first `n` rows (a block's output
    /// normalised before the residual add); `y` is left normalised.
    fn norm_add(&self, x: &mut Buf, y: &mut Buf, n: usize, weight: &Buf, eps: f32);

    /// The logits of the first `n` rows of `x` to the host:
    /// `out[t][r] = w.row(r) · x[t]`, then `cap · tanh(v / cap)` where
    /// `softcap` is given. `out` is `[n, w.rows()]`.
    fn logits(
        &self,
        w: &Weight,
        x: &Buf,
        n: usize,
        softcap: Option<f32>,
        out: &mut [f32],
        ws: &mut Workspace,
    );

    /// [`Backend::matmul`] for large batches of F32, F16 or BF16 weights (a
    /// vision encoder's projections over every patch of an image): the
    /// backend may use f32 arithmetic blocked for the batch, whose bits depend
    /// on the batch's size (the text decoder never calls it).
    fn matmul_dense(&self, w: &Weight, x: &Buf, n: usize, y: &mut Buf, ws: &mut Workspace);

    /// LayerNorm in place of the first `n` rows of `x`, `weight.len()` wide.
    fn layer_norm(&self, x: &mut Buf, n: usize, weight: &Buf, bias: &Buf, eps: f32);

    /// An activation in place on the first `len` values of `x`.
    fn activate(&self, x: &mut Buf, len: usize, act: Activation);

    /// `gate = silu(gate) * up` on the first `len` values.
    fn swiglu(&self, gate: &mut Buf, up: &Buf, len: usize);

    /// `x += y` on the first `len` values.
    fn add(&self, x: &mut Buf, y: &Buf, len: usize);

    /// Bidirectional attention inside segments (the patches of one image, or
    /// one window of them): `q`, `k` and `v` are `[n, n_heads * head_dim]`,
    /// and row `i` of segment `s` attends to every row of `s` (`heads` is
    /// `(n_heads, head_dim)`). The result
    /// goes to `out` (`[n, n_heads * head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attention_segments(
        &self,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        heads: (usize, usize),
        scale: f32,
        segments: &[std::ops::Range<usize>],
        out: &mut Buf,
    );
}

/// An element-wise activation ([`Backend::activate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// [`ops::gelu_erf`](crate::ops::gelu_erf).
    GeluErf,
    /// [`ops::quick_gelu`](crate::ops::quick_gelu).
    QuickGelu,
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

impl BackendKind {
    /// Whether the backend keeps the weights in a device's own memory, so
    /// the host needs them only while they are uploaded.
    pub fn on_device(self) -> bool {
        matches!(self, Self::Cuda | Self::Vulkan)
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Reference => "reference",
            Self::Cuda => "cuda",
            Self::Vulkan => "vulkan",
        })
    }
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

/// Creates a backend; `threads` of 0 means one per available core. A GPU
/// backend opens the device `device` names (an index or part of its name),
/// else the first GPU.
pub fn create(kind: BackendKind, threads: usize, device: Option<&str>) -> Result<Box<dyn Backend>> {
    #[cfg(not(feature = "vulkan"))]
    let _ = device;
    match kind {
        BackendKind::Cpu => Ok(Box::new(cpu::CpuBackend::new(threads))),
        BackendKind::Reference => Ok(Box::new(reference::ReferenceBackend)),
        BackendKind::Cuda => Err(Error::NotCompiled("cuda")),
        #[cfg(feature = "vulkan")]
        BackendKind::Vulkan => Ok(Box::new(vulkan::VulkanBackend::new(device)?)),
        #[cfg(not(feature = "vulkan"))]
        BackendKind::Vulkan => Err(Error::NotCompiled("vulkan")),
    }
}
