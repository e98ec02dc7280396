//! The real `embodyd` on bad input: bad IPC frames get an error frame and a
//! closed connection while the daemon keeps serving everyone else; bad
//! configurations and a missing model file stop it with a clear message.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use embody_protocol::wire::{self, ErrorBody, Frame, MAX_META_LEN};
use embody_protocol::{ErrorCode, Event, Request, SamplingParams};
use embody_tests::{bin, read_frame, test_config, write_tiny_model, Daemon, TempDir};

/// Sends `bytes`, then expects one error frame and the connection closed.
fn expect_error_frame(d: &Daemon, bytes: &[u8], half_close: bool) -> ErrorBody {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let body = match read_frame(&mut s) {
        Ok(Frame::Error(body)) => body,
        other => panic!(
            "for {:?}: {other:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        ),
    };
    // Then the daemon closes: end of stream, or a reset when it left bytes
    // of ours unread.
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes follow the error frame"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    body
}

fn header(version: u8, kind: u8, meta_len: u32, attach_len: u32) -> Vec<u8> {
    let mut b = b"EMBD".to_vec();
    b.extend_from_slice(&[version, kind, 0, 0]);
    b.extend_from_slice(&meta_len.to_le_bytes());
    b.extend_from_slice(&attach_len.to_le_bytes());
    b
}

fn chat_works(d: &Daemon) {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = Request::user("hello robot")
        .max_tokens(5)
        .sampling(SamplingParams::greedy());
    req.id = 9;
    s.write_all(&wire::encode(&Frame::Chat(req)).unwrap())
        .unwrap();
    loop {
        match read_frame(&mut s).unwrap() {
            Frame::Event {
                id: 9,
                event: Event::Finished { .. },
            } => return,
            Frame::Event { id: 9, event } if !event.is_terminal() => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn bad_frames_get_an_error_frame_and_the_daemon_keeps_serving() {
    let models = TempDir::new("embodyd-tiny");
    let d = Daemon::start(&test_config(
        &write_tiny_model(models.path()),
        "[ipc]\nframe_timeout_ms = 500\n",
    ));
    // A connection that stays open and idle through all of it.
    let mut bystander = UnixStream::connect(&d.socket).unwrap();
    bystander
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let e = expect_error_frame(&d, b"GET / HTTP/1.1\r\nHost: robot\r\n\r\n", false);
    assert_eq!(e.code, ErrorCode::BadFrame);
    assert!(e.message.contains("not an embodyd frame"), "{}", e.message);

    let e = expect_error_frame(&d, &header(7, 1, 2, 0), false);
    assert_eq!(e.code, ErrorCode::UnsupportedVersion);
    assert!(e.message.contains("wire version 7"), "{}", e.message);

    let e = expect_error_frame(&d, &header(1, 3, MAX_META_LEN as u32 + 1, 0), false);
    assert_eq!(e.code, ErrorCode::BadFrame);
    assert!(e.message.contains("exceeds the limit"), "{}", e.message);

    let e = expect_error_frame(&d, &header(1, 200, 0, 0), false);
    assert!(
        e.message.contains("unknown frame kind 200"),
        "{}",
        e.message
    );

    let mut garbage = header(1, 1, 9, 0);
    garbage.extend_from_slice(b"{not json");
    let e = expect_error_frame(&d, &garbage, false);
    assert!(e.message.contains("malformed Chat frame"), "{}", e.message);

    // The header promises 100 bytes; 10 arrive and the client stops sending.
    let mut short = header(1, 3, 100, 0);
    short.extend_from_slice(b"{\"id\": 1, ");
    let e = expect_error_frame(&d, &short, true);
    assert!(e.message.contains("truncated frame"), "{}", e.message);

    // Half a header, then silence: the frame timeout closes the connection.
    let started = Instant::now();
    let e = expect_error_frame(&d, b"EMBD\x01", false);
    assert!(e.message.contains("incomplete frame"), "{}", e.message);
    assert!(started.elapsed() >= Duration::from_millis(400));

    // A frame only the daemon sends.
    let event = wire::encode(&Frame::Event {
        id: 1,
        event: Event::Started { prompt_tokens: 1 },
    })
    .unwrap();
    let e = expect_error_frame(&d, &event, false);
    assert!(e.message.contains("sent by the daemon"), "{}", e.message);

    // Everyone else is served as before, the idle connection included.
    chat_works(&d);
    let st = embody_tests::exchange(&mut bystander, &Frame::Status { id: 3 }).unwrap();
    assert!(
        matches!(st, Frame::StatusReply { id: 3, ref status } if status.ready),
        "{st:?}"
    );
    let log = d.log();
    assert_eq!(
        log.matches("bad frame, closing the connection").count(),
        8,
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Runs embodyd to its exit on a config and returns (exit code, stderr).
fn run_with_config(config: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = TempDir::new("embodyd-config");
    let path = dir.path().join("embodyd.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(bin("embodyd"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env("XDG_RUNTIME_DIR", dir.path())
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "CONFIG");
    (out.status.code(), stderr)
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let (code, err) = run_with_config("[decoder]\nmax_runing = 4\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("CONFIG") && err.contains("unknown field `max_runing`"),
        "{err}"
    );
    assert!(
        err.contains("expected one of") && err.contains("`max_running`"),
        "{err}"
    );

    let (code, err) = run_with_config("[cache]\nkv_cache_mb = \"lots\"\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid type") && err.contains("kv_cache_mb"),
        "{err}"
    );
    assert!(err.contains("line 2"), "{err}");

    let (code, err) = run_with_config("[modle]\npath = \"x.gguf\"\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `modle`"), "{err}");

    let (code, err) = run_with_config("[model]\nbackend = \"tpu\"\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("model.backend") && err.contains("tpu"),
        "{err}"
    );
}

#[test]
fn a_missing_model_file_is_named_with_what_to_do() {
    let (code, err) = run_with_config("[model]\npath = \"/nonexistent/robot.gguf\"\n", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/robot.gguf"), "{err}");
    assert!(err.contains("fetch-models.sh"), "{err}");
}

#[test]
fn the_shipped_config_and_flags_resolve_as_documented() {
    let cfg =
        std::fs::read_to_string(embody_tests::repo_root().join("configs/default.toml")).unwrap();
    let (code, out) = {
        let dir = TempDir::new("embodyd-config");
        let o = std::process::Command::new(bin("embodyd"))
            .args([
                "--config",
                "configs/default.toml",
                "--print-config",
                "--threads",
                "3",
            ])
            .current_dir(embody_tests::repo_root())
            .env("EMBODY_MODELS", dir.path())
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(out.contains("threads = 3"), "{out}");
    assert!(
        out.contains("path = \"SmolLM2-135M-Instruct.Q4_1.gguf\""),
        "{out}"
    );
    assert!(
        cfg.contains("[testing]\n"),
        "the shipped config documents every section"
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let models = TempDir::new("embodyd-tiny");
    let config = test_config(&write_tiny_model(models.path()), "");
    let first = Daemon::start(&config);
    let out = std::process::Command::new(bin("embodyd"))
        .arg("--config")
        .arg(first.config_path())
        .env("XDG_RUNTIME_DIR", first.dir.path())
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving on"), "{err}");
    // The first one is untouched.
    assert!(embody_tests::status(&first.socket).unwrap().ready);
}

#[test]
fn the_cli_without_a_daemon_says_where_it_looked() {
    let dir = TempDir::new("embody-cli");
    for args in [&["status"][..], &["chat", "hello"][..]] {
        let out = std::process::Command::new(bin("embody"))
            .args(args)
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("EMBODY_SOCKET", dir.path().join("nothing.sock"))
            .env_remove("RUNTIME_DIRECTORY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no embodyd socket found"), "{err}");
        assert!(
            err.contains("nothing.sock") && err.contains("is embodyd running?"),
            "{err}"
        );
    }
}

/// `/metrics` counts the socket's requests by outcome, as it counts HTTP's.
#[test]
fn socket_requests_are_counted_in_the_metrics() {
    let models = TempDir::new("embodyd-tiny");
    let d = Daemon::start(&test_config(&write_tiny_model(models.path()), ""));
    chat_works(&d);
    // One refused: max_tokens 0.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = Request::user("hello").max_tokens(0);
    req.id = 4;
    s.write_all(&wire::encode(&Frame::Chat(req)).unwrap())
        .unwrap();
    match read_frame(&mut s).unwrap() {
        Frame::Event {
            id: 4,
            event: Event::Error { code, .. },
        } => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.requests_total("ipc", "ok"), 1);
    assert_eq!(d.requests_total("ipc", "client_error"), 1);
}
