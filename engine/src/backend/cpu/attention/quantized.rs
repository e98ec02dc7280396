//! Attention over a quantized KV cache (Q8_0 or Q4_0).
//!
//! Each query of an item is turned by the keys' [`rotation`] and quantized
//! to Q8_0 once. Its scores are integer dot products with the keys (exact),
//! scaled group by group; each chunk's values are dequantized once for all
//! the item's queries, and each output is turned back by the values' rotation. The softmax and
//! the weighted sum are the f16 path's ([`softmax_step`], [`add_weighted`]).
//! A query's arithmetic depends only on its own position and the cache, never
//! on the item it lands in, so a token keeps its bits inside any batch.

// Arrays indexed by query, lane and group read clearest as index loops, and
// unroll the same.
#![allow(clippy::needless_range_loop)]

use half::f16;

use super::{normalize, softmax_weights, Ctx, Item, CHUNK, MAX_ITEM_QUERIES};
use crate::kv_cache::{key_layout, rotation, value_layout, KvType, MAX_QUANT_HEAD};
use crate::quant::{self, GgmlType};

/// Most groups of 32 in one head.
const MAX_GROUPS: usize = MAX_QUANT_HEAD / key_layout::GROUP;

/// A query quantized to Q8_0.
#[derive(Clone, Copy)]
struct Query {
    q: [i8; MAX_QUANT_HEAD],
    /// Each group's scale.
    d: [f32; MAX_GROUPS],
    /// Each group's sum of values: Q8_0 keys are stored plus 128 and Q4_0
    /// keys plus 8, so that many times it comes off the raw sum.
    sum: [i32; MAX_GROUPS],
}

impl Query {
    const ZERO: Query = Query {
        q: [0; MAX_QUANT_HEAD],
        d: [0.0; MAX_GROUPS],
        sum: [0; MAX_GROUPS],
    };

    /// `x`, turned by the keys' rotation, quantized.
    fn set(&mut self, x: &[f32]) {
        let mut buf = [0f32; MAX_QUANT_HEAD];
        let x = rotation::turned(x, rotation::key_block(x.len()), &mut buf);
        let mut row = [0u8; MAX_GROUPS * 34];
        let row = &mut row[..x.len() / 32 * 34];
        quant::quantize_row(GgmlType::Q8_0, x, row);
        for (g, blk) in row.chunks_exact(34).enumerate() {
            self.d[g] = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            self.sum[g] = 0;
            for (i, &b) in blk[2..].iter().enumerate() {
                self.q[g * 32 + i] = b as i8;
                self.sum[g] += b as i8 as i32;
            }
        }
    }

    /// Values `4 * quad..4 * quad + 4` as one little-endian word.
    #[inline(always)]
    fn quad(&self, quad: usize) -> i32 {
        let q = &self.q[4 * quad..4 * quad + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }
}

/// The offset a stored key carries, times the query's group sum, comes off.
#[inline(always)]
fn key_offset(ty: KvType) -> i32 {
    if ty == KvType::Q8_0 {
        128
    } else {
        8
    }
}

/// The score (before the softmax scale) of the key at `slot` of one head's
/// block `keys`: per group, the exact integer dot product times the two
/// scales, added group after group with one fused multiply-add each.
#[inline(always)]
fn lane_score(ty: KvType, keys: &[u8], bs: usize, slot: usize, q: &Query, groups: usize) -> f32 {
    let gb = key_layout::group_bytes(ty, bs);
    let mut s = 0f32;
    for g in 0..groups {
        let group = &keys[g * gb..(g + 1) * gb];
        let dk = f16::from_le_bytes([group[2 * slot], group[2 * slot + 1]]).to_f32();
        let qg = &q.q[g * 32..(g + 1) * 32];
        let at = |i: usize| group[key_layout::quad_at(bs, i / 4, slot) + i % 4] as i32;
        let mut raw = 0i32;
        if ty == KvType::Q8_0 {
            for (i, &x) in qg.iter().enumerate() {
                raw += at(i) * x as i32;
            }
        } else {
            for i in 0..16 {
                let b = at(i);
                raw += (b & 15) * qg[i] as i32 + (b >> 4) * qg[i + 16] as i32;
            }
        }
        raw -= key_offset(ty) * q.sum[g];
        s = (q.d[g] * dk).mul_add(raw as f32, s);
    }
    s
}

/// Scores of sixteen consecutive slots `off..off + 16` of one block, and
/// the weighted values of a chunk.
trait Scores {
    /// Asks for `data` in cache ahead of its use.
    #[inline(always)]
    fn prefetch(_data: &[u8]) {}

    /// [`lane_score`] of each slot.
    ///
    /// # Safety
    /// The CPU has what the implementation uses.
    #[inline(always)]
    unsafe fn chunk(
        ty: KvType,
        keys: &[u8],
        bs: usize,
        off: usize,
        q: &Query,
        groups: usize,
    ) -> [f32; CHUNK] {
        let mut s = [0f32; CHUNK];
        for (j, s) in s.iter_mut().enumerate() {
            *s = lane_score(ty, keys, bs, off + j, q, groups);
        }
        s
    }

    /// [`add_values`].
    ///
    /// # Safety
    /// The CPU has what the implementation uses; each lane that some query
    /// sees has its row.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn add_values<const NQ: usize>(
        v: &Values<'_>,
        hd: usize,
        live: &[(usize, usize); NQ],
        e: &[[f32; CHUNK]; NQ],
        corr: &[f32; NQ],
        o: &mut [&mut [f32]; NQ],
    ) {
        add_values::<NQ>(v, hd, live, e, corr, o)
    }
}

/// Plain code.
struct Portable;

impl Scores for Portable {}

pub(super) fn run_item(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use quant::x86::Level;
        // SAFETY: each level's features are present.
        match quant::x86::best() {
            Some(Level::Avx512) => return unsafe { item_avx512(c, it, sc) },
            Some(Level::Avx2) => return unsafe { item_avx2(c, it, sc) },
            None => {}
        }
    }
    // SAFETY: `Portable` needs nothing of the CPU.
    unsafe { item_body::<Portable>(c, it, sc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn item_avx512(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    item_body::<x86::Vnni>(c, it, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn item_avx2(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    item_body::<x86::Avx2>(c, it, sc)
}

/// Most queries folded in together: their outputs stay in registers while
/// each value is dequantized once for all of them.
const TILE: usize = 4;

/// # Safety
/// The CPU has what `S` uses.
#[inline(always)]
unsafe fn item_body<S: Scores>(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    let p = c.p;
    let hd = p.head_dim;
    let row_len = p.n_heads * hd;
    let s = &c.seqs[it.seq];
    let (m, l) = sc[2 * CHUNK * hd..].split_at_mut(MAX_ITEM_QUERIES);
    let nh = it.h1 - it.h0;
    let nq = (it.t1 - it.t0) * nh;
    // SAFETY (for every `out` slice below): items own disjoint (row, head)
    // pairs of the output.
    let out = |t: usize, h: usize| unsafe { c.out.slice((it.row0 + t) * row_len + h * hd, hd) };
    let mut queries = [Query::ZERO; MAX_ITEM_QUERIES];
    for t in it.t0..it.t1 {
        let qrow = (it.row0 + t) * row_len;
        for h in it.h0..it.h1 {
            out(t, h).fill(0.0);
            let qi = (t - it.t0) * nh + (h - it.h0);
            queries[qi].set(&c.q[qrow + h * hd..qrow + (h + 1) * hd]);
        }
    }
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let first = |pos: usize| p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let lo = first(s.start_pos + it.t0);
    let hi = s.start_pos + it.t1 - 1;
    let tile = Tile {
        c,
        it,
        blocks: c.kv.blocks(p.layer, s.table),
        queries: &queries,
        first: &first,
    };
    for q0 in (0..nq).step_by(TILE) {
        let (m, l) = (&mut m[q0..], &mut l[q0..]);
        match nq - q0 {
            1 => tile.run::<S, 1>(q0, lo, hi, m, l, &out),
            2 => tile.run::<S, 2>(q0, lo, hi, m, l, &out),
            3 => tile.run::<S, 3>(q0, lo, hi, m, l, &out),
            _ => tile.run::<S, TILE>(q0, lo, hi, m, l, &out),
        }
    }
    normalize(it, nh, l, out);
    if let Some(n) = rotation::value_block(hd) {
        for t in it.t0..it.t1 {
            for h in it.h0..it.h1 {
                rotation::apply(out(t, h), n);
            }
        }
    }
}

/// What the tiles of one item read.
struct Tile<'a, F> {
    c: &'a Ctx<'a>,
    it: &'a Item,
    blocks: &'a [u32],
    queries: &'a [Query; MAX_ITEM_QUERIES],
    first: &'a F,
}

impl<F: Fn(usize) -> usize> Tile<'_, F> {
    /// Queries `q0..q0 + NQ` of the item over the chunks of `lo..=hi`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn run<'o, S: Scores, const NQ: usize>(
        &self,
        q0: usize,
        lo: usize,
        hi: usize,
        m: &mut [f32],
        l: &mut [f32],
        out: &impl Fn(usize, usize) -> &'o mut [f32],
    ) {
        let (c, it) = (self.c, self.it);
        let p = c.p;
        let (hd, groups) = (p.head_dim, p.head_dim / key_layout::GROUP);
        let layout = c.kv.layout();
        let (ty, bs) = (layout.dtype, layout.block_size);
        let nh = it.h1 - it.h0;
        // Query qi is token t0 + qi / nh, head h0 + qi % nh.
        let mut pos = [0; NQ];
        for (i, pos) in pos.iter_mut().enumerate() {
            *pos = c.seqs[it.seq].start_pos + it.t0 + (q0 + i) / nh;
        }
        let mut o: [&mut [f32]; NQ] =
            std::array::from_fn(|i| out(it.t0 + (q0 + i) / nh, it.h0 + (q0 + i) % nh));
        let whole_chunks = bs.is_multiple_of(CHUNK);
        let tile_lo = (self.first)(pos[0]);
        let end = hi.min(pos[NQ - 1]);
        for c0 in (lo.max(tile_lo) / CHUNK * CHUNK..=end).step_by(CHUNK) {
            // A chunk inside one block reads its keys and values there.
            let block = whole_chunks.then(|| {
                let b = self.blocks[c0 / bs];
                (
                    c.kv.k_rows(p.layer, b, it.kvh),
                    c.kv.v_rows(p.layer, b, it.kvh),
                )
            });
            // Two chunks ahead: one is too late for the memory to answer.
            let next = c0 + 2 * CHUNK;
            if whole_chunks && next <= end && next.is_multiple_of(bs) {
                let b = self.blocks[next / bs];
                S::prefetch(c.kv.k_rows(p.layer, b, it.kvh));
                S::prefetch(c.kv.v_rows(p.layer, b, it.kvh));
            }
            let mut live = [(1, 0); NQ];
            let mut e = [[0f32; CHUNK]; NQ];
            let mut corr = [1f32; NQ];
            for i in 0..NQ {
                let (a, z) = ((self.first)(pos[i]).max(c0), pos[i].min(c0 + CHUNK - 1));
                if a > z {
                    continue;
                }
                let (a, z) = (a - c0, z - c0);
                live[i] = (a, z);
                let q = &self.queries[q0 + i];
                let mut acc = [[0f32; CHUNK]; 4];
                if let Some((keys, _)) = block {
                    acc[0] = S::chunk(ty, keys, bs, c0 % bs, q, groups);
                } else {
                    for j in a..=z {
                        let keys = c.kv.k_rows(p.layer, self.blocks[(c0 + j) / bs], it.kvh);
                        acc[0][j] = lane_score(ty, keys, bs, (c0 + j) % bs, q, groups);
                    }
                }
                (e[i], corr[i]) = softmax_weights(&acc, p.scale, a, z, &mut m[i], &mut l[i]);
            }
            let mut v = Values {
                ty,
                bs,
                block: block.map(|(_, v)| (v, c0 % bs)),
                lanes: [(&[], 0); CHUNK],
            };
            if block.is_none() {
                // Lanes no query sees are never read: their blocks may be
                // released or past the table.
                for (j, lane) in v.lanes.iter_mut().enumerate() {
                    let at = c0 + j;
                    if (lo..=hi).contains(&at) {
                        *lane = (c.kv.v_rows(p.layer, self.blocks[at / bs], it.kvh), at % bs);
                    }
                }
            }
            S::add_values::<NQ>(&v, hd, &live, &e, &corr, &mut o);
        }
    }
}

/// Each query's output times its `corr`, then each lane's value levels
/// (exact small integers) times the query's weight for the lane times the
/// lane's scale, added lane after lane. A query's operations do not depend on
/// the other queries folded with it.
#[inline(always)]
fn add_values<const NQ: usize>(
    v: &Values<'_>,
    hd: usize,
    live: &[(usize, usize); NQ],
    e: &[[f32; CHUNK]; NQ],
    corr: &[f32; NQ],
    o: &mut [&mut [f32]; NQ],
) {
    let (lo, hi) = live_lanes(live);
    let same = live.iter().all(|&x| x == live[0]);
    let seen = |i: usize, j: usize| (live[i].0..=live[i].1).contains(&j);
    for g in 0..hd / 32 {
        // Each query's weight of each lane times the lane's scale.
        let mut w = [[0f32; CHUNK]; NQ];
        for j in lo..=hi {
            let d = f16::from_bits(v.scale_bits(g, j)).to_f32();
            for i in 0..NQ {
                w[i][j] = e[i][j] * d;
            }
        }
        for within in [0, 16] {
            let dc = 32 * g + within;
            let mut acc = [[0f32; 16]; NQ];
            for i in 0..NQ {
                let o = &o[i][dc..dc + 16];
                for k in 0..16 {
                    acc[i][k] = o[k] * corr[i];
                }
            }
            for j in lo..=hi {
                let x = levels16(v.ty, v.group(g, j), within);
                for i in 0..NQ {
                    if !same && !seen(i, j) {
                        continue;
                    }
                    let wi = w[i][j];
                    for k in 0..16 {
                        acc[i][k] = wi.mul_add(x[k], acc[i][k]);
                    }
                }
            }
            for i in 0..NQ {
                o[i][dc..dc + 16].copy_from_slice(&acc[i]);
            }
        }
    }
}

/// Where a chunk's values are ([`value_layout`]).
struct Values<'a> {
    ty: KvType,
    bs: usize,
    /// A chunk inside one block: the head's values there and the slot of
    /// lane 0.
    block: Option<(&'a [u8], usize)>,
    /// Otherwise each lane's head block and slot.
    lanes: [(&'a [u8], usize); CHUNK],
}

impl Values<'_> {
    #[inline(always)]
    fn lane(&self, j: usize) -> (&[u8], usize) {
        match self.block {
            Some((data, off)) => (data, off + j),
            None => self.lanes[j],
        }
    }

    /// Lane `j`'s scale of group `g`, as f16 bits.
    #[inline(always)]
    fn scale_bits(&self, g: usize, j: usize) -> u16 {
        let (data, slot) = self.lane(j);
        let at = g * value_layout::group_bytes(self.ty, self.bs) + 2 * slot;
        u16::from_le_bytes([data[at], data[at + 1]])
    }

    /// Lane `j`'s stored values of group `g`.
    #[inline(always)]
    fn group(&self, g: usize, j: usize) -> &[u8] {
        let (data, slot) = self.lane(j);
        let at = g * value_layout::group_bytes(self.ty, self.bs)
            + value_layout::values_at(self.ty, self.bs, slot);
        &data[at..at + key_layout::value_bytes(self.ty)]
    }
}

/// The lanes some query of a tile sees (`lo > hi`: none).
#[inline(always)]
fn live_lanes<const NQ: usize>(live: &[(usize, usize); NQ]) -> (usize, usize) {
    let (mut lo, mut hi) = (CHUNK, 0);
    for &(a, z) in live {
        if a <= z {
            (lo, hi) = (lo.min(a), hi.max(z));
        }
    }
    (lo, hi)
}

/// The levels (the values over their scale) of values `within..within + 16`
/// of one group's stored values.
#[inline(always)]
fn levels16(ty: KvType, qs: &[u8], within: usize) -> [f32; 16] {
    let mut v = [0f32; 16];
    if ty == KvType::Q8_0 {
        let qs = &qs[within..within + 16];
        for k in 0..16 {
            v[k] = qs[k] as i8 as f32;
        }
    } else {
        let qs = &qs[..16];
        let shift = if within == 0 { 0 } else { 4 };
        for k in 0..16 {
            v[k] = (((qs[k] >> shift) & 15) as i32 - 8) as f32;
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Sixteen slots' scores with 512-bit VNNI or 256-bit AVX2 integer dot
    //! products: the same exact integer sums as [`lane_score`](super::lane_score),
    //! scaled in the same order.

    use std::arch::x86_64::*;

    use super::{key_offset, live_lanes, Query, Scores, Values, CHUNK};
    use crate::kv_cache::{key_layout, value_layout, KvType};

    /// Sums of the sixteen slots' unsigned key bytes times the query's bytes.
    pub(super) struct Vnni;

    /// A hint for each cache line of `data`.
    #[inline(always)]
    fn prefetch_lines(data: &[u8]) {
        for i in (0..data.len()).step_by(64) {
            // SAFETY: a hint; the address lies inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(i).cast()) };
        }
    }

    impl Scores for Vnni {
        #[inline(always)]
        fn prefetch(data: &[u8]) {
            prefetch_lines(data)
        }

        #[inline(always)]
        unsafe fn chunk(
            ty: KvType,
            keys: &[u8],
            bs: usize,
            off: usize,
            q: &Query,
            groups: usize,
        ) -> [f32; CHUNK] {
            let gb = key_layout::group_bytes(ty, bs);
            assert!(off + CHUNK <= bs && keys.len() >= groups * gb);
            let mut s = _mm512_setzero_ps();
            for g in 0..groups {
                let base = keys.as_ptr().add(g * gb);
                let at = |quad: usize| {
                    _mm512_loadu_si512(base.add(key_layout::quad_at(bs, quad, off)).cast())
                };
                let qb = |quad: usize| _mm512_set1_epi32(q.quad(g * 8 + quad));
                let mut acc = _mm512_setzero_si512();
                if ty == KvType::Q8_0 {
                    for r in 0..8 {
                        acc = _mm512_dpbusd_epi32(acc, at(r), qb(r));
                    }
                } else {
                    let nib = _mm512_set1_epi8(15);
                    for p in 0..4 {
                        let x = at(p);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), nib);
                        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(x, nib), qb(p));
                        acc = _mm512_dpbusd_epi32(acc, hi, qb(p + 4));
                    }
                }
                let raw = _mm512_sub_epi32(acc, _mm512_set1_epi32(key_offset(ty) * q.sum[g]));
                let dk = _mm512_cvtph_ps(_mm256_loadu_si256(base.add(2 * off).cast()));
                let scale = _mm512_mul_ps(_mm512_set1_ps(q.d[g]), dk);
                s = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(raw), s);
            }
            let mut out = [0f32; CHUNK];
            _mm512_storeu_ps(out.as_mut_ptr(), s);
            out
        }

        #[inline(always)]
        unsafe fn add_values<const NQ: usize>(
            v: &Values<'_>,
            hd: usize,
            live: &[(usize, usize); NQ],
            e: &[[f32; CHUNK]; NQ],
            corr: &[f32; NQ],
            o: &mut [&mut [f32]; NQ],
        ) {
            let (lo, hi) = live_lanes(live);
            for o in o.iter() {
                assert!(o.len() >= hd);
            }
            let gb = value_layout::group_bytes(v.ty, v.bs);
            if let Some((data, off)) = v.block {
                assert!(data.len() >= hd / 32 * gb && off + CHUNK <= v.bs);
            }
            let same = live.iter().all(|&x| x == live[0]);
            let seen = |i: usize, j: usize| live[i].0 <= j && j <= live[i].1;
            for g in 0..hd / 32 {
                // The lanes' scales, then each query's weights times them
                // (the plain code's products, sixteen at once).
                let d = match v.block {
                    Some((data, off)) => _mm512_cvtph_ps(_mm256_loadu_si256(
                        data.as_ptr().add(g * gb + 2 * off).cast(),
                    )),
                    None => {
                        let mut bits = [0u16; CHUNK];
                        for j in lo..=hi {
                            bits[j] = v.scale_bits(g, j);
                        }
                        _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr().cast()))
                    }
                };
                let mut w = [[0f32; CHUNK]; NQ];
                for i in 0..NQ {
                    let wi = _mm512_mul_ps(_mm512_loadu_ps(e[i].as_ptr()), d);
                    _mm512_storeu_ps(w[i].as_mut_ptr(), wi);
                }
                for within in [0, 16] {
                    let dc = 32 * g + within;
                    let mut acc = [_mm512_setzero_ps(); NQ];
                    for i in 0..NQ {
                        let at = o[i].as_ptr().add(dc);
                        acc[i] = _mm512_mul_ps(_mm512_loadu_ps(at), _mm512_set1_ps(corr[i]));
                    }
                    for j in lo..=hi {
                        let x = levels16(v.ty, v.group(g, j), within);
                        for i in 0..NQ {
                            if !same && !seen(i, j) {
                                continue;
                            }
                            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(w[i][j]), x, acc[i]);
                        }
                    }
                    for i in 0..NQ {
                        _mm512_storeu_ps(o[i].as_mut_ptr().add(dc), acc[i]);
                    }
                }
            }
        }
    }

    /// [`levels16`](super::levels16) by AVX-512.
    #[inline(always)]
    unsafe fn levels16(ty: KvType, qs: &[u8], within: usize) -> __m512 {
        if ty == KvType::Q8_0 {
            assert!(qs.len() >= within + 16);
            let q = _mm_loadu_si128(qs.as_ptr().add(within).cast());
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))
        } else {
            assert!(qs.len() >= 16);
            let mut q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.as_ptr().cast()));
            if within != 0 {
                q = _mm512_srli_epi32::<4>(q);
            }
            let q = _mm512_and_si512(q, _mm512_set1_epi32(15));
            _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8)))
        }
    }

    /// [`levels16`](super::levels16) by AVX2, in two halves.
    #[inline(always)]
    unsafe fn levels16_avx2(ty: KvType, qs: &[u8], within: usize) -> [__m256; 2] {
        if ty == KvType::Q8_0 {
            assert!(qs.len() >= within + 16);
            let p = qs.as_ptr().add(within);
            let half = |h: usize| {
                let q = _mm_loadl_epi64(p.add(8 * h).cast());
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
            };
            [half(0), half(1)]
        } else {
            assert!(qs.len() >= 16);
            let half = |h: usize| {
                let mut q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.as_ptr().add(8 * h).cast()));
                if within != 0 {
                    q = _mm256_srli_epi32::<4>(q);
                }
                let q = _mm256_and_si256(q, _mm256_set1_epi32(15));
                _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8)))
            };
            [half(0), half(1)]
        }
    }

    /// Eight slots at a time: Q8_0 keys made signed and multiplied by the
    /// query's magnitudes (`maddubs` cannot overflow then), Q4_0 nibbles as
    /// they are.
    pub(super) struct Avx2;

    impl Scores for Avx2 {
        #[inline(always)]
        fn prefetch(data: &[u8]) {
            prefetch_lines(data)
        }

        /// [`Vnni::add_values`] in two halves of eight lanes.
        #[inline(always)]
        unsafe fn add_values<const NQ: usize>(
            v: &Values<'_>,
            hd: usize,
            live: &[(usize, usize); NQ],
            e: &[[f32; CHUNK]; NQ],
            corr: &[f32; NQ],
            o: &mut [&mut [f32]; NQ],
        ) {
            let (lo, hi) = live_lanes(live);
            for o in o.iter() {
                assert!(o.len() >= hd);
            }
            let gb = value_layout::group_bytes(v.ty, v.bs);
            if let Some((data, off)) = v.block {
                assert!(data.len() >= hd / 32 * gb && off + CHUNK <= v.bs);
            }
            let same = live.iter().all(|&x| x == live[0]);
            let seen = |i: usize, j: usize| live[i].0 <= j && j <= live[i].1;
            for g in 0..hd / 32 {
                let mut bits = [0u16; CHUNK];
                match v.block {
                    Some((data, off)) => {
                        let at = g * gb + 2 * off;
                        for (j, b) in bits.iter_mut().enumerate() {
                            *b = u16::from_le_bytes([data[at + 2 * j], data[at + 2 * j + 1]]);
                        }
                    }
                    None => {
                        for j in lo..=hi {
                            bits[j] = v.scale_bits(g, j);
                        }
                    }
                }
                let mut w = [[0f32; CHUNK]; NQ];
                for h in 0..2 {
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr().add(8 * h).cast()));
                    for i in 0..NQ {
                        let wi = _mm256_mul_ps(_mm256_loadu_ps(e[i].as_ptr().add(8 * h)), d);
                        _mm256_storeu_ps(w[i].as_mut_ptr().add(8 * h), wi);
                    }
                }
                for within in [0, 16] {
                    let dc = 32 * g + within;
                    let mut acc = [[_mm256_setzero_ps(); 2]; NQ];
                    for i in 0..NQ {
                        let c = _mm256_set1_ps(corr[i]);
                        for h in 0..2 {
                            let at = o[i].as_ptr().add(dc + 8 * h);
                            acc[i][h] = _mm256_mul_ps(_mm256_loadu_ps(at), c);
                        }
                    }
                    for j in lo..=hi {
                        let x = levels16_avx2(v.ty, v.group(g, j), within);
                        for i in 0..NQ {
                            if !same && !seen(i, j) {
                                continue;
                            }
                            let wi = _mm256_set1_ps(w[i][j]);
                            for h in 0..2 {
                                acc[i][h] = _mm256_fmadd_ps(wi, x[h], acc[i][h]);
                            }
                        }
                    }
                    for i in 0..NQ {
                        for h in 0..2 {
                            _mm256_storeu_ps(o[i].as_mut_ptr().add(dc + 8 * h), acc[i][h]);
                        }
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn chunk(
            ty: KvType,
            keys: &[u8],
            bs: usize,
            off: usize,
            q: &Query,
            groups: usize,
        ) -> [f32; CHUNK] {
            let gb = key_layout::group_bytes(ty, bs);
            assert!(off + CHUNK <= bs && keys.len() >= groups * gb);
            let ones = _mm256_set1_epi16(1);
            let mut s = [_mm256_setzero_ps(); 2];
            for g in 0..groups {
                let base = keys.as_ptr().add(g * gb);
                let at = |quad: usize, half: usize| {
                    let p = base.add(key_layout::quad_at(bs, quad, off + 8 * half));
                    _mm256_loadu_si256(p.cast())
                };
                let qb = |quad: usize| _mm256_set1_epi32(q.quad(g * 8 + quad));
                let mut acc = [_mm256_setzero_si256(); 2];
                if ty == KvType::Q8_0 {
                    let flip = _mm256_set1_epi8(-128);
                    for r in 0..8 {
                        let (qv, qa) = (qb(r), _mm256_abs_epi8(qb(r)));
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let k = _mm256_xor_si256(at(r, h), flip);
                            let pr = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(k, qv));
                            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pr, ones));
                        }
                    }
                } else {
                    let nib = _mm256_set1_epi8(15);
                    for p in 0..4 {
                        let (ql, qh) = (qb(p), qb(p + 4));
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let x = at(p, h);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), nib);
                            let pr = _mm256_add_epi16(
                                _mm256_maddubs_epi16(_mm256_and_si256(x, nib), ql),
                                _mm256_maddubs_epi16(hi, qh),
                            );
                            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pr, ones));
                        }
                    }
                    let off8 = _mm256_set1_epi32(key_offset(ty) * q.sum[g]);
                    for acc in acc.iter_mut() {
                        *acc = _mm256_sub_epi32(*acc, off8);
                    }
                }
                let scale = _mm256_set1_ps(q.d[g]);
                for (h, (s, acc)) in s.iter_mut().zip(acc).enumerate() {
                    let dk = _mm256_cvtph_ps(_mm_loadu_si128(base.add(2 * (off + 8 * h)).cast()));
                    *s = _mm256_fmadd_ps(_mm256_mul_ps(scale, dk), _mm256_cvtepi32_ps(acc), *s);
                }
            }
            let mut out = [0f32; CHUNK];
            _mm256_storeu_ps(out.as_mut_ptr(), s[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), s[1]);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{BlockTable, KvCache, KvLayout};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    /// The scores of the vector kernels are the plain code's, bit for bit,
    /// and the plain code's are the exact dot product of what the cache and
    /// the quantized query hold.
    #[test]
    fn vector_scores_are_the_plain_scores() {
        let mut seed = 3;
        for ty in [KvType::Q8_0, KvType::Q4_0] {
            for (hd, bs) in [(64, 16), (256, 32), (32, 48)] {
                let layout = KvLayout {
                    n_layers: 1,
                    n_kv_heads: 1,
                    head_dim: hd,
                    block_size: bs,
                    window: None,
                    dtype: ty,
                };
                let mut kv = KvCache::new(layout, 2);
                let mut t = BlockTable::new();
                t.reserve(&mut kv, bs).unwrap();
                for p in 0..bs {
                    let k: Vec<f32> = (0..hd).map(|_| 3.0 * lcg(&mut seed)).collect();
                    kv.write(0, &t, p, &k, &k);
                }
                let x: Vec<f32> = (0..hd).map(|_| lcg(&mut seed)).collect();
                let mut q = Query::ZERO;
                q.set(&x);
                let keys = kv.k_rows(0, t.blocks[0], 0);
                let groups = hd / 32;
                for off in (0..bs).step_by(CHUNK) {
                    // SAFETY: plain code.
                    let plain = unsafe { Portable::chunk(ty, keys, bs, off, &q, groups) };
                    for (j, s) in plain.iter().enumerate() {
                        let (mut k, mut v) = (vec![0.0; hd], vec![0.0; hd]);
                        kv.read(0, t.blocks[0], 0, off + j, &mut k, &mut v);
                        // The cache turned the keys, and the query with them.
                        if let Some(n) = rotation::key_block(hd) {
                            rotation::apply(&mut k, n);
                        }
                        let want: f64 = (0..hd)
                            .map(|d| q.q[d] as f64 * q.d[d / 32] as f64 * k[d] as f64)
                            .sum();
                        assert!((*s as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()));
                    }
                    #[cfg(target_arch = "x86_64")]
                    {
                        use crate::quant::x86::Level;
                        let bits = |s: [f32; CHUNK]| s.map(f32::to_bits);
                        let level = crate::quant::x86::best();
                        if level.is_some() {
                            // SAFETY: AVX2, FMA and F16C are present at either level.
                            let v = unsafe { x86::Avx2::chunk(ty, keys, bs, off, &q, groups) };
                            assert_eq!(bits(v), bits(plain), "{ty} AVX2 hd {hd}");
                        }
                        if level == Some(Level::Avx512) {
                            // SAFETY: the level has AVX-512 VNNI.
                            let v = unsafe { x86::Vnni::chunk(ty, keys, bs, off, &q, groups) };
                            assert_eq!(bits(v), bits(plain), "{ty} VNNI hd {hd}");
                        }
                    }
                }
            }
        }
    }
}
