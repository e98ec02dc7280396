//! Replays the image fuzz corpus (`fuzz/corpus/image`: small PNG and JPEG
//! files, RGB, RGBA and grey, and a JPEG the fuzzer found whose resized size
//! passes `max_pixels`) through the fuzz target's body, plus
//! deterministic mutations of each seed: truncations and corrupted bytes
//! across the header and the data. Nothing may panic, and the unmodified
//! seeds must decode.

use embody_engine::fuzzing::image as exercise;

#[test]
fn seeds_decode_and_mutations_never_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/image");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/image exists")
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 4, "PNG and JPEG seeds");
    let mut decoded = 0;
    for p in &seeds {
        let bytes = std::fs::read(p).unwrap();
        // Fuzzer-found inputs may be junk; the named seeds must decode.
        if p.extension().is_some_and(|e| e == "png" || e == "jpg") {
            assert!(exercise(&bytes), "{} does not decode", p.display());
            decoded += 1;
        }
        for cut in (0..bytes.len()).step_by(7) {
            exercise(&bytes[..cut]);
        }
        for i in (0..bytes.len()).step_by(5) {
            let mut b = bytes.clone();
            b[i] ^= 0xa5;
            exercise(&b);
            b[i] = 0xff;
            exercise(&b);
        }
    }
    assert!(decoded >= 5);
}
