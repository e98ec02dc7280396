//! Continuous batching and the prefix cache on real models: greedy tokens are
//! the same with the cache on or off, alone or inside a batch of 8
//! mixed-length requests, and after preemption and resume. Gemma 3's
//! sliding-window layers turn prefix sharing off, and its batches still agree.
//! A quantized KV cache (q8_0, q4_0) keeps all of this exact too.

use std::sync::{Arc, Mutex};

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::gguf::Gguf;
use embody_engine::kv_cache::KvType;
use embody_engine::models::{load_gguf, LoadOptions};
use embody_engine::prefix_cache::SharedPrefixCache;
use embody_engine::sampling::SamplingParams;
use embody_engine::scheduler::{Scheduler, SchedulerConfig, SeqEvent, SeqRequest};
use embody_engine::speculate::Lookup;
use embody_engine::tokenizer::Tokenizer;
use embody_tests::model;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

struct Loaded {
    gguf: Gguf,
    tok: Arc<Tokenizer>,
}

fn open(file: &str) -> Loaded {
    let gguf = Gguf::open(&model(file)).expect("the model opens");
    let tok = Arc::new(Tokenizer::from_gguf(&gguf).expect("its tokenizer loads"));
    Loaded { gguf, tok }
}

fn scheduler(m: &Loaded, kv_blocks: usize, max_running: usize) -> Scheduler {
    drafting(m, kv_blocks, max_running, Lookup::OFF)
}

fn drafting(m: &Loaded, kv_blocks: usize, max_running: usize, lookup: Lookup) -> Scheduler {
    storing(m, kv_blocks, max_running, lookup, KvType::F16)
}

fn storing(
    m: &Loaded,
    kv_blocks: usize,
    max_running: usize,
    lookup: Lookup,
    kv_type: KvType,
) -> Scheduler {
    let opts = LoadOptions {
        max_batch_tokens: 256,
        context_length: 2048,
        kv_type,
        ..LoadOptions::default()
    };
    let model = load_gguf(&m.gguf, Arc::new(CpuBackend::new(2)), opts).expect("the model loads");
    let cfg = SchedulerConfig {
        kv_blocks,
        max_running,
        max_queued: 64,
        lookup,
    };
    Scheduler::new(model, m.tok.clone(), cfg).unwrap()
}

/// A shared system text of about 120 tokens, then a question of its own.
fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    let system = "You are the onboard assistant of a warehouse robot. ".to_string()
        + &"The robot has a lidar on its mast, two depth cameras facing forward, a bumper \
            that stops the drive when pressed, and an arm that lifts boxes of up to ten \
            kilograms. Always answer briefly and name the sensor you rely on. "
            .repeat(2);
    let questions = [
        "Is the aisle ahead clear?",
        "What lifts the boxes?",
        "Which sensor sees behind the robot, if any, and how far can it see in a dusty \
         warehouse with poor light?",
        "Should the robot stop?",
        "How heavy a box may the arm lift?",
        "Describe what happens when the bumper is pressed while the arm is holding a box \
         above the conveyor belt.",
        "Where are the cameras?",
        "Name one sensor.",
    ];
    questions
        .iter()
        .map(|q| {
            tok.encode(&format!("{system}\nQuestion: {q}\nAnswer:"), true, false)
                .expect("the prompt tokenizes")
        })
        .collect()
}

type Log = Arc<Mutex<Vec<(u64, Vec<u32>)>>>;

fn submit(s: &mut Scheduler, log: &Log, id: u64, prompt: &[u32], max_tokens: usize) {
    let log = log.clone();
    let req = SeqRequest {
        id,
        prompt: prompt.to_vec(),
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
    };
    s.submit(
        req,
        Box::new(move |ev| {
            if let SeqEvent::Delta { token_ids, .. } = ev {
                log.lock().unwrap().push((id, token_ids));
            }
            true
        }),
    )
    .expect("the request is accepted");
}

fn run(s: &mut Scheduler) {
    while s.has_work() {
        s.step().expect("the step runs");
    }
}

fn tokens(log: &Log, id: u64) -> Vec<u32> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == id)
        .flat_map(|(_, t)| t.clone())
        .collect()
}

/// Submits every prompt at once, runs them to the end, and checks each
/// request's tokens against `expected`.
fn all_at_once_match(
    s: &mut Scheduler,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    expected: &[Vec<u32>],
    what: &str,
) {
    let log = Log::default();
    for (i, p) in prompts.iter().enumerate() {
        submit(s, &log, i as u64, p, max_tokens);
    }
    run(s);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens(&log, i as u64), e, "{what}: request {i}");
    }
}

/// Each prompt run to its end before the next is submitted: their tokens.
fn one_by_one(s: &mut Scheduler, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let log = Log::default();
    for (i, p) in prompts.iter().enumerate() {
        submit(s, &log, i as u64, p, max_tokens);
        run(s);
    }
    (0..prompts.len()).map(|i| tokens(&log, i as u64)).collect()
}

/// Each prompt alone, without a cache: the reference.
fn alone(m: &Loaded, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    one_by_one(&mut scheduler(m, 256, 1), prompts, max_tokens)
}

#[test]
fn smollm2_cache_on_off_alone_and_batched_agree() {
    let m = open(SMOL);
    let prompts = prompts(&m.tok);
    assert!(
        prompts.iter().all(|p| p.len() > 110),
        "a long shared prefix"
    );
    let n = 12;
    let expected = alone(&m, &prompts, n);
    let answered = expected.iter().filter(|t| !t.is_empty()).count();
    assert!(answered >= 6, "{expected:?}");

    // Cache on, one request at a time: the later ones reuse the system text.
    let pc = SharedPrefixCache::new(16, true);
    let mut s = scheduler(&m, 256, 8).with_prefix_cache(pc.clone());
    let got = one_by_one(&mut s, &prompts, n);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "cache on, sequential: request {i}");
    }
    let hits = pc.stats().hit_tokens;
    assert!(hits >= 7 * 96, "7 requests reuse 6 blocks or more: {hits}");

    // Cache on, all 8 at once, into a warm cache.
    let log = Log::default();
    let ids = 100..108u64;
    for (id, p) in ids.clone().zip(&prompts) {
        submit(&mut s, &log, id, p, n);
    }
    run(&mut s);
    for (id, e) in ids.zip(&expected) {
        assert_eq!(&tokens(&log, id), e, "cache on, batch of 8: request {id}");
    }
    assert!(pc.stats().hit_tokens >= hits + 8 * 96);

    // Drafts on (prompt lookup), cache on, all 8 at once into a cold cache.
    let pc = SharedPrefixCache::new(16, true);
    let mut s = drafting(&m, 256, 8, Lookup::tokens(8)).with_prefix_cache(pc);
    all_at_once_match(&mut s, &prompts, n, &expected, "drafts on, batch of 8");
    assert!(s.stats().drafted > 0, "{:?}", s.stats());

    // Cache off, all 8 at once.
    let mut s = scheduler(&m, 256, 8);
    all_at_once_match(&mut s, &prompts, n, &expected, "cache off, batch of 8");
    assert_eq!(s.stats().kv_blocks_used, 0);
}

#[test]
fn smollm2_preempted_requests_resume_with_the_same_tokens() {
    let m = open(SMOL);
    // Distinct from the first token on, so sharing alone cannot make them fit.
    let prompts: Vec<Vec<u32>> = prompts(&m.tok)
        .into_iter()
        .take(4)
        .enumerate()
        .map(|(i, mut p)| {
            p[1] = 100 + i as u32;
            p
        })
        .collect();
    let n = 16;
    let expected = alone(&m, &prompts, n);
    for cache in [false, true] {
        // Four requests of about 10 blocks each in a pool of 24.
        let mut s = scheduler(&m, 24, 4);
        let pc = SharedPrefixCache::new(16, true);
        if cache {
            s = s.with_prefix_cache(pc.clone());
        }
        let log = Log::default();
        for (i, p) in prompts.iter().enumerate() {
            submit(&mut s, &log, i as u64, p, n);
        }
        run(&mut s);
        assert!(
            s.stats().preemptions > 0,
            "cache {cache}: the pool was meant to run out"
        );
        for (i, e) in expected.iter().enumerate() {
            assert_eq!(&tokens(&log, i as u64), e, "cache {cache}: request {i}");
        }
        pc.flush();
        s.release_flushed();
        assert_eq!(s.stats().kv_blocks_used, 0, "cache {cache}");
    }
}

#[test]
fn gemma3_shares_no_prefix_across_its_window_and_batches_agree() {
    let m = open("gemma-3-270m-q4_k_m.gguf");
    let prompts: Vec<Vec<u32>> = prompts(&m.tok).into_iter().take(3).collect();
    let n = 8;
    let expected = alone(&m, &prompts, n);
    let pc = SharedPrefixCache::new(16, true);
    let mut s = scheduler(&m, 256, 4).with_prefix_cache(pc.clone());
    let log = Log::default();
    submit(&mut s, &log, 0, &prompts[0], n);
    run(&mut s);
    for (i, p) in prompts.iter().enumerate().skip(1) {
        submit(&mut s, &log, i as u64, p, n);
    }
    run(&mut s);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&tokens(&log, i as u64), e, "request {i}");
    }
    let st = pc.stats();
    assert!(!st.enabled, "sliding-window layers turn sharing off");
    assert_eq!((st.hit_tokens, st.cached_blocks), (0, 0));
    assert_eq!(s.stats().kv_blocks_used, 0);
}

/// A quantized cache on both families that use one: each request's tokens
/// alone are the reference; the prefix cache (SmolLM2), batches of mixed
/// lengths, drafts and Gemma 3's sliding-window pool give the same tokens.
#[test]
fn quantized_kv_cache_keeps_prefixes_batches_and_drafts_exact() {
    let m = open(SMOL);
    let prompts = prompts(&m.tok);
    let n = 10;
    for ty in [KvType::Q8_0, KvType::Q4_0] {
        let expected = one_by_one(&mut storing(&m, 256, 1, Lookup::OFF, ty), &prompts, n);
        assert!(
            expected.iter().filter(|t| !t.is_empty()).count() >= 4,
            "{ty}: {expected:?}"
        );

        let pc = SharedPrefixCache::new(16, true);
        let mut s = storing(&m, 256, 8, Lookup::OFF, ty).with_prefix_cache(pc.clone());
        let got = one_by_one(&mut s, &prompts, n);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "{ty}, cache on, sequential: request {i}");
        }
        assert!(pc.stats().hit_tokens >= 7 * 96, "{ty}: {:?}", pc.stats());
        all_at_once_match(
            &mut s,
            &prompts,
            n,
            &expected,
            &format!("{ty}, warm cache, batch of 8"),
        );

        let mut s = storing(&m, 256, 8, Lookup::tokens(8), ty);
        all_at_once_match(
            &mut s,
            &prompts,
            n,
            &expected,
            &format!("{ty}, drafts on, batch of 8"),
        );
        assert!(s.stats().drafted > 0, "{ty}: {:?}", s.stats());
    }

    let g = open("gemma-3-270m-q4_k_m.gguf");
    let three: Vec<Vec<u32>> = self::prompts(&g.tok).into_iter().take(3).collect();
    let expected = one_by_one(
        &mut storing(&g, 256, 1, Lookup::OFF, KvType::Q8_0),
        &three,
        8,
    );
    let mut s = storing(&g, 256, 4, Lookup::OFF, KvType::Q8_0);
    all_at_once_match(&mut s, &three, 8, &expected, "gemma 3, q8_0, batch of 3");
}
