//! Throughput measurement in the shape of llama.cpp's `llama-bench`: prefill of
//! a prompt of N tokens in one pass, then M decode steps of one token each, so
//! the two tools' figures compare one to one.

use std::time::Instant;

use crate::backend::Backend;
use crate::kv_cache::BlockTable;
use crate::models::{Logits, Model, SeqBatch};
use crate::Result;

/// Figures of one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchResult {
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Generated tokens per second.
    pub decode_tok_s: f64,
    /// Time to first token: the prefill plus the first decode step, in ms.
    pub ttft_ms: f64,
    /// Peak resident memory of the process so far, in MiB.
    pub peak_rss_mb: f64,
    /// Bytes of weights and KV one decode step reads (0 where the backend
    /// does not count).
    pub decode_bytes_per_token: f64,
}

/// Runs `prompt_tokens` of prefill then `gen_tokens` decode steps, `reps` times,
/// and returns the median of each figure. Tokens are arbitrary valid ids (the
/// cost of a forward pass does not depend on them); decode feeds back the
/// argmax so the work is that of greedy generation.
pub fn run(
    model: &mut dyn Model,
    backend: &dyn Backend,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<BenchResult> {
    let info = model.info().clone();
    let total = prompt_tokens + gen_tokens;
    let blocks = info.kv.blocks_for_tokens(total);
    // In the backend's memory (a GPU's, for a GPU backend).
    let mut kv = model.kv_cache(blocks, if info.kv.window.is_some() { blocks } else { 0 })?;
    let mut logits = vec![0f32; info.vocab_size];
    // A spread of ids, avoiding 0..16 where control tokens usually sit.
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|i| 16 + (i as u32 * 7919) % (info.vocab_size as u32 - 16))
        .collect();
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let mut table = BlockTable::new();
        table.reserve(&mut kv, total)?;
        let t0 = Instant::now();
        let mut start = 0;
        while start < prompt_tokens {
            let end = (start + info.max_batch_tokens).min(prompt_tokens);
            let b = [SeqBatch {
                tokens: &prompt[start..end],
                start_pos: start,
                embeds: &[],
                positions: Default::default(),
                table: &table,
                logits: if end == prompt_tokens {
                    Logits::Last
                } else {
                    Logits::None
                },
            }];
            model.forward(&b, &mut kv, &mut logits)?;
            start = end;
        }
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let read_before = backend.bytes_read();
        let mut first = 0.0;
        for g in 0..gen_tokens {
            let next = argmax(&logits);
            let b = [SeqBatch {
                tokens: std::slice::from_ref(&next),
                start_pos: prompt_tokens + g,
                embeds: &[],
                positions: Default::default(),
                table: &table,
                logits: Logits::Last,
            }];
            model.forward(&b, &mut kv, &mut logits)?;
            if g == 0 {
                first = t1.elapsed().as_secs_f64();
            }
        }
        let decode = t1.elapsed().as_secs_f64();
        let read = (backend.bytes_read() - read_before) as f64 / gen_tokens.max(1) as f64;
        table.release(&mut kv);
        runs.push((
            prompt_tokens as f64 / prefill,
            gen_tokens as f64 / decode,
            (prefill + first) * 1e3,
            read,
        ));
    }
    let median = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(BenchResult {
        prefill_tok_s: median(|r| r.0),
        decode_tok_s: median(|r| r.1),
        ttft_ms: median(|r| r.2),
        peak_rss_mb: peak_rss_mb(),
        decode_bytes_per_token: median(|r| r.3),
    })
}

/// The machine's streaming read bandwidth on `threads` threads, in bytes per
/// second: each thread sums its share of a `bytes`-long buffer (make it
/// several times the last-level cache), best of `reps` passes. The ceiling
/// of a memory-bound decode: bytes per token times tokens per second cannot
/// pass it.
pub fn read_bandwidth(threads: usize, bytes: usize, reps: usize) -> f64 {
    let threads = threads.max(1);
    // Written, so every page is backed by memory rather than the zero page.
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let per = buf.len().div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(per) {
                s.spawn(move || {
                    // Eight independent sums: the loads, not an addition
                    // chain, set the pace.
                    let mut acc = [0u64; 8];
                    for c in part.chunks_exact(8) {
                        for (a, v) in acc.iter_mut().zip(c) {
                            *a = a.wrapping_add(*v);
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        best = best.max((buf.len() * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &x)| if x > a.1 { (i, x) } else { a },
        )
        .0 as u32
}

/// The process's peak resident set (VmHWM) in MiB, or 0 where /proc is absent.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
