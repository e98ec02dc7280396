//! Several models in the real daemon: `[[models]]` served side by side and
//! chosen per request on HTTP and IPC, a swap under load that loses no
//! request, a load refused over the memory budget, an unload and the reload
//! a request brings, lifecycle events read by the Python zenoh client, and
//! Hugging Face ids resolved offline in a cache laid out as
//! `huggingface_hub` lays it out (and checked by `huggingface_hub` itself).

use std::process::Command;

use embody_tests::{
    bin, free_port, http_request, model, repo_root, smollm2, test_python, write_tiny_model, Daemon,
    TempDir,
};

fn addr(d: &Daemon) -> String {
    d.http_url().trim_start_matches("http://").to_string()
}

/// The status code and JSON body of a response.
fn call(addr: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let raw = http_request(addr, method, path, body);
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP response: {raw}"));
    let json = raw
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, json)
}

fn chat_body(model: &str, text: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

fn embody(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(bin("embody"))
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .expect("running embody")
}

fn mib(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().len() >> 20
}

#[test]
fn two_models_are_served_swapped_under_load_and_bounded_by_the_budget() {
    let dir = TempDir::new("embody-multi");
    let tiny = write_tiny_model(dir.path());
    let gemma = model("gemma-3-270m-q4_k_m.gguf");
    // Room for both models and one swap of the tiny model, not for Qwen2.5.
    let budget = mib(&smollm2()) + mib(&gemma) + 2 * 64 + 2 * 32 + 8;
    let config = format!(
        "[model]\nthreads = 2\n\n[cache]\nkv_cache_mb = 64\n\n\
         [service]\nmemory_budget_mb = {budget}\n# The replaced copy's requests finish, however busy the machine.\ndrain_timeout_ms = 120000\n\n\
         [[models]]\nname = \"smol\"\npath = \"{}\"\n\n\
         [[models]]\nname = \"gemma\"\npath = \"{}\"\n",
        smollm2().display(),
        gemma.display()
    );
    let d = Daemon::start(&config);
    let a = addr(&d);

    let (code, list) = call(&a, "GET", "/v1/models", "");
    assert_eq!(code, 200, "{list}");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smol", "gemma"]);

    for (name, arch) in [("smol", "llama"), ("gemma", "gemma3")] {
        let (code, answer) = call(
            &a,
            "POST",
            "/v1/chat/completions",
            &chat_body(name, "Name a colour.", 6, false),
        );
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["model"], name);
        let (code, st) = call(&a, "GET", &format!("/v1/models/{name}/status"), "");
        assert_eq!(code, 200, "{st}");
        assert_eq!(st["arch"], arch, "{name} runs on its own model: {st}");
        assert_eq!(st["state"], "ready");
    }
    let (code, err) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        &chat_body("gpt-4o", "hi", 4, false),
    );
    assert_eq!(code, 404, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");

    // IPC: the CLI picks a model, and status lists both.
    let out = embody(&d, &["chat", "--model", "gemma", "-n", "4", "Say hi."]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let out = embody(&d, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("smol") && l.contains("ready"))
            && text
                .lines()
                .any(|l| l.trim_start().starts_with("gemma") && l.contains("ready")),
        "{text}"
    );

    // A swap under load: eight streams on smol, then smol becomes the tiny model.
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || {
                let body = chat_body("smol", &format!("Count to {} in words.", 20 + i), 40, true);
                http_request(&a, "POST", "/v1/chat/completions", &body)
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let tiny_path = tiny.display().to_string();
    let out = embody(&d, &["load", "smol", &tiny_path, "--kv-cache-mb", "32"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let mut finished = 0;
    for s in streams {
        let r = s.join().unwrap();
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            r.contains("data: [DONE]") && !r.contains("\"error\""),
            "a stream on the replaced copy ended badly: {r}"
        );
        finished += 1;
    }
    assert_eq!(finished, 8, "every request of the old copy finished");
    let (code, st) = call(&a, "GET", "/v1/models/smol/status", "");
    assert_eq!(code, 200);
    assert_eq!(st["path"], tiny_path.as_str(), "smol is now the tiny model");
    let (code, answer) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        &chat_body("smol", "hello", 4, false),
    );
    assert_eq!(code, 200, "{answer}");

    // Over the budget: refused with what is missing; nothing changes.
    let qwen = model("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let (code, err) = call(
        &a,
        "POST",
        "/v1/models",
        &serde_json::json!({"name": "qwen", "path": qwen.display().to_string()}).to_string(),
    );
    assert_eq!(code, 507, "{err}");
    assert_eq!(err["error"]["code"], "out_of_memory");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("MiB are missing") && msg.contains(&format!("{budget} MiB memory budget")),
        "{msg}"
    );
    let (_, list) = call(&a, "GET", "/v1/models", "");
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");

    // A malformed load is a 400 that names the problem, and nothing changes.
    for body in [
        r#"{"name": 5}"#,
        r#"{"name": "x", "pathh": "y"}"#,
        "not json",
        r#"{"name": "bad name!", "path": "m.gguf"}"#,
    ] {
        let (code, err) = call(&a, "POST", "/v1/models", body);
        assert_eq!(code, 400, "{body}: {err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{err}"
        );
    }
    let (code, _) = call(&a, "DELETE", "/v1/models/nope", "");
    assert_eq!(code, 404);

    // An unload frees the model; the next request loads it again.
    let (code, e) = call(&a, "DELETE", "/v1/models/gemma", "");
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["state"], "unloaded");
    assert_eq!(e["memory_bytes"], 0);
    let (code, answer) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        &chat_body("gemma", "hello", 4, false),
    );
    assert_eq!(code, 200, "{answer}");
    let (_, st) = call(&a, "GET", "/v1/models/gemma/status", "");
    assert_eq!(st["state"], "ready", "{st}");
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn lifecycle_events_reach_the_python_zenoh_client() {
    let dir = TempDir::new("embody-multi");
    let tiny = write_tiny_model(dir.path());
    let port = free_port();
    let config = format!(
        "[model]\npath = \"{}\"\nthreads = 1\n\n[cache]\nkv_cache_mb = 16\n\n\
         [zenoh]\nlisten = [\"tcp/127.0.0.1:{port}\"]\nconnect = []\nnode = \"mm\"\n\n[ros2]\nenabled = false\n",
        tiny.display()
    );
    let d = Daemon::start(&config);
    let out = d.python_checks(
        "models_zenoh.py",
        &[
            &format!("tcp/127.0.0.1:{port}"),
            "embody/mm",
            &tiny.display().to_string(),
        ],
    );
    let seen: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(
        seen["states"],
        serde_json::json!(["loading", "ready", "draining", "unloaded"])
    );
}

#[test]
fn hugging_face_ids_resolve_in_the_local_cache_as_huggingface_hub_finds_them() {
    let dir = TempDir::new("embody-hf-cache");
    let cache = dir.path().join("hub");
    let gemma = model("gemma-3-270m-q4_k_m.gguf");
    let out = Command::new(test_python())
        .arg(repo_root().join("tests/python/hf_cache.py"))
        .arg(&cache)
        .arg(smollm2())
        .arg(&gemma)
        .arg(repo_root().join("tests/fixtures/hf/llama"))
        .output()
        .expect("running hf_cache.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = [
        ("q41", "embody-test/SmolLM2-135M-Instruct-GGUF:Q4_1"),
        ("q80", "embody-test/SmolLM2-135M-Instruct-GGUF:q8_0"),
        ("old", "embody-test/SmolLM2-135M-Instruct-GGUF@v1"),
        ("folder", "embody-test/tiny-llama"),
    ];
    let mut config = String::from("[model]\nthreads = 1\n\n[cache]\nkv_cache_mb = 16\n\n");
    for (name, id) in ids {
        config.push_str(&format!(
            "[[models]]\nname = \"{name}\"\npath = \"{id}\"\n\n"
        ));
    }
    let cache_env = cache.display().to_string();
    let mut d = Daemon::spawn(&config, &[("HF_HUB_CACHE", &cache_env)]);
    d.wait_ready();
    let a = addr(&d);
    for (name, id) in ids {
        let (code, st) = call(&a, "GET", &format!("/v1/models/{name}/status"), "");
        assert_eq!(code, 200, "{st}");
        assert_eq!(
            st["path"], expected[id],
            "{id} resolves where huggingface_hub finds it"
        );
        let (code, answer) = call(
            &a,
            "POST",
            "/v1/chat/completions",
            &chat_body(name, "hi", 3, false),
        );
        assert_eq!(code, 200, "{name}: {answer}");
    }
    // The folder again, its weights quantized to Q8_0 as they load.
    let (code, e) = call(
        &a,
        "POST",
        "/v1/models",
        r#"{"name": "folder-q8", "path": "embody-test/tiny-llama", "quantize": "q8_0"}"#,
    );
    assert_eq!(code, 200, "{e}");
    let (code, answer) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        &chat_body("folder-q8", "hi", 3, false),
    );
    assert_eq!(code, 200, "{answer}");
    let (code, err) = call(
        &a,
        "POST",
        "/v1/models",
        r#"{"name": "folder-q3", "path": "embody-test/tiny-llama", "quantize": "q3_k"}"#,
    );
    assert_eq!(code, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a weight type"),
        "{err}"
    );

    // An id the cache lacks is named in the refusal; nothing is fetched.
    let (code, err) = call(
        &a,
        "POST",
        "/v1/models",
        r#"{"name": "absent", "path": "embody-test/absent-GGUF:Q4_0"}"#,
    );
    assert_eq!(code, 404, "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("embody-test/absent-GGUF is not in the Hugging Face cache"),
        "{msg}"
    );
    // A quantization the repository lacks lists those it has.
    let (code, err) = call(
        &a,
        "POST",
        "/v1/models",
        r#"{"name": "q5", "path": "embody-test/SmolLM2-135M-Instruct-GGUF:Q5_K_M"}"#,
    );
    assert_eq!(code, 404, "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no GGUF file of quantization Q5_K_M")
            && msg.contains("SmolLM2-135M-Instruct-Q8_0.gguf"),
        "{msg}"
    );
}
