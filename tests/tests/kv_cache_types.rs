//! Quantized KV caches on the real SmolLM2 file: q8_0 keeps the perplexity of
//! f16 within half a percent and q4_0 within the range llama.cpp's own q4_0
//! cache reaches; the daemon serves with one, says which in its status, and
//! fits about twice the blocks of f16 in the same memory.

use embody_tests::{bin, embody, smollm2, Daemon};

fn perplexity(kv: &str) -> f64 {
    embody_tests::perplexity(&smollm2(), 4, &["-t", "2", "--kv-cache-type", kv])
}

#[test]
fn quantized_caches_keep_the_perplexity() {
    let f16 = perplexity("f16");
    let q8 = perplexity("q8_0");
    let q4 = perplexity("q4_0");
    let rel = |x: f64| (x - f16) / f16;
    // llama.cpp on the same text and chunks: q8_0 -0.4%, q4_0 +4.8% of its f16.
    assert!(rel(q8).abs() < 0.005, "q8_0 {q8} against f16 {f16}");
    assert!(rel(q4).abs() < 0.08, "q4_0 {q4} against f16 {f16}");
    assert!(
        q4 != q8 && q8 != f16,
        "three caches, three figures: {f16} {q8} {q4}"
    );

    let o = embody(&[
        "generate",
        "-m",
        smollm2().to_str().unwrap(),
        "--kv-cache-type",
        "q5_1",
        "--prompt",
        "hello",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown KV cache type 'q5_1' (f16, q8_0, q4_0)"),
        "{err}"
    );
}

fn config(kv: &str) -> String {
    format!(
        "[model]\npath = \"{}\"\nthreads = 2\n\n[cache]\nkv_cache_mb = 32\nkv_cache_type = \"{kv}\"\n",
        smollm2().display()
    )
}

#[test]
fn the_daemon_serves_with_a_q8_0_cache_and_says_so() {
    let f16 = Daemon::start(&config("f16"));
    let f16_blocks = embody_tests::status(&f16.socket).unwrap().kv_blocks_total;
    drop(f16);

    let d = Daemon::start(&config("q8_0"));
    let st = embody_tests::status(&d.socket).unwrap();
    assert_eq!(st.kv_cache_type, "q8_0");
    // 34 bytes per 32 values against 64: the same memory holds 1.88 times the blocks.
    let ratio = st.kv_blocks_total as f64 / f16_blocks as f64;
    assert!(
        (1.85..1.9).contains(&ratio),
        "{} against {f16_blocks}",
        st.kv_blocks_total
    );

    let out = std::process::Command::new(bin("embody"))
        .args(["chat", "What does a lidar sensor measure? One sentence."])
        .args(["--max-tokens", "16", "--temperature", "0", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.split_whitespace().count() >= 3,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin("embody"))
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tokens (q8_0)"), "{stdout}");

    // A model loaded at run time takes its own type; an unknown one is refused.
    let load = |name: &str, kv: &str| {
        std::process::Command::new(bin("embody"))
            .args(["load", name])
            .arg(smollm2())
            .args(["--kv-cache-type", kv, "--socket"])
            .arg(&d.socket)
            .output()
            .unwrap()
    };
    let out = load("small", "q4_0");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = load("bad", "q9");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("kv_cache_type: unknown KV cache type 'q9'"),
        "{err}"
    );

    // A bad type is refused when the config is read, by name.
    let mut bad = Daemon::spawn(&config("q3_k"), &[]);
    let status = bad
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("a bad config ends the daemon");
    assert!(!status.success());
    let log = bad.log();
    assert!(
        log.contains("cache.kv_cache_type") && log.contains("unknown KV cache type 'q3_k'"),
        "{log}"
    );
}
