//! `embody bench --json` on SmolLM2: the bytes a decode step reads match what
//! the file holds (every weight matrix once, the tied embedding as the output
//! matrix, plus the KV cache), and the machine's read bandwidth is measured
//! beside it.

use embody_engine::gguf::Gguf;
use embody_tests::{embody, smollm2};

#[test]
fn bench_reports_the_bytes_decode_reads_and_the_wall() {
    let path = smollm2();
    let out = embody(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-t",
        "2",
        "-p",
        "64",
        "-n",
        "8",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = Gguf::open_mapped(&path).unwrap();
    let file: usize = g.tensors().iter().map(|t| t.size).sum();
    let per_token = v["decode_bytes_per_token"].as_f64().unwrap();
    // Norm vectors are not counted and one embedding row is; the KV of 64
    // to 72 positions is about 0.1 MB.
    assert!(
        per_token > 0.97 * file as f64 && per_token < 1.03 * file as f64,
        "{per_token} bytes per token for {file} bytes of tensors"
    );
    let reached = v["decode_bytes_per_s"].as_f64().unwrap();
    let decode = v["decode_tok_s"].as_f64().unwrap();
    assert!((reached - per_token * decode).abs() < 1e-6 * reached, "{v}");
    let wall = v["read_bandwidth_bytes_per_s"].as_f64().unwrap();
    assert!(wall > 1e8, "{v}");
}
