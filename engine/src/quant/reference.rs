//! Scalar reference kernels for every [`GgmlType`]: dequantize, quantize and dot
//! product, written to reproduce ggml's C reference code operation for operation.
//!
//! "Operation for operation" matters because greedy decoding is compared token by
//! token with llama.cpp: the same f32 expressions are evaluated in the same order
//! (`sumi * dx * dy` is not `sumi * (dx * dy)`), integer sums stay integer, and the
//! rounding functions are the ones ggml uses: `roundf` (ties away from zero) in
//! the Q8_0/Q8_1 quantizers, ties-to-even `nearest_int` in the K-quants and Q8_K,
//! truncating casts in Q4_0..Q5_1, round-to-nearest-even f32 → f16/bf16.
//!
//! Sources: `ggml/src/ggml-quants.c` (`quantize_row_*_ref`, `dequantize_row_*`),
//! `ggml/src/ggml-cpu/quants.c` (`ggml_vec_dot_*_generic`) and
//! `ggml/src/ggml-cpu/vec.cpp` (float dots, scalar path). Bit-exact against that
//! C code compiled with `-ffp-contract=off`. Two things in a real llama.cpp build
//! still differ: GCC's default contraction fuses some `a * b + c` into FMAs, and
//! x86 AVX builds quantize activations with `127 / amax` and ties-to-even instead
//! of `quantize_row_q8_0_ref` (a ±1 in roughly one block in 20 000).

use half::f16;

use super::blocks::{
    scale_min_k4, Block, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K,
    BlockQ6_K, BlockQ8_0, BlockQ8_1, BlockQ8_K, QK, QK_K,
};
use super::GgmlType;

/// ggml's `GROUP_MAX_EPS`: a group whose scale is below this is stored as zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Converts a row of `dst.len()` values of type `ty` to f32.
///
/// Q8_1 has no dequantizer in ggml; here it is `d * q` (its `s` is ignored).
///
/// # Panics
/// If `dst.len()` is not a whole number of blocks or `src.len()` is not
/// `ty.row_bytes(dst.len())`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    expect_row(ty, dst.len(), src.len(), "dequantize_row: src");
    match ty {
        GgmlType::F32 => {
            for (y, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlType::Q4_0 => each_block(src, dst, dequantize_q4_0),
        GgmlType::Q4_1 => each_block(src, dst, dequantize_q4_1),
        GgmlType::Q5_0 => each_block(src, dst, dequantize_q5_0),
        GgmlType::Q5_1 => each_block(src, dst, dequantize_q5_1),
        GgmlType::Q8_0 => each_block(src, dst, |b: &BlockQ8_0, y| {
            scale_i8(b.d.to_f32(), &b.qs, y)
        }),
        GgmlType::Q8_1 => each_block(src, dst, |b: &BlockQ8_1, y| {
            scale_i8(b.d.to_f32(), &b.qs, y)
        }),
        GgmlType::Q4_K => each_block(src, dst, dequantize_q4_k),
        GgmlType::Q5_K => each_block(src, dst, dequantize_q5_k),
        GgmlType::Q6_K => each_block(src, dst, dequantize_q6_k),
        GgmlType::Q8_K => each_block(src, dst, |b: &BlockQ8_K, y| scale_i8(b.d, &b.qs, y)),
    }
}

/// Converts a row of `src.len()` f32 values to type `ty`.
///
/// Activation types (Q8_0, Q8_1, Q8_K, F16, BF16, F32) match llama.cpp's
/// `quantize_row_q8_0_ref` / `_q8_1_ref` / `_q8_K_ref` and its f16/bf16
/// conversions bit for bit. Weight types use ggml's `quantize_row_*_ref`
/// (no importance matrix); they serve tests and test data.
///
/// # Panics
/// If `src.len()` is not a whole number of blocks or `dst.len()` is not
/// `ty.row_bytes(src.len())`.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    expect_row(ty, src.len(), dst.len(), "quantize_row: dst");
    match ty {
        GgmlType::F32 => {
            for (b, &x) in dst.chunks_exact_mut(4).zip(src) {
                b.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (b, &x) in dst.chunks_exact_mut(2).zip(src) {
                b.copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (b, &x) in dst.chunks_exact_mut(2).zip(src) {
                b.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => each_chunk(src, dst, quantize_q4_0),
        GgmlType::Q4_1 => each_chunk(src, dst, quantize_q4_1),
        GgmlType::Q5_0 => each_chunk(src, dst, quantize_q5_0),
        GgmlType::Q5_1 => each_chunk(src, dst, quantize_q5_1),
        GgmlType::Q8_0 => each_chunk(src, dst, quantize_q8_0),
        GgmlType::Q8_1 => each_chunk(src, dst, quantize_q8_1),
        GgmlType::Q4_K => each_chunk(src, dst, quantize_q4_k),
        GgmlType::Q5_K => each_chunk(src, dst, quantize_q5_k),
        GgmlType::Q6_K => each_chunk(src, dst, quantize_q6_k),
        GgmlType::Q8_K => each_chunk(src, dst, quantize_q8_k),
    }
}

/// Dot product of a weight row `w` of `n` values of type `ty` with an activation
/// row `x` of `n` values of `ty.vec_dot_type()`, as ggml's generic kernels
/// compute it: integer sums per block, scaled in f32. Float types multiply in f32
/// and accumulate in f64 (ggml's `ggml_float`).
///
/// Q8_1 × Q8_1 and Q8_K × Q8_K have no kernel in ggml; here they are the integer
/// dot scaled by `dw * dx`.
///
/// # Panics
/// If `n` is not a whole number of blocks or either row has the wrong length.
pub fn vec_dot(ty: GgmlType, w: &[u8], x: &[u8], n: usize) -> f32 {
    expect_row(ty, n, w.len(), "vec_dot: w");
    expect_row(ty.vec_dot_type(), n, x.len(), "vec_dot: x");
    match ty {
        GgmlType::F32 => {
            let le = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let pairs = w.chunks_exact(4).zip(x.chunks_exact(4));
            f64_sum(pairs.map(|(a, b)| le(a) * le(b)))
        }
        GgmlType::F16 => {
            let le = |b: &[u8]| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            let pairs = w.chunks_exact(2).zip(x.chunks_exact(2));
            f64_sum(pairs.map(|(a, b)| le(a) * le(b)))
        }
        GgmlType::BF16 => {
            let le = |b: &[u8]| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let pairs = w.chunks_exact(2).zip(x.chunks_exact(2));
            f64_sum(pairs.map(|(a, b)| le(a) * le(b)))
        }
        GgmlType::Q4_0 => dot_q4_0_q8_0(w, x),
        GgmlType::Q4_1 => dot_q4_1_q8_1(w, x),
        GgmlType::Q5_0 => dot_q5_0_q8_0(w, x),
        GgmlType::Q5_1 => dot_q5_1_q8_1(w, x),
        GgmlType::Q8_0 => dot_q8_0_q8_0(w, x),
        GgmlType::Q8_1 => dot_q8_1_q8_1(w, x),
        GgmlType::Q4_K => dot_q4_k_q8_k(w, x),
        GgmlType::Q5_K => dot_q5_k_q8_k(w, x),
        GgmlType::Q6_K => dot_q6_k_q8_k(w, x),
        GgmlType::Q8_K => dot_q8_k_q8_k(w, x),
    }
}

/// Dot product of two f32 slices: f32 products summed in f64, as ggml's scalar
/// `ggml_vec_dot_f32`.
///
/// # Panics
/// If the lengths differ.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: length mismatch");
    f64_sum(a.iter().zip(b).map(|(&a, &b)| a * b))
}

/// Converts f16 values to f32 (exactly), for reading the KV cache.
///
/// # Panics
/// If the lengths differ.
pub fn f16_to_f32_slice(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32_slice: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

// ---------------------------------------------------------------------------
// Shared helpers

fn expect_row(ty: GgmlType, n: usize, len: usize, what: &str) {
    let Some(want) = ty.row_bytes(n) else {
        panic!(
            "{what}: {n} values are not a whole number of {ty} blocks of {}",
            ty.block_size()
        );
    };
    assert_eq!(
        len, want,
        "{what}: a row of {n} {ty} values takes {want} bytes"
    );
}

/// Dequantizes block by block.
fn each_block<B: Block>(src: &[u8], dst: &mut [f32], f: impl Fn(&B, &mut [f32])) {
    let blocks = src.chunks_exact(B::TYPE.type_size());
    for (bytes, y) in blocks.zip(dst.chunks_exact_mut(B::TYPE.block_size())) {
        f(&B::read(bytes), y);
    }
}

/// Quantizes block by block.
fn each_chunk<B: Block>(src: &[f32], dst: &mut [u8], f: impl Fn(&[f32]) -> B) {
    let chunks = src.chunks_exact(B::TYPE.block_size());
    for (x, out) in chunks.zip(dst.chunks_exact_mut(B::TYPE.type_size())) {
        f(x).write(out);
    }
}

/// The blocks of a weight row paired with those of its activation row.
fn block_pairs<'a, W: Block, X: Block>(
    w: &'a [u8],
    x: &'a [u8],
) -> impl Iterator<Item = (W, X)> + 'a {
    let ws = w.chunks_exact(W::TYPE.type_size()).map(W::read);
    ws.zip(x.chunks_exact(X::TYPE.type_size()).map(X::read))
}

/// Sums f32 terms in f64 and rounds once at the end (ggml's `ggml_float` path).
fn f64_sum(terms: impl Iterator<Item = f32>) -> f32 {
    terms.fold(0.0f64, |s, t| s + f64::from(t)) as f32
}

/// ggml's `nearest_int`: round to nearest, ties to even, by adding 1.5 * 2^23 so
/// that the FPU's rounding lands on an integer in the low mantissa bits. Exact for
/// |x| < 2^22; every caller stays far inside that.
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// The value of largest magnitude, the first one on ties (ggml's `amax`/`max` scan).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even; NaNs stay NaN (quiet).
fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

fn scale_i8(d: f32, qs: &[i8], y: &mut [f32]) {
    for (y, &q) in y.iter_mut().zip(qs) {
        *y = f32::from(q) * d;
    }
}

// ---------------------------------------------------------------------------
// Unpacking: the unsigned level of every value of a block, in value order.

/// Q4_0/Q4_1 levels (0..16): value j in the low nibble of byte j, j + 16 in the high.
fn q4_levels(qs: &[u8; QK / 2]) -> [u8; QK] {
    std::array::from_fn(|i| {
        if i < QK / 2 {
            qs[i] & 0xF
        } else {
            qs[i - QK / 2] >> 4
        }
    })
}

/// Q5_0/Q5_1 levels (0..32): Q4 levels plus bit i of the little-endian `qh` as bit 4.
fn q5_levels(qh: &[u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(*qh);
    let low = q4_levels(qs);
    std::array::from_fn(|i| low[i] | ((((qh >> i) & 1) as u8) << 4))
}

/// Q4_K levels (0..16): each 32-byte chunk of `qs` holds 64 values, low nibbles first.
fn q4_k_levels(qs: &[u8; QK_K / 2]) -> [u8; QK_K] {
    std::array::from_fn(|i| {
        let byte = qs[(i / 64) * 32 + i % 32];
        if i % 64 < 32 {
            byte & 0xF
        } else {
            byte >> 4
        }
    })
}

/// Q5_K levels (0..32): Q4_K levels plus bit (i / 32) of `qh[i % 32]` as bit 4.
fn q5_k_levels(b: &BlockQ5_K) -> [u8; QK_K] {
    let low = q4_k_levels(&b.qs);
    std::array::from_fn(|i| low[i] | (((b.qh[i % 32] >> (i / 32)) & 1) << 4))
}

/// Q6_K values (-32..32): per 128 values, four nibble rows and four bit pairs.
fn q6_k_values(b: &BlockQ6_K) -> [i8; QK_K] {
    std::array::from_fn(|i| {
        let (half, k) = (i / 128, i % 128);
        let (row, l) = (k / 32, k % 32);
        // Rows 0/1 are the low nibbles of ql[l] / ql[l + 32]; rows 2/3 the high ones.
        let ql = b.ql[half * 64 + (row % 2) * 32 + l];
        let low = if row < 2 { ql & 0xF } else { ql >> 4 };
        let high = (b.qh[half * 32 + l] >> (2 * row)) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K block.
fn k4_scales_mins(scales: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let pairs: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(j, scales));
    (pairs.map(|p| p.0), pairs.map(|p| p.1))
}

// ---------------------------------------------------------------------------
// Dequantization, one block

fn dequantize_q4_0(b: &BlockQ4_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (y, q) in y.iter_mut().zip(q4_levels(&b.qs)) {
        *y = (i32::from(q) - 8) as f32 * d;
    }
}

fn dequantize_q4_1(b: &BlockQ4_1, y: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for (y, q) in y.iter_mut().zip(q4_levels(&b.qs)) {
        *y = f32::from(q) * d + m;
    }
}

fn dequantize_q5_0(b: &BlockQ5_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (y, q) in y.iter_mut().zip(q5_levels(&b.qh, &b.qs)) {
        *y = (i32::from(q) - 16) as f32 * d;
    }
}

fn dequantize_q5_1(b: &BlockQ5_1, y: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for (y, q) in y.iter_mut().zip(q5_levels(&b.qh, &b.qs)) {
        *y = f32::from(q) * d + m;
    }
}

/// Q4_K and Q5_K: `d * sc * q - dmin * m` per 32-value sub-block.
fn dequantize_k4(d: f16, dmin: f16, scales: &[u8; 12], levels: &[u8; QK_K], y: &mut [f32]) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let (sc, mn) = k4_scales_mins(scales);
    for (i, (y, &q)) in y.iter_mut().zip(levels).enumerate() {
        let j = i / 32;
        *y = (d * f32::from(sc[j])) * f32::from(q) - dmin * f32::from(mn[j]);
    }
}

fn dequantize_q4_k(b: &BlockQ4_K, y: &mut [f32]) {
    dequantize_k4(b.d, b.dmin, &b.scales, &q4_k_levels(&b.qs), y);
}

fn dequantize_q5_k(b: &BlockQ5_K, y: &mut [f32]) {
    dequantize_k4(b.d, b.dmin, &b.scales, &q5_k_levels(b), y);
}

fn dequantize_q6_k(b: &BlockQ6_K, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (i, (y, q)) in y.iter_mut().zip(q6_k_values(b)).enumerate() {
        *y = d * f32::from(b.scales[i / 16]) * f32::from(q);
    }
}

// ---------------------------------------------------------------------------
// Dot products (ggml_vec_dot_*_generic)

fn int_dot(a: impl Iterator<Item = i32>, b: &[i8]) -> i32 {
    a.zip(b).map(|(a, &b)| a * i32::from(b)).sum()
}

fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ4_0, BlockQ8_0>(w, x) {
        let sumi = int_dot(
            q4_levels(&bw.qs).into_iter().map(|q| i32::from(q) - 8),
            &bx.qs,
        );
        sumf += sumi as f32 * bw.d.to_f32() * bx.d.to_f32();
    }
    sumf
}

fn dot_q4_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ4_1, BlockQ8_1>(w, x) {
        let sumi = int_dot(q4_levels(&bw.qs).into_iter().map(i32::from), &bx.qs);
        // The offset term uses the activation's precomputed d * sum(q).
        sumf += (bw.d.to_f32() * bx.d.to_f32()) * sumi as f32 + bw.m.to_f32() * bx.s.to_f32();
    }
    sumf
}

fn dot_q5_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ5_0, BlockQ8_0>(w, x) {
        let levels = q5_levels(&bw.qh, &bw.qs);
        let sumi = int_dot(levels.into_iter().map(|q| i32::from(q) - 16), &bx.qs);
        sumf += (bw.d.to_f32() * bx.d.to_f32()) * sumi as f32;
    }
    sumf
}

fn dot_q5_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ5_1, BlockQ8_1>(w, x) {
        let sumi = int_dot(q5_levels(&bw.qh, &bw.qs).into_iter().map(i32::from), &bx.qs);
        sumf += (bw.d.to_f32() * bx.d.to_f32()) * sumi as f32 + bw.m.to_f32() * bx.s.to_f32();
    }
    sumf
}

fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ8_0, BlockQ8_0>(w, x) {
        let sumi = int_dot(bw.qs.into_iter().map(i32::from), &bx.qs);
        sumf += sumi as f32 * (bw.d.to_f32() * bx.d.to_f32());
    }
    sumf
}

fn dot_q8_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ8_1, BlockQ8_1>(w, x) {
        let sumi = int_dot(bw.qs.into_iter().map(i32::from), &bx.qs);
        sumf += sumi as f32 * (bw.d.to_f32() * bx.d.to_f32());
    }
    sumf
}

fn dot_q8_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<BlockQ8_K, BlockQ8_K>(w, x) {
        let sumi = int_dot(bw.qs.into_iter().map(i32::from), &bx.qs);
        sumf += sumi as f32 * (bw.d * bx.d);
    }
    sumf
}

/// The K-quant integer core: value i lands in lane i % 8, weighted by its
/// sub-block scale. ggml's generic kernels keep these eight lanes and scale each
/// one separately, which fixes the f32 summation order reproduced here.
fn k_lanes(q8: &[i8; QK_K], values: &[i8; QK_K], scale: impl Fn(usize) -> i32) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    for (i, (&a, &q)) in values.iter().zip(q8).enumerate() {
        aux32[i % 8] += scale(i) * (i32::from(a) * i32::from(q));
    }
    aux32
}

/// Q4_K and Q5_K share everything but the level unpacking.
fn dot_k4_q8_k<W: Block>(
    w: &[u8],
    x: &[u8],
    parts: impl Fn(&W) -> (f16, f16, [u8; 12], [u8; QK_K]),
) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (bw, bx) in block_pairs::<W, BlockQ8_K>(w, x) {
        let (d, dmin, scales, levels) = parts(&bw);
        let (sc, mn) = k4_scales_mins(&scales);
        // The mins meet the activations only through the per-16 sums.
        let summs: i32 = bx
            .bsums
            .iter()
            .enumerate()
            .map(|(j, &s)| i32::from(s) * i32::from(mn[j / 2]))
            .sum();
        let values = levels.map(|q| q as i8);
        let aux32 = k_lanes(&bx.qs, &values, |i| i32::from(sc[i / 32]));
        let dall = d.to_f32() * bx.d;
        for (s, a) in sums.iter_mut().zip(aux32) {
            *s += dall * a as f32;
        }
        sumf -= dmin.to_f32() * bx.d * summs as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

fn dot_q4_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    dot_k4_q8_k(w, x, |b: &BlockQ4_K| {
        (b.d, b.dmin, b.scales, q4_k_levels(&b.qs))
    })
}

fn dot_q5_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    dot_k4_q8_k(w, x, |b: &BlockQ5_K| {
        (b.d, b.dmin, b.scales, q5_k_levels(b))
    })
}

fn dot_q6_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0.0f32; 8];
    for (bw, bx) in block_pairs::<BlockQ6_K, BlockQ8_K>(w, x) {
        let aux32 = k_lanes(&bx.qs, &q6_k_values(&bw), |i| i32::from(bw.scales[i / 16]));
        let d = bw.d.to_f32() * bx.d;
        for (s, a) in sums.iter_mut().zip(aux32) {
            *s += d * a as f32;
        }
    }
    let mut sumf = 0.0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

// ---------------------------------------------------------------------------
// Quantization, one block (quantize_row_*_ref)

fn quantize_q4_0(x: &[f32]) -> BlockQ4_0 {
    // The signed extreme maps to level 0, so the scale may be negative.
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let level = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let qs = std::array::from_fn(|j| level(x[j]) | (level(x[j + QK / 2]) << 4));
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// The block's minimum and (max - min) / `levels` for the `_1` formats.
fn min_and_step(x: &[f32], levels: f32) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, (max - min) / levels)
}

fn quantize_q4_1(x: &[f32]) -> BlockQ4_1 {
    let (min, d) = min_and_step(x, 15.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let level = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    let qs = std::array::from_fn(|j| level(x[j]) | (level(x[j + QK / 2]) << 4));
    BlockQ4_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qs,
    }
}

/// Packs 32 five-bit levels into Q5's `qh` (bit 4 of each) and `qs` (low nibbles).
fn pack_q5(levels: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qh = 0u32;
    for (i, &q) in levels.iter().enumerate() {
        qh |= u32::from((q & 0x10) >> 4) << i;
    }
    let qs = std::array::from_fn(|j| (levels[j] & 0xF) | ((levels[j + QK / 2] & 0xF) << 4));
    (qh.to_le_bytes(), qs)
}

fn quantize_q5_0(x: &[f32]) -> BlockQ5_0 {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let levels = std::array::from_fn(|i| ((x[i] * id + 16.5) as i8).min(31) as u8);
    let (qh, qs) = pack_q5(&levels);
    BlockQ5_0 {
        d: f16::from_f32(d),
        qh,
        qs,
    }
}

fn quantize_q5_1(x: &[f32]) -> BlockQ5_1 {
    let (min, d) = min_and_step(x, 31.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // No clamp in ggml: (x - min) * id stays within 31.5 for finite input.
    let levels = std::array::from_fn(|i| ((x[i] - min) * id + 0.5) as u8);
    let (qh, qs) = pack_q5(&levels);
    BlockQ5_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qh,
        qs,
    }
}

/// Scale and values of Q8_0/Q8_1: `d = amax / 127`, values `roundf(x / d)`.
fn q8_scale_values(x: &[f32]) -> (f32, [i8; QK]) {
    let amax = x
        .iter()
        .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // f32::round is C's roundf: ties away from zero.
    (d, std::array::from_fn(|j| (x[j] * id).round() as i8))
}

fn quantize_q8_0(x: &[f32]) -> BlockQ8_0 {
    let (d, qs) = q8_scale_values(x);
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

fn quantize_q8_1(x: &[f32]) -> BlockQ8_1 {
    let (d, qs) = q8_scale_values(x);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    BlockQ8_1 {
        d: f16::from_f32(d),
        s: f16::from_f32(sum as f32 * d),
        qs,
    }
}

fn quantize_q8_k(x: &[f32]) -> BlockQ8_K {
    let max = signed_absmax(x);
    if max == 0.0 {
        // ggml leaves bsums untouched here; zero is what a fresh buffer holds.
        return BlockQ8_K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        };
    }
    // The extreme value maps to -127 whatever its sign; d carries the sign.
    let iscale = -127.0 / max;
    let qs: [i8; QK_K] = std::array::from_fn(|j| nearest_int(iscale * x[j]).min(127) as i8);
    let bsums =
        std::array::from_fn(|j| qs[16 * j..16 * j + 16].iter().map(|&q| i16::from(q)).sum());
    BlockQ8_K {
        d: 1.0 / iscale,
        qs,
        bsums,
    }
}

/// ggml's `make_qkx2_quants` (squared error, no MAD): fits `x ≈ scale * l - min`
/// with `l` in `0..=nmax` by trying `nstep + 1` candidate scales around the
/// min/max fit and keeping the weighted least-squares best. Returns
/// `(scale, min)` with the min as a positive offset.
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels[..n].fill(0);
        return (0.0, -min);
    }
    let quantize =
        |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        levels[i] = quantize(iscale, x[i], min);
        let diff = scale * f32::from(levels[i]) + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; QK];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            aux[i] = quantize(iscale, x[i], min);
            let l = f32::from(aux[i]);
            let w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The common part of Q4_K and Q5_K: per 32-value sub-block a (scale, min) fit,
/// both quantized to 6 bits against the block maxima, then every value
/// re-quantized against the stored scales. Returns `(d, dmin, scales, levels)`.
fn quantize_k4_levels(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let (scale, min) =
            make_qkx2_quants(xs, &weights, nmax, &mut levels[32 * j..], rmin, 0.1, nstep);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // ggml stores nearest_int into a u8 before clamping: keep the wrap.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);

    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

fn quantize_q4_k(x: &[f32]) -> BlockQ4_K {
    let (d, dmin, scales, levels) = quantize_k4_levels(x, 15, -1.0, 20);
    let qs = std::array::from_fn(|i| {
        let (chunk, l) = (i / 32, i % 32);
        levels[64 * chunk + l] | (levels[64 * chunk + l + 32] << 4)
    });
    BlockQ4_K {
        d,
        dmin,
        scales,
        qs,
    }
}

fn quantize_q5_k(x: &[f32]) -> BlockQ5_K {
    let (d, dmin, scales, levels) = quantize_k4_levels(x, 31, -0.5, 15);
    let mut qh = [0u8; QK_K / 8];
    let mut qs = [0u8; QK_K / 2];
    for chunk in 0..4 {
        for l in 0..32 {
            let lo = levels[64 * chunk + l];
            let hi = levels[64 * chunk + l + 32];
            qh[l] |= ((lo >> 4) << (2 * chunk)) | ((hi >> 4) << (2 * chunk + 1));
            qs[32 * chunk + l] = (lo & 0xF) | ((hi & 0xF) << 4);
        }
    }
    BlockQ5_K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights: a
/// symmetric fit `x ≈ scale * (l - nmax)` weighted by `x²`, trying 18 scales
/// around `nmax / max`. Writes `l + nmax` (in `0..2 * nmax`) to `levels`.
fn make_qx_quants(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        levels[..x.len()].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Weighted sums of x * l and l * l, with weight x².
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, levels: &mut [u8]| {
        for (dst, &v) in levels.iter_mut().zip(x) {
            *dst = (level(iscale, v) + nmax) as u8;
        }
    };

    let iscale = -(nmax as f32) / max;
    store(iscale, levels);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn quantize_q6_k(x: &[f32]) -> BlockQ6_K {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for (ib, scale) in scales.iter_mut().enumerate() {
        *scale = make_qx_quants(
            &x[16 * ib..16 * ib + 16],
            32,
            &mut levels[16 * ib..16 * ib + 16],
        );
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return BlockQ6_K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: f16::ZERO,
        };
    }

    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; QK_K / 16] =
        std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for (j, &s) in sc.iter().enumerate() {
        let dj = d.to_f32() * f32::from(s);
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }

    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for half in 0..2 {
        let lv = &levels[128 * half..128 * half + 128];
        for l in 0..32 {
            ql[64 * half + l] = (lv[l] & 0xF) | ((lv[l + 64] & 0xF) << 4);
            ql[64 * half + l + 32] = (lv[l + 32] & 0xF) | ((lv[l + 96] & 0xF) << 4);
            qh[32 * half + l] = (lv[l] >> 4)
                | ((lv[l + 32] >> 4) << 2)
                | ((lv[l + 64] >> 4) << 4)
                | ((lv[l + 96] >> 4) << 6);
        }
    }
    BlockQ6_K {
        ql,
        qh,
        scales: sc,
        d,
    }
}
