//! The scalar reference backend: every operation of [`HostBackend`] in plain
//! Rust on one thread, no SIMD, no tiling.
//!
//! It is the oracle the fast backends are checked against on whole models
//! (`--backend reference`), and the second implementation that keeps the
//! seam honest: a model that runs here uses nothing but the trait. Matrix
//! products quantize each activation row to the weight's `vec_dot_type` and
//! take ggml's generic dot products ([`quant::reference`]); attention reads
//! the f16 cache through the block tables with a plain two-pass softmax.

use crate::backend::host::{HostBackend, HostIn, HostOut, HostWorkspace};
use crate::backend::{AttnParams, AttnSeq};
use crate::kv_cache::KvCache;
use crate::quant::{reference, GgmlType};
use crate::tensor::QTensor;

/// The scalar backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

impl ReferenceBackend {
    /// Products of one input row with every row of each weight.
    fn products(
        &self,
        x: HostIn<'_>,
        n: usize,
        outs: &mut [HostOut<'_>],
        ws: &mut HostWorkspace,
        add: bool,
    ) {
        let Some(k) = outs.first().map(|o| o.w.cols()) else {
            return;
        };
        assert!(
            outs.iter().all(|o| o.w.cols() == k),
            "matmul: widths differ"
        );
        assert!(
            x.len() >= n * k,
            "matmul: input of {} values for {n} rows of {k}",
            x.len()
        );
        let (row, act) = (&mut ws.rows, &mut ws.act);
        for t in 0..n {
            let xr = x.row(t, k, &mut row[..k]);
            for o in outs.iter_mut() {
                let rows = o.w.rows();
                let y = &mut o.y[t * rows..(t + 1) * rows];
                dot_rows(o.w, xr, act, y, add);
            }
        }
    }
}

/// `y[r] (+)= w.row(r) · x` with `x` quantized to the weight's activation format.
fn dot_rows(w: &QTensor, x: &[f32], act: &mut [u8], y: &mut [f32], add: bool) {
    let ty = w.ty.vec_dot_type();
    let bytes = ty
        .row_bytes(x.len())
        .expect("a weight's width is a whole number of blocks");
    let qx = &mut act[..bytes];
    reference::quantize_row(ty, x, qx);
    for (r, out) in y.iter_mut().enumerate() {
        let v = reference::vec_dot(w.ty, w.row(r), qx, x.len());
        *out = if add { *out + v } else { v };
    }
}

impl HostBackend for ReferenceBackend {
    fn as_dyn(&self) -> &dyn HostBackend {
        self
    }

    fn name(&self) -> &'static str {
        "reference"
    }

    fn threads(&self) -> usize {
        1
    }

    fn workspace(&self, _max_tokens: usize, max_cols: usize, max_ctx: usize) -> HostWorkspace {
        // One activation row at a time (f32 is the widest format), one made
        // input row, and one score per visible position.
        HostWorkspace {
            act: vec![0; max_cols * 4 + GgmlType::Q8_K.type_size()],
            rows: vec![0.0; max_cols],
            attn: vec![0.0; max_ctx],
            max_ctx,
            ..HostWorkspace::default()
        }
    }

    fn matmul_add_in(
        &self,
        w: &QTensor,
        x: HostIn<'_>,
        n: usize,
        y: &mut [f32],
        ws: &mut HostWorkspace,
    ) {
        self.products(x, n, &mut [HostOut { w, y }], ws, true);
    }

    fn matmul_group_in(
        &self,
        x: HostIn<'_>,
        n: usize,
        outs: &mut [HostOut<'_>],
        ws: &mut HostWorkspace,
    ) {
        self.products(x, n, outs, ws, false);
    }

    fn attention(
        &self,
        p: &AttnParams,
        q: &[f32],
        kv: &KvCache,
        seqs: &[AttnSeq<'_>],
        out: &mut [f32],
        ws: &mut HostWorkspace,
    ) {
        let (hd, width) = (p.head_dim, p.n_heads * p.head_dim);
        let group = p.n_heads / p.n_kv_heads;
        let bs = kv.layout().block_size;
        let (mut kf, mut vf) = (vec![0f32; hd], vec![0f32; hd]);
        let mut row = 0;
        for s in seqs {
            let blocks = kv.blocks(p.layer, s.table);
            for i in 0..s.n_tokens {
                let pos = s.start_pos + i;
                let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let scores = &mut ws.attn[..pos + 1 - first];
                for h in 0..p.n_heads {
                    let kvh = h / group;
                    let qh = &q[row * width + h * hd..][..hd];
                    // Scores q·k, then their softmax, over what the cache kept.
                    let mut max = f32::NEG_INFINITY;
                    for (j, sc) in (first..=pos).zip(scores.iter_mut()) {
                        kv.read(p.layer, blocks[j / bs], kvh, j % bs, &mut kf, &mut vf);
                        let dot: f32 = qh.iter().zip(&kf).map(|(a, b)| a * b).sum();
                        *sc = dot * p.scale;
                        max = max.max(*sc);
                    }
                    let mut sum = 0.0f32;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    let o = &mut out[row * width + h * hd..][..hd];
                    o.fill(0.0);
                    for (j, &sc) in (first..=pos).zip(scores.iter()) {
                        kv.read(p.layer, blocks[j / bs], kvh, j % bs, &mut kf, &mut vf);
                        for (oe, ve) in o.iter_mut().zip(&vf) {
                            *oe += sc / sum * ve;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}
