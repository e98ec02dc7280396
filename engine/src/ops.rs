//! Element-wise operations of the transformer layers (normalization, rotary
//! embeddings, activations). They cost little next to the matrix products and
//! run on the calling thread; the arithmetic follows llama.cpp's reference
//! (f64 sums in norms, iterated rotary frequencies) so greedy outputs agree.

/// RMSNorm of each `dim`-wide row of `x` into `out`, scaled by `weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / dim as f64) as f32 + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// RMSNorm in place on each `weight.len()`-wide row.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for xr in x.chunks_exact_mut(dim) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / dim as f64) as f32 + eps).sqrt();
        for (v, &w) in xr.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// How rotary embeddings pair up a head's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's "normal" rope, used for Llama in GGUF
    /// (the converter permuted Q and K into this order).
    Interleaved,
    /// Halves `(i, i + d/2)`: GPT-NeoX / Hugging Face `rotate_half`.
    Halves,
}

/// Fills `cs` (`[rope_dim / 2]` pairs of cos, sin) for position `pos`.
///
/// The angle for pair `i` is `pos * base^(-2i/rope_dim) / factor_i`, with the
/// power built by repeated multiplication in f32 as llama.cpp does.
pub fn rope_angles(
    pos: f32,
    base: f32,
    rope_dim: usize,
    freq_factors: Option<&[f32]>,
    cs: &mut [[f32; 2]],
) {
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut theta = pos;
    for (i, c) in cs.iter_mut().enumerate().take(rope_dim / 2) {
        let t = theta / freq_factors.map_or(1.0, |f| f[i]);
        *c = [t.cos(), t.sin()];
        theta *= theta_scale;
    }
}

/// [`rope_angles`] for multimodal RoPE: pair `i` turns by the position of
/// the stream whose section holds it (the first `sections[0]` pairs by the
/// temporal id, the next `sections[1]` by the height id, the rest by the
/// width id). With three equal ids the angles equal [`rope_angles`]'s bits.
pub fn rope_angles_sections(
    pos: [f32; 3],
    sections: [usize; 3],
    base: f32,
    rope_dim: usize,
    cs: &mut [[f32; 2]],
) {
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut theta = pos;
    let (first, second) = (sections[0], sections[0] + sections[1]);
    for (i, c) in cs.iter_mut().enumerate().take(rope_dim / 2) {
        let stream = if i < first {
            0
        } else if i < second {
            1
        } else {
            2
        };
        let t = theta[stream];
        *c = [t.cos(), t.sin()];
        theta.iter_mut().for_each(|t| *t *= theta_scale);
    }
}

/// One rotary embedding variant of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    /// Base frequency.
    pub base: f32,
    /// Positions are divided by this (linear scaling).
    pub linear_factor: f32,
    /// Elements of a head that rotate.
    pub dim: usize,
    /// How rotary pairs are laid out in the stored Q/K rows.
    pub style: RopeStyle,
    /// Per-pair divisors of the frequency (Llama 3 scaling), `[dim / 2]`.
    pub freq_factors: Option<Vec<f32>>,
    /// Multimodal RoPE: how many pairs, in order, follow each position stream
    /// (temporal, height, width); `None` rotates every pair by stream 0.
    pub sections: Option<[usize; 3]>,
}

impl RopeSpec {
    /// The (cos, sin) of each of the `dim / 2` pairs at position ids `pos`
    /// (temporal, height, width; one stream repeats the same id).
    pub fn angles(&self, pos: [u32; 3], cs: &mut [[f32; 2]]) {
        let pos = pos.map(|v| v as f32 / self.linear_factor);
        match self.sections {
            None => rope_angles(
                pos[0],
                self.base,
                self.dim,
                self.freq_factors.as_deref(),
                cs,
            ),
            Some(sec) => rope_angles_sections(pos, sec, self.base, self.dim, cs),
        }
    }
}

/// Rotates each head (`head_dim` wide) of one token row by the angles in `cs`;
/// only the first `2 * cs.len()` elements of a head rotate.
pub fn rope_apply(row: &mut [f32], head_dim: usize, style: RopeStyle, cs: &[[f32; 2]]) {
    let half = cs.len();
    for head in row.chunks_exact_mut(head_dim) {
        for (i, &[c, s]) in cs.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// SiLU.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate = silu(gate) * up`, element-wise (SwiGLU).
pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `x += y`, element-wise.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to each `bias.len()`-wide row of `x`.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_inplace(row, bias);
    }
}

/// GELU, tanh approximation (PyTorch's `gelu(x, approximate="tanh")`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    // 0.5·x·(1 + tanh(u)) = x / (1 + e^(−2u)): one exponential, where tanh
    // costs about two. Large |u| gives x or −0, as the tanh form does.
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

/// `gate = gelu_tanh(gate) * up`, element-wise (GeGLU).
pub fn geglu_inplace(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `x = cap * tanh(x / cap)`, element-wise (logit soft-capping).
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    for v in x {
        *v = cap * (*v / cap).tanh();
    }
}

/// `x *= a`, element-wise.
pub fn scale_inplace(x: &mut [f32], a: f32) {
    for v in x {
        *v *= a;
    }
}

/// LayerNorm in place on each `weight.len()`-wide row: `(x - mean) /
/// sqrt(var + eps) * weight + bias` (vision encoders).
pub fn layer_norm_inplace(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let dim = weight.len();
    for xr in x.chunks_exact_mut(dim) {
        let mean = (xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64) as f32;
        let var: f64 = xr.iter().map(|&v| ((v - mean) as f64).powi(2)).sum::<f64>() / dim as f64;
        let scale = 1.0 / (var as f32 + eps).sqrt();
        for ((v, &w), &b) in xr.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * scale * w + b;
        }
    }
}

/// The error function, to about 1e-7 (Abramowitz and Stegun 7.1.26 in f64).
pub fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

/// GELU as PyTorch's default computes it, with the error function.
#[inline]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x · sigmoid(1.702 x)` (CLIP's "quick GELU").
#[inline]
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

/// One query row attending to every key row it is given, head by head
/// (bidirectional: no mask): `q` and `out` are `[n_heads * head_dim]`, `kv`
/// the keys and values `[rows, n_heads * head_dim]`; `scores` is scratch.
/// Softmax in f32, as PyTorch's eager attention does.
pub fn attend_row(
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    (n_heads, head_dim): (usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let w = n_heads * head_dim;
    let rows = k.len() / w;
    scores.resize(rows, 0.0);
    for h in 0..n_heads {
        let hs = h * head_dim..(h + 1) * head_dim;
        let qh = &q[hs.clone()];
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let kh = &k[j * w + hs.start..j * w + hs.end];
            *s = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale;
            max = max.max(*s);
        }
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[hs.clone()];
        oh.fill(0.0);
        for (j, &s) in scores.iter().enumerate() {
            let p = s / sum;
            let vh = &v[j * w + hs.start..j * w + hs.end];
            oh.iter_mut().zip(vh).for_each(|(o, &x)| *o += p * x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectioned_angles_follow_their_streams() {
        let (base, dim) = (10000.0, 16);
        let mut one = [[0.0; 2]; 8];
        rope_angles(37.0, base, dim, None, &mut one);
        let mut three = [[0.0; 2]; 8];
        rope_angles_sections([37.0; 3], [2, 3, 3], base, dim, &mut three);
        assert_eq!(one, three, "equal ids: the text angles, bit for bit");

        rope_angles_sections([5.0, 9.0, 11.0], [2, 3, 3], base, dim, &mut three);
        for (i, &[c, s]) in three.iter().enumerate() {
            let p = [5.0, 5.0, 9.0, 9.0, 9.0, 11.0, 11.0, 11.0][i];
            let mut row = [[0.0; 2]; 8];
            rope_angles(p, base, dim, None, &mut row);
            assert_eq!([c, s], row[i], "pair {i} turns by stream id {p}");
        }
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let w = [1.0, 2.0, 1.0, 1.0];
        let mut out = [0.0; 8];
        rms_norm(&x, &w, 0.0, &mut out);
        // rms of row 0 = sqrt(25/4) = 2.5
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
        assert!((out[4] - 1.0).abs() < 1e-6);
        let mut y = x;
        rms_norm_inplace(&mut y, &w, 0.0);
        assert_eq!(y, out);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let mut cs = [[0.0; 2]; 2];
        rope_angles(3.0, 10000.0, 4, None, &mut cs);
        assert!((cs[0][0] - 3f32.cos()).abs() < 1e-6);
        assert!((cs[1][1] - (3.0f32 * 0.01).sin()).abs() < 1e-6);
        let mut a = [1.0, 2.0, 3.0, 4.0];
        rope_apply(&mut a, 4, RopeStyle::Interleaved, &cs);
        assert!((a[0] - (3f32.cos() - 2.0 * 3f32.sin())).abs() < 1e-6);
        let mut b = [1.0, 3.0, 2.0, 4.0];
        rope_apply(&mut b, 4, RopeStyle::Halves, &cs);
        // The halves layout of the same pairs gives the same rotated values.
        assert!((b[0] - a[0]).abs() < 1e-6 && (b[2] - a[1]).abs() < 1e-6);
        let n0: f32 = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v * v).sum();
        let n1: f32 = a.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        // Position 0 is the identity.
        rope_angles(0.0, 10000.0, 4, None, &mut cs);
        let mut c = [1.0, 2.0, 3.0, 4.0];
        rope_apply(&mut c, 4, RopeStyle::Interleaved, &cs);
        assert_eq!(c, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn geglu_and_softcap_match_formulas() {
        // Reference values of torch.nn.functional.gelu(x, approximate="tanh").
        for (x, want) in [
            (0.0f32, 0.0f32),
            (1.0, 0.841_192),
            (-1.0, -0.158_808),
            (3.0, 2.996_363),
            // Saturated ends: x, and zero (not NaN) far below.
            (20.0, 20.0),
            (-20.0, 0.0),
        ] {
            assert!(
                (gelu_tanh(x) - want).abs() < 1e-5,
                "gelu({x}) = {}",
                gelu_tanh(x)
            );
        }
        let mut g = [1.0, -1.0];
        geglu_inplace(&mut g, &[2.0, 3.0]);
        assert!((g[0] - 2.0 * 0.841_192).abs() < 1e-5 && (g[1] + 3.0 * 0.158_808).abs() < 1e-5);
        let mut l = [0.0, 30.0, -1000.0];
        softcap_inplace(&mut l, 30.0);
        assert_eq!(l[0], 0.0);
        assert!((l[1] - 30.0 * 1f32.tanh()).abs() < 1e-4 && (l[2] + 30.0).abs() < 1e-4);
        let mut b = [1.0, 2.0, 3.0, 4.0];
        add_bias_rows(&mut b, &[10.0, 20.0]);
        assert_eq!(b, [11.0, 22.0, 13.0, 24.0]);
    }

    #[test]
    fn swiglu_matches_formula() {
        let mut g = [0.0, 1.0, -2.0];
        swiglu_inplace(&mut g, &[5.0, 2.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        assert!((g[2] - (-2.0 / (1.0 + 2f32.exp()))).abs() < 1e-6);
    }
}
