//! Greedy text and perplexity of the real SmolLM2-135M-Instruct Q4_1 file,
//! through the `embody` binary, against llama.cpp's recorded results
//! (`tests/fixtures/llamacpp/*.json`, written by `scripts/llamacpp-oracle.py`).

use embody_tests::{embody, model, repo_root};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    n_predict: usize,
    perplexity: Ppl,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Ppl {
    file: String,
    ctx: usize,
    chunks: usize,
    ppl: f64,
}

#[derive(Deserialize)]
struct Case {
    chat: bool,
    prompt: String,
    text: String,
    pieces: Vec<String>,
}

fn fixture(name: &str) -> Fixture {
    let p = repo_root().join("tests/fixtures/llamacpp").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// How many of llama.cpp's tokens our text reproduces from the start.
fn agreement(ours: &str, pieces: &[String]) -> usize {
    let mut prefix = String::new();
    let mut n = 0;
    for p in pieces {
        prefix.push_str(p);
        if !ours.starts_with(prefix.as_str()) {
            break;
        }
        n += 1;
    }
    n
}

fn greedy_agreement(name: &str) {
    let f = fixture(name);
    let path = model(&f.model);
    let path = path.to_str().unwrap();
    let n = f.n_predict.to_string();
    let mut full = 0;
    let mut report = Vec::new();
    for c in &f.cases {
        let mut args = vec!["generate", "-m", path, "-p", &c.prompt, "--temperature", "0", "-n", &n];
        if c.chat {
            args.push("--chat");
        }
        let out = embody(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let ours = String::from_utf8(out.stdout).unwrap();
        let ours = ours.strip_suffix('\n').unwrap_or(&ours);
        let agree = agreement(ours, &c.pieces);
        report.push(format!("{agree:>3}/{:<3} chat={} {:?}", c.pieces.len(), c.chat, c.prompt));
        if agree >= 16.min(c.pieces.len()) {
            full += 1;
        } else {
            eprintln!("differs: {:?}\n  ours:  {ours:?}\n  llama: {:?}", c.prompt, c.text);
        }
    }
    eprintln!("{name}: tokens matching llama.cpp per prompt\n  {}", report.join("\n  "));
    let need = f.cases.len() * 4 / 5;
    assert!(
        full >= need,
        "{name}: only {full} of {} prompts agree with llama.cpp over 16 tokens (need {need})",
        f.cases.len()
    );
}

fn perplexity_within_one_percent(name: &str) {
    let f = fixture(name);
    let path = model(&f.model);
    let text = repo_root().join(&f.perplexity.file);
    let (ctx, chunks) = (f.perplexity.ctx.to_string(), f.perplexity.chunks.to_string());
    let out = embody(&[
        "perplexity",
        "-m",
        path.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        &ctx,
        "--chunks",
        &chunks,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ppl: f64 = stdout
        .trim()
        .strip_prefix("PPL = ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
    let rel = (ppl - f.perplexity.ppl).abs() / f.perplexity.ppl;
    eprintln!("{name}: PPL ours {ppl:.4}, llama.cpp {:.4}, difference {:.3}%", f.perplexity.ppl, rel * 100.0);
    assert!(rel < 0.01, "{name}: PPL {ppl} vs llama.cpp {} ({:.2}%)", f.perplexity.ppl, rel * 100.0);
}

#[test]
fn smollm2_greedy_text_matches_llamacpp() {
    greedy_agreement("smollm2");
}

#[test]
fn smollm2_perplexity_within_one_percent_of_llamacpp() {
    perplexity_within_one_percent("smollm2");
}
