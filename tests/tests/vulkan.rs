//! The Vulkan backend on the real models and in the daemon (lavapipe in
//! CI, installed by scripts/test.sh): greedy tokens on the three real GGUF
//! files equal the CPU backend's over 16 tokens, or part at a near-tie, and
//! `embodyd` with `backend = "vulkan"` streams a chat over HTTP.
//!
//! The backends do not compute the same bits: the CPU quantizes the
//! activations to 8 bits before its integer products (as llama.cpp does),
//! Vulkan multiplies them in f32. How far apart that puts their logits is
//! measured on the first step (and bounded at 5% of the largest logit); a
//! later token may differ only where the CPU's two candidates are closer
//! than that.
#![cfg(feature = "vulkan")]

use std::sync::Arc;

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::backend::vulkan::VulkanBackend;
use embody_engine::backend::Backend;
use embody_engine::kv_cache::BlockTable;
use embody_engine::models::{LoadOptions, Logits, Model, ModelFiles, SeqBatch};
use embody_tests::{http_post, model, smollm2, status, Daemon};

const TOKENS: usize = 16;

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
        "gemma-3-270m-q4_k_m.gguf",
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
        // How far apart the backends' logits are, on the first step.
        let spread = cpu.1[0].iter().fold(0f32, |m, v| m.max(v.abs()));
        let apart = cpu.1[0]
            .iter()
            .zip(&vk.1[0])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{file}: first step's largest logit difference {apart:.4} of {spread:.2}");
        assert!(
            apart < 0.05 * spread,
            "{file}: logits differ by {apart} (largest {spread})"
        );
        let same = cpu.0.iter().zip(&vk.0).take_while(|(a, b)| a == b).count();
        if same == TOKENS {
            eprintln!("{file}: all {TOKENS} greedy tokens equal the CPU's");
            continue;
        }
        let l = &cpu.1[same];
        let gap = l[cpu.0[same] as usize] - l[vk.0[same] as usize];
        eprintln!(
            "{file}: tokens agree for {same} of {TOKENS}, then a near-tie: the CPU's logit gap {gap:.4}"
        );
        assert!(
            gap < apart,
            "{file}: token {same} differs ({} on the CPU, {} on Vulkan) with a logit gap of {gap}, \
             more than the backends' difference of {apart}",
            cpu.0[same],
            vk.0[same]
        );
    }
}

#[test]
fn the_daemon_streams_a_chat_on_vulkan() {
    let config = format!(
        // Lavapipe runs the shaders on the CPU cores, slowly: a prefill step
        // takes seconds, so the stall timeout is raised.
        "[model]\npath = \"{}\"\nbackend = \"vulkan\"\n\n[cache]\nkv_cache_mb = 64\n\n[supervisor]\nstall_timeout_ms = 120000\n\n[zenoh]\nenabled = false\n",
        smollm2().display()
    );
    let d = Daemon::start(&config);
    let addr = d.http_url().trim_start_matches("http://").to_string();
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 6,
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
    let st = status(&d.socket).unwrap();
    assert!(
        st.backend.starts_with("vulkan: llvmpipe"),
        "the device in the status: {st:?}"
    );
}

/// A device lost mid-request (made to act lost by the test hook at its
/// third read-back) fails the request it held with a terminal error; the
/// next decoder opens the device again and serves.
#[test]
fn a_lost_device_is_opened_again() {
    let config = format!(
        "[model]\npath = \"{}\"\nbackend = \"vulkan\"\n\n[cache]\nkv_cache_mb = 64\n\n[supervisor]\nstall_timeout_ms = 120000\nrestart_backoff_ms = 50\n\n[zenoh]\nenabled = false\n",
        smollm2().display()
    );
    let mut d = Daemon::spawn(&config, &[("EMBODY_TEST_VULKAN_LOSE_AT_READ", "3")]);
    d.wait_ready();
    let addr = d.http_url().trim_start_matches("http://").to_string();
    let chat = |max_tokens: u32| {
        let body = serde_json::json!({
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        http_post(&addr, "/v1/chat/completions", &body.to_string())
    };
    let r = chat(6);
    assert!(!r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(r.contains("decoder_restarted"), "{r}");
    d.wait_ready();
    let r = chat(4);
    assert!(
        r.starts_with("HTTP/1.1 200 "),
        "served after the device was opened again: {r}"
    );
    let st = status(&d.socket).unwrap();
    assert_eq!(st.decoder_restarts, 1, "{st:?}");
    assert!(st.backend.starts_with("vulkan: llvmpipe"), "{st:?}");
    let log = d.log();
    assert!(log.contains("was lost: opening it again"), "{log}");
}
