//! Bit-exact port of Pillow's `Image.resize((w, h), resample=Image.BICUBIC)`
//! for 8-bit RGB images (default `box`, `reducing_gap=None`).
//!
//! The arithmetic follows `src/libImaging/Resample.c` step by step: the
//! filter weights are computed in `f64` exactly as the C code does (same
//! operations in the same order), rounded to 22-bit fixed point, and applied
//! in two separable passes with 32-bit integer accumulators. Each pass rounds
//! its result to 8 bits, so the pass order matters; it is the one thing that
//! differs between Pillow releases, see [`PillowVersion`].

use std::ops::Range;

/// Pillow's fixed-point precision: 32-bit accumulator minus 8 bits of result
/// minus 2 bits of headroom (the bicubic kernel has negative lobes, so sums
/// can leave 0..=255 on either side).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Every accumulator starts at one half so that the final shift rounds to
/// nearest instead of truncating.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Support (radius) of the bicubic kernel in source pixels at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Which Pillow release to reproduce. The kernel and rounding are identical
/// in all of them; only the order of the two passes for some shapes differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PillowVersion {
    /// Pillow 11.0 to 12.1: always the horizontal pass first, then vertical.
    Pillow11,
    /// Pillow 12.2 and 12.3: as 11, except that `Image.resize` runs the
    /// vertical pass first for very tall images (`h > 100 * w`) whose height
    /// shrinks.
    Pillow12,
    /// Pillow 13: `ImagingResampleInner` runs the vertical pass first whenever
    /// the height shrinks by more than twice as many pixels as the width does.
    #[default]
    Pillow13,
}

/// Resizes interleaved 8-bit RGB pixels (`w * h * 3` bytes, rows top to
/// bottom) to `out_w x out_h` exactly as Pillow 13 does with
/// `Image.resize((out_w, out_h), Image.BICUBIC)` on a mode "RGB" image; use
/// [`resize_bicubic_rgb8_as`] to pick another release.
///
/// # Panics
/// If any size is 0, or `src.len() != w * h * 3`.
pub fn resize_bicubic_rgb8(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resize_bicubic_rgb8_as(src, w, h, out_w, out_h, PillowVersion::default())
}

/// As [`resize_bicubic_rgb8`], reproducing the given Pillow release.
///
/// # Panics
/// If any size is 0, or `src.len() != w * h * 3`.
pub fn resize_bicubic_rgb8_as(
    src: &[u8],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    version: PillowVersion,
) -> Vec<u8> {
    // Pillow rejects empty sizes ("height and width must be > 0").
    assert!(
        w >= 1 && h >= 1 && out_w >= 1 && out_h >= 1,
        "resize_bicubic_rgb8: all sizes must be >= 1"
    );
    assert_eq!(
        Some(src.len()),
        w.checked_mul(h).and_then(|n| n.checked_mul(3)),
        "resize_bicubic_rgb8: src must hold w * h * 3 bytes"
    );

    // `Image.resize` returns `self.copy()` when the size does not change.
    if (w, h) == (out_w, out_h) {
        return src.to_vec();
    }
    // With the default box, a pass whose axis keeps its size is skipped
    // (`need_horizontal` / `need_vertical`). Running it would not change the
    // pixels anyway: the kernel is 1 at distance 0 and 0 at distances 1 and 2.
    let need_horizontal = out_w != w;
    let need_vertical = out_h != h;

    let vertical_first = match version {
        PillowVersion::Pillow11 => false,
        // Image.py: `self.size[1] > self.size[0] * 100 and size[1] <
        // self.size[1]` resizes to (w, out_h) first, then to (out_w, out_h).
        PillowVersion::Pillow12 => h > w.saturating_mul(100) && out_h < h,
        // Resample.c: `!horizontal_first`, computed in C ints (i128 here so
        // that no size can overflow).
        PillowVersion::Pillow13 => {
            let dy = h as i128 - out_h as i128;
            let dx = w as i128 - out_w as i128;
            dy > 0 && dy > dx * 2
        }
    };

    let row_len = w * 3;
    if vertical_first {
        // Vertical first: all source rows, all columns, no row trimming.
        let tmp = vertical_pass(src, row_len, &precompute_coeffs(h, out_h));
        if need_horizontal {
            horizontal_pass(&tmp, w, 0..out_h, &precompute_coeffs(w, out_w))
        } else {
            tmp
        }
    } else if need_horizontal {
        let mut y_windows = precompute_coeffs(h, out_h);
        // Only source rows some output row reads get the horizontal pass
        // (`ybox_first..ybox_last`); windows are monotonic, so the first and
        // last window bound that range. The vertical windows are then shifted
        // to index the trimmed intermediate image.
        let first = y_windows.first().map_or(0, |win| win.start);
        let last = y_windows.last().map_or(h, Window::end);
        let tmp = horizontal_pass(src, w, first..last, &precompute_coeffs(w, out_w));
        if need_vertical {
            for win in &mut y_windows {
                win.start -= first;
            }
            vertical_pass(&tmp, out_w * 3, &y_windows)
        } else {
            tmp
        }
    } else {
        // Only the height changes (both equal was handled above).
        vertical_pass(src, row_len, &precompute_coeffs(h, out_h))
    }
}

/// The source pixels one output pixel reads along one axis: `weights[i]`
/// applies to source index `start + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    start: usize,
    weights: Vec<i32>,
}

impl Window {
    fn end(&self) -> usize {
        self.start + self.weights.len()
    }
}

/// Pillow's `bicubic_filter`: Keys' cubic convolution kernel with a = -0.5,
/// written with the same operation order so every `f64` result is identical.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the
/// default box `(0, in_size)`.
///
/// The windows satisfy `start < in_size`, `end() <= in_size`, and have at
/// least one weight, because every centre lies inside `(0, in_size)`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Vec<Window> {
    // Pillow passes the box edges as C floats and subtracts them in float
    // before widening to double (exact below 2^24, mirrored regardless).
    let in0 = 0.0_f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    // When downscaling the kernel is stretched by the scale factor, so that
    // it averages over all covered pixels (antialiasing); when upscaling it
    // keeps its natural width.
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let inv_filterscale = 1.0 / filterscale;

    (0..out_size)
        .map(|xx| {
            // Pixel centres sit at half-integer coordinates.
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; negatives are clamped to 0
            // right after, so truncation and floor agree here.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let count = (xmax - xmin).max(0);

            // Unnormalised weights, summed left to right as the C loop does.
            let raw: Vec<f64> = (xmin..xmin + count)
                .map(|x| bicubic((x as f64 - center + 0.5) * inv_filterscale))
                .collect();
            let ww = raw.iter().fold(0.0, |acc, &k| acc + k);
            // Normalise by division (not by a reciprocal) so that the window
            // sums to 1 as Pillow's does, then round to fixed point.
            let weights = raw
                .iter()
                .map(|&k| to_fixed(if ww != 0.0 { k / ww } else { k }))
                .collect();
            Window {
                start: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// `normalize_coeffs_8bpc`: Pillow rounds each weight to 22-bit fixed point,
/// half away from zero (adding +-0.5, then truncating toward zero).
fn to_fixed(k: f64) -> i32 {
    let scaled = k * f64::from(1_u32 << PRECISION_BITS);
    if k < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

/// `clip8`: drop the fraction bits (arithmetic shift, i.e. floor; the
/// accumulator started at one half, so this rounds) and saturate to a byte.
/// Pillow uses a lookup table covering -640..=639, which is this clamp.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Adds `pixel * weight` to an accumulator. Pillow uses C `int`; for the
/// bicubic weights the sum stays clear of `i32` overflow (a window's |weights|
/// sum to at most about 1.27, times 255 and 2^22, is about 1.4e9; a unit test
/// checks the bound). Wrapping ops only keep the no-panic guarantee and do
/// not change any result.
fn mac(acc: i32, pixel: u8, weight: i32) -> i32 {
    acc.wrapping_add(i32::from(pixel).wrapping_mul(weight))
}

/// `ImagingResampleHorizontal_8bpc` for RGB: resamples source rows `rows`
/// (each `src_w` pixels) to `windows.len()` pixels. Pillow stores RGB as 4
/// bytes per pixel, but each channel is accumulated on its own and the pad
/// byte is never read into R, G or B, so 3 bytes per pixel give the same
/// result.
fn horizontal_pass(src: &[u8], src_w: usize, rows: Range<usize>, windows: &[Window]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * windows.len() * 3);
    for row in src
        .chunks_exact(src_w * 3)
        .skip(rows.start)
        .take(rows.len())
    {
        for win in windows {
            let mut acc = [HALF; 3];
            let taps = row.get(win.start * 3..).unwrap_or_default();
            for (pixel, &weight) in taps.chunks_exact(3).zip(&win.weights) {
                for (a, &p) in acc.iter_mut().zip(pixel) {
                    *a = mac(*a, p, weight);
                }
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

/// `ImagingResampleVertical_8bpc`: resamples rows of `row_len` bytes to
/// `windows.len()` rows. Pillow loops tap by tap inside each column; here the
/// taps are added row by row for cache-friendliness, which gives the same
/// sums because integer addition is associative.
fn vertical_pass(src: &[u8], row_len: usize, windows: &[Window]) -> Vec<u8> {
    let mut out = Vec::with_capacity(windows.len() * row_len);
    let mut acc = vec![HALF; row_len];
    for win in windows {
        acc.fill(HALF);
        let rows = src.chunks_exact(row_len).skip(win.start);
        for (row, &weight) in rows.zip(&win.weights) {
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = mac(*a, p, weight);
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSIONS: [PillowVersion; 3] = [
        PillowVersion::Pillow11,
        PillowVersion::Pillow12,
        PillowVersion::Pillow13,
    ];

    fn pattern(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect()
    }

    #[test]
    fn same_size_is_a_copy() {
        let src = pattern(5, 4);
        assert_eq!(resize_bicubic_rgb8(&src, 5, 4, 5, 4), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = [200_u8, 3, 77].repeat(7 * 3);
        for version in VERSIONS {
            let out = resize_bicubic_rgb8_as(&src, 7, 3, 19, 2, version);
            assert_eq!(out, [200_u8, 3, 77].repeat(19 * 2));
        }
    }

    #[test]
    fn tiny_and_extreme_sizes_do_not_panic() {
        for version in VERSIONS {
            for (w, h) in [(1, 1), (1, 2), (2, 1), (1, 300), (300, 1)] {
                let src = pattern(w, h);
                for (ow, oh) in [(1, 1), (1, 5), (5, 1), (3, 700), (700, 3)] {
                    let out = resize_bicubic_rgb8_as(&src, w, h, ow, oh, version);
                    assert_eq!(out.len(), ow * oh * 3);
                }
            }
        }
    }

    #[test]
    fn windows_are_in_bounds_and_sum_to_one() {
        for in_size in 1..120 {
            for out_size in 1..120 {
                for win in precompute_coeffs(in_size, out_size) {
                    assert!(!win.weights.is_empty() && win.end() <= in_size);
                    let sum: i32 = win.weights.iter().sum();
                    // Rounding moves each weight by at most half a unit.
                    let slack = win.weights.len() as i32 / 2 + 1;
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= slack, "{sum}");
                    // No i32 overflow: 255 * sum|w| + HALF < 2^31 needs
                    // sum|w| <= 2.0 in fixed point (the worst seen is ~1.27).
                    let abs_sum: i64 = win.weights.iter().map(|&k| i64::from(k).abs()).sum();
                    assert!(abs_sum <= 2 << PRECISION_BITS, "{abs_sum}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "all sizes must be >= 1")]
    fn zero_size_panics() {
        resize_bicubic_rgb8(&[], 0, 1, 1, 1);
    }
}
