//! A camera streaming 640x480 frames at 30 Hz into `embodyd` while SmolLM2
//! is kept busy generating, and a perception task attaching the camera's
//! latest frame four times a second: over 20 s, the daemon's resident memory
//! and the age of the frame each task run attaches must stay bounded
//! (latest frame wins; nothing queues up). Along the way: the daemon starts
//! with its router endpoint dead (nothing listens there) and connects once
//! something listens there, a local client reaches it on its listen
//! endpoint, and task results carry the vision error of the text-only
//! model, with the frame that was attached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use embody_tests::{free_port, smollm2, test_config, Daemon};
use zenoh::query::ConsolidationMode;

const PREFIX: &str = "embody/soak";
const SOAK: Duration = Duration::from_secs(20);
const WARMUP: Duration = Duration::from_secs(5);

/// CPU seconds of each thread of a process, by thread name, most first.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by_name = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("stat")),
        ) else {
            continue;
        };
        // Fields after the parenthesised name: utime and stime are the 12th and 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        *by_name.entry(comm.trim().to_string()).or_insert(0.0) += ticks / 100.0;
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_hz_camera_under_load_keeps_memory_and_frame_age_bounded() {
    let (listen, dead) = (free_port(), free_port());
    // One compute thread: on two shared cores the camera thread and the
    // decoder's threads would otherwise preempt each other.
    let config = test_config(
        &smollm2(),
        &format!(
            r#"[zenoh]
listen = ["tcp/127.0.0.1:{listen}"]
connect = ["tcp/127.0.0.1:{dead}"]
node = "soak"

[ros2]
enabled = false

[[cameras]]
name = "front"
key = "soak/front"
format = "rgb8"
width = 640
height = 480

[[cameras]]
name = "idle"
key = "soak/idle"
format = "jpeg"

[[tasks]]
name = "watch"
camera = "front"
prompt = "What is in front of the robot?"
period_ms = 250
max_age_ms = 5000

[[tasks]]
name = "idle"
camera = "idle"
prompt = "Anything there?"
period_ms = 500
"#
        ),
    );
    let d = Daemon::start(&config.replace("threads = 2", "threads = 1"));
    let pid = d.pid();

    let s = embody_tests::zenoh_session("client", None, Some(listen)).await;
    let watch = s
        .declare_subscriber(format!("{PREFIX}/tasks/watch"))
        .await
        .unwrap();
    let idle = s
        .declare_subscriber(format!("{PREFIX}/tasks/idle"))
        .await
        .unwrap();

    let done = Arc::new(AtomicBool::new(false));
    // The camera: 30 frames a second, each a different grey.
    let camera = {
        let (s, done) = (s.clone(), done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(33));
            let mut n = 0u8;
            while !done.load(Ordering::SeqCst) {
                tick.tick().await;
                n = n.wrapping_add(1);
                s.put("soak/front", vec![n; 640 * 480 * 3]).await.unwrap();
            }
        })
    };
    // The model kept busy: two conversations generating back to back.
    let mut load = Vec::new();
    for i in 0..2 {
        let (s, done) = (s.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut tokens = 0u64;
            while !done.load(Ordering::SeqCst) {
                let ask = format!(
                    r#"{{"messages":[{{"role":"user","content":"Tell story number {i} about a robot."}}],"max_tokens":48}}"#
                );
                let replies = s
                    .get(format!("{PREFIX}/chat"))
                    .payload(ask)
                    .consolidation(ConsolidationMode::None)
                    .timeout(Duration::from_secs(60))
                    .await
                    .unwrap();
                while let Ok(r) = replies.recv_async().await {
                    let Ok(sample) = r.result() else { break };
                    let ev: serde_json::Value =
                        serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
                    if ev["type"] == "finished" {
                        tokens += ev["usage"]["completion_tokens"].as_u64().unwrap();
                    }
                }
            }
            tokens
        }));
    }

    let start = Instant::now();
    let mut rss = Vec::new();
    let mut results = Vec::new();
    let mut next_sample = start;
    while start.elapsed() < SOAK {
        if Instant::now() >= next_sample {
            rss.push((start.elapsed(), embody_tests::proc_memory(pid, "VmRSS")));
            next_sample += Duration::from_millis(500);
        }
        if let Ok(Ok(sample)) =
            tokio::time::timeout(Duration::from_millis(100), watch.recv_async()).await
        {
            let v: serde_json::Value =
                serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
            results.push((start.elapsed(), v));
        }
    }
    done.store(true, Ordering::SeqCst);
    println!("soak: daemon CPU seconds by thread: {:?}", thread_cpu(pid));
    camera.await.unwrap();
    println!(
        "soak: rss MiB {:?}",
        rss.iter()
            .map(|(t, b)| (t.as_millis(), b >> 20))
            .collect::<Vec<_>>()
    );
    let mut generated = 0;
    for l in load {
        generated += l.await.unwrap();
    }

    // Frame age: every run after the first frames attached a recent frame,
    // and the text-only model refused it with vision_unsupported.
    let after_warmup: Vec<&serde_json::Value> = results
        .iter()
        .filter(|(t, _)| *t > Duration::from_secs(2))
        .map(|(_, v)| v)
        .collect();
    assert!(
        after_warmup.len() >= 40,
        "task results: {} in {SOAK:?}",
        after_warmup.len()
    );
    let ages: Vec<u64> = after_warmup
        .iter()
        .map(|v| {
            assert_eq!(v["error"]["code"], "vision_unsupported", "{v}");
            assert!(v["text"] == "" && v["frame"]["width"] == 640, "{v}");
            v["frame"]["age_ms"]
                .as_u64()
                .expect("the attached frame's age")
        })
        .collect();
    // Bounded and not growing: queued frames would age by seconds. (The
    // bound is loose because a loaded 2-core machine delays the camera
    // thread itself.)
    let worst_age = *ages.iter().max().unwrap();
    let third = ages.len() / 3;
    let mean = |a: &[u64]| a.iter().sum::<u64>() / a.len() as u64;
    let (early, late) = (mean(&ages[..third]), mean(&ages[ages.len() - third..]));
    assert!(
        worst_age < 2000 && late < early + 500,
        "frame ages (ms), early mean {early}, late mean {late}: {ages:?}"
    );

    // Memory: after warm-up, resident memory stays flat. Queued frames would
    // add 27 MB a second.
    let base = rss
        .iter()
        .filter(|(t, _)| *t >= WARMUP && *t < WARMUP + Duration::from_secs(2))
        .map(|(_, b)| *b)
        .max()
        .unwrap();
    let peak = rss
        .iter()
        .filter(|(t, _)| *t >= WARMUP)
        .map(|(_, b)| *b)
        .max()
        .unwrap();
    let growth = peak.saturating_sub(base);
    assert!(
        growth < 32 << 20,
        "RSS grew {} MiB after warm-up: {:?}",
        growth >> 20,
        rss.iter()
            .map(|(t, b)| (t.as_millis(), b >> 20))
            .collect::<Vec<_>>()
    );
    assert!(
        generated >= 96,
        "the model generated while the camera streamed: {generated} tokens"
    );

    // A task whose camera never sent a frame reports that, without a frame.
    let sample = tokio::time::timeout(Duration::from_secs(5), idle.recv_async())
        .await
        .expect("an idle task result")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("camera 'idle' has no frame yet")
            && v["frame"].is_null(),
        "{v}"
    );
    let log = d.log();
    assert!(
        log.matches("perception task failed: vision_unsupported")
            .count()
            == 1
            && log
                .matches("perception task failed: bad_request: camera 'idle' has no frame yet")
                .count()
                == 1,
        "each task's failure is logged once:\n{log}"
    );
    println!(
        "soak: {} task results, frame age mean {early} ms early, {late} ms late, max {worst_age} ms; RSS base {} MiB, peak {} MiB; {generated} tokens generated",
        results.len(),
        base >> 20,
        peak >> 20
    );
    s.close().await.unwrap();

    // The endpoint that was dead all along comes up (a router started after
    // the daemon): the daemon, still retrying in the background, connects.
    let late = embody_tests::zenoh_session("peer", Some(dead), None).await;
    let start = Instant::now();
    loop {
        let replies = late
            .liveliness()
            .get(format!("{PREFIX}/alive"))
            .timeout(Duration::from_secs(1))
            .await
            .unwrap();
        if replies.recv_async().await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the daemon never connected to the late endpoint"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    late.close().await.unwrap();
}
