//! The Vulkan backend (cargo feature `vulkan`): every operation of
//! [`Backend`] as a compute shader on a Vulkan device (a GPU, or Mesa's
//! lavapipe on the CPU).
//!
//! Weights keep their GGUF bytes in device memory (blocks padded to whole
//! words) and are dequantized in the kernels; activations are f32, the KV cache f16 in device memory
//! read through the block tables. Operations record into one command
//! buffer; it runs when the host needs a value back (the logits, a
//! [`Backend::read`]), so a decode step is one submission. The CPU does
//! only the scheduling, the rotary angles and sampling.

mod gpu;

use std::sync::Arc;

use gpu::{Bind, Binding, Gpu, GpuBuf};

use crate::backend::memory::{Buf, Weight, Workspace};
use crate::backend::{Activation, AttnParams, AttnSeq, Backend, HeadNorms, MatIn, MatOut};
use crate::kv_cache::{KvCache, KvLayout, KvMemory, KvType};
use crate::ops::{RopeSpec, RopeStyle};
use crate::quant::GgmlType;
use crate::tensor::QTensor;
use crate::{Error, Result};

/// Workgroups along x before the grid wraps into y (or z): the smallest
/// limit Vulkan allows is 65535.
const WRAP: u32 = 32768;

/// Token rows one invocation of a product takes (`TOK` in quant.wgsl): each
/// weight block is dequantized once for them.
const TOK: u32 = 8;

/// A backend on one Vulkan device.
pub struct VulkanBackend {
    gpu: Arc<Gpu>,
}

impl VulkanBackend {
    /// Opens the device `selector` names (an index or part of its name);
    /// without one, the first GPU.
    pub fn new(selector: Option<&str>) -> Result<Self> {
        Ok(Self {
            gpu: Gpu::open(selector)?,
        })
    }

    /// The device's name, as its driver reports it.
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    fn buf(&self, bytes: u64) -> Result<GpuBuf> {
        self.gpu.buffer(bytes)
    }

    /// A product with `w` of `n` rows bound at `x` into `y` (`w.rows()`
    /// values a row), added where `add`.
    fn product(&self, w: &Weight, x: Binding, n: usize, y: Binding, add: bool) {
        let dw = weight(w);
        for c in &dw.chunks {
            let rows = c.rows as u32;
            let params = [
                rows,
                w.cols() as u32,
                n as u32,
                c.row0 as u32,
                dw.row_bytes as u32,
                w.rows() as u32,
                u32::from(add),
                0,
                0,
            ];
            let groups = [rows.div_ceil(64), (n as u32).div_ceil(TOK), 1];
            let bind = [c.buf.bind(), x, y];
            self.gpu
                .dispatch(dw.matmul, &bind.map(Bind::from), &params, groups);
        }
    }

    /// The input rows of a product: `x`'s own, or made into the workspace.
    fn input(&self, x: MatIn<'_>, n: usize, k: usize, ws: &mut Workspace) -> Binding {
        let rows = &scratch(ws).rows;
        assert!(
            (n * k * 4) as u64 <= rows.size(),
            "a batch larger than the workspace"
        );
        let scratch = || rows.bind();
        match x {
            MatIn::Rows(x) => dev(x).bind(),
            MatIn::RmsNorm { x, weight, eps } => {
                let out = scratch();
                let x = dev(x).bind();
                self.norm(x, out, dev(weight).bind(), n, k, eps, 1);
                out
            }
            MatIn::SwiGlu { gate, up } | MatIn::GeGlu { gate, up } => {
                let mode = if matches!(x, MatIn::SwiGlu { .. }) {
                    2
                } else {
                    3
                };
                let out = scratch();
                self.eltwise(mode, out, dev(gate).bind(), dev(up).bind(), n * k, k, 0.0);
                out
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn norm(&self, a: Binding, b: Binding, w: Binding, n: usize, d: usize, eps: f32, mode: u32) {
        let params = [n as u32, d as u32, mode, eps.to_bits()];
        let n = n as u32;
        self.gpu.dispatch(
            "rms_norm",
            &[a, b, w].map(Bind::from),
            &params,
            [n.min(WRAP), n.div_ceil(WRAP), 1],
        );
    }

    /// An element-wise kernel over `len` values (see `eltwise` in ops.wgsl).
    #[allow(clippy::too_many_arguments)]
    fn eltwise(
        &self,
        mode: u32,
        a: Binding,
        c: Binding,
        d: Binding,
        len: usize,
        width: usize,
        f0: f32,
    ) {
        let params = [len as u32, width as u32, mode, 0, 0, 0, 0, 0, f0.to_bits()];
        self.gpu
            .dispatch("eltwise", &[a, a, c, d].map(Bind::from), &params, grid(len));
    }
}

/// Workgroups of 64 invocations covering `len`, wrapped into two dimensions.
fn grid(len: usize) -> [u32; 3] {
    let groups = (len as u32).div_ceil(64);
    let x = groups.clamp(1, WRAP);
    [x, groups.div_ceil(x), 1]
}

/// A weight in device memory: chunks of whole rows, each within the
/// device's largest binding.
struct DevWeight {
    chunks: Vec<Chunk>,
    row_bytes: usize,
    matmul: &'static str,
    embed: &'static str,
}

struct Chunk {
    row0: usize,
    rows: usize,
    buf: GpuBuf,
}

/// Bytes a block of `ty` takes on the device: the file's, padded to whole
/// 4-byte words (as quant.wgsl reads them).
fn padded_block(ty: GgmlType) -> usize {
    if ty.block_size() == 1 {
        // Floats: rows of even length are whole words already.
        ty.type_size()
    } else {
        ty.type_size().next_multiple_of(4)
    }
}

/// `bytes` (whole blocks of `ty`, `from` bytes each) with each block padded
/// to `to` bytes: Q4_0, Q5_0 and Q8_0 get the padding after their f16
/// scale, so that what follows starts on a word; other types at the end.
fn pad_blocks(ty: GgmlType, bytes: &[u8], from: usize, to: usize) -> Vec<u8> {
    let head = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => 2,
        _ => from,
    };
    let mut out = vec![0u8; bytes.len() / from * to];
    for (src, dst) in bytes.chunks_exact(from).zip(out.chunks_exact_mut(to)) {
        dst[..head].copy_from_slice(&src[..head]);
        dst[to - (from - head)..].copy_from_slice(&src[head..]);
    }
    out
}

/// The kernels of a GGUF type: (product, embedding).
fn kernels(ty: GgmlType) -> Option<(&'static str, &'static str)> {
    Some(match ty {
        GgmlType::F32 => ("matmul_f32", "embed_f32"),
        GgmlType::F16 => ("matmul_f16", "embed_f16"),
        GgmlType::BF16 => ("matmul_bf16", "embed_bf16"),
        GgmlType::Q4_0 => ("matmul_q4_0", "embed_q4_0"),
        GgmlType::Q4_1 => ("matmul_q4_1", "embed_q4_1"),
        GgmlType::Q5_0 => ("matmul_q5_0", "embed_q5_0"),
        GgmlType::Q5_1 => ("matmul_q5_1", "embed_q5_1"),
        GgmlType::Q8_0 => ("matmul_q8_0", "embed_q8_0"),
        GgmlType::Q4_K => ("matmul_q4_k", "embed_q4_k"),
        GgmlType::Q5_K => ("matmul_q5_k", "embed_q5_k"),
        GgmlType::Q6_K => ("matmul_q6_k", "embed_q6_k"),
        _ => return None,
    })
}

/// The keys and values of every layer in device memory: one buffer per
/// pool layer, `[block][slot][kv head][dim]` in f16.
struct DevKv {
    gpu: Arc<Gpu>,
    main: Vec<(GpuBuf, GpuBuf)>,
    window: Vec<(GpuBuf, GpuBuf)>,
    /// Bytes of one block of one layer (K or V).
    block_bytes: u64,
}

impl KvMemory for DevKv {
    fn copy_block(&mut self, src: u32, dst: u32) {
        let b = self.block_bytes;
        for (k, v) in &self.main {
            self.gpu
                .copy(k, u64::from(src) * b, k, u64::from(dst) * b, b);
            self.gpu
                .copy(v, u64::from(src) * b, v, u64::from(dst) * b, b);
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The backend's scratch: made input rows, and the logits on their way out.
struct DevWorkspace {
    rows: GpuBuf,
    logits: Option<GpuBuf>,
}

fn dev(b: &Buf) -> &GpuBuf {
    b.device()
        .expect("a buffer made by another backend given to the Vulkan backend")
}

fn weight(w: &Weight) -> &DevWeight {
    w.device()
        .expect("a weight made by another backend given to the Vulkan backend")
}

fn scratch(ws: &mut Workspace) -> &mut DevWorkspace {
    ws.get_mut()
        .expect("a workspace made by another backend given to the Vulkan backend")
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The pool buffers of `layer`: (keys, values).
fn layer_kv(kv: &KvCache, layer: usize) -> (&GpuBuf, &GpuBuf) {
    let l = kv.layout();
    let mem: &DevKv = kv
        .device()
        .expect("a KV cache made by another backend given to the Vulkan backend");
    let window = l.is_window_layer(layer);
    let slot = (0..layer)
        .filter(|&i| l.is_window_layer(i) == window)
        .count();
    let (k, v) = if window {
        &mem.window[slot]
    } else {
        &mem.main[slot]
    };
    (k, v)
}

impl Backend for VulkanBackend {
    fn name(&self) -> &'static str {
        "vulkan"
    }

    fn threads(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        format!("vulkan: {}", self.gpu.name)
    }

    fn is_lost(&self) -> bool {
        self.gpu.is_lost()
    }

    fn alloc(&self, len: usize) -> Result<Buf> {
        let b = self.buf(len as u64 * 4)?;
        Ok(Buf::on_device(len, Box::new(b)))
    }

    fn upload(&self, values: Vec<f32>) -> Result<Buf> {
        let b = self.buf(values.len() as u64 * 4)?;
        self.gpu.upload(&b, 0, f32_bytes(&values))?;
        Ok(Buf::on_device(values.len(), Box::new(b)))
    }

    fn weight(&self, t: QTensor) -> Result<Weight> {
        let (matmul, embed) = kernels(t.ty).ok_or_else(|| {
            Error::Device(format!(
                "tensor '{}': the Vulkan backend does not read {} weights",
                t.name,
                t.ty.name()
            ))
        })?;
        let (src_block, block) = (t.ty.type_size(), padded_block(t.ty));
        let row_bytes = t.cols() / t.ty.block_size() * block;
        let per_chunk = ((self.gpu.max_range as usize) / row_bytes.max(1)).max(1);
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < t.rows() {
            let rows = per_chunk.min(t.rows() - row0);
            let src_row = t.row_bytes();
            let bytes = &t.data[row0 * src_row..(row0 + rows) * src_row];
            let padded;
            let bytes = if block == src_block {
                bytes
            } else {
                padded = pad_blocks(t.ty, bytes, src_block, block);
                &padded[..]
            };
            let buf = self.buf(bytes.len() as u64)?;
            self.gpu.upload(&buf, 0, bytes)?;
            // The staging copy is freed as soon as it has run.
            self.gpu.flush();
            chunks.push(Chunk { row0, rows, buf });
            row0 += rows;
        }
        // The file's pages were read once; the device holds the weight now.
        t.data.release();
        let dw = DevWeight {
            chunks,
            row_bytes,
            matmul,
            embed,
        };
        Ok(Weight::on_device(&t, Arc::new(dw)))
    }

    fn write(&self, dst: &mut Buf, at: usize, values: &[f32]) {
        self.gpu
            .upload(dev(dst), at as u64 * 4, f32_bytes(values))
            .expect("host-visible memory for a write");
    }

    fn read(&self, src: &Buf, at: usize, out: &mut [f32]) {
        self.gpu
            .download(dev(src), at as u64 * 4, f32_bytes_mut(out));
    }

    fn kv_cache(
        &self,
        layout: KvLayout,
        n_blocks: usize,
        n_window_blocks: usize,
    ) -> Result<KvCache> {
        if layout.dtype != KvType::F16 {
            return Err(Error::KvType(format!(
                "the Vulkan backend keeps keys and values in f16; {} runs on the CPU backend",
                layout.dtype
            )));
        }
        if !layout.head_dim.is_multiple_of(2) || layout.head_dim > 512 {
            return Err(Error::Device(format!(
                "the Vulkan backend's attention takes even head widths up to 512, not {}",
                layout.head_dim
            )));
        }
        let block_bytes = (layout.block_elems() * 2) as u64;
        let pair = |blocks: usize| -> Result<(GpuBuf, GpuBuf)> {
            let bytes = blocks as u64 * block_bytes;
            Ok((self.buf(bytes)?, self.buf(bytes)?))
        };
        let (mut main, mut window) = (Vec::new(), Vec::new());
        for l in 0..layout.n_layers {
            if layout.is_window_layer(l) {
                window.push(pair(n_window_blocks.max(1))?);
            } else {
                main.push(pair(n_blocks)?);
            }
        }
        let mem = DevKv {
            gpu: self.gpu.clone(),
            main,
            window,
            block_bytes,
        };
        Ok(KvCache::on_device(
            layout,
            n_blocks,
            n_window_blocks,
            Box::new(mem),
        ))
    }

    fn workspace(&self, max_tokens: usize, max_cols: usize, _max_ctx: usize) -> Workspace {
        let rows = self
            .buf((max_tokens * max_cols) as u64 * 4)
            .expect("GPU memory for the workspace");
        Workspace::new(DevWorkspace { rows, logits: None })
    }

    fn embed_rows(&self, w: &Weight, ids: &[u32], scale: Option<f32>, x: &mut Buf, row: usize) {
        if ids.is_empty() {
            return;
        }
        let dw = weight(w);
        let n = ids.len() as u32;
        for c in &dw.chunks {
            let params = [
                c.rows as u32,
                w.cols() as u32,
                n,
                c.row0 as u32,
                dw.row_bytes as u32,
                0,
                0,
                row as u32,
                scale.unwrap_or(0.0).to_bits(),
            ];
            let b = c.buf.bind().into();
            let bind = [b, b, dev(x).bind().into(), Bind::Data(ids)];
            self.gpu.dispatch(
                dw.embed,
                &bind,
                &params,
                [(w.cols() as u32).div_ceil(64), n, 1],
            );
        }
    }

    fn copy_rows(&self, src: &Buf, from: usize, dst: &mut Buf, to: usize, n: usize, d: usize) {
        let row = d as u64 * 4;
        self.gpu.copy(
            dev(src),
            from as u64 * row,
            dev(dst),
            to as u64 * row,
            n as u64 * row,
        );
    }

    fn matmul_group_in(&self, x: MatIn<'_>, n: usize, outs: &mut [MatOut<'_>], ws: &mut Workspace) {
        let Some(k) = outs.first().map(|o| o.w.cols()) else {
            return;
        };
        let x = self.input(x, n, k, ws);
        for o in outs.iter_mut() {
            self.product(o.w, x, n, dev(o.y).bind(), false);
        }
    }

    fn matmul_add_in(&self, w: &Weight, x: MatIn<'_>, n: usize, y: &mut Buf, ws: &mut Workspace) {
        let x = self.input(x, n, w.cols(), ws);
        self.product(w, x, n, dev(y).bind(), true);
    }

    fn add_bias(&self, x: &mut Buf, n: usize, bias: &Buf) {
        let b = dev(bias).bind();
        self.eltwise(1, dev(x).bind(), b, b, n * bias.len(), bias.len(), 0.0);
    }

    fn rope_angles(&self, rope: &RopeSpec, pos: &[[u32; 3]], out: &mut Buf) {
        let half = rope.dim / 2;
        if half == 0 || pos.is_empty() {
            return;
        }
        let mut table = vec![[0.0f32; 2]; pos.len() * half];
        for (&p, cs) in pos.iter().zip(table.chunks_exact_mut(half)) {
            rope.angles(p, cs);
        }
        self.write(out, 0, table.as_flattened());
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
        let mut mode = u32::from(style == RopeStyle::Halves);
        let a = dev(angles).bind();
        let (nq, nk, eps) = match norms {
            Some(h) => {
                mode |= 2;
                (dev(h.q).bind(), dev(h.k).bind(), h.eps)
            }
            None => (a, a, 0.0),
        };
        let params = [
            n as u32,
            head_dim as u32,
            mode,
            eps.to_bits(),
            qd as u32,
            kvd as u32,
            half as u32,
        ];
        let heads = (qd + kvd) / head_dim;
        let bind = [dev(q).bind(), dev(k).bind(), a, nq, a, nk];
        self.gpu
            .dispatch("rope", &bind.map(Bind::from), &params, grid(n * heads));
    }

    fn kv_write(&self, kv: &mut KvCache, layer: usize, seqs: &[AttnSeq<'_>], k: &Buf, v: &Buf) {
        let l = kv.layout();
        let mut slots = Vec::new();
        for s in seqs {
            let blocks = kv.blocks(layer, s.table);
            for pos in s.start_pos..s.start_pos + s.n_tokens {
                slots.push(
                    blocks[pos / l.block_size] * l.block_size as u32 + (pos % l.block_size) as u32,
                );
            }
        }
        if slots.is_empty() {
            return;
        }
        let (kc, vc) = layer_kv(kv, layer);
        let params = [
            slots.len() as u32,
            l.n_kv_heads as u32,
            1,
            l.head_dim as u32,
        ];
        let (kb, vb) = (dev(k).bind(), dev(v).bind());
        let (kc, vc) = (kc.bind().into(), vc.bind().into());
        let bind = [kb.into(), kb.into(), vb.into(), kc, vc, Bind::Data(&slots)];
        let pairs = slots.len() * l.n_kv_heads * l.head_dim / 2;
        self.gpu.dispatch("kv_write", &bind, &params, grid(pairs));
    }

    fn attention(
        &self,
        p: &AttnParams,
        q: &Buf,
        kv: &KvCache,
        seqs: &[AttnSeq<'_>],
        out: &mut Buf,
        _ws: &mut Workspace,
    ) {
        let n: usize = seqs.iter().map(|s| s.n_tokens).sum();
        if n == 0 {
            return;
        }
        // Per row: (position, first visible position, offset of its block
        // list); then each sequence's block list.
        let mut meta = vec![0u32; 3 * n];
        let mut row = 0;
        for s in seqs {
            let table = meta.len() as u32;
            meta.extend_from_slice(kv.blocks(p.layer, s.table));
            for pos in s.start_pos..s.start_pos + s.n_tokens {
                let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                meta[3 * row..3 * row + 3].copy_from_slice(&[pos as u32, first as u32, table]);
                row += 1;
            }
        }
        let (kc, vc) = layer_kv(kv, p.layer);
        let params = [
            n as u32,
            p.n_heads as u32,
            (p.n_heads / p.n_kv_heads) as u32,
            p.head_dim as u32,
            kv.layout().block_size as u32,
            p.scale.to_bits(),
        ];
        let qb = dev(q).bind();
        let (q, o) = (Bind::from(qb), dev(out).bind().into());
        let (kc, vc) = (kc.bind().into(), vc.bind().into());
        let bind = [q, q, q, kc, vc, Bind::Data(&meta), o];
        self.gpu
            .dispatch("attention", &bind, &params, [p.n_heads as u32, n as u32, 1]);
    }

    fn rms_norm(&self, x: &mut Buf, n: usize, weight: &Buf, eps: f32) {
        let x = dev(x).bind();
        self.norm(x, x, dev(weight).bind(), n, weight.len(), eps, 0);
    }

    fn norm_add(&self, x: &mut Buf, y: &mut Buf, n: usize, weight: &Buf, eps: f32) {
        self.norm(
            dev(x).bind(),
            dev(y).bind(),
            dev(weight).bind(),
            n,
            weight.len(),
            eps,
            2,
        );
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
        let vocab = w.rows();
        let row_bytes = vocab as u64 * 4;
        // As many rows at a time as one binding holds.
        let per_pass = ((self.gpu.max_range / row_bytes) as usize).clamp(1, n.max(1));
        let s = scratch(ws);
        let want = per_pass as u64 * row_bytes;
        if s.logits.as_ref().is_none_or(|b| b.size() < want) {
            s.logits = Some(self.buf(want).expect("GPU memory for the logits"));
        }
        let s = &*s;
        let lb = s.logits.as_ref().expect("a logits buffer");
        let (xb, cols) = (dev(x), w.cols() as u64 * 4);
        let mut t = 0;
        while t < n {
            let rows = per_pass.min(n - t);
            let x = if t == 0 {
                xb.bind()
            } else {
                // Later passes: their rows copied to the front of the
                // scratch, as bindings start where the buffer does.
                self.gpu
                    .copy(xb, t as u64 * cols, &s.rows, 0, rows as u64 * cols);
                s.rows.bind()
            };
            self.product(w, x, rows, lb.bind(), false);
            if let Some(cap) = softcap {
                self.eltwise(6, lb.bind(), lb.bind(), lb.bind(), rows * vocab, vocab, cap);
            }
            let dst = &mut out[t * vocab..(t + rows) * vocab];
            self.gpu.download(lb, 0, f32_bytes_mut(dst));
            t += rows;
        }
    }

    fn matmul_dense(&self, w: &Weight, x: &Buf, n: usize, y: &mut Buf, _ws: &mut Workspace) {
        self.product(w, dev(x).bind(), n, dev(y).bind(), false);
    }

    fn layer_norm(&self, x: &mut Buf, n: usize, weight: &Buf, bias: &Buf, eps: f32) {
        let params = [n as u32, weight.len() as u32, 0, eps.to_bits()];
        let x = dev(x).bind();
        let bind = [x, x, dev(weight).bind(), dev(bias).bind()];
        let n = n as u32;
        self.gpu.dispatch(
            "layer_norm",
            &bind.map(Bind::from),
            &params,
            [n.min(WRAP), n.div_ceil(WRAP), 1],
        );
    }

    fn activate(&self, x: &mut Buf, len: usize, act: Activation) {
        let mode = match act {
            Activation::GeluErf => 4,
            Activation::QuickGelu => 5,
        };
        let x = dev(x).bind();
        self.eltwise(mode, x, x, x, len, 1, 0.0);
    }

    fn swiglu(&self, gate: &mut Buf, up: &Buf, len: usize) {
        let g = dev(gate).bind();
        self.eltwise(2, g, g, dev(up).bind(), len, 1, 0.0);
    }

    fn add(&self, x: &mut Buf, y: &Buf, len: usize) {
        let y = dev(y).bind();
        self.eltwise(0, dev(x).bind(), y, y, len, 1, 0.0);
    }

    fn attention_segments(
        &self,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        (n_heads, head_dim): (usize, usize),
        scale: f32,
        segments: &[std::ops::Range<usize>],
        out: &mut Buf,
    ) {
        let rows = segments.iter().map(|s| s.end).max().unwrap_or(0);
        if rows == 0 {
            return;
        }
        let mut meta = vec![0u32; 2 * rows];
        for s in segments {
            for i in s.clone() {
                meta[2 * i] = s.start as u32;
                meta[2 * i + 1] = s.end as u32;
            }
        }
        let params = [
            rows as u32,
            head_dim as u32,
            0,
            0,
            n_heads as u32,
            0,
            0,
            0,
            scale.to_bits(),
        ];
        let o = dev(out).bind();
        let (o, q, k, v) = (o.into(), dev(q).bind().into(), dev(k).bind(), dev(v).bind());
        let bind = [o, o, q, k.into(), Bind::Data(&meta), v.into()];
        self.gpu.dispatch(
            "attend_dense",
            &bind,
            &params,
            [n_heads as u32, rows as u32, 1],
        );
    }
}
