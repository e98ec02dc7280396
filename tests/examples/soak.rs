//! The soak driver behind `scripts/soak.sh`: many clients on every door of a
//! running embodyd for a set time, with well-behaved clients mixed with slow
//! readers, clients that leave mid-answer and oversized inputs. Prints the
//! daemon's RSS, open files and threads every `--every` seconds, then the
//! requests by door and outcome. A request of a client that stays must end
//! with a terminal event; one that does not is counted as `lost`. Exits 1
//! when any request was lost, or RSS or open files grew past a bound.
//!
//! usage: soak --pid PID --socket PATH --http HOST:PORT --zenoh ENDPOINT
//!        --prefix PREFIX --model NAME [--clients 64] [--seconds 1800] [--every 10]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embody_client::{Client, Event, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    pid: u32,
    socket: String,
    http: String,
    zenoh: String,
    prefix: String,
    model: String,
    clients: usize,
    seconds: u64,
    every: u64,
}

fn args() -> Args {
    let mut a = Args {
        pid: 0,
        socket: String::new(),
        http: String::new(),
        zenoh: String::new(),
        prefix: String::new(),
        model: String::new(),
        clients: 64,
        seconds: 1800,
        every: 10,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let (k, v) = (pair[0].as_str(), pair.get(1).cloned().unwrap_or_default());
        match k {
            "--pid" => a.pid = v.parse().expect("--pid"),
            "--socket" => a.socket = v,
            "--http" => a.http = v,
            "--zenoh" => a.zenoh = v,
            "--prefix" => a.prefix = v,
            "--model" => a.model = v,
            "--clients" => a.clients = v.parse().expect("--clients"),
            "--seconds" => a.seconds = v.parse().expect("--seconds"),
            "--every" => a.every = v.parse().expect("--every"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.pid > 0, "--pid is needed");
    a
}

/// The client kinds of each door, by kind number.
const IPC_KINDS: [&str; 4] = ["ipc", "ipc/leaves", "ipc/oversized", "ipc/slow"];
const HTTP_KINDS: [&str; 5] = [
    "http/stream",
    "http",
    "http/slow",
    "http/leaves",
    "http/oversized",
];
const ZENOH_KINDS: [&str; 3] = ["zenoh", "zenoh/leaves", "zenoh/oversized"];

/// Requests by (door and client kind, outcome).
type Tally = Arc<Mutex<BTreeMap<(String, String), u64>>>;

fn count(t: &Tally, door: &str, outcome: &str) {
    *t.lock()
        .unwrap()
        .entry((door.into(), outcome.into()))
        .or_default() += 1;
}

/// The outcome of an event stream's last event (`lost` for none).
fn outcome(last: Option<&Event>) -> String {
    match last {
        Some(Event::Finished { reason, .. }) => format!("finished_{reason:?}").to_lowercase(),
        Some(Event::Error { code, .. }) => format!("error_{code}"),
        _ => "lost".into(),
    }
}

const QUESTIONS: [&str; 4] = [
    "What does a lidar measure?",
    "Name three robot arm joints.",
    "Write a short poem about wheels.",
    "How far is 3 meters in feet?",
];

/// A prompt longer than the context can hold (600 kB, under the socket's
/// 1 MiB frame limit): refused before it is tokenized.
fn oversized() -> String {
    "robot ".repeat(100_000)
}

// --- the socket ---

async fn ipc_client(a: Arc<Args>, t: Tally, kind: usize, end: Instant) {
    let door = IPC_KINDS[kind];
    let mut n = 0usize;
    while Instant::now() < end {
        n += 1;
        let Ok(client) = Client::connect(&a.socket).await else {
            count(&t, door, "connect_failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let q = QUESTIONS[n % QUESTIONS.len()];
        match kind {
            // Leaves after the first tokens: not counted as lost.
            1 => {
                if let Ok(mut s) = client.chat(Request::user(q).max_tokens(64)).await {
                    let _ = s.next().await;
                    let _ = s.next().await;
                }
                count(&t, door, "left_mid_answer");
                continue;
            }
            2 => {
                let req = Request::user(oversized()).max_tokens(4);
                let out = match client.chat(req).await {
                    Ok(mut s) => outcome(drain(&mut s).await.as_ref()),
                    Err(e) => format!("refused_by_client_library: {e}"),
                };
                count(&t, door, &out);
                continue;
            }
            _ => {}
        }
        // Several requests on one connection, the slow kind reading slowly.
        for _ in 0..4 {
            let Ok(mut s) = client.chat(Request::user(q).max_tokens(48)).await else {
                count(&t, door, "send_failed");
                break;
            };
            let mut last = None;
            while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(300), s.next()).await
            {
                if kind == 3 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let end = ev.is_terminal();
                last = Some(ev);
                if end {
                    break;
                }
            }
            count(&t, door, &outcome(last.as_ref()));
        }
    }
}

async fn drain(s: &mut embody_client::ChatStream) -> Option<Event> {
    let mut last = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(300), s.next()).await {
        let end = ev.is_terminal();
        last = Some(ev);
        if end {
            break;
        }
    }
    last
}

// --- HTTP ---

/// One request; returns the outcome (`http_<status>`, and for a stream
/// whether it ended with `[DONE]`).
async fn http_once(a: &Args, body: &str, stream: bool, slow: bool, leave: bool) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(&a.http).await else {
        return "connect_failed".into();
    };
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        a.http,
        body.len()
    );
    if s.write_all(head.as_bytes()).await.is_err() || s.write_all(body.as_bytes()).await.is_err() {
        return "write_failed".into();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_secs(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        if leave && out.len() > 600 {
            return "left_mid_answer".into();
        }
        if slow {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let text = String::from_utf8_lossy(&out);
    let status = text.get(9..12).unwrap_or("???").to_string();
    if stream && status == "200" {
        let done = text.contains("data: [DONE]") && text.ends_with("\r\n0\r\n\r\n");
        return if done {
            "http_200_done".into()
        } else {
            "lost".into()
        };
    }
    if status == "200" && !text.contains("\"finish_reason\"") {
        return "lost".into();
    }
    format!("http_{status}")
}

async fn http_client(a: Arc<Args>, t: Tally, kind: usize, end: Instant) {
    let mut n = 0usize;
    while Instant::now() < end {
        n += 1;
        let q = QUESTIONS[n % QUESTIONS.len()];
        let body = |content: &str, stream: bool| {
            serde_json::json!({
                "model": a.model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 48,
                "stream": stream,
            })
            .to_string()
        };
        let out = match kind {
            0 => http_once(&a, &body(q, true), true, false, false).await,
            1 => http_once(&a, &body(q, false), false, false, false).await,
            2 => http_once(&a, &body(q, true), true, true, false).await,
            3 => http_once(&a, &body(q, true), true, false, true).await,
            // Over the body limit (8 MiB): 413 before it is read whole.
            _ => http_once(&a, &body(&"x".repeat(9 << 20), false), false, false, false).await,
        };
        count(&t, HTTP_KINDS[kind], &out);
    }
}

// --- zenoh ---

async fn zenoh_client(a: Arc<Args>, t: Tally, s: zenoh::Session, kind: usize, end: Instant) {
    let mut n = 0usize;
    while Instant::now() < end {
        n += 1;
        let q = QUESTIONS[n % QUESTIONS.len()];
        let content = if kind == 2 {
            oversized()
        } else {
            q.to_string()
        };
        let payload = serde_json::json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 48,
        })
        .to_string();
        // The leaving kind gives up after half a second.
        let timeout = if kind == 1 { 500 } else { 300_000 };
        let Ok(replies) = s
            .get(format!("{}/chat", a.prefix))
            .payload(payload)
            .consolidation(zenoh::query::ConsolidationMode::None)
            .timeout(Duration::from_millis(timeout))
            .await
        else {
            count(&t, ZENOH_KINDS[kind], "get_failed");
            continue;
        };
        let mut last: Option<Event> = None;
        while let Ok(reply) = replies.recv_async().await {
            if let Ok(sample) = reply.result() {
                last = serde_json::from_slice(&sample.payload().to_bytes()).ok();
            }
        }
        let out = match (kind, &last) {
            (1, l) if !l.as_ref().is_some_and(Event::is_terminal) => "left_mid_answer".into(),
            _ => outcome(last.as_ref()),
        };
        count(&t, ZENOH_KINDS[kind], &out);
        if kind != 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

// --- the daemon's resources ---

struct Sample {
    at: u64,
    rss_kib: u64,
    files: usize,
    threads: u64,
}

fn sample(pid: u32, at: u64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let files = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample {
        at,
        rss_kib: field("VmRSS:"),
        files,
        threads: field("Threads:"),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Arc::new(args());
    let t: Tally = Arc::default();
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let mut c = zenoh::Config::default();
    for (k, v) in [
        ("mode", "\"peer\"".to_string()),
        ("connect/endpoints", format!("[\"{}\"]", a.zenoh)),
        ("listen/endpoints", "[]".to_string()),
        ("scouting/multicast/enabled", "false".to_string()),
    ] {
        c.insert_json5(k, &v).unwrap();
    }
    let session = zenoh::open(c).await.expect("a zenoh session");
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        let (a, t) = (a.clone(), t.clone());
        // Doors in turn; within each, kinds in turn (kind 0 is plain).
        let kind = i / 3;
        tasks.push(match i % 3 {
            0 => tokio::spawn(ipc_client(a, t, kind % 4, end)),
            1 => tokio::spawn(http_client(a, t, kind % 5, end)),
            _ => tokio::spawn(zenoh_client(a, t, session.clone(), kind % 3, end)),
        });
    }
    println!(
        "{:>6} {:>9} {:>6} {:>8} {:>9}",
        "s", "rss_mib", "files", "threads", "requests"
    );
    let mut samples = Vec::new();
    while Instant::now() < end {
        let at = start.elapsed().as_secs();
        if let Some(s) = sample(a.pid, at) {
            let done: u64 = t.lock().unwrap().values().sum();
            println!(
                "{:>6} {:>9.1} {:>6} {:>8} {:>9}",
                s.at,
                s.rss_kib as f64 / 1024.0,
                s.files,
                s.threads,
                done
            );
            samples.push(s);
        } else {
            println!("the daemon (pid {}) is gone", a.pid);
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_secs(a.every)).await;
    }
    for task in tasks {
        let _ = task.await;
    }
    // After the last request: what the daemon holds at rest.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rest = sample(a.pid, start.elapsed().as_secs());
    println!("\nrequests by door and outcome:");
    let tally = t.lock().unwrap().clone();
    for ((door, outcome), n) in &tally {
        println!("  {door:<16} {outcome:<28} {n}");
    }
    let lost: u64 = tally
        .iter()
        .filter(|((_, o), _)| o == "lost" || o.starts_with("error_internal"))
        .map(|(_, n)| n)
        .sum();
    let total: u64 = tally.values().sum();
    let mut failed = lost > 0;
    println!("\n{total} requests, {lost} without a terminal event (or internal errors)");
    // Flat: the second half's peak within 15% (RSS) of the first half's,
    // and open files back where they were once the clients are gone.
    let half = samples.len() / 2;
    if half > 0 {
        let peak = |s: &[Sample]| s.iter().map(|x| x.rss_kib).max().unwrap_or(0);
        let (first, second) = (peak(&samples[..half]), peak(&samples[half..]));
        println!(
            "RSS peak: first half {:.1} MiB, second half {:.1} MiB",
            first as f64 / 1024.0,
            second as f64 / 1024.0
        );
        if second as f64 > first as f64 * 1.15 {
            println!("RSS grew");
            failed = true;
        }
        if let (Some(r), Some(s0)) = (&rest, samples.first()) {
            println!(
                "at rest: {:.1} MiB, {} files, {} threads (start: {} files, {} threads)",
                r.rss_kib as f64 / 1024.0,
                r.files,
                r.threads,
                s0.files,
                s0.threads
            );
            if r.files > s0.files + 4 {
                println!("open files grew");
                failed = true;
            }
        }
    }
    session.close().await.ok();
    std::process::exit(i32::from(failed));
}
