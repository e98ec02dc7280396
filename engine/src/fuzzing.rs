//! The bodies of the model-file fuzz targets and of their corpus replay
//! tests: parse untrusted bytes as far as a loader would, model included.
//! They live apart from the parsers so that `gguf` and `hf` stay below
//! `models` (which reads through them) and do not import it back.

use std::sync::Arc;

use crate::backend::{cpu::CpuBackend, Backend};
use crate::gguf::Gguf;
use crate::hf::HfFolder;
use crate::models::{load_gguf, load_hf, LoadOptions};
use crate::tokenizer::Tokenizer;

/// Parses `bytes` and reads everything a loader would: every metadata accessor,
/// every tensor, and the tokenizer and model configuration built from them.
/// This is the body of the GGUF fuzz target and of its corpus replay test; it
/// returns whether the bytes parsed as GGUF. It must never panic.
pub fn gguf(bytes: &[u8]) -> bool {
    let Ok(g) = Gguf::from_bytes("fuzz.gguf", bytes.to_vec()) else {
        return false;
    };
    for (k, v) in g.metadata() {
        let _ = (
            v.summary(),
            g.get_str(k),
            g.get_u32(k),
            g.get_f32(k),
            g.get_bool(k),
        );
        let _ = (g.get_str_array(k), g.get_f32_array(k), g.get_i32_array(k));
    }
    for t in g.tensors() {
        if let Ok(q) = g.tensor(&t.name) {
            let _ = (q.rows(), q.cols(), q.row_bytes());
        }
    }
    let _ = Tokenizer::from_gguf(&g);
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(1));
    let opts = LoadOptions {
        max_batch_tokens: 4,
        context_length: 64,
        ..Default::default()
    };
    let _ = load_gguf(&g, backend, opts);
    true
}

/// The body of the `hf` fuzz target: `config.json`'s text, a zero byte, then a
/// safetensors file. Parses both, reads every tensor and loads the model for a
/// tiny context. Returns whether the folder parsed; never panics on any input.
pub fn hf(bytes: &[u8]) -> bool {
    let split = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let (config, weights) = (&bytes[..split], bytes.get(split + 1..).unwrap_or_default());
    let Ok(f) = HfFolder::from_bytes("fuzz", config, weights.to_vec()) else {
        return false;
    };
    let _ = f.architecture();
    for name in f.tensor_names() {
        if let Ok(t) = f.tensor(name) {
            let _ = (t.rows(), t.cols(), t.row_bytes());
        }
    }
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(1));
    let opts = LoadOptions {
        max_batch_tokens: 4,
        context_length: 64,
        ..Default::default()
    };
    let _ = load_hf(&f, backend, opts);
    true
}

/// Decodes and preprocesses `bytes` as an image sent with a request would be
/// (with a pixel budget small enough to keep each run short), and checks
/// what comes out: whole patch rows for the grid, every value finite. This
/// is the body of the image fuzz target and of its corpus replay test; it
/// returns whether the bytes made an image. It must never panic.
pub fn image(bytes: &[u8]) -> bool {
    let p = crate::vision::Processor {
        max_pixels: 28 * 28 * 64,
        ..crate::vision::Processor::default()
    };
    let Ok(px) = p.process(bytes) else {
        return false;
    };
    let [t, h, w] = px.grid;
    assert!(
        t == 1 && h % p.merge == 0 && w % p.merge == 0,
        "grid {:?}",
        px.grid
    );
    // transformers' smart_resize keeps the short side at one merged patch,
    // so a very elongated image may pass max_pixels (by at most 1.8x with an
    // aspect ratio under 200 and this budget); the work stays bounded.
    assert!(
        h * w * p.patch * p.patch <= 2 * p.max_pixels,
        "grid {:?} over the budget",
        px.grid
    );
    assert_eq!(
        px.patches.len(),
        t * h * w * p.patch_len(),
        "whole patch rows"
    );
    assert!(px.patches.iter().all(|v| v.is_finite()), "finite values");
    true
}

/// The body of the tokenizer fuzz target: the first byte picks the flags, the
/// rest is text (invalid UTF-8 replaced). Whatever the text, every id is in
/// the vocabulary and decoding gives the text back, with special parsing on
/// or off; and as a user message's content, the text cannot add a control
/// token to the prompt ([`crate::message_text`]). Never panics otherwise.
pub fn tokenizer(bytes: &[u8]) {
    use crate::chat_template::{ChatMessage, ChatTemplate};
    use crate::message_text::MessageText;

    static TOK: std::sync::OnceLock<(Tokenizer, ChatTemplate)> = std::sync::OnceLock::new();
    let (tok, template) = TOK.get_or_init(|| {
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        (
            crate::tokenizer::tiny_bpe(),
            ChatTemplate::new(chatml).expect("the template compiles"),
        )
    });
    let Some((&flags, rest)) = bytes.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let parse_special = flags & 1 != 0;
    let ids = tok
        .encode(&text, false, parse_special)
        .expect("a byte-level vocabulary encodes any text");
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    assert_eq!(
        tok.decode(&ids, false).expect("decodes"),
        text,
        "round trip"
    );

    let msgs = [ChatMessage::new("user", text.as_ref())];
    let rendered = template.render(&msgs, true, "", "", None).expect("renders");
    let mut guard = MessageText::new(tok, template);
    let Ok(guarded) = guard.message(&msgs[0]) else {
        // Only for more distinct private-use characters than placeholders.
        return;
    };
    let text_of_guarded = template
        .render(&[guarded], true, "", "", None)
        .expect("renders");
    let ids = guard.encode(&text_of_guarded).expect("encodes");
    assert_eq!(tok.decode(&ids, false).expect("decodes"), rendered);
    let controls = |id: u32| tok.token_text(id).is_some_and(|t| t.starts_with("<|im_"));
    assert_eq!(
        ids.iter().filter(|&&id| controls(id)).count(),
        3,
        "the template's own control tokens, none of the text's"
    );
}

/// The body of the chat template fuzz target: arbitrary JSON (when it parses)
/// as the messages and tools, rendered with the real templates of the test
/// models. Errors are fine (a template's `raise_exception`, a missing
/// field); a panic or a hang is not.
pub fn chat_template(bytes: &[u8]) {
    use crate::chat_template::{ChatMessage, ChatTemplate};

    static TEMPLATES: std::sync::OnceLock<Vec<ChatTemplate>> = std::sync::OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        [
            include_str!("../tests/fixtures/templates/smollm2-135m-instruct.jinja"),
            include_str!("../tests/fixtures/templates/qwen2.5-coder-0.5b-instruct.jinja"),
            include_str!("../tests/fixtures/templates/gemma-3-it.jinja"),
        ]
        .iter()
        .map(|s| ChatTemplate::new(s).expect("the test templates compile"))
        .collect()
    });
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    let messages: Vec<ChatMessage> = match value.get("messages") {
        Some(m) => serde_json::from_value(m.clone()).unwrap_or_default(),
        None => Vec::new(),
    };
    let extra = value
        .get("tools")
        .map(|t| serde_json::json!({ "tools": t }));
    for t in templates {
        let _ = t.render(&messages, true, "<s>", "</s>", extra.as_ref());
    }
}
