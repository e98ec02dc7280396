//! `embody` on Hugging Face folders: the tiny random-weight fixtures of
//! `tests/fixtures/hf/` (written by `scripts/gen-fixtures.py`) generate, through
//! the folder's own chat template and tokenizer.json, exactly the tokens
//! transformers' greedy decoding produced; broken folders fail with the file and
//! field named. (Random weights make repetitive text; Qwen3's ends inside a
//! UTF-8 character, which both sides print as U+FFFD.)

use embody_tests::{embody, repo_root};
use serde::Deserialize;

#[derive(Deserialize)]
struct Generation {
    prompt: String,
    ids: Vec<u32>,
    text: String,
}

fn fixture(name: &str) -> (std::path::PathBuf, Generation) {
    let dir = repo_root().join("tests/fixtures/hf").join(name);
    let g = std::fs::read_to_string(dir.join("expected_generation.json")).unwrap();
    (dir, serde_json::from_str(&g).unwrap())
}

#[test]
fn chat_generation_matches_transformers_greedy() {
    for name in ["llama", "qwen2", "qwen3", "gemma3"] {
        let (dir, g) = fixture(name);
        let n = g.ids.len().to_string();
        let out = embody(&[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            &g.prompt,
            "--chat",
            "--temperature",
            "0",
            "--repeat-penalty",
            "1",
            "-n",
            &n,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.strip_suffix('\n'), Some(g.text.as_str()), "{name}");
        assert!(err.contains(&format!("{n} generated")), "{name}: {err}");
    }
}

#[test]
fn broken_folder_errors_name_the_file_and_field() {
    let tmp = std::env::temp_dir().join(format!("embody-hf-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let src = repo_root().join("tests/fixtures/hf/llama");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tmp.join(f.file_name())).unwrap();
    }
    let cfg = tmp.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": \"two\""),
    )
    .unwrap();
    let out = embody(&[
        "generate",
        "-m",
        tmp.to_str().unwrap(),
        "-p",
        "hi",
        "-n",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("config.json") && err.contains("'num_hidden_layers'"),
        "{err}"
    );
}

/// `embody generate --image` on the vision-language fixtures (written by
/// `scripts/gen-vision-fixtures.py`): transformers' greedy answer about the
/// folder's images; a text-only model refuses the flag with a reason.
#[test]
fn generate_with_images_matches_transformers_greedy() {
    for name in ["qwen2vl", "qwen25vl"] {
        let f = embody_tests::vision_fixture(name);
        let (dir, ids) = (&f.dir, &f.generated);
        let tok = embody_engine::tokenizer::Tokenizer::from_hf_dir(dir).unwrap();
        let want = tok.decode(ids, true).unwrap();
        let n = ids.len().to_string();
        let mut args = vec![
            "generate".to_string(),
            "-m".into(),
            dir.to_str().unwrap().into(),
            "-p".into(),
            f.prompt.clone(),
            "--chat".into(),
            "--temperature".into(),
            "0".into(),
            "--repeat-penalty".into(),
            "1".into(),
            "-n".into(),
            n.clone(),
        ];
        for k in 0..f.images.len() {
            args.push("--image".into());
            args.push(dir.join(format!("image{k}.png")).to_str().unwrap().into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = embody(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.strip_suffix('\n'), Some(want.as_str()), "{name}");
        assert!(err.contains("image tokens, encoded in"), "{name}: {err}");
    }
    let text_only = repo_root().join("tests/fixtures/hf/qwen2");
    let img = repo_root().join("tests/fixtures/hf/qwen2vl/image0.png");
    let out = embody(&[
        "generate",
        "-m",
        text_only.to_str().unwrap(),
        "-p",
        "hi",
        "--image",
        img.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no vision encoder"),
        "{err}"
    );
}
