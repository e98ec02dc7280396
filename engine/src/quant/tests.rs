//! Tests of the scalar reference: error bounds on random data for every type,
//! agreement of the integer dot products with f64 arithmetic, and hand-built
//! blocks that pin the byte layouts and rounding rules.

use half::f16;

use super::blocks::{Block, BlockQ4_K, BlockQ8_1, QK_K};
use super::reference::{dequantize_row, dot_f32, quantize_row, vec_dot};
use super::GgmlType;

/// Every type the enum knows.
const ALL: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Round trip quantize → dequantize: RMS error over RMS of the data, about 1.3×
/// the worst of the test's seeded rows. A wrong nibble order or scale gives ~1.
const ROUNDTRIP_RMSE: [(GgmlType, f64); 13] = [
    (GgmlType::F32, 0.0),
    (GgmlType::F16, 2.5e-4),
    (GgmlType::BF16, 2.0e-3),
    (GgmlType::Q4_0, 0.10),
    (GgmlType::Q4_1, 0.10),
    (GgmlType::Q5_0, 0.05),
    (GgmlType::Q5_1, 0.045),
    (GgmlType::Q8_0, 6.5e-3),
    (GgmlType::Q8_1, 6.5e-3),
    (GgmlType::Q4_K, 0.09),
    (GgmlType::Q5_K, 0.045),
    (GgmlType::Q6_K, 0.022),
    (GgmlType::Q8_K, 8.0e-3),
];

/// `vec_dot(quantized w, quantized x)` against the f64 dot of the original f32
/// rows, as |error| / (|w| |x|), about 1.4× the worst of the seeded rows. The true
/// dot of independent rows is about |w| |x| / √n ≈ 0.016 for n = 4096, so a wrong
/// kernel fails by far.
const DOT_ERROR: [(GgmlType, f64); 13] = [
    (GgmlType::F32, 1e-8),
    (GgmlType::F16, 1.5e-5),
    (GgmlType::BF16, 1.2e-4),
    (GgmlType::Q4_0, 4e-3),
    (GgmlType::Q4_1, 2e-3),
    (GgmlType::Q5_0, 1e-3),
    (GgmlType::Q5_1, 8e-4),
    (GgmlType::Q8_0, 2e-4),
    (GgmlType::Q8_1, 2e-4),
    (GgmlType::Q4_K, 2e-3),
    (GgmlType::Q5_K, 1.3e-3),
    (GgmlType::Q6_K, 3e-4),
    (GgmlType::Q8_K, 4e-4),
];

/// Row length: a whole number of blocks of every type (16 K-quant super-blocks).
const N: usize = 4096;

fn bound(table: &[(GgmlType, f64)], ty: GgmlType) -> f64 {
    table
        .iter()
        .find(|(t, _)| *t == ty)
        .map(|(_, b)| *b)
        .expect("type missing from table")
}

/// xorshift64*: a few lines, seeded, and good enough for test data.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    pub(super) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Bell-shaped (sum of four uniforms) with a per-row offset, so that the
    /// min/offset formats have something to fit; roughly like weights.
    pub(super) fn row(&mut self, n: usize) -> Vec<f32> {
        let offset = 0.1 * self.uniform();
        (0..n)
            .map(|_| offset + 0.5 * (0..4).map(|_| self.uniform()).sum::<f32>())
            .collect()
    }
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quantize_row(ty, x, &mut out);
    out
}

fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, bytes, &mut out);
    out
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

fn norm(a: &[f32]) -> f64 {
    dot_f64(a, a).sqrt()
}

#[test]
fn roundtrip_error_within_bound() {
    let mut rng = Rng(0x5eed_0001);
    for ty in ALL {
        let mut worst = 0.0f64;
        for _ in 0..4 {
            let x = rng.row(N);
            let y = dequantize(ty, &quantize(ty, &x), N);
            let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
            worst = worst.max(norm(&err) / norm(&x));
        }
        let limit = bound(&ROUNDTRIP_RMSE, ty);
        assert!(
            worst <= limit,
            "{ty}: round-trip relative RMSE {worst:.3e} > {limit:.3e}"
        );
    }
}

#[test]
fn vec_dot_matches_f64_dot_of_originals() {
    let mut rng = Rng(0x5eed_0002);
    for ty in ALL {
        let mut worst = 0.0f64;
        for _ in 0..4 {
            let (w, x) = (rng.row(N), rng.row(N));
            let got = vec_dot(ty, &quantize(ty, &w), &quantize(ty.vec_dot_type(), &x), N);
            let rel = (f64::from(got) - dot_f64(&w, &x)).abs() / (norm(&w) * norm(&x));
            worst = worst.max(rel);
        }
        let limit = bound(&DOT_ERROR, ty);
        assert!(
            worst <= limit,
            "{ty}: dot error {worst:.3e} of |w||x| > {limit:.3e}"
        );
    }
}

/// The integer kernels compute exactly the dot of the dequantized rows, except
/// for f32 rounding of the per-block scale products and of the running sum.
#[test]
fn vec_dot_matches_f64_dot_of_dequantized() {
    let mut rng = Rng(0x5eed_0003);
    for ty in ALL {
        let xt = ty.vec_dot_type();
        for _ in 0..4 {
            let (w, x) = (rng.row(N), rng.row(N));
            let (wq, xq) = (quantize(ty, &w), quantize(xt, &x));
            let (wd, xd) = (dequantize(ty, &wq, N), dequantize(xt, &xq, N));
            let mut want = dot_f64(&wd, &xd);
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                want += offset_term_correction(ty, &wq, &xq);
            }
            let got = f64::from(vec_dot(ty, &wq, &xq, N));
            let scale: f64 = wd
                .iter()
                .zip(&xd)
                .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                .sum();
            // Quantized kernels: a few roundings per block plus one per block in the
            // f32 running sum. Float kernels: one per product, the sum is f64.
            let f32_adds = if ty.block_size() == 1 {
                0
            } else {
                N / ty.block_size()
            };
            let limit = (f32_adds as f64 + 4.0) * f64::from(f32::EPSILON) * scale;
            assert!(
                (got - want).abs() <= limit,
                "{ty}: vec_dot {got} vs dequantized dot {want}"
            );
        }
    }
}

/// Q4_1/Q5_1 dots take the offset term `m * d * sum(q)` of each block from the
/// activation's stored `s`, which is that value rounded to f16. Returns the
/// difference this makes, summed over the blocks.
fn offset_term_correction(ty: GgmlType, wq: &[u8], xq: &[u8]) -> f64 {
    let w_blocks = wq.chunks_exact(ty.type_size());
    let x_blocks = xq
        .chunks_exact(GgmlType::Q8_1.type_size())
        .map(BlockQ8_1::read);
    w_blocks
        .zip(x_blocks)
        .map(|(wb, xb)| {
            // The min `m` follows the f16 scale `d` in both Q4_1 and Q5_1.
            let m = f64::from(f16::from_le_bytes([wb[2], wb[3]]).to_f32());
            let sum: i32 = xb.qs.iter().map(|&q| i32::from(q)).sum();
            let exact = f64::from(xb.d.to_f32()) * f64::from(sum);
            m * (f64::from(xb.s.to_f32()) - exact)
        })
        .sum()
}

#[test]
fn zero_rows_stay_zero() {
    for ty in ALL {
        let zeros = vec![0.0f32; N];
        let q = quantize(ty, &zeros);
        assert!(
            dequantize(ty, &q, N).iter().all(|&v| v == 0.0),
            "{ty}: zero row does not dequantize to zeros"
        );
        let x = quantize(ty.vec_dot_type(), &zeros);
        assert_eq!(vec_dot(ty, &q, &x, N), 0.0, "{ty}");
    }
}

#[test]
fn dot_f32_accumulates_in_f64() {
    // In f32, 1e8 + 1 - 1e8 loses the 1; ggml's f64 accumulator keeps it.
    assert_eq!(dot_f32(&[1e4, 1.0, -1e4], &[1e4, 1.0, 1e4]), 1.0);
}

#[test]
fn q4_0_block_layout() {
    // d = 0.5 (f16 0x3800), then byte j = level j | level (j + 16) << 4.
    let mut bytes = vec![0x00, 0x38];
    bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = dequantize(GgmlType::Q4_0, &bytes, 32);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5, "value {j}");
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5, "value {}", j + 16);
    }
}

#[test]
fn q8_0_block_layout() {
    // d = 0.25 (f16 0x3400), then 32 signed bytes.
    let mut bytes = vec![0x00, 0x34];
    bytes.extend((0..32i8).map(|j| (j - 16) as u8));
    let y = dequantize(GgmlType::Q8_0, &bytes, 32);
    let want: Vec<f32> = (0..32).map(|j| (j as f32 - 16.0) * 0.25).collect();
    assert_eq!(y, want);
}

#[test]
fn q4_k_block_layout() {
    // Sub-block scales and mins chosen so that 4..8 need their top bits.
    let sc = [1u8, 2, 3, 4, 17, 33, 40, 63];
    let mn = [5u8, 6, 7, 8, 20, 36, 48, 62];
    let mut bytes = vec![0x00, 0x3c, 0x00, 0x38]; // d = 1.0, dmin = 0.5
                                                  // Bytes 0..4: scale j | (scale j + 4) >> 4 << 6; bytes 4..8 the same for mins;
                                                  // bytes 8..12: low nibbles of scale / min j + 4.
    bytes.extend([
        0x41, 0x82, 0x83, 0xc4, 0x45, 0x86, 0xc7, 0xc8, 0x41, 0x41, 0x08, 0xef,
    ]);
    let level = |i: usize| ((i * 7 + i / 64) % 16) as u8;
    // 32-byte chunk c: values 64c..64c+32 in the low nibbles, the next 32 high.
    bytes.extend(
        (0..128).map(|b| level(64 * (b / 32) + b % 32) | (level(64 * (b / 32) + b % 32 + 32) << 4)),
    );
    assert_eq!(bytes.len(), GgmlType::Q4_K.type_size());

    let block = BlockQ4_K::read(&bytes);
    assert_eq!((block.d.to_f32(), block.dmin.to_f32()), (1.0, 0.5));
    let y = dequantize(GgmlType::Q4_K, &bytes, QK_K);
    for (i, &v) in y.iter().enumerate() {
        let j = i / 32;
        let want = f32::from(sc[j]) * f32::from(level(i)) - 0.5 * f32::from(mn[j]);
        assert_eq!(v, want, "value {i}");
    }
    // Two spot values written out: sub-block 0 starts at level 0, sub-block 7 has
    // scale 63 and min 62.
    assert_eq!(y[0], -2.5);
    assert_eq!(y[255], 63.0 * f32::from(level(255)) - 31.0);
}

#[test]
fn q8_k_quantize_known_bytes() {
    // Block 0: the extreme is -127, so iscale = -127 / -127 = 1 and the values are
    // rounded as they stand; halves go to the even neighbour.
    // Block 1: the extreme is +254, so iscale = -0.5, d = -2 and the signs flip.
    const HALVES: [f32; 11] = [-4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5];
    const EVEN: [i8; 11] = [-4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6];
    let mut x = vec![0.0f32; 2 * QK_K];
    for j in 1..QK_K {
        x[j] = HALVES[j % 11];
        x[QK_K + j] = -2.0 * HALVES[j % 11];
    }
    x[0] = -127.0;
    x[QK_K] = 254.0;
    let bytes = quantize(GgmlType::Q8_K, &x);

    // The first bytes written out: d = 1.0f32, then q0 = -127, then halves 1..15.
    assert_eq!(bytes[..8], [0x00, 0x00, 0x80, 0x3f, 0x81, 0xfc, 0xfe, 0xfe]);
    let b1 = &bytes[GgmlType::Q8_K.type_size()..];
    assert_eq!(b1[..5], [0x00, 0x00, 0x00, 0xc0, 0x81]); // d = -2.0f32, q0 = -127

    for block in [&bytes[..292], b1] {
        let qs: Vec<i8> = block[4..4 + QK_K].iter().map(|&b| b as i8).collect();
        assert_eq!(qs[0], -127);
        for j in 1..QK_K {
            assert_eq!(qs[j], EVEN[j % 11], "value {j}");
        }
        for g in 0..16 {
            let want: i16 = qs[16 * g..16 * g + 16].iter().map(|&q| i16::from(q)).sum();
            let at = 4 + QK_K + 2 * g;
            assert_eq!(
                i16::from_le_bytes([block[at], block[at + 1]]),
                want,
                "bsum {g}"
            );
        }
    }
    // bsums[0] written out: -127, then values 1..=10 (sum 10), then 11..=15 (sum -12).
    assert_eq!(i16::from_le_bytes([bytes[260], bytes[261]]), -129);
}

#[test]
fn q8_0_and_q8_1_round_half_away_from_zero() {
    // amax = 127 gives d = 1, so the values are rounded as they stand: roundf
    // sends 2.5 to 3 and -0.5 to -1, where ties-to-even would give 2 and 0.
    let mut x = [0.0f32; 32];
    x[..6].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.4]);
    let want_qs = [127i8, 3, -3, 1, -1, 1];

    let q8_0 = quantize(GgmlType::Q8_0, &x);
    assert_eq!(q8_0[..2], [0x00, 0x3c]); // d = 1.0 as f16
    let qs: Vec<i8> = q8_0[2..8].iter().map(|&b| b as i8).collect();
    assert_eq!(qs, want_qs);

    let q8_1 = BlockQ8_1::read(&quantize(GgmlType::Q8_1, &x));
    assert_eq!(q8_1.d.to_f32(), 1.0);
    assert_eq!(q8_1.qs[..6], want_qs);
    assert_eq!(q8_1.s.to_f32(), 128.0); // d * sum(qs)
}

#[test]
fn q4_0_quantize_known_block() {
    // The extreme -8 maps to level 0: d = -8 / -8 = 1, and level = trunc(x + 8.5)
    // clamped to 15: 7.4 gives trunc(15.9) = 15, 7.6 gives 16 clamped to 15.
    let x: Vec<f32> = (0..32)
        .map(|i| {
            if i < 16 {
                i as f32 - 8.0
            } else {
                [7.4, 7.6, -0.6, 0.4][i % 4]
            }
        })
        .collect();
    let bytes = quantize(GgmlType::Q4_0, &x);
    assert_eq!(bytes[..2], [0x00, 0x3c]);
    for j in 0..16 {
        let high = [15u8, 15, 7, 8][j % 4];
        assert_eq!(bytes[2 + j], j as u8 | (high << 4), "byte {j}");
    }
}

#[test]
fn bf16_rounds_to_nearest_even() {
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: it goes up.
    let x = [
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        -2.0,
        1.0 + 2f32.powi(-9) + 2f32.powi(-8),
    ];
    let bytes = quantize(GgmlType::BF16, &x);
    let bits: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(bits, [0x3f80, 0x3f82, 0xc000, 0x3f81]);
}

#[test]
#[should_panic(expected = "takes 18 bytes")]
fn dequantize_rejects_wrong_length() {
    dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut [0.0; 32]);
}

#[test]
#[should_panic(expected = "not a whole number")]
fn quantize_rejects_partial_block() {
    quantize_row(GgmlType::Q4_K, &[0.0; 128], &mut [0u8; 72]);
}
