//! aarch64 kernels at two levels: plain NEON (ARMv8.0, every aarch64 CPU), and
//! NEON with the ARMv8.2 dot-product instructions (Cortex-A55/A76/A78 and later,
//! Jetson Orin's A78AE, Apple M1 and later).
//!
//! The arithmetic is the scalar reference's ([`super::reference`]): integer
//! sums per block are exact, only the order of the f32 additions differs (and
//! FMA rounds once where the reference rounds twice). The Q8_0/Q8_1 activation
//! quantizers follow llama.cpp's ARM code instead of its reference (see
//! [`quantize_row_at`]).
//!
//! Both levels share one body per format, generic over the level (`Isa`) and the
//! number of activation rows `R`; each body is inlined into one
//! `#[target_feature]` function per level. The levels differ only in how 16 or
//! 32 signed bytes are multiplied and added into four i32 lanes: one `sdot` per
//! 16 bytes with dotprod, widening multiplies into i16 lanes and a pairwise
//! add-accumulate into i32 (`smull`, `smlal2`, `sadalp`) without it. Stable
//! Rust has no `vdotq_s32` yet, so `sdot` is inline assembly. The activation
//! quantizers and the f16 attention helpers are the same NEON code at both
//! levels; f16 converts with `fcvtl`/`fcvtn`, which are ARMv8.0 (the FP16
//! arithmetic extension is not needed).
//!
//! A row's result does not depend on how many activation rows are batched with
//! it (1..=4): the same operations run in the same order for each row.
//!
//! NEON is part of the aarch64 baseline; dotprod is probed once ([`best`]), and
//! every public function here checks the level it is asked to run at against
//! it, so none of them can execute an instruction the CPU lacks.

// The f16 conversion intrinsics (`vcvt_f32_f16` and kin) are stable since Rust
// 1.94, above the workspace's declared rust-version; the toolchains that build
// this crate for aarch64 have them.
#![allow(clippy::incompatible_msrv)]

use std::arch::aarch64::*;
use std::arch::asm;
use std::sync::atomic::{AtomicU8, Ordering};

use half::f16;

use super::blocks::{QK, QK_K};
use super::GgmlType;

// ---------------------------------------------------------------------------
// Feature levels

/// An instruction-set level that has kernels in this module.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Advanced SIMD (NEON), present on every aarch64 CPU.
    Neon,
    /// NEON plus the ARMv8.2 dot-product instructions (`sdot`).
    Dotprod,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 2] = [Level::Neon, Level::Dotprod];

    /// A short lower-case name (`neon`, `dotprod`).
    pub fn name(self) -> &'static str {
        match self {
            Level::Neon => "neon",
            Level::Dotprod => "dotprod",
        }
    }

    /// Whether this CPU can run the level's kernels.
    #[inline]
    pub fn is_available(self) -> bool {
        self <= best()
    }
}

const UNKNOWN: u8 = 0;
const NEON: u8 = 1;
const DOTPROD: u8 = 2;

/// The probed level, or `UNKNOWN` before the first call to [`best`].
static BEST: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The highest level this CPU supports, probed on the first call and cached.
#[inline]
pub fn best() -> Level {
    match BEST.load(Ordering::Relaxed) {
        NEON => Level::Neon,
        DOTPROD => Level::Dotprod,
        _ => probe(),
    }
}

#[cold]
fn probe() -> Level {
    let level = if std::arch::is_aarch64_feature_detected!("dotprod") {
        DOTPROD
    } else {
        NEON
    };
    // Racing first calls store the same value.
    BEST.store(level, Ordering::Relaxed);
    best()
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

/// [`super::vec_dot_multi`] at the best level; `false` when the type has no
/// kernel here (the caller then uses the reference).
#[inline]
pub fn vec_dot_multi(ty: GgmlType, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) -> bool {
    vec_dot_multi_at(best(), ty, n, w, x, out)
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

/// [`super::quantize_row`] at the best level; `false` when `ty` is not an
/// activation type.
#[inline]
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    quantize_row_at(best(), ty, src, dst)
}

/// Quantizes an activation row (Q8_0, Q8_1, Q8_K, F16, BF16, F32) at a given
/// level (both levels run the same code: quantizing needs no dot products);
/// `false`, writing nothing, for the weight types.
///
/// Q8_0 and Q8_1 follow llama.cpp's ARM `quantize_row_q8_0/1`: values are
/// `x * (1 / d)` as in the reference, but rounded half to even where the
/// reference rounds half away from zero. The scale `d` is the same, and so is
/// every value that is not exactly halfway between two integers. Q8_K, F16,
/// BF16 and F32 are bit-exact with the reference (llama.cpp's ARM Q8_K is its
/// reference).
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
    // SAFETY: NEON is part of the aarch64 baseline, and dst holds exactly the
    // row's bytes, which is what the kernels write.
    unsafe { quantize_neon(ty, src, dst) };
    true
}

/// Converts f16 values to f32 (exactly) at the best level; always `true`: NEON
/// is part of the aarch64 baseline.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn f16_to_f32_slice(src: &[f16], dst: &mut [f32]) -> bool {
    f16_to_f32_slice_at(best(), src, dst);
    true
}

/// [`f16_to_f32_slice`] at a given level (both levels run the same code).
///
/// # Panics
/// If the level is not available or the lengths differ.
pub fn f16_to_f32_slice_at(level: Level, src: &[f16], dst: &mut [f32]) {
    expect_level(level);
    assert_eq!(src.len(), dst.len(), "f16_to_f32_slice: length mismatch");
    // SAFETY: NEON is baseline; equal lengths.
    unsafe { f16_to_f32_neon(src, dst) }
}

// ---------------------------------------------------------------------------
// Levels as types

/// The integer multiply-adds that differ between the levels. The two levels
/// spread the products over the four lanes differently; the kernels only use
/// lane sums, or scale all four lanes alike.
trait Isa {
    /// `acc` plus the 16 products of the signed bytes of `a` and `b`, spread
    /// over the four i32 lanes. The NEON level adds products in pairs in i16:
    /// exact unless both products of a pair are −128 · −128, which needs −128
    /// on both sides; ggml's quantizers write −127..=127.
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
    /// `acc` plus the 32 products of `a` with `b`, for weights `|a| ≤ 63`
    /// (every format but Q8_0): the NEON level then adds four products in i16,
    /// at most 4 · 63 · 128 = 32256 in magnitude.
    unsafe fn dot32_small(acc: int32x4_t, a: [int8x16_t; 2], b: [int8x16_t; 2]) -> int32x4_t;
}

struct Neon;
struct Dotprod;

impl Isa for Neon {
    #[inline(always)]
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        vpadalq_s16(acc, vmlal_high_s8(p, a, b))
    }

    #[inline(always)]
    unsafe fn dot32_small(acc: int32x4_t, a: [int8x16_t; 2], b: [int8x16_t; 2]) -> int32x4_t {
        let p = vmull_s8(vget_low_s8(a[0]), vget_low_s8(b[0]));
        let p = vmlal_high_s8(p, a[0], b[0]);
        let p = vmlal_s8(p, vget_low_s8(a[1]), vget_low_s8(b[1]));
        vpadalq_s16(acc, vmlal_high_s8(p, a[1], b[1]))
    }
}

impl Isa for Dotprod {
    #[inline(always)]
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: `sdot` needs the dotprod extension: this level is only
        // instantiated inside `dotprod` target-feature functions, which run
        // only where `best` found it. The instruction touches registers only.
        asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }

    #[inline(always)]
    unsafe fn dot32_small(acc: int32x4_t, a: [int8x16_t; 2], b: [int8x16_t; 2]) -> int32x4_t {
        Self::dot16(Self::dot16(acc, a[0], b[0]), a[1], b[1])
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

// Not inlined into the dispatch, like the dotprod instances (which cannot be):
// one body per format, level and row count.
#[inline(never)]
#[target_feature(enable = "neon")]
unsafe fn dot_neon<K: RowDot, const R: usize>(
    n: usize,
    w: *const u8,
    x: *const u8,
    out: &mut [f32; R],
) {
    K::dot::<Neon, R>(n, w, x, out)
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_dotprod<K: RowDot, const R: usize>(
    n: usize,
    w: *const u8,
    x: *const u8,
    out: &mut [f32; R],
) {
    K::dot::<Dotprod, R>(n, w, x, out)
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
                    Level::Neon => dot_neon::<K, $r>(n, w, x, out),
                    Level::Dotprod => dot_dotprod::<K, $r>(n, w, x, out),
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
// Small helpers. Blocks are packed without alignment: every load is unaligned
// (NEON loads of bytes need no alignment).

#[inline(always)]
unsafe fn ld_u8(p: *const u8) -> uint8x16_t {
    vld1q_u8(p)
}

#[inline(always)]
unsafe fn ld_s8(p: *const u8) -> int8x16_t {
    vld1q_s8(p.cast())
}

#[inline(always)]
unsafe fn rd_u16(p: *const u8) -> u16 {
    p.cast::<u16>().read_unaligned()
}

#[inline(always)]
unsafe fn rd_u32(p: *const u8) -> u32 {
    p.cast::<u32>().read_unaligned()
}

#[inline(always)]
unsafe fn rd_f32(p: *const u8) -> f32 {
    p.cast::<f32>().read_unaligned()
}

/// Four f16 (as bits) to f32.
#[inline(always)]
unsafe fn cvt_f16x4(h: uint16x4_t) -> float32x4_t {
    vcvt_f32_f16(vreinterpret_f16_u16(h))
}

#[inline(always)]
unsafe fn f16_to_f32(h: u16) -> f32 {
    vgetq_lane_f32::<0>(cvt_f16x4(vdup_n_u16(h)))
}

/// Round to nearest even, as `half::f16::from_f32`.
#[inline(always)]
unsafe fn f32_to_f16(x: f32) -> u16 {
    vget_lane_u16::<0>(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(x))))
}

/// The four lanes summed in f64.
#[inline(always)]
unsafe fn hsum_f64(v: float32x4_t) -> f64 {
    vaddvq_f64(vaddq_f64(
        vcvt_f64_f32(vget_low_f32(v)),
        vcvt_high_f64_f32(v),
    ))
}

/// 32 packed 4-bit values (16 bytes: value j low, j + 16 high) as bytes:
/// values 0..16, then 16..32.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> [uint8x16_t; 2] {
    let b = ld_u8(p);
    [vandq_u8(b, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(b)]
}

/// Byte i is 0xFF where bit i of the little-endian u32 at `p` is set, else 0:
/// bits 0..16, then 16..32.
#[inline(always)]
unsafe fn bit_masks(p: *const u8) -> [uint8x16_t; 2] {
    const SPREAD: [u8; 32] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    ];
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let word = vreinterpretq_u8_u32(vdupq_n_u32(rd_u32(p)));
    let bit = vld1q_u8(BIT.as_ptr());
    // Each byte gets the qh byte that holds its bit, then tests that bit.
    let lo = vqtbl1q_u8(word, vld1q_u8(SPREAD.as_ptr()));
    let hi = vqtbl1q_u8(word, vld1q_u8(SPREAD.as_ptr().add(16)));
    [vtstq_u8(lo, bit), vtstq_u8(hi, bit)]
}

#[inline(always)]
unsafe fn s8(v: [uint8x16_t; 2]) -> [int8x16_t; 2] {
    [vreinterpretq_s8_u8(v[0]), vreinterpretq_s8_u8(v[1])]
}

// ---------------------------------------------------------------------------
// 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
//
// Four blocks at a time: the scale products `dw·dx` (and `m·s`) of the four
// blocks are one vector, converted from f16 with one instruction; each block's
// i32 dot vector is converted and added with one FMA by element of that vector.

/// A weight format of 32-value blocks.
trait Q32 {
    const TYPE: GgmlType;
    /// Bytes per weight block.
    const SIZE: usize;
    /// Whether the block has an offset `m` after `d` (and the activation, Q8_1,
    /// a sum `s` after its `d`).
    const MIN: bool;
    /// Whether every value fits [`Isa::dot32_small`] (`|q| ≤ 63`).
    const SMALL: bool;
    /// The block's 32 values as signed bytes: values 0..16, then 16..32.
    unsafe fn values(p: *const u8) -> [int8x16_t; 2];
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
    const SMALL: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        let [lo, hi] = s8(nibbles(p.add(2)));
        let eight = vdupq_n_s8(8);
        [vsubq_s8(lo, eight), vsubq_s8(hi, eight)]
    }
}

impl Q32 for Q4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const SIZE: usize = 20;
    const MIN: bool = true;
    const SMALL: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        s8(nibbles(p.add(4)))
    }
}

impl Q32 for Q5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const SIZE: usize = 22;
    const MIN: bool = false;
    const SMALL: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        // q - 16 as a byte: the nibble with 0xF0 set where the fifth bit is clear.
        let [m0, m1] = bit_masks(p.add(2));
        let [n0, n1] = nibbles(p.add(6));
        let f0 = vdupq_n_u8(0xF0);
        s8([
            vorrq_u8(n0, vbicq_u8(f0, m0)),
            vorrq_u8(n1, vbicq_u8(f0, m1)),
        ])
    }
}

impl Q32 for Q5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const SIZE: usize = 24;
    const MIN: bool = true;
    const SMALL: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        let [m0, m1] = bit_masks(p.add(4));
        let [n0, n1] = nibbles(p.add(8));
        let b4 = vdupq_n_u8(16);
        s8([
            vorrq_u8(n0, vandq_u8(m0, b4)),
            vorrq_u8(n1, vandq_u8(m1, b4)),
        ])
    }
}

impl Q32 for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const SIZE: usize = 34;
    const MIN: bool = false;
    const SMALL: bool = false;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        [ld_s8(p.add(2)), ld_s8(p.add(18))]
    }
}

/// The f16 at byte `off` of `CNT` (≤ 4) blocks `stride` bytes apart, as f32.
/// Zero past `CNT`.
#[inline(always)]
unsafe fn f16_lanes<const CNT: usize>(p: *const u8, stride: usize, off: usize) -> float32x4_t {
    let mut h = vdup_n_u16(0);
    if CNT > 0 {
        h = vset_lane_u16::<0>(rd_u16(p.add(off)), h);
    }
    if CNT > 1 {
        h = vset_lane_u16::<1>(rd_u16(p.add(stride + off)), h);
    }
    if CNT > 2 {
        h = vset_lane_u16::<2>(rd_u16(p.add(2 * stride + off)), h);
    }
    if CNT > 3 {
        h = vset_lane_u16::<3>(rd_u16(p.add(3 * stride + off)), h);
    }
    cvt_f16x4(h)
}

/// [`RowDot`] for a [`Q32`] format.
struct B32<F>(F);

impl<F: Q32> B32<F> {
    /// Activation block bytes: Q8_1 (36) for the formats with a min, else Q8_0 (34).
    const X_SIZE: usize = if F::MIN { 36 } else { 34 };

    /// Adds the `CNT` (1..=4) blocks at `w` dotted with those at each `x` to
    /// `acc`, the offset terms `m·s` (one lane per block) to chain 0. Every
    /// size is its own unrolled instance.
    #[inline(always)]
    unsafe fn group<I: Isa, const R: usize, const CNT: usize>(
        w: *const u8,
        x: &[*const u8; R],
        acc: &mut [[float32x4_t; 2]; R],
    ) {
        let mut scales = [vdupq_n_f32(0.0); R];
        let dw = f16_lanes::<CNT>(w, F::SIZE, 0);
        for r in 0..R {
            scales[r] = vmulq_f32(dw, f16_lanes::<CNT>(x[r], Self::X_SIZE, 0));
            if F::MIN {
                let m = f16_lanes::<CNT>(w, F::SIZE, 2);
                let s = f16_lanes::<CNT>(x[r], Self::X_SIZE, 2);
                acc[r][0] = vfmaq_f32(acc[r][0], m, s);
            }
        }
        // Spelled out rather than a loop: the lane of `fmla` by element must be
        // a constant, and LLVM does not always unroll a loop this large.
        Self::block::<I, R, 0>(w, x, acc, &scales);
        if CNT > 1 {
            Self::block::<I, R, 1>(w, x, acc, &scales);
        }
        if CNT > 2 {
            Self::block::<I, R, 2>(w, x, acc, &scales);
        }
        if CNT > 3 {
            Self::block::<I, R, 3>(w, x, acc, &scales);
        }
    }

    /// Block `L` of a group: its i32 dot with each row, scaled by lane `L` of
    /// the row's `scales`, into FMA chain `L % 2` (whatever the number of rows,
    /// so that a row's result does not depend on the rows batched with it).
    #[inline(always)]
    unsafe fn block<I: Isa, const R: usize, const L: i32>(
        w: *const u8,
        x: &[*const u8; R],
        acc: &mut [[float32x4_t; 2]; R],
        scales: &[float32x4_t; R],
    ) {
        let i = L as usize;
        let v = F::values(w.add(i * F::SIZE));
        for r in 0..R {
            let q = x[r].add(i * Self::X_SIZE + Self::X_SIZE - 32);
            let q = [ld_s8(q), ld_s8(q.add(16))];
            let zero = vdupq_n_s32(0);
            let dot = if F::SMALL {
                I::dot32_small(zero, v, q)
            } else {
                I::dot16(I::dot16(zero, v[0], q[0]), v[1], q[1])
            };
            let a = &mut acc[r][i % 2];
            *a = vfmaq_laneq_f32::<L>(*a, vcvtq_f32_s32(dot), scales[r]);
        }
    }

    /// [`Self::group`] of `CNT` blocks, then advances the pointers past them.
    #[inline(always)]
    unsafe fn step<I: Isa, const R: usize, const CNT: usize>(
        w: &mut *const u8,
        x: &mut [*const u8; R],
        acc: &mut [[float32x4_t; 2]; R],
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
        let mut acc = [[vdupq_n_f32(0.0); 2]; R];
        for _ in 0..nb / 4 {
            Self::step::<I, R, 4>(&mut w, &mut xs, &mut acc);
        }
        if nb & 2 != 0 {
            Self::step::<I, R, 2>(&mut w, &mut xs, &mut acc);
        }
        if nb & 1 != 0 {
            Self::step::<I, R, 1>(&mut w, &mut xs, &mut acc);
        }
        for r in 0..R {
            out[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
        }
    }
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
    let (u0, u1, u2) = (rd_u32(p), rd_u32(p.add(4)), rd_u32(p.add(8)));
    let sc_lo = u0 & K1;
    let sc_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let mn_lo = u1 & K1;
    let mn_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// The Q8_K block's sixteen per-16 sums, as two vectors of eight.
#[inline(always)]
unsafe fn bsums(xb: *const u8) -> [int16x8_t; 2] {
    let p = xb.add(Q8K_BSUMS).cast::<i16>();
    [vld1q_s16(p), vld1q_s16(p.add(8))]
}

/// `Σ_j mins[j] * (bsums[2j] + bsums[2j+1])` as four i32 lanes.
#[inline(always)]
unsafe fn k4_min_products(mins16: int16x8_t, xb: *const u8) -> int32x4_t {
    let [b0, b1] = bsums(xb);
    let per32 = vpaddq_s16(b0, b1);
    let p = vmull_s16(vget_low_s16(per32), vget_low_s16(mins16));
    vmlal_high_s16(p, per32, mins16)
}

/// The shared part of Q4_K and Q5_K: `levels(wb, j, state)` gives the 64
/// values of 32-byte chunk j (sub-blocks 2j and 2j + 1) as bytes; `state` is
/// per-block data it prepared with `prepare(wb)`.
#[inline(always)]
unsafe fn dot_k4<I: Isa, const R: usize, const W_BYTES: usize, S: Copy>(
    nb: usize,
    w: *const u8,
    x: *const u8,
    out: &mut [f32; R],
    prepare: impl Fn(*const u8) -> S,
    levels: impl Fn(*const u8, usize, &mut S) -> [[int8x16_t; 2]; 2],
) {
    let mut acc = [vdupq_n_f32(0.0); R];
    let mut acc_m = [vdupq_n_f32(0.0); R];
    for b in 0..nb {
        let wb = w.add(b * W_BYTES);
        let mut xb = [x; R];
        for (r, p) in xb.iter_mut().enumerate() {
            *p = x.add((r * nb + b) * Q8K_BYTES);
        }
        let d = f16_to_f32(rd_u16(wb));
        let dmin = f16_to_f32(rd_u16(wb.add(2)));
        let (sc, mn) = k4_scales_mins(wb.add(4));
        let mins16 = vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(mn)));
        let mut state = prepare(wb);
        let mut sumi = [vdupq_n_s32(0); R];
        for j in 0..4 {
            let [lo, hi] = levels(wb, j, &mut state);
            let s_lo = ((sc >> (16 * j)) & 0xff) as i32;
            let s_hi = ((sc >> (16 * j + 8)) & 0xff) as i32;
            for r in 0..R {
                let q8 = xb[r].add(Q8K_QS + 64 * j);
                let zero = vdupq_n_s32(0);
                let p = I::dot32_small(zero, lo, [ld_s8(q8), ld_s8(q8.add(16))]);
                sumi[r] = vmlaq_n_s32(sumi[r], p, s_lo);
                let p = I::dot32_small(zero, hi, [ld_s8(q8.add(32)), ld_s8(q8.add(48))]);
                sumi[r] = vmlaq_n_s32(sumi[r], p, s_hi);
            }
        }
        for r in 0..R {
            let dx = rd_f32(xb[r]);
            let mins = vcvtq_f32_s32(k4_min_products(mins16, xb[r]));
            acc_m[r] = vfmaq_n_f32(acc_m[r], mins, -dmin * dx);
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(sumi[r]), d * dx);
        }
    }
    for r in 0..R {
        out[r] = vaddvq_f32(acc[r]) + vaddvq_f32(acc_m[r]);
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
        let m4 = vdupq_n_u8(0xF);
        dot_k4::<I, R, 144, ()>(
            n / QK_K,
            w,
            x,
            out,
            |_| (),
            |wb, j, _| {
                let q = [ld_u8(wb.add(16 + 32 * j)), ld_u8(wb.add(32 + 32 * j))];
                [
                    s8([vandq_u8(q[0], m4), vandq_u8(q[1], m4)]),
                    s8([vshrq_n_u8::<4>(q[0]), vshrq_n_u8::<4>(q[1])]),
                ]
            },
        );
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
        let m4 = vdupq_n_u8(0xF);
        let one = vdupq_n_u8(1);
        let two = vdupq_n_u8(2);
        dot_k4::<I, R, 176, [uint8x16_t; 2]>(
            n / QK_K,
            w,
            x,
            out,
            |wb| [ld_u8(wb.add(16)), ld_u8(wb.add(32))],
            |wb, j, qh| {
                // Chunk j takes bit 2j of qh for its first 32 values, 2j + 1 for
                // the rest; qh shifts down by two per chunk.
                let q = [ld_u8(wb.add(48 + 32 * j)), ld_u8(wb.add(64 + 32 * j))];
                let lo = |k: usize| {
                    let h = vshlq_n_u8::<4>(vandq_u8(qh[k], one));
                    vorrq_u8(vandq_u8(q[k], m4), h)
                };
                let hi = |k: usize| {
                    let h = vshlq_n_u8::<3>(vandq_u8(qh[k], two));
                    vorrq_u8(vshrq_n_u8::<4>(q[k]), h)
                };
                let v = [s8([lo(0), lo(1)]), s8([hi(0), hi(1)])];
                *qh = [vshrq_n_u8::<2>(qh[0]), vshrq_n_u8::<2>(qh[1])];
                v
            },
        );
    }
}

/// Q6_K (210 bytes: 128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, d).
struct Q6K;

impl Q6K {
    /// Adds sub-block `sub` (values `16 * sub..`) of the block at `wb`, whose
    /// levels are `v`, dotted with each row's block at `xb` and scaled, to `sumi`.
    #[inline(always)]
    unsafe fn sub16<I: Isa, const R: usize>(
        v: uint8x16_t,
        wb: *const u8,
        xb: &[*const u8; R],
        sub: usize,
        sumi: &mut [int32x4_t; R],
    ) {
        let v = vreinterpretq_s8_u8(v);
        let scale = i32::from(*wb.add(192 + sub) as i8);
        for r in 0..R {
            let q8 = ld_s8(xb[r].add(Q8K_QS + 16 * sub));
            let p = I::dot16(vdupq_n_s32(0), v, q8);
            sumi[r] = vmlaq_n_s32(sumi[r], p, scale);
        }
    }
}

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
        let m4 = vdupq_n_u8(0xF);
        let mut acc = [vdupq_n_f32(0.0); R];
        for b in 0..nb {
            let wb = w.add(b * 210);
            let mut xb = [x; R];
            for (r, p) in xb.iter_mut().enumerate() {
                *p = x.add((r * nb + b) * Q8K_BYTES);
            }
            let d = f16_to_f32(rd_u16(wb.add(208)));
            let scales = vld1q_s8(wb.add(192).cast());
            let sc16 = [vmovl_s8(vget_low_s8(scales)), vmovl_high_s8(scales)];
            // The levels are q + 32 (0..64); the 32 comes off as
            // 32 * Σ scale * bsum.
            let mut sumi = [vdupq_n_s32(0); R];
            for r in 0..R {
                let [b0, b1] = bsums(xb[r]);
                let p = vmull_s16(vget_low_s16(b0), vget_low_s16(sc16[0]));
                let p = vmlal_high_s16(p, b0, sc16[0]);
                let p = vmlal_s16(p, vget_low_s16(b1), vget_low_s16(sc16[1]));
                let p = vmlal_high_s16(p, b1, sc16[1]);
                sumi[r] = vmulq_n_s32(p, -32);
            }
            for half in 0..2 {
                let ql0 = [ld_u8(wb.add(64 * half)), ld_u8(wb.add(64 * half + 16))];
                let ql1 = [ld_u8(wb.add(64 * half + 32)), ld_u8(wb.add(64 * half + 48))];
                let qh = [
                    ld_u8(wb.add(128 + 32 * half)),
                    ld_u8(wb.add(144 + 32 * half)),
                ];
                // Four rows of 32 values (values 32i..32i + 32 of this half),
                // each two sub-blocks of 16: low nibbles of ql0, ql1, then the
                // high nibbles, with bit pairs 0, 2, 4, 6 of qh on top.
                let bits = |k: usize, mask: u8| vandq_u8(qh[k], vdupq_n_u8(mask));
                let subs = [
                    vorrq_u8(vandq_u8(ql0[0], m4), vshlq_n_u8::<4>(bits(0, 3))),
                    vorrq_u8(vandq_u8(ql0[1], m4), vshlq_n_u8::<4>(bits(1, 3))),
                    vorrq_u8(vandq_u8(ql1[0], m4), vshlq_n_u8::<2>(bits(0, 12))),
                    vorrq_u8(vandq_u8(ql1[1], m4), vshlq_n_u8::<2>(bits(1, 12))),
                    vorrq_u8(vshrq_n_u8::<4>(ql0[0]), bits(0, 48)),
                    vorrq_u8(vshrq_n_u8::<4>(ql0[1]), bits(1, 48)),
                    vorrq_u8(vshrq_n_u8::<4>(ql1[0]), vshrq_n_u8::<2>(bits(0, 192))),
                    vorrq_u8(vshrq_n_u8::<4>(ql1[1]), vshrq_n_u8::<2>(bits(1, 192))),
                ];
                // Spelled out: LLVM does not always unroll a loop over `subs`,
                // and would then keep it on the stack.
                let first = 8 * half;
                Self::sub16::<I, R>(subs[0], wb, &xb, first, &mut sumi);
                Self::sub16::<I, R>(subs[1], wb, &xb, first + 1, &mut sumi);
                Self::sub16::<I, R>(subs[2], wb, &xb, first + 2, &mut sumi);
                Self::sub16::<I, R>(subs[3], wb, &xb, first + 3, &mut sumi);
                Self::sub16::<I, R>(subs[4], wb, &xb, first + 4, &mut sumi);
                Self::sub16::<I, R>(subs[5], wb, &xb, first + 5, &mut sumi);
                Self::sub16::<I, R>(subs[6], wb, &xb, first + 6, &mut sumi);
                Self::sub16::<I, R>(subs[7], wb, &xb, first + 7, &mut sumi);
            }
            for r in 0..R {
                let dx = rd_f32(xb[r]);
                acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(sumi[r]), d * dx);
            }
        }
        for r in 0..R {
            out[r] = vaddvq_f32(acc[r]);
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
    unsafe fn load8(p: *const u8) -> [float32x4_t; 2];
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
    unsafe fn load8(p: *const u8) -> [float32x4_t; 2] {
        let p = p.cast::<f32>();
        [vld1q_f32(p), vld1q_f32(p.add(4))]
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
    unsafe fn load8(p: *const u8) -> [float32x4_t; 2] {
        let h = vreinterpretq_f16_u16(vld1q_u16(p.cast()));
        [vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)]
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
    unsafe fn load8(p: *const u8) -> [float32x4_t; 2] {
        let h = vld1q_u16(p.cast());
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        ]
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
        let mut xs = [x; R];
        for (r, p) in xs.iter_mut().enumerate() {
            *p = x.add(r * n * b);
        }
        let mut total = [0.0f64; R];
        let mut i = 0;
        while i + 16 <= n {
            let end = (i + FOLD).min(n);
            // Four FMA chains per row: enough to cover the FMA latency.
            let mut acc = [[vdupq_n_f32(0.0); 4]; R];
            while i + 16 <= end {
                let [w0, w1] = F::load8(w.add(i * b));
                let [w2, w3] = F::load8(w.add((i + 8) * b));
                for r in 0..R {
                    let [x0, x1] = F::load8(xs[r].add(i * b));
                    let [x2, x3] = F::load8(xs[r].add((i + 8) * b));
                    let a = &mut acc[r];
                    a[0] = vfmaq_f32(a[0], w0, x0);
                    a[1] = vfmaq_f32(a[1], w1, x1);
                    a[2] = vfmaq_f32(a[2], w2, x2);
                    a[3] = vfmaq_f32(a[3], w3, x3);
                }
                i += 16;
            }
            for r in 0..R {
                let a = &acc[r];
                total[r] += hsum_f64(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
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

#[target_feature(enable = "neon")]
unsafe fn f16_to_f32_neon(src: &[f16], dst: &mut [f32]) {
    let n = src.len();
    let (ps, pd) = (src.as_ptr().cast::<u8>(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let [a, b] = F16::load8(ps.add(2 * i));
        vst1q_f32(pd.add(i), a);
        vst1q_f32(pd.add(i + 4), b);
        i += 8;
    }
    for k in i..n {
        dst[k] = f16_to_f32(src[k].to_bits());
    }
}

// ---------------------------------------------------------------------------
// Activation quantization

/// # Safety
/// NEON; `dst.len() == ty.row_bytes(src.len())` for an activation type.
#[target_feature(enable = "neon")]
unsafe fn quantize_neon(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let n = src.len();
    let (x, y) = (src.as_ptr(), dst.as_mut_ptr());
    match ty {
        GgmlType::Q8_0 => {
            for b in 0..n / QK {
                let out = y.add(b * 34);
                let (d, _) = q8_block(x.add(b * QK), out.add(2));
                out.cast::<u16>().write_unaligned(f32_to_f16(d));
            }
        }
        GgmlType::Q8_1 => {
            for b in 0..n / QK {
                let out = y.add(b * 36);
                let (d, sum) = q8_block(x.add(b * QK), out.add(4));
                out.cast::<u16>().write_unaligned(f32_to_f16(d));
                let s = f32_to_f16(d * sum as f32);
                out.add(2).cast::<u16>().write_unaligned(s);
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
                let lo = vcvt_f16_f32(vld1q_f32(x.add(i)));
                let h = vcvt_high_f16_f32(lo, vld1q_f32(x.add(i + 4)));
                vst1q_u16(y.add(2 * i).cast(), vreinterpretq_u16_f16(h));
                i += 8;
            }
            for (k, &v) in src.iter().enumerate().skip(i) {
                y.add(2 * k).cast::<u16>().write_unaligned(f32_to_f16(v));
            }
        }
        GgmlType::BF16 => {
            let mut i = 0;
            while i + 8 <= n {
                let lo = bf16_round(vreinterpretq_u32_f32(vld1q_f32(x.add(i))));
                let hi = bf16_round(vreinterpretq_u32_f32(vld1q_f32(x.add(i + 4))));
                vst1q_u16(y.add(2 * i).cast(), vcombine_u16(lo, hi));
                i += 8;
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
        _ => unreachable!("quantize_neon: {ty} is not an activation type"),
    }
}

/// f32 bits to bf16 bits: round to nearest even, NaN kept quiet (the
/// reference's `f32_to_bf16`).
#[inline(always)]
unsafe fn bf16_round(u: uint32x4_t) -> uint16x4_t {
    let lsb = vandq_u32(vshrq_n_u32::<16>(u), vdupq_n_u32(1));
    let rounded = vshrq_n_u32::<16>(vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7fff), lsb)));
    let quiet = vorrq_u32(vshrq_n_u32::<16>(u), vdupq_n_u32(64));
    let abs = vandq_u32(u, vdupq_n_u32(0x7fff_ffff));
    let nan = vcgtq_u32(abs, vdupq_n_u32(0x7f80_0000));
    vmovn_u32(vbslq_u32(nan, quiet, rounded))
}

/// Sixteen i32 (four vectors, in order) to sixteen i8; every value is in
/// −127..=127 already.
#[inline(always)]
unsafe fn narrow_i8(v: [int32x4_t; 4]) -> int8x16_t {
    let a = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
    let b = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
    vcombine_s8(vmovn_s16(a), vmovn_s16(b))
}

/// One Q8_0/Q8_1 block as llama.cpp's ARM code: writes the 32 values to `qs`
/// and returns `(d, sum of the values)`.
#[inline(always)]
unsafe fn q8_block(x: *const f32, qs: *mut u8) -> (f32, i32) {
    let mut v = [vdupq_n_f32(0.0); 8];
    for (j, v) in v.iter_mut().enumerate() {
        *v = vld1q_f32(x.add(4 * j));
    }
    let mut m = vabsq_f32(v[0]);
    for v in &v[1..] {
        m = vmaxq_f32(m, vabsq_f32(*v));
    }
    let amax = vmaxvq_f32(m);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = vdupq_n_s32(0);
    for half in 0..2 {
        let mut q = [vdupq_n_s32(0); 4];
        for (k, q) in q.iter_mut().enumerate() {
            // fcvtns: round to nearest, ties to even.
            *q = vcvtnq_s32_f32(vmulq_n_f32(v[4 * half + k], id));
            sum = vaddq_s32(sum, *q);
        }
        vst1q_s8(qs.add(16 * half).cast(), narrow_i8(q));
    }
    (d, vaddvq_s32(sum))
}

/// One Q8_K block, bit-exact with the reference: the signed value of largest
/// magnitude (the first on ties) maps to -127.
#[inline(always)]
unsafe fn q8_k_block(x: *const f32, out: *mut u8) {
    let mut m = vdupq_n_f32(0.0);
    for k in 0..QK_K / 4 {
        m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x.add(4 * k))));
    }
    let amax = vmaxvq_f32(m);
    if amax == 0.0 {
        std::ptr::write_bytes(out, 0, Q8K_BYTES);
        return;
    }
    let target = vdupq_n_f32(amax);
    let mut max = 0.0f32;
    for k in 0..QK_K / 4 {
        let hit = vceqq_f32(vabsq_f32(vld1q_f32(x.add(4 * k))), target);
        if vmaxvq_u32(hit) != 0 {
            let first = (0..4).find(|&l| (*x.add(4 * k + l)).abs() == amax);
            max = *x.add(4 * k + first.unwrap_or(0));
            break;
        }
    }
    let iscale = -127.0 / max;
    let cap = vdupq_n_s32(127);
    for c in 0..QK_K / 16 {
        let mut q = [vdupq_n_s32(0); 4];
        for (k, q) in q.iter_mut().enumerate() {
            let v = vmulq_n_f32(vld1q_f32(x.add(16 * c + 4 * k)), iscale);
            // fcvtns is the reference's nearest_int (ties to even).
            *q = vminq_s32(vcvtnq_s32_f32(v), cap);
        }
        vst1q_s8(out.add(Q8K_QS + 16 * c).cast(), narrow_i8(q));
        let sum = vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
        out.add(Q8K_BSUMS + 2 * c)
            .cast::<i16>()
            .write_unaligned(sum as i16);
    }
    out.cast::<f32>().write_unaligned(1.0 / iscale);
}
