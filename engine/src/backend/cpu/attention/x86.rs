//! AVX-512 code for a decode step's attention: one chunk of positions folded
//! into a few queries with every running value in registers.
//!
//! The operations are those of the portable [`fold_chunk_f16`](super::fold_chunk_f16)
//! in the same order (four partial dot products per lane, the fixed tree of
//! sums, the same `exp` polynomial), so a token gets the same bits here as in
//! a prefill item.

// Arrays of registers indexed by query and by sixteen-value group read
// clearest as index loops, and unroll the same.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::f16;

use super::{Chunk, CHUNK, LN2_HI, LN2_LO};

/// Lanes `a..=z` of a chunk (none when `a > z`).
#[inline(always)]
fn lanes(a: usize, z: usize) -> __mmask16 {
    if a > z {
        0
    } else {
        ((1u32 << (z + 1)) - (1u32 << a)) as __mmask16
    }
}

/// [`exp_le0`](super::exp_le0) on sixteen lanes.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline(always)]
unsafe fn exp_le0(x: __m512) -> __m512 {
    let c = _mm512_set1_ps;
    let x = _mm512_max_ps(x, c(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
        x,
        c(std::f32::consts::LOG2_E),
        c(0.5),
    ));
    let r = _mm512_fmadd_ps(n, c(-LN2_LO), _mm512_fmadd_ps(n, c(-LN2_HI), x));
    let mut p = c(1.0 / 720.0);
    p = _mm512_fmadd_ps(p, r, c(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, c(0.5));
    p = _mm512_fmadd_ps(p, r, c(1.0));
    p = _mm512_fmadd_ps(p, r, c(1.0));
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvttps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
}

/// The sum of sixteen lanes by the portable code's tree: halves added lane
/// by lane down to one.
#[inline(always)]
unsafe fn tree_sum(e: __m512) -> f32 {
    let a = _mm256_add_ps(
        _mm512_castps512_ps256(e),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
    );
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
}

/// Sixteen f16 values at `p` as f32.
#[inline(always)]
unsafe fn load16(p: *const f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// [`fold_chunk_f16`](super::fold_chunk_f16) for a head size that is a
/// multiple of sixteen.
///
/// # Safety
/// The CPU has AVX-512F; `head_dim % 16 == 0`.
#[inline(always)]
pub(super) unsafe fn fold_chunk<const NQ: usize>(
    ch: &Chunk<'_, NQ>,
    m: &mut [f32],
    l: &mut [f32],
    o: &mut [&mut [f32]; NQ],
) {
    let Chunk {
        q,
        k,
        v,
        live,
        scale,
    } = *ch;
    let hd = q[0].len();
    debug_assert!(hd.is_multiple_of(16));
    let mask: [__mmask16; NQ] = std::array::from_fn(|qi| lanes(live[qi].0, live[qi].1));
    let any = mask.iter().fold(0, |a, &b| a | b);
    if any == 0 {
        return;
    }
    let (lo, hi) = (
        any.trailing_zeros() as usize,
        15 - any.leading_zeros() as usize,
    );
    assert!(k.kb.len() >= (hd - 1) * k.stride + k.off + CHUNK && v.len() >= (hi + 1) * hd);
    assert!(q.iter().all(|q| q.len() == hd) && o.iter().all(|o| o.len() == hd));
    assert!(m.len() >= NQ && l.len() >= NQ);

    // Scores: four partial sums per query, over d mod 4.
    let mut acc = [[_mm512_setzero_ps(); 4]; NQ];
    let kp = k.kb.as_ptr().add(k.off);
    for d in (0..hd).step_by(4) {
        for u in 0..4 {
            let kd = load16(kp.add((d + u) * k.stride));
            for qi in 0..NQ {
                let qd = _mm512_set1_ps(*q[qi].get_unchecked(d + u));
                acc[qi][u] = _mm512_fmadd_ps(qd, kd, acc[qi][u]);
            }
        }
    }

    // Softmax step per query: weights of its lanes and the factor that
    // rescales what it has so far.
    let mut e = [[0f32; CHUNK]; NQ];
    let mut corr = [1f32; NQ];
    for qi in 0..NQ {
        if mask[qi] == 0 {
            continue;
        }
        let [a0, a1, a2, a3] = acc[qi];
        let s = _mm512_mul_ps(
            _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
            _mm512_set1_ps(scale),
        );
        let mx = _mm512_mask_reduce_max_ps(mask[qi], s);
        let m_new = m[qi].max(mx);
        let w = _mm512_maskz_mov_ps(mask[qi], exp_le0(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
        _mm512_storeu_ps(e[qi].as_mut_ptr(), w);
        let sum = tree_sum(w);
        if m[qi] != m_new {
            corr[qi] = if m[qi] == f32::NEG_INFINITY {
                0.0
            } else {
                super::exp_le0(m[qi] - m_new)
            };
            l[qi] *= corr[qi];
        }
        l[qi] += sum;
        m[qi] = m_new;
    }

    // Weighted values, sixty-four output values per pass, then sixteen.
    let same = mask.iter().all(|&x| x == mask[0]);
    let pv = Weighted {
        v: v.as_ptr(),
        hd,
        lo,
        hi,
        same,
        mask: &mask,
        e: &e,
        corr: &corr,
    };
    let mut dc = 0;
    while dc + 64 <= hd {
        pv.pass::<4>(o, dc);
        dc += 64;
    }
    while dc < hd {
        pv.pass::<1>(o, dc);
        dc += 16;
    }
}

/// What each pass over the values of a chunk reads.
struct Weighted<'a, const NQ: usize> {
    v: *const f16,
    hd: usize,
    lo: usize,
    hi: usize,
    same: bool,
    mask: &'a [__mmask16; NQ],
    e: &'a [[f32; CHUNK]; NQ],
    corr: &'a [f32; NQ],
}

impl<const NQ: usize> Weighted<'_, NQ> {
    /// Output values `dc..dc + 16 * W` of every query: rescaled, then each
    /// live lane's weighted value added in lane order.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the values cover lanes `..=hi` and the outputs
    /// `dc + 16 * W` values.
    #[inline(always)]
    unsafe fn pass<const W: usize>(&self, o: &mut [&mut [f32]; NQ], dc: usize) {
        let mut out = [[_mm512_setzero_ps(); W]; NQ];
        for qi in 0..NQ {
            let c = _mm512_set1_ps(self.corr[qi]);
            for u in 0..W {
                let at = o[qi].as_ptr().add(dc + 16 * u);
                out[qi][u] = _mm512_mul_ps(_mm512_loadu_ps(at), c);
            }
        }
        for j in self.lo..=self.hi {
            let row = self.v.add(j * self.hd + dc);
            let vj: [__m512; W] = std::array::from_fn(|u| load16(row.add(16 * u)));
            for qi in 0..NQ {
                if !self.same && self.mask[qi] & (1 << j) == 0 {
                    continue;
                }
                let p = _mm512_set1_ps(self.e[qi][j]);
                for u in 0..W {
                    out[qi][u] = _mm512_fmadd_ps(p, vj[u], out[qi][u]);
                }
            }
        }
        for qi in 0..NQ {
            for u in 0..W {
                _mm512_storeu_ps(o[qi].as_mut_ptr().add(dc + 16 * u), out[qi][u]);
            }
        }
    }
}
