//! Replays the CDR fuzz corpus (`fuzz/corpus/cdr`) through the fuzz target's
//! body, plus every truncation and single-byte corruption of the seeds.
//! Nothing may panic.

use std::path::PathBuf;

use embody_robot_adapters::ros2::msgs::{
    exercise, write_compressed_image, write_image, write_string, CompressedImage, Header, Image,
};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cdr")
}

/// The seed messages of the corpus, by file name.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let header = Header {
        sec: 1_700_000_000,
        nanosec: 42,
        frame_id: "camera_optical",
    };
    let px: Vec<u8> = (0..4 * 3 * 2).map(|i| i as u8).collect();
    vec![
        ("string.bin", write_string("Is the door open?")),
        ("string-empty.bin", write_string("")),
        (
            "image-rgb8.bin",
            write_image(&Image {
                header: header.clone(),
                height: 2,
                width: 4,
                encoding: "rgb8",
                is_bigendian: 0,
                step: 12,
                data: &px,
            }),
        ),
        (
            "compressed-png.bin",
            write_compressed_image(&CompressedImage {
                header,
                format: "png",
                data: b"\x89PNG\r\n\x1a\n",
            }),
        ),
    ]
}

#[test]
fn corpus_replays_without_panic() {
    let mut n = 0;
    for entry in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus/cdr exists") {
        exercise(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= seeds().len(), "the corpus holds the seeds");
}

/// The seeds in the corpus are the current encoding of their messages.
#[test]
fn corpus_seeds_match_the_current_encoding() {
    for (name, bytes) in seeds() {
        let path = corpus_dir().join(name);
        if std::env::var_os("EMBODY_WRITE_SEEDS").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (EMBODY_WRITE_SEEDS=1 writes the seeds)",
                path.display()
            )
        });
        assert_eq!(stored, bytes, "{name}");
    }
}

#[test]
fn every_truncation_and_corruption_of_the_seeds_is_handled() {
    for (_, seed) in seeds() {
        for cut in 0..seed.len() {
            exercise(&seed[..cut]);
        }
        for i in 0..seed.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut m = seed.clone();
                m[i] = v;
                exercise(&m);
            }
        }
    }
}
