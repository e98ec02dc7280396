//! The HTTP API against the official `openai` Python client, on SmolLM2:
//! plain and streamed chat, usage, JSON schema answers, tool calls and their
//! round trip, text completions, every error status, a full queue, clients
//! that hang up mid-stream, and draining on SIGTERM
//! (tests/python/http_openai.py holds the checks).

use embody_tests::{smollm2, test_config, Daemon};

#[test]
fn the_openai_client_is_served_faithfully() {
    let config = test_config(
        &smollm2(),
        "[decoder]\nmax_running = 2\nmax_queued = 2\n\n[service]\ndrain_timeout_ms = 30000\n\n\
         [http]\nbind = \"127.0.0.1:0\"\napi_key = \"sekrit\"\nmax_body_bytes = 1048576\n",
    );
    let mut d = Daemon::start(&config);
    let stdout = d.python_checks("http_openai.py", &[&d.http_url(), &d.pid().to_string()]);
    eprintln!("{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        12,
        "{stdout}"
    );
    // The last check sent SIGTERM: the daemon drains and exits cleanly.
    let status = d
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("embodyd exits after the drain");
    assert!(status.success(), "{status}\n{}", d.log());
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}
