//! The real `embodyd` binary serving the real SmolLM2 model over its Unix
//! socket, driven through `embody-client` and the `embody` CLI: streaming,
//! concurrency, cancellation and clients that leave mid-stream.

use std::time::{Duration, Instant};

use embody_client::{Client, ErrorCode, Event, FinishReason, Request, SamplingParams};
use embody_tests::{bin, smollm2, test_config, Daemon};

fn greedy(text: &str, max_tokens: u32) -> Request {
    Request::user(text)
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

/// Waits for the daemon to report no requests and no KV blocks in use but
/// the prefix cache's
/// (block counts are published after each step, so they may lag an event).
fn idle_soon(d: &Daemon) {
    let st = embody_tests::status(&d.socket).unwrap();
    assert_eq!((st.running, st.queued), (0, 0), "{st:?}");
    let start = Instant::now();
    loop {
        let st = embody_tests::status(&d.socket).unwrap();
        if st.kv_blocks_used == st.kv_blocks_cached {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "KV blocks still held: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next event, failing the test after 120 s instead of hanging.
async fn next(s: &mut embody_client::ChatStream) -> Event {
    tokio::time::timeout(Duration::from_secs(120), s.next())
        .await
        .expect("an event within 120 s")
        .expect("the stream has not ended")
}

/// Events up to and including the terminal one.
async fn drain(s: &mut embody_client::ChatStream) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        let ev = next(s).await;
        let end = ev.is_terminal();
        out.push(ev);
        if end {
            return out;
        }
    }
}

fn text_of(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Delta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn tokens_of(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| match e {
            Event::Delta { token_ids, .. } => token_ids.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_streams_over_the_socket_and_the_cli_shows_it() {
    let d = Daemon::start(&test_config(&smollm2(), ""));
    let client = Client::connect(&d.socket).await.unwrap();
    let mut s = client
        .chat(greedy(
            "What does a lidar sensor measure? One sentence.",
            24,
        ))
        .await
        .unwrap();
    let events = drain(&mut s).await;
    assert!(
        matches!(events[0], Event::Started { prompt_tokens } if prompt_tokens > 10),
        "{events:?}"
    );
    let deltas = events
        .iter()
        .filter(|e| matches!(e, Event::Delta { .. }))
        .count();
    assert!(deltas >= 2, "the answer arrives in pieces: {events:?}");
    let Some(Event::Finished { reason, usage }) = events.last() else {
        panic!("{events:?}")
    };
    assert!(*reason == FinishReason::Length || *reason == FinishReason::Stop);
    assert_eq!(usage.completion_tokens as usize, tokens_of(&events));
    let text = text_of(&events);
    assert!(text.split_whitespace().count() >= 3, "{text:?}");
    assert!(s.next().await.is_none(), "nothing after the terminal event");

    // The CLI, through the same socket found the same way, gives the same greedy answer.
    let out = std::process::Command::new(bin("embody"))
        .args(["chat", "What does a lidar sensor measure? One sentence."])
        .args(["--max-tokens", "24", "--temperature", "0"])
        .env("XDG_RUNTIME_DIR", d.dir.path())
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("EMBODY_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim_end(),
        text.trim_end()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{} generated", usage.completion_tokens)),
        "{stderr}"
    );

    let out = std::process::Command::new(bin("embody"))
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("ready, healthy") && stdout.contains("llama"),
        "{stdout}"
    );

    // The CLI's request reused the first one's prompt from the prefix cache
    // (and answered the same); a flush gives its blocks back.
    let st = client.status().await.unwrap();
    assert!(st.prefix_hit_tokens >= 16, "{st:?}");
    assert!(st.kv_blocks_cached > 0, "{st:?}");
    let out = std::process::Command::new(bin("embody"))
        .args(["flush-cache", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim(),
        format!("flushed {} cached KV blocks", st.kv_blocks_cached)
    );
    idle_soon(&d);
    let st = client.status().await.unwrap();
    assert_eq!((st.kv_blocks_cached, st.kv_blocks_used), (0, 0), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_are_all_served() {
    let d = Daemon::start(&test_config(
        &smollm2(),
        "[decoder]\nmax_running = 8\nmax_queued = 16\n",
    ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            // One connection per client.
            let client = Client::connect(&socket).await.unwrap();
            let q = format!("Give robot number {i} a short name.");
            let mut s = client.chat(greedy(&q, 8)).await.unwrap();
            drain(&mut s).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let events = t.await.unwrap();
        assert!(
            matches!(events[0], Event::Started { .. }),
            "client {i}: {events:?}"
        );
        match events.last() {
            Some(Event::Finished { usage, .. }) => {
                assert!(usage.completion_tokens >= 1);
                assert_eq!(
                    usage.completion_tokens as usize,
                    tokens_of(&events),
                    "client {i}"
                );
            }
            other => panic!("client {i}: {other:?}"),
        }
    }
    eprintln!(
        "16 clients served in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    idle_soon(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_ends_the_stream_and_frees_the_slot() {
    // One decoding slot: the second request can run only once the first is gone.
    let d = Daemon::start(&test_config(&smollm2(), "[decoder]\nmax_running = 1\n"));
    let client = Client::connect(&d.socket).await.unwrap();
    let mut long = client
        .chat(greedy(
            "Write a very long story about a robot that learns to paint.",
            3000,
        ))
        .await
        .unwrap();
    while !matches!(next(&mut long).await, Event::Delta { .. }) {}
    let mut waiting = client.chat(greedy("Say hello.", 6)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = embody_tests::status(&d.socket).unwrap();
    assert_eq!((st.running, st.queued), (1, 1), "{st:?}");

    let cancelled_at = Instant::now();
    long.cancel().unwrap();
    let rest = drain(&mut long).await;
    match rest.last() {
        Some(Event::Finished {
            reason: FinishReason::Cancelled,
            usage,
        }) => assert!(usage.completion_tokens < 3000),
        other => panic!("{other:?}"),
    }
    assert!(cancelled_at.elapsed() < Duration::from_secs(10));
    // The freed slot serves the waiting request.
    let events = drain(&mut waiting).await;
    assert!(matches!(events[0], Event::Started { .. }), "{events:?}");
    assert!(
        matches!(events.last(), Some(Event::Finished { reason, .. }) if *reason != FinishReason::Cancelled)
    );
    idle_soon(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_does_not_disturb_others() {
    let d = Daemon::start(&test_config(&smollm2(), "[decoder]\nmax_running = 4\n"));
    let stayer = Client::connect(&d.socket).await.unwrap();
    // Long enough to be still running when the leaver's first token comes,
    // however busy the machine.
    let mut kept = stayer
        .chat(greedy("Write a very long story about a robot arm.", 400))
        .await
        .unwrap();
    // It decodes before the leaver's request arrives, so both run at once.
    let mut early = Vec::new();
    loop {
        let ev = next(&mut kept).await;
        let delta = matches!(ev, Event::Delta { .. });
        early.push(ev);
        if delta {
            break;
        }
    }
    {
        let leaver = Client::connect(&d.socket).await.unwrap();
        let mut gone = leaver
            .chat(greedy(
                "Write a very long story about a lighthouse robot.",
                3000,
            ))
            .await
            .unwrap();
        while !matches!(next(&mut gone).await, Event::Delta { .. }) {}
        let st = embody_tests::status(&d.socket).unwrap();
        assert_eq!(st.running, 2, "{st:?}\n{}", d.log());
        // The leaver's connection closes with its request unfinished.
    }
    // The daemon notices and cancels the abandoned request.
    let start = Instant::now();
    loop {
        let st = embody_tests::status(&d.socket).unwrap();
        if st.running <= 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "abandoned request still running: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other stream runs to its end, whole.
    let mut events = early;
    events.extend(drain(&mut kept).await);
    match events.last() {
        Some(Event::Finished { usage, .. }) => {
            assert_eq!(usage.completion_tokens as usize, tokens_of(&events))
        }
        other => panic!("{other:?}"),
    }
    // And the connection keeps serving.
    let mut again = stayer.chat(greedy("Say yes.", 4)).await.unwrap();
    assert!(matches!(
        drain(&mut again).await.last(),
        Some(Event::Finished { .. })
    ));
    assert!(!d.log().contains("ERROR"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_images_are_refused_with_a_clear_error() {
    let d = Daemon::start(&test_config(&smollm2(), ""));
    let client = Client::connect(&d.socket).await.unwrap();
    let mut req = greedy("What is in this picture?", 8);
    req.images.push(embody_client::Image {
        media_type: "image/png".into(),
        data: vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a],
    });
    let mut s = client.chat(req).await.unwrap();
    match drain(&mut s).await.as_slice() {
        [Event::Error {
            code: ErrorCode::VisionUnsupported,
            message,
        }] => assert!(message.contains("no vision support"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_model_without_a_chat_template_answers_like_embody_generate() {
    // Gemma 3's GGUF carries no chat template: both the daemon and the CLI
    // fall back to the architecture's standard one, so greedy answers agree.
    let gemma = embody_tests::model("gemma-3-270m-q4_k_m.gguf");
    let d = Daemon::start(&test_config(&gemma, ""));
    let prompt = "Name a robot sensor.";
    let daemon = std::process::Command::new(bin("embody"))
        .args([
            "chat",
            prompt,
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--socket",
        ])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(
        daemon.status.success(),
        "{}",
        String::from_utf8_lossy(&daemon.stderr)
    );
    let cli = std::process::Command::new(bin("embody"))
        .args([
            "generate",
            "--chat",
            "-p",
            prompt,
            "-n",
            "12",
            "--temperature",
            "0",
            "-t",
            "2",
            "-m",
        ])
        .arg(&gemma)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let (a, b) = (
        String::from_utf8_lossy(&daemon.stdout),
        String::from_utf8_lossy(&cli.stdout),
    );
    assert!(!a.trim().is_empty());
    assert_eq!(a.trim_end(), b.trim_end());
    assert!(
        d.log().contains("using the standard gemma3 template"),
        "{}",
        d.log()
    );
}
