//! The Vulkan backend on the real models and in the daemon (lavapipe in
//! CI, installed by scripts/test.sh): greedy tokens on the three real GGUF
//! files equal the CPU backend's over 16 tokens (or part at a near-tie,
//! whose logit gap is named), and `embodyd` with `backend = "vulkan"`
//! streams a chat over HTTP.
#![cfg(feature = "vulkan")]

use std::sync::Arc;

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::backend::vulkan::VulkanBackend;
use embody_engine::backend::Backend;
use embody_engine::kv_cache::BlockTable;
use embody_engine::models::{LoadOptions, Logits, Model, ModelFiles, SeqBatch};
use embody_tests::{http_post, model, smollm2, Daemon};

const TOKENS: usize = 16;
/// A first difference between the backends is accepted only where the
/// CPU's two candidates are this close (logits).
const NEAR_TIE: f32 = 0.05;

/// Greedy tokens after `prompt`, and each step's logits.
fn greedy(m: &mut dyn Model, prompt: &[u32]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let v = m.info().vocab_size;
    let window = if m.info().kv.window.is_some() { 64 } else { 0 };
    let mut kv = m.kv_cache(64, window).unwrap();
    let mut table = BlockTable::new();
    let mut logits = vec![0.0; v];
    let (mut out, mut steps) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    while out.len() < TOKENS {
        table.reserve(&mut kv, pos + feed.len()).unwrap();
        let b = [SeqBatch::text(&feed, pos, &table, Logits::Last)];
        m.forward(&b, &mut kv, &mut logits).unwrap();
        pos += feed.len();
        let next = logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
            .0 as u32;
        out.push(next);
        steps.push(logits.clone());
        feed = vec![next];
    }
    table.release(&mut kv);
    (out, steps)
}

#[test]
fn real_models_decode_the_cpu_backends_greedy_tokens() {
    let gpu: Arc<dyn Backend> = Arc::new(VulkanBackend::new(None).expect("a Vulkan device"));
    let opts = LoadOptions {
        max_batch_tokens: 64,
        context_length: 256,
        ..Default::default()
    };
    for file in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-it-Q4_K_M.gguf",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ] {
        let files = ModelFiles::open(&model(file)).unwrap();
        let prompt = files
            .tokenizer()
            .unwrap()
            .encode("The robot picked up the red cube and", true, false)
            .unwrap();
        let cpu = greedy(
            files
                .load(Arc::new(CpuBackend::new(2)), opts)
                .unwrap()
                .as_mut(),
            &prompt,
        );
        let vk = greedy(files.load(gpu.clone(), opts).unwrap().as_mut(), &prompt);
        let same = cpu.0.iter().zip(&vk.0).take_while(|(a, b)| a == b).count();
        if same < TOKENS {
            let l = &cpu.1[same];
            let gap = l[cpu.0[same] as usize] - l[vk.0[same] as usize];
            eprintln!("{file}: tokens agree for {same} of {TOKENS}; then a near-tie, CPU logit gap {gap:.4}");
            assert!(
                gap < NEAR_TIE,
                "{file}: token {same} differs ({} on the CPU, {} on Vulkan) with a logit gap of {gap}",
                cpu.0[same],
                vk.0[same]
            );
        } else {
            eprintln!("{file}: all {TOKENS} greedy tokens equal the CPU's");
        }
        // The logits themselves stay close while the tokens agree.
        let spread = cpu.1[0].iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = cpu.1[0]
            .iter()
            .zip(&vk.1[0])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{file}: first step's largest logit difference {diff:.4} of {spread:.2}");
        assert!(
            diff < 0.05 * spread,
            "{file}: logits differ by {diff} (largest {spread})"
        );
    }
}

#[test]
fn the_daemon_streams_a_chat_on_vulkan() {
    let config = format!(
        "[model]\npath = \"{}\"\nbackend = \"vulkan\"\n\n[cache]\nkv_cache_mb = 64\n\n[zenoh]\nenabled = false\n",
        smollm2().display()
    );
    let d = Daemon::start(&config);
    let addr = d.http_url().trim_start_matches("http://").to_string();
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let r = http_post(&addr, "/v1/chat/completions", &body);
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let chunks = r.matches("data: {").count();
    assert!(chunks >= 3, "a streamed answer in chunks: {r}");
    assert!(r.contains("data: [DONE]"), "{r}");
    assert!(r.contains("\"finish_reason\":\"length\""), "{r}");
    let log = d.log();
    assert!(
        log.contains("vulkan") && log.contains("llvmpipe"),
        "the device in the load log: {log}"
    );
}
