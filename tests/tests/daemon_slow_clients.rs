//! Clients that cost the daemon more than their share: one that asks and
//! never reads its replies, and idle connections holding every place.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use embody_protocol::wire::{self, Frame};
use embody_protocol::ErrorCode;
use embody_tests::{
    proc_memory, read_frame, status, test_config, write_tiny_model, Daemon, TempDir,
};

fn rss_mib(pid: u32) -> u64 {
    proc_memory(pid, "VmRSS") >> 20
}

fn hwm_mib(pid: u32) -> u64 {
    proc_memory(pid, "VmHWM") >> 20
}

fn tiny_daemon(models: &TempDir, ipc: &str) -> Daemon {
    let model = write_tiny_model(models.path());
    Daemon::start(&test_config(&model, &format!("[ipc]\n{ipc}\n")))
}

/// A client sends status requests without reading a reply: the daemon
/// stops reading its requests once its replies fill the queue (its memory
/// stays where it was), then closes it after `write_timeout_ms`, and goes
/// on serving others.
#[test]
fn a_client_that_never_reads_is_stopped_then_closed() {
    let models = TempDir::new("embodyd-tiny");
    let d = tiny_daemon(&models, "write_timeout_ms = 2000");
    let before = rss_mib(d.pid());

    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let frame = wire::encode(&Frame::Status { id: 1 }).unwrap();
    // 200,000 requests would queue about 400 MB of replies if the daemon
    // took them all.
    let mut sent = 0usize;
    // Writing stops when the daemon stops reading (a timeout) or has
    // already closed the connection (a broken pipe or a reset).
    let stopped = loop {
        if sent == 200_000 {
            break None;
        }
        match s.write_all(&frame) {
            Ok(()) => sent += 1,
            Err(e) => break Some(e.kind()),
        }
    };
    let grown = rss_mib(d.pid()).saturating_sub(before);
    eprintln!(
        "{sent} requests written before the daemon stopped reading ({stopped:?}); RSS +{grown} MiB"
    );
    assert!(
        stopped.is_some(),
        "the daemon read all {sent} requests of a client that reads nothing"
    );
    assert!(grown < 64, "RSS grew by {grown} MiB after {sent} requests");
    let closed_while_writing = matches!(
        stopped,
        Some(ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
    );
    assert!(
        closed_while_writing
            || matches!(stopped, Some(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "{stopped:?}"
    );

    // Past write_timeout_ms the daemon closes the connection: what it had
    // queued arrives, then the end of the stream.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 1 << 16];
    let mut closed = closed_while_writing;
    while !closed && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            // A reset is the close too (unread requests were discarded).
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        closed,
        "the connection of a client that read nothing stayed open"
    );
    assert!(
        status(&d.socket).unwrap().ready,
        "the daemon serves others:\n{}",
        d.log()
    );
    assert!(d.log().contains("read nothing for"), "{}", d.log());
}

/// Two connections hold both places: a third client within the idle grace
/// is refused as overloaded, and one after it takes the place of the
/// connection idle the longest, which is told why it is closed.
#[test]
fn idle_connections_give_their_place_to_a_new_client() {
    let models = TempDir::new("embodyd-tiny");
    let d = tiny_daemon(&models, "max_connections = 2");
    let hold = |id| {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let bytes = wire::encode(&Frame::Status { id }).unwrap();
        s.write_all(&bytes).unwrap();
        assert!(matches!(
            read_frame(&mut s).unwrap(),
            Frame::StatusReply { .. }
        ));
        s
    };
    let mut first = hold(1);
    std::thread::sleep(Duration::from_millis(300));
    let mut second = hold(2);

    // Both were active just now: nobody gives way.
    let mut third = UnixStream::connect(&d.socket).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match read_frame(&mut third).unwrap() {
        Frame::Error(e) => assert_eq!(e.code, ErrorCode::Overloaded, "{e:?}"),
        other => panic!("{other:?}"),
    }

    std::thread::sleep(Duration::from_secs(6));
    let s = status(&d.socket).expect("a new client after the idle grace");
    assert!(s.ready);
    // The first connection, idle the longest, was closed with the reason.
    match read_frame(&mut first).unwrap() {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Overloaded);
            assert!(e.message.contains("idle"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // The second still works.
    second
        .write_all(&wire::encode(&Frame::Status { id: 3 }).unwrap())
        .unwrap();
    assert!(matches!(
        read_frame(&mut second).unwrap(),
        Frame::StatusReply { id: 3, .. }
    ));
}

/// Reads until the peer closes; `None` if it is still open after `wait`.
fn read_to_close(s: &mut std::net::TcpStream, wait: Duration) -> Option<String> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&got).into_owned())
        }
        Err(_) => None,
    }
}

/// HTTP connections are bounded: past `max_connections` a client gets a
/// 503 and a closed socket at once (its open file is back), the Unix socket
/// keeps serving, connections that send no request head are closed after
/// `header_timeout_ms`, and so is a keep-alive connection left idle.
#[test]
fn http_connections_are_bounded_and_idle_ones_closed() {
    let models = TempDir::new("embodyd-tiny");
    let model = write_tiny_model(models.path());
    let config = test_config(
        &model,
        "[http]\nbind = \"127.0.0.1:0\"\nmax_connections = 4\nheader_timeout_ms = 1500\n",
    );
    let d = Daemon::start(&config);
    let addr = d.http_url().trim_start_matches("http://").to_string();
    let connect = || std::net::TcpStream::connect(&addr).unwrap();

    let mut idle: Vec<_> = (0..4).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = connect();
    let reply = read_to_close(&mut fifth, Duration::from_secs(5)).expect("closed at once");
    assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
    assert!(reply.contains("\"code\":\"overloaded\""), "{reply}");
    assert!(
        status(&d.socket).unwrap().ready,
        "IPC serves while HTTP is full"
    );

    // Silent connections are closed once the head timeout passes.
    for s in &mut idle {
        assert!(
            read_to_close(s, Duration::from_secs(10)).is_some(),
            "a connection that sent nothing is still open"
        );
    }

    // Places are free again; a keep-alive connection serves a request, then
    // is closed when it sends nothing more.
    let mut s = connect();
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let started = Instant::now();
    assert!(
        read_to_close(&mut s, Duration::from_secs(10)).is_some(),
        "an idle keep-alive connection is still open"
    );
    assert!(started.elapsed() >= Duration::from_millis(1000));
}

/// Eight clients at once send 7 MB prompts (under the body limit, far over
/// what the context holds): each is refused with a 400 that says why,
/// before its text is rendered or tokenized, so the daemon's peak memory
/// barely moves (it grew 16× before the text was bounded).
#[test]
fn huge_prompts_are_refused_before_they_cost_memory() {
    let d = Daemon::start(&test_config(&embody_tests::smollm2(), ""));
    let addr = d.http_url().trim_start_matches("http://").to_string();
    // The high-water mark so far (loading may have peaked above today's RSS).
    let before = rss_mib(d.pid()).max(hwm_mib(d.pid()));
    let text = "the robot sees a red block. ".repeat(7_000_000 / 28);
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
    })
    .to_string();
    let replies: Vec<String> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut c = std::net::TcpStream::connect(&addr).unwrap();
                    let head = format!(
                        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    c.write_all(head.as_bytes()).unwrap();
                    c.write_all(body.as_bytes()).unwrap();
                    read_to_close(&mut c, Duration::from_secs(120)).expect("an answer")
                })
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for r in &replies {
        assert!(r.starts_with("HTTP/1.1 400 "), "{}", &r[..r.len().min(400)]);
        assert!(r.contains("bytes"), "{r}");
    }
    let peak = hwm_mib(d.pid());
    eprintln!("RSS before {before} MiB, peak {peak} MiB");
    // The bodies themselves (8 × 7 MB, parsed) are the floor.
    assert!(
        peak < before + 400,
        "peak RSS {peak} MiB from {before} MiB for eight 7 MB prompts"
    );
    assert!(status(&d.socket).unwrap().ready);
}
