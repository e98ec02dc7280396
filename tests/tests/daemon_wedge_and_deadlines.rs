//! A decoder that stops making progress is replaced in-process after
//! `supervisor.stall_timeout_ms`: the requests it held end with
//! `decoder_restarted`, queued ones complete on the new decoder, long before
//! the wedge itself would have ended. And deadlines: a request's own
//! `timeout_ms` and the daemon's `decoder.request_timeout_ms` end a request
//! (running or still queued) with a `timeout` error, on the socket and over
//! HTTP (504), while the daemon serves on.

use std::time::{Duration, Instant};

use embody_client::{Client, ErrorCode, Event, Fault, Request, SamplingParams};
use embody_tests::{http_post, smollm2, test_config, Daemon};

const LONG: &str = "Count from 1 to 1000, one number per line.";

fn greedy(text: &str, max_tokens: u32) -> Request {
    Request::user(text)
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

async fn next(s: &mut embody_client::ChatStream) -> Event {
    tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("an event within 60 s: a request hangs")
        .expect("the stream has not ended")
}

async fn terminal(s: &mut embody_client::ChatStream) -> Event {
    loop {
        let ev = next(s).await;
        if ev.is_terminal() {
            return ev;
        }
    }
}

fn code(ev: &Event) -> Option<ErrorCode> {
    match ev {
        Event::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_decoder_is_replaced_in_process() {
    let config = test_config(
        &smollm2(),
        "[decoder]\nmax_running = 2\n\n[supervisor]\nstall_timeout_ms = 2000\nrestart_backoff_ms = 50\n\n[testing]\nfault_injection = true\n",
    );
    let d = Daemon::start(&config);
    let client = Client::connect(&d.socket).await.unwrap();
    let mut running = Vec::new();
    for _ in 0..2 {
        let mut s = client.chat(greedy(LONG, 2000)).await.unwrap();
        while !matches!(next(&mut s).await, Event::Delta { .. }) {}
        running.push(s);
    }
    client
        .inject_fault(Fault::WedgeDecoder { ms: 20_000 })
        .await
        .unwrap();
    let wedged_at = Instant::now();
    let mut queued = Vec::new();
    for _ in 0..2 {
        queued.push(client.chat(greedy("Say hello.", 8)).await.unwrap());
    }
    for s in &mut running {
        let ev = terminal(s).await;
        assert_eq!(code(&ev), Some(ErrorCode::DecoderRestarted), "{ev:?}");
        let Event::Error { message, .. } = ev else {
            unreachable!()
        };
        assert!(message.contains("stall_timeout_ms"), "{message}");
    }
    for s in &mut queued {
        let ev = terminal(s).await;
        assert!(matches!(ev, Event::Finished { .. }), "{ev:?}");
    }
    assert!(
        wedged_at.elapsed() < Duration::from_secs(10),
        "recovery took {:?}: it waited for the wedge",
        wedged_at.elapsed()
    );
    let st = client.status().await.unwrap();
    assert!(st.healthy && st.ready, "{st:?}");
    assert_eq!(st.decoder_restarts, 1, "{st:?}");
    assert!(d.log().contains("replacing it"), "{}", d.log());
}

/// A non-streamed HTTP chat with `timeout_ms`: the status line and body.
fn http_chat(d: &Daemon, model: &str, timeout_ms: u64) -> String {
    let addr = d.http_url().trim_start_matches("http://").to_string();
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": LONG}],
        "max_tokens": 2000,
        "temperature": 0,
        "timeout_ms": timeout_ms,
    })
    .to_string();
    http_post(&addr, "/v1/chat/completions", &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_running_and_queued_requests() {
    // Requests that cannot finish in time: the decoder is wedged (for less
    // than the stall timeout, so it is not replaced) while they run or wait.
    // SmolLM2 counts on for thousands of tokens, so the running request is
    // still running when the wedge strikes, however late the fault arrives.
    let config = test_config(
        &smollm2(),
        "[decoder]\nmax_running = 1\nrequest_timeout_ms = 3000\n\n[testing]\nfault_injection = true\n",
    );
    let d = Daemon::start(&config);
    let client = Client::connect(&d.socket).await.unwrap();
    // A first request warms the model's pages, so that the timed one
    // starts at once even on a busy machine.
    let mut warm = client.chat(greedy("Say hello.", 2)).await.unwrap();
    assert!(matches!(terminal(&mut warm).await, Event::Finished { .. }));

    // Its own deadline, while it runs.
    let t = Instant::now();
    let mut s = client
        .chat(greedy(LONG, 2000).timeout(Duration::from_millis(2000)))
        .await
        .unwrap();
    loop {
        match next(&mut s).await {
            Event::Delta { .. } => break,
            ev if ev.is_terminal() => panic!("ended before its first token: {ev:?}"),
            _ => {}
        }
    }
    client
        .inject_fault(Fault::WedgeDecoder { ms: 8000 })
        .await
        .unwrap();
    // A request waiting behind it (one slot) past its own deadline.
    let mut waiting = client
        .chat(greedy("Say hello.", 8).timeout(Duration::from_millis(300)))
        .await
        .unwrap();
    // And one with no deadline of its own: the daemon's.
    let mut plain = client.chat(greedy("Say hello.", 8)).await.unwrap();
    let ev = terminal(&mut waiting).await;
    assert_eq!(code(&ev), Some(ErrorCode::Timeout), "{ev:?}");
    assert!(format!("{ev:?}").contains("300 ms"), "{ev:?}");
    let ev = terminal(&mut s).await;
    assert_eq!(code(&ev), Some(ErrorCode::Timeout), "{ev:?}");
    assert!(format!("{ev:?}").contains("2000 ms"), "{ev:?}");
    let ev = terminal(&mut plain).await;
    assert_eq!(code(&ev), Some(ErrorCode::Timeout), "{ev:?}");
    assert!(format!("{ev:?}").contains("3000 ms"), "{ev:?}");
    assert!(
        t.elapsed() < Duration::from_millis(7000),
        "the deadlines waited for the wedge: {:?}",
        t.elapsed()
    );

    // Over HTTP: 504 with the `timeout` code.
    let r = http_chat(&d, "SmolLM2-135M-Instruct.Q4_1.gguf", 300);
    assert!(r.starts_with("HTTP/1.1 504 "), "{r}");
    assert!(r.contains("\"code\":\"timeout\""), "{r}");

    // The wedge ends; the daemon serves on, nothing left running.
    tokio::time::sleep_until((t + Duration::from_millis(8500)).into()).await;
    let mut s = client.chat(greedy("Say hello.", 4)).await.unwrap();
    assert!(matches!(terminal(&mut s).await, Event::Finished { .. }));
    let st = client.status().await.unwrap();
    assert_eq!((st.running, st.queued), (0, 0), "{st:?}");
    assert_eq!(d.requests_total("http", "timeout"), 1);
    assert_eq!(d.requests_total("ipc", "timeout"), 3);
}
