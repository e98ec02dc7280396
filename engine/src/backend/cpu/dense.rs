//! Dense f32 products for large batches: the vision encoder's projections
//! over every patch of an image (F32, F16 or BF16 weights) and attention
//! inside an image, where each product has hundreds to thousands of rows.
//!
//! `C[i][j] = Σ_k A[i][k] · B[j][k]` in f32, blocked as Goto's GEMM: a block
//! of `NC` columns of B times `KC` of depth is packed into panels of `NR`
//! columns (converted to f32 on the way: half-precision weights are read once
//! per block, not once per row of A), and a register-blocked micro-kernel
//! multiplies `MR` rows of A with one panel, reusing each loaded B vector
//! `MR` times and each A value `NR` times. The micro-kernel is plain Rust
//! compiled for AVX-512 or AVX2 + FMA where the CPU has them.
//!
//! Unlike the quantized products these depend on the batch (blocking changes
//! the order of the sums); the text decoder does not use them.

use half::{bf16, f16};

use crate::quant::{self, GgmlType};
use crate::tensor::QTensor;

/// Columns of B per panel (one AVX-512 vector of f32).
const NR: usize = 16;
/// Depth per packed block.
const KC: usize = 256;
/// Columns of B per packed block.
const NC: usize = 256;

/// Where B's values come from: `B[j][k]` for output column `j`, depth `k`.
#[derive(Clone, Copy)]
pub(crate) enum BSrc<'a> {
    /// `b[j * ld + k]` (weight rows, keys).
    Rows { b: &'a [f32], ld: usize },
    /// `b[k * ld + j]` (values, for `P · V`).
    Cols { b: &'a [f32], ld: usize },
    /// Rows of a half-precision weight, `row_bytes` apart.
    Half {
        bytes: &'a [u8],
        row_bytes: usize,
        ty: GgmlType,
    },
    /// Rows of a block-quantized weight, dequantized as they are packed.
    Quant(&'a QTensor),
}

impl BSrc<'_> {
    /// Packs columns `j0..j0 + nr` (nr ≤ NR) over depths `k0..k0 + kc` as
    /// `out[k * NR + j]`, zero past `nr`.
    fn pack(&self, j0: usize, nr: usize, k0: usize, kc: usize, out: &mut [f32]) {
        out[..kc * NR].fill(0.0);
        match *self {
            BSrc::Rows { b, ld } => {
                for j in 0..nr {
                    let row = &b[(j0 + j) * ld + k0..][..kc];
                    for (k, &v) in row.iter().enumerate() {
                        out[k * NR + j] = v;
                    }
                }
            }
            BSrc::Cols { b, ld } => {
                for k in 0..kc {
                    let src = &b[(k0 + k) * ld + j0..][..nr];
                    out[k * NR..k * NR + nr].copy_from_slice(src);
                }
            }
            BSrc::Half {
                bytes,
                row_bytes,
                ty,
            } => {
                // Whole rows converted at once (F16C where the CPU has it),
                // then laid into the panel.
                let mut tmp = [0f32; KC];
                let mut bits = [0u16; KC];
                for j in 0..nr {
                    let row = &bytes[(j0 + j) * row_bytes + k0 * 2..][..kc * 2];
                    for (b, h) in bits.iter_mut().zip(row.chunks_exact(2)) {
                        *b = u16::from_le_bytes([h[0], h[1]]);
                    }
                    match ty {
                        GgmlType::BF16 => {
                            for (t, &b) in tmp.iter_mut().zip(&bits[..kc]) {
                                *t = bf16::from_bits(b).to_f32();
                            }
                        }
                        _ => {
                            let halves: &[f16] = bytemuck_f16(&bits[..kc]);
                            half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                halves,
                                &mut tmp[..kc],
                            );
                        }
                    }
                    for (k, &v) in tmp[..kc].iter().enumerate() {
                        out[k * NR + j] = v;
                    }
                }
            }
            BSrc::Quant(w) => {
                // Depth blocks start on a quantization block (KC is a
                // multiple of every block size).
                let mut tmp = [0f32; KC];
                let at = |n: usize| w.ty.row_bytes(n).expect("whole blocks");
                for j in 0..nr {
                    let row = &w.row(j0 + j)[at(k0)..at(k0 + kc)];
                    quant::dequantize_row(w.ty, row, &mut tmp[..kc]);
                    for (k, &v) in tmp[..kc].iter().enumerate() {
                        out[k * NR + j] = v;
                    }
                }
            }
        }
    }
}

/// `u16` bit patterns as `f16` values (the same bits).
fn bytemuck_f16(bits: &[u16]) -> &[f16] {
    // SAFETY: f16 is a transparent wrapper of u16: same size, alignment and
    // every bit pattern valid.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast::<f16>(), bits.len()) }
}

/// Whether a matrix of `ty` with rows of `k` runs as f32 products over
/// dequantized panels rather than on the int8 tiled kernels: on x86 CPUs
/// without VNNI, for formats whose blocks divide the packing depth.
pub(crate) fn quantized_in_f32(ty: GgmlType, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let avx2_only = matches!(Level::get(), Level::Avx2);
    #[cfg(not(target_arch = "x86_64"))]
    let avx2_only = false;
    let blocks_fit = ty.block_size() > 1
        && KC.is_multiple_of(ty.block_size())
        && k.is_multiple_of(ty.block_size());
    avx2_only && blocks_fit && !matches!(ty, GgmlType::Q8_K)
}

/// Scratch of one thread: a packed block of B and a padded block of A.
#[derive(Default)]
pub(crate) struct Scratch {
    panels: Vec<f32>,
    a_pad: Vec<f32>,
}

/// `C[i][j] (+)= Σ_k A[i][k] · B[j][k]` for `i < m`, `j < n`, `k < k_len`:
/// A is `a[i * lda + k]`, C is `c[i * ldc + j]`; `add` accumulates into C.
/// Runs on the calling thread.
///
/// # Panics
/// If a slice is too short for the shapes given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (a, lda): (&[f32], usize),
    b: BSrc<'_>,
    (c, ldc): (&mut [f32], usize),
    (m, n, k_len): (usize, usize, usize),
    add: bool,
    s: &mut Scratch,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k_len && c.len() >= (m - 1) * ldc + n);
    let level = Level::get();
    let mr = level.mr();
    s.panels.resize(NC * KC, 0.0);
    s.a_pad.resize(MR_MAX * KC, 0.0);
    let mut acc = [[0f32; NR]; MR_MAX];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for kc0 in (0..k_len.max(1)).step_by(KC) {
            let kc = KC.min(k_len - kc0);
            for (p, j0) in (jc..jc + nc).step_by(NR).enumerate() {
                let nr = NR.min(jc + nc - j0);
                b.pack(j0, nr, kc0, kc, &mut s.panels[p * KC * NR..]);
            }
            let first = kc0 == 0 && !add;
            for i0 in (0..m).step_by(mr) {
                let rows = mr.min(m - i0);
                // A's rows straight from A; a short last block is copied and
                // zero-padded to mr rows.
                let (ab, ablda) = if rows == mr {
                    (&a[i0 * lda + kc0..], lda)
                } else {
                    for r in 0..mr {
                        let dst = &mut s.a_pad[r * KC..r * KC + kc];
                        if r < rows {
                            dst.copy_from_slice(&a[(i0 + r) * lda + kc0..][..kc]);
                        } else {
                            dst.fill(0.0);
                        }
                    }
                    (&s.a_pad[..], KC)
                };
                for (p, j0) in (jc..jc + nc).step_by(NR).enumerate() {
                    let nr = NR.min(jc + nc - j0);
                    for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                        let at = (i0 + r) * ldc + j0;
                        if first {
                            *acc_r = [0.0; NR];
                        } else if nr == NR {
                            *acc_r = c[at..at + NR].try_into().expect("NR wide");
                        } else {
                            acc_r[..nr].copy_from_slice(&c[at..at + nr]);
                        }
                    }
                    level.micro((ab, ablda), &s.panels[p * KC * NR..], kc, &mut acc);
                    for (r, acc_r) in acc.iter().enumerate().take(rows) {
                        let at = (i0 + r) * ldc + j0;
                        if nr == NR {
                            let dst: &mut [f32; NR] =
                                (&mut c[at..at + NR]).try_into().expect("NR wide");
                            *dst = *acc_r;
                        } else {
                            c[at..at + nr].copy_from_slice(&acc_r[..nr]);
                        }
                    }
                }
            }
        }
    }
}

/// Most rows of A per micro-kernel call.
const MR_MAX: usize = 8;

/// The instruction set the micro-kernel runs with.
#[derive(Clone, Copy)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    fn get() -> Self {
        #[cfg(target_arch = "x86_64")]
        match crate::quant::x86::best() {
            Some(crate::quant::x86::Level::Avx512) => return Level::Avx512,
            Some(crate::quant::x86::Level::Avx2) => return Level::Avx2,
            None => {}
        }
        Level::Scalar
    }

    /// Rows of A per call: as many accumulators as the registers hold.
    fn mr(self) -> usize {
        match self {
            Level::Scalar => 4,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => 6,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => 8,
        }
    }

    /// `acc[r][j] += Σ_k a[r * lda + k] · panel[k * NR + j]` for `r < mr()`.
    fn micro(self, a: (&[f32], usize), panel: &[f32], kc: usize, acc: &mut [[f32; NR]; MR_MAX]) {
        assert!(a.0.len() >= (self.mr() - 1) * a.1 + kc && panel.len() >= kc * NR && kc <= KC);
        match self {
            Level::Scalar => micro_body::<4, false>(a, panel, kc, acc),
            // SAFETY: the level was detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { micro_avx2(a, panel, kc, acc) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { micro_avx512(a, panel, kc, acc) },
        }
    }

    /// [`softmax_rows`] compiled for this level.
    fn softmax(self, s: &mut [f32], len: usize, scale: f32) {
        match self {
            Level::Scalar => softmax_body(s, len, scale),
            // SAFETY: the level was detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { softmax_avx2(s, len, scale) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { softmax_avx512(s, len, scale) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn micro_avx2(a: (&[f32], usize), panel: &[f32], kc: usize, acc: &mut [[f32; NR]; MR_MAX]) {
    micro_body::<6, true>(a, panel, kc, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
fn micro_avx512(a: (&[f32], usize), panel: &[f32], kc: usize, acc: &mut [[f32; NR]; MR_MAX]) {
    micro_body::<8, true>(a, panel, kc, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(s: &mut [f32], len: usize, scale: f32) {
    softmax_body(s, len, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
fn softmax_avx512(s: &mut [f32], len: usize, scale: f32) {
    softmax_body(s, len, scale)
}

/// The micro-kernel, written for the compiler to keep `MR × NR`
/// accumulators in vector registers.
#[inline(always)]
fn micro_body<const MR: usize, const FMA: bool>(
    (a, lda): (&[f32], usize),
    panel: &[f32],
    kc: usize,
    acc: &mut [[f32; NR]; MR_MAX],
) {
    let mut t = [[0f32; NR]; MR];
    for (r, row) in t.iter_mut().enumerate() {
        *row = acc[r];
    }
    for (k, b) in panel.chunks_exact(NR).take(kc).enumerate() {
        let b: &[f32; NR] = b.try_into().expect("NR wide");
        for (r, row) in t.iter_mut().enumerate() {
            let av = a[r * lda + k];
            for (x, &bv) in row.iter_mut().zip(b) {
                *x = if FMA {
                    av.mul_add(bv, *x)
                } else {
                    *x + av * bv
                };
            }
        }
    }
    for (r, row) in t.iter().enumerate() {
        acc[r] = *row;
    }
}

/// `e^x` to about 2 ulp for x in [-87, 88], in a form the compiler
/// vectorizes (softmax over thousands of keys per query).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Softmax of each `len`-wide row of `s` times `scale`, in place.
pub(crate) fn softmax_rows(s: &mut [f32], len: usize, scale: f32) {
    Level::get().softmax(s, len, scale)
}

#[inline(always)]
fn softmax_body(s: &mut [f32], len: usize, scale: f32) {
    for row in s.chunks_exact_mut(len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
        // Partial sums in lanes, so the sum vectorizes too.
        let mut lanes = [0f32; 16];
        for chunk in row.chunks_mut(16) {
            for (v, l) in chunk.iter_mut().zip(lanes.iter_mut()) {
                *v = exp(*v * scale - max);
                *l += *v;
            }
        }
        let inv = 1.0 / lanes.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> f32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn gemm_matches_the_naive_sum_for_every_shape_and_source() {
        let mut s = 3;
        let mut scratch = Scratch::default();
        for (m, n, k) in [
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (9, 270, 513),
            (20, 16, 256),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * k + i / n]).collect();
            let halves: Vec<u8> = b
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect();
            let want = |i: usize, j: usize, half: bool| -> f32 {
                (0..k)
                    .map(|kk| {
                        let bv = if half {
                            f16::from_f32(b[j * k + kk]).to_f32()
                        } else {
                            b[j * k + kk]
                        };
                        a[i * k + kk] * bv
                    })
                    .sum()
            };
            let srcs = [
                (BSrc::Rows { b: &b, ld: k }, false),
                (BSrc::Cols { b: &bt, ld: n }, false),
                (
                    BSrc::Half {
                        bytes: &halves,
                        row_bytes: 2 * k,
                        ty: GgmlType::F16,
                    },
                    true,
                ),
            ];
            for (src, half) in srcs {
                let mut c = vec![1.0f32; m * n];
                gemm((&a, k), src, (&mut c, n), (m, n, k), true, &mut scratch);
                for i in 0..m {
                    for j in 0..n {
                        let w = 1.0 + want(i, j, half);
                        assert!((c[i * n + j] - w).abs() < 1e-4, "{m}x{n}x{k} ({i},{j})");
                    }
                }
            }
            if k % 32 == 0 {
                // Q8_0 rows, dequantized as they are packed.
                let rb = GgmlType::Q8_0.row_bytes(k).unwrap();
                let mut bytes = vec![0u8; n * rb];
                for (j, dst) in bytes.chunks_exact_mut(rb).enumerate() {
                    quant::quantize_row(GgmlType::Q8_0, &b[j * k..(j + 1) * k], dst);
                }
                let w = QTensor {
                    name: "q".into(),
                    ty: GgmlType::Q8_0,
                    shape: vec![k, n],
                    data: crate::tensor::Bytes::from_vec(bytes),
                };
                let mut c = vec![0.0f32; m * n];
                gemm(
                    (&a, k),
                    BSrc::Quant(&w),
                    (&mut c, n),
                    (m, n, k),
                    false,
                    &mut scratch,
                );
                let mut row = vec![0f32; k];
                for j in 0..n {
                    quant::dequantize_row(GgmlType::Q8_0, w.row(j), &mut row);
                    for i in 0..m {
                        let want: f32 = (0..k).map(|kk| a[i * k + kk] * row[kk]).sum();
                        assert!((c[i * n + j] - want).abs() < 1e-4, "q8_0 {m}x{n}x{k}");
                    }
                }
            }
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "{x}: {got} vs {want}"
            );
        }
    }
}
