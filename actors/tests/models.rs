//! Several models in one runtime, and their life: requests routed by name,
//! loads, swaps under load, unloads, the idle unload, the memory budget and
//! the state events. Real actors over real model files: the tiny random
//! model and SmolLM2.

use std::time::{Duration, Instant};

use embody_actors::{memory_estimate, Limits, Runtime, RuntimeConfig, RuntimeOptions};
use embody_protocol::{
    ErrorCode, Event, FinishReason, ModelEntry, ModelSpec, ModelState, Request, SamplingParams,
};
use embody_tests::{model, write_tiny_model, TempDir};

fn config(name: &str, model_path: std::path::PathBuf) -> RuntimeConfig {
    RuntimeConfig {
        name: name.into(),
        model_path,
        threads: 1,
        kv_cache_mb: 16,
        max_running: 4,
        restart_backoff: Duration::from_millis(20),
        limits: Limits {
            max_queued: 16,
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    }
}

fn smol_path() -> std::path::PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn greedy(text: &str, max_tokens: u32) -> Request {
    Request::user(text)
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

/// The text of a stream and how it ended, with a time limit.
async fn answer(mut s: embody_actors::EventStream) -> (String, Event) {
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), s.next())
            .await
            .expect("the stream ended in time")
            .expect("a terminal event");
        match ev {
            Event::Delta { text: t, .. } => text.push_str(&t),
            ev if ev.is_terminal() => return (text, ev),
            _ => {}
        }
    }
}

async fn ask(rt: &Runtime, model: Option<&str>, text: &str, n: u32) -> (String, Event) {
    let mut req = greedy(text, n);
    req.model = model.map(str::to_string);
    answer(rt.submit(req).await).await
}

fn finished(ev: &Event) -> bool {
    matches!(ev, Event::Finished { reason, .. } if *reason != FinishReason::Cancelled)
}

async fn entry(rt: &Runtime, name: &str) -> ModelEntry {
    let st = rt.status().await.expect("status");
    st.models
        .into_iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} is listed"))
}

/// The answer a runtime serving only `cfg` gives.
async fn alone(cfg: RuntimeConfig, text: &str, n: u32) -> String {
    let rt = Runtime::start(cfg).await.expect("starts");
    let (t, end) = ask(&rt, None, text, n).await;
    assert!(finished(&end), "{end:?}");
    rt.shutdown().await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_model_they_name() {
    let dir = TempDir::new("embody-models");
    let tiny = write_tiny_model(dir.path());
    let prompt = "Name a robot sensor.";
    let tiny_alone = alone(config("x", tiny.clone()), prompt, 12).await;
    let smol_alone = alone(config("x", smol_path()), prompt, 12).await;
    assert_ne!(tiny_alone, smol_alone, "the two models answer differently");

    let rt = Runtime::start_models(
        vec![config("tiny", tiny), config("smol", smol_path())],
        RuntimeOptions::default(),
    )
    .await
    .expect("both start");
    let (t, end) = ask(&rt, Some("smol"), prompt, 12).await;
    assert!(finished(&end), "{end:?}");
    assert_eq!(t, smol_alone, "the request named smol");
    let (t, _) = ask(&rt, Some("tiny"), prompt, 12).await;
    assert_eq!(t, tiny_alone, "the request named tiny");
    let (t, _) = ask(&rt, None, prompt, 12).await;
    assert_eq!(t, tiny_alone, "no name: the first model");
    // The file's name also names a loaded model.
    let (t, _) = ask(&rt, Some("SmolLM2-135M-Instruct.Q4_1.gguf"), prompt, 12).await;
    assert_eq!(t, smol_alone);

    let (_, end) = ask(&rt, Some("gpt-4o"), prompt, 4).await;
    match end {
        Event::Error { code, message } => {
            assert_eq!(code, ErrorCode::ModelNotFound);
            assert!(message.contains("tiny, smol"), "{message}");
        }
        other => panic!("an unknown model is refused: {other:?}"),
    }

    let st = rt.status().await.unwrap();
    let names: Vec<(&str, ModelState)> = st
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.state))
        .collect();
    assert_eq!(
        names,
        [("tiny", ModelState::Ready), ("smol", ModelState::Ready)]
    );
    let smol = &st.models[1];
    assert_eq!(smol.arch, "llama");
    assert!(smol.tools && !smol.vision && smol.context_length > 0);
    assert_eq!(
        smol.memory_bytes,
        memory_estimate(&config("smol", smol_path()))
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_under_load_loses_no_request() {
    let dir = TempDir::new("embody-models");
    let tiny = write_tiny_model(dir.path());
    let prompt = "Count from one to fifty in words.";
    let tiny_alone = alone(config("x", tiny.clone()), prompt, 8).await;
    let rt = Runtime::start(config("m", smol_path())).await.unwrap();
    let mut events = rt.model_events();

    // Six requests on the old copy, four of them running and two queued.
    let mut running = Vec::new();
    for _ in 0..6 {
        let mut req = greedy(prompt, 48);
        req.model = Some("m".into());
        let s = rt.submit(req).await;
        running.push(tokio::spawn(answer(s)));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spec = ModelSpec {
        name: "m".into(),
        path: tiny.display().to_string(),
        ..ModelSpec::default()
    };
    let loaded = rt.load(spec).await.expect("the swap loads");
    assert_eq!(loaded.state, ModelState::Ready);
    assert_eq!(loaded.path, tiny.display().to_string());

    // New requests go to the new copy.
    let (t, end) = ask(&rt, Some("m"), prompt, 8).await;
    assert!(finished(&end), "{end:?}");
    assert_eq!(t, tiny_alone);

    // Every request of the old copy finished there.
    let mut done = 0;
    for r in running {
        let (text, end) = r.await.unwrap();
        assert!(finished(&end), "a request on the old copy ended {end:?}");
        assert!(!text.is_empty());
        done += 1;
    }
    assert_eq!(done, 6);

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.state);
    }
    assert_eq!(seen, [ModelState::Loading, ModelState::Ready]);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_leaves_the_old_copy_serving() {
    let dir = TempDir::new("embody-models");
    let rt = Runtime::start(config("m", write_tiny_model(dir.path())))
        .await
        .unwrap();
    let bad = dir.path().join("not-a-model.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    let err = rt
        .load(ModelSpec {
            name: "m".into(),
            path: bad.display().to_string(),
            ..ModelSpec::default()
        })
        .await
        .expect_err("a broken file does not load");
    assert_eq!(err.code, ErrorCode::ModelError);
    assert!(
        err.message.contains("\"m\" did not load"),
        "{}",
        err.message
    );
    let e = entry(&rt, "m").await;
    assert_eq!(e.state, ModelState::Ready);
    assert!(e.error.is_some());
    let (_, end) = ask(&rt, Some("m"), "hello", 4).await;
    assert!(finished(&end), "{end:?}");

    // A new name with a broken file is listed as failed and refuses requests.
    let err = rt
        .load(ModelSpec {
            name: "broken".into(),
            path: bad.display().to_string(),
            ..ModelSpec::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ModelError);
    assert_eq!(entry(&rt, "broken").await.state, ModelState::Failed);
    let (_, end) = ask(&rt, Some("broken"), "hello", 4).await;
    assert!(
        matches!(&end, Event::Error { code: ErrorCode::Unavailable, message } if message.contains("failed to load")),
        "{end:?}"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_over_the_memory_budget_is_refused_with_what_is_missing() {
    let dir = TempDir::new("embody-models");
    let tiny = write_tiny_model(dir.path());
    let first = config("tiny", tiny);
    let budget = memory_estimate(&first) + (8 << 20);
    let rt = Runtime::start_models(
        vec![first],
        RuntimeOptions {
            memory_budget: Some(budget),
            ..RuntimeOptions::default()
        },
    )
    .await
    .unwrap();
    let err = rt
        .load(ModelSpec {
            name: "smol".into(),
            path: smol_path().display().to_string(),
            ..ModelSpec::default()
        })
        .await
        .expect_err("over the budget");
    assert_eq!(err.code, ErrorCode::OutOfMemory);
    let need = memory_estimate(&RuntimeConfig {
        kv_cache_mb: 16,
        ..config("smol", smol_path())
    });
    let missing = (need - (8 << 20)).div_ceil(1 << 20);
    assert!(
        err.message.contains(&format!("{missing} MiB are missing")),
        "{} (expected {missing} MiB missing)",
        err.message
    );
    assert_eq!(
        rt.model_names(),
        ["tiny"],
        "the refused model is not listed"
    );
    // A smaller KV cache does not make SmolLM2's weights fit either; the
    // tiny model's own reload does (its memory is counted once).
    let ok = rt
        .load(ModelSpec {
            name: "tiny".into(),
            ..ModelSpec::default()
        })
        .await;
    assert!(
        matches!(&ok, Err(e) if e.code == ErrorCode::OutOfMemory),
        "a swap holds both copies for a while, so it must fit twice: {ok:?}"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloaded_and_idle_models_come_back_on_the_next_request() {
    let dir = TempDir::new("embody-models");
    let tiny = write_tiny_model(dir.path());
    let mut idle = config("idle", tiny.clone());
    idle.keep_alive = Some(Duration::from_millis(300));
    let mut lazy = config("lazy", tiny.clone());
    lazy.load_at_start = false;
    let rt = Runtime::start_models(
        vec![config("main", tiny), idle, lazy],
        RuntimeOptions::default(),
    )
    .await
    .unwrap();
    let mut events = rt.model_events();
    assert_eq!(entry(&rt, "lazy").await.state, ModelState::Unloaded);
    assert_eq!(entry(&rt, "idle").await.state, ModelState::Ready);

    // The idle model goes after its keep_alive without requests.
    let start = Instant::now();
    while entry(&rt, "idle").await.state != ModelState::Unloaded {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the idle model is unloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(entry(&rt, "idle").await.memory_bytes, 0);
    assert_eq!(
        entry(&rt, "main").await.state,
        ModelState::Ready,
        "no keep_alive: stays"
    );

    // A request loads the lazy one and the unloaded one.
    for name in ["lazy", "idle"] {
        let (_, end) = ask(&rt, Some(name), "hello", 4).await;
        assert!(finished(&end), "{name}: {end:?}");
        assert_eq!(entry(&rt, name).await.state, ModelState::Ready);
    }

    // An unload waits for the model's requests, then frees it.
    let long = {
        let mut req = greedy("Tell a story.", 40);
        req.model = Some("main".into());
        rt.submit(req).await
    };
    let long = tokio::spawn(answer(long));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = rt.unload("main").await.expect("unloads");
    assert_eq!(e.state, ModelState::Unloaded);
    let (_, end) = long.await.unwrap();
    assert!(
        finished(&end),
        "the running request finished first: {end:?}"
    );

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push((e.name, e.state));
    }
    let want = [
        ("idle", ModelState::Draining),
        ("idle", ModelState::Unloaded),
        ("lazy", ModelState::Loading),
        ("lazy", ModelState::Ready),
        ("idle", ModelState::Loading),
        ("idle", ModelState::Ready),
        ("main", ModelState::Draining),
        ("main", ModelState::Unloaded),
    ];
    // In this order (the idle model may go idle again in between).
    let mut rest = seen.iter().map(|(n, s)| (n.as_str(), *s));
    for w in want {
        assert!(rest.any(|e| e == w), "{w:?} follows in {seen:?}");
    }
    let err = rt.unload("nope").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ModelNotFound);
    rt.shutdown().await;
}
