//! Tiled matrix products for prefill: [`PANEL_ROWS`] weight rows against many
//! tokens per pass.
//!
//! A matrix product (over any number of tokens) first unpacks each group of
//! [`PANEL_ROWS`] weight rows into a *panel* ([`pack`]), a layout the CPU's
//! kernel multiplies without decoding (values as bytes, the rows interleaved,
//! scales as f32), then multiplies the panel with every token ([`multiply`]).
//! The unpacking is paid once per group of rows and call, the multiply reuses
//! each loaded weight vector across several tokens and each activation value
//! across the eight rows. Activations are quantized as for [`super::vec_dot`],
//! plus a few bytes per block from [`prepare`].
//!
//! For a few tokens (decode), [`multiply_rows`] computes the same results
//! straight from the weight rows, since unpacking a panel would cost more than
//! it saves; it makes the same integer sums and the same f32 operations, so a
//! token's results do not depend on which path ran.
//!
//! The integer sums are the reference's; only the order of the f32 additions
//! differs. Where the CPU has no such kernel ([`supported`] is false) callers
//! use [`super::vec_dot_multi`].

use super::GgmlType;

/// Weight rows per panel.
pub const PANEL_ROWS: usize = 8;

/// Bytes of [`prepare`]'s output per activation block.
pub const META_BYTES: usize = 8;

/// Whether this CPU has a tiled kernel for weights of type `ty`.
#[inline]
pub fn supported(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = super::x86::best() {
        return super::x86::gemm::supported(level, ty);
    }
    let _ = ty;
    false
}

/// Bytes of a panel of [`PANEL_ROWS`] rows of `k` values of `ty` (a type
/// [`supported`] accepts).
pub fn panel_bytes(ty: GgmlType, k: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return super::x86::gemm::panel_bytes(ty, k);
    #[cfg(not(target_arch = "x86_64"))]
    unsupported(ty, k)
}

/// The most bytes a panel of `k`-wide rows takes, for any type.
pub fn max_panel_bytes(k: usize) -> usize {
    // Eleven bytes per value bound every layout (the widest, Q4_K's, takes
    // 2624 per 256 values).
    11 * k
}

/// Bytes of [`prepare`]'s output for one activation row of `k` values.
pub fn meta_bytes(k: usize) -> usize {
    k / 32 * META_BYTES
}

/// Writes the per-block metadata the kernel needs for one activation row
/// (`act`, of `k` values of `act_ty`) to `meta` ([`meta_bytes`] long).
///
/// # Panics
/// Where [`supported`] is false for every weight type with these activations,
/// or a length is wrong.
pub fn prepare(act_ty: GgmlType, k: usize, act: &[u8], meta: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    return super::x86::gemm::prepare_at(best(), act_ty, k, act, meta);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (act, meta);
        unsupported(act_ty, k)
    }
}

/// Unpacks [`PANEL_ROWS`] rows of `ty` (back to back in `rows`) into `panel`.
///
/// # Panics
/// If [`supported`] is false for `ty` or a length is wrong.
pub fn pack(ty: GgmlType, k: usize, rows: &[u8], panel: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    return super::x86::gemm::pack_at(best(), ty, k, rows, panel);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, panel);
        unsupported(ty, k)
    }
}

/// The panel times `n` activation rows (back to back in `act`, with their
/// [`prepare`] output back to back in `meta`): the [`PANEL_ROWS`] results of
/// token t go to `out[t * out_stride..][..PANEL_ROWS]`.
///
/// # Panics
/// If [`supported`] is false for `ty` or a length is wrong.
#[allow(clippy::too_many_arguments)]
pub fn multiply(
    ty: GgmlType,
    k: usize,
    panel: &[u8],
    act: &[u8],
    meta: &[u8],
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    return super::x86::gemm::multiply_at(best(), ty, k, panel, act, meta, n, out, out_stride);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (panel, act, meta, n, out, out_stride);
        unsupported(ty, k)
    }
}

/// Token counts below this take [`multiply_rows`] for weights of type `ty`;
/// from here on a panel pays for its unpacking. `ACTS=1,2,4,6,8 kernel_bench`:
/// for the 32-value formats a panel costs about as much as one token's
/// products from the rows and each further token a third of that; the
/// K-quants' panels cost three tokens' products, and their rows, read as one
/// stream from memory, stay ahead up to four tokens.
pub fn rows_below(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 5,
        _ => 2,
    }
}

/// [`multiply`]'s results, bit for bit, from [`PANEL_ROWS`] rows of `ty` (back
/// to back in `rows`) without a panel: cheaper for a few tokens.
///
/// # Panics
/// If [`supported`] is false for `ty` or a length is wrong.
#[allow(clippy::too_many_arguments)]
pub fn multiply_rows(
    ty: GgmlType,
    k: usize,
    rows: &[u8],
    act: &[u8],
    meta: &[u8],
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    return super::x86::gemm::multiply_rows_at(best(), ty, k, rows, act, meta, n, out, out_stride);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, act, meta, n, out, out_stride);
        unsupported(ty, k)
    }
}

#[cfg(target_arch = "x86_64")]
fn best() -> super::x86::Level {
    super::x86::best().expect("gemm: no tiled kernels on this CPU")
}

#[cfg(not(target_arch = "x86_64"))]
fn unsupported(ty: GgmlType, _k: usize) -> ! {
    panic!("gemm: no tiled kernel for {ty} on this CPU")
}
