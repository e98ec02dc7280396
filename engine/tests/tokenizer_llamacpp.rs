//! Our tokenizer against llama.cpp on real vocabularies.
//!
//! * `tokenizer_matches_llama_tokenize_*`: the models in `$EMBODY_MODELS`
//!   (default `~/.cache/embody/models`) against the ids `llama-tokenize` printed
//!   for them, stored in `tests/fixtures/tokenizer/*.json` by
//!   `scripts/tokenizer-oracle.sh`. A missing model file is a printed skip.
//! * `llama_cpp_vocab_tests`: llama.cpp's own tokenizer test set
//!   (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, what its `test-tokenizer-0`
//!   checks), when a llama.cpp tree is at `$LLAMA_CPP_DIR`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use embody_engine::gguf::Gguf;
use embody_engine::tokenizer::Tokenizer;

fn home_cache(rest: &str) -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/embody").join(rest)
}

fn models_dir() -> PathBuf {
    std::env::var_os("EMBODY_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_cache("models"))
}

fn llama_cpp_dir() -> PathBuf {
    std::env::var_os("LLAMA_CPP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_cache("llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"))
}

fn load(path: &Path) -> Tokenizer {
    let start = Instant::now();
    let g = Gguf::open(path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    eprintln!(
        "{}: tokenizer built in {:.0} ms ({} tokens)",
        path.display(),
        start.elapsed().as_secs_f64() * 1e3,
        tok.vocab_size()
    );
    tok
}

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    #[serde(default = "yes")]
    parse_special: bool,
}

fn yes() -> bool {
    true
}

/// Encodes every fixture string as `llama-tokenize` does (BOS as the model
/// says, special tokens parsed unless the case says not) and decodes it back.
fn check_fixture(model_file: &str, fixture: &str) {
    let path = models_dir().join(model_file);
    if !path.exists() {
        eprintln!("SKIP: {} not found (set EMBODY_MODELS)", path.display());
        return;
    }
    let fixture_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(fixture);
    let fixture: Fixture = serde_json::from_slice(&std::fs::read(&fixture_path).unwrap()).unwrap();
    let tok = load(&path);
    assert!(tok.warnings().is_empty(), "{:?}", tok.warnings());

    let mut failures = Vec::new();
    for case in &fixture.cases {
        let got = tok.encode(&case.text, true, case.parse_special).unwrap();
        if got != case.ids {
            failures.push(format!(
                "encode {:?} (parse_special={}): got {:?}, llama.cpp {:?}",
                case.text, case.parse_special, got, case.ids
            ));
            continue;
        }
        let body = match tok.bos_id() {
            Some(bos) if tok.add_bos() && got.first() == Some(&bos) => &got[1..],
            _ => &got[..],
        };
        let back = tok.decode(body, false).unwrap();
        if back != case.text {
            failures.push(format!("decode {:?}: got {:?}", case.text, back));
        }
    }
    eprintln!(
        "{model_file}: {} of {} cases match llama-tokenize",
        fixture.cases.len() - failures.len(),
        fixture.cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tokenizer_matches_llama_tokenize_smollm2() {
    check_fixture("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m.json");
}

#[test]
fn tokenizer_matches_llama_tokenize_qwen25_coder() {
    check_fixture(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-0.5b.json",
    );
}

#[test]
fn tokenizer_matches_llama_tokenize_gemma3() {
    check_fixture("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m.json");
}

#[test]
fn special_ids_of_real_models() {
    let dir = models_dir();
    // (file, tokens that end generation, tokens that do not, BOS text,
    // the chat template fixture copied from the file)
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
        Option<&'a str>,
        Option<&'a str>,
    );
    let cases: [Case; 3] = [
        (
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            &["<|im_end|>", "<|endoftext|>"],
            &["<|im_start|>", "Hello"],
            Some("<|im_start|>"),
            Some("smollm2-135m-instruct.jinja"),
        ),
        (
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            &[
                "<|im_end|>",
                "<|endoftext|>",
                "<|fim_pad|>",
                "<|repo_name|>",
                "<|file_sep|>",
            ],
            &["<|im_start|>", "<tool_call>"],
            Some("<|endoftext|>"),
            Some("qwen2.5-coder-0.5b-instruct.jinja"),
        ),
        (
            "gemma-3-270m-q4_k_m.gguf",
            &["<end_of_turn>", "<eos>"],
            &["<start_of_turn>", "<bos>"],
            Some("<bos>"),
            None, // this GGUF carries no chat template
        ),
    ];
    for (file, eog, not_eog, bos, template) in cases {
        let path = dir.join(file);
        if !path.exists() {
            eprintln!("SKIP: {} not found (set EMBODY_MODELS)", path.display());
            continue;
        }
        let tok = load(&path);
        let id_of = |text: &str| {
            (0..tok.vocab_size() as u32)
                .find(|&i| tok.token_text(i) == Some(text))
                .unwrap_or_else(|| panic!("{file}: no token {text:?}"))
        };
        for name in eog {
            assert!(
                tok.is_eog(id_of(name)),
                "{file}: {name} should end generation"
            );
        }
        for name in not_eog {
            assert!(
                !tok.is_eog(id_of(name)),
                "{file}: {name} should not end generation"
            );
        }
        assert_eq!(tok.bos_id().and_then(|b| tok.token_text(b)), bos);
        let fixture = template.map(|t| {
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/templates")
                    .join(t),
            )
            .unwrap()
        });
        assert_eq!(tok.chat_template(), fixture.as_deref(), "{file}");
    }
}

/// llama.cpp's `test-tokenizer-0` cases: add_special and parse_special off.
#[test]
fn llama_cpp_vocab_tests() {
    let models = llama_cpp_dir().join("models");
    if !models.exists() {
        eprintln!(
            "SKIP: no llama.cpp tree at {} (set LLAMA_CPP_DIR)",
            models.display()
        );
        return;
    }
    let mut failures = Vec::new();
    for name in [
        "gpt-2",
        "llama-bpe",
        "llama-spm",
        "qwen2",
        "qwen35",
        "starcoder",
        "refact",
        "command-r",
        "mpt",
        "falcon",
        "deepseek-coder",
        "deepseek-llm",
        "phi-3",
    ] {
        let gguf = models.join(format!("ggml-vocab-{name}.gguf"));
        let (Ok(inp), Ok(out)) = (
            std::fs::read_to_string(gguf.with_extension("gguf.inp")),
            std::fs::read_to_string(gguf.with_extension("gguf.out")),
        ) else {
            eprintln!("SKIP: {} or its .inp/.out is missing", gguf.display());
            continue;
        };
        let tok = load(&gguf);
        // A trailing separator ends the last case; it does not start another.
        let inp = inp.strip_suffix("\n__ggml_vocab_test__\n").unwrap_or(&inp);
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let expected: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        assert_eq!(
            texts.len(),
            expected.len(),
            "{name}: .inp and .out disagree"
        );
        let mut ok = 0;
        for (text, want) in texts.iter().zip(&expected) {
            let got = tok.encode(text, false, false).unwrap();
            if &got == want {
                ok += 1;
            } else {
                failures.push(format!("{name}: {text:?}: got {got:?}, want {want:?}"));
            }
        }
        eprintln!("ggml-vocab-{name}: {ok} of {} cases match", texts.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
