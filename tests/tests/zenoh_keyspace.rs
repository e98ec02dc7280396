//! The real `embodyd` serving its zenoh key space, driven by a second real
//! zenoh session over loopback TCP (random ports, no multicast): streamed
//! chat through the queryable, status, the request/response topics, the
//! `alive` liveliness token following the daemon, and camera frames attached
//! by name (over zenoh and the Unix socket alike), with every kind of bad
//! frame refused while the daemon serves on.

use std::time::{Duration, Instant};

use embody_protocol::{ErrorCode, Event, Status};
use embody_tests::{free_port, test_config, write_tiny_model, zenoh_session, Daemon, TempDir};
use zenoh::query::ConsolidationMode;
use zenoh::sample::SampleKind;

const PREFIX: &str = "embody/zt";

fn config(model: &std::path::Path, test_port: u16) -> String {
    let daemon_port = free_port();
    test_config(
        model,
        &format!(
            r#"[zenoh]
listen = ["tcp/127.0.0.1:{daemon_port}"]
connect = ["tcp/127.0.0.1:{test_port}"]
node = "zt"

[[cameras]]
name = "front"
key = "zt/cam/front"
format = "rgb8"
width = 8
height = 6

[[cameras]]
name = "png"
key = "zt/cam/png"
format = "png"

[[cameras]]
name = "jpeg"
key = "zt/cam/jpeg"
format = "jpeg"
"#
        ),
    )
}

/// Every reply of one chat query, as events.
async fn chat(s: &zenoh::Session, json: &str, consolidation: ConsolidationMode) -> Vec<Event> {
    let replies = s
        .get(format!("{PREFIX}/chat"))
        .payload(json.to_string())
        .consolidation(consolidation)
        .timeout(Duration::from_secs(60))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(reply) = replies.recv_async().await {
        let sample = reply.result().expect("a reply, not an error");
        assert_eq!(sample.key_expr().as_str(), format!("{PREFIX}/chat"));
        out.push(serde_json::from_slice(&sample.payload().to_bytes()).expect("an event"));
    }
    out
}

fn refusal(events: &[Event]) -> (ErrorCode, String) {
    match events {
        [Event::Error { code, message }] => (*code, message.clone()),
        other => panic!("one error event expected, got {other:?}"),
    }
}

fn with_camera(name: &str, max_age_ms: u64) -> String {
    format!(
        r#"{{"messages":[{{"role":"user","content":"what is in front?"}}],"max_tokens":4,
            "cameras":[{{"name":"{name}","max_age_ms":{max_age_ms}}}]}}"#
    )
}

/// Asks with a camera attached until the daemon has a frame for it.
async fn until_attached(s: &zenoh::Session, name: &str) -> (ErrorCode, String) {
    let start = Instant::now();
    loop {
        let r = refusal(&chat(s, &with_camera(name, 5000), ConsolidationMode::None).await);
        if r.0 != ErrorCode::BadRequest || start.elapsed() > Duration::from_secs(10) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wait_log(d: &Daemon, needle: &str) {
    let start = Instant::now();
    while !d.log().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{needle:?} not logged:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zenoh_key_space_serves_chat_status_cameras_and_liveliness() {
    let models = TempDir::new("zenoh-tiny");
    let model = write_tiny_model(models.path());
    let port = free_port();
    let s = zenoh_session("peer", Some(port), None).await;
    let alive = s
        .liveliness()
        .declare_subscriber(format!("{PREFIX}/alive"))
        .await
        .unwrap();

    let mut d = Daemon::spawn(&config(&model, port), &[]);
    d.wait_ready();

    // The alive token appears with the daemon.
    let sample = tokio::time::timeout(Duration::from_secs(10), alive.recv_async())
        .await
        .expect("the alive token appears")
        .unwrap();
    assert_eq!(sample.kind(), SampleKind::Put);
    assert_eq!(sample.key_expr().as_str(), format!("{PREFIX}/alive"));

    // Streamed chat: one reply per event, all on the same key, so
    // consolidation must be off to see them all...
    let ask = r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":6,"temperature":0}"#;
    let events = chat(&s, ask, ConsolidationMode::None).await;
    assert!(matches!(events[0], Event::Started { .. }), "{events:?}");
    let Some(Event::Finished { usage, .. }) = events.last() else {
        panic!("ends with finished: {events:?}")
    };
    let deltas = events
        .iter()
        .filter(|e| matches!(e, Event::Delta { .. }))
        .count();
    assert!(deltas >= 1 && usage.completion_tokens == 6, "{events:?}");
    assert_eq!(events.len(), deltas + 2);
    // ...while zenoh's default consolidation keeps only the last reply.
    let latest = chat(&s, ask, ConsolidationMode::Auto).await;
    assert_eq!(latest.len(), 1, "{latest:?}");
    assert!(matches!(latest[0], Event::Finished { .. }));

    // Status.
    let replies = s.get(format!("{PREFIX}/status")).await.unwrap();
    let reply = replies.recv_async().await.unwrap();
    let st: Status = serde_json::from_slice(&reply.result().unwrap().payload().to_bytes()).unwrap();
    assert!(st.ready && st.model.name == "tiny", "{st:?}");

    // Fire-and-forget: a request on `requests`, its events on `responses/<id>`.
    let responses = s
        .declare_subscriber(format!("{PREFIX}/responses/r-1"))
        .await
        .unwrap();
    s.put(
        format!("{PREFIX}/requests"),
        r#"{"id":"r-1","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
    )
    .await
    .unwrap();
    let mut published = Vec::new();
    loop {
        let sample = tokio::time::timeout(Duration::from_secs(30), responses.recv_async())
            .await
            .expect("a response event")
            .unwrap();
        let ev: Event = serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
        let end = ev.is_terminal();
        published.push(ev);
        if end {
            break;
        }
    }
    assert!(
        matches!(published.last(), Some(Event::Finished { usage, .. }) if usage.completion_tokens == 3),
        "{published:?}"
    );

    // Malformed chat JSON is answered with a bad_request event.
    let (code, msg) = refusal(&chat(&s, r#"{"messages": 3}"#, ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        msg.contains("not valid JSON of the expected shape"),
        "{msg}"
    );

    // Cameras: unknown, no frame yet, then attached (the text-only model
    // then refuses the image: the frame was resolved), then stale.
    let (code, msg) = refusal(&chat(&s, &with_camera("rear", 1000), ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        msg.contains("unknown camera 'rear': the configured cameras are 'front', 'jpeg', 'png'"),
        "{msg}"
    );
    let (code, msg) =
        refusal(&chat(&s, &with_camera("front", 1000), ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("camera 'front' has no frame yet"), "{msg}");

    s.put("zt/cam/front", vec![128u8; 8 * 6 * 3]).await.unwrap();
    let (code, msg) = until_attached(&s, "front").await;
    assert_eq!(code, ErrorCode::VisionUnsupported, "{msg}");
    // As over HTTP, an image part may name the camera instead.
    let part = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"what?"},
        {"type":"image_url","image_url":{"url":"camera:front?max_age_ms=5000"}}]}],"max_tokens":4}"#;
    let (code, msg) = refusal(&chat(&s, part, ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::VisionUnsupported, "{msg}");
    // The camera registry is shared: the Unix socket attaches the same frame.
    let client = embody_client::Client::connect(&d.socket).await.unwrap();
    let mut req = embody_protocol::Request::user("what is in front?").max_tokens(4);
    req.cameras.push(embody_protocol::CameraRef {
        name: "front".into(),
        max_age_ms: Some(5000),
    });
    let (_, last) = client.chat(req).await.unwrap().collect_text().await;
    assert!(
        matches!(
            last,
            Event::Error {
                code: ErrorCode::VisionUnsupported,
                ..
            }
        ),
        "{last:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, msg) = refusal(&chat(&s, &with_camera("front", 100), ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("over the request's max_age_ms = 100"), "{msg}");

    // A raw frame of the wrong size is refused and logged; the previous
    // frame stays, and the refusal shows in the reply.
    s.put("zt/cam/front", vec![0u8; 10]).await.unwrap();
    wait_log(
        &d,
        "camera frame refused: a raw rgb8 frame of 8x6 needs 144 bytes, the message has 10",
    );
    let (code, msg) = refusal(&chat(&s, &with_camera("front", 100), ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        msg.contains("(its last frame was refused: a raw rgb8 frame"),
        "{msg}"
    );

    // A corrupt PNG.
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend_from_slice(&[0x5a; 64]);
    s.put("zt/cam/png", png).await.unwrap();
    wait_log(&d, "camera frame refused: the PNG image cannot be decoded");
    let (code, msg) = refusal(&chat(&s, &with_camera("png", 1000), ConsolidationMode::None).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        msg.contains("camera 'png' has no frame yet (its last frame was refused: the PNG image cannot be decoded"),
        "{msg}"
    );

    // A 20 MB "JPEG" is refused on its size, before decoding.
    let mut big = vec![0u8; 20 << 20];
    big[..4].copy_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    // (Blocking congestion control: zenoh's default drops what does not fit its queues.)
    s.put("zt/cam/jpeg", big)
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .await
        .unwrap();
    wait_log(
        &d,
        "camera frame refused: the message is 20971520 bytes, over the camera's max_bytes = 16777216",
    );
    // A 100 MB one is over zenoh.max_message_bytes (32 MiB): zenoh drops it
    // before the daemon holds it, and the daemon never hears of it.
    let mut huge = vec![0u8; 100 << 20];
    huge[..4].copy_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    s.put("zt/cam/jpeg", huge)
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .await
        .unwrap();

    // Still serving after all of it.
    let events = chat(&s, ask, ConsolidationMode::None).await;
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{events:?}"
    );
    assert!(!d.log().contains("panicked"), "{}", d.log());
    assert!(!d.log().contains("104857600"), "{}", d.log());

    // The zenoh requests are counted in /metrics, the refused one too.
    assert!(d.requests_total("zenoh", "ok") >= 2);
    assert!(d.requests_total("zenoh", "client_error") >= 1);

    // The alive token goes with the daemon.
    d.signal(libc::SIGTERM);
    let gone = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let sample = alive.recv_async().await.unwrap();
            if sample.kind() == SampleKind::Delete {
                return sample;
            }
        }
    })
    .await
    .expect("the alive token disappears");
    assert_eq!(gone.key_expr().as_str(), format!("{PREFIX}/alive"));
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0),
        "{}",
        d.log()
    );
    s.close().await.unwrap();
}
