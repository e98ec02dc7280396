//! The CPU backend: a persistent thread pool running the quant kernels.
//!
//! Matrix products quantize the activation rows once into the weight type's
//! dot-product format, then split the weight's rows between threads so each
//! thread streams its own part of the matrix and reuses every row it loads for
//! all tokens of the batch.

pub mod pool;

use super::{AttnParams, AttnSeq, Backend, MatOut, Workspace};
use crate::kv_cache::KvCache;
use crate::quant::{self, GgmlType};
use crate::tensor::QTensor;
use pool::{split, Pool};

/// Activation rows multiplied per pass over a weight row (the most
/// `quant::vec_dot_multi` takes).
const TOKENS_PER_ROW_PASS: usize = 4;

/// Most matrices in one [`Backend::matmul_group`] pass.
const MAX_GROUP: usize = 4;

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
}

impl CpuBackend {
    /// A backend on `threads` threads (0: one per available core).
    pub fn new(threads: usize) -> Self {
        let n = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Self { pool: Pool::new(n) }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn threads(&self) -> usize {
        self.pool.threads()
    }

    fn workspace(&self, max_tokens: usize, max_cols: usize, max_ctx: usize) -> Workspace {
        // The widest activation format per element is f32 (4 bytes); Q8_K adds
        // 36 bytes of header per 256 values, less than f32's 768 extra.
        let act = max_tokens * max_cols * 4 + 1024;
        Workspace {
            act: vec![0; act],
            scores: vec![0.0; self.threads() * max_ctx],
            max_ctx,
        }
    }

    fn matmul_group(&self, x: &[f32], n: usize, outs: &mut [MatOut<'_>], ws: &mut Workspace) {
        let Some(first) = outs.first() else { return };
        let k = first.w.cols();
        assert_eq!(x.len(), n * k, "matmul {}: input shape", first.w.name);
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
            let act = SharedMut(ws.act.as_mut_ptr());
            self.pool.run(&|i, nt| {
                for t in split(n, i, nt) {
                    // SAFETY: each thread quantizes its own token rows.
                    let dst = unsafe { act.slice(t * act_row, act_row) };
                    quant::quantize_row(act_ty, &x[t * k..(t + 1) * k], dst);
                }
            });
            // The matrices of this format: rows numbered across them, shared out evenly.
            let mut jobs: [(Option<&QTensor>, SharedMut<f32>, usize); MAX_GROUP] =
                [(None, SharedMut(std::ptr::null_mut()), 0); MAX_GROUP];
            let mut n_jobs = 0;
            let mut total_rows = 0;
            for o in outs[done..].iter_mut() {
                if o.w.ty.vec_dot_type() != act_ty || n_jobs == MAX_GROUP {
                    break;
                }
                jobs[n_jobs] = (Some(o.w), SharedMut(o.y.as_mut_ptr()), total_rows);
                total_rows += o.w.rows();
                n_jobs += 1;
            }
            let jobs = &jobs[..n_jobs];
            let act = &ws.act[..n * act_row];
            self.pool.run(&|i, nt| {
                let mut acc = [0f32; TOKENS_PER_ROW_PASS];
                let mut j = 0;
                for g in split(total_rows, i, nt) {
                    while g >= jobs[j].2 + jobs[j].0.map_or(0, QTensor::rows) {
                        j += 1;
                    }
                    let (w, out, base) = (jobs[j].0.expect("job set"), jobs[j].1, jobs[j].2);
                    let (r, rows) = (g - base, w.rows());
                    let wr = w.row(r);
                    // Each weight row is decoded once per group of activation rows.
                    for t0 in (0..n).step_by(TOKENS_PER_ROW_PASS) {
                        let cnt = (n - t0).min(TOKENS_PER_ROW_PASS);
                        let xs = &act[t0 * act_row..(t0 + cnt) * act_row];
                        quant::vec_dot_multi(w.ty, k, wr, xs, &mut acc[..cnt]);
                        for (dt, &v) in acc[..cnt].iter().enumerate() {
                            // SAFETY: row r of this matrix belongs to this thread alone.
                            unsafe { out.write((t0 + dt) * rows + r, v) };
                        }
                    }
                }
            });
            done += n_jobs;
        }
    }

    fn attention(
        &self,
        p: &AttnParams,
        q: &[f32],
        kv: &KvCache,
        seqs: &[AttnSeq<'_>],
        out: &mut [f32],
        ws: &mut Workspace,
    ) {
        let hd = p.head_dim;
        let row_len = p.n_heads * hd;
        let n_tokens: usize = seqs.iter().map(|s| s.n_tokens).sum();
        assert_eq!(q.len(), n_tokens * row_len);
        assert!(out.len() >= n_tokens * row_len);
        let group = p.n_heads / p.n_kv_heads;
        let bs = kv.layout().block_size;
        let max_ctx = ws.max_ctx;
        for s in seqs {
            assert!(
                s.start_pos + s.n_tokens <= max_ctx.min(s.table.capacity(bs)),
                "attention past the workspace context or the block table"
            );
        }
        let scores = SharedMut(ws.scores.as_mut_ptr());
        let out_ptr = SharedMut(out.as_mut_ptr());
        let items = n_tokens * p.n_heads;
        self.pool.run(&|ti, nt| {
            // SAFETY: each thread has its own scores row.
            let sc = unsafe { scores.slice(ti * max_ctx, max_ctx) };
            let mut seq_idx = 0;
            let mut seq_first_row = 0;
            for item in split(items, ti, nt) {
                let (row, h) = (item / p.n_heads, item % p.n_heads);
                while row >= seq_first_row + seqs[seq_idx].n_tokens {
                    seq_first_row += seqs[seq_idx].n_tokens;
                    seq_idx += 1;
                }
                let s = &seqs[seq_idx];
                let pos = s.start_pos + (row - seq_first_row);
                let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let qh = &q[row * row_len + h * hd..row * row_len + (h + 1) * hd];
                let kvh = h / group;
                // SAFETY: (row, head) items are disjoint between threads.
                let o = unsafe { out_ptr.slice(row * row_len + h * hd, hd) };
                attend_one(kv, p.layer, s, kvh, qh, p.scale, first, pos, sc, o);
            }
        });
    }
}

/// Attention of one query head at position `last` over positions `first..=last`.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    kv: &KvCache,
    layer: usize,
    s: &AttnSeq<'_>,
    kvh: usize,
    qh: &[f32],
    scale: f32,
    first: usize,
    last: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = qh.len();
    let bs = kv.layout().block_size;
    // Sliding-window layers read the table's window-pool blocks.
    let blocks = kv.blocks(layer, s.table);
    let mut max = f32::NEG_INFINITY;
    for pos in first..=last {
        let kb = kv.k_block(layer, blocks[pos / bs], kvh);
        let kr = &kb[(pos % bs) * hd..(pos % bs + 1) * hd];
        let d = quant::dot_f32_f16(qh, kr) * scale;
        scores[pos] = d;
        max = max.max(d);
    }
    let mut sum = 0f64;
    for sc in &mut scores[first..=last] {
        *sc = (*sc - max).exp();
        sum += *sc as f64;
    }
    let inv = (1.0 / sum) as f32;
    out.fill(0.0);
    for pos in first..=last {
        let vb = kv.v_block(layer, blocks[pos / bs], kvh);
        let vr = &vb[(pos % bs) * hd..(pos % bs + 1) * hd];
        quant::axpy_f16(out, scores[pos] * inv, vr);
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
    use crate::backend::Workspace;
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
            let mut ws: Workspace = b.workspace(n, k, 16);
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
        let mut outs: Vec<MatOut<'_>> = ws_
            .iter()
            .zip(ys.iter_mut())
            .map(|(w, y)| MatOut { w, y })
            .collect();
        b.matmul_group(&x, n, &mut outs, &mut ws);
        drop(outs);
        for (i, (a, b)) in separate.iter().zip(&ys).enumerate() {
            assert_eq!(a, b, "matrix {i}");
        }
        assert!(separate[0].iter().any(|v| v.abs() > 1e-3));
    }

    #[test]
    fn attention_is_causal_softmax_over_the_block_table() {
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            window: None,
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
