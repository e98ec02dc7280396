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
