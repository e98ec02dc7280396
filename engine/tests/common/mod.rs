//! Builders shared by the engine's integration tests.
#![allow(dead_code)]

use embody_engine::gguf::writer::{write, TensorSpec};
use embody_engine::gguf::Value;
use embody_engine::quant::{quantize_row, GgmlType};

/// Deterministic values in [-0.5, 0.5).
pub fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn tensor(name: &str, ty: GgmlType, shape: &[usize], values: &[f32]) -> TensorSpec {
    let cols = shape[0];
    let row_bytes = ty.row_bytes(cols).unwrap();
    let rows = values.len() / cols;
    let mut data = vec![0u8; row_bytes * rows];
    for r in 0..rows {
        quantize_row(
            ty,
            &values[r * cols..(r + 1) * cols],
            &mut data[r * row_bytes..(r + 1) * row_bytes],
        );
    }
    TensorSpec {
        name: name.into(),
        ty,
        shape: shape.to_vec(),
        data,
    }
}

/// The vocabulary of the tiny model: bytes 'a'..'z', space as 'Ġ', a few merges, and
/// two control tokens.
pub fn tiny_vocab() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = vec!["<|bos|>".into(), "<|eos|>".into()];
    tokens.extend(('a'..='z').map(|c| c.to_string()));
    tokens.push("Ġ".into());
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    while tokens.len() < 64 {
        tokens.push(format!("<unused{}>", tokens.len()));
    }
    (tokens, merges.iter().map(|s| s.to_string()).collect())
}

/// A 2-layer Llama with random weights (d=32, 4 query heads over 2 KV heads, vocab 64).
pub fn tiny_llama_gguf(seed: u64) -> Vec<u8> {
    let (d, ff, vocab, layers, heads, kv_heads) = (32usize, 64usize, 64usize, 2usize, 4u32, 2u32);
    let hd = d / heads as usize;
    let kvd = kv_heads as usize * hd;
    let (tokens, merges) = tiny_vocab();
    let mut token_type = vec![Value::I32(1); tokens.len()];
    token_type[0] = Value::I32(3);
    token_type[1] = Value::I32(3);
    for t in token_type.iter_mut().skip(35) {
        *t = Value::I32(5);
    }
    let s = |v: &str| Value::String(v.into());
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".to_string(), s("tiny")),
        ("llama.block_count".to_string(), Value::U32(layers as u32)),
        ("llama.context_length".to_string(), Value::U32(256)),
        ("llama.embedding_length".to_string(), Value::U32(d as u32)),
        ("llama.feed_forward_length".to_string(), Value::U32(ff as u32)),
        ("llama.attention.head_count".to_string(), Value::U32(heads)),
        ("llama.attention.head_count_kv".to_string(), Value::U32(kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon".to_string(), Value::F32(1e-5)),
        ("llama.rope.freq_base".to_string(), Value::F32(10000.0)),
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s("gpt-2")),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(token_type)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(true)),
        (
            "tokenizer.chat_template".to_string(),
            s("{% for m in messages %}<|bos|>{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"),
        ),
    ];
    let mut k = seed * 1000;
    let mut next = |n: usize| {
        k += 1;
        noise(k, n)
    };
    let ones = |n: usize, v: &[f32]| v.iter().take(n).map(|x| 1.0 + x * 0.2).collect::<Vec<_>>();
    let q8 = GgmlType::Q8_0;
    let f32t = GgmlType::F32;
    let mut t = vec![tensor(
        "token_embd.weight",
        q8,
        &[d, vocab],
        &next(d * vocab),
    )];
    for l in 0..layers {
        let n = |x: &str| format!("blk.{l}.{x}.weight");
        t.push(tensor(&n("attn_norm"), f32t, &[d], &ones(d, &next(d))));
        t.push(tensor(&n("attn_q"), q8, &[d, d], &next(d * d)));
        t.push(tensor(&n("attn_k"), q8, &[d, kvd], &next(d * kvd)));
        t.push(tensor(&n("attn_v"), q8, &[d, kvd], &next(d * kvd)));
        t.push(tensor(&n("attn_output"), q8, &[d, d], &next(d * d)));
        t.push(tensor(&n("ffn_norm"), f32t, &[d], &ones(d, &next(d))));
        t.push(tensor(&n("ffn_gate"), q8, &[d, ff], &next(d * ff)));
        t.push(tensor(&n("ffn_up"), q8, &[d, ff], &next(d * ff)));
        t.push(tensor(&n("ffn_down"), q8, &[ff, d], &next(ff * d)));
    }
    t.push(tensor("output_norm.weight", f32t, &[d], &ones(d, &next(d))));
    write(&meta, &t)
}
