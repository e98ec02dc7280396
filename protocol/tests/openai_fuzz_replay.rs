//! Replays the OpenAI request fuzz corpus (`fuzz/corpus/openai_request`)
//! through the fuzz target's body, plus every truncation and byte flips of
//! each seed: nothing may panic, and the seeds that should be accepted are.

use std::path::PathBuf;

use embody_protocol::openai::exercise;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/openai_request");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/openai_request exists")
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn seeds_are_judged_as_intended() {
    let seeds = corpus();
    assert!(seeds.len() >= 7, "the corpus is missing seeds");
    for (name, bytes) in &seeds {
        let accepted = exercise(bytes);
        assert_eq!(accepted, !name.contains("bad"), "{name}");
    }
}

#[test]
fn truncations_and_corruptions_never_panic() {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for (_, bytes) in corpus() {
        for n in 0..bytes.len() {
            exercise(&bytes[..n]);
        }
        for _ in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng as usize) % b.len();
                b[at] = (rng >> 32) as u8;
            }
            exercise(&b);
        }
    }
}
