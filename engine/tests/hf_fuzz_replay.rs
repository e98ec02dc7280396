//! Replays the Hugging Face fuzz corpus (`fuzz/corpus/hf`: config.json, a zero
//! byte, then a safetensors file) through the fuzz target's body, plus
//! deterministic mutations of each seed: truncations, corrupted bytes in the
//! safetensors header and data, and edited config values. Nothing may panic,
//! and the unmodified seeds must load.

use std::sync::Arc;

use embody_engine::backend::cpu::CpuBackend;
use embody_engine::fuzzing::hf as exercise;
use embody_engine::hf::HfFolder;
use embody_engine::models::{load_hf, LoadOptions};

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/hf");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/hf exists")
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn corpus_seeds_parse_and_load() {
    let seeds = seeds();
    assert!(seeds.len() >= 4, "one seed per family");
    for (name, bytes) in &seeds {
        assert!(exercise(bytes), "{name} does not parse");
        let split = bytes.iter().position(|&b| b == 0).unwrap();
        let f = HfFolder::from_bytes("seed", &bytes[..split], bytes[split + 1..].to_vec()).unwrap();
        let m = load_hf(&f, Arc::new(CpuBackend::new(1)), LoadOptions::default());
        assert!(m.is_ok(), "{name}: {}", m.err().unwrap());
    }
}

#[test]
fn truncations_and_corruptions_never_panic() {
    for (_, good) in seeds() {
        let split = good.iter().position(|&b| b == 0).unwrap();
        // Truncations through the config, the safetensors header and the data.
        for cut in (0..good.len()).step_by(97) {
            exercise(&good[..cut]);
        }
        // Corrupted bytes: every byte of the size field and the header's start,
        // then a stride through the rest.
        let positions = (split + 1..split + 64).chain((split + 64..good.len()).step_by(61));
        for (i, at) in positions.filter(|&at| at < good.len()).enumerate() {
            let mut bad = good.clone();
            bad[at] ^= [0xff, 0x01, 0x80, 0x20][i % 4];
            exercise(&bad);
        }
        // Config values swapped for others of the wrong type or size.
        let config = String::from_utf8(good[..split].to_vec()).unwrap();
        for (from, to) in [
            ("\"hidden_size\": 8", "\"hidden_size\": 0"),
            ("\"hidden_size\": 8", "\"hidden_size\": 4096"),
            ("\"num_attention_heads\": 2", "\"num_attention_heads\": 3"),
            ("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 0"),
            ("\"vocab_size\": 16", "\"vocab_size\": 18446744073709551615"),
            ("\"intermediate_size\": 16", "\"intermediate_size\": -1"),
            ("\"num_hidden_layers\": 1", "\"num_hidden_layers\": 100000"),
            (
                "\"sliding_window\": 4",
                "\"sliding_window\": 18446744073709551615",
            ),
            ("\"head_dim\"", "\"head_dimension\""),
            ("CausalLM", "Unknown"),
        ] {
            let mut bad = config.replace(from, to).into_bytes();
            bad.extend_from_slice(&good[split..]);
            exercise(&bad);
        }
    }
}
