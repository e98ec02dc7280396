//! Attention on the CPU: causal softmax(q·Kᵀ)·V over each sequence's KV blocks.
//!
//! Work items are runs of one sequence's tokens times some query heads of one
//! KV head. An item walks the positions in chunks of [`CHUNK`], aligned to
//! absolute positions, converts each chunk's keys and values from f16 once,
//! and folds the chunk into every query of the item with a running maximum
//! (online softmax). Items of a few queries (a decode step's query heads)
//! convert sixteen values at a time as they use them instead, shared by the
//! item's queries, without going through scratch. A query's arithmetic depends only on its own position and
//! the cache, never on the item it lands in, so a token gets the same bits
//! alone, in a prefill or inside a batch of sequences.

use std::array::from_fn;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;

use super::{CpuBackend, SharedMut};
use crate::backend::host::{HostBackend, HostWorkspace};
use crate::backend::{AttnParams, AttnSeq};
use crate::kv_cache::{KvCache, KvType};
use crate::quant;

mod quantized;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Positions folded in at once: one row of 16 scores per query.
const CHUNK: usize = 16;

/// Most queries in one work item: their running maxima and sums live in the
/// thread's scratch.
const MAX_ITEM_QUERIES: usize = 32;

/// Tokens `t0..t1` of sequence `seq` (whose first token is batch row `row0`),
/// query heads `h0..h1`, all reading KV head `kvh`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item {
    seq: usize,
    row0: usize,
    t0: usize,
    t1: usize,
    h0: usize,
    h1: usize,
    kvh: usize,
}

/// What every item of one call reads.
struct Ctx<'a> {
    p: &'a AttnParams,
    q: &'a [f32],
    kv: &'a KvCache,
    seqs: &'a [AttnSeq<'a>],
    out: SharedMut<f32>,
}

/// f32 scratch per thread: one chunk of keys and one of values, then the
/// item's running maxima and sums.
fn scratch_len(head_dim: usize) -> usize {
    2 * CHUNK * head_dim + 2 * MAX_ITEM_QUERIES
}

pub(super) fn attention(
    b: &CpuBackend,
    p: &AttnParams,
    q: &[f32],
    kv: &KvCache,
    seqs: &[AttnSeq<'_>],
    out: &mut [f32],
    ws: &mut HostWorkspace,
) {
    let hd = p.head_dim;
    let row_len = p.n_heads * hd;
    let n_tokens: usize = seqs.iter().map(|s| s.n_tokens).sum();
    assert_eq!(q.len(), n_tokens * row_len);
    assert!(out.len() >= n_tokens * row_len);
    assert_eq!(p.n_heads % p.n_kv_heads, 0, "query heads per KV head");
    let group = p.n_heads / p.n_kv_heads;
    let bs = kv.layout().block_size;
    for s in seqs {
        assert!(
            s.start_pos + s.n_tokens <= ws.max_ctx.min(s.table.capacity(bs)),
            "attention past the workspace context or the block table"
        );
    }
    let nt = b.threads();

    // Whole groups of query heads share each converted chunk. Splitting a
    // group makes every head convert the chunks again (about the cost of one
    // query's products) but spreads few items over the threads: split where
    // that finishes sooner, in units of one conversion or one query.
    let whole = seqs
        .iter()
        .map(|s| s.n_tokens.div_ceil((MAX_ITEM_QUERIES / group).max(1)))
        .sum::<usize>()
        * p.n_kv_heads;
    let split_sooner = whole.div_ceil(nt) * (1 + group) > (whole * group).div_ceil(nt) * 2;
    let heads = if split_sooner && whole * group <= 4 * nt {
        1
    } else {
        group
    };
    let tokens = (MAX_ITEM_QUERIES / heads).max(1);
    let items = &mut ws.attn_items;
    items.clear();
    let mut row0 = 0;
    for (seq, s) in seqs.iter().enumerate() {
        for kvh in 0..p.n_kv_heads {
            for h0 in (kvh * group..(kvh + 1) * group).step_by(heads) {
                for t0 in (0..s.n_tokens).step_by(tokens) {
                    items.push(Item {
                        seq,
                        row0,
                        t0,
                        t1: (t0 + tokens).min(s.n_tokens),
                        h0,
                        h1: h0 + heads,
                        kvh,
                    });
                }
            }
        }
        row0 += s.n_tokens;
    }

    let per = scratch_len(hd);
    if ws.attn.len() < nt * per {
        // Once per workspace and head size, not per call.
        ws.attn.resize(nt * per, 0.0);
    }
    let scratch = SharedMut(ws.attn.as_mut_ptr());
    let ctx = Ctx {
        p,
        q,
        kv,
        seqs,
        out: SharedMut(out.as_mut_ptr()),
    };
    let items = &ws.attn_items[..];
    // Items differ in cost (later tokens see more positions): threads take
    // the next one as they finish.
    let next = AtomicUsize::new(0);
    b.pool.run(&|ti, _| {
        // SAFETY: each thread has its own scratch.
        let sc = unsafe { scratch.slice(ti * per, per) };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(it) = items.get(i) else { break };
            run_item(&ctx, it, sc);
        }
    });
}

fn run_item(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    if c.kv.layout().dtype != KvType::F16 {
        return quantized::run_item(c, it, sc);
    }
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
    // SAFETY: `Soft` needs nothing of the CPU.
    unsafe { item_body::<Soft>(c, it, sc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn item_avx512(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    item_body::<Avx512>(c, it, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn item_avx2(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    item_body::<F16c>(c, it, sc)
}

/// f16 to f32, [`CHUNK`] values at a time, exactly.
trait Cvt {
    /// Whether converting as values are used beats converting a chunk once
    /// into scratch (where [`quant::f16_to_f32_slice`] has vector code).
    const INLINE: bool;
    /// The first [`CHUNK`] values of `src`.
    ///
    /// # Safety
    /// The CPU has what the implementation uses.
    unsafe fn cvt16(src: &[f16]) -> [f32; CHUNK];

    /// Asks for `data` in cache ahead of its use.
    #[inline(always)]
    fn prefetch(_data: &[f16]) {}

    /// [`fold_chunk_f16`], or the same operations in the implementation's
    /// own code.
    ///
    /// # Safety
    /// The CPU has what the implementation uses.
    #[inline(always)]
    unsafe fn fold<const NQ: usize>(
        ch: &Chunk<'_, NQ>,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [&mut [f32]; NQ],
    ) where
        Self: Sized,
    {
        fold_chunk_f16::<Self, NQ>(ch, m, l, o)
    }
}

/// Conversion in plain code.
struct Soft;

impl Cvt for Soft {
    const INLINE: bool = false;

    #[inline(always)]
    unsafe fn cvt16(src: &[f16]) -> [f32; CHUNK] {
        std::array::from_fn(|j| src[j].to_f32())
    }
}

/// Conversion by F16C instructions.
#[cfg(target_arch = "x86_64")]
struct F16c;

#[cfg(target_arch = "x86_64")]
impl Cvt for F16c {
    const INLINE: bool = true;

    #[inline(always)]
    unsafe fn cvt16(src: &[f16]) -> [f32; CHUNK] {
        use std::arch::x86_64::*;
        let src = &src[..CHUNK];
        let p = src.as_ptr().cast::<__m128i>();
        let mut out = [0f32; CHUNK];
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(p)));
        _mm256_storeu_ps(
            out.as_mut_ptr().add(8),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
        );
        out
    }

    #[inline(always)]
    fn prefetch(data: &[f16]) {
        use std::arch::x86_64::*;
        for i in (0..data.len()).step_by(32) {
            // SAFETY: a hint; the address lies inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(i).cast()) };
        }
    }
}

/// F16C conversion, and AVX-512 code for the chunks of a decode step.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Cvt for Avx512 {
    const INLINE: bool = true;

    #[inline(always)]
    unsafe fn cvt16(src: &[f16]) -> [f32; CHUNK] {
        F16c::cvt16(src)
    }

    #[inline(always)]
    fn prefetch(data: &[f16]) {
        F16c::prefetch(data)
    }

    #[inline(always)]
    unsafe fn fold<const NQ: usize>(
        ch: &Chunk<'_, NQ>,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [&mut [f32]; NQ],
    ) {
        if ch.q[0].len().is_multiple_of(16) {
            x86::fold_chunk::<NQ>(ch, m, l, o)
        } else {
            fold_chunk_f16::<Self, NQ>(ch, m, l, o)
        }
    }
}

/// Most queries in an item folded by [`fold_chunk_f16`] (a decode step's
/// group of query heads); larger items convert each chunk once into scratch.
const MAX_FUSED: usize = 4;

/// # Safety
/// The CPU has what `C` uses.
#[inline(always)]
unsafe fn item_body<C: Cvt>(c: &Ctx<'_>, it: &Item, sc: &mut [f32]) {
    let p = c.p;
    let hd = p.head_dim;
    let row_len = p.n_heads * hd;
    let s = &c.seqs[it.seq];
    // Sliding-window layers read the table's window-pool blocks.
    let blocks = c.kv.blocks(p.layer, s.table);
    let (kf, rest) = sc.split_at_mut(CHUNK * hd);
    let (vf, rest) = rest.split_at_mut(CHUNK * hd);
    let (m, l) = rest.split_at_mut(MAX_ITEM_QUERIES);
    let nh = it.h1 - it.h0;
    let first = |pos: usize| p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // SAFETY (for every `out` slice below): items own disjoint (row, head)
    // pairs of the output.
    let out = |t: usize, h: usize| unsafe { c.out.slice((it.row0 + t) * row_len + h * hd, hd) };
    for t in it.t0..it.t1 {
        for h in it.h0..it.h1 {
            out(t, h).fill(0.0);
        }
    }
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);

    // Positions some query of the item sees.
    let lo = first(s.start_pos + it.t0);
    let hi = s.start_pos + it.t1 - 1;
    let bs = c.kv.layout().block_size;
    let nq = (it.t1 - it.t0) * nh;
    if C::INLINE && bs.is_multiple_of(CHUNK) && nq <= MAX_FUSED {
        let (m, l) = (&mut m[..nq], &mut l[..nq]);
        match nq {
            1 => fused::<C, 1>(c, it, blocks, lo, hi, m, l, out),
            2 => fused::<C, 2>(c, it, blocks, lo, hi, m, l, out),
            3 => fused::<C, 3>(c, it, blocks, lo, hi, m, l, out),
            _ => fused::<C, 4>(c, it, blocks, lo, hi, m, l, out),
        }
        normalize(it, nh, l, out);
        return;
    }
    for c0 in (lo / CHUNK * CHUNK..=hi).step_by(CHUNK) {
        load_chunk(c.kv, p.layer, blocks, it.kvh, c0, lo.max(c0), hi, kf, vf);
        for t in it.t0..it.t1 {
            let pos = s.start_pos + t;
            let (a, z) = (first(pos).max(c0), pos.min(c0 + CHUNK - 1));
            if a > z {
                continue;
            }
            let qrow = (it.row0 + t) * row_len;
            for h in it.h0..it.h1 {
                let qi = (t - it.t0) * nh + (h - it.h0);
                let qv = &c.q[qrow + h * hd..qrow + (h + 1) * hd];
                let (mq, lq) = (&mut m[qi], &mut l[qi]);
                fold_chunk(qv, kf, vf, a - c0, z - c0, p.scale, mq, lq, out(t, h));
            }
        }
    }
    normalize(it, nh, l, out);
}

/// The chunks `lo..=hi` of an item of `NQ` queries (block size a multiple
/// of [`CHUNK`]) by [`fold_chunk_f16`].
///
/// # Safety
/// The CPU has what `C` uses.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn fused<'a, C: Cvt, const NQ: usize>(
    c: &Ctx<'_>,
    it: &Item,
    blocks: &[u32],
    lo: usize,
    hi: usize,
    m: &mut [f32],
    l: &mut [f32],
    out: impl Fn(usize, usize) -> &'a mut [f32],
) {
    let p = c.p;
    let (hd, nh) = (p.head_dim, it.h1 - it.h0);
    let row_len = p.n_heads * hd;
    let s = &c.seqs[it.seq];
    let bs = c.kv.layout().block_size;
    // Query qi is token t0 + qi / nh, head h0 + qi % nh.
    let mut pos = [0usize; NQ];
    let mut q: [&[f32]; NQ] = [&[]; NQ];
    for qi in 0..NQ {
        let (t, h) = (it.t0 + qi / nh, it.h0 + qi % nh);
        pos[qi] = s.start_pos + t;
        let at = (it.row0 + t) * row_len + h * hd;
        q[qi] = &c.q[at..at + hd];
    }
    let mut o: [&mut [f32]; NQ] = from_fn(|qi| out(it.t0 + qi / nh, it.h0 + qi % nh));
    let first = |pos: usize| p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    for c0 in (lo / CHUNK * CHUNK..=hi).step_by(CHUNK) {
        let (block, off) = (blocks[c0 / bs], c0 % bs);
        if let Some(&next) = blocks.get((c0 + CHUNK) / bs).filter(|_| c0 + CHUNK <= hi) {
            C::prefetch(c.kv.k_block(p.layer, next, it.kvh));
            C::prefetch(c.kv.v_block(p.layer, next, it.kvh));
        }
        let keys = Keys {
            kb: c.kv.k_block(p.layer, block, it.kvh),
            stride: bs,
            off,
        };
        let v = &c.kv.v_block(p.layer, block, it.kvh)[off * hd..];
        let mut live = [(1, 0); NQ];
        for (live, &pos) in live.iter_mut().zip(&pos) {
            let (a, z) = (first(pos).max(c0), pos.min(c0 + CHUNK - 1));
            if a <= z {
                *live = (a - c0, z - c0);
            }
        }
        let ch = Chunk {
            q,
            k: keys,
            v,
            live,
            scale: p.scale,
        };
        C::fold::<NQ>(&ch, m, l, &mut o);
    }
}

/// Divides each query's output of `it` by its sum of weights.
#[inline(always)]
fn normalize<'a>(it: &Item, nh: usize, l: &[f32], out: impl Fn(usize, usize) -> &'a mut [f32]) {
    for t in it.t0..it.t1 {
        for h in it.h0..it.h1 {
            // Every query sees at least its own position, so the sum is > 0.
            let inv = 1.0 / l[(t - it.t0) * nh + (h - it.h0)];
            for x in out(t, h) {
                *x *= inv;
            }
        }
    }
}

/// Converts the keys (transposed: `kf[d * CHUNK + j]`) and values
/// (`vf[j * head_dim + d]`) of positions `c0 + j` to f32, for at least the
/// positions `a..=z.min(c0 + CHUNK - 1)`; other lanes keep stale values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn load_chunk(
    kv: &KvCache,
    layer: usize,
    blocks: &[u32],
    kvh: usize,
    c0: usize,
    a: usize,
    z: usize,
    kf: &mut [f32],
    vf: &mut [f32],
) {
    let l = kv.layout();
    let (bs, hd) = (l.block_size, l.head_dim);
    if bs % CHUNK == 0 {
        // The chunk lies in one block, at slot `off`.
        let (block, off) = (blocks[c0 / bs], c0 % bs);
        let kb = kv.k_block(layer, block, kvh);
        if bs == CHUNK {
            quant::f16_to_f32_slice(kb, kf);
        } else {
            for d in 0..hd {
                let src = &kb[d * bs + off..d * bs + off + CHUNK];
                quant::f16_to_f32_slice(src, &mut kf[d * CHUNK..(d + 1) * CHUNK]);
            }
        }
        let vb = kv.v_block(layer, block, kvh);
        quant::f16_to_f32_slice(&vb[off * hd..(off + CHUNK) * hd], vf);
        return;
    }
    // Other block sizes: position by position, only those needed (a chunk
    // may run past the table's last block).
    for pos in a..=z.min(c0 + CHUNK - 1) {
        let (block, slot, j) = (blocks[pos / bs], pos % bs, pos - c0);
        let kb = kv.k_block(layer, block, kvh);
        for d in 0..hd {
            kf[d * CHUNK + j] = kb[d * bs + slot].to_f32();
        }
        let vb = kv.v_block(layer, block, kvh);
        quant::f16_to_f32_slice(
            &vb[slot * hd..(slot + 1) * hd],
            &mut vf[j * hd..(j + 1) * hd],
        );
    }
}

/// Folds lanes `a..=z` of a chunk into one query's running maximum `m`, sum
/// `l` and unnormalised output `o`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fold_chunk(
    q: &[f32],
    kf: &[f32],
    vf: &[f32],
    a: usize,
    z: usize,
    scale: f32,
    m: &mut f32,
    l: &mut f32,
    o: &mut [f32],
) {
    let hd = q.len();
    // Scores of all lanes; four partial sums keep four multiply-add chains
    // in flight.
    let mut acc = [[0f32; CHUNK]; 4];
    let mut d = 0;
    while d + 4 <= hd {
        for (u, part) in acc.iter_mut().enumerate() {
            let qd = q[d + u];
            let k = &kf[(d + u) * CHUNK..(d + u + 1) * CHUNK];
            for j in 0..CHUNK {
                part[j] = qd.mul_add(k[j], part[j]);
            }
        }
        d += 4;
    }
    for d in d..hd {
        let k = &kf[d * CHUNK..(d + 1) * CHUNK];
        for j in 0..CHUNK {
            acc[0][j] = q[d].mul_add(k[j], acc[0][j]);
        }
    }
    let e = softmax_step(&acc, scale, a, z, m, l, o);
    add_weighted(&e, vf, a, z, o);
}

/// Adds lanes `a..=z` of a chunk's values (`vf[j * head_dim..]`), weighted
/// by `e`, to one query's output `o`, lane after lane.
#[inline(always)]
fn add_weighted(e: &[f32; CHUNK], vf: &[f32], a: usize, z: usize, o: &mut [f32]) {
    let hd = o.len();
    // Four 16-lane accumulators per pass over the lanes: four independent
    // multiply-add chains.
    let mut dc = 0;
    while dc + 64 <= hd {
        let mut acc = [[0f32; 16]; 4];
        for (u, part) in acc.iter_mut().enumerate() {
            part.copy_from_slice(&o[dc + 16 * u..dc + 16 * (u + 1)]);
        }
        for (j, &p) in e.iter().enumerate().take(z + 1).skip(a) {
            let v = &vf[j * hd + dc..j * hd + dc + 64];
            for (u, part) in acc.iter_mut().enumerate() {
                for i in 0..16 {
                    part[i] = p.mul_add(v[16 * u + i], part[i]);
                }
            }
        }
        for (u, part) in acc.iter().enumerate() {
            o[dc + 16 * u..dc + 16 * (u + 1)].copy_from_slice(part);
        }
        dc += 64;
    }
    for (d, x) in o.iter_mut().enumerate().skip(dc) {
        for (j, &p) in e.iter().enumerate().take(z + 1).skip(a) {
            *x = p.mul_add(vf[j * hd + d], *x);
        }
    }
}

/// One query's scores of a chunk (`acc`: four partial sums per lane) folded
/// into its running maximum `m`, sum `l` and unnormalised output `o`; returns
/// the weights of lanes `a..=z` (others zero).
#[inline(always)]
fn softmax_step(
    acc: &[[f32; CHUNK]; 4],
    scale: f32,
    a: usize,
    z: usize,
    m: &mut f32,
    l: &mut f32,
    o: &mut [f32],
) -> [f32; CHUNK] {
    let (e, corr) = softmax_weights(acc, scale, a, z, m, l);
    if corr != 1.0 {
        for x in o.iter_mut() {
            *x *= corr;
        }
    }
    e
}

/// [`softmax_step`] without the output: returns the weights and the factor
/// the output so far is to be multiplied by (exactly 1 when the maximum
/// stays).
#[inline(always)]
fn softmax_weights(
    acc: &[[f32; CHUNK]; 4],
    scale: f32,
    a: usize,
    z: usize,
    m: &mut f32,
    l: &mut f32,
) -> ([f32; CHUNK], f32) {
    let mut s = [0f32; CHUNK];
    for j in 0..CHUNK {
        s[j] = ((acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j])) * scale;
    }
    // Lanes outside a..=z may hold stale values: masked here, never read below.
    let live = |j: usize| (a..=z).contains(&j);
    let mut mx = f32::NEG_INFINITY;
    for (j, &x) in s.iter().enumerate() {
        mx = mx.max(if live(j) { x } else { f32::NEG_INFINITY });
    }
    let m_new = m.max(mx);
    let mut e = [0f32; CHUNK];
    for j in 0..CHUNK {
        e[j] = if live(j) { exp_le0(s[j] - m_new) } else { 0.0 };
    }
    // A fixed tree of sums (vectorizes; dead lanes add exact zeros).
    let mut w = CHUNK / 2;
    let mut t = e;
    while w > 0 {
        for i in 0..w {
            t[i] += t[i + w];
        }
        w /= 2;
    }
    let sum = t[0];
    let mut corr = 1.0;
    if *m != m_new {
        corr = if *m == f32::NEG_INFINITY {
            0.0
        } else {
            exp_le0(*m - m_new)
        };
        *l *= corr;
    }
    *l += sum;
    *m = m_new;
    (e, corr)
}

/// Where a chunk's keys are: key dimension d of lane j at
/// `kb[d * stride + off + j]`.
#[derive(Clone, Copy)]
struct Keys<'a> {
    kb: &'a [f16],
    stride: usize,
    off: usize,
}

/// One chunk folded into `NQ` queries: the queries, the chunk's keys and
/// values (lane j's at `v[j * head_dim..]`) in the cache, each query's live
/// lanes `(a, z)` (`a > z`: the chunk is past it) and the score scale.
#[derive(Clone, Copy)]
struct Chunk<'a, const NQ: usize> {
    q: [&'a [f32]; NQ],
    k: Keys<'a>,
    v: &'a [f16],
    live: [(usize, usize); NQ],
    scale: f32,
}

/// [`fold_chunk`] for `NQ` queries at once, reading the chunk's keys and
/// values (lane j's at `v[j * head_dim..]`) straight from the cache: each
/// 16 values are converted once for all the queries, and nothing is written
/// to scratch. Each query's operations are [`fold_chunk`]'s, in its order;
/// `live[qi]` is that query's `(a, z)` (`a > z`: the chunk is past it).
#[inline(always)]
unsafe fn fold_chunk_f16<C: Cvt, const NQ: usize>(
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
    let key = |d: usize| C::cvt16(&k.kb[d * k.stride + k.off..]);
    let mut acc = [[[0f32; CHUNK]; 4]; NQ];
    let mut d = 0;
    while d + 4 <= hd {
        for u in 0..4 {
            let kd = key(d + u);
            for (acc, q) in acc.iter_mut().zip(&q) {
                let qd = q[d + u];
                for j in 0..CHUNK {
                    acc[u][j] = qd.mul_add(kd[j], acc[u][j]);
                }
            }
        }
        d += 4;
    }
    for d in d..hd {
        let kd = key(d);
        for (acc, q) in acc.iter_mut().zip(&q) {
            for j in 0..CHUNK {
                acc[0][j] = q[d].mul_add(kd[j], acc[0][j]);
            }
        }
    }
    let mut e = [[0f32; CHUNK]; NQ];
    let (mut lo, mut hi) = (CHUNK, 0);
    for qi in 0..NQ {
        let (a, z) = live[qi];
        if a > z {
            continue;
        }
        (lo, hi) = (lo.min(a), hi.max(z));
        e[qi] = softmax_step(&acc[qi], scale, a, z, &mut m[qi], &mut l[qi], o[qi]);
    }
    let seen = |qi: usize, j: usize| (live[qi].0..=live[qi].1).contains(&j);
    // A decode step's queries (one token) all see the same lanes.
    let same = live.iter().all(|&x| x == live[0]);
    let mut dc = 0;
    while dc + 64 <= hd {
        let mut acc = [[[0f32; 16]; 4]; NQ];
        for (acc, o) in acc.iter_mut().zip(o.iter()) {
            for (u, part) in acc.iter_mut().enumerate() {
                part.copy_from_slice(&o[dc + 16 * u..dc + 16 * (u + 1)]);
            }
        }
        for j in lo..=hi {
            let row = &v[j * hd + dc..];
            let vj = [
                C::cvt16(row),
                C::cvt16(&row[16..]),
                C::cvt16(&row[32..]),
                C::cvt16(&row[48..]),
            ];
            for qi in 0..NQ {
                if !same && !seen(qi, j) {
                    continue;
                }
                let p = e[qi][j];
                for (part, vu) in acc[qi].iter_mut().zip(&vj) {
                    for i in 0..16 {
                        part[i] = p.mul_add(vu[i], part[i]);
                    }
                }
            }
        }
        for (acc, o) in acc.iter().zip(o.iter_mut()) {
            for (u, part) in acc.iter().enumerate() {
                o[dc + 16 * u..dc + 16 * (u + 1)].copy_from_slice(part);
            }
        }
        dc += 64;
    }
    for (qi, o) in o.iter_mut().enumerate() {
        for (d, x) in o.iter_mut().enumerate().skip(dc) {
            for j in lo..=hi {
                if seen(qi, j) {
                    *x = e[qi][j].mul_add(v[j * hd + d].to_f32(), *x);
                }
            }
        }
    }
}

/// ln 2 split in two parts for [`exp_le0`]'s range reduction.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` for `x ≤ 0` (a score minus the running maximum), within about one
/// ulp, `exp_le0(0) == 1` exactly; written so that it vectorizes.
#[inline(always)]
fn exp_le0(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // Taylor series to degree 6: |r| ≤ ln2 / 2 leaves a relative error ~1e-7.
    let mut p: f32 = 1.0 / 720.0;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::host::HostBackend;
    use crate::kv_cache::{rotation, BlockTable, KvLayout};

    #[test]
    fn exp_matches_std_over_the_softmax_range() {
        assert_eq!(exp_le0(0.0), 1.0);
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_le0(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.0137;
        }
        assert!(exp_le0(-1e4) < 1e-37 && exp_le0(f32::NEG_INFINITY) >= 0.0);
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    /// Softmax attention in f64 over what the cache kept of keys and values
    /// (`keys[p]`, `vals[p]`: one head's, read back).
    fn naive(
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        q: &[f32],
        first: usize,
        last: usize,
        scale: f32,
    ) -> Vec<f64> {
        let sc: Vec<f64> = (first..=last)
            .map(|p| {
                q.iter()
                    .zip(&keys[p])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
        let tot: f64 = w.iter().sum();
        (0..q.len())
            .map(|d| {
                (first..=last)
                    .zip(&w)
                    .map(|(p, w)| w * vals[p][d] as f64)
                    .sum::<f64>()
                    / tot
            })
            .collect()
    }

    /// Random sequences in one batch (new tokens after cached ones), against
    /// the f64 oracle over what the cache kept, within `tol`; then each
    /// sequence again token by token: the same bits.
    #[allow(clippy::too_many_arguments)]
    fn check(
        dtype: KvType,
        bs: usize,
        hd: usize,
        n_heads: usize,
        n_kv: usize,
        window: Option<usize>,
        threads: usize,
        tol: f64,
    ) {
        let mut seed = 7;
        {
            let layout = KvLayout {
                n_layers: 1,
                n_kv_heads: n_kv,
                head_dim: hd,
                block_size: bs,
                window: None,
                dtype,
            };
            let mut kv = KvCache::new(layout, 96);
            let kvd = n_kv * hd;
            // (cached positions, new tokens)
            let shapes = [(0, 37), (40, 1), (13, 5), (0, 1), (70, 20), (21, 3), (0, 2)];
            let mut tables = Vec::new();
            let mut keys = Vec::new();
            let mut vals = Vec::new();
            for &(cached, new) in &shapes {
                let mut t = BlockTable::new();
                t.reserve(&mut kv, cached + new).unwrap();
                let k: Vec<Vec<f32>> = (0..cached + new)
                    .map(|_| (0..kvd).map(|_| 4.0 * lcg(&mut seed)).collect())
                    .collect();
                let v: Vec<Vec<f32>> = (0..cached + new)
                    .map(|_| (0..kvd).map(|_| lcg(&mut seed)).collect())
                    .collect();
                for p in 0..cached + new {
                    kv.write(0, &t, p, &k[p], &v[p]);
                }
                tables.push(t);
                keys.push(k);
                vals.push(v);
            }
            let row_len = n_heads * hd;
            let n: usize = shapes.iter().map(|s| s.1).sum();
            let q: Vec<f32> = (0..n * row_len).map(|_| lcg(&mut seed)).collect();
            let p = AttnParams {
                layer: 0,
                n_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                scale: 0.3,
                window,
            };
            let b = CpuBackend::new(threads);
            let mut ws = b.workspace(n, row_len, 128);
            let seqs: Vec<AttnSeq> = shapes
                .iter()
                .zip(&tables)
                .map(|(&(cached, new), t)| AttnSeq {
                    table: t,
                    start_pos: cached,
                    n_tokens: new,
                })
                .collect();
            let mut out = vec![0.0; n * row_len];
            b.attention(&p, &q, &kv, &seqs, &mut out, &mut ws);
            let group = n_heads / n_kv;
            let mut row = 0;
            for (si, &(cached, new)) in shapes.iter().enumerate() {
                for t in 0..new {
                    let pos = cached + t;
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    for h in 0..n_heads {
                        let qh = &q[row * row_len + h * hd..][..hd];
                        let (mut kept_k, kept_v) = kept(&kv, &tables[si], h / group, pos);
                        let mut qh = qh.to_vec();
                        if let Some(ty) = dtype.block_type() {
                            // The cache scores turned keys with the turned
                            // query quantized to Q8_0: so does the oracle.
                            let turn = |x: &mut [f32]| {
                                if let Some(n) = rotation::key_block(hd) {
                                    rotation::apply(x, n);
                                }
                            };
                            turn(&mut qh);
                            let mut row = vec![0u8; hd / 32 * 34];
                            quant::quantize_row(quant::GgmlType::Q8_0, &qh, &mut row);
                            quant::dequantize_row(quant::GgmlType::Q8_0, &row, &mut qh);
                            kept_k.iter_mut().for_each(|k| turn(k));
                            assert!(ty.block_size() == 32);
                        }
                        let want = naive(&kept_k, &kept_v, &qh, first, pos, 0.3);
                        let got = &out[row * row_len + h * hd..][..hd];
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (*g as f64 - w).abs() < tol,
                                "{dtype} bs {bs} seq {si} pos {pos} head {h}: {g} vs {w}"
                            );
                        }
                    }
                    // The same token alone, as a decode step would see it.
                    let one = [AttnSeq {
                        table: &tables[si],
                        start_pos: pos,
                        n_tokens: 1,
                    }];
                    let mut alone = vec![0.0; row_len];
                    b.attention(
                        &p,
                        &q[row * row_len..(row + 1) * row_len],
                        &kv,
                        &one,
                        &mut alone,
                        &mut ws,
                    );
                    let batched = &out[row * row_len..(row + 1) * row_len];
                    assert!(
                        alone
                            .iter()
                            .zip(batched)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype} bs {bs} seq {si} pos {pos}: alone differs from batched"
                    );
                    row += 1;
                }
            }
        }
    }

    /// One head's keys and values at positions `0..=last`, as the cache kept them.
    fn kept(
        kv: &KvCache,
        t: &BlockTable,
        kvh: usize,
        last: usize,
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let l = kv.layout();
        (0..=last)
            .map(|p| {
                let (mut k, mut v) = (vec![0.0; l.head_dim], vec![0.0; l.head_dim]);
                kv.read(
                    0,
                    t.blocks[p / l.block_size],
                    kvh,
                    p % l.block_size,
                    &mut k,
                    &mut v,
                );
                (k, v)
            })
            .unzip()
    }

    #[test]
    fn matches_naive_softmax_and_does_not_depend_on_the_batch() {
        for (bs, hd, n_heads, n_kv, window, threads) in [
            (16, 64, 6, 2, None, 2),
            (16, 80, 3, 1, None, 2),
            (16, 16, 4, 1, Some(21), 3),
            (32, 16, 2, 2, None, 1),
            (3, 12, 3, 1, Some(5), 2),
            (5, 6, 2, 1, None, 2),
        ] {
            check(KvType::F16, bs, hd, n_heads, n_kv, window, threads, 2e-5);
        }
    }

    /// A quantized cache against the oracle over the kept keys and values,
    /// scored with the query quantized as the cache quantizes it.
    #[test]
    fn quantized_cache_matches_naive_softmax_and_does_not_depend_on_the_batch() {
        for ty in [KvType::Q8_0, KvType::Q4_0] {
            for (bs, hd, n_heads, n_kv, window, threads) in [
                (16, 64, 6, 2, None, 2),
                (16, 32, 4, 1, Some(21), 3),
                (32, 128, 2, 2, None, 1),
                (16, 256, 4, 1, None, 2),
                (5, 64, 3, 1, Some(9), 2),
                (3, 32, 2, 1, None, 2),
            ] {
                check(ty, bs, hd, n_heads, n_kv, window, threads, 5e-5);
            }
        }
    }
}
