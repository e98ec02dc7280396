//! Replays the IPC frame fuzz corpus (`fuzz/corpus/ipc_frame`) through the fuzz
//! target's body, plus deterministic mutations of valid frames: every
//! truncation and byte corruptions all over the header and metadata. Nothing
//! may panic, and every frame that decodes must survive a round trip.

use std::path::PathBuf;

use embody_protocol::wire::{encode, exercise, Frame};
use embody_protocol::{ErrorCode, Event, Fault, FinishReason, Image, Message, Request, Usage};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ipc_frame")
}

/// The seed frames of the corpus, by file name.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut chat = Request::new(vec![
        Message::system("be brief"),
        Message::user("what do you see?"),
    ]);
    chat.id = 1;
    chat.max_tokens = Some(32);
    chat.stop = vec!["\n".into()];
    chat.tools = Some(serde_json::json!([{"type": "function", "function": {"name": "grip"}}]));
    chat.images.push(Image {
        media_type: "image/png".into(),
        data: b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
    });
    let frames = [
        ("chat-image.bin", Frame::Chat(chat)),
        ("chat-plain.bin", Frame::Chat(Request::user("hello"))),
        ("cancel.bin", Frame::Cancel { id: 1 }),
        ("status.bin", Frame::Status { id: 2 }),
        (
            "fault.bin",
            Frame::Fault {
                id: 3,
                fault: Fault::WedgeDecoder { ms: 100 },
            },
        ),
        (
            "event-delta.bin",
            Frame::Event {
                id: 1,
                event: Event::Delta {
                    text: "Hi \u{1F916}".into(),
                    token_ids: vec![17, 4],
                    logprobs: Vec::new(),
                },
            },
        ),
        (
            "event-finished.bin",
            Frame::Event {
                id: 1,
                event: Event::Finished {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: 9,
                        completion_tokens: 32,
                    },
                },
            },
        ),
        (
            "event-error.bin",
            Frame::Event {
                id: 1,
                event: Event::error(ErrorCode::DecoderRestarted, "decoder restarted"),
            },
        ),
        (
            "status-reply.bin",
            Frame::StatusReply {
                id: 2,
                status: Box::default(),
            },
        ),
        ("flush-cache.bin", Frame::FlushCache { id: 5 }),
        (
            "flush-reply.bin",
            Frame::FlushReply {
                id: 5,
                blocks: 12,
                error: None,
            },
        ),
    ];
    frames
        .into_iter()
        .map(|(name, f)| (name, encode(&f).unwrap()))
        .collect()
}

#[test]
fn corpus_replays_without_panic() {
    let mut n = 0;
    for entry in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus/ipc_frame exists") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        exercise(&bytes);
        n += 1;
    }
    assert!(n > 0, "the corpus is empty");
}

/// The seeds in the corpus are the current encoding of their frames. After a
/// deliberate change of the format, rewrite them with
/// `EMBODY_BLESS=1 cargo test -p embody-protocol --test wire_fuzz_replay`.
#[test]
fn corpus_seeds_match_the_current_encoding() {
    let bless = std::env::var_os("EMBODY_BLESS").is_some();
    for (name, bytes) in seeds() {
        let path = corpus_dir().join(name);
        if bless {
            std::fs::create_dir_all(corpus_dir()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(on_disk, bytes, "{name} differs from the current encoding");
        assert!(exercise(&bytes), "{name} decodes");
    }
}

#[test]
fn truncations_and_corruptions_never_panic() {
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (name, good) in seeds() {
        for len in 0..good.len() {
            assert!(!exercise(&good[..len]), "{name} truncated to {len} decoded");
        }
        for i in 0..2000 {
            let mut bad = good.clone();
            let r = next();
            let at = (r as usize) % bad.len();
            match i % 4 {
                0 => bad[at] ^= (r >> 32) as u8 | 1,
                1 => bad[at] = b"{}[]\",:0-e9\\"[(r >> 40) as usize % 12],
                2 => {
                    let end = (at + 4).min(bad.len());
                    bad[at..end].fill(0xff);
                }
                _ => bad.truncate(at),
            }
            exercise(&bad);
        }
    }
}
