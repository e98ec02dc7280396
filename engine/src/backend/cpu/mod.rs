//! The CPU backend: a persistent thread pool running the quant kernels.
//!
//! Matrix products quantize the activation rows once into the weight type's
//! dot-product format, then share the weight's rows out between threads in
//! runs, so each thread streams its runs of the matrix and reuses every row
//! it loads for all tokens of the batch.

pub(crate) mod attention;
mod dense;
pub mod pool;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::host::{HostBackend, HostIn, HostOut, HostWorkspace};
use super::{AttnParams, AttnSeq};
use crate::kv_cache::KvCache;
use crate::quant::gemm::{self, PANEL_ROWS};
use crate::quant::{self, GgmlType};
use crate::tensor::QTensor;
use pool::{split, Pool};

/// Token counts up to this quantize their activations on the calling thread.
const INLINE_QUANTIZE_TOKENS: usize = 2;

/// Runs of work units per thread in a matrix product: fewer means longer
/// sequential reads, more means better balance when a thread falls behind.
const UNIT_RUNS_PER_THREAD: usize = 8;

/// Activation rows multiplied per pass over a weight row (the most
/// `quant::vec_dot_multi` takes).
const TOKENS_PER_ROW_PASS: usize = 4;

/// Most matrices in one [`HostBackend::matmul_group`] pass.
const MAX_GROUP: usize = 4;

/// One matrix of a [`HostBackend::matmul_group`] pass.
#[derive(Clone, Copy)]
struct Job<'a> {
    w: Option<&'a QTensor>,
    out: SharedMut<f32>,
    /// Its first work unit among the pass's.
    first_unit: usize,
    units: usize,
    /// Units are panels of [`PANEL_ROWS`] rows for the tiled kernel.
    tiled: bool,
    /// Products are added to the output instead of stored.
    add: bool,
}

impl Job<'_> {
    /// Stores (or adds) the product for output element `i`.
    ///
    /// # Safety
    /// As [`SharedMut::write`].
    #[inline(always)]
    unsafe fn put(&self, i: usize, v: f32) {
        unsafe {
            if self.add {
                let p = self.out.0.add(i);
                p.write(p.read() + v);
            } else {
                self.out.write(i, v);
            }
        }
    }
}

impl Job<'_> {
    const NONE: Self = Self {
        w: None,
        out: SharedMut(std::ptr::null_mut()),
        first_unit: 0,
        units: 0,
        tiled: false,
        add: false,
    };
}

/// A raw pointer that threads may share when each writes disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: used only where every thread writes a disjoint index set.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// `i` is in bounds and no other thread touches element `i` meanwhile.
    unsafe fn write(self, i: usize, v: T) {
        unsafe { self.0.add(i).write(v) }
    }

    /// The pointer (a method, so that closures capture the whole wrapper).
    fn ptr(self) -> *mut T {
        self.0
    }

    /// # Safety
    /// The range is in bounds and owned by the calling thread meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// The CPU backend.
pub struct CpuBackend {
    pool: Pool,
    /// Bytes of weights and KV read ([`Backend::bytes_read`]).
    traffic: AtomicU64,
}

impl CpuBackend {
    /// A backend on `threads` threads (0: one per available core).
    pub fn new(threads: usize) -> Self {
        let n = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Self {
            pool: Pool::new(n),
            traffic: AtomicU64::new(0),
        }
    }
}

impl HostBackend for CpuBackend {
    fn as_dyn(&self) -> &dyn HostBackend {
        self
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn traffic(&self) -> Option<&AtomicU64> {
        Some(&self.traffic)
    }

    fn threads(&self) -> usize {
        self.pool.threads()
    }

    fn workspace(&self, max_tokens: usize, max_cols: usize, max_ctx: usize) -> HostWorkspace {
        // The widest activation format per element is f32 (4 bytes); Q8_K adds
        // 36 bytes of header per 256 values, less than f32's 768 extra.
        let act = max_tokens * max_cols * 4 + 1024;
        let nt = self.threads();
        HostWorkspace {
            act: vec![0; act],
            meta: vec![0; max_tokens * gemm::meta_bytes(max_cols)],
            panels: vec![0; nt * gemm::max_panel_bytes(max_cols)],
            tile_out: vec![0.0; nt * max_tokens * PANEL_ROWS],
            attn: Vec::new(),
            attn_items: Vec::new(),
            rows: vec![0.0; nt * max_cols],
            max_ctx,
        }
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

    fn for_ranges(&self, n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        self.pool.run(&|i, nt| f(split(n, i, nt)));
    }

    fn matmul_dense(
        &self,
        w: &QTensor,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        ws: &mut HostWorkspace,
    ) {
        let (k, rows) = (w.cols(), w.rows());
        let f32_rows: Vec<f32>;
        let src = match w.ty {
            GgmlType::F16 | GgmlType::BF16 => dense::BSrc::Half {
                bytes: &w.data,
                row_bytes: w.row_bytes(),
                ty: w.ty,
            },
            GgmlType::F32 => {
                f32_rows = w
                    .data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                dense::BSrc::Rows {
                    b: &f32_rows,
                    ld: k,
                }
            }
            // The int8 tiled kernels beat f32 products where the CPU has
            // VNNI; with AVX2 alone, f32 products over dequantized panels are
            // the faster of the two for these batch sizes.
            ty if dense::quantized_in_f32(ty, k) => dense::BSrc::Quant(w),
            _ => return self.matmul(w, x, n, y, ws),
        };
        assert!(
            x.len() >= n * k && y.len() >= n * rows,
            "matmul_dense {}: shapes",
            w.name
        );
        let out = SharedMut(y.as_mut_ptr());
        // Each thread takes a share of the batch's rows against all of B.
        self.pool.run(&|i, nt| {
            let r = split(n, i, nt);
            if r.is_empty() {
                return;
            }
            // SAFETY: each thread writes its own rows of the output.
            let c = unsafe { out.slice(r.start * rows, r.len() * rows) };
            let a = &x[r.start * k..r.end * k];
            let mut s = dense::Scratch::default();
            dense::gemm((a, k), src, (c, rows), (r.len(), rows, k), false, &mut s);
        });
    }

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
        // Work items: a block of queries of one head in one segment, each
        // two products (scores, then values) on one thread.
        const QB: usize = 256;
        let w = n_heads * head_dim;
        let items: Vec<(usize, usize, usize)> = segments
            .iter()
            .enumerate()
            .flat_map(|(si, s)| {
                (0..n_heads)
                    .flat_map(move |h| (s.start..s.end).step_by(QB).map(move |q0| (si, h, q0)))
            })
            .collect();
        let dst = SharedMut(out.as_mut_ptr());
        let out_len = out.len();
        self.for_ranges(items.len(), &|range| {
            let mut scratch = dense::Scratch::default();
            let (mut scores, mut o) = (Vec::new(), Vec::new());
            for &(si, h, q0) in &items[range] {
                let seg = &segments[si];
                let (len, qn) = (seg.len(), QB.min(seg.end - q0));
                let col = h * head_dim;
                scores.resize(qn * len, 0.0);
                let qa = &q[q0 * w + col..];
                let keys = dense::BSrc::Rows {
                    b: &k[seg.start * w + col..],
                    ld: w,
                };
                dense::gemm(
                    (qa, w),
                    keys,
                    (&mut scores, len),
                    (qn, len, head_dim),
                    false,
                    &mut scratch,
                );
                dense::softmax_rows(&mut scores, len, scale);
                let values = dense::BSrc::Cols {
                    b: &v[seg.start * w + col..],
                    ld: w,
                };
                o.resize(qn * head_dim, 0.0);
                dense::gemm(
                    (&scores, len),
                    values,
                    (&mut o, head_dim),
                    (qn, head_dim, len),
                    false,
                    &mut scratch,
                );
                for (r, row) in o.chunks_exact(head_dim).enumerate() {
                    let at = (q0 + r) * w + col;
                    assert!(at + head_dim <= out_len);
                    // SAFETY: in bounds; this item alone writes rows q0..q0 + qn
                    // in the columns of head h.
                    unsafe {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst.ptr().add(at), head_dim)
                    };
                }
            }
        });
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
        attention::attention(self, p, q, kv, seqs, out, ws)
    }
}

impl CpuBackend {
    /// The products of a [`HostBackend::matmul_group_in`], stored in the outputs
    /// or (`add`) added to them.
    fn products(
        &self,
        x: HostIn<'_>,
        n: usize,
        outs: &mut [HostOut<'_>],
        ws: &mut HostWorkspace,
        add: bool,
    ) {
        let Some(first) = outs.first() else { return };
        let k = first.w.cols();
        assert_eq!(x.len(), n * k, "matmul {}: input shape", first.w.name);
        assert!(ws.rows.len() >= self.threads() * k, "workspace too narrow");
        for o in outs.iter() {
            assert_eq!(o.w.cols(), k, "matmul group {}: input width", o.w.name);
            assert!(
                o.y.len() >= n * o.w.rows(),
                "matmul {}: output too small",
                o.w.name
            );
        }
        // One pass per activation format; groups almost always share one.
        let mut done = 0usize;
        while done < outs.len() {
            let act_ty = outs[done].w.ty.vec_dot_type();
            let act_row = act_ty.row_bytes(k).expect("activation row size");
            assert!(
                ws.act.len() >= n * act_row,
                "workspace too small for {}",
                outs[done].w.name
            );
            // The matrices of this format: work units numbered across them, shared
            // out evenly. A unit is one row, or a panel of rows for the tiled kernel.
            let mut jobs: [Job<'_>; MAX_GROUP] = [Job::NONE; MAX_GROUP];
            let mut n_jobs = 0;
            let mut total_units = 0;
            for o in outs[done..].iter_mut() {
                if o.w.ty.vec_dot_type() != act_ty || n_jobs == MAX_GROUP {
                    break;
                }
                // Every token count takes the tiled kernels where there are some
                // (from a panel, or straight from the rows for a few tokens), so a
                // token's results are the same bits alone and in any batch: both
                // add each (row, token) result in one fixed order.
                let tiled = gemm::supported(o.w.ty);
                let units = if tiled {
                    o.w.rows().div_ceil(PANEL_ROWS)
                } else {
                    o.w.rows()
                };
                jobs[n_jobs] = Job {
                    w: Some(o.w),
                    out: SharedMut(o.y.as_mut_ptr()),
                    first_unit: total_units,
                    units,
                    tiled,
                    add,
                };
                total_units += units;
                n_jobs += 1;
            }
            let jobs = &jobs[..n_jobs];
            let any_tiled = jobs.iter().any(|j| j.tiled);
            let meta_row = gemm::meta_bytes(k);
            assert!(!any_tiled || ws.meta.len() >= n * meta_row);
            let act = SharedMut(ws.act.as_mut_ptr());
            let meta = SharedMut(ws.meta.as_mut_ptr());
            let rows = SharedMut(ws.rows.as_mut_ptr());
            let quantize = |i: usize, nt: usize| {
                // SAFETY: each thread has its own row.
                let tmp = unsafe { rows.slice(i * k, k) };
                for t in split(n, i, nt) {
                    // SAFETY: each thread quantizes its own token rows.
                    let dst = unsafe { act.slice(t * act_row, act_row) };
                    quant::quantize_row(act_ty, x.row(t, k, tmp), dst);
                    if any_tiled {
                        // SAFETY: as above, this token's metadata only.
                        let m = unsafe { meta.slice(t * meta_row, meta_row) };
                        gemm::prepare(act_ty, k, dst, m);
                    }
                }
            };
            if n <= INLINE_QUANTIZE_TOKENS {
                // Less work than waking the pool for it.
                quantize(0, 1);
            } else {
                self.pool.run(&quantize);
            }
            let act = &ws.act[..n * act_row];
            let meta = &ws.meta[..if any_tiled { n * meta_row } else { 0 }];
            let panel_stride = gemm::max_panel_bytes(k);
            let tile_stride = n * PANEL_ROWS;
            assert!(!any_tiled || ws.panels.len() >= self.threads() * panel_stride);
            assert!(!any_tiled || ws.tile_out.len() >= self.threads() * tile_stride);
            let panels = SharedMut(ws.panels.as_mut_ptr());
            let tile_out = SharedMut(ws.tile_out.as_mut_ptr());
            let next_unit = AtomicUsize::new(0);
            let grain = total_units.div_ceil(self.threads() * UNIT_RUNS_PER_THREAD);
            self.pool.run(&|i, _| {
                let mut acc = [0f32; TOKENS_PER_ROW_PASS];
                let mut j = 0;
                // Units are claimed a run at a time, so a thread the host
                // slows down (a shared machine) leaves its share to the others.
                let runs = std::iter::from_fn(|| {
                    let start = next_unit.fetch_add(grain, Ordering::Relaxed);
                    (start < total_units).then(|| start..(start + grain).min(total_units))
                });
                for u in runs.flatten() {
                    while u >= jobs[j].first_unit + jobs[j].units {
                        j += 1;
                    }
                    let job = &jobs[j];
                    let w = job.w.expect("job set");
                    let rows = w.rows();
                    let (first_row, row_count) = if job.tiled {
                        let r0 = (u - job.first_unit) * PANEL_ROWS;
                        (r0, PANEL_ROWS.min(rows - r0))
                    } else {
                        (u - job.first_unit, 1)
                    };
                    if row_count == PANEL_ROWS && job.tiled {
                        // SAFETY: each thread has its own panel and result buffers.
                        let (panel, res) = unsafe {
                            (
                                panels.slice(i * panel_stride, gemm::panel_bytes(w.ty, k)),
                                tile_out.slice(i * tile_stride, tile_stride),
                            )
                        };
                        let rb = w.row_bytes();
                        let src = &w.data[first_row * rb..(first_row + PANEL_ROWS) * rb];
                        if n < gemm::rows_below(w.ty) {
                            gemm::multiply_rows(w.ty, k, src, act, meta, n, res, PANEL_ROWS);
                        } else {
                            gemm::pack(w.ty, k, src, panel);
                            gemm::multiply(w.ty, k, panel, act, meta, n, res, PANEL_ROWS);
                        }
                        for (t, tr) in res.chunks_exact(PANEL_ROWS).enumerate() {
                            for (dr, &v) in tr.iter().enumerate() {
                                // SAFETY: these rows of this matrix belong to this thread alone.
                                unsafe { job.put(t * rows + first_row + dr, v) };
                            }
                        }
                        continue;
                    }
                    for r in first_row..first_row + row_count {
                        let wr = w.row(r);
                        // Each weight row is decoded once per group of activation rows.
                        for t0 in (0..n).step_by(TOKENS_PER_ROW_PASS) {
                            let cnt = (n - t0).min(TOKENS_PER_ROW_PASS);
                            let xs = &act[t0 * act_row..(t0 + cnt) * act_row];
                            quant::vec_dot_multi(w.ty, k, wr, xs, &mut acc[..cnt]);
                            for (dt, &v) in acc[..cnt].iter().enumerate() {
                                // SAFETY: row r of this matrix belongs to this thread alone.
                                unsafe { job.put((t0 + dt) * rows + r, v) };
                            }
                        }
                    }
                }
            });
            done += n_jobs;
        }
    }
}

/// Dequantizes one row of a weight (embedding lookups).
pub fn dequantize_row(w: &QTensor, r: usize, out: &mut [f32]) {
    debug_assert_ne!(w.ty, GgmlType::Q8_K);
    quant::dequantize_row(w.ty, w.row(r), out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::host::HostWorkspace;
    use crate::kv_cache::{BlockTable, KvLayout};
    use crate::tensor::Bytes;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    #[test]
    fn f32_matmul_matches_naive_on_several_threads() {
        let (k, rows, n) = (64, 37, 5);
        let mut s = 1;
        let wf: Vec<f32> = (0..k * rows).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
        let w = QTensor {
            name: "w".into(),
            ty: GgmlType::F32,
            shape: vec![k, rows],
            data: Bytes::from_vec(wf.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        for threads in [1, 3] {
            let b = CpuBackend::new(threads);
            let mut ws: HostWorkspace = b.workspace(n, k, 16);
            let mut y = vec![0.0; n * rows];
            b.matmul(&w, &x, n, &mut y, &mut ws);
            for t in 0..n {
                for r in 0..rows {
                    let want: f64 = (0..k)
                        .map(|i| wf[r * k + i] as f64 * x[t * k + i] as f64)
                        .sum();
                    assert!((y[t * rows + r] as f64 - want).abs() < 1e-4, "t{t} r{r}");
                }
            }
        }
    }

    fn tensor(name: &str, ty: GgmlType, k: usize, rows: usize, seed: &mut u64) -> QTensor {
        let rb = ty.row_bytes(k).unwrap();
        let mut data = vec![0u8; rb * rows];
        for r in 0..rows {
            let vals: Vec<f32> = (0..k).map(|_| lcg(seed)).collect();
            crate::quant::reference::quantize_row(ty, &vals, &mut data[r * rb..(r + 1) * rb]);
        }
        QTensor {
            name: name.into(),
            ty,
            shape: vec![k, rows],
            data: Bytes::from_vec(data),
        }
    }

    #[test]
    fn matmul_group_equals_separate_matmuls() {
        let (k, n) = (256, 6);
        let mut s = 9;
        // Two formats sharing Q8_K activations, one with Q8_0, one plain f32.
        let ws_ = [
            tensor("q", GgmlType::Q4_K, k, 40, &mut s),
            tensor("k", GgmlType::Q6_K, k, 8, &mut s),
            tensor("v", GgmlType::Q8_0, k, 13, &mut s),
            tensor("o", GgmlType::F32, k, 5, &mut s),
        ];
        let x: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
        let b = CpuBackend::new(3);
        let mut ws = b.workspace(n, k, 8);
        let mut separate: Vec<Vec<f32>> = Vec::new();
        for w in &ws_ {
            let mut y = vec![0.0; n * w.rows()];
            b.matmul(w, &x, n, &mut y, &mut ws);
            separate.push(y);
        }
        let mut ys: Vec<Vec<f32>> = ws_.iter().map(|w| vec![f32::NAN; n * w.rows()]).collect();
        let mut outs: Vec<HostOut<'_>> = ws_
            .iter()
            .zip(ys.iter_mut())
            .map(|(w, y)| HostOut { w, y })
            .collect();
        b.matmul_group(&x, n, &mut outs, &mut ws);
        drop(outs);
        for (i, (a, b)) in separate.iter().zip(&ys).enumerate() {
            assert_eq!(a, b, "matrix {i}");
        }
        assert!(separate[0].iter().any(|v| v.abs() > 1e-3));
    }

    #[test]
    fn a_step_on_the_way_in_equals_the_step_then_the_product() {
        let (k, mut s) = (256, 3);
        let w = tensor("w", GgmlType::Q4_K, k, 24, &mut s);
        let weight: Vec<f32> = (0..k).map(|_| 1.0 + lcg(&mut s)).collect();
        // One token takes the inline quantize, nine the pool's.
        for n in [1, 9] {
            let x: Vec<f32> = (0..k * n).map(|_| 3.0 * lcg(&mut s)).collect();
            let up: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
            let b = CpuBackend::new(2);
            let mut ws = b.workspace(n, k, 8);
            let mut normed = vec![0.0; k * n];
            crate::ops::rms_norm(&x, &weight, 1e-5, &mut normed);
            let (mut swiglu, mut geglu) = (x.clone(), x.clone());
            crate::ops::swiglu_inplace(&mut swiglu, &up);
            crate::ops::geglu_inplace(&mut geglu, &up);
            let steps = [
                (
                    HostIn::RmsNorm {
                        x: &x,
                        weight: &weight,
                        eps: 1e-5,
                    },
                    normed,
                ),
                (HostIn::SwiGlu { gate: &x, up: &up }, swiglu),
                (HostIn::GeGlu { gate: &x, up: &up }, geglu),
            ];
            for (i, (input, made)) in steps.into_iter().enumerate() {
                let (mut fused, mut apart) = (vec![f32::NAN; n * 24], vec![f32::NAN; n * 24]);
                b.matmul_in(&w, input, n, &mut fused, &mut ws);
                b.matmul(&w, &made, n, &mut apart, &mut ws);
                assert_eq!(fused, apart, "step {i}, {n} tokens");
                assert!(fused.iter().any(|v| v.abs() > 1e-3));
            }
        }
    }

    #[test]
    fn products_added_in_place_equal_the_product_then_the_add() {
        let (k, mut s) = (256, 11);
        // Tiled formats (with a partial panel) and one without a tiled kernel.
        let ws_ = [
            tensor("a", GgmlType::Q4_1, k, 21, &mut s),
            tensor("b", GgmlType::Q4_K, k, 16, &mut s),
            tensor("c", GgmlType::F32, k, 5, &mut s),
        ];
        for n in [1, 9] {
            let b = CpuBackend::new(2);
            let mut ws = b.workspace(n, k, 8);
            let x: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
            for w in &ws_ {
                let base: Vec<f32> = (0..n * w.rows()).map(|_| lcg(&mut s)).collect();
                let mut product = vec![f32::NAN; n * w.rows()];
                b.matmul(w, &x, n, &mut product, &mut ws);
                let mut apart = base.clone();
                crate::ops::add_inplace(&mut apart, &product);
                let mut added = base.clone();
                b.matmul_add_in(w, HostIn::Rows(&x), n, &mut added, &mut ws);
                assert_eq!(added, apart, "{}, {n} tokens", w.name);
                assert_ne!(added, base);
            }
        }
    }

    #[test]
    fn prefill_sized_products_match_the_reference_row_by_row() {
        // Enough tokens for the tiled kernel where the CPU has one, row counts
        // with and without a partial panel, formats with and without one.
        let (k, n) = (288, 11);
        let mut s = 5;
        let ws_ = [
            tensor("a", GgmlType::Q4_1, k, 37, &mut s),
            tensor("b", GgmlType::Q5_0, k, 16, &mut s),
            tensor("c", GgmlType::Q8_0, k, 24, &mut s),
            tensor("d", GgmlType::Q4_0, k, 9, &mut s),
        ];
        let x: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
        let b = CpuBackend::new(3);
        let mut ws = b.workspace(n, k, 8);
        for w in &ws_ {
            let mut y = vec![f32::NAN; n * w.rows()];
            b.matmul(w, &x, n, &mut y, &mut ws);
            let act_ty = w.ty.vec_dot_type();
            let ar = act_ty.row_bytes(k).unwrap();
            for t in 0..n {
                let mut xq = vec![0u8; ar];
                quant::quantize_row(act_ty, &x[t * k..(t + 1) * k], &mut xq);
                for r in 0..w.rows() {
                    let want = quant::reference::vec_dot(w.ty, w.row(r), &xq, k);
                    let got = y[t * w.rows() + r];
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{} token {t} row {r}: {got} vs {want}",
                        w.name
                    );
                }
            }
        }
    }

    #[test]
    fn attention_is_causal_softmax_over_the_block_table() {
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            window: None,
            dtype: Default::default(),
        };
        let mut kv = KvCache::new(layout, 4);
        let _hole = kv.allocate().unwrap();
        let mut table = BlockTable::new();
        table.reserve(&mut kv, 3).unwrap();
        // Keys along x with growing length, values one-hot-ish per position.
        let keys = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]];
        let vals = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]];
        for p in 0..3 {
            kv.write(0, &table, p, &keys[p], &vals[p]);
        }
        let b = CpuBackend::new(2);
        let mut ws = b.workspace(3, 4, 8);
        // Two query heads sharing the KV head (GQA), all three positions new.
        let q = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let mut out = vec![0.0; 12];
        let p = AttnParams {
            layer: 0,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            window: None,
        };
        let seqs = [AttnSeq {
            table: &table,
            start_pos: 0,
            n_tokens: 3,
        }];
        b.attention(&p, &q, &kv, &seqs, &mut out, &mut ws);
        // Position 0 sees only itself.
        assert_eq!(&out[0..2], &[1.0, 0.0]);
        // Position 1, head 0: softmax(0, 1) over v0, v1.
        let e = 1f32.exp();
        let w1 = e / (1.0 + e);
        assert!((out[4] - (1.0 - w1)).abs() < 1e-5 && (out[5] - w1).abs() < 1e-5);
        // Head 1 has a zero query: uniform weights over the three positions.
        assert!((out[10] - 2.0 / 3.0).abs() < 1e-5 && (out[11] - 2.0 / 3.0).abs() < 1e-5);
        // A window of one sees only the current position.
        let p1 = AttnParams {
            window: Some(1),
            ..p
        };
        b.attention(&p1, &q, &kv, &seqs, &mut out, &mut ws);
        assert_eq!(&out[8..10], &[1.0, 1.0]);
    }
}
