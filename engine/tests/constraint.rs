//! Constrained decoding on real tokenizers: whatever the logits say, every
//! sample follows the grammar. Logits are seeded noise, which pushes the
//! grammar harder than a model would (a model mostly wants valid JSON anyway).

use std::path::PathBuf;
use std::sync::Arc;

use embody_engine::constraint::{ConstraintError, GrammarSpec, Grammars};
use embody_engine::gguf::Gguf;
use embody_engine::sampling::{Sampler, SamplingParams};
use embody_engine::tokenizer::Tokenizer;
use embody_engine::tool_calls::{call_grammar, ForcedCall, Piece, ToolCallParser, ToolFormat};
use serde_json::{json, Value};

fn model(file: &str) -> PathBuf {
    let dir = std::env::var_os("EMBODY_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/embody/models")
        });
    let p = dir.join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

fn tokenizer(file: &str) -> Arc<Tokenizer> {
    let g = Gguf::open(&model(file)).expect("open the model");
    Arc::new(Tokenizer::from_gguf(&g).expect("build the tokenizer"))
}

/// Seeded noise logits, sharpened so that sampling is not uniform.
fn noise(state: &mut u64, out: &mut [f32]) {
    for l in out.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *l = ((*state >> 40) as f32 / (1u64 << 24) as f32) * 8.0;
    }
}

/// Samples under the grammar until it is complete; returns the text.
fn generate(g: &Grammars, tok: &Tokenizer, spec: &GrammarSpec, seed: u64, limit: usize) -> String {
    let mut c = g.compile(spec).expect("the grammar compiles");
    let vocab = tok.vocab_size();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, vocab);
    let mut logits = vec![0.0; vocab];
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut ids = Vec::new();
    for _ in 0..limit {
        noise(&mut state, &mut logits);
        c.mask(&mut logits).expect("mask");
        let next = sampler.sample(&mut logits, &ids);
        if tok.is_eog(next) {
            return tok.decode(&ids, true).unwrap();
        }
        c.commit(next).expect("the sampled token is allowed");
        ids.push(next);
        if c.is_finished() {
            return tok.decode(&ids, true).unwrap();
        }
    }
    panic!(
        "seed {seed}: no end within {limit} tokens: {:?}",
        tok.decode(&ids, true)
    );
}

fn robot_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "action": {"enum": ["grasp", "place", "wait"]},
            "speed": {"type": "integer", "minimum": 0, "maximum": 100},
            "gripper_open": {"type": "boolean"},
            "label": {"type": "string", "maxLength": 12}
        },
        "required": ["action", "speed", "gripper_open", "label"],
        "additionalProperties": false
    })
}

fn check_robot(v: &Value) {
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 4, "{v}");
    assert!(
        ["grasp", "place", "wait"].contains(&obj["action"].as_str().unwrap()),
        "{v}"
    );
    let speed = obj["speed"].as_i64().expect("integer speed");
    assert!((0..=100).contains(&speed), "{v}");
    assert!(obj["gripper_open"].is_boolean(), "{v}");
    assert!(obj["label"].as_str().unwrap().chars().count() <= 12, "{v}");
}

#[test]
fn json_schema_samples_always_parse_and_validate_on_smollm2() {
    let tok = tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = Grammars::new(tok.clone(), tok.vocab_size()).unwrap();
    let spec = GrammarSpec::JsonSchema(robot_schema());
    for seed in 0..20 {
        let text = generate(&g, &tok, &spec, seed, 400);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("seed {seed}: {text:?} is not JSON: {e}"));
        check_robot(&v);
        assert!(!text.contains('\n'), "compact output: {text:?}");
    }
}

#[test]
fn bad_schemas_are_errors_that_name_the_problem() {
    let tok = tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = Grammars::new(tok.clone(), tok.vocab_size()).unwrap();
    for (schema, needle) in [
        (json!({"type": "integer", "minimum": 5, "maximum": 1}), ""),
        (json!({"type": "frobnicate"}), "frobnicate"),
        (json!({"$ref": "#/$defs/missing"}), "missing"),
        (json!({"$ref": "#"}), "admits no output"),
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
            "admits no output",
        ),
    ] {
        match g.compile(&GrammarSpec::JsonSchema(schema.clone())) {
            Err(ConstraintError::Invalid(m)) => assert!(m.contains(needle), "{schema}: {m}"),
            other => panic!("{schema}: expected an invalid grammar, got {other:?}"),
        }
    }
    assert!(g.compile(&GrammarSpec::Lark("start: (".into())).is_err());
}

#[test]
fn forced_tagged_tool_calls_parse_on_qwen() {
    let tok = tokenizer("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let g = Grammars::new(tok.clone(), tok.vocab_size()).unwrap();
    let tools = json!([
        {"type": "function", "function": {"name": "move_arm", "parameters": robot_schema()}},
        {"type": "function", "function": {"name": "stop", "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}}
    ]);
    let spec = call_grammar(
        ToolFormat::Tagged,
        &tools,
        &ForcedCall::Named("move_arm".into()),
    )
    .unwrap();
    for seed in 0..5 {
        let text = generate(&g, &tok, &spec, seed, 400);
        let mut p = ToolCallParser::new(ToolFormat::Tagged);
        let mut pieces = p.push(&text);
        pieces.extend(p.finish());
        match pieces.as_slice() {
            [Piece::Call { name, arguments }] => {
                assert_eq!(name, "move_arm");
                check_robot(arguments);
            }
            other => panic!("seed {seed}: {text:?} gave {other:?}"),
        }
    }
}
