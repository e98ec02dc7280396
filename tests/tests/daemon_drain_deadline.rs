//! SIGTERM with more work in flight than the drain deadline allows: every
//! request on every door (the Unix socket, HTTP streaming, zenoh queries and
//! zenoh published requests) still ends with a terminal event — `finished`, or
//! an `unavailable` error for what the deadline cut — before the daemon closes
//! its doors and exits 0.

use std::time::{Duration, Instant};

use embody_client::{Client, ErrorCode, Event, Request};
use embody_tests::{free_port, http_post, smollm2, test_config, zenoh_session, Daemon};

const PER_DOOR: usize = 16;
const PROMPT: &str = "Write a very long story about a robot that explores the sea.";
const PREFIX: &str = "embody/drain";

/// How one request ended.
#[derive(Debug, PartialEq)]
enum End {
    Finished,
    Unavailable,
    /// No terminal event, or another error: what must not happen.
    Lost(String),
}

fn end_of(ev: Option<&Event>) -> End {
    match ev {
        Some(Event::Finished { .. }) => End::Finished,
        Some(Event::Error {
            code: ErrorCode::Unavailable,
            ..
        }) => End::Unavailable,
        other => End::Lost(format!("{other:?}")),
    }
}

async fn over_socket(socket: std::path::PathBuf, started: tokio::sync::mpsc::Sender<()>) -> End {
    let client = Client::connect(&socket).await.unwrap();
    let mut s = client
        .chat(Request::user(PROMPT).max_tokens(400))
        .await
        .unwrap();
    let mut last = None;
    let mut first = true;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(60), s.next()).await {
        if first {
            first = false;
            let _ = started.send(()).await;
        }
        let terminal = ev.is_terminal();
        last = Some(ev);
        if terminal {
            break;
        }
    }
    end_of(last.as_ref())
}

/// A streamed chat over HTTP, read to the end of the response.
fn over_http(addr: String) -> End {
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 400,
        "stream": true,
    })
    .to_string();
    let out = http_post(&addr, "/v1/chat/completions", &body);
    // A chunked body that ended properly, its last event [DONE].
    let whole = out.ends_with("\r\n0\r\n\r\n") && out.contains("data: [DONE]");
    if out.starts_with("HTTP/1.1 503 ") && out.contains("unavailable") {
        return End::Unavailable;
    }
    match (whole, out.contains("\"code\":\"unavailable\"")) {
        (false, _) => End::Lost(
            out.chars()
                .rev()
                .take(300)
                .collect::<String>()
                .chars()
                .rev()
                .collect(),
        ),
        (true, true) => End::Unavailable,
        (true, false) if out.contains("\"finish_reason\":\"") => End::Finished,
        (true, false) => End::Lost("no finish reason".into()),
    }
}

fn request_json(id: Option<usize>) -> String {
    let mut v = serde_json::json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 400,
    });
    if let Some(id) = id {
        v["id"] = format!("drain-{id}").into();
    }
    v.to_string()
}

/// A chat query; the replies are read until zenoh ends the query.
async fn over_zenoh_query(s: zenoh::Session) -> End {
    let replies = s
        .get(format!("{PREFIX}/chat"))
        .payload(request_json(None))
        .consolidation(zenoh::query::ConsolidationMode::None)
        .timeout(Duration::from_secs(60))
        .await
        .unwrap();
    let mut last = None;
    while let Ok(reply) = replies.recv_async().await {
        match reply.result() {
            Ok(sample) => last = serde_json::from_slice(&sample.payload().to_bytes()).ok(),
            Err(e) => return End::Lost(format!("an error reply: {e:?}")),
        }
    }
    end_of(last.as_ref())
}

/// A request published with an id; its events are read from its responses key.
async fn over_zenoh_topic(s: zenoh::Session, id: usize) -> End {
    let sub = s
        .declare_subscriber(format!("{PREFIX}/responses/drain-{id}"))
        .await
        .unwrap();
    s.put(format!("{PREFIX}/requests"), request_json(Some(id)))
        .await
        .unwrap();
    let mut last: Option<Event> = None;
    while let Ok(Ok(sample)) = tokio::time::timeout(Duration::from_secs(30), sub.recv_async()).await
    {
        let ev: Event = serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
        let terminal = ev.is_terminal();
        last = Some(ev);
        if terminal {
            break;
        }
    }
    end_of(last.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_past_the_deadline_ends_every_request_on_every_door() {
    let test_port = free_port();
    let daemon_port = free_port();
    let config = test_config(
        &smollm2(),
        &format!(
            "[decoder]\nmax_running = 8\n\n[service]\ndrain_timeout_ms = 300\n\n\
             [zenoh]\nlisten = [\"tcp/127.0.0.1:{daemon_port}\"]\nconnect = [\"tcp/127.0.0.1:{test_port}\"]\nnode = \"drain\"\n"
        ),
    );
    let s = zenoh_session("peer", Some(test_port), None).await;
    let mut d = Daemon::start(&config);
    // The daemon's queryable is visible once its session has joined ours.
    let start = Instant::now();
    while s
        .get(format!("{PREFIX}/status"))
        .timeout(Duration::from_secs(2))
        .await
        .unwrap()
        .recv_async()
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon's zenoh key space never appeared"
        );
    }
    let addr = d.http_url().trim_start_matches("http://").to_string();

    let (started_tx, mut started) = tokio::sync::mpsc::channel(PER_DOOR);
    let mut clients = Vec::new();
    for i in 0..PER_DOOR {
        let (socket, tx) = (d.socket.clone(), started_tx.clone());
        clients.push(("socket", tokio::spawn(over_socket(socket, tx))));
        let a = addr.clone();
        clients.push((
            "http",
            tokio::spawn(async move {
                tokio::task::spawn_blocking(move || over_http(a))
                    .await
                    .unwrap()
            }),
        ));
        clients.push(("zenoh query", tokio::spawn(over_zenoh_query(s.clone()))));
        clients.push(("zenoh topic", tokio::spawn(over_zenoh_topic(s.clone(), i))));
    }
    // Some requests are decoding (the others are queued) when SIGTERM comes.
    tokio::time::timeout(Duration::from_secs(60), started.recv())
        .await
        .expect("a request starts")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.signal(libc::SIGTERM);

    let mut ends = Vec::new();
    for (door, c) in clients {
        ends.push((door, c.await.unwrap()));
    }
    let lost: Vec<_> = ends
        .iter()
        .filter(|(_, e)| matches!(e, End::Lost(_)))
        .collect();
    assert!(
        lost.is_empty(),
        "requests without a terminal event: {lost:?}\n{}",
        d.log()
    );
    assert!(
        ends.iter().any(|(_, e)| *e == End::Unavailable),
        "the deadline cut nothing, so nothing was tested: {ends:?}"
    );
    let status = d.wait_exit(Duration::from_secs(30)).expect("embodyd exits");
    assert!(status.success(), "{status:?}\n{}", d.log());
}
