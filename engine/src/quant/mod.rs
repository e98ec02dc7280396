//! Tensor element formats: plain floats and llama.cpp's block quantizations.
//!
//! Every format has a scalar reference implementation (dequantize, quantize and
//! dot product) that is the test oracle for every faster kernel. A quantized
//! weight row is multiplied with an activation row that was itself quantized once
//! into the weight type's [`GgmlType::vec_dot_type`] (Q8_0, Q8_1 or Q8_K), exactly
//! as llama.cpp does, so integer dot products do the work.
//!
//! The functions below dispatch in a flat chain: the best kernel this CPU runs
//! (chosen once, at the first call) and otherwise the scalar [`mod@reference`], which
//! stays callable directly as the test oracle.

pub mod blocks;
pub mod gemm;
pub mod reference;
#[cfg(test)]
mod tests;
// x86_64 kernels, public so that tests and benchmarks can pick a feature level.
#[cfg(target_arch = "x86_64")]
pub mod x86;
// What the architectures' kernel tests share.
#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod kernel_tests;
#[cfg(all(test, target_arch = "x86_64"))]
mod x86_tests;
// aarch64 (NEON, dotprod) kernels, public for the same reason.
#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(all(test, target_arch = "aarch64"))]
mod aarch64_tests;

#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
#[cfg(target_arch = "x86_64")]
use x86 as arch;

/// Targets without fast kernels: every call goes to the reference.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod arch {
    use super::GgmlType;

    pub fn vec_dot_multi(_: GgmlType, _: usize, _: &[u8], _: &[u8], _: &mut [f32]) -> bool {
        false
    }
    pub fn quantize_row(_: GgmlType, _: &[f32], _: &mut [u8]) -> bool {
        false
    }
    pub fn f16_to_f32_slice(_: &[half::f16], _: &mut [f32]) -> bool {
        false
    }
}

pub use reference::{dequantize_row, dot_f32};

/// Dot product of one weight row `w` of `n` values of type `ty` with one
/// activation row `x` of `n` values of `ty.vec_dot_type()`.
///
/// # Panics
/// If `n` is not a whole number of blocks or either row has the wrong length.
#[inline]
pub fn vec_dot(ty: GgmlType, w: &[u8], x: &[u8], n: usize) -> f32 {
    let mut out = [0.0f32];
    vec_dot_multi(ty, n, w, x, &mut out);
    out[0]
}

/// One weight row (type `ty`, `n` values) against 1..=4 activation rows stored
/// back to back in `x` (each `ty.vec_dot_type().row_bytes(n)` bytes); writes
/// `out.len()` results.
///
/// The weight row is decoded once and reused for every activation row: this is
/// what makes prefill (many tokens) faster than repeated [`vec_dot`].
///
/// # Panics
/// If `out.len()` is not 1..=4, `n` is not a whole number of blocks, or a row has
/// the wrong length.
#[inline]
pub fn vec_dot_multi(ty: GgmlType, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
    if arch::vec_dot_multi(ty, n, w, x, out) {
        return;
    }
    assert!(
        (1..=4).contains(&out.len()),
        "vec_dot_multi: {} activation rows, expected 1..=4",
        out.len()
    );
    let x_row = x.len() / out.len();
    assert_eq!(
        x_row * out.len(),
        x.len(),
        "vec_dot_multi: x is not {} rows",
        out.len()
    );
    for (o, xr) in out.iter_mut().zip(x.chunks_exact(x_row.max(1))) {
        *o = reference::vec_dot(ty, w, xr, n);
    }
}

/// Converts a row of f32 to type `ty`. Activation types (Q8_0, Q8_1, Q8_K, F16,
/// BF16, F32) use the fast kernels where there are some (on x86, Q8_0 and Q8_1
/// then round as llama.cpp's x86 build does: see [`x86::quantize_row_at`]);
/// weight types always use the reference.
///
/// # Panics
/// If `src.len()` is not a whole number of blocks or `dst.len()` is not
/// `ty.row_bytes(src.len())`.
#[inline]
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    if arch::quantize_row(ty, src, dst) {
        return;
    }
    reference::quantize_row(ty, src, dst)
}

/// Converts f16 values to f32 (exactly), for reading the KV cache.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn f16_to_f32_slice(src: &[half::f16], dst: &mut [f32]) {
    if arch::f16_to_f32_slice(src, dst) {
        return;
    }
    reference::f16_to_f32_slice(src, dst)
}

/// A tensor element format, numbered as in GGUF files (`ggml_type`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 32 weights, f16 scale, 4-bit values.
    Q4_0,
    /// 32 weights, f16 scale and min, 4-bit values.
    Q4_1,
    /// 32 weights, f16 scale, 5-bit values.
    Q5_0,
    /// 32 weights, f16 scale and min, 5-bit values.
    Q5_1,
    /// 32 weights, f16 scale, 8-bit values.
    Q8_0,
    /// 32 values, f16 scale and scaled sum, 8-bit values (activations for Q4_1/Q5_1).
    Q8_1,
    /// 256-weight super-blocks, 4-bit values with 6-bit sub-block scales and mins.
    Q4_K,
    /// 256-weight super-blocks, 5-bit values with 6-bit sub-block scales and mins.
    Q5_K,
    /// 256-weight super-blocks, 6-bit values with 8-bit sub-block scales.
    Q6_K,
    /// 256 values, f32 scale, 8-bit values and 16-value sums (activations for K-quants).
    Q8_K,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// The type for a GGUF `ggml_type` id, or `None` for an id this build does not support.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The GGUF `ggml_type` id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// A weight type weights may be quantized to as they load, by its name
    /// (`q8_0`, `Q4_K`; any case); `None` for other names and for the
    /// activation-only types.
    pub fn weight_type(name: &str) -> Option<Self> {
        [
            Self::Q4_0,
            Self::Q4_1,
            Self::Q5_0,
            Self::Q5_1,
            Self::Q8_0,
            Self::Q4_K,
            Self::Q5_K,
            Self::Q6_K,
        ]
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The name llama.cpp uses for the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
            Self::BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub const fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
        }
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a whole number of
    /// blocks (or the size overflows).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let blocks = n / self.block_size();
        if blocks * self.block_size() != n {
            return None;
        }
        blocks.checked_mul(self.type_size())
    }

    /// The format activations are quantized into before a dot product with a row
    /// of this type (llama.cpp's `vec_dot_type`).
    pub fn vec_dot_type(self) -> GgmlType {
        match self {
            Self::F32 => Self::F32,
            Self::F16 => Self::F16,
            Self::BF16 => Self::BF16,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => Self::Q8_0,
            Self::Q4_1 | Self::Q5_1 | Self::Q8_1 => Self::Q8_1,
            Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => Self::Q8_K,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
