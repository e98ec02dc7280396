//! Replays the tokenizer and chat template fuzz corpora
//! (`fuzz/corpus/{tokenizer,chat_template}`) through the fuzz targets'
//! bodies, with every truncation and single-byte corruption of each input.
//! Nothing may panic, and the tokenizer's properties (round trip, no control
//! token from message text) must hold on all of them.

use std::path::PathBuf;

use embody_engine::fuzzing;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let files: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!files.is_empty(), "{} holds seeds", dir.display());
    files
}

fn variants(seed: &[u8], each: &mut dyn FnMut(&[u8])) {
    each(seed);
    for cut in 0..seed.len() {
        each(&seed[..cut]);
    }
    for i in 0..seed.len() {
        for v in [0x00, 0x22, 0x3c, 0x7f, 0x80, 0xff] {
            let mut m = seed.to_vec();
            m[i] = v;
            each(&m);
        }
    }
}

#[test]
fn the_tokenizer_corpus_keeps_its_properties() {
    for seed in corpus("tokenizer") {
        variants(&seed, &mut |b| fuzzing::tokenizer(b));
    }
}

#[test]
fn the_chat_template_corpus_renders_or_errs() {
    for seed in corpus("chat_template") {
        variants(&seed, &mut |b| fuzzing::chat_template(b));
    }
}
