//! The runtime with its real actors over real model files: the tiny random
//! model where any model does, SmolLM2 where a request must run long enough
//! to be interrupted.

use std::time::{Duration, Instant};

use embody_actors::{Limits, Runtime, RuntimeConfig, RuntimeError};
use embody_protocol::{ErrorCode, Event, Fault, FinishReason, Image, Request, SamplingParams};
use embody_tests::{model, write_tiny_model, TempDir};

fn config(model_path: std::path::PathBuf) -> RuntimeConfig {
    RuntimeConfig {
        model_path,
        threads: 1,
        kv_cache_mb: 16,
        max_running: 2,
        restart_backoff: Duration::from_millis(20),
        limits: Limits {
            max_queued: 8,
            fault_injection: true,
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    }
}

async fn tiny(dir: &TempDir) -> Runtime {
    Runtime::start(config(write_tiny_model(dir.path())))
        .await
        .expect("tiny model starts")
}

async fn smollm2() -> Runtime {
    let mut cfg = config(model("SmolLM2-135M-Instruct.Q4_1.gguf"));
    cfg.threads = 2;
    Runtime::start(cfg).await.expect("SmolLM2 starts")
}

fn greedy(text: &str, max_tokens: u32) -> Request {
    Request::user(text)
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

/// Every event of a stream, with a time limit so that a hang fails the test.
async fn collect(mut s: embody_actors::EventStream) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(ev) = tokio::time::timeout_at(deadline.into(), s.next())
        .await
        .expect("the stream ended in time")
    {
        out.push(ev);
    }
    out
}

fn error_code(events: &[Event]) -> Option<ErrorCode> {
    match events.last() {
        Some(Event::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

fn finished(events: &[Event]) -> Option<(FinishReason, u32)> {
    match events.last() {
        Some(Event::Finished { reason, usage }) => Some((*reason, usage.completion_tokens)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_streams_started_deltas_and_finished() {
    let dir = TempDir::new("embody-actors");
    let rt = tiny(&dir).await;
    let events = collect(rt.submit(greedy("hello there", 12)).await).await;
    assert!(
        matches!(events[0], Event::Started { prompt_tokens } if prompt_tokens > 5),
        "{events:?}"
    );
    let (reason, completion) = finished(&events).expect("finished");
    let delta_tokens: usize = events
        .iter()
        .map(|e| match e {
            Event::Delta { token_ids, .. } => token_ids.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(delta_tokens, completion as usize);
    assert!(reason == FinishReason::Length && completion == 12 || reason == FinishReason::Stop);
    // Exactly one terminal event, at the end.
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    let st = rt.status().await.unwrap();
    assert!(st.ready && st.healthy);
    assert_eq!(st.model.name, "tiny");
    assert_eq!(st.model.context_length, 256);
    assert!(st.steps >= 1);
    assert!(st.kv_blocks_total > 0);
    assert_eq!((st.running, st.queued), (0, 0));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_one_error_event() {
    let dir = TempDir::new("embody-actors");
    let rt = tiny(&dir).await;
    let mut with_image = greedy("what is this?", 4);
    with_image.images.push(Image {
        media_type: "image/png".into(),
        data: vec![0x89, b'P', b'N', b'G'],
    });
    let ev = collect(rt.submit(with_image).await).await;
    assert_eq!(
        error_code(&ev),
        Some(ErrorCode::VisionUnsupported),
        "{ev:?}"
    );
    assert_eq!(ev.len(), 1);
    let Event::Error { message, .. } = &ev[0] else {
        unreachable!()
    };
    assert!(
        message.contains("'tiny'") && message.contains("no vision support"),
        "{message}"
    );

    let cases = [
        (Request::new(vec![]), "at least one message"),
        (greedy("x", 0), "max_tokens must be at least 1"),
        (greedy("x", 100_000), "over this daemon's limit"),
        (
            greedy("x", 4).sampling(SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            }),
            "top_p",
        ),
        (greedy(&"long ".repeat(300), 4), "the context holds 256"),
        (
            Request {
                response_format: Some(serde_json::json!({"type": "json_schema",
                    "json_schema": {"name": "n", "schema": {"type": "frobnicate"}}})),
                ..greedy("x", 4)
            },
            "the JSON schema cannot be enforced",
        ),
        (
            Request {
                response_format: Some(serde_json::json!({"type": "yaml"})),
                ..greedy("x", 4)
            },
            "response_format",
        ),
        (
            Request {
                tool_choice: Some(embody_protocol::ToolChoice::Required),
                ..greedy("x", 4)
            },
            "no tools are given",
        ),
    ];
    for (req, want) in cases {
        let ev = collect(rt.submit(req).await).await;
        match &ev[..] {
            [Event::Error {
                code: ErrorCode::BadRequest,
                message,
            }] => assert!(message.contains(want), "{message} lacks {want}"),
            other => panic!("{want}: {other:?}"),
        }
    }
    // Even random weights answer JSON under a json_object constraint.
    let req = Request {
        response_format: Some(serde_json::json!({"type": "json_object"})),
        ..greedy("x", 40)
    };
    let ev = collect(rt.submit(req).await).await;
    let text: String = ev
        .iter()
        .filter_map(|e| match e {
            Event::Delta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    if matches!(
        ev.last(),
        Some(Event::Finished {
            reason: embody_protocol::FinishReason::Stop,
            ..
        })
    ) {
        assert!(
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap()
                .is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_refs_resolve_to_the_latest_frame_or_are_refused_by_name() {
    use embody_actors::Frame;
    use embody_protocol::CameraRef;
    use std::time::SystemTime;

    let dir = TempDir::new("rt-cameras");
    let rt = tiny(&dir).await;
    let with_cam = |name: &str, max_age_ms: Option<u64>| {
        let mut r = greedy("what do you see?", 4);
        r.cameras.push(CameraRef {
            name: name.into(),
            max_age_ms,
        });
        r
    };
    let refusal = |ev: Vec<Event>| match &ev[..] {
        [Event::Error { code, message }] => (*code, message.clone()),
        other => panic!("one error event expected: {other:?}"),
    };

    let (code, msg) = refusal(collect(rt.submit(with_cam("front", None)).await).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("unknown camera 'front'"), "{msg}");

    rt.cameras().register("front");
    let (code, msg) = refusal(collect(rt.submit(with_cam("front", None)).await).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("camera 'front' has no frame yet"), "{msg}");

    let frame = |age: Duration| Frame {
        image: Image {
            media_type: "image/png".into(),
            data: vec![0x89, b'P', b'N', b'G'],
        },
        width: 1,
        height: 1,
        stamp: SystemTime::now() - age,
    };
    rt.cameras()
        .put("front", frame(Duration::from_secs(5)))
        .unwrap();
    let (code, msg) = refusal(collect(rt.submit(with_cam("front", Some(1000))).await).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        msg.contains("over the request's max_age_ms = 1000"),
        "{msg}"
    );

    // A fresh frame is attached; the text-only model then refuses the image,
    // which tells an attached frame apart from a refused camera.
    rt.cameras().put("front", frame(Duration::ZERO)).unwrap();
    let (code, msg) = refusal(collect(rt.submit(with_cam("front", Some(1000))).await).await);
    assert_eq!(code, ErrorCode::VisionUnsupported, "{msg}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_overloaded_and_cancel_ends_queued_requests() {
    let dir = TempDir::new("embody-actors");
    let mut cfg = config(write_tiny_model(dir.path()));
    cfg.limits.max_queued = 2;
    let rt = Runtime::start(cfg).await.unwrap();
    // Freeze the decoder so that submissions stay queued.
    rt.inject_fault(Fault::WedgeDecoder { ms: 600 }).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = rt.submit(greedy("a", 4)).await;
    let b = rt.submit(greedy("b", 4)).await;
    let c = collect(rt.submit(greedy("c", 4)).await).await;
    assert_eq!(error_code(&c), Some(ErrorCode::Overloaded), "{c:?}");
    assert_eq!(rt.status().await.unwrap().queued, 2);
    assert!(rt.cancel(b.id()));
    let b = collect(b).await;
    assert_eq!(finished(&b), Some((FinishReason::Cancelled, 0)));
    // The wedge ends and the other queued request runs.
    let a = collect(a).await;
    assert!(
        matches!(
            finished(&a),
            Some((FinishReason::Length | FinishReason::Stop, _))
        ),
        "{a:?}"
    );
    assert!(!rt.cancel(u64::MAX), "unknown ids are not live");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_decoder_progress() {
    let dir = TempDir::new("embody-actors");
    let mut cfg = config(write_tiny_model(dir.path()));
    cfg.limits.stall_timeout = Duration::from_millis(200);
    // The wedged decoder is replaced after this backoff.
    cfg.restart_backoff = Duration::from_millis(1000);
    let rt = Runtime::start(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rt.health().healthy, "an idle decoder is healthy");
    rt.inject_fault(Fault::WedgeDecoder { ms: 5000 }).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h = rt.health();
    assert!(
        !h.healthy && h.since_progress >= Duration::from_millis(200),
        "{h:?}"
    );
    let st = rt.status().await.unwrap();
    assert!(!st.healthy && !st.ready, "{st:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(rt.health().healthy, "healthy again once replaced");
    let st = rt.status().await.unwrap();
    assert!(st.ready && st.decoder_restarts == 1, "{st:?}");
    let a = collect(rt.submit(greedy("a", 4)).await).await;
    assert!(finished(&a).is_some(), "the new decoder serves: {a:?}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_refused_when_off() {
    let dir = TempDir::new("embody-actors");
    let mut cfg = config(write_tiny_model(dir.path()));
    cfg.limits.fault_injection = false;
    let rt = Runtime::start(cfg).await.unwrap();
    let err = rt.inject_fault(Fault::PanicDecoder).unwrap_err();
    assert!(matches!(err, RuntimeError::FaultInjectionOff));
    assert!(err.to_string().contains("fault_injection = true"));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_file_is_a_typed_error_naming_it() {
    let err = Runtime::start(config("/nonexistent/model.gguf".into()))
        .await
        .err()
        .expect("start fails");
    match &err {
        RuntimeError::Model { path, .. } => {
            assert_eq!(path.to_str(), Some("/nonexistent/model.gguf"))
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_panic_fails_running_requests_and_serves_queued_ones() {
    let rt = smollm2().await;
    let mut cfg_limits = rt.limits();
    cfg_limits.max_queued = 8;
    rt.set_limits(cfg_limits);
    // Two run (max_running = 2), two wait.
    let mut running = Vec::new();
    for q in ["Describe a robot arm.", "Describe a wheel."] {
        running.push(rt.submit(greedy(q, 200)).await);
    }
    let queued = [
        rt.submit(greedy("Say yes.", 4)).await,
        rt.submit(greedy("Say no.", 4)).await,
    ];
    // Wait until both running requests stream text.
    for s in &mut running {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), s.next())
                .await
                .unwrap()
            {
                Some(Event::Delta { .. }) => break,
                Some(Event::Started { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    rt.inject_fault(Fault::PanicDecoder).unwrap();
    for s in running {
        let ev = collect(s).await;
        match ev.last() {
            Some(Event::Error {
                code: ErrorCode::DecoderRestarted,
                message,
            }) => assert!(message.contains("fault injection"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    for s in queued {
        let ev = collect(s).await;
        assert!(
            matches!(
                finished(&ev),
                Some((FinishReason::Length | FinishReason::Stop, _))
            ),
            "{ev:?}"
        );
        assert!(matches!(ev[0], Event::Started { .. }));
    }
    let st = rt.status().await.unwrap();
    assert_eq!(st.decoder_restarts, 1);
    assert!(st.ready && st.healthy);
    // Served as before.
    let ev = collect(rt.submit(greedy("Say hi.", 4)).await).await;
    assert!(finished(&ev).is_some(), "{ev:?}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_its_request_and_frees_the_slot() {
    let rt = smollm2().await;
    let mut s = rt
        .submit(greedy("Write a long story about a robot.", 400))
        .await;
    while !matches!(s.next().await, Some(Event::Delta { .. })) {}
    assert_eq!(rt.status().await.unwrap().running, 1);
    drop(s);
    let start = Instant::now();
    loop {
        let st = rt.status().await.unwrap();
        if st.running == 0 && st.kv_blocks_used == st.kv_blocks_cached {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was not freed: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_running_requests_and_refuses_new_ones() {
    let dir = TempDir::new("embody-actors");
    let rt = tiny(&dir).await;
    let a = rt.submit(greedy("a b c", 50)).await;
    let report = rt.drain(Duration::from_secs(10)).await;
    assert!(report.complete, "{report:?}");
    let ev = collect(a).await;
    assert!(finished(&ev).is_some(), "{ev:?}");
    let refused = collect(rt.submit(greedy("late", 4)).await).await;
    assert_eq!(error_code(&refused), Some(ErrorCode::Unavailable));
    assert!(rt.status().await.unwrap().draining);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_crash_loop_ends_queued_requests_instead_of_holding_them() {
    let dir = TempDir::new("embody-actors");
    let mut cfg = config(write_tiny_model(dir.path()));
    cfg.restart_backoff = Duration::from_millis(300);
    let rt = Runtime::start(cfg).await.unwrap();
    // Each new decoder finds a panic waiting before it can take the request:
    // failures in a row without progress.
    rt.inject_fault(Fault::WedgeDecoder { ms: 200 }).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let queued = rt.submit(greedy("hello", 4)).await;
    rt.inject_fault(Fault::PanicDecoder).unwrap();
    for n in 1..=2u64 {
        let start = Instant::now();
        while rt.status().await.unwrap().decoder_restarts < n {
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // During the backoff, before the next decoder starts.
        rt.inject_fault(Fault::PanicDecoder).unwrap();
    }
    let ev = collect(queued).await;
    match ev.as_slice() {
        [Event::Error {
            code: ErrorCode::Unavailable,
            message,
        }] => assert!(message.contains("3 times in a row"), "{message}"),
        other => panic!("{other:?}"),
    }
    // It recovers once the faults stop.
    let ev = collect(rt.submit(greedy("again", 4)).await).await;
    assert!(finished(&ev).is_some(), "{ev:?}");
    assert_eq!(rt.status().await.unwrap().decoder_restarts, 3);
    rt.shutdown().await;
}
