//! Tiled products for the 32-value block formats: eight weight rows against
//! several tokens per pass, for prefill.
//!
//! The eight rows are first unpacked into a panel (see [`super::super::gemm`])
//! whose 4-byte groups are interleaved so that one 256-bit register holds the
//! same four columns of all eight rows as unsigned bytes. Broadcasting four
//! activation bytes and one `vpdpbusd` (or AVX2's two-step equivalent) then
//! adds four products to each of the eight rows at once: the i32 lanes are
//! the rows, a block's scales are one vector multiply, and nothing needs a
//! horizontal sum. Each loaded weight vector is reused for `RN` tokens.
//!
//! Signed formats store `q + OFFSET` (Q4_0: 8, Q5_0: 16, Q8_0: 128); the
//! offset's share, `OFFSET · Σ x`, starts each block's integer sum negative,
//! so the integer sums equal the reference's exactly.

use std::arch::x86_64::*;

use super::gemm_k::{self, Q4K, Q5K, Q6K};
use super::{
    expect_level, ld256, rd_f32, rd_i32, rd_u16, Avx2, Avx512, Isa, Level, Q32, Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0,
};
use crate::quant::gemm::{META_BYTES, PANEL_ROWS};
use crate::quant::GgmlType;

pub use super::gemm_direct::multiply_rows_at;

/// Tokens per tile at each level (accumulators: one i32 and one f32 vector each).
const TILE_AVX2: usize = 4;
const TILE_AVX512: usize = 8;

/// A 32-value format in a panel.
pub(super) trait Panel: Q32 {
    /// Added to each value to make it unsigned.
    const OFFSET: i32;
}

impl Panel for Q4_0 {
    const OFFSET: i32 = 8;
}
impl Panel for Q4_1 {
    const OFFSET: i32 = 0;
}
impl Panel for Q5_0 {
    const OFFSET: i32 = 16;
}
impl Panel for Q5_1 {
    const OFFSET: i32 = 0;
}
impl Panel for Q8_0 {
    const OFFSET: i32 = 128;
}

/// Bytes of one block of a panel: eight rows of 32 values, eight scales, and
/// eight mins for the formats with one.
const fn block_stride(min: bool) -> usize {
    PANEL_ROWS * 32 + 32 + if min { 32 } else { 0 }
}

/// Whether `level` has a tiled kernel for weights of type `ty`. AVX2's
/// multiply-add saturates on bytes above 128, so Q8_0 needs VNNI.
pub fn supported(level: Level, ty: GgmlType) -> bool {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => true,
        GgmlType::Q8_0 => level == Level::Avx512,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => true,
        _ => false,
    }
}

/// Bytes of a panel of `k`-wide rows of `ty`.
pub fn panel_bytes(ty: GgmlType, k: usize) -> usize {
    match ty {
        GgmlType::Q4_K => return gemm_k::panel_bytes::<Q4K>(k),
        GgmlType::Q5_K => return gemm_k::panel_bytes::<Q5K>(k),
        GgmlType::Q6_K => return gemm_k::panel_bytes::<Q6K>(k),
        _ => {}
    }
    let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    k / 32 * block_stride(min)
}

/// Unpacks [`PANEL_ROWS`] rows of `ty` (back to back in `rows`) into `panel`.
///
/// # Panics
/// If the type has no tiled kernel at `level` or a length is wrong.
pub fn pack_at(level: Level, ty: GgmlType, k: usize, rows: &[u8], panel: &mut [u8]) {
    expect_level(level);
    assert!(supported(level, ty), "gemm: no tiled kernel for {ty}");
    let rb = ty
        .row_bytes(k)
        .expect("gemm: k is not a whole number of blocks");
    assert_eq!(rows.len(), PANEL_ROWS * rb, "gemm: pack: rows");
    assert_eq!(panel.len(), panel_bytes(ty, k), "gemm: pack: panel");
    // SAFETY: level available; lengths checked.
    unsafe {
        match (level, ty) {
            (Level::Avx2, _) => pack_avx2(ty, k, rows, panel),
            (Level::Avx512, _) => pack_avx512(ty, k, rows, panel),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_avx2(ty: GgmlType, k: usize, rows: &[u8], panel: &mut [u8]) {
    pack_body::<Avx2>(ty, k, rows, panel)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pack_avx512(ty: GgmlType, k: usize, rows: &[u8], panel: &mut [u8]) {
    pack_body::<Avx512>(ty, k, rows, panel)
}

#[inline(always)]
unsafe fn pack_body<I: Isa>(ty: GgmlType, k: usize, rows: &[u8], panel: &mut [u8]) {
    match ty {
        GgmlType::Q4_0 => pack_fmt::<Q4_0, I>(k, rows, panel),
        GgmlType::Q4_1 => pack_fmt::<Q4_1, I>(k, rows, panel),
        GgmlType::Q5_0 => pack_fmt::<Q5_0, I>(k, rows, panel),
        GgmlType::Q5_1 => pack_fmt::<Q5_1, I>(k, rows, panel),
        GgmlType::Q8_0 => pack_fmt::<Q8_0, I>(k, rows, panel),
        GgmlType::Q4_K => gemm_k::pack::<Q4K>(k / 256, rows.as_ptr(), panel.as_mut_ptr()),
        GgmlType::Q5_K => gemm_k::pack::<Q5K>(k / 256, rows.as_ptr(), panel.as_mut_ptr()),
        GgmlType::Q6_K => gemm_k::pack::<Q6K>(k / 256, rows.as_ptr(), panel.as_mut_ptr()),
        _ => unreachable!(),
    }
}

/// Eight i32 vectors (row r's eight 4-byte groups in vector r) transposed so
/// that vector g holds group g of every row.
#[inline(always)]
pub(super) unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256::<0x20>(u0, u4),
        _mm256_permute2x128_si256::<0x20>(u1, u5),
        _mm256_permute2x128_si256::<0x20>(u2, u6),
        _mm256_permute2x128_si256::<0x20>(u3, u7),
        _mm256_permute2x128_si256::<0x31>(u0, u4),
        _mm256_permute2x128_si256::<0x31>(u1, u5),
        _mm256_permute2x128_si256::<0x31>(u2, u6),
        _mm256_permute2x128_si256::<0x31>(u3, u7),
    ]
}

/// One row after the other (eight rows read block by block defeat the
/// hardware prefetcher), each row's values stored where the transposed ones
/// go; then each block's values are transposed in place.
/// Lane i: the f16 at `p + i * stride` as f32, for `i < n` (at most 8); the
/// other lanes 0. Read straight from memory: eight u16 stores read back as
/// one vector would wait for the stores to retire.
#[inline(always)]
pub(super) unsafe fn f16x8(p: *const u8, stride: usize, n: usize) -> __m256 {
    let h = |i: usize| {
        if i < n {
            rd_u16(p.add(i * stride)) as i16
        } else {
            0
        }
    };
    _mm256_cvtph_ps(_mm_setr_epi16(
        h(0),
        h(1),
        h(2),
        h(3),
        h(4),
        h(5),
        h(6),
        h(7),
    ))
}

#[inline(always)]
unsafe fn pack_fmt<F: Panel, I: Isa>(k: usize, rows: &[u8], panel: &mut [u8]) {
    let nb = k / 32;
    let rb = nb * F::SIZE;
    let stride = block_stride(F::MIN);
    let (src, dst) = (rows.as_ptr(), panel.as_mut_ptr());
    let off = _mm256_set1_epi8(F::OFFSET as i8);
    for r in 0..PANEL_ROWS {
        for b in 0..nb {
            let w = src.add(r * rb + b * F::SIZE);
            let out = dst.add(b * stride);
            let v = _mm256_add_epi8(F::values::<I>(w), off);
            _mm256_storeu_si256(out.add(32 * r).cast(), v);
        }
    }
    for b in 0..nb {
        let out = dst.add(b * stride);
        // The eight rows' scales (and mins) converted as one vector each,
        // from rows the first pass brought into the cache.
        let first = src.add(b * F::SIZE);
        let scales = out.add(PANEL_ROWS * 32).cast::<f32>();
        _mm256_storeu_ps(scales, f16x8(first, rb, PANEL_ROWS));
        if F::MIN {
            _mm256_storeu_ps(scales.add(PANEL_ROWS), f16x8(first.add(2), rb, PANEL_ROWS));
        }
        let mut v = [_mm256_setzero_si256(); PANEL_ROWS];
        for (r, v) in v.iter_mut().enumerate() {
            *v = ld256(out.add(32 * r));
        }
        for (g, t) in transpose8(v).into_iter().enumerate() {
            _mm256_storeu_si256(out.add(32 * g).cast(), t);
        }
    }
}

/// Per token and block of a Q8_0 or Q8_1 activation row: its scale `d` (f32)
/// and, for Q8_0, the sum of its values (i32), for Q8_1 its stored `s` (f32).
/// Q8_K rows carry what the kernels need: nothing is written for them.
pub fn prepare_at(level: Level, act_ty: GgmlType, k: usize, act: &[u8], meta: &mut [u8]) {
    expect_level(level);
    let (size, min) = match act_ty {
        GgmlType::Q8_0 => (34, false),
        GgmlType::Q8_1 => (36, true),
        GgmlType::Q8_K => return,
        _ => panic!("gemm: no tiled kernel for {act_ty} activations"),
    };
    let nb = k / 32;
    assert_eq!(act.len(), nb * size, "gemm: prepare: act");
    assert_eq!(meta.len(), nb * META_BYTES, "gemm: prepare: meta");
    for (xb, m) in act
        .chunks_exact(size)
        .zip(meta.chunks_exact_mut(META_BYTES))
    {
        let d = half::f16::from_le_bytes([xb[0], xb[1]]).to_f32();
        m[..4].copy_from_slice(&d.to_le_bytes());
        if min {
            let s = half::f16::from_le_bytes([xb[2], xb[3]]).to_f32();
            m[4..].copy_from_slice(&s.to_le_bytes());
        } else {
            let sum: i32 = xb[2..].iter().map(|&q| i32::from(q as i8)).sum();
            m[4..].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

/// The panel of `ty` rows times `n` activation rows (`act`, back to back, each
/// `act_row` bytes, with their [`prepare_at`] metadata back to back in `meta`):
/// token t's eight results go to `out[t * out_stride..][..8]`.
///
/// # Panics
/// If the level is not available, the type has no tiled kernel there, or a
/// length is wrong.
#[allow(clippy::too_many_arguments)]
pub fn multiply_at(
    level: Level,
    ty: GgmlType,
    k: usize,
    panel: &[u8],
    act: &[u8],
    meta: &[u8],
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let (nb, act_row) = check_products(level, ty, k, act, meta, n, out, out_stride);
    assert_eq!(panel.len(), panel_bytes(ty, k), "gemm: panel");
    if n == 0 {
        return;
    }
    let a = Args {
        nb,
        panel: panel.as_ptr(),
        act: act.as_ptr(),
        act_row,
        meta: meta.as_ptr(),
        out: out.as_mut_ptr(),
        out_stride,
    };
    // SAFETY: level available; lengths checked above.
    unsafe {
        match level {
            Level::Avx2 => multiply_avx2(ty, n, a),
            Level::Avx512 => multiply_avx512(ty, n, a),
        }
    }
}

/// Checks what [`multiply_at`] and [`multiply_rows_at`] take alike (the
/// level and type, the activations, their metadata, the output); returns the
/// blocks per row and the bytes per activation row.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_products(
    level: Level,
    ty: GgmlType,
    k: usize,
    act: &[u8],
    meta: &[u8],
    n: usize,
    out: &[f32],
    out_stride: usize,
) -> (usize, usize) {
    expect_level(level);
    assert!(supported(level, ty), "gemm: no tiled kernel for {ty}");
    assert!(
        k.is_multiple_of(ty.block_size()),
        "gemm: k is not a whole number of blocks"
    );
    let nb = k / 32;
    let act_row = ty.vec_dot_type().row_bytes(k).expect("row size");
    assert_eq!(act.len(), n * act_row, "gemm: act");
    assert_eq!(meta.len(), n * nb * META_BYTES, "gemm: meta");
    if n > 0 {
        assert!(out_stride >= PANEL_ROWS, "gemm: out_stride");
        assert!(
            out.len() >= (n - 1) * out_stride + PANEL_ROWS,
            "gemm: out too short"
        );
    }
    (nb, act_row)
}

/// Pointers and strides of one [`multiply_at`] call.
#[derive(Clone, Copy)]
struct Args {
    nb: usize,
    panel: *const u8,
    act: *const u8,
    act_row: usize,
    meta: *const u8,
    out: *mut f32,
    out_stride: usize,
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn multiply_avx2(ty: GgmlType, n: usize, a: Args) {
    multiply_body::<Avx2, TILE_AVX2>(ty, n, a)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn multiply_avx512(ty: GgmlType, n: usize, a: Args) {
    multiply_body::<Avx512, TILE_AVX512>(ty, n, a)
}

#[inline(always)]
unsafe fn multiply_body<I: Isa, const RN: usize>(ty: GgmlType, n: usize, a: Args) {
    match ty {
        GgmlType::Q4_0 => tiles::<Q4_0, I, RN>(n, a),
        GgmlType::Q4_1 => tiles::<Q4_1, I, RN>(n, a),
        GgmlType::Q5_0 => tiles::<Q5_0, I, RN>(n, a),
        GgmlType::Q5_1 => tiles::<Q5_1, I, RN>(n, a),
        GgmlType::Q8_0 => tiles::<Q8_0, I, RN>(n, a),
        GgmlType::Q4_K => tiles_k::<Q4K, I, RN>(n, a),
        GgmlType::Q5_K => tiles_k::<Q5K, I, RN>(n, a),
        GgmlType::Q6_K => tiles_k::<Q6K, I, RN>(n, a),
        _ => unreachable!(),
    }
}

#[inline(always)]
unsafe fn tiles_k<F: gemm_k::KPanel, I: Isa, const RN: usize>(n: usize, a: Args) {
    let nb = a.nb / 8;
    let mut t = 0;
    while t + RN <= n {
        gemm_k::tile::<F, I, RN>(nb, a.panel, a.act, a.act_row, t, a.out, a.out_stride);
        t += RN;
    }
    // The rest in halving tiles: each pass reads the whole panel.
    if RN > 4 && t + 4 <= n {
        gemm_k::tile::<F, I, 4>(nb, a.panel, a.act, a.act_row, t, a.out, a.out_stride);
        t += 4;
    }
    if t + 2 <= n {
        gemm_k::tile::<F, I, 2>(nb, a.panel, a.act, a.act_row, t, a.out, a.out_stride);
        t += 2;
    }
    if t < n {
        gemm_k::tile::<F, I, 1>(nb, a.panel, a.act, a.act_row, t, a.out, a.out_stride);
    }
}

#[inline(always)]
unsafe fn tiles<F: Panel, I: Isa, const RN: usize>(n: usize, a: Args) {
    let mut t = 0;
    while t + RN <= n {
        tile::<F, I, RN>(t, a);
        t += RN;
    }
    // The rest in halving tiles: each pass reads the whole panel.
    if RN > 4 && t + 4 <= n {
        tile::<F, I, 4>(t, a);
        t += 4;
    }
    if t + 2 <= n {
        tile::<F, I, 2>(t, a);
        t += 2;
    }
    if t < n {
        tile::<F, I, 1>(t, a);
    }
}

/// Tokens `t0..t0 + R` against the panel.
#[inline(always)]
unsafe fn tile<F: Panel, I: Isa, const R: usize>(t0: usize, a: Args) {
    let stride = block_stride(F::MIN);
    let x_size = if F::MIN { 36 } else { 34 };
    let x_head = x_size - 32;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut xs = [a.act; R];
    let mut ms = [a.meta; R];
    for t in 0..R {
        xs[t] = a.act.add((t0 + t) * a.act_row + x_head);
        ms[t] = a.meta.add((t0 + t) * a.nb * META_BYTES);
    }
    for b in 0..a.nb {
        let pb = a.panel.add(b * stride);
        let w = [
            ld256(pb),
            ld256(pb.add(32)),
            ld256(pb.add(64)),
            ld256(pb.add(96)),
            ld256(pb.add(128)),
            ld256(pb.add(160)),
            ld256(pb.add(192)),
            ld256(pb.add(224)),
        ];
        let dw = _mm256_loadu_ps(pb.add(256).cast());
        for t in 0..R {
            let xb = xs[t].add(b * x_size);
            let mb = ms[t].add(b * META_BYTES);
            let mut s = if F::OFFSET != 0 {
                _mm256_set1_epi32(-F::OFFSET * rd_i32(mb.add(4)))
            } else {
                _mm256_setzero_si256()
            };
            for (g, &wg) in w.iter().enumerate() {
                s = I::dot_acc(s, wg, _mm256_set1_epi32(rd_i32(xb.add(4 * g))));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(rd_f32(mb)));
            if F::MIN {
                // The block's two terms first, as the reference adds them: on
                // rows with large activations they cancel to a small sum.
                let m = _mm256_loadu_ps(pb.add(288).cast());
                let ms = _mm256_mul_ps(m, _mm256_set1_ps(rd_f32(mb.add(4))));
                let block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, ms);
                acc[t] = _mm256_add_ps(acc[t], block);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
            }
        }
    }
    for (t, v) in acc.iter().enumerate() {
        _mm256_storeu_ps(a.out.add((t0 + t) * a.out_stride), *v);
    }
}
