//! The tiled products' results for a few tokens, straight from the weight
//! rows: no panel is unpacked, which for one token (decode) costs more than
//! the products themselves (for the K-quants, up to four tokens).
//!
//! The eight rows are read one after the other, each as one sequential
//! stream (eight rows interleaved block by block defeat the hardware
//! prefetcher). A row's block values are dotted with the token, the integer
//! sums of eight blocks reduced into one vector at a time, and from there
//! every f32 operation is the one [`super::gemm`]'s tile makes for that row's
//! lane, in the same order, on the same scales (made as vectors over the
//! blocks, then transposed to the tile's layout for the additions). Integer
//! sums are exact in any order, so both paths give a token the same bits and
//! callers may pick either by token count.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::gemm::{check_products, f16x8, transpose8, Panel};
use super::gemm_k::{bsum, KPanel, Q4K, Q5K, Q6K};
use super::{
    ld256, rd_f32, Avx2, Avx512, Isa, Level, Q4_0, Q4_1, Q5_0, Q5_1, Q8K_BSUMS, Q8K_BYTES, Q8K_QS,
    Q8_0,
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

/// Tokens per pass over the rows of a K-quant: one f32 accumulator each per row.
const TOKENS: usize = 8;

/// Eight-block chunks per segment of a 32-value format's rows: [`direct`]
/// keeps a segment's terms of all eight rows (8 KiB) before adding them up.
const SEGMENT: usize = 16;

#[inline(always)]
unsafe fn tiles<F: Panel, I: Isa>(n: usize, a: Args) {
    for t in 0..n {
        direct::<F, I>(t, a);
    }
}

#[inline(always)]
unsafe fn tiles_k<F: KPanel, I: Isa>(n: usize, a: Args) {
    if n == 1 {
        // Decode: a pass the compiler lays out for exactly one token.
        return direct_k::<F, I, 1>(0, 1, a);
    }
    for t0 in (0..n).step_by(TOKENS) {
        direct_k::<F, I, TOKENS>(t0, TOKENS.min(n - t0), a);
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

/// The two 4-byte fields of `n` (at most eight) consecutive [`META_BYTES`]
/// records at `m`: lane c holds record c's first field in the first vector,
/// its second in the second; lanes from `n` on are zero.
#[inline(always)]
unsafe fn meta8(m: *const u8, n: usize) -> (__m256, __m256) {
    let (lo, hi) = if n == 8 {
        (_mm256_loadu_ps(m.cast()), _mm256_loadu_ps(m.add(32).cast()))
    } else {
        // Lane i of the first load is record i / 2's; of the second, 4 + i / 2's.
        let lane = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        let first = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
        let second = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32 - 4), lane);
        (
            _mm256_maskload_ps(m.cast(), first),
            _mm256_maskload_ps(m.add(32).cast(), second),
        )
    };
    // Per 128-bit half: records 0, 1, 4, 5 and 2, 3, 6, 7; then in order.
    let d = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
    let e = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
    let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
    (order(d), order(e))
}

/// For `n` (at most eight) blocks of a 32-value format from block `b0` of
/// `row`, against a token's blocks `xs` and their [`META_BYTES`] records
/// `meta`: per block (lane), the tile's integer sum as f32, its scale and,
/// for formats with a min, the min's term. Lanes from `n` on are zero.
#[inline(always)]
unsafe fn chunk<F: Panel, I: Isa, const N: usize>(
    row: *const u8,
    xs: *const u8,
    meta: *const u8,
    b0: usize,
) -> (__m256, __m256, __m256) {
    let n = N;
    let x_size = if F::MIN { 36 } else { 34 };
    let off = _mm256_set1_epi8(F::OFFSET as i8);
    let zero = _mm256_setzero_si256();
    let w = |c: usize| row.add((b0 + c) * F::SIZE);
    let mut p = [zero; 8];
    for (c, p) in p.iter_mut().enumerate().take(n) {
        let v = _mm256_add_epi8(F::values::<I>(w(c)), off);
        *p = I::dot_acc(zero, v, ld256(xs.add((b0 + c) * x_size)));
    }
    let mut sums = reduce8(p);
    let (xd, xe) = meta8(meta.add(b0 * META_BYTES), n);
    if F::OFFSET != 0 {
        let share = _mm256_mullo_epi32(_mm256_castps_si256(xe), _mm256_set1_epi32(F::OFFSET));
        sums = _mm256_sub_epi32(sums, share);
    }
    let scale = _mm256_mul_ps(f16x8(w(0), F::SIZE, n), xd);
    let min = if F::MIN {
        _mm256_mul_ps(f16x8(w(0).add(2), F::SIZE, n), xe)
    } else {
        _mm256_setzero_ps()
    };
    (_mm256_cvtepi32_ps(sums), scale, min)
}

/// Eight f32 vectors transposed (lane c of vector r to lane r of vector c).
#[inline(always)]
unsafe fn transpose8_ps(v: [__m256; 8]) -> [__m256; 8] {
    transpose8(v.map(|x| _mm256_castps_si256(x))).map(|x| _mm256_castsi256_ps(x))
}

/// Token `t` of a 32-value block format, one row after the other (each one
/// sequential stream from memory), a segment of the rows at a time. First
/// each row's eight-block chunks give their blocks' terms as vectors (lanes:
/// blocks); then the chunks of the eight rows, transposed (lanes: rows), are
/// added up block by block with the tile's very operations. Summing a row's
/// blocks in one lane instead would chain every addition of the row, the
/// eight rows one after the other.
#[inline(always)]
unsafe fn direct<F: Panel, I: Isa>(t: usize, a: Args) {
    let x_head = if F::MIN { 4 } else { 2 };
    let xs = a.act.add(t * a.act_row + x_head);
    let meta = a.meta.add(t * a.nb * META_BYTES);
    let chunks = a.nb.div_ceil(8);
    let mut acc = _mm256_setzero_ps();
    // Per chunk and row: the block terms (with a min) or integer sums, and
    // the scales (without).
    // Left uninitialised (zeroing 8 KiB per call showed in decode profiles):
    // pass 2 reads only the chunks pass 1 wrote.
    let mut terms = [[MaybeUninit::<__m256>::uninit(); PANEL_ROWS]; SEGMENT];
    let mut scales = [[MaybeUninit::<__m256>::uninit(); PANEL_ROWS]; SEGMENT];
    for seg in (0..chunks).step_by(SEGMENT) {
        let seg_chunks = SEGMENT.min(chunks - seg);
        for r in 0..PANEL_ROWS {
            let row = a.rows.add(r * a.rb);
            for i in 0..seg_chunks {
                let b0 = (seg + i) * 8;
                let (s, scale, min) = match a.nb - b0 {
                    1 => chunk::<F, I, 1>(row, xs, meta, b0),
                    2 => chunk::<F, I, 2>(row, xs, meta, b0),
                    3 => chunk::<F, I, 3>(row, xs, meta, b0),
                    4 => chunk::<F, I, 4>(row, xs, meta, b0),
                    5 => chunk::<F, I, 5>(row, xs, meta, b0),
                    6 => chunk::<F, I, 6>(row, xs, meta, b0),
                    7 => chunk::<F, I, 7>(row, xs, meta, b0),
                    _ => chunk::<F, I, 8>(row, xs, meta, b0),
                };
                if F::MIN {
                    // The block's two terms first, as the tile adds them.
                    terms[i][r] = MaybeUninit::new(_mm256_fmadd_ps(s, scale, min));
                } else {
                    terms[i][r] = MaybeUninit::new(s);
                    scales[i][r] = MaybeUninit::new(scale);
                }
            }
        }
        for i in 0..seg_chunks {
            let blocks = 8.min(a.nb - (seg + i) * 8);
            // SAFETY: pass 1 wrote every row of chunk i.
            let tt = transpose8_ps(terms[i].map(|v| v.assume_init()));
            if F::MIN {
                for term in &tt[..blocks] {
                    acc = _mm256_add_ps(acc, *term);
                }
            } else {
                // SAFETY: as above (formats without a min write the scales).
                let st = transpose8_ps(scales[i].map(|v| v.assume_init()));
                for (s, scale) in tt[..blocks].iter().zip(&st) {
                    acc = _mm256_fmadd_ps(*s, *scale, acc);
                }
            }
        }
    }
    _mm256_storeu_ps(a.out.add(t * a.out_stride), acc);
}

/// Tokens `t0..t0 + n` of a K-quant (Q8_K activations), one row after the
/// other (one sequential stream from memory). Per row and super-block the
/// values and scales are unpacked once; per token, the tile's operations for
/// that row's lane.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // rows × tokens, transposed: indices read clearer
unsafe fn direct_k<F: KPanel, I: Isa, const N: usize>(t0: usize, n: usize, a: Args) {
    let zero = _mm256_setzero_si256();
    let mut out = [[0f32; PANEL_ROWS]; N];
    for r in 0..PANEL_ROWS {
        let row = a.rows.add(r * a.rb);
        let mut acc = [0f32; N];
        for b in 0..a.nb / 8 {
            let w = row.add(b * F::SIZE);
            let vals = F::values(w);
            let mut sc = [0i32; 16];
            let mut mn = [0i32; 8];
            let (d, dmin) = F::scales(w, &mut sc, &mut mn);
            // The scale of each 4-value lane: one sub-block per vector, or two
            // (Q6_K's 16-value sub-blocks). Broadcasts: a vector load of
            // several scalar stores would wait for them to retire.
            let mut scale = [zero; 8];
            for (c, scale) in scale.iter_mut().enumerate() {
                *scale = if F::SUB == 32 {
                    _mm256_set1_epi32(sc[c])
                } else {
                    _mm256_blend_epi32::<0xF0>(
                        _mm256_set1_epi32(sc[2 * c]),
                        _mm256_set1_epi32(sc[2 * c + 1]),
                    )
                };
            }
            // The sub-block scales as i16, in the order of the block sums.
            let s16 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(
                _mm256_loadu_si256(sc.as_ptr().cast()),
                _mm256_loadu_si256(sc.as_ptr().add(8).cast()),
            ));
            for (t, acc) in acc.iter_mut().enumerate().take(n) {
                let xb = a.act.add((t0 + t) * a.act_row + b * Q8K_BYTES);
                let mut p = zero;
                for (c, &v) in vals.iter().enumerate() {
                    let dot = I::dot_acc(zero, v, ld256(xb.add(Q8K_QS + 32 * c)));
                    p = _mm256_add_epi32(p, _mm256_mullo_epi32(dot, scale[c]));
                }
                let bsums = ld256(xb.add(Q8K_BSUMS));
                if F::OFFSET != 0 {
                    // −OFFSET · Σ scale · block sum, in lanes the sum below adds up.
                    let o = _mm256_madd_epi16(s16, bsums);
                    p = _mm256_sub_epi32(p, _mm256_mullo_epi32(o, _mm256_set1_epi32(F::OFFSET)));
                }
                let isum = hsum_i32(p);
                // From here on, the tile's operations exactly.
                let dx = rd_f32(xb);
                *acc = (isum as f32).mul_add(d * dx, *acc);
                if F::MIN {
                    let mut msum = 0i32;
                    for (s, &m) in mn.iter().enumerate() {
                        let xsum = bsum(xb, 2 * s) + bsum(xb, 2 * s + 1);
                        msum = msum.wrapping_add(m.wrapping_mul(xsum));
                    }
                    *acc = (-(msum as f32)).mul_add(dmin * dx, *acc);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate().take(n) {
            out[t][r] = *acc;
        }
    }
    for (t, o) in out.iter().enumerate().take(n) {
        _mm256_storeu_ps(
            a.out.add((t0 + t) * a.out_stride),
            _mm256_loadu_ps(o.as_ptr()),
        );
    }
}

/// The sum of the eight i32 lanes (wrapping, as the vector adds).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
