//! The tiled products' results for a single token, straight from the weight
//! rows: no panel is unpacked, which for one token (decode) costs more than
//! the products themselves.
//!
//! The eight rows are read one after the other, each as one sequential
//! stream (eight rows interleaved block by block defeat the hardware
//! prefetcher). A row's block values are dotted with the token, the integer
//! sums of eight blocks reduced into one vector at a time, and from there
//! every f32 operation is the one [`super::gemm`]'s tile makes for that row's
//! lane, in the same order, on the same scales. Integer sums are exact in any
//! order, so both paths give a token the same bits and callers may pick
//! either by token count.

use std::arch::x86_64::*;

use super::gemm::{check_products, Panel};
use super::gemm_k::{bsum, KPanel, Q4K, Q5K, Q6K};
use super::{
    f16_to_f32, ld256, rd_f32, rd_i32, rd_u16, Avx2, Avx512, Isa, Level, Q4_0, Q4_1, Q5_0, Q5_1,
    Q8K_BSUMS, Q8K_BYTES, Q8K_QS, Q8_0,
};
use crate::quant::gemm::{META_BYTES, PANEL_ROWS};
use crate::quant::GgmlType;

/// [`super::gemm::multiply_at`]'s results for `rows` ([`PANEL_ROWS`] weight
/// rows of `ty`, back to back) instead of their panel.
///
/// # Panics
/// If the level is not available, the type has no tiled kernel there, or a
/// length is wrong.
#[allow(clippy::too_many_arguments)]
pub fn multiply_rows_at(
    level: Level,
    ty: GgmlType,
    k: usize,
    rows: &[u8],
    act: &[u8],
    meta: &[u8],
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let (nb, act_row) = check_products(level, ty, k, act, meta, n, out, out_stride);
    let rb = ty.row_bytes(k).expect("whole blocks: checked");
    assert_eq!(rows.len(), PANEL_ROWS * rb, "gemm: rows");
    if n == 0 {
        return;
    }
    let a = Args {
        nb,
        rows: rows.as_ptr(),
        rb,
        act: act.as_ptr(),
        act_row,
        meta: meta.as_ptr(),
        out: out.as_mut_ptr(),
        out_stride,
    };
    // SAFETY: level available; lengths checked above.
    unsafe {
        match level {
            Level::Avx2 => rows_avx2(ty, n, a),
            Level::Avx512 => rows_avx512(ty, n, a),
        }
    }
}

/// Pointers and strides of one [`multiply_rows_at`] call.
#[derive(Clone, Copy)]
struct Args {
    nb: usize,
    rows: *const u8,
    rb: usize,
    act: *const u8,
    act_row: usize,
    meta: *const u8,
    out: *mut f32,
    out_stride: usize,
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(ty: GgmlType, n: usize, a: Args) {
    rows_body::<Avx2>(ty, n, a)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_avx512(ty: GgmlType, n: usize, a: Args) {
    rows_body::<Avx512>(ty, n, a)
}

#[inline(always)]
unsafe fn rows_body<I: Isa>(ty: GgmlType, n: usize, a: Args) {
    match ty {
        GgmlType::Q4_0 => tiles::<Q4_0, I>(n, a),
        GgmlType::Q4_1 => tiles::<Q4_1, I>(n, a),
        GgmlType::Q5_0 => tiles::<Q5_0, I>(n, a),
        GgmlType::Q5_1 => tiles::<Q5_1, I>(n, a),
        GgmlType::Q8_0 => tiles::<Q8_0, I>(n, a),
        GgmlType::Q4_K => tiles_k::<Q4K, I>(n, a),
        GgmlType::Q5_K => tiles_k::<Q5K, I>(n, a),
        GgmlType::Q6_K => tiles_k::<Q6K, I>(n, a),
        _ => unreachable!(),
    }
}

#[inline(always)]
unsafe fn tiles<F: Panel, I: Isa>(n: usize, a: Args) {
    for t in 0..n {
        direct::<F, I>(t, a);
    }
}

#[inline(always)]
unsafe fn tiles_k<F: KPanel, I: Isa>(n: usize, a: Args) {
    for t in 0..n {
        direct_k::<F, I>(t, a);
    }
}

/// Lane r: the sum of the eight lanes of `p[r]`.
#[inline(always)]
unsafe fn reduce8(p: [__m256i; 8]) -> __m256i {
    let t0 = _mm256_hadd_epi32(p[0], p[1]);
    let t1 = _mm256_hadd_epi32(p[2], p[3]);
    let t2 = _mm256_hadd_epi32(p[4], p[5]);
    let t3 = _mm256_hadd_epi32(p[6], p[7]);
    // Per 128-bit half: rows 0..4 in u0, 4..8 in u1.
    let u0 = _mm256_hadd_epi32(t0, t1);
    let u1 = _mm256_hadd_epi32(t2, t3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(u0, u1),
        _mm256_permute2x128_si256::<0x31>(u0, u1),
    )
}

/// Token `t` of a 32-value block format, one row after the other (one
/// sequential stream from memory). Eight consecutive blocks' integer sums
/// are reduced into one vector at a time; the f32 operations are then the
/// tile's, for one lane, block by block.
#[inline(always)]
unsafe fn direct<F: Panel, I: Isa>(t: usize, a: Args) {
    let x_size = if F::MIN { 36 } else { 34 };
    let x_head = x_size - 32;
    let off = _mm256_set1_epi8(F::OFFSET as i8);
    let zero = _mm256_setzero_si256();
    let xs = a.act.add(t * a.act_row + x_head);
    let meta = a.meta.add(t * a.nb * META_BYTES);
    let mut out = [0f32; PANEL_ROWS];
    for (r, out) in out.iter_mut().enumerate() {
        let row = a.rows.add(r * a.rb);
        let mut acc = 0f32;
        for b0 in (0..a.nb).step_by(8) {
            let blocks = 8.min(a.nb - b0);
            let mut p = [zero; 8];
            for (c, p) in p.iter_mut().enumerate().take(blocks) {
                let b = b0 + c;
                let v = _mm256_add_epi8(F::values::<I>(row.add(b * F::SIZE)), off);
                *p = I::dot_acc(zero, v, ld256(xs.add(b * x_size)));
            }
            let mut sums = [0i32; 8];
            _mm256_storeu_si256(sums.as_mut_ptr().cast(), reduce8(p));
            for (c, &sum) in sums.iter().enumerate().take(blocks) {
                let b = b0 + c;
                let (w, mb) = (row.add(b * F::SIZE), meta.add(b * META_BYTES));
                let mut s = sum;
                if F::OFFSET != 0 {
                    s = s.wrapping_add(-F::OFFSET * rd_i32(mb.add(4)));
                }
                // From here on, the tile's operations exactly.
                let scale = f16_to_f32(rd_u16(w)) * rd_f32(mb);
                if F::MIN {
                    let ms = f16_to_f32(rd_u16(w.add(2))) * rd_f32(mb.add(4));
                    acc += (s as f32).mul_add(scale, ms);
                } else {
                    acc = (s as f32).mul_add(scale, acc);
                }
            }
        }
        *out = acc;
    }
    _mm256_storeu_ps(a.out.add(t * a.out_stride), _mm256_loadu_ps(out.as_ptr()));
}

/// Token `t` of a K-quant (Q8_K activations), one row after the other (one
/// sequential stream from memory); per super-block, the tile's operations
/// for one lane.
#[inline(always)]
unsafe fn direct_k<F: KPanel, I: Isa>(t: usize, a: Args) {
    let zero = _mm256_setzero_si256();
    let xt = a.act.add(t * a.act_row);
    let mut out = [0f32; PANEL_ROWS];
    for (r, out) in out.iter_mut().enumerate() {
        let row = a.rows.add(r * a.rb);
        let mut acc = 0f32;
        for b in 0..a.nb / 8 {
            let w = row.add(b * F::SIZE);
            let xb = xt.add(b * Q8K_BYTES);
            let vals = F::values(w);
            let mut sc = [0i32; 16];
            let mut mn = [0i32; 8];
            let (d, dmin) = F::scales(w, &mut sc, &mut mn);
            let mut p = zero;
            for (c, &v) in vals.iter().enumerate() {
                let dot = I::dot_acc(zero, v, ld256(xb.add(Q8K_QS + 32 * c)));
                // The scale of each 4-value lane: one sub-block per vector,
                // or two (Q6_K's 16-value sub-blocks).
                let scale = if F::SUB == 32 {
                    _mm256_set1_epi32(sc[c])
                } else {
                    let pair =
                        _mm256_castsi128_si256(_mm_loadl_epi64(sc.as_ptr().add(2 * c).cast()));
                    _mm256_permutevar8x32_epi32(pair, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1))
                };
                p = _mm256_add_epi32(p, _mm256_mullo_epi32(dot, scale));
            }
            if F::OFFSET != 0 {
                // −OFFSET · Σ scale · block sum, in lanes the sum below adds up.
                let s16 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(
                    _mm256_loadu_si256(sc.as_ptr().cast()),
                    _mm256_loadu_si256(sc.as_ptr().add(8).cast()),
                ));
                let o = _mm256_madd_epi16(s16, ld256(xb.add(Q8K_BSUMS)));
                p = _mm256_sub_epi32(p, _mm256_mullo_epi32(o, _mm256_set1_epi32(F::OFFSET)));
            }
            let isum = hsum_i32(p);
            // From here on, the tile's operations exactly.
            let dx = rd_f32(xb);
            acc = (isum as f32).mul_add(d * dx, acc);
            if F::MIN {
                let mut msum = 0i32;
                for (s, &m) in mn.iter().enumerate() {
                    let xsum = bsum(xb, 2 * s) + bsum(xb, 2 * s + 1);
                    msum = msum.wrapping_add(m.wrapping_mul(xsum));
                }
                acc = (-(msum as f32)).mul_add(dmin * dx, acc);
            }
        }
        *out = acc;
    }
    _mm256_storeu_ps(a.out.add(t * a.out_stride), _mm256_loadu_ps(out.as_ptr()));
}

/// The sum of the eight i32 lanes (wrapping, as the vector adds).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
