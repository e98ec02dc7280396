//! Checks every architecture's kernel tests run the same way: the rows they
//! build, the reference they compare with, and the two dot-product checks
//! (realistic rows within a bound, integer rows bit for bit), each taking
//! the architecture's levels and `vec_dot_multi_at`.

use half::f16;

use super::blocks::{Block, BlockQ8_K, QK_K};
use super::reference;
use super::tests::Rng;
use super::GgmlType;

/// One architecture's kernels as the shared checks call them.
pub(super) struct Kernels<L> {
    /// The levels this CPU runs.
    pub levels: Vec<L>,
    /// A level's name in messages.
    pub name: fn(L) -> &'static str,
    /// The architecture's `vec_dot_multi_at`.
    pub multi_at: MultiAt<L>,
    /// The architecture's `quantize_row_at`.
    pub quantize_at: fn(L, GgmlType, &[f32], &mut [u8]) -> bool,
}

/// `vec_dot_multi_at(level, type, n, weight row, activation rows, out)`.
pub(super) type MultiAt<L> = fn(L, GgmlType, usize, &[u8], &[u8], &mut [f32]) -> bool;

/// The levels of `all` this CPU runs; a skipped level is reported, not
/// silently passed.
pub(super) fn available<L: Copy>(
    all: &[L],
    is_available: fn(L) -> bool,
    name: fn(L) -> &'static str,
) -> Vec<L> {
    all.iter()
        .copied()
        .filter(|&l| {
            let ok = is_available(l);
            if !ok {
                eprintln!("skipping the {} kernels: CPU lacks the features", name(l));
            }
            ok
        })
        .collect()
}

pub(super) fn quantize_ref(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    reference::quantize_row(ty, x, &mut out);
    out
}

pub(super) fn dequantize_ref(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    reference::dequantize_row(ty, bytes, &mut out);
    out
}

pub(super) fn f16_le(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Σ of the magnitudes of the terms of `w · x` (the scale of each architecture's error bounds).
pub(super) fn magnitude(ty: GgmlType, w: &[u8], x: &[u8], n: usize) -> f64 {
    let xt = ty.vec_dot_type();
    let (wd, xd) = (dequantize_ref(ty, w, n), dequantize_ref(xt, x, n));
    let mut sum: f64 = wd
        .iter()
        .zip(&xd)
        .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
        .sum();
    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        // Value = d·q + m: |d·q·x| ≤ (|value| + |m|)·|x|, plus the term m·s itself.
        let blocks = w.chunks_exact(ty.type_size()).zip(x.chunks_exact(36));
        for (b, (wb, xb)) in blocks.enumerate() {
            let (m, s) = (f64::from(f16_le(&wb[2..])), f64::from(f16_le(&xb[2..])));
            let xs: f64 = xd[32 * b..32 * b + 32]
                .iter()
                .map(|&v| f64::from(v).abs())
                .sum();
            sum += m.abs() * (xs + s.abs());
        }
    }
    sum
}

/// `rows` activation rows, back to back.
pub(super) fn act_rows(rng: &mut Rng, ty: GgmlType, n: usize, rows: usize) -> Vec<u8> {
    (0..rows)
        .flat_map(|_| quantize_ref(ty.vec_dot_type(), &rng.row(n)))
        .collect()
}

/// Little-endian f16 bits of 1.0.
pub(super) const ONE_F16: [u8; 2] = [0x00, 0x3c];

/// A weight row with every scale 1 and random values, so that the dot of it
/// with [`exact_act_row`] is a sum of integers below 2^24: exact in f32 in any
/// order.
pub(super) fn exact_weight_row(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let small = |rng: &mut Rng| (rng.next_u64() % 17) as f32 - 8.0;
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let v: Vec<f32> = (0..n).map(|_| small(rng)).collect();
            return quantize_ref(ty, &v);
        }
        _ => {}
    }
    let mut row: Vec<u8> = (0..ty.row_bytes(n).unwrap())
        .map(|_| rng.next_u64() as u8)
        .collect();
    for b in row.chunks_exact_mut(ty.type_size()) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 => b[..2].copy_from_slice(&ONE_F16),
            GgmlType::Q8_0 => {
                b[..2].copy_from_slice(&ONE_F16);
                // -128 is outside what ggml's quantizers write.
                for q in b[2..].iter_mut().filter(|q| **q == 0x80) {
                    *q = 0x81;
                }
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                b[..2].copy_from_slice(&ONE_F16);
                let m = f16::from_f32(small(rng) / 4.0);
                b[2..4].copy_from_slice(&m.to_le_bytes());
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                b[..2].copy_from_slice(&ONE_F16);
                b[2..4].copy_from_slice(&ONE_F16);
            }
            GgmlType::Q6_K => {
                // Scales in -64..64 keep a block's sum below 2^21.
                for s in &mut b[192..208] {
                    *s = ((*s as i8) / 2) as u8;
                }
                b[208..].copy_from_slice(&ONE_F16);
            }
            _ => unreachable!(),
        }
    }
    row
}

/// An activation row with scale 1 and small values (see [`exact_weight_row`]).
pub(super) fn exact_act_row(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let mut int = |range: i64| (rng.next_u64() % (2 * range as u64 + 1)) as i64 - range;
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let v: Vec<f32> = (0..n).map(|_| int(8) as f32).collect();
            quantize_ref(ty, &v)
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let mut row = Vec::new();
            for _ in 0..n / 32 {
                // |Σ q| ≤ 2016 is exact in f16.
                let qs: Vec<i8> = (0..32).map(|_| int(63) as i8).collect();
                let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
                row.extend(ONE_F16);
                if ty == GgmlType::Q8_1 {
                    row.extend(f16::from_f32(sum as f32).to_le_bytes());
                }
                row.extend(qs.iter().map(|&q| q as u8));
            }
            row
        }
        GgmlType::Q8_K => {
            let mut row = vec![0u8; GgmlType::Q8_K.row_bytes(n).unwrap()];
            for out in row.chunks_exact_mut(GgmlType::Q8_K.type_size()) {
                let qs: [i8; QK_K] = std::array::from_fn(|_| int(4) as i8);
                let bsums = std::array::from_fn(|j| {
                    qs[16 * j..16 * j + 16].iter().map(|&q| i16::from(q)).sum()
                });
                BlockQ8_K { d: 1.0, qs, bsums }.write(out);
            }
            row
        }
        _ => unreachable!(),
    }
}

/// Rows for the quantizers: realistic rows, a zero block, a block whose
/// largest magnitude appears with both signs (the first one wins), and
/// exact halves.
pub(super) fn quantize_inputs(rng: &mut Rng) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = [256, 512, 4096, 4352].map(|n| rng.row(n)).to_vec();
    let mut special = rng.row(1024);
    special[..256].fill(0.0);
    special[300] = -3.0;
    special[400] = 3.0;
    for (i, v) in special[512..768].iter_mut().enumerate() {
        *v = (i as f32 - 128.0) * 0.5;
    }
    rows.push(special);
    rows
}

#[test]
#[should_panic(expected = "takes 360 bytes")]
fn vec_dot_rejects_a_short_weight_row() {
    let x = vec![0u8; GgmlType::Q8_1.row_bytes(576).unwrap()];
    super::vec_dot(GgmlType::Q4_1, &[0u8; 359], &x, 576);
}

#[test]
#[should_panic(expected = "activation rows")]
fn vec_dot_multi_rejects_five_rows() {
    let w = vec![0u8; GgmlType::Q8_0.row_bytes(32).unwrap()];
    let x = vec![0u8; 5 * w.len()];
    super::vec_dot_multi(GgmlType::Q8_0, 32, &w, &x, &mut [0.0; 5]);
}

impl<L: Copy> Kernels<L> {
    /// `v` quantized by the kernel of `level`.
    pub(super) fn quantize(&self, level: L, ty: GgmlType, v: &[f32]) -> Vec<u8> {
        let mut out = vec![0xAAu8; ty.row_bytes(v.len()).unwrap()];
        assert!((self.quantize_at)(level, ty, v, &mut out));
        out
    }

    /// Types with no kernel (activation formats as weights) are refused at
    /// every level and computed by the reference; weight formats quantize
    /// through the reference.
    pub(super) fn fall_back(&self, seed: u64) {
        let mut rng = Rng(seed);
        for ty in [GgmlType::Q8_1, GgmlType::Q8_K] {
            let n = 512;
            let (w, x) = (quantize_ref(ty, &rng.row(n)), quantize_ref(ty, &rng.row(n)));
            for &level in &self.levels {
                assert!(!(self.multi_at)(level, ty, n, &w, &x, &mut [0.0]));
            }
            assert_eq!(
                super::vec_dot(ty, &w, &x, n),
                reference::vec_dot(ty, &w, &x, n)
            );
        }
        let v = rng.row(256);
        let mut got = vec![0u8; GgmlType::Q4_K.row_bytes(256).unwrap()];
        super::quantize_row(GgmlType::Q4_K, &v, &mut got);
        assert_eq!(got, quantize_ref(GgmlType::Q4_K, &v));
    }

    /// `rows` products of the weight row `w` with the activation rows `x`.
    pub(super) fn fast(
        &self,
        level: L,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        x: &[u8],
        rows: usize,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows];
        assert!(
            (self.multi_at)(level, ty, n, w, x, &mut out),
            "{ty}: no kernel"
        );
        out
    }

    /// Random rows of the `lengths` of each type, one to four activation
    /// rows at a time: within `bound` of the reference (relative to the
    /// terms' magnitudes), and each row the same bits as alone.
    pub(super) fn realistic_rows(
        &self,
        seed: u64,
        types: &[GgmlType],
        lengths: fn(GgmlType) -> &'static [usize],
        bound: fn(GgmlType) -> f64,
    ) {
        let mut rng = Rng(seed);
        for &level in &self.levels {
            let name = (self.name)(level);
            for &ty in types {
                let mut worst = 0.0f64;
                for &n in lengths(ty) {
                    let w = quantize_ref(ty, &rng.row(n));
                    for rows in 1..=4 {
                        let x = act_rows(&mut rng, ty, n, rows);
                        let got = self.fast(level, ty, n, &w, &x, rows);
                        for (r, xr) in x.chunks_exact(x.len() / rows).enumerate() {
                            let want = reference::vec_dot(ty, &w, xr, n);
                            let rel = (f64::from(got[r]) - f64::from(want)).abs()
                                / magnitude(ty, &w, xr, n).max(f64::MIN_POSITIVE);
                            assert!(
                                rel <= bound(ty),
                                "{name} {ty} n={n} row {r}/{rows}: {} vs reference {want} \
                                 (error {rel:.2e} of the magnitude > {:.1e})",
                                got[r],
                                bound(ty)
                            );
                            worst = worst.max(rel);
                            // The same row alone: the same operations, the same bits.
                            let single = self.fast(level, ty, n, &w, xr, 1)[0];
                            assert_eq!(
                                got[r].to_bits(),
                                single.to_bits(),
                                "{name} {ty} n={n}: row {r} of {rows} differs from the row alone"
                            );
                        }
                    }
                }
                eprintln!("{name} {ty}: worst relative error {worst:.2e}");
            }
        }
    }

    /// Integer rows ([`exact_weight_row`], [`exact_act_row`]) of the given
    /// 32-block lengths (and fixed others), one to four activation rows at a
    /// time: the reference's bits.
    pub(super) fn integer_rows(&self, seed: u64, types: &[GgmlType], lengths_32: &[usize]) {
        let mut rng = Rng(seed);
        for &level in &self.levels {
            let name = (self.name)(level);
            for &ty in types {
                // Short enough that every partial sum stays below 2^24.
                let ns: &[usize] = match ty.block_size() {
                    1 => &[1, 9, 16, 33, 1041, 4099],
                    32 => lengths_32,
                    _ => &[256, 512, 1024],
                };
                for &n in ns {
                    let w = exact_weight_row(&mut rng, ty, n);
                    for rows in 1..=4 {
                        let x: Vec<u8> = (0..rows)
                            .flat_map(|_| exact_act_row(&mut rng, ty.vec_dot_type(), n))
                            .collect();
                        let got = self.fast(level, ty, n, &w, &x, rows);
                        for (r, xr) in x.chunks_exact(x.len() / rows).enumerate() {
                            let want = reference::vec_dot(ty, &w, xr, n);
                            assert_eq!(got[r], want, "{name} {ty} n={n} row {r}/{rows}");
                        }
                    }
                }
            }
        }
    }
}
