//! The x86 kernels against the scalar reference, at every level this CPU runs
//! (each level is called directly, not only through dispatch).
//!
//! Two kinds of check: rows whose scales are 1 and whose values are small
//! integers, where every f32 operation is exact and the kernels must agree with
//! the reference bit for bit (this pins the integer paths: unpacking, signs,
//! sub-block scales, mins, tails); and realistic rows, where only the order of
//! the f32 additions differs and the error has a named bound per type.

use half::f16;

use super::blocks::{Block, BlockQ8_1};
use super::kernel_tests::{
    act_rows, available, magnitude, quantize_inputs, quantize_ref, Kernels, ONE_F16,
};
use super::reference;
use super::tests::Rng;
use super::x86::{self, Level};
use super::GgmlType;

/// Every weight type with an x86 dot kernel.
const DOT_TYPES: [GgmlType; 11] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

/// |fast − reference| / Σ|w·x| on realistic rows, where Σ|w·x| sums the
/// magnitudes of the products of the dequantized values (for Q4_1/Q5_1 also
/// the offset terms). Both sides round each block's scaled sum once and add the
/// blocks in f32 in different orders, so the error is a few ulps of the largest
/// partial sums. The bounds are about 4× the worst seen over the test's rows; a
/// wrong value, scale or block gives 1e-3 or more.
const FAST_DOT_ERROR: [(GgmlType, f64); 11] = [
    (GgmlType::Q4_0, 1e-7),
    (GgmlType::Q4_1, 1e-7),
    (GgmlType::Q5_0, 1e-7),
    (GgmlType::Q5_1, 1e-7),
    (GgmlType::Q8_0, 1e-7),
    // The scaled sums and the min terms are rounded separately and cancel
    // (value = d·sc·q − dmin·m), so the error is larger against Σ|w·x|.
    (GgmlType::Q4_K, 4e-7),
    (GgmlType::Q5_K, 4e-7),
    (GgmlType::Q6_K, 2e-7),
    // f32 lanes of up to 1024 / 16 products before each fold into f64.
    (GgmlType::F32, 2e-7),
    (GgmlType::F16, 2e-7),
    (GgmlType::BF16, 2e-7),
];

fn bound(ty: GgmlType) -> f64 {
    FAST_DOT_ERROR
        .iter()
        .find(|(t, _)| *t == ty)
        .map(|(_, b)| *b)
        .expect("type missing from FAST_DOT_ERROR")
}

/// Row lengths per block size: the smallest row, rows that end in a partial
/// group of eight 32-blocks (7, 9, 18 and 129 blocks), float rows with every
/// tail length class, and rows of 4096 and more.
fn lengths(ty: GgmlType) -> &'static [usize] {
    match ty.block_size() {
        1 => &[1, 7, 8, 15, 16, 17, 40, 1000, 1024, 1041, 4096, 4099],
        32 => &[32, 64, 224, 256, 288, 576, 896, 4096, 4128],
        _ => &[256, 512, 1536, 4352],
    }
}

fn kernels() -> Kernels<Level> {
    Kernels {
        levels: available(&Level::ALL, Level::is_available, Level::name),
        name: Level::name,
        multi_at: x86::vec_dot_multi_at,
        quantize_at: x86::quantize_row_at,
    }
}

#[test]
fn vec_dot_multi_matches_reference_on_realistic_rows() {
    kernels().realistic_rows(0x5eed_0101, &DOT_TYPES, lengths, bound);
}

#[test]
fn vec_dot_multi_is_exact_on_integer_rows() {
    kernels().integer_rows(0x5eed_0102, &DOT_TYPES, &[32, 224, 288, 576, 1024]);
}

#[test]
fn public_functions_dispatch_to_the_best_level() {
    let mut rng = Rng(0x5eed_0103);
    let best = x86::best();
    eprintln!("best level: {best:?}");
    for ty in DOT_TYPES {
        let n = lengths(ty)[2];
        let w = quantize_ref(ty, &rng.row(n));
        let x = act_rows(&mut rng, ty, n, 3);
        let mut out = [0.0f32; 3];
        super::vec_dot_multi(ty, n, &w, &x, &mut out);
        let single = super::vec_dot(ty, &w, &x[..x.len() / 3], n);
        let want = match best {
            Some(level) => kernels().fast(level, ty, n, &w, &x, 3),
            None => x
                .chunks_exact(x.len() / 3)
                .map(|xr| reference::vec_dot(ty, &w, xr, n))
                .collect(),
        };
        assert_eq!(out.to_vec(), want, "{ty}");
        assert_eq!(single, want[0], "{ty}");
    }
}

#[test]
fn types_without_a_kernel_fall_back_to_the_reference() {
    kernels().fall_back(0x5eed_0104);
}

#[test]
fn q8_k_f16_bf16_f32_quantize_bit_exact() {
    let mut rng = Rng(0x5eed_0105);
    let inputs = quantize_inputs(&mut rng);
    for level in kernels().levels {
        for ty in [GgmlType::Q8_K, GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
            for v in &inputs {
                assert_eq!(
                    kernels().quantize(level, ty, v),
                    quantize_ref(ty, v),
                    "{} {ty} n={}",
                    level.name(),
                    v.len()
                );
            }
        }
        for ty in [GgmlType::F16, GgmlType::BF16] {
            for n in 1..40 {
                let v = rng.row(n);
                assert_eq!(
                    kernels().quantize(level, ty, &v),
                    quantize_ref(ty, &v),
                    "{ty} n={n}"
                );
            }
        }
        // bf16: NaN stays NaN (quiet), infinities and ties round as the reference.
        let v = [
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            1.0 + 2f32.powi(-8),
            -0.0,
        ];
        let v: Vec<f32> = v.iter().cycle().take(20).copied().collect();
        assert_eq!(
            kernels().quantize(level, GgmlType::BF16, &v),
            quantize_ref(GgmlType::BF16, &v)
        );
    }
}

#[test]
fn q8_0_q8_1_quantize_within_one_of_reference() {
    let mut rng = Rng(0x5eed_0106);
    let inputs = quantize_inputs(&mut rng);
    for level in kernels().levels {
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
            let (mut values, mut off_by_one) = (0usize, 0usize);
            for v in &inputs {
                let (got, want) = (kernels().quantize(level, ty, v), quantize_ref(ty, v));
                let size = ty.type_size();
                for (gb, wb) in got.chunks_exact(size).zip(want.chunks_exact(size)) {
                    // Same scale bytes; values within one.
                    assert_eq!(gb[..2], wb[..2], "{} {ty}: d", level.name());
                    let qs = size - 32;
                    for (&g, &w) in gb[qs..].iter().zip(&wb[qs..]) {
                        let diff = (i32::from(g as i8) - i32::from(w as i8)).abs();
                        assert!(diff <= 1, "{} {ty}: value {g} vs {w}", level.name());
                        off_by_one += diff as usize;
                        values += 1;
                    }
                    if ty == GgmlType::Q8_1 && gb[4..] == wb[4..] {
                        // Same values, same s = d * Σ q (d before its f16 rounding).
                        assert_eq!(gb[2..4], wb[2..4], "{} {ty}: s", level.name());
                    } else if ty == GgmlType::Q8_1 {
                        // s belongs to the block's own values.
                        let b = BlockQ8_1::read(gb);
                        let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
                        let want = sum as f32 * b.d.to_f32();
                        assert!((b.s.to_f32() - want).abs() <= 2e-3 * want.abs());
                    }
                }
            }
            // The two roundings disagree only near exact halves: rare.
            assert!(
                off_by_one * 1000 <= values,
                "{} {ty}: {off_by_one} of {values} values differ",
                level.name()
            );
        }
    }
}

#[test]
fn q8_0_rounds_half_to_even_like_llama_cpp_x86() {
    // amax = 127: 127 / amax = 1, so the values round as they stand; the
    // reference (roundf) would give 3, -3, 1, -1.
    let mut x = [0.0f32; 32];
    x[..6].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.4]);
    for level in kernels().levels {
        let q = kernels().quantize(level, GgmlType::Q8_0, &x);
        assert_eq!(q[..2], ONE_F16);
        let qs: Vec<i8> = q[2..8].iter().map(|&b| b as i8).collect();
        assert_eq!(qs, [127, 2, -2, 0, 0, 1], "{}", level.name());
    }
}

#[test]
fn f16_to_f32_slice_is_exact() {
    let mut rng = Rng(0x5eed_0107);
    let specials = [
        0.0,
        -0.0,
        65504.0,
        -65504.0,
        6.0e-8,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    for level in kernels().levels {
        for n in (0..40).chain([127, 1024, 1031]) {
            let mut src: Vec<f16> = rng.row(n).into_iter().map(f16::from_f32).collect();
            for (s, v) in src.iter_mut().zip(specials) {
                *s = f16::from_f32(v);
            }
            let mut got = vec![1.0; n];
            x86::f16_to_f32_slice_at(level, &src, &mut got);
            for (i, (g, s)) in got.iter().zip(&src).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    s.to_f32().to_bits(),
                    "{} n={n} [{i}]",
                    level.name()
                );
            }
        }
    }
    let mut nan = [0.0f32];
    super::f16_to_f32_slice(&[f16::NAN], &mut nan);
    assert!(nan[0].is_nan());
}

#[test]
fn tiled_products_match_reference_and_do_not_depend_on_the_batch() {
    use super::gemm::{meta_bytes, PANEL_ROWS};
    use super::x86::gemm as tiled;
    let mut rng = Rng(0x5eed_0202);
    let mut covered = 0;
    for level in kernels().levels {
        for ty in DOT_TYPES {
            if !tiled::supported(level, ty) {
                continue;
            }
            covered += 1;
            let ks: &[usize] = if ty.block_size() == 32 {
                &[32, 64, 288, 640, 896]
            } else {
                &[256, 512, 1536]
            };
            for &k in ks {
                let rb = ty.row_bytes(k).unwrap();
                let w: Vec<u8> = (0..PANEL_ROWS)
                    .flat_map(|_| quantize_ref(ty, &rng.row(k)))
                    .collect();
                let mut panel = vec![0u8; tiled::panel_bytes(ty, k)];
                tiled::pack_at(level, ty, k, &w, &mut panel);
                for n in [1, 3, 6, 8, 13] {
                    let act_ty = ty.vec_dot_type();
                    let x = act_rows(&mut rng, ty, k, n);
                    let xr = act_ty.row_bytes(k).unwrap();
                    let mr = meta_bytes(k);
                    let mut meta = vec![0u8; n * mr];
                    for t in 0..n {
                        let (a, m) = (&x[t * xr..(t + 1) * xr], &mut meta[t * mr..(t + 1) * mr]);
                        tiled::prepare_at(level, act_ty, k, a, m);
                    }
                    // A stride wider than the panel: the gaps stay untouched.
                    let stride = PANEL_ROWS + 3;
                    let mut out = vec![f32::NAN; n * stride];
                    tiled::multiply_at(level, ty, k, &panel, &x, &meta, n, &mut out, stride);
                    for t in 0..n {
                        let xt = &x[t * xr..(t + 1) * xr];
                        for r in 0..PANEL_ROWS {
                            let wr = &w[r * rb..(r + 1) * rb];
                            let want = reference::vec_dot(ty, wr, xt, k);
                            let got = out[t * stride + r];
                            let rel = (f64::from(got) - f64::from(want)).abs()
                                / magnitude(ty, wr, xt, k).max(f64::MIN_POSITIVE);
                            assert!(
                                rel <= bound(ty),
                                "{} {ty} k={k} n={n} token {t} row {r}: {got} vs {want} \
                                 (error {rel:.2e})",
                                level.name()
                            );
                        }
                        assert!(out[t * stride + PANEL_ROWS..(t + 1) * stride]
                            .iter()
                            .all(|v| v.is_nan()));
                        // Batch invariance: the token alone gives the same bits,
                        // from the panel and straight from the rows.
                        let mut one = [f32::NAN; PANEL_ROWS];
                        let mt = &meta[t * mr..(t + 1) * mr];
                        tiled::multiply_at(level, ty, k, &panel, xt, mt, 1, &mut one, PANEL_ROWS);
                        let mut direct = [f32::NAN; PANEL_ROWS];
                        tiled::multiply_rows_at(
                            level,
                            ty,
                            k,
                            &w,
                            xt,
                            mt,
                            1,
                            &mut direct,
                            PANEL_ROWS,
                        );
                        for (r, (v, d)) in one.iter().zip(&direct).enumerate() {
                            assert_eq!(
                                v.to_bits(),
                                out[t * stride + r].to_bits(),
                                "{} {ty} k={k} n={n} token {t} row {r}: alone vs batched",
                                level.name()
                            );
                            assert_eq!(
                                d.to_bits(),
                                v.to_bits(),
                                "{} {ty} k={k} n={n} token {t} row {r}: rows vs panel",
                                level.name()
                            );
                        }
                    }
                    // All tokens at once straight from the rows: the same bits.
                    let mut direct = vec![f32::NAN; n * stride];
                    tiled::multiply_rows_at(level, ty, k, &w, &x, &meta, n, &mut direct, stride);
                    for (i, (d, v)) in direct.iter().zip(&out).enumerate() {
                        assert_eq!(
                            d.to_bits(),
                            v.to_bits(),
                            "{} {ty} k={k} n={n} [{i}]: rows vs panel",
                            level.name()
                        );
                    }
                }
            }
        }
    }
    assert!(covered > 0, "no tiled kernel was tested");
}
