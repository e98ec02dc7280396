//! `embody inspect`: a GGUF file's metadata and tensors, and a Hugging Face
//! folder's configuration, weight files and tensors, checked against what
//! the files themselves hold (read here with the engine's GGUF reader and
//! the safetensors crate).

use std::path::Path;

use embody_engine::gguf::Gguf;
use embody_tests::{embody, repo_root, smollm2};
use safetensors::SafeTensors;

fn inspect(path: &Path) -> String {
    let out = embody(&["inspect", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_gguf_files_metadata_and_tensors_are_listed() {
    let path = smollm2();
    let text = inspect(&path);
    let g = Gguf::open_mapped(&path).unwrap();
    assert!(text
        .lines()
        .next()
        .unwrap()
        .ends_with(&format!(": GGUF v{}", g.version())));
    assert!(text.contains(&format!("metadata ({} keys):", g.metadata().len())));
    assert!(
        text.contains("  general.architecture = \"llama\""),
        "{text}"
    );
    assert!(text.contains(&format!("tensors ({}):", g.tensors().len())));
    let total: usize = g.tensors().iter().map(|t| t.size).sum();
    assert!(
        text.contains(&format!("total tensor bytes: {total}")),
        "{text}"
    );
    let t = &g.tensors()[0];
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{} ", t.name)))
        .expect("the first tensor's line");
    assert!(
        line.contains(t.ty.name()) && line.ends_with(&format!("{} bytes", t.size)),
        "{line}"
    );
}

#[test]
fn a_hugging_face_folders_config_and_tensors_are_listed() {
    for (name, arch) in [
        ("llama", "LlamaForCausalLM"),
        ("qwen2vl", "Qwen2VLForConditionalGeneration"),
    ] {
        let dir = repo_root().join("tests/fixtures/hf").join(name);
        let text = inspect(&dir);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .ends_with(": Hugging Face folder"),
            "{text}"
        );
        assert!(text.contains(&format!("architecture: {arch}")), "{text}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let text_config = config.get("text_config").unwrap_or(&config);
        for key in ["hidden_size", "num_hidden_layers", "vocab_size"] {
            let v = text_config.get(key).or_else(|| config.get(key)).unwrap();
            assert!(
                text.contains(&format!("  {key} = {v}")),
                "{name}: {key} in\n{text}"
            );
        }
        assert_eq!(
            text.contains("  vision_config: "),
            config.get("vision_config").is_some(),
            "{text}"
        );
        assert!(
            text.contains("weight files (1):\n  model.safetensors\n"),
            "{text}"
        );

        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert!(text.contains(&format!("tensors ({}):", st.len())), "{text}");
        let mut total = 0;
        for (tname, view) in st.tensors() {
            let n = view.data().len();
            total += n;
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{tname} ")))
                .unwrap_or_else(|| panic!("{name}: no line for {tname}"));
            let want = format!("{:?} {:?} {n} bytes", view.dtype(), view.shape());
            let got: Vec<&str> = line.split_whitespace().skip(1).collect();
            assert_eq!(
                got.join(" "),
                want.split_whitespace().collect::<Vec<_>>().join(" "),
                "{line}"
            );
        }
        assert!(
            text.contains(&format!("total tensor bytes: {total}")),
            "{text}"
        );
    }
}

#[test]
fn a_sharded_folder_lists_its_shards() {
    let dir = repo_root().join("tests/fixtures/hf/qwen3");
    let text = inspect(&dir);
    let shards: Vec<String> = (1..=3)
        .map(|i| format!("  model-0000{i}-of-00003.safetensors"))
        .collect();
    assert!(
        text.contains(&format!("weight files (3):\n{}\n", shards.join("\n"))),
        "{text}"
    );
}
