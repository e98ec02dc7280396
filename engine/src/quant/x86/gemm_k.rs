//! Tiled products for the K-quants (Q4_K, Q5_K, Q6_K) against Q8_K
//! activations: the layout of [`super::gemm`], per 256-value super-block.
//!
//! A panel block holds the eight rows' 256 values as unsigned bytes in 64
//! interleaved vectors, then one i32 vector of the eight rows' scales per
//! sub-block, one of mins per sub-block (Q4_K, Q5_K), and `d` (and `dmin`) as
//! f32 vectors. Per token, each sub-block's integer dot starts at
//! `−OFFSET · Σx` (Q6_K stores `q + 32`; the Q8_K block sums cover exactly its
//! 16-value sub-blocks), is multiplied by the scales and summed over the
//! super-block exactly as in the reference; the mins use the same block sums.

use std::arch::x86_64::*;

use super::{f16_to_f32, ld256, rd_f32, rd_u16, Isa, Q8K_BSUMS, Q8K_BYTES, Q8K_QS};
use crate::quant::blocks::scale_min_k4;
use crate::quant::gemm::PANEL_ROWS;

/// A K-quant format in a panel.
pub(super) trait KPanel {
    /// Bytes per weight block.
    const SIZE: usize;
    /// Values per sub-block (one scale each).
    const SUB: usize;
    /// What [`Self::values`] adds to each value to make it unsigned.
    const OFFSET: i32;
    /// Whether sub-blocks have mins (value = d·sc·q − dmin·m).
    const MIN: bool;
    /// The 256 values as unsigned bytes, 32 per vector, in order.
    unsafe fn values(p: *const u8) -> [__m256i; 8];
    /// `d`, `dmin` and the scales (`256 / SUB` of them) and mins (8).
    unsafe fn scales(p: *const u8, sc: &mut [i32; 16], mn: &mut [i32; 8]) -> (f32, f32);
}

/// Q4_K: 144 bytes (d, dmin, 12 scale bytes, 128 nibble bytes).
pub(super) struct Q4K;
/// Q5_K: 176 bytes (Q4_K's header, 32 bytes of fifth bits, 128 nibble bytes).
pub(super) struct Q5K;
/// Q6_K: 210 bytes (128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, d).
pub(super) struct Q6K;

#[inline(always)]
unsafe fn k4_scales(p: *const u8, sc: &mut [i32; 16], mn: &mut [i32; 8]) -> (f32, f32) {
    let bytes: [u8; 12] = p.add(4).cast::<[u8; 12]>().read_unaligned();
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &bytes);
        sc[j] = i32::from(s);
        mn[j] = i32::from(m);
    }
    (f16_to_f32(rd_u16(p)), f16_to_f32(rd_u16(p.add(2))))
}

impl KPanel for Q4K {
    const SIZE: usize = 144;
    const SUB: usize = 32;
    const OFFSET: i32 = 0;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [__m256i; 8] {
        let m4 = _mm256_set1_epi8(0xF);
        let mut v = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let q = ld256(p.add(16 + 32 * j));
            v[2 * j] = _mm256_and_si256(q, m4);
            v[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
        }
        v
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8, sc: &mut [i32; 16], mn: &mut [i32; 8]) -> (f32, f32) {
        k4_scales(p, sc, mn)
    }
}

impl KPanel for Q5K {
    const SIZE: usize = 176;
    const SUB: usize = 32;
    const OFFSET: i32 = 0;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [__m256i; 8] {
        let m4 = _mm256_set1_epi8(0xF);
        let b4 = _mm256_set1_epi8(16);
        let hbits = ld256(p.add(16));
        let mut v = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let q = ld256(p.add(48 + 32 * j));
            // Chunk j takes bit 2j of qh for its first 32 values, 2j + 1 for the rest.
            let lo = _mm256_set1_epi8((1u8 << (2 * j)) as i8);
            let hi = _mm256_set1_epi8((1u8 << (2 * j + 1)) as i8);
            let bit_lo = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, lo), lo), b4);
            let bit_hi = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, hi), hi), b4);
            v[2 * j] = _mm256_or_si256(_mm256_and_si256(q, m4), bit_lo);
            v[2 * j + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), bit_hi);
        }
        v
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8, sc: &mut [i32; 16], mn: &mut [i32; 8]) -> (f32, f32) {
        k4_scales(p, sc, mn)
    }
}

impl KPanel for Q6K {
    const SIZE: usize = 210;
    const SUB: usize = 16;
    const OFFSET: i32 = 32;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [__m256i; 8] {
        let m15 = _mm256_set1_epi8(15);
        let mut v = [_mm256_setzero_si256(); 8];
        for half in 0..2 {
            let ql0 = ld256(p.add(64 * half));
            let ql1 = ld256(p.add(64 * half + 32));
            let qh = ld256(p.add(128 + 32 * half));
            v[4 * half] = _mm256_or_si256(
                _mm256_and_si256(ql0, m15),
                _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(3))),
            );
            v[4 * half + 1] = _mm256_or_si256(
                _mm256_and_si256(ql1, m15),
                _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12))),
            );
            v[4 * half + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m15),
                _mm256_and_si256(qh, _mm256_set1_epi8(48)),
            );
            v[4 * half + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m15),
                _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(-64))),
            );
        }
        v
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8, sc: &mut [i32; 16], _mn: &mut [i32; 8]) -> (f32, f32) {
        for (j, s) in sc.iter_mut().enumerate() {
            *s = i32::from(*p.add(192 + j) as i8);
        }
        (f16_to_f32(rd_u16(p.add(208))), 0.0)
    }
}

/// Sub-blocks per super-block.
const fn subs<F: KPanel>() -> usize {
    256 / F::SUB
}

/// Byte offsets in a panel block: scales, mins, d, dmin, and the stride.
const fn layout<F: KPanel>() -> (usize, usize, usize, usize, usize) {
    let sc = 64 * 32;
    let mn = sc + subs::<F>() * 32;
    let d = mn + if F::MIN { 8 * 32 } else { 0 };
    let dmin = d + 32;
    let end = dmin + if F::MIN { 32 } else { 0 };
    (sc, mn, d, dmin, end)
}

/// Bytes of a panel of `k`-wide rows.
pub(super) const fn panel_bytes<F: KPanel>(k: usize) -> usize {
    k / 256 * layout::<F>().4
}

/// Unpacks eight rows of `F` (each `rb` bytes, back to back at `src`).
///
/// One row after the other (eight rows read block by block defeat the
/// hardware prefetcher), each row's values stored where the transposed ones
/// go; then each block's values are transposed in place.
///
/// # Safety
/// AVX2; `src` holds eight rows of `nb` blocks and `dst` [`panel_bytes`].
#[inline(always)]
pub(super) unsafe fn pack<F: KPanel>(nb: usize, src: *const u8, dst: *mut u8) {
    let (sc_at, mn_at, d_at, dmin_at, stride) = layout::<F>();
    let rb = nb * F::SIZE;
    for r in 0..PANEL_ROWS {
        for b in 0..nb {
            let w = src.add(r * rb + b * F::SIZE);
            let out = dst.add(b * stride);
            for (c, v) in F::values(w).into_iter().enumerate() {
                _mm256_storeu_si256(out.add(32 * (8 * c + r)).cast(), v);
            }
            let mut sc = [0i32; 16];
            let mut mn = [0i32; 8];
            let (d, dmin) = F::scales(w, &mut sc, &mut mn);
            out.add(d_at + 4 * r).cast::<f32>().write_unaligned(d);
            for (s, &v) in sc.iter().enumerate().take(subs::<F>()) {
                out.add(sc_at + 32 * s + 4 * r)
                    .cast::<i32>()
                    .write_unaligned(v);
            }
            if F::MIN {
                out.add(dmin_at + 4 * r).cast::<f32>().write_unaligned(dmin);
                for (s, &v) in mn.iter().enumerate() {
                    out.add(mn_at + 32 * s + 4 * r)
                        .cast::<i32>()
                        .write_unaligned(v);
                }
            }
        }
    }
    for b in 0..nb {
        for c in 0..8 {
            let at = dst.add(b * stride + 32 * 8 * c);
            let mut v = [_mm256_setzero_si256(); PANEL_ROWS];
            for (r, v) in v.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(at.add(32 * r).cast());
            }
            for (g, t) in super::gemm::transpose8(v).into_iter().enumerate() {
                _mm256_storeu_si256(at.add(32 * g).cast(), t);
            }
        }
    }
}

#[inline(always)]
pub(super) unsafe fn bsum(xb: *const u8, j: usize) -> i32 {
    i32::from(xb.add(Q8K_BSUMS + 2 * j).cast::<i16>().read_unaligned())
}

/// Tokens `t0..t0 + R` (Q8_K rows `act_row` bytes apart from `act`) against
/// the panel of `nb` blocks; results to `out + t * out_stride`.
///
/// # Safety
/// The CPU supports `I`; all pointers cover what they describe.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile<F: KPanel, I: Isa, const R: usize>(
    nb: usize,
    panel: *const u8,
    act: *const u8,
    act_row: usize,
    t0: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let (sc_at, mn_at, d_at, dmin_at, stride) = layout::<F>();
    let groups = F::SUB / 4;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut xs = [act; R];
    for (t, x) in xs.iter_mut().enumerate() {
        *x = act.add((t0 + t) * act_row);
    }
    for b in 0..nb {
        let pb = panel.add(b * stride);
        let mut isum = [_mm256_setzero_si256(); R];
        for s in 0..subs::<F>() {
            let mut w = [_mm256_setzero_si256(); 8];
            for (g, wg) in w.iter_mut().enumerate().take(groups) {
                *wg = ld256(pb.add(32 * (s * groups + g)));
            }
            let sc = ld256(pb.add(sc_at + 32 * s));
            for t in 0..R {
                let xb = xs[t].add(b * Q8K_BYTES);
                let mut d = if F::OFFSET != 0 {
                    _mm256_set1_epi32(-F::OFFSET * bsum(xb, s))
                } else {
                    _mm256_setzero_si256()
                };
                let q = xb.add(Q8K_QS + F::SUB * s);
                for (g, &wg) in w.iter().enumerate().take(groups) {
                    let x4 = q.add(4 * g).cast::<i32>().read_unaligned();
                    d = I::dot_acc(d, wg, _mm256_set1_epi32(x4));
                }
                isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(d, sc));
            }
        }
        let dv = _mm256_loadu_ps(pb.add(d_at).cast());
        for t in 0..R {
            let xb = xs[t].add(b * Q8K_BYTES);
            let dx = _mm256_set1_ps(rd_f32(xb));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dv, dx), acc[t]);
            if F::MIN {
                let mut msum = _mm256_setzero_si256();
                for s in 0..8 {
                    let xsum = _mm256_set1_epi32(bsum(xb, 2 * s) + bsum(xb, 2 * s + 1));
                    let m = ld256(pb.add(mn_at + 32 * s));
                    msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(m, xsum));
                }
                let dmin = _mm256_mul_ps(_mm256_loadu_ps(pb.add(dmin_at).cast()), dx);
                acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), dmin, acc[t]);
            }
        }
    }
    for (t, v) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add((t0 + t) * out_stride), *v);
    }
}
