//! embodyd sees: the tiny random-weight Qwen2-VL and Qwen2.5-VL folders of
//! `tests/fixtures/hf/` (written by `scripts/gen-vision-fixtures.py` with
//! transformers) served by the daemon answer questions about their images
//! with transformers' greedy tokens: over IPC with image bytes (two images in
//! one request), and over HTTP with the official openai client and data:
//! URLs, where broken and unusable images are refused with a 400 and the
//! daemon keeps serving. Asking again about the same images reuses their
//! encoded rows and the prompt's KV.

use embody_client::Client;
use embody_engine::tokenizer::Tokenizer;
use embody_protocol::{Event, Image, Message, Request, Role, SamplingParams};
use embody_tests::{status, test_config, vision_fixture as fixture, Daemon};

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..SamplingParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipc_answers_about_two_images_with_transformers_tokens() {
    let f = fixture("qwen2vl");
    let d = Daemon::start(&test_config(&f.dir, ""));
    let st = status(&d.socket).unwrap();
    assert!(st.model.vision, "status says the model sees");
    let client = Client::connect(&d.socket).await.unwrap();
    for round in 0..2 {
        let mut req = Request::new(vec![Message::new(Role::User, f.prompt.clone())]);
        req.images = f
            .images
            .iter()
            .map(|b| Image {
                media_type: "image/png".into(),
                data: b.clone(),
            })
            .collect();
        req.sampling = greedy();
        req.max_tokens = Some(f.generated.len() as u32);
        let mut s = client.chat(req).await.unwrap();
        let mut ids = Vec::new();
        loop {
            match s.next().await.unwrap() {
                Event::Delta { token_ids, .. } => ids.extend(token_ids),
                ev if ev.is_terminal() => {
                    assert!(matches!(ev, Event::Finished { .. }), "{ev:?}\n{}", d.log());
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(ids, f.generated, "round {round}\n{}", d.log());
    }
    let st = status(&d.socket).unwrap();
    assert!(
        st.prefix_hit_tokens > 20,
        "the second round reused the first's KV, images included: {} tokens",
        st.prefix_hit_tokens
    );
}

#[test]
fn the_openai_client_sends_images_as_data_urls() {
    let f = fixture("qwen25vl");
    let tok = Tokenizer::from_hf_dir(&f.dir).unwrap();
    let expected = tok.decode(&f.generated, true).unwrap();
    let d = Daemon::start(&test_config(&f.dir, ""));
    let dir = f.dir.to_str().unwrap();
    let stdout = d.python_checks("vision_openai.py", &[&d.http_url(), dir, &expected]);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        5,
        "{stdout}"
    );
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// A zenoh camera and a perception task on a vision-language model: the
/// task's runs attach the camera's latest frame, the model sees it, and the
/// results carry answers (no `vision_unsupported` any more) with the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perception_tasks_answer_about_zenoh_camera_frames() {
    let f = fixture("qwen25vl");
    let listen = embody_tests::free_port();
    let config = test_config(
        &f.dir,
        &format!(
            r#"[zenoh]
listen = ["tcp/127.0.0.1:{listen}"]
connect = []
node = "eyes"

[ros2]
enabled = false

[[cameras]]
name = "front"
key = "eyes/front"
format = "png"

[[tasks]]
name = "look"
camera = "front"
prompt = "{}"
period_ms = 300
max_tokens = 4
max_age_ms = 5000
"#,
            f.prompt
        ),
    );
    let d = Daemon::start(&config);
    let s = embody_tests::zenoh_session("client", None, Some(listen)).await;
    let results = s
        .declare_subscriber("embody/eyes/tasks/look")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut answers = 0;
    while answers < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no answers in 30 s\n{}",
            d.log()
        );
        s.put("eyes/front", f.images[0].clone()).await.unwrap();
        let Ok(Ok(sample)) =
            tokio::time::timeout(std::time::Duration::from_millis(500), results.recv_async()).await
        else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
        if v["error"].is_null() {
            assert!(v["completion_tokens"].as_u64().unwrap() > 0, "{v}");
            assert_eq!(v["frame"]["width"], 250, "{v}");
            answers += 1;
        } else {
            // Only a run before the first frame may fail (no frame yet).
            assert_eq!(v["error"]["code"], "bad_request", "{v}");
            assert!(answers == 0, "{v}");
        }
    }

    // Zenoh chat queries: the fixture's image as a data: URL part, then the
    // camera's latest frame (the same bytes) by reference; both answer with
    // transformers' greedy text.
    let tok = Tokenizer::from_hf_dir(&f.dir).unwrap();
    let expected = tok.decode(&f.generated, true).unwrap();
    let data_url = format!("data:image/png;base64,{}", base64(&f.images[0]));
    for url in [data_url.as_str(), "camera:front"] {
        let ask = serde_json::json!({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": f.prompt}]}],
            "max_tokens": f.generated.len(), "temperature": 0, "frequency_penalty": 0,
        });
        let replies = s
            .get("embody/eyes/chat")
            .payload(ask.to_string())
            .consolidation(zenoh::query::ConsolidationMode::None)
            .timeout(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let mut text = String::new();
        let mut last = serde_json::Value::Null;
        while let Ok(r) = replies.recv_async().await {
            let Ok(sample) = r.result() else { break };
            last = serde_json::from_slice(&sample.payload().to_bytes()).unwrap();
            if last["type"] == "delta" {
                text.push_str(last["text"].as_str().unwrap());
            }
        }
        assert_eq!(last["type"], "finished", "{url:.40}: {last}");
        assert_eq!(text, expected, "{url:.40}");
    }
}

/// Standard base64 (the test has no base64 crate).
fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
