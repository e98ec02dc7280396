//! Replays the camera and zenoh chat payload fuzz corpora
//! (`fuzz/corpus/{camera,zenoh_chat}`) through the fuzz targets' bodies,
//! with every truncation and single-byte corruption of each input. Nothing
//! may panic; accepted frames decode, accepted requests read back.

use std::path::PathBuf;

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
        for v in [0x00, 0x22, 0x7f, 0x80, 0xff] {
            let mut m = seed.to_vec();
            m[i] = v;
            each(&m);
        }
    }
}

#[test]
fn the_camera_corpus_is_decoded_or_refused() {
    for seed in corpus("camera") {
        variants(&seed, &mut embody_robot_adapters::camera::decode::exercise);
    }
}

#[test]
fn the_zenoh_chat_corpus_is_read_or_refused() {
    for seed in corpus("zenoh_chat") {
        variants(&seed, &mut embody_robot_adapters::chat::exercise);
    }
}
