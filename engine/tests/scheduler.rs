//! The step scheduler on a tiny random Llama: sequences batched together, under
//! preemption, or alone produce the same greedy tokens; cancellation, queue
//! bounds and priorities behave; every KV block comes back.

mod common;

use std::sync::{Arc, Mutex};

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::generate::FinishReason;
use embody_engine::gguf::Gguf;
use embody_engine::models::{load_gguf, LoadOptions};
use embody_engine::prefix_cache::SharedPrefixCache;
use embody_engine::sampling::SamplingParams;
use embody_engine::scheduler::{Scheduler, SchedulerConfig, SeqEvent, SeqRequest};
use embody_engine::speculate::Lookup;
use embody_engine::tokenizer::Tokenizer;
use embody_engine::Error;

fn scheduler(kv_blocks: usize, max_running: usize, max_batch: usize) -> Scheduler {
    drafting(kv_blocks, max_running, max_batch, Lookup::OFF)
}

fn drafting(kv_blocks: usize, max_running: usize, max_batch: usize, lookup: Lookup) -> Scheduler {
    let g = Gguf::from_bytes("tiny.gguf", common::tiny_llama_gguf(3)).unwrap();
    let tok = Arc::new(Tokenizer::from_gguf(&g).unwrap());
    let opts = LoadOptions {
        max_batch_tokens: max_batch,
        block_size: 4,
        ..Default::default()
    };
    let model = load_gguf(&g, Arc::new(CpuBackend::new(2)), opts).unwrap();
    let cfg = SchedulerConfig {
        kv_blocks,
        max_running,
        max_queued: 64,
        lookup,
    };
    Scheduler::new(model, tok, cfg).unwrap()
}

type Log = Arc<Mutex<Vec<(u64, SeqEvent)>>>;

fn request(id: u64, len: usize, max_tokens: usize) -> SeqRequest {
    SeqRequest {
        id,
        // Ids 2..28 are the single letters; avoid the control tokens 0 and 1.
        prompt: (0..len)
            .map(|i| 2 + ((i as u32 * 7 + id as u32 * 3) % 26))
            .collect(),
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        priority: 0,
        images: vec![],
        image_rows: Vec::new(),
        positions: Vec::new(),
        next_position: 0,
        constraint: None,
        logprobs: None,
    }
}

fn submit(s: &mut Scheduler, log: &Log, req: SeqRequest) {
    let (log, id) = (log.clone(), req.id);
    s.submit(
        req,
        Box::new(move |ev| {
            log.lock().unwrap().push((id, ev));
            true
        }),
    )
    .unwrap();
}

fn run(s: &mut Scheduler) {
    let mut steps = 0;
    while s.has_work() {
        s.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "scheduler made no progress");
    }
}

fn tokens_of(log: &Log, id: u64) -> Vec<u32> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == id)
        .flat_map(|(_, e)| match e {
            SeqEvent::Delta { token_ids, .. } => token_ids.clone(),
            _ => vec![],
        })
        .collect()
}

fn finish_of(log: &Log, id: u64) -> Option<(FinishReason, usize, usize)> {
    log.lock().unwrap().iter().find_map(|(i, e)| match e {
        SeqEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        } if *i == id => Some((*reason, *prompt_tokens, *completion_tokens)),
        _ => None,
    })
}

fn alone(id: u64, len: usize, max_tokens: usize) -> Vec<u32> {
    let mut s = scheduler(64, 1, 64);
    let log = Log::default();
    submit(&mut s, &log, request(id, len, max_tokens));
    run(&mut s);
    tokens_of(&log, id)
}

#[test]
fn batched_sequences_match_each_alone() {
    let lens = [3, 17, 9, 30, 5, 12, 22, 8];
    let expected: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| alone(i as u64, l, 12))
        .collect();
    // A small token budget forces chunked prefills mixed with decodes.
    let mut s = scheduler(256, 8, 16);
    let log = Log::default();
    for (i, &l) in lens.iter().enumerate() {
        submit(&mut s, &log, request(i as u64, l, 12));
    }
    run(&mut s);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&log, i as u64), e, "sequence {i}");
        assert_eq!(
            finish_of(&log, i as u64),
            Some((FinishReason::Length, lens[i], 12))
        );
    }
    let st = s.stats();
    assert_eq!(
        (st.running, st.queued, st.kv_blocks_used),
        (0, 0, 0),
        "{st:?}"
    );
}

#[test]
fn preempted_sequences_resume_with_the_same_tokens() {
    let expected: Vec<Vec<u32>> = (0..4).map(|i| alone(i, 10, 20)).collect();
    // 4 sequences of up to 30 positions need 32 blocks of 4; give them 14.
    let mut s = scheduler(14, 4, 64);
    let log = Log::default();
    for i in 0..4 {
        submit(&mut s, &log, request(i, 10, 20));
    }
    run(&mut s);
    assert!(s.stats().preemptions > 0, "the pool was meant to run out");
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&log, i as u64), e, "sequence {i}");
    }
    assert_eq!(s.stats().kv_blocks_used, 0);
}

#[test]
fn cancel_and_disconnect_free_the_slot() {
    let mut s = scheduler(64, 2, 64);
    let log = Log::default();
    submit(&mut s, &log, request(1, 6, 1000));
    // A client that goes away after three deltas.
    let seen = Arc::new(Mutex::new(0));
    let seen2 = seen.clone();
    s.submit(
        request(2, 6, 1000),
        Box::new(move |ev| {
            if matches!(ev, SeqEvent::Delta { .. }) {
                *seen2.lock().unwrap() += 1;
            }
            *seen2.lock().unwrap() < 3
        }),
    )
    .unwrap();
    for _ in 0..5 {
        s.step().unwrap();
    }
    assert_eq!(
        s.stats().running,
        1,
        "the disconnected client's sequence ended"
    );
    assert!(s.cancel(1));
    assert!(!s.cancel(1), "already gone");
    assert_eq!(
        finish_of(&log, 1).map(|f| f.0),
        Some(FinishReason::Cancelled)
    );
    assert!(!s.has_work());
    assert_eq!(s.stats().kv_blocks_used, 0);
}

#[test]
fn queue_bound_priorities_and_bad_requests() {
    let mut s = scheduler(64, 1, 64);
    let log = Log::default();
    let mut r = request(9, 4, 2);
    r.prompt.clear();
    assert!(matches!(
        s.submit(r, Box::new(|_| true)),
        Err(Error::InvalidRequest(_))
    ));
    let mut r = request(9, 4, 2);
    r.prompt[0] = 64;
    assert!(s
        .submit(r, Box::new(|_| true))
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    let mut r = request(9, 300, 2);
    r.prompt.truncate(300);
    assert!(s
        .submit(r, Box::new(|_| true))
        .unwrap_err()
        .to_string()
        .contains("context"));
    // Ids 1..=3 at priority 0, then an urgent one: it runs right after the first admitted.
    for id in 1..=3 {
        submit(&mut s, &log, request(id, 4, 2));
    }
    let mut urgent = request(4, 4, 2);
    urgent.priority = 10;
    submit(&mut s, &log, urgent);
    run(&mut s);
    let order: Vec<u64> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| matches!(e, SeqEvent::Started { .. }))
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(order, [4, 1, 2, 3]);

    let mut s = scheduler(64, 1, 64);
    for id in 0..64 {
        s.submit(request(id, 4, 2), Box::new(|_| true)).unwrap();
    }
    let e = s.submit(request(99, 4, 2), Box::new(|_| true)).unwrap_err();
    assert!(matches!(e, Error::Overloaded(_)), "{e}");
}

fn cached_scheduler(
    kv_blocks: usize,
    max_running: usize,
    max_batch: usize,
) -> (Scheduler, Arc<SharedPrefixCache>) {
    let pc = SharedPrefixCache::new(4, true);
    let s = scheduler(kv_blocks, max_running, max_batch).with_prefix_cache(pc.clone());
    (s, pc)
}

/// A request whose prompt is a shared head of `shared` tokens and a tail of
/// `tail` tokens of its own.
fn with_prefix(id: u64, shared: usize, tail: usize, max_tokens: usize) -> SeqRequest {
    let mut r = request(id, shared + tail, max_tokens);
    for (i, t) in r.prompt[..shared].iter_mut().enumerate() {
        *t = 2 + (i as u32 * 5 % 26);
    }
    r
}

fn alone_req(req: SeqRequest) -> Vec<u32> {
    let mut s = scheduler(64, 1, 64);
    let log = Log::default();
    let id = req.id;
    submit(&mut s, &log, req);
    run(&mut s);
    tokens_of(&log, id)
}

#[test]
fn cached_prefixes_give_the_same_tokens_and_skip_prefill() {
    let reqs: Vec<SeqRequest> = (0..6)
        .map(|i| with_prefix(i, 21, 3 + i as usize, 10))
        .collect();
    let expected: Vec<Vec<u32>> = reqs.iter().cloned().map(alone_req).collect();
    let (mut s, pc) = cached_scheduler(128, 4, 64);
    let log = Log::default();
    // One at a time: each after the first reuses the 21 shared positions (5
    // blocks, and the first position of the sixth copied into its own block).
    for r in &reqs[..3] {
        submit(&mut s, &log, r.clone());
        run(&mut s);
    }
    assert_eq!(pc.stats().hit_tokens, 2 * 21, "{:?}", pc.stats());
    // Then three at once, the prefix and the earlier answers all cached.
    for r in &reqs[3..] {
        submit(&mut s, &log, r.clone());
    }
    run(&mut s);
    assert_eq!(pc.stats().hit_tokens, 5 * 21);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&log, i as u64), e, "sequence {i}");
    }
    // Asking the same again hits the prompt and the generated text too.
    let again = with_prefix(0, 21, 3, 10);
    let before = pc.stats().hit_tokens;
    submit(&mut s, &log, SeqRequest { id: 100, ..again });
    run(&mut s);
    assert_eq!(tokens_of(&log, 100), expected[0]);
    assert_eq!(
        pc.stats().hit_tokens - before,
        23,
        "24 prompt positions less the last: 5 blocks and 3 positions copied"
    );
    // Only the index holds blocks now; a flush gives every one back.
    let cached = pc.stats().cached_blocks;
    assert!(cached > 5);
    assert_eq!(s.stats().kv_blocks_used, cached);
    assert_eq!(pc.flush(), cached);
    s.release_flushed();
    assert_eq!((s.stats().kv_blocks_used, pc.stats().cached_blocks), (0, 0));
}

#[test]
fn a_short_pool_evicts_cached_prefixes_before_preempting() {
    // 16 blocks: each request needs 8 (10 + 20 positions of 4).
    let reqs: Vec<SeqRequest> = (0..6).map(|i| request(i, 10, 20)).collect();
    let expected: Vec<Vec<u32>> = reqs.iter().cloned().map(alone_req).collect();
    let (mut s, pc) = cached_scheduler(16, 1, 64);
    let log = Log::default();
    for r in &reqs {
        submit(&mut s, &log, r.clone());
        run(&mut s);
    }
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&log, i as u64), e, "sequence {i}");
    }
    let st = pc.stats();
    assert!(st.evicted_blocks > 0, "{st:?}");
    assert_eq!(s.stats().preemptions, 0);
    assert_eq!(s.stats().kv_blocks_used, st.cached_blocks);
}

#[test]
fn preemption_with_the_cache_resumes_with_the_same_tokens() {
    let expected: Vec<Vec<u32>> = (0..4).map(|i| alone(i, 10, 20)).collect();
    let (mut s, pc) = cached_scheduler(14, 4, 64);
    let log = Log::default();
    for i in 0..4 {
        submit(&mut s, &log, request(i, 10, 20));
    }
    run(&mut s);
    assert!(s.stats().preemptions > 0, "the pool was meant to run out");
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&log, i as u64), e, "sequence {i}");
    }
    pc.flush();
    s.release_flushed();
    assert_eq!(s.stats().kv_blocks_used, 0);
}

/// Random mixes of shared prefixes, cancellations, priorities and a small
/// pool: tokens match each request alone, and every block reference is
/// given back once everything ends and the cache is flushed.
#[test]
fn property_random_loads_keep_tokens_and_balance_blocks() {
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    let (mut hits, mut preemptions) = (0, 0);
    for round in 0..5 {
        let n = 4 + next(5) as usize;
        let reqs: Vec<SeqRequest> = (0..n as u64)
            .map(|i| {
                let mut r = with_prefix(
                    i,
                    [0, 5, 12, 16][next(4) as usize],
                    1 + next(10) as usize,
                    1 + next(12) as usize,
                );
                r.priority = next(3) as i32;
                r
            })
            .collect();
        let expected: Vec<Vec<u32>> = reqs.iter().cloned().map(alone_req).collect();
        let (mut s, pc) = cached_scheduler(
            10 + next(10) as usize,
            1 + next(4) as usize,
            8 + next(32) as usize,
        );
        let log = Log::default();
        let cancel = next(n as u64 + 2);
        for r in &reqs {
            submit(&mut s, &log, r.clone());
            if next(2) == 0 {
                s.step().unwrap();
            }
        }
        let mut steps = 0;
        while s.has_work() {
            if steps == 3 {
                s.cancel(cancel);
            }
            if steps == 5 && next(2) == 0 {
                pc.flush();
            }
            s.step().unwrap();
            steps += 1;
            assert!(steps < 10_000);
        }
        for (i, e) in expected.iter().enumerate() {
            let got = tokens_of(&log, i as u64);
            if i as u64 == cancel {
                assert!(e.starts_with(&got), "round {round}: cancelled {i} diverged");
            } else {
                assert_eq!(&got, e, "round {round}: sequence {i}");
            }
        }
        assert_eq!(
            s.stats().kv_blocks_used,
            pc.stats().cached_blocks,
            "round {round}"
        );
        hits += pc.stats().hit_tokens;
        preemptions += s.stats().preemptions;
        pc.flush();
        s.release_flushed();
        assert_eq!(s.stats().kv_blocks_used, 0, "round {round}");
    }
    assert!(
        hits > 0 && preemptions > 0,
        "hits {hits}, preemptions {preemptions}"
    );
}

#[test]
fn a_sequence_longer_than_the_pool_ends_at_its_length() {
    let mut s = scheduler(8, 2, 64);
    let log = Log::default();
    submit(&mut s, &log, request(1, 10, 100));
    submit(&mut s, &log, request(2, 10, 100));
    run(&mut s);
    // 8 blocks of 4 hold 32 positions: 22 tokens after a prompt of 10.
    for id in [1, 2] {
        assert_eq!(finish_of(&log, id), Some((FinishReason::Length, 10, 22)));
    }
    assert_eq!(s.stats().kv_blocks_used, 0);
}

#[test]
fn requests_arriving_together_wait_for_the_first_prefill_and_reuse_it() {
    let reqs: Vec<SeqRequest> = (0..4)
        .map(|i| with_prefix(i, 41, 2 + i as usize, 6))
        .collect();
    let expected: Vec<Vec<u32>> = reqs.iter().cloned().map(alone_req).collect();
    let (mut s, pc) = cached_scheduler(128, 4, 16);
    let log = Log::default();
    for r in &reqs {
        submit(&mut s, &log, r.clone());
    }
    run(&mut s);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens_of(&log, i as u64), e, "sequence {i}");
    }
    // The first prefills the 40 shared positions (10 blocks); the rest reuse them.
    assert_eq!(pc.stats().hit_tokens, 3 * 40, "{:?}", pc.stats());
}

/// A prompt that repeats itself, so prompt lookup has drafts to offer.
fn repetitive(id: u64, len: usize, max_tokens: usize, sampling: SamplingParams) -> SeqRequest {
    let period = 3 + id as usize % 4;
    SeqRequest {
        prompt: (0..len)
            .map(|i| 2 + ((i % period) as u32 * 5 + id as u32) % 26)
            .collect(),
        sampling,
        ..request(id, len, max_tokens)
    }
}

#[test]
fn drafted_tokens_change_nothing_but_the_number_of_steps() {
    let seeded = |seed| SamplingParams {
        temperature: 0.9,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let reqs: Vec<SeqRequest> = (0..6)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                seeded(i)
            };
            repetitive(i, 9 + 5 * i as usize, 24, sampling)
        })
        .collect();
    let mut results = Vec::new();
    // Alone and batched, with a pool short enough to preempt, without and
    // with drafts: every run gives every sequence the same tokens.
    for (kv_blocks, max_running, lookup) in [
        (64, 1, Lookup::OFF),
        (64, 1, Lookup::tokens(6)),
        (20, 6, Lookup::OFF),
        (20, 6, Lookup::tokens(6)),
        (64, 6, Lookup::tokens(32)),
    ] {
        let mut s = drafting(kv_blocks, max_running, 16, lookup);
        let log = Log::default();
        for r in &reqs {
            submit(&mut s, &log, r.clone());
        }
        run(&mut s);
        let st = s.stats();
        assert_eq!(st.kv_blocks_used, 0, "{st:?}");
        assert!(st.accepted <= st.drafted, "{st:?}");
        if lookup.max_draft > 0 {
            assert!(st.accepted > 0, "nothing drafted was confirmed: {st:?}");
        } else {
            assert_eq!(st.drafted, 0);
        }
        let tokens: Vec<Vec<u32>> = (0..6).map(|i| tokens_of(&log, i)).collect();
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(
                finish_of(&log, i as u64).map(|f| f.2),
                Some(t.len()),
                "sequence {i}"
            );
        }
        results.push((lookup.max_draft, max_running, st, tokens));
    }
    let (_, _, alone_plain, first) = &results[0];
    let (_, _, alone_drafted, _) = &results[1];
    assert!(
        alone_drafted.steps < alone_plain.steps,
        "drafts saved no forward pass: {alone_drafted:?} vs {alone_plain:?}"
    );
    for (draft, running, st, tokens) in &results[1..] {
        for (i, (a, b)) in first.iter().zip(tokens).enumerate() {
            assert_eq!(
                a, b,
                "sequence {i}, drafts of {draft}, {running} running: {st:?}"
            );
        }
    }
}

#[test]
fn drafts_stop_at_the_length_limit() {
    // One token short of what drafting could produce in a step.
    for max_tokens in [1, 2, 5, 7] {
        let mut s = drafting(64, 1, 64, Lookup::tokens(8));
        let log = Log::default();
        submit(
            &mut s,
            &log,
            repetitive(1, 12, max_tokens, SamplingParams::greedy()),
        );
        run(&mut s);
        assert_eq!(tokens_of(&log, 1).len(), max_tokens);
        assert_eq!(
            finish_of(&log, 1),
            Some((FinishReason::Length, 12, max_tokens))
        );
        assert_eq!(s.stats().kv_blocks_used, 0);
    }
}
