//! A web page in a browser on the robot's machine must not reach the API:
//! not by rebinding its own DNS name to 127.0.0.1 (the request's `Host` is
//! the attacker's name), and not by a cross-origin request (`Origin`), even
//! a "simple" text/plain POST that no preflight guards.

use std::io::{Read, Write};
use std::time::Duration;

use embody_tests::{test_config, write_tiny_model, Daemon, TempDir};

/// Sends one request and returns the status line and body.
fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = "{}";
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn rebound_names_and_foreign_pages_are_refused() {
    let models = TempDir::new("embodyd-tiny");
    let model = write_tiny_model(models.path());
    let config = test_config(
        &model,
        "[http]\nbind = \"127.0.0.1:0\"\nallowed_hosts = [\"robot.local\"]\nallowed_origins = [\"http://robot.local:3000\"]\n",
    );
    let d = Daemon::start(&config);
    let addr = d.http_url().trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let host = |name: &str| format!("{name}:{port}");

    // DNS rebinding: the page's own name in Host.
    let r = send(&addr, "GET", "/metrics", &[("Host", &host("evil.example"))]);
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
    assert!(
        r.contains("\"code\":\"forbidden\"") && r.contains("http.allowed_hosts"),
        "{r}"
    );
    for ok in [host("127.0.0.1"), host("localhost"), host("robot.local")] {
        let r = send(&addr, "GET", "/health", &[("Host", &ok)]);
        assert!(r.starts_with("HTTP/1.1 200 "), "{ok}: {r}");
    }

    // A cross-origin text/plain POST: refused before it does anything.
    let local = host("127.0.0.1");
    let page = [
        ("Host", local.as_str()),
        ("Origin", "http://evil.example"),
        ("Content-Type", "text/plain"),
    ];
    let r = send(&addr, "POST", "/flush_cache", &page);
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
    assert!(r.contains("http.allowed_origins"), "{r}");
    let r = send(&addr, "POST", "/v1/chat/completions", &page);
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");

    // Programs send no Origin; an allowed page's origin passes.
    let r = send(&addr, "POST", "/flush_cache", &[("Host", &local)]);
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let allowed = [
        ("Host", local.as_str()),
        ("Origin", "http://robot.local:3000"),
    ];
    let r = send(&addr, "POST", "/flush_cache", &allowed);
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
}
