//! The language half of Qwen2-VL and Qwen2.5-VL: GGUF files labelled
//! `qwen2vl` (llama.cpp writes both versions so), Hugging Face folders
//! `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`.
//!
//! Traits: Qwen2's decoder, with multimodal RoPE: each row carries three
//! position ids (temporal, height, width; equal for text), and the rotary
//! pairs of a head are cut into three sections (`mrope_section`, [16, 24, 24]
//! in the released models), each turned by one stream. The image encoder is
//! in `vision/qwen2vl.rs`.

use serde::Deserialize;

use crate::models::trunk::Spec;
use crate::models::{qwen2, HfRope, Source};
use crate::Result;

/// The rope fields of the language model's config.
#[derive(Deserialize)]
struct HfRopeFields {
    #[serde(default)]
    rope_scaling: Option<HfRope>,
    #[serde(default)]
    rope_parameters: Option<HfRope>,
}

/// The trunk's description: Qwen2's, with the rotation's sections.
pub(crate) fn spec(src: &Source<'_>) -> Result<Spec> {
    let mut spec = qwen2::spec_for(src, "qwen2vl", "Qwen2-VL", qwen2::BLOCKS)?;
    let (key, sections) = match src.gguf() {
        Some(g) => {
            let key = "qwen2vl.rope.dimension_sections";
            let v = g.get_i32_array(key)?;
            let v = v.iter().map(|&x| usize::try_from(x).unwrap_or(usize::MAX));
            (key.to_string(), v.collect::<Vec<_>>())
        }
        None => {
            let f: HfRopeFields = src.hf_config()?;
            let s = f
                .rope_parameters
                .or(f.rope_scaling)
                .and_then(|r| r.mrope_section);
            ("rope_scaling.mrope_section".into(), s.unwrap_or_default())
        }
    };
    // llama.cpp pads the list to four entries with zeros.
    let used: Vec<usize> = sections.iter().copied().take(3).collect();
    let rope = &mut spec.ropes[0];
    match (used.as_slice(), sections.iter().skip(3).all(|&s| s == 0)) {
        (&[t, h, w], true)
            if t.checked_add(h).and_then(|s| s.checked_add(w)) == Some(rope.dim / 2) =>
        {
            rope.sections = Some([t, h, w])
        }
        _ => {
            return Err(src.meta_err(
                &key,
                format!(
                    "{sections:?} must be three sections covering the {} rotary pairs of a head",
                    rope.dim / 2
                ),
            ))
        }
    }
    Ok(spec)
}
