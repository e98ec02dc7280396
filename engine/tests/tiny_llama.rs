//! Contract tests of the forward pass on a tiny random Llama: batched, ragged and
//! chunked forwards agree with token-by-token decoding, and bad batches are refused.

mod common;

use std::sync::Arc;

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::backend::Backend;
use embody_engine::gguf::Gguf;
use embody_engine::kv_cache::{BlockTable, KvCache};
use embody_engine::models::{load_gguf, LoadOptions, Logits, Model, SeqBatch};

fn model(threads: usize, max_batch: usize) -> Box<dyn Model> {
    let g = Gguf::from_bytes("tiny.gguf", common::tiny_llama_gguf(7)).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(threads));
    let opts = LoadOptions {
        max_batch_tokens: max_batch,
        block_size: 4,
        ..Default::default()
    };
    load_gguf(&g, backend, opts).unwrap()
}

const PROMPT: [u32; 11] = [0, 9, 4, 11, 11, 14, 28, 22, 14, 17, 11];

/// Logits of every position, one token per forward call.
fn one_by_one(m: &mut dyn Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let info = m.info().clone();
    let mut kv = KvCache::new(info.kv, 64);
    let mut table = BlockTable::new();
    let mut out = Vec::new();
    for (p, t) in tokens.iter().enumerate() {
        table.reserve(&mut kv, p + 1).unwrap();
        let mut logits = vec![0.0; info.vocab_size];
        let b = [SeqBatch {
            tokens: std::slice::from_ref(t),
            start_pos: p,
            embeds: &[],
            positions: Default::default(),
            table: &table,
            logits: Logits::Last,
        }];
        m.forward(&b, &mut kv, &mut logits).unwrap();
        out.push(logits);
    }
    out
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "{what}: max abs diff {max}");
}

#[test]
fn prefill_equals_token_by_token_decode() {
    let mut m = model(2, 64);
    let reference = one_by_one(m.as_mut(), &PROMPT);
    let info = m.info().clone();
    let v = info.vocab_size;
    let mut kv = KvCache::new(info.kv, 64);
    let mut table = BlockTable::new();
    table.reserve(&mut kv, PROMPT.len()).unwrap();
    let mut logits = vec![0.0; PROMPT.len() * v];
    let b = [SeqBatch {
        tokens: &PROMPT,
        start_pos: 0,
        embeds: &[],
        positions: Default::default(),
        table: &table,
        logits: Logits::All,
    }];
    m.forward(&b, &mut kv, &mut logits).unwrap();
    for (p, r) in reference.iter().enumerate() {
        assert_close(&logits[p * v..(p + 1) * v], r, &format!("position {p}"));
    }
    // The logits must depend on the context, or the comparison proves nothing.
    assert!(reference[3]
        .iter()
        .zip(&reference[4])
        .any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn ragged_batch_of_two_sequences_equals_each_alone() {
    let mut m = model(3, 64);
    let info = m.info().clone();
    let v = info.vocab_size;
    let a = &PROMPT[..7];
    let b = &PROMPT[3..];
    let ra = one_by_one(m.as_mut(), a);
    let rb = one_by_one(m.as_mut(), b);
    let mut kv = KvCache::new(info.kv, 64);
    let (mut ta, mut tb) = (BlockTable::new(), BlockTable::new());
    // Prefill the first 4 tokens of `a` alone, then run the rest of `a` together with all of `b`.
    ta.reserve(&mut kv, a.len()).unwrap();
    tb.reserve(&mut kv, b.len()).unwrap();
    let mut scratch = vec![0.0; v];
    let first = [SeqBatch {
        tokens: &a[..4],
        start_pos: 0,
        embeds: &[],
        positions: Default::default(),
        table: &ta,
        logits: Logits::None,
    }];
    m.forward(&first, &mut kv, &mut scratch).unwrap();
    let mut logits = vec![0.0; (1 + b.len()) * v];
    let batch = [
        SeqBatch {
            tokens: &a[4..],
            start_pos: 4,
            embeds: &[],
            positions: Default::default(),
            table: &ta,
            logits: Logits::Last,
        },
        SeqBatch {
            tokens: b,
            start_pos: 0,
            embeds: &[],
            positions: Default::default(),
            table: &tb,
            logits: Logits::All,
        },
    ];
    m.forward(&batch, &mut kv, &mut logits).unwrap();
    assert_close(&logits[..v], &ra[a.len() - 1], "sequence a, last row");
    for p in 0..b.len() {
        assert_close(
            &logits[(1 + p) * v..(2 + p) * v],
            &rb[p],
            &format!("sequence b, position {p}"),
        );
    }
}

#[test]
fn shared_prefix_blocks_serve_a_second_sequence() {
    let mut m = model(2, 64);
    let info = m.info().clone();
    let v = info.vocab_size;
    let reference = one_by_one(m.as_mut(), &PROMPT);
    let mut kv = KvCache::new(info.kv, 64);
    let mut first = BlockTable::new();
    first.reserve(&mut kv, 8).unwrap();
    let mut logits = vec![0.0; v];
    let b = [SeqBatch {
        tokens: &PROMPT[..8],
        start_pos: 0,
        embeds: &[],
        positions: Default::default(),
        table: &first,
        logits: Logits::None,
    }];
    m.forward(&b, &mut kv, &mut logits).unwrap();
    // A second sequence reuses the two full blocks (8 positions) and computes only the rest.
    let mut second = first.fork(&mut kv);
    second.reserve(&mut kv, PROMPT.len()).unwrap();
    let b = [SeqBatch {
        tokens: &PROMPT[8..],
        start_pos: 8,
        embeds: &[],
        positions: Default::default(),
        table: &second,
        logits: Logits::Last,
    }];
    m.forward(&b, &mut kv, &mut logits).unwrap();
    assert_close(
        &logits,
        &reference[PROMPT.len() - 1],
        "continued from shared blocks",
    );
    first.release(&mut kv);
    second.release(&mut kv);
    assert_eq!(kv.free_blocks(), kv.n_blocks());
}

#[test]
fn bad_batches_are_refused_with_a_reason() {
    let mut m = model(1, 4);
    let info = m.info().clone();
    let mut kv = KvCache::new(info.kv, 8);
    let mut table = BlockTable::new();
    table.reserve(&mut kv, 4).unwrap();
    let mut logits = vec![0.0; 8 * info.vocab_size];
    let mut run = |tokens: &[u32], start: usize| {
        let b = [SeqBatch {
            tokens,
            start_pos: start,
            embeds: &[],
            positions: Default::default(),
            table: &table,
            logits: Logits::All,
        }];
        m.forward(&b, &mut kv, &mut logits).unwrap_err().to_string()
    };
    assert!(run(&[1, 2, 3, 4, 5], 0).contains("max_batch_tokens"));
    assert!(run(&[1, 2], 3).contains("block table"));
    assert!(run(&[1, 64], 0).contains("outside the vocabulary"));
    assert!(run(&[], 0).contains("empty"));
}
