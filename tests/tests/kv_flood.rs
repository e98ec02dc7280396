//! A flood of long requests against a small KV pool (`kv_cache_mb = 8`, about
//! 350 tokens of SmolLM2): every request ends, with an answer or a clear
//! error (too long for the pool, or the queue is full), and the daemon's
//! resident memory grows by no more than the pool's budget and scratch.

use std::time::{Duration, Instant};

use embody_client::{Client, ErrorCode, Event, Request, SamplingParams};
use embody_tests::{smollm2, Daemon};

const KV_MB: u64 = 8;

fn long_request(i: usize, sentences: usize, max_tokens: u32) -> Request {
    let text = format!("Robot {i} reports: ")
        + &"the lidar sees a pallet two metres ahead and the left camera sees a person. "
            .repeat(sentences)
        + "What should the robot do?";
    Request::user(text)
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_long_requests_ends_every_request_within_the_kv_budget() {
    let config = format!(
        "[model]\npath = \"{}\"\nthreads = 2\n\n[cache]\nkv_cache_mb = {KV_MB}\n\n\
         [decoder]\nmax_running = 4\nmax_queued = 6\n",
        smollm2().display()
    );
    let d = Daemon::start(&config);
    let client = Client::connect(&d.socket).await.unwrap();
    // One short request first: the weights are mapped from the file and count
    // as resident only once a forward pass has read them.
    let mut s = client.chat(long_request(0, 1, 4)).await.unwrap();
    while s.next().await.is_some() {}
    let idle = client.status().await.unwrap();
    assert!(idle.kv_blocks_total <= 24, "{idle:?}");

    // A prompt longer than the whole pool is refused, clearly.
    let mut s = client.chat(long_request(99, 40, 8)).await.unwrap();
    match s.next().await {
        Some(Event::Error { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            assert!(message.contains("exceeds the KV cache"), "{message}");
        }
        other => panic!("a too-long prompt was not refused: {other:?}"),
    }

    // 12 clients at once: most prompts take 100-200 tokens and generate 32
    // more (two such sequences overfill the pool), every sixth is longer
    // than the whole pool.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let socket = d.socket.clone();
        let sentences = if i % 6 == 5 { 40 } else { 6 + i % 7 };
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&socket).await.unwrap();
            let mut s = client.chat(long_request(i, sentences, 32)).await.unwrap();
            let mut last = None;
            let deadline = Instant::now() + Duration::from_secs(300);
            while let Some(ev) = tokio::time::timeout_at(deadline.into(), s.next())
                .await
                .expect("the request ended in time")
            {
                last = Some(ev);
            }
            last
        }));
    }
    // Resident memory while the flood runs.
    let mut peak = idle.rss_bytes;
    while tasks.iter().any(|t| !t.is_finished()) {
        let st = client.status().await.unwrap();
        peak = peak.max(st.rss_bytes);
        assert!(st.kv_blocks_used <= st.kv_blocks_total, "{st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut answered, mut too_long, mut overloaded) = (0, 0, 0);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Some(Event::Finished { .. }) => answered += 1,
            Some(Event::Error { code, message }) => match code {
                ErrorCode::BadRequest if message.contains("exceeds the KV cache") => too_long += 1,
                ErrorCode::Overloaded => overloaded += 1,
                other => panic!("client {i}: unexpected {other}: {message}"),
            },
            other => panic!("client {i}: no terminal event: {other:?}"),
        }
    }
    // The long ones are refused as too long, or as overloaded when the queue
    // was full before they reached the decoder.
    assert_eq!(answered + too_long + overloaded, 12);
    assert!(
        answered >= 6 && too_long + overloaded >= 2,
        "answered {answered}, too long {too_long}, overloaded {overloaded}"
    );
    // The pool's memory plus room for scratch and buffers, never more.
    let grown = peak.saturating_sub(idle.rss_bytes) >> 20;
    assert!(
        grown <= KV_MB + 48,
        "resident memory grew by {grown} MiB under a {KV_MB} MiB KV budget"
    );
    let st = client.status().await.unwrap();
    assert!(st.ready && st.healthy, "{st:?}");
    assert_eq!((st.running, st.queued), (0, 0), "{st:?}");
}
