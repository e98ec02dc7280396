//! `embody quantize` on the real SmolLM2 file, checked with gguf-py (llama.cpp's
//! own GGUF reader and quantizer): every tensor gguf-py can write is byte for
//! byte what it writes from the same values, the K-quant tensors dequantize
//! close to the source, the types per tensor follow llama-quantize's recipe,
//! and the requantized model's perplexity stays next to the source's.

use std::path::Path;
use std::process::Command;

use embody_tests::{embody, repo_root, smollm2, test_python, TempDir};

fn quantize(out: &Path, ty: &str) {
    let o = embody(&[
        "quantize",
        "-m",
        smollm2().to_str().unwrap(),
        "-t",
        ty,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn gguf_check(ours: &Path) -> serde_json::Value {
    let out = Command::new(test_python())
        .arg(repo_root().join("tests/python/gguf_check.py"))
        .arg(smollm2())
        .arg(ours)
        .output()
        .expect("running gguf_check.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn perplexity(model: &Path) -> f64 {
    embody_tests::perplexity(model, 2, &[])
}

#[test]
fn requantized_files_are_what_llama_cpp_writes_and_keep_their_perplexity() {
    let dir = TempDir::new("embody-quantize");
    let q8 = dir.path().join("smol-q8_0.gguf");
    let q4km = dir.path().join("smol-q4_k_m.gguf");
    quantize(&q8, "Q8_0");
    quantize(&q4km, "q4_k_m");

    let c = gguf_check(&q8);
    assert_eq!(c["file_type"], 7, "LLAMA_FTYPE_MOSTLY_Q8_0");
    assert_eq!(c["checked"], 272, "every tensor is Q8_0 or F32");
    assert_eq!(c["exact"], c["checked"], "byte for byte gguf-py's Q8_0");

    let c = gguf_check(&q4km);
    assert_eq!(c["file_type"], 15, "LLAMA_FTYPE_MOSTLY_Q4_K_M");
    let ty = |name: &str| c["types"][name].as_str().unwrap().to_string();
    // SmolLM2's 576-wide rows are not whole 256-value super-blocks: they
    // fall back (Q4_K to Q5_0, Q6_K to Q8_0); its 1536-wide down projections
    // take Q6_K in the layers llama.cpp gives more bits (the first and last
    // eighth, and every third between), Q4_K in the others.
    assert_eq!(ty("token_embd.weight"), "Q8_0");
    assert_eq!(ty("blk.0.attn_q.weight"), "Q5_0");
    assert_eq!(ty("blk.0.attn_v.weight"), "Q8_0");
    assert_eq!(ty("blk.0.ffn_down.weight"), "Q6_K");
    for (layer, want) in [
        (1, "Q6_K"),
        (2, "Q6_K"),
        (3, "Q4_K"),
        (5, "Q6_K"),
        (10, "Q4_K"),
        (11, "Q6_K"),
        (27, "Q6_K"),
    ] {
        assert_eq!(
            ty(&format!("blk.{layer}.ffn_down.weight")),
            want,
            "layer {layer}"
        );
    }
    assert_eq!(ty("blk.0.attn_norm.weight"), "F32");
    assert_eq!(
        c["exact"], c["checked"],
        "byte for byte gguf-py's Q5_0 and Q8_0"
    );
    for (k, bound) in [("Q4_K", 0.05), ("Q6_K", 0.03)] {
        let e = c["worst_relative_rms"][k].as_f64().unwrap();
        assert!(e < bound, "{k}: relative RMS error {e}");
    }

    let base = perplexity(&smollm2());
    let p8 = perplexity(&q8);
    let p4 = perplexity(&q4km);
    assert!(
        (p8 / base - 1.0).abs() < 0.01,
        "Q8_0 {p8} against the source's {base}"
    );
    assert!(p4 / base < 1.08, "Q4_K_M {p4} against the source's {base}");
}

#[test]
fn quantize_refuses_what_it_cannot_do_by_name() {
    let dir = TempDir::new("embody-quantize");
    let out = dir.path().join("x.gguf");
    let o = embody(&[
        "quantize",
        "-m",
        smollm2().to_str().unwrap(),
        "-t",
        "Q3_K",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown quantization \"Q3_K\"") && err.contains("Q4_K_S"),
        "{err}"
    );
    let folder = repo_root().join("tests/fixtures/hf/llama");
    let o = embody(&[
        "quantize",
        "-m",
        folder.to_str().unwrap(),
        "-t",
        "Q8_0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is a folder"), "{err}");
    assert!(!out.exists());
}
