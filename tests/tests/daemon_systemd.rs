//! The real `embodyd` under a stand-in for systemd: a Unix datagram socket as
//! `$NOTIFY_SOCKET` receives READY, WATCHDOG while the decoder makes progress
//! (none while it is wedged, until the supervisor has replaced it), and STOPPING on SIGTERM, after which in-flight
//! requests drain and the process exits 0.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use embody_client::{Client, ErrorCode, Event, Fault, FinishReason, Request, SamplingParams};
use embody_tests::{smollm2, test_config, write_tiny_model, Daemon, TempDir};

/// The systemd side: the notification socket.
struct Systemd {
    sock: UnixDatagram,
    _dir: TempDir,
    path: std::path::PathBuf,
}

impl Systemd {
    fn new() -> Self {
        let dir = TempDir::new("embodyd-notify");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Self {
            sock,
            _dir: dir,
            path,
        }
    }

    /// Datagrams received within `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return out
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Waits up to `timeout` for a datagram containing `needle`; returns it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            for m in self.collect(Duration::from_millis(100)) {
                if m.contains(needle) {
                    return m;
                }
            }
        }
        panic!("no {needle} within {timeout:?}");
    }
}

fn watchdogs(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.split('\n').any(|l| l == "WATCHDOG=1"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_only_while_progressing_and_stopping() {
    let models = TempDir::new("embodyd-tiny");
    let tiny = write_tiny_model(models.path());
    let systemd = Systemd::new();
    // A long restart backoff keeps the replaced decoder down for a while, so
    // that the withheld watchdog can be seen.
    let config = test_config(
        &tiny,
        "[supervisor]\nstall_timeout_ms = 600\nrestart_backoff_ms = 2000\n\n[testing]\nfault_injection = true\n",
    );
    // systemd's WatchdogSec=400ms: the daemon feeds it every 200 ms.
    let mut d = Daemon::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", systemd.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = systemd.wait_for("READY=1", Duration::from_secs(60));
    assert!(ready.contains("STATUS=serving tiny"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={}", d.pid())), "{ready}");
    d.wait_ready();

    // Healthy and idle: the watchdog is fed about every 200 ms.
    let fed = watchdogs(&systemd.collect(Duration::from_millis(1500)));
    assert!(fed >= 4, "{fed} WATCHDOG=1 in 1.5 s");

    // Wedge the decoder for 6 s: once the 600 ms stall timeout passes, no
    // more watchdog, and the supervisor replaces the decoder (2 s later).
    let client = Client::connect(&d.socket).await.unwrap();
    client
        .inject_fault(Fault::WedgeDecoder { ms: 6000 })
        .await
        .unwrap();
    let wedged_at = Instant::now();
    systemd.collect(Duration::from_millis(1000));
    let during = systemd.collect(Duration::from_millis(1400));
    assert!(
        wedged_at.elapsed() < Duration::from_millis(2600),
        "the check ran past the replacement"
    );
    assert_eq!(watchdogs(&during), 0, "fed while wedged: {during:?}");
    let st = client.status().await.unwrap();
    assert!(!st.healthy && !st.ready, "{st:?}");

    // The new decoder makes progress long before the wedge would end: the
    // watchdog resumes.
    systemd.wait_for("WATCHDOG=1", Duration::from_secs(5));
    assert!(
        wedged_at.elapsed() < Duration::from_millis(6000),
        "recovered only when the wedge ended"
    );
    let st = client.status().await.unwrap();
    assert!(st.healthy && st.ready && st.decoder_restarts == 1, "{st:?}");
    let log = d.log();
    assert!(log.contains("withholding the watchdog"), "{log}");
    assert!(log.contains("replacing it"), "{log}");
    assert!(log.contains("feeding the watchdog"), "{log}");

    d.signal(libc::SIGTERM);
    systemd.wait_for("STOPPING=1", Duration::from_secs(10));
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(!d.socket.exists(), "the socket file is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_0() {
    let mut d = Daemon::start(&test_config(
        &smollm2(),
        "[service]\ndrain_timeout_ms = 60000\n",
    ));
    let client = Client::connect(&d.socket).await.unwrap();
    let other = Client::connect(&d.socket).await.unwrap();
    let req = Request::user("Name three kinds of robot joints.")
        .max_tokens(24)
        .sampling(SamplingParams::greedy());
    let mut s = client.chat(req).await.unwrap();
    while !matches!(s.next().await, Some(Event::Delta { .. })) {}

    d.signal(libc::SIGTERM);
    let start = Instant::now();
    while !other.status().await.unwrap().draining {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no drain:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New connections are refused, and new work on open ones too...
    assert!(UnixStream::connect(&d.socket).is_err());
    let mut late = other
        .chat(Request::user("hello").max_tokens(4))
        .await
        .unwrap();
    match late.next().await {
        Some(Event::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Unavailable, "{message}")
        }
        other => panic!("{other:?}"),
    }
    // ...and the request in flight runs to its end.
    let mut last = None;
    while let Some(ev) = s.next().await {
        last = Some(ev);
    }
    match last {
        Some(Event::Finished { reason, usage }) => {
            assert_ne!(reason, FinishReason::Cancelled);
            assert!(usage.completion_tokens >= 1);
        }
        other => panic!("{other:?}"),
    }
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("exits after the drain");
    assert_eq!(status.code(), Some(0));
    let log = d.log();
    assert!(
        log.contains("SIGTERM: draining") && log.contains("drained") && log.contains("stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_limits_and_switches() {
    let models = TempDir::new("embodyd-tiny");
    let tiny = write_tiny_model(models.path());
    let d = Daemon::start(&test_config(&tiny, ""));
    let client = Client::connect(&d.socket).await.unwrap();
    assert!(client
        .inject_fault(Fault::WedgeDecoder { ms: 1 })
        .await
        .is_err());
    assert_eq!(client.status().await.unwrap().max_queued, 64);

    std::fs::write(
        d.config_path(),
        test_config(
            &tiny,
            "[decoder]\nmax_queued = 5\n\n[testing]\nfault_injection = true\n\n[http]\nbind = \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let start = Instant::now();
    while client.status().await.unwrap().max_queued != 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not reloaded:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .inject_fault(Fault::WedgeDecoder { ms: 1 })
        .await
        .unwrap();

    // A change that needs a restart is named; a broken file keeps the running config.
    std::fs::write(
        d.config_path(),
        test_config(
            &tiny,
            "[decoder]\nmax_queued = 5\nmax_running = 3\n\n[testing]\nfault_injection = true\n\n[http]\nbind = \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_log(&d, "decoder.max_running take effect after a restart");
    std::fs::write(d.config_path(), "[decoder]\nmax_queued = \"many\"\n").unwrap();
    d.signal(libc::SIGHUP);
    wait_log(&d, "keeping the running configuration");
    assert_eq!(client.status().await.unwrap().max_queued, 5);
}

fn wait_log(d: &Daemon, needle: &str) {
    let start = Instant::now();
    while !d.log().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {needle:?} in\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
