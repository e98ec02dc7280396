//! Real chat templates rendered by our engine against jinja2 rendering them the
//! way transformers does (`tests/fixtures/templates/expected.json`, written by
//! `scripts/template-oracle.py`). The templates are the models' own: SmolLM2
//! and Qwen2.5-Coder from their GGUF metadata, Gemma 3 from its
//! tokenizer_config.json (the gemma-3-270m GGUF carries none).

use std::path::Path;

use embody_engine::chat_template::{ChatMessage, ChatTemplate};
use embody_engine::Error;

#[derive(serde::Deserialize)]
struct Expected {
    templates: std::collections::BTreeMap<String, String>,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    template: String,
    name: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
    extra: Option<serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

fn template(file: &str) -> ChatTemplate {
    let source = std::fs::read_to_string(fixtures().join(file)).unwrap();
    ChatTemplate::new(&source).unwrap()
}

#[test]
fn real_templates_render_as_transformers_does() {
    let expected: Expected =
        serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap();
    let templates: std::collections::BTreeMap<&str, ChatTemplate> = expected
        .templates
        .iter()
        .map(|(name, file)| (name.as_str(), template(file)))
        .collect();
    assert_eq!(templates.len(), 3);
    for case in &expected.cases {
        let t = &templates[case.template.as_str()];
        let got = t.render(
            &case.messages,
            case.add_generation_prompt,
            &case.bos_token,
            &case.eos_token,
            case.extra.as_ref(),
        );
        let label = format!("{} / {}", case.template, case.name);
        match (&case.expected, &case.error, got) {
            (Some(want), _, Ok(got)) => assert_eq!(&got, want, "{label}"),
            (_, Some(message), Err(Error::Template(got))) => {
                assert!(got.contains(message.as_str()), "{label}: {got}")
            }
            (_, _, got) => panic!("{label}: unexpected {got:?}"),
        }
    }
}

/// The SmolLM2 case spelled out, so a reader sees what "exactly" means.
#[test]
fn smollm2_multi_turn_with_system_prompt() {
    let t = template("smollm2-135m-instruct.jinja");
    let messages = [
        ChatMessage::new("system", "You are a robot arm controller. Answer briefly."),
        ChatMessage::new("user", "Move the gripper to the red block."),
        ChatMessage::new("assistant", "Moving to (0.25, -0.10, 0.40)."),
        ChatMessage::new("user", "Now open the gripper."),
    ];
    let out = t
        .render(&messages, true, "<|im_start|>", "<|im_end|>", None)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a robot arm controller. Answer briefly.<|im_end|>\n\
         <|im_start|>user\nMove the gripper to the red block.<|im_end|>\n\
         <|im_start|>assistant\nMoving to (0.25, -0.10, 0.40).<|im_end|>\n\
         <|im_start|>user\nNow open the gripper.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn gemma3_rejects_roles_out_of_order() {
    let t = template("gemma-3-it.jinja");
    let messages = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    let err = t
        .render(&messages, true, "<bos>", "<eos>", None)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Conversation roles must alternate user/assistant/user/assistant/..."),
        "{err}"
    );
}
