//! x86_64 kernels at two levels: AVX2 + FMA + F16C, and that plus AVX-512
//! F/BW/VL/VNNI.
//!
//! The arithmetic is the scalar reference's ([`super::reference`]):
//! integer sums per block are exact, only the order of the f32 additions differs
//! (and FMA rounds once where the reference rounds twice). The activation
//! quantizers follow llama.cpp's x86 code instead of its reference (see
//! [`quantize_row_at`]).
//!
//! Both levels share one body per format, generic over the level (`Isa`) and the
//! number of activation rows `R`; each body is inlined into one
//! `#[target_feature]` function per level. For the quantized formats the AVX-512
//! level keeps 256-bit registers — on Zen 4 a 512-bit operation costs two 256-bit
//! ones, and the 512-bit variants measured slower — and gains the VNNI
//! multiply-adds (`vpdpbusd`, `vpdpwssd`), which fuse what AVX2 does in two or
//! three instructions, and mask registers for the Q5 high bits. The f16 attention
//! helpers do use 512-bit registers, with masked loads for the tail.
//!
//! A row's result does not depend on how many activation rows are batched with
//! it (1..=4): the same operations run in the same order for each row.
//!
//! The CPU is probed once ([`best`]); every public
//! function here checks the level it is asked to run at against it, so none of
//! them can execute an instruction the CPU lacks.

// The AVX-512 intrinsics are stable since Rust 1.89, above the workspace's
// declared rust-version; the toolchain that builds this crate has them.
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;
use std::sync::atomic::{AtomicU8, Ordering};

use half::f16;

use super::blocks::{QK, QK_K};
use super::GgmlType;

/// Tiled prefill products (see [`super::gemm`]).
pub mod gemm;
mod gemm_direct;
mod gemm_k;

// ---------------------------------------------------------------------------
// Feature levels

/// An instruction-set level that has kernels in this module.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// AVX2, FMA and F16C (Haswell, Zen 1 and later).
    Avx2,
    /// The AVX2 level plus AVX-512 F, BW, VL and VNNI (Ice Lake, Zen 4 and later).
    Avx512,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 2] = [Level::Avx2, Level::Avx512];

    /// A short lower-case name (`avx2`, `avx512`).
    pub fn name(self) -> &'static str {
        match self {
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the level's kernels.
    #[inline]
    pub fn is_available(self) -> bool {
        best().is_some_and(|b| self <= b)
    }
}

const UNKNOWN: u8 = 0;
const NONE: u8 = 1;
const AVX2: u8 = 2;
const AVX512: u8 = 3;

/// The probed level, or `UNKNOWN` before the first call to [`best`].
static BEST: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The highest level this CPU supports, probed on the first call and cached.
#[inline]
pub fn best() -> Option<Level> {
    match BEST.load(Ordering::Relaxed) {
        AVX2 => Some(Level::Avx2),
        AVX512 => Some(Level::Avx512),
        NONE => None,
        _ => probe(),
    }
}

#[cold]
fn probe() -> Option<Level> {
    // Racing first calls store the same value.
    BEST.store(detect(), Ordering::Relaxed);
    best()
}

/// The best level the processor has, capped by `EMBODY_CPU_LEVEL`
/// (`avx512`, `avx2` or `scalar`) so that one machine can measure the paths
/// of another tier; a cap above what the processor has changes nothing.
fn detect() -> u8 {
    let found = detect_hw();
    let cap = match std::env::var("EMBODY_CPU_LEVEL").as_deref() {
        Ok("scalar") => NONE,
        Ok("avx2") => AVX2,
        _ => AVX512,
    };
    found.min(cap)
}

fn detect_hw() -> u8 {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    if !avx2 {
        return NONE;
    }
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    if avx512 {
        AVX512
    } else {
        AVX2
    }
}

#[inline]
fn expect_level(level: Level) {
    assert!(
        level.is_available(),
        "the {} kernels need CPU features this machine lacks",
        level.name()
    );
}

// ---------------------------------------------------------------------------
// Entry points

/// [`super::vec_dot_multi`] at the best level; `false` when there is none or the
/// type has no kernel here (the caller then uses the reference).
#[inline]
pub fn vec_dot_multi(ty: GgmlType, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) -> bool {
    match best() {
        Some(level) => vec_dot_multi_at(level, ty, n, w, x, out),
        None => false,
    }
}

/// [`super::vec_dot_multi`] at a given level: one weight row of type `ty` against
/// `out.len()` (1..=4) activation rows of `ty.vec_dot_type()` stored back to back
/// in `x`. Returns `false`, writing nothing, for a type without a kernel here
/// (Q8_1 and Q8_K weights).
///
/// # Panics
/// If the level is not available, `out.len()` is not 1..=4, `n` is not a whole
/// number of blocks, or a row has the wrong length.
pub fn vec_dot_multi_at(
    level: Level,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    x: &[u8],
    out: &mut [f32],
) -> bool {
    expect_level(level);
    match ty {
        GgmlType::Q4_0 => run_dot::<B32<Q4_0>>(level, n, w, x, out),
        GgmlType::Q4_1 => run_dot::<B32<Q4_1>>(level, n, w, x, out),
        GgmlType::Q5_0 => run_dot::<B32<Q5_0>>(level, n, w, x, out),
        GgmlType::Q5_1 => run_dot::<B32<Q5_1>>(level, n, w, x, out),
        GgmlType::Q8_0 => run_dot::<B32<Q8_0>>(level, n, w, x, out),
        GgmlType::Q4_K => run_dot::<Q4K>(level, n, w, x, out),
        GgmlType::Q5_K => run_dot::<Q5K>(level, n, w, x, out),
        GgmlType::Q6_K => run_dot::<Q6K>(level, n, w, x, out),
        GgmlType::F32 => run_dot::<Floats<F32>>(level, n, w, x, out),
        GgmlType::F16 => run_dot::<Floats<F16>>(level, n, w, x, out),
        GgmlType::BF16 => run_dot::<Floats<BF16>>(level, n, w, x, out),
        GgmlType::Q8_1 | GgmlType::Q8_K => return false,
    }
    true
}

/// [`super::quantize_row`] at the best level; `false` when there is none or `ty`
/// is not an activation type.
#[inline]
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    match best() {
        Some(level) => quantize_row_at(level, ty, src, dst),
        None => false,
    }
}

/// Quantizes an activation row (Q8_0, Q8_1, Q8_K, F16, BF16, F32) at a given
/// level; `false`, writing nothing, for the weight types.
///
/// Q8_0 and Q8_1 follow llama.cpp's x86 `quantize_row_q8_0/1`: values are
/// `x * (127 / amax)` rounded half to even, where the reference computes
/// `x * (1 / (amax / 127))` rounded half away from zero. The scale `d` is the
/// same; a value differs by one in roughly one block in 20 000. Q8_K, F16, BF16
/// and F32 are bit-exact with the reference (llama.cpp's x86 Q8_K is its reference).
///
/// # Panics
/// If the level is not available, `src.len()` is not a whole number of blocks or
/// `dst.len()` is not `ty.row_bytes(src.len())`.
pub fn quantize_row_at(level: Level, ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    expect_level(level);
    let block = match ty {
        GgmlType::Q8_0 | GgmlType::Q8_1 => QK,
        GgmlType::Q8_K => QK_K,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
        _ => return false,
    };
    let n = src.len();
    assert!(
        n.is_multiple_of(block),
        "quantize_row: {n} values are not a whole number of {ty} blocks of {block}"
    );
    let want = (n / block).checked_mul(ty.type_size());
    let want = want.unwrap_or_else(|| panic!("quantize_row: {n} values is too long a row"));
    assert_eq!(
        dst.len(),
        want,
        "quantize_row: dst: a row of {n} {ty} values takes {want} bytes"
    );
    // SAFETY: the level is available (checked above) and dst holds exactly the
    // row's bytes, which is what the kernels write.
    unsafe {
        match level {
            Level::Avx2 => quantize_avx2(ty, src, dst),
            Level::Avx512 => quantize_avx512(ty, src, dst),
        }
    }
    true
}

/// Converts f16 values to f32 (exactly) at the best level; `false` without one.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn f16_to_f32_slice(src: &[f16], dst: &mut [f32]) -> bool {
    match best() {
        Some(level) => {
            f16_to_f32_slice_at(level, src, dst);
            true
        }
        None => false,
    }
}

/// [`f16_to_f32_slice`] at a given level.
///
/// # Panics
/// If the level is not available or the lengths differ.
pub fn f16_to_f32_slice_at(level: Level, src: &[f16], dst: &mut [f32]) {
    expect_level(level);
    assert_eq!(src.len(), dst.len(), "f16_to_f32_slice: length mismatch");
    // SAFETY: level available, equal lengths.
    unsafe {
        match level {
            Level::Avx2 => f16_to_f32_avx2(src, dst),
            Level::Avx512 => f16_to_f32_avx512(src, dst),
        }
    }
}

// ---------------------------------------------------------------------------
// Levels as types

/// The integer multiply-adds that differ between the levels.
trait Isa {
    /// Independent FMA chains per activation row in the 32-value block kernels:
    /// enough to cover the FMA latency without running out of registers at
    /// four rows (16 vector registers on AVX2, 32 with AVX-512).
    const CHAINS: usize;
    /// Per i32 lane, `acc` plus the four products of u8 `a` and i8 `b` bytes.
    /// AVX2's saturating i16 step is exact while `a` ≤ 128 and `b` ≥ −127,
    /// which holds for every value ggml's quantizers write (−127..=127).
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
    /// Per i32 lane, `acc` plus the two products of i16 `a` and `b`.
    unsafe fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
    /// Byte i is 0xFF where bit i of the little-endian u32 at `p` is set, else 0.
    unsafe fn bit_bytes(p: *const u8) -> __m256i;
}

struct Avx2;
struct Avx512;

impl Isa for Avx2 {
    const CHAINS: usize = 2;

    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(a, b);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }

    #[inline(always)]
    unsafe fn bit_bytes(p: *const u8) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(rd_i32(p)),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        // Byte i of each group of eight keeps only bit i clear in the mask.
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1))
    }
}

impl Isa for Avx512 {
    const CHAINS: usize = 4;

    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, b)
    }

    #[inline(always)]
    unsafe fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, a, b)
    }

    #[inline(always)]
    unsafe fn bit_bytes(p: *const u8) -> __m256i {
        // Straight from a mask register.
        _mm256_movm_epi8(rd_i32(p) as u32)
    }
}

/// A dot-product kernel for one weight format, instantiated per level and per
/// number of activation rows `R`.
trait RowDot {
    /// The weight type (for messages).
    const TYPE: GgmlType;
    /// Values per block.
    const BLOCK: usize;
    /// Bytes per weight block.
    const W_BYTES: usize;
    /// Bytes per activation block.
    const X_BYTES: usize;

    /// Writes the dot of the weight row at `w` with each of the `R` activation
    /// rows at `x` to `out`.
    ///
    /// # Safety
    /// The CPU supports `I`; `n` is a multiple of `BLOCK`; `w` points to
    /// `n / BLOCK * W_BYTES` readable bytes and `x` to `R` times
    /// `n / BLOCK * X_BYTES`.
    unsafe fn dot<I: Isa, const R: usize>(n: usize, w: *const u8, x: *const u8, out: &mut [f32; R]);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<K: RowDot, const R: usize>(
    n: usize,
    w: *const u8,
    x: *const u8,
    out: &mut [f32; R],
) {
    K::dot::<Avx2, R>(n, w, x, out)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_avx512<K: RowDot, const R: usize>(
    n: usize,
    w: *const u8,
    x: *const u8,
    out: &mut [f32; R],
) {
    K::dot::<Avx512, R>(n, w, x, out)
}

/// Checks the row lengths (with the block sizes as constants, so that the
/// divisions compile to shifts and multiplies) and runs `K` at `level`.
#[inline]
fn run_dot<K: RowDot>(level: Level, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
    assert!(
        n.is_multiple_of(K::BLOCK),
        "vec_dot: {n} values are not a whole number of {} blocks of {}",
        K::TYPE,
        K::BLOCK
    );
    // Checked: a wrapped size could let a huge `n` pass with a short row.
    let bytes = |per_block: usize| (n / K::BLOCK).checked_mul(per_block);
    let (w_want, x_want) = (bytes(K::W_BYTES), bytes(K::X_BYTES));
    let (Some(w_want), Some(x_want)) = (w_want, x_want) else {
        panic!("vec_dot: a row of {n} {} values is too long", K::TYPE);
    };
    assert_eq!(
        w.len(),
        w_want,
        "vec_dot: w: a row of {n} {} values takes {w_want} bytes",
        K::TYPE
    );
    assert_eq!(
        Some(x.len()),
        out.len().checked_mul(x_want),
        "vec_dot: x: {} activation rows of {n} values take {x_want} bytes each",
        out.len()
    );
    let (w, x) = (w.as_ptr(), x.as_ptr());
    macro_rules! go {
        ($r:literal) => {{
            let out: &mut [f32; $r] = out.try_into().unwrap();
            // SAFETY: the level is available (checked by the caller) and the row
            // lengths were checked above.
            unsafe {
                match level {
                    Level::Avx2 => dot_avx2::<K, $r>(n, w, x, out),
                    Level::Avx512 => dot_avx512::<K, $r>(n, w, x, out),
                }
            }
        }};
    }
    match out.len() {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        4 => go!(4),
        rows => panic!("vec_dot_multi: {rows} activation rows, expected 1..=4"),
    }
}

// ---------------------------------------------------------------------------
// Small helpers. Blocks are packed without alignment: every load is unaligned.

#[inline(always)]
unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

#[inline(always)]
unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p.cast())
}

#[inline(always)]
unsafe fn rd_u16(p: *const u8) -> u16 {
    p.cast::<u16>().read_unaligned()
}

#[inline(always)]
unsafe fn rd_i32(p: *const u8) -> i32 {
    p.cast::<i32>().read_unaligned()
}

#[inline(always)]
unsafe fn rd_f32(p: *const u8) -> f32 {
    p.cast::<f32>().read_unaligned()
}

#[inline(always)]
unsafe fn f16_to_f32(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

/// Round to nearest even, as `half::f16::from_f32`.
#[inline(always)]
unsafe fn f32_to_f16(x: f32) -> u16 {
    _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    hsum_ps128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

#[inline(always)]
unsafe fn hsum_ps128(v: __m128) -> f32 {
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// The eight lanes summed in f64.
#[inline(always)]
unsafe fn hsum_f64(v: __m256) -> f64 {
    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
    let s = _mm256_add_pd(lo, hi);
    let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
    _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
}

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
}

/// 16 packed bytes to 32: the low nibbles, then the high nibbles. The 64-bit
/// shift lets the neighbouring byte's bits into the high nibble, which the mask
/// drops; it avoids a lane insert (a shuffle).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let both = _mm256_broadcastsi128_si256(ld128(p));
    let shifted = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(shifted, _mm256_set1_epi8(0xF))
}

// ---------------------------------------------------------------------------
// 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
//
// Eight blocks at a time: the scale products `dw·dx` (and `m·s`) of the eight
// blocks are computed as two vectors, then each block's i32 dot vector is
// converted and added with one FMA against its broadcast scale. On Zen 4 this
// runs at about 3 cycles per block, bound by the loads (two scale words, the
// weight bytes and the activation bytes per block). Measured and dropped as
// slower there: two blocks per 512-bit register, gathering the scale words with
// masked 512-bit loads and permutes, and FMAs with the scale broadcast from
// memory.

/// A weight format of 32-value blocks.
trait Q32 {
    const TYPE: GgmlType;
    /// Bytes per weight block.
    const SIZE: usize;
    /// Whether the block has an offset `m` after `d` (and the activation, Q8_1,
    /// a sum `s` after its `d`).
    const MIN: bool;
    /// Whether [`Self::values`] are signed (dotted through `|w| · sign(x, w)`).
    const SIGNED: bool;
    /// The block's 32 values as bytes, in value order.
    unsafe fn values<I: Isa>(p: *const u8) -> __m256i;
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

impl Q32 for Q4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const SIZE: usize = 18;
    const MIN: bool = false;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn values<I: Isa>(p: *const u8) -> __m256i {
        _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8))
    }
}

impl Q32 for Q4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const SIZE: usize = 20;
    const MIN: bool = true;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn values<I: Isa>(p: *const u8) -> __m256i {
        nibbles(p.add(4))
    }
}

impl Q32 for Q5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const SIZE: usize = 22;
    const MIN: bool = false;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn values<I: Isa>(p: *const u8) -> __m256i {
        // q - 16 as a byte: the nibble with 0xF0 set where the fifth bit is clear.
        let high = _mm256_andnot_si256(I::bit_bytes(p.add(2)), _mm256_set1_epi8(-16));
        _mm256_or_si256(nibbles(p.add(6)), high)
    }
}

impl Q32 for Q5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const SIZE: usize = 24;
    const MIN: bool = true;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn values<I: Isa>(p: *const u8) -> __m256i {
        let high = _mm256_and_si256(I::bit_bytes(p.add(4)), _mm256_set1_epi8(16));
        _mm256_or_si256(nibbles(p.add(8)), high)
    }
}

impl Q32 for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const SIZE: usize = 34;
    const MIN: bool = false;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn values<I: Isa>(p: *const u8) -> __m256i {
        ld256(p.add(2))
    }
}

/// [`RowDot`] for a [`Q32`] format.
struct B32<F>(F);

impl<F: Q32> B32<F> {
    /// Activation block bytes: Q8_1 (36) for the formats with a min, else Q8_0 (34).
    const X_SIZE: usize = if F::MIN { 36 } else { 34 };

    /// Adds the `CNT` (1..=8) blocks at `w` dotted with those at each `x` to
    /// `acc`. Every size is its own unrolled instance: a short row's last blocks
    /// cost no more than full-group blocks.
    ///
    /// Block i goes to FMA chain `i % I::CHAINS` whatever the number of rows, so
    /// a row's result does not depend on the rows batched with it.
    #[inline(always)]
    unsafe fn group<I: Isa, const R: usize, const CNT: usize>(
        w: *const u8,
        x: &[*const u8; R],
        acc: &mut [[__m256; 4]; R],
    ) {
        // Per row, lane 2i of block i's half is dw·dx, lane 2i + 1 is m·s.
        let zps = _mm256_setzero_ps();
        let mut scales = [[zps; 2]; R];
        let (wl, wh) = f16_pairs::<CNT>(w, F::SIZE);
        for r in 0..R {
            let (xl, xh) = f16_pairs::<CNT>(x[r], Self::X_SIZE);
            scales[r] = [_mm256_mul_ps(wl, xl), _mm256_mul_ps(wh, xh)];
            if F::MIN {
                let terms = _mm256_add_ps(scales[r][0], scales[r][1]);
                acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_and_ps(terms, odd_lanes()));
            }
        }
        let zero = _mm256_setzero_si256();
        for i in 0..CNT {
            let v = F::values::<I>(w.add(i * F::SIZE));
            let a = if F::SIGNED { _mm256_sign_epi8(v, v) } else { v };
            let k = i % I::CHAINS;
            for r in 0..R {
                let q = ld256(x[r].add(i * Self::X_SIZE + Self::X_SIZE - 32));
                let q = if F::SIGNED { _mm256_sign_epi8(q, v) } else { q };
                let dot = _mm256_cvtepi32_ps(I::dot_acc(zero, a, q));
                let lane = _mm256_set1_epi32(2 * (i % 4) as i32);
                let d = _mm256_permutevar8x32_ps(scales[r][i / 4], lane);
                acc[r][k] = _mm256_fmadd_ps(dot, d, acc[r][k]);
            }
        }
    }

    /// [`Self::group`] of `CNT` blocks, then advances the pointers past them.
    #[inline(always)]
    unsafe fn step<I: Isa, const R: usize, const CNT: usize>(
        w: &mut *const u8,
        x: &mut [*const u8; R],
        acc: &mut [[__m256; 4]; R],
    ) {
        Self::group::<I, R, CNT>(*w, x, acc);
        *w = w.add(CNT * F::SIZE);
        for p in x {
            *p = p.add(CNT * Self::X_SIZE);
        }
    }
}

impl<F: Q32> RowDot for B32<F> {
    const TYPE: GgmlType = F::TYPE;
    const BLOCK: usize = QK;
    const W_BYTES: usize = F::SIZE;
    const X_BYTES: usize = Self::X_SIZE;

    #[inline(always)]
    unsafe fn dot<I: Isa, const R: usize>(
        n: usize,
        w: *const u8,
        x: *const u8,
        out: &mut [f32; R],
    ) {
        let nb = n / QK;
        let mut xs = [x; R];
        for (r, p) in xs.iter_mut().enumerate() {
            *p = x.add(r * nb * Self::X_SIZE);
        }
        let mut w = w;
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for _ in 0..nb / 8 {
            Self::step::<I, R, 8>(&mut w, &mut xs, &mut acc);
        }
        if nb & 4 != 0 {
            Self::step::<I, R, 4>(&mut w, &mut xs, &mut acc);
        }
        if nb & 2 != 0 {
            Self::step::<I, R, 2>(&mut w, &mut xs, &mut acc);
        }
        if nb & 1 != 0 {
            Self::step::<I, R, 1>(&mut w, &mut xs, &mut acc);
        }
        for r in 0..R {
            let a = &acc[r];
            let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            out[r] = hsum_ps(sum);
        }
    }
}

/// All bits set in the odd f32 lanes.
#[inline(always)]
unsafe fn odd_lanes() -> __m256 {
    _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1))
}

/// The leading pair of f16 of `CNT` (≤ 8) blocks as f32, blocks 0..4 and
/// 4..8: `[a0, b0, a1, b1, ..]`. Zero past `CNT`.
#[inline(always)]
unsafe fn f16_pairs<const CNT: usize>(p: *const u8, stride: usize) -> (__m256, __m256) {
    let word = |i: usize| {
        if i < CNT {
            rd_i32(p.add(i * stride))
        } else {
            0
        }
    };
    let lo = _mm256_cvtph_ps(_mm_setr_epi32(word(0), word(1), word(2), word(3)));
    let hi = if CNT > 4 {
        _mm256_cvtph_ps(_mm_setr_epi32(word(4), word(5), word(6), word(7)))
    } else {
        _mm256_setzero_ps()
    };
    (lo, hi)
}

// ---------------------------------------------------------------------------
// K-quants against Q8_K (292-byte blocks: f32 d, 256 qs, 16 i16 bsums)

const Q8K_BYTES: usize = 292;
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 260;

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block, one per
/// byte (ggml's `utmp` unpacking of [`super::blocks::scale_min_k4`]).
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> (u64, u64) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let (u0, u1, u2) = (
        rd_i32(p) as u32,
        rd_i32(p.add(4)) as u32,
        rd_i32(p.add(8)) as u32,
    );
    let sc_lo = u0 & K1;
    let sc_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let mn_lo = u1 & K1;
    let mn_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// `Σ_j mins[j] * (bsums[2j] + bsums[2j+1])` as four i32 lanes.
#[inline(always)]
unsafe fn k4_min_products(mins16: __m128i, xb: *const u8) -> __m128i {
    let bsums = ld256(xb.add(Q8K_BSUMS));
    let per32 = _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256::<1>(bsums),
    );
    _mm_madd_epi16(mins16, per32)
}

/// The shared part of Q4_K and Q5_K: `levels(j)` gives the 64 values of 32-byte
/// chunk j as (first 32, next 32).
#[inline(always)]
unsafe fn dot_k4<I: Isa, const R: usize, const W_BYTES: usize>(
    nb: usize,
    w: *const u8,
    x: *const u8,
    out: &mut [f32; R],
    levels: impl Fn(*const u8, usize) -> (__m256i, __m256i),
) {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for b in 0..nb {
        let wb = w.add(b * W_BYTES);
        let xb: [*const u8; R] = std::array::from_fn(|r| x.add((r * nb + b) * Q8K_BYTES));
        let d = f16_to_f32(rd_u16(wb));
        let dmin = f16_to_f32(rd_u16(wb.add(2)));
        let (sc, mn) = k4_scales_mins(wb.add(4));
        let mins16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let (lo, hi) = levels(wb, j);
            let s_lo = _mm256_set1_epi16(((sc >> (16 * j)) & 0xff) as i16);
            let s_hi = _mm256_set1_epi16(((sc >> (16 * j + 8)) & 0xff) as i16);
            for (s, &xr) in sumi.iter_mut().zip(&xb) {
                let q8 = xr.add(Q8K_QS + 64 * j);
                *s = I::madd_acc(*s, _mm256_maddubs_epi16(lo, ld256(q8)), s_lo);
                *s = I::madd_acc(*s, _mm256_maddubs_epi16(hi, ld256(q8.add(32))), s_hi);
            }
        }
        for r in 0..R {
            let dx = rd_f32(xb[r]);
            let mins = _mm_cvtepi32_ps(k4_min_products(mins16, xb[r]));
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-dmin * dx), mins, acc_m[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_ps(acc[r]) + hsum_ps128(acc_m[r]);
    }
}

/// Q4_K (144 bytes: d, dmin, 12 scale bytes, 128 nibble bytes).
struct Q4K;

impl RowDot for Q4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const BLOCK: usize = QK_K;
    const W_BYTES: usize = 144;
    const X_BYTES: usize = Q8K_BYTES;

    #[inline(always)]
    unsafe fn dot<I: Isa, const R: usize>(
        n: usize,
        w: *const u8,
        x: *const u8,
        out: &mut [f32; R],
    ) {
        let m4 = _mm256_set1_epi8(0xF);
        dot_k4::<I, R, 144>(n / QK_K, w, x, out, |wb, j| {
            let q = ld256(wb.add(16 + 32 * j));
            (
                _mm256_and_si256(q, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
            )
        });
    }
}

/// Q5_K (176 bytes: Q4_K's header, 32 bytes of fifth bits, 128 nibble bytes).
struct Q5K;

impl RowDot for Q5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const BLOCK: usize = QK_K;
    const W_BYTES: usize = 176;
    const X_BYTES: usize = Q8K_BYTES;

    #[inline(always)]
    unsafe fn dot<I: Isa, const R: usize>(
        n: usize,
        w: *const u8,
        x: *const u8,
        out: &mut [f32; R],
    ) {
        let m4 = _mm256_set1_epi8(0xF);
        let b4 = _mm256_set1_epi8(16);
        dot_k4::<I, R, 176>(n / QK_K, w, x, out, |wb, j| {
            let q = ld256(wb.add(48 + 32 * j));
            let hbits = ld256(wb.add(16));
            // Chunk j takes bit 2j of qh for its first 32 values, 2j + 1 for the rest.
            let bit = |k: usize| {
                let m = _mm256_set1_epi8((1u8 << k) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, m), m);
                _mm256_and_si256(set, b4)
            };
            (
                _mm256_or_si256(_mm256_and_si256(q, m4), bit(2 * j)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
                    bit(2 * j + 1),
                ),
            )
        });
    }
}

/// Q6_K (210 bytes: 128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, d).
struct Q6K;

impl RowDot for Q6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const BLOCK: usize = QK_K;
    const W_BYTES: usize = 210;
    const X_BYTES: usize = Q8K_BYTES;

    #[inline(always)]
    unsafe fn dot<I: Isa, const R: usize>(
        n: usize,
        w: *const u8,
        x: *const u8,
        out: &mut [f32; R],
    ) {
        let nb = n / QK_K;
        let m15 = _mm256_set1_epi8(15);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let wb = w.add(b * 210);
            let xb: [*const u8; R] = std::array::from_fn(|r| x.add((r * nb + b) * Q8K_BYTES));
            let d = f16_to_f32(rd_u16(wb.add(208)));
            let scales = ld128(wb.add(192));
            // The levels are q + 32 (0..64, unsigned for maddubs); the 32 comes
            // off as 32 * Σ scale * bsum.
            let scales16 = _mm256_cvtepi8_epi16(scales);
            let mut sumi: [__m256i; R] = std::array::from_fn(|r| {
                let bsums = ld256(xb[r].add(Q8K_BSUMS));
                _mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, scales16)),
                )
            });
            for half in 0..2 {
                let ql0 = ld256(wb.add(64 * half));
                let ql1 = ld256(wb.add(64 * half + 32));
                let qh = ld256(wb.add(128 + 32 * half));
                let rows = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m15),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(3))),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m15),
                        _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12))),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m15),
                        _mm256_and_si256(qh, _mm256_set1_epi8(48)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m15),
                        _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(-64))),
                    ),
                ];
                for (i, &q) in rows.iter().enumerate() {
                    // Sub-blocks 2i and 2i + 1 of this half: each scale on 16 values.
                    let k = (8 * half + 2 * i) as i64;
                    let pick =
                        _mm_set_epi64x((k + 1) * 0x0101_0101_0101_0101, k * 0x0101_0101_0101_0101);
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                    for (s, &xr) in sumi.iter_mut().zip(&xb) {
                        let q8 = ld256(xr.add(Q8K_QS + 128 * half + 32 * i));
                        *s = I::madd_acc(*s, _mm256_maddubs_epi16(q, q8), sc);
                    }
                }
            }
            for r in 0..R {
                let dx = rd_f32(xb[r]);
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        for r in 0..R {
            out[r] = hsum_ps(acc[r]);
        }
    }
}

// ---------------------------------------------------------------------------
// Float rows (F32, F16, BF16): f32 FMAs, folded into f64 every `FOLD` values so
// that long rows keep the reference's (f64) accuracy.

const FOLD: usize = 1024;

/// A float element format.
trait FloatFmt {
    const TYPE: GgmlType;
    const BYTES: usize;
    /// Eight elements as f32.
    unsafe fn load8(p: *const u8) -> __m256;
    /// One element as f32.
    unsafe fn load1(p: *const u8) -> f32;
}

struct F32;
struct F16;
struct BF16;

impl FloatFmt for F32 {
    const TYPE: GgmlType = GgmlType::F32;
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p.cast())
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        rd_f32(p)
    }
}

impl FloatFmt for F16 {
    const TYPE: GgmlType = GgmlType::F16;
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(ld128(p))
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        f16_to_f32(rd_u16(p))
    }
}

impl FloatFmt for BF16 {
    const TYPE: GgmlType = GgmlType::BF16;
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(ld128(p))))
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        f32::from_bits(u32::from(rd_u16(p)) << 16)
    }
}

/// [`RowDot`] for a [`FloatFmt`] (activations in the same format).
struct Floats<F>(F);

impl<F: FloatFmt> RowDot for Floats<F> {
    const TYPE: GgmlType = F::TYPE;
    const BLOCK: usize = 1;
    const W_BYTES: usize = F::BYTES;
    const X_BYTES: usize = F::BYTES;

    #[inline(always)]
    unsafe fn dot<I: Isa, const R: usize>(
        n: usize,
        w: *const u8,
        x: *const u8,
        out: &mut [f32; R],
    ) {
        let b = F::BYTES;
        let xs: [*const u8; R] = std::array::from_fn(|r| x.add(r * n * b));
        let mut total = [0.0f64; R];
        let mut i = 0;
        while i + 16 <= n {
            let end = (i + FOLD).min(n);
            let mut a0 = [_mm256_setzero_ps(); R];
            let mut a1 = [_mm256_setzero_ps(); R];
            while i + 16 <= end {
                let w0 = F::load8(w.add(i * b));
                let w1 = F::load8(w.add((i + 8) * b));
                for r in 0..R {
                    a0[r] = _mm256_fmadd_ps(w0, F::load8(xs[r].add(i * b)), a0[r]);
                    a1[r] = _mm256_fmadd_ps(w1, F::load8(xs[r].add((i + 8) * b)), a1[r]);
                }
                i += 16;
            }
            for r in 0..R {
                total[r] += hsum_f64(_mm256_add_ps(a0[r], a1[r]));
            }
        }
        for k in i..n {
            let wk = F::load1(w.add(k * b));
            for r in 0..R {
                total[r] += f64::from(wk * F::load1(xs[r].add(k * b)));
            }
        }
        for r in 0..R {
            out[r] = total[r] as f32;
        }
    }
}

// ---------------------------------------------------------------------------
// f16 to f32, for reading the KV cache

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32_avx2(src: &[f16], dst: &mut [f32]) {
    let n = src.len();
    let (ps, pd) = (src.as_ptr().cast::<u8>(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(pd.add(i), F16::load8(ps.add(2 * i)));
        i += 8;
    }
    for k in i..n {
        dst[k] = src[k].to_f32();
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) {
    let n = src.len();
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 64 <= n {
        for j in (0..64).step_by(16) {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(ps.add(i + j).cast()));
            _mm512_storeu_ps(pd.add(i + j), v);
        }
        i += 64;
    }
    while i < n {
        let k = (n - i).min(16);
        let m: __mmask16 = ((1u32 << k) - 1) as u16;
        let v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, ps.add(i).cast()));
        _mm512_mask_storeu_ps(pd.add(i), m, v);
        i += k;
    }
}

// ---------------------------------------------------------------------------
// Activation quantization

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    quantize_body(ty, src, dst)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn quantize_avx512(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    quantize_body(ty, src, dst)
}

/// # Safety
/// AVX2, FMA and F16C; `dst.len() == ty.row_bytes(src.len())` for an activation type.
#[inline(always)]
unsafe fn quantize_body(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let n = src.len();
    let (x, y) = (src.as_ptr(), dst.as_mut_ptr());
    match ty {
        GgmlType::Q8_0 => {
            for b in 0..n / QK {
                let (d, qs, _) = q8_block(x.add(b * QK));
                let out = y.add(b * 34);
                out.cast::<u16>().write_unaligned(f32_to_f16(d));
                _mm256_storeu_si256(out.add(2).cast(), qs);
            }
        }
        GgmlType::Q8_1 => {
            for b in 0..n / QK {
                let (d, qs, sum) = q8_block(x.add(b * QK));
                let out = y.add(b * 36);
                out.cast::<u16>().write_unaligned(f32_to_f16(d));
                out.add(2)
                    .cast::<u16>()
                    .write_unaligned(f32_to_f16(d * sum as f32));
                _mm256_storeu_si256(out.add(4).cast(), qs);
            }
        }
        GgmlType::Q8_K => {
            for b in 0..n / QK_K {
                q8_k_block(x.add(b * QK_K), y.add(b * Q8K_BYTES));
            }
        }
        GgmlType::F32 => std::ptr::copy_nonoverlapping(x.cast::<u8>(), y, 4 * n),
        GgmlType::F16 => {
            let mut i = 0;
            while i + 8 <= n {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.add(i)));
                _mm_storeu_si128(y.add(2 * i).cast(), h);
                i += 8;
            }
            for (k, &v) in src.iter().enumerate().skip(i) {
                let h = f16::from_f32(v).to_bits();
                y.add(2 * k).cast::<u16>().write_unaligned(h);
            }
        }
        GgmlType::BF16 => {
            let mut i = 0;
            while i + 16 <= n {
                let a = bf16_round(_mm256_castps_si256(_mm256_loadu_ps(x.add(i))));
                let b = bf16_round(_mm256_castps_si256(_mm256_loadu_ps(x.add(i + 8))));
                // packus works per 128-bit half; put the halves back in order.
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
                _mm256_storeu_si256(y.add(2 * i).cast(), packed);
                i += 16;
            }
            for (k, &v) in src.iter().enumerate().skip(i) {
                let u = v.to_bits();
                let h = if u & 0x7fff_ffff > 0x7f80_0000 {
                    (u >> 16) | 64
                } else {
                    u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16
                };
                y.add(2 * k).cast::<u16>().write_unaligned(h as u16);
            }
        }
        _ => unreachable!("quantize_body: {ty} is not an activation type"),
    }
}

/// f32 bits to bf16 bits in the low half of each lane: round to nearest even,
/// NaN kept quiet (the reference's `f32_to_bf16`).
#[inline(always)]
unsafe fn bf16_round(u: __m256i) -> __m256i {
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        u,
        _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb),
    ));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(64));
    let abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fff_ffff));
    let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

/// Largest |x| of four vectors.
#[inline(always)]
unsafe fn abs_max4(v: &[__m256; 4]) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
    let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
    _mm256_max_ps(m01, m23)
}

#[inline(always)]
unsafe fn hmax_ps(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// Four i32 vectors (32 values in order) to 32 saturated i8.
#[inline(always)]
unsafe fn pack_i8(i: [__m256i; 4]) -> __m256i {
    let a = _mm256_packs_epi32(i[0], i[1]);
    let b = _mm256_packs_epi32(i[2], i[3]);
    // The packs interleave 128-bit halves: restore value order.
    _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(a, b),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    )
}

/// Rounds `v * s` half to even (whatever the MXCSR mode) to i32.
#[inline(always)]
unsafe fn round_mul(v: __m256, s: __m256) -> __m256i {
    let r =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, s));
    _mm256_cvtps_epi32(r)
}

/// One Q8_0/Q8_1 block as llama.cpp's x86 code: `(d, values, sum of values)`.
#[inline(always)]
unsafe fn q8_block(x: *const f32) -> (f32, __m256i, i32) {
    // Plain arrays, no array::from_fn / map: their closures would not inherit the
    // target features and stay calls.
    let v = [
        _mm256_loadu_ps(x),
        _mm256_loadu_ps(x.add(8)),
        _mm256_loadu_ps(x.add(16)),
        _mm256_loadu_ps(x.add(24)),
    ];
    let amax = hmax_ps(abs_max4(&v));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let i = [
        round_mul(v[0], id),
        round_mul(v[1], id),
        round_mul(v[2], id),
        round_mul(v[3], id),
    ];
    let sum = hsum_i32(_mm256_add_epi32(
        _mm256_add_epi32(i[0], i[1]),
        _mm256_add_epi32(i[2], i[3]),
    ));
    (d, pack_i8(i), sum)
}

/// One Q8_K block, bit-exact with the reference: the signed value of largest
/// magnitude (the first on ties) maps to -127.
#[inline(always)]
unsafe fn q8_k_block(x: *const f32, out: *mut u8) {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for k in 0..32 {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(8 * k))));
    }
    let amax = hmax_ps(m);
    if amax == 0.0 {
        std::ptr::write_bytes(out, 0, Q8K_BYTES);
        return;
    }
    let target = _mm256_set1_ps(amax);
    let mut max = 0.0f32;
    for k in 0..32 {
        let vk = _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(8 * k)));
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(vk, target));
        if hit != 0 {
            max = *x.add(8 * k + hit.trailing_zeros() as usize);
            break;
        }
    }
    let iscale = -127.0 / max;
    let s = _mm256_set1_ps(iscale);
    let cap = _mm256_set1_epi32(127);
    for c in 0..8 {
        let q = |k: usize| {
            let v = _mm256_loadu_ps(x.add(32 * c + 8 * k));
            _mm256_min_epi32(round_mul(v, s), cap)
        };
        let i = [q(0), q(1), q(2), q(3)];
        _mm256_storeu_si256(out.add(Q8K_QS + 32 * c).cast(), pack_i8(i));
        let lo = hsum_i32(_mm256_add_epi32(i[0], i[1])) as i16;
        let hi = hsum_i32(_mm256_add_epi32(i[2], i[3])) as i16;
        let bs = out.add(Q8K_BSUMS + 4 * c).cast::<i16>();
        bs.write_unaligned(lo);
        bs.add(1).write_unaligned(hi);
    }
    out.cast::<f32>().write_unaligned(1.0 / iscale);
}
