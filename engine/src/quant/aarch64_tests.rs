//! The aarch64 kernels against the scalar reference, at every level this CPU
//! runs (each level is called directly, not only through dispatch). On an x86
//! machine these run under qemu: `scripts/test-aarch64.sh`.
//!
//! Two kinds of check: rows whose scales are 1 and whose values are small
//! integers, where every f32 operation is exact and the kernels must agree with
//! the reference bit for bit (this pins the integer paths: unpacking, signs,
//! sub-block scales, mins, tails); and realistic rows, where only the order of
//! the f32 additions differs and the error has a named bound per type.

use half::f16;

use super::aarch64::{self, Level};
use super::blocks::{Block, BlockQ8_K, QK, QK_K};
use super::kernel_tests::{act_rows, available, quantize_inputs, quantize_ref, Kernels, ONE_F16};
use super::reference;
use super::tests::Rng;
use super::GgmlType;

/// Every weight type with an aarch64 dot kernel.
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
/// the offset terms). The kernels scale each block's sum as four i32 lanes
/// where the reference scales one, and add in f32 in a different order, so the
/// error is a few ulps of the largest partial sums (the levels group the lanes
/// differently, so their errors differ too). The bounds are about 4× the worst
/// seen at either level over the test's rows; a wrong value, scale or block
/// gives 1e-3 or more.
const FAST_DOT_ERROR: [(GgmlType, f64); 11] = [
    (GgmlType::Q4_0, 2.5e-7),
    (GgmlType::Q4_1, 1e-7),
    (GgmlType::Q5_0, 2.5e-7),
    (GgmlType::Q5_1, 1e-7),
    (GgmlType::Q8_0, 2e-7),
    // The scaled sums and the min terms are rounded separately and cancel
    // (value = d·sc·q − dmin·m), so the error is larger against Σ|w·x|.
    (GgmlType::Q4_K, 3e-7),
    (GgmlType::Q5_K, 2.5e-7),
    (GgmlType::Q6_K, 1e-7),
    // f32 lanes of up to 1024 / 16 products before each fold into f64.
    (GgmlType::F32, 2.5e-7),
    (GgmlType::F16, 1.5e-7),
    (GgmlType::BF16, 4e-8),
];

fn bound(ty: GgmlType) -> f64 {
    FAST_DOT_ERROR
        .iter()
        .find(|(t, _)| *t == ty)
        .map(|(_, b)| *b)
        .expect("type missing from FAST_DOT_ERROR")
}

/// Row lengths per block size: the smallest row, rows that end in a partial
/// group of four 32-blocks (1, 2, 3, 7, 9, 18 and 129 blocks), float rows with
/// every tail length class, and rows of 4096 and more.
fn lengths(ty: GgmlType) -> &'static [usize] {
    match ty.block_size() {
        1 => &[1, 7, 8, 15, 16, 17, 40, 1000, 1024, 1041, 4096, 4099],
        32 => &[32, 64, 96, 224, 288, 576, 896, 4096, 4128],
        _ => &[256, 512, 1536, 4352],
    }
}

fn kernels() -> Kernels<Level> {
    Kernels {
        levels: available(&Level::ALL, Level::is_available, Level::name),
        name: Level::name,
        multi_at: aarch64::vec_dot_multi_at,
        quantize_at: aarch64::quantize_row_at,
    }
}

#[test]
fn vec_dot_multi_matches_reference_on_realistic_rows() {
    kernels().realistic_rows(0x5eed_0201, &DOT_TYPES, lengths, bound);
}

#[test]
fn vec_dot_multi_is_exact_on_integer_rows() {
    kernels().integer_rows(0x5eed_0202, &DOT_TYPES, &[32, 64, 96, 224, 288, 576, 1024]);
}

/// Activation bytes at the edge of the NEON level's i16 sums: every weight at
/// its largest magnitude against activations of ±127 (and −128 for the
/// formats whose weights stay within ±63).
#[test]
fn vec_dot_multi_is_exact_at_extreme_values() {
    for level in kernels().levels {
        for ty in DOT_TYPES.into_iter().filter(|t| t.block_size() > 1) {
            let n = ty.block_size() * 2;
            // Largest level everywhere: all value bits set; Q8_0 gets -127.
            let mut w = vec![0xFFu8; ty.row_bytes(n).unwrap()];
            for b in w.chunks_exact_mut(ty.type_size()) {
                match ty {
                    GgmlType::Q8_0 => {
                        b[..2].copy_from_slice(&ONE_F16);
                        b[2..].fill(0x81);
                    }
                    GgmlType::Q4_0 | GgmlType::Q5_0 => {
                        b[..2].copy_from_slice(&ONE_F16);
                        // Levels 0: values −8 / −16, the largest magnitudes.
                        b[2..].fill(0);
                    }
                    GgmlType::Q4_1 | GgmlType::Q5_1 => {
                        b[..2].copy_from_slice(&ONE_F16);
                        b[2..4].fill(0);
                    }
                    GgmlType::Q4_K | GgmlType::Q5_K => {
                        b[..2].copy_from_slice(&ONE_F16);
                        b[2..4].copy_from_slice(&ONE_F16);
                        // Scales and mins of 1 keep the sums below 2^24.
                        b[4..16].copy_from_slice(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
                    }
                    GgmlType::Q6_K => {
                        b[192..208].fill(1);
                        b[208..].copy_from_slice(&ONE_F16);
                    }
                    _ => unreachable!(),
                }
            }
            let q = if ty == GgmlType::Q8_0 { -127i8 } else { -128 };
            let xt = ty.vec_dot_type();
            let mut x = vec![0u8; xt.row_bytes(n).unwrap()];
            for b in x.chunks_exact_mut(xt.type_size()) {
                match xt {
                    GgmlType::Q8_0 => {
                        b[..2].copy_from_slice(&ONE_F16);
                        b[2..].fill(q as u8);
                    }
                    GgmlType::Q8_1 => {
                        b[..2].copy_from_slice(&ONE_F16);
                        let s = f16::from_f32(32.0 * f32::from(q));
                        b[2..4].copy_from_slice(&s.to_le_bytes());
                        b[4..].fill(q as u8);
                    }
                    GgmlType::Q8_K => {
                        let qs = [q; QK_K];
                        let bsums = [16 * i16::from(q); QK_K / 16];
                        BlockQ8_K { d: 1.0, qs, bsums }.write(b);
                    }
                    _ => unreachable!(),
                }
            }
            let got = kernels().fast(level, ty, n, &w, &x, 1)[0];
            let want = reference::vec_dot(ty, &w, &x, n);
            assert_eq!(got, want, "{} {ty}", level.name());
        }
    }
}

#[test]
fn public_functions_dispatch_to_the_best_level() {
    let mut rng = Rng(0x5eed_0203);
    let best = aarch64::best();
    eprintln!("best level: {best:?}");
    for ty in DOT_TYPES {
        let n = lengths(ty)[3];
        let w = quantize_ref(ty, &rng.row(n));
        let x = act_rows(&mut rng, ty, n, 3);
        let mut out = [0.0f32; 3];
        super::vec_dot_multi(ty, n, &w, &x, &mut out);
        let single = super::vec_dot(ty, &w, &x[..x.len() / 3], n);
        let want = kernels().fast(best, ty, n, &w, &x, 3);
        assert_eq!(out.to_vec(), want, "{ty}");
        assert_eq!(single, want[0], "{ty}");
    }
}

#[test]
fn types_without_a_kernel_fall_back_to_the_reference() {
    kernels().fall_back(0x5eed_0204);
}

#[test]
fn q8_k_f16_bf16_f32_quantize_bit_exact() {
    let mut rng = Rng(0x5eed_0205);
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
        // NaN stays NaN (quiet), infinities, overflow, ties and subnormals
        // round as the reference.
        let v = [
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            1.0 + 2f32.powi(-8),
            1.0 + 2f32.powi(-11),
            -0.0,
            70000.0,
            3e-6,
            -1e-8,
            f32::MIN_POSITIVE,
        ];
        let v: Vec<f32> = v.iter().cycle().take(30).copied().collect();
        for ty in [GgmlType::F16, GgmlType::BF16] {
            assert_eq!(
                kernels().quantize(level, ty, &v),
                quantize_ref(ty, &v),
                "{} {ty}",
                level.name()
            );
        }
    }
}

/// llama.cpp's ARM Q8_0/Q8_1 block: the reference's `d` and `x * (1 / d)`,
/// rounded half to even.
fn q8_ties_even(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let qs: Vec<i8> = b
            .iter()
            .map(|&v| (v * id).round_ties_even() as i8)
            .collect();
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        out.extend(f16::from_f32(d).to_le_bytes());
        if ty == GgmlType::Q8_1 {
            out.extend(f16::from_f32(sum as f32 * d).to_le_bytes());
        }
        out.extend(qs.iter().map(|&q| q as u8));
    }
    out
}

#[test]
fn q8_0_q8_1_quantize_as_llama_cpp_arm() {
    let mut rng = Rng(0x5eed_0206);
    let inputs = quantize_inputs(&mut rng);
    for level in kernels().levels {
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
            let (mut values, mut differ) = (0usize, 0usize);
            for v in &inputs {
                let got = kernels().quantize(level, ty, v);
                assert_eq!(got, q8_ties_even(ty, v), "{} {ty}", level.name());
                // Against the reference: the same scales, values within one
                // (only at exact halves).
                let want = quantize_ref(ty, v);
                let size = ty.type_size();
                for (gb, wb) in got.chunks_exact(size).zip(want.chunks_exact(size)) {
                    assert_eq!(gb[..2], wb[..2], "{} {ty}: d", level.name());
                    for (&g, &w) in gb[size - 32..].iter().zip(&wb[size - 32..]) {
                        let diff = (i32::from(g as i8) - i32::from(w as i8)).abs();
                        assert!(diff <= 1, "{} {ty}: value {g} vs {w}", level.name());
                        differ += diff as usize;
                        values += 1;
                    }
                }
            }
            assert!(
                differ * 1000 <= values,
                "{} {ty}: {differ} of {values} values differ from the reference",
                level.name()
            );
        }
    }
}

#[test]
fn q8_0_rounds_half_to_even_like_llama_cpp_arm() {
    // amax = 127: d = 1, so the values round as they stand; the reference
    // (roundf) would give 3, -3, 1, -1.
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
    let mut rng = Rng(0x5eed_0207);
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
            aarch64::f16_to_f32_slice_at(level, &src, &mut got);
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
