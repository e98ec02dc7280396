//! Replays the GGUF fuzz corpus (`fuzz/corpus/gguf`) through the fuzz target's
//! body, plus deterministic mutations of a valid tiny model: truncations and
//! byte corruptions at every region of the file. Nothing may panic.

mod common;

use embody_engine::fuzzing::gguf as exercise;

#[test]
fn corpus_replays_without_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/gguf exists") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        exercise(&bytes);
        n += 1;
    }
    assert!(n > 0, "the corpus is empty");
}

#[test]
fn valid_tiny_model_parses_and_loads() {
    assert!(exercise(&common::tiny_llama_gguf(1)));
}

#[test]
fn truncations_and_corruptions_never_panic() {
    let good = common::tiny_llama_gguf(1);
    // Every truncation point in the header and metadata, then a stride through the data.
    let header_end = 4096.min(good.len());
    for len in (0..header_end).chain((header_end..good.len()).step_by(997)) {
        assert!(!exercise(&good[..len]) || len == good.len());
    }
    // Corrupt single bytes and 8-byte words with values that hit the edge cases.
    let mut rng = 0x2545F4914F6CDD1Du64;
    for i in 0..3000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut bad = good.clone();
        let at = (rng as usize) % header_end;
        match i % 3 {
            0 => bad[at] ^= (rng >> 32) as u8 | 1,
            1 => {
                let end = (at + 8).min(bad.len());
                bad[at..end].fill(0xff);
            }
            _ => {
                let end = (at + 8).min(bad.len());
                let v = ((rng >> 20) % 70000).to_le_bytes();
                bad[at..end].copy_from_slice(&v[..end - at]);
            }
        }
        exercise(&bad);
    }
}

/// Writes the corpus seeds: run with `cargo test -p embody-engine --test gguf_fuzz_replay -- --ignored`.
#[test]
#[ignore]
fn write_corpus_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let good = common::tiny_llama_gguf(1);
    std::fs::write(dir.join("tiny-llama.gguf"), &good).unwrap();
    std::fs::write(dir.join("tiny-llama-head.gguf"), &good[..2048]).unwrap();
    std::fs::write(dir.join("magic-only.gguf"), b"GGUF\x03\x00\x00\x00").unwrap();
}
