//! Requantizing a GGUF file: every weight matrix read back to f32 and written
//! in the target format, with the types per tensor chosen as llama.cpp's
//! `llama-quantize` chooses them (its `llama_tensor_get_type`), so a file we
//! write is laid out and typed as theirs is, and llama.cpp loads it.
//!
//! What is quantized: tensors of two or more dimensions whose name ends in
//! `weight`; norms, biases and other vectors stay as they are. A row whose
//! length is not a whole number of 256-value super-blocks cannot take a
//! K-quant, and falls back as llama.cpp falls back (Q4_K → Q5_0, Q5_K → Q5_1,
//! Q6_K → Q8_0). Tensors are taken, counted for the recipe's per-layer
//! choices, and written in llama-quantize's order: those outside the blocks
//! first, then block by block, each group by name.

use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::writer::{write, TensorSpec};
use crate::gguf::{Gguf, Value};
use crate::quant::{reference, GgmlType};
use crate::tensor::QTensor;

/// A target of `embody quantize`, named as llama-quantize names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// Every weight Q8_0.
    Q8_0,
    /// Every weight Q4_0; the output matrix Q6_K.
    Q4_0,
    /// Q4_K, with the output matrix Q6_K (`Q4_K_S`).
    Q4KS,
    /// Q4_K, with the output, and half the value and down projections, Q6_K (`Q4_K_M`).
    Q4KM,
    /// Q5_K, with the output matrix Q6_K (`Q5_K_S`).
    Q5KS,
    /// Q5_K, with the output, and half the value and down projections, Q6_K (`Q5_K_M`).
    Q5KM,
    /// Every weight Q6_K.
    Q6K,
}

impl std::str::FromStr for Recipe {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "Q8_0" => Self::Q8_0,
            "Q4_0" => Self::Q4_0,
            "Q4_K_S" => Self::Q4KS,
            "Q4_K" | "Q4_K_M" => Self::Q4KM,
            "Q5_K_S" => Self::Q5KS,
            "Q5_K" | "Q5_K_M" => Self::Q5KM,
            "Q6_K" => Self::Q6K,
            other => {
                return Err(Error::InvalidRequest(format!(
                    "unknown quantization {other:?}: Q8_0, Q4_0, Q4_K (= Q4_K_M), Q4_K_S, Q5_K (= Q5_K_M), Q5_K_S or Q6_K"
                )))
            }
        })
    }
}

impl Recipe {
    /// llama.cpp's `llama_ftype`, written as `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KS => 14,
            Self::Q4KM => 15,
            Self::Q5KS => 16,
            Self::Q5KM => 17,
            Self::Q6K => 18,
        }
    }

    fn base(self) -> GgmlType {
        match self {
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4KS | Self::Q4KM => GgmlType::Q4_K,
            Self::Q5KS | Self::Q5KM => GgmlType::Q5_K,
            Self::Q6K => GgmlType::Q6_K,
        }
    }

    /// The "M" recipes spend more bits on some value and down projections.
    fn more_bits(self) -> bool {
        matches!(self, Self::Q4KM | Self::Q5KM)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and
/// every third one between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// The block a tensor belongs to (`blk.N.`), -1 outside the blocks: the
/// first key of llama.cpp's order of weights.
fn block_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

/// Where a tensor sits, for the recipe.
struct Counts {
    layers: usize,
    /// Running indices of the value and down projections met so far.
    attn_v: usize,
    ffn_down: usize,
}

/// The type a tensor is written in.
fn choose(
    recipe: Recipe,
    name: &str,
    shape: &[usize],
    has_output: bool,
    c: &mut Counts,
) -> Option<GgmlType> {
    if shape.len() < 2 || !name.ends_with("weight") {
        return None;
    }
    let mut ty = recipe.base();
    let is_output = name == "output.weight" || (!has_output && name == "token_embd.weight");
    if is_output {
        if recipe != Recipe::Q8_0 {
            ty = GgmlType::Q6_K;
        }
    } else if name.contains("attn_v.weight") {
        if recipe.more_bits() && use_more_bits(c.attn_v, c.layers) {
            ty = GgmlType::Q6_K;
        } else if recipe == Recipe::Q4KS && c.attn_v < 4 {
            ty = GgmlType::Q5_K;
        }
        c.attn_v += 1;
    } else if name.contains("ffn_down") {
        if recipe.more_bits() && use_more_bits(c.ffn_down, c.layers) {
            ty = GgmlType::Q6_K;
        } else if recipe == Recipe::Q4KS && c.ffn_down < c.layers / 8 {
            ty = GgmlType::Q5_K;
        }
        c.ffn_down += 1;
    }
    // Rows that are not whole super-blocks fall back as llama.cpp's do.
    if !shape[0].is_multiple_of(ty.block_size()) {
        ty = match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            t => t,
        };
        if !shape[0].is_multiple_of(ty.block_size()) {
            return None;
        }
    }
    Some(ty)
}

/// The rows of `t` read back to f32 and written in `ty`; `None` when a row
/// is not a whole number of `ty`'s blocks.
pub fn requantize(t: &QTensor, ty: GgmlType) -> Option<Vec<u8>> {
    let out_row = ty.row_bytes(t.cols())?;
    let mut out = vec![0u8; out_row * t.rows()];
    let mut row = vec![0f32; t.cols()];
    for (r, dst) in out.chunks_exact_mut(out_row).enumerate() {
        reference::dequantize_row(t.ty, t.row(r), &mut row);
        reference::quantize_row(ty, &row, dst);
    }
    Some(out)
}

/// What a quantization did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Tensors by the type written: (type, count).
    pub types: Vec<(GgmlType, usize)>,
    /// Bytes of tensor data in and out.
    pub bytes_in: u64,
    /// Bytes of tensor data written.
    pub bytes_out: u64,
}

/// Reads `input` (a GGUF file), requantizes its weights by `recipe`, and
/// returns the new file's bytes with what was done.
pub fn quantize_gguf(input: &Path, recipe: Recipe) -> Result<(Vec<u8>, Report)> {
    let g = Gguf::open_mapped(input)?;
    let arch = g.get_str("general.architecture")?.to_string();
    let layers = g.get_u32(&format!("{arch}.block_count"))? as usize;
    let has_output = g.tensor_info("output.weight").is_some();
    let mut counts = Counts {
        layers,
        attn_v: 0,
        ffn_down: 0,
    };
    let mut report = Report::default();
    // llama-quantize takes the tensors in its loader's order (those outside
    // the blocks by name, then block by block, each by name), counts layers
    // for its recipe in that order, and writes them so.
    let mut infos: Vec<_> = g.tensors().iter().collect();
    infos.sort_by_key(|t| (block_of(&t.name), t.name.clone()));
    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        let t = g.tensor(&info.name)?;
        report.bytes_in += t.data.len() as u64;
        let target = choose(recipe, &info.name, &info.shape, has_output, &mut counts)
            .filter(|&ty| ty != t.ty);
        let (ty, data) = match target {
            None => (t.ty, t.data.to_vec()),
            Some(ty) => {
                let out = requantize(&t, ty).ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "{}: rows of {} do not fit {ty:?}",
                        info.name,
                        t.cols()
                    ))
                })?;
                (ty, out)
            }
        };
        report.bytes_out += data.len() as u64;
        match report.types.iter_mut().find(|(t, _)| *t == ty) {
            Some((_, n)) => *n += 1,
            None => report.types.push((ty, 1)),
        }
        tensors.push(TensorSpec {
            name: info.name.clone(),
            ty,
            shape: info.shape.clone(),
            data,
        });
    }
    let mut meta: Vec<(String, Value)> = g
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.file_type" && k != "general.quantization_version")
        .cloned()
        .collect();
    // Appended in llama-quantize's order, so the files are the same bytes.
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    meta.push(("general.file_type".into(), Value::U32(recipe.file_type())));
    Ok((write(&meta, &tensors), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_m_recipes_follow_llama_cpp() {
        // 30 layers, as SmolLM2-135M: llama.cpp gives Q6_K to these layers'
        // value and down projections under Q4_K_M.
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        let mut c = Counts {
            layers: 30,
            attn_v: 0,
            ffn_down: 0,
        };
        let w = [1024, 1024];
        assert_eq!(
            choose(Recipe::Q4KM, "output.weight", &w, true, &mut c),
            Some(GgmlType::Q6_K)
        );
        assert_eq!(
            choose(Recipe::Q4KM, "token_embd.weight", &w, true, &mut c),
            Some(GgmlType::Q4_K)
        );
        assert_eq!(
            choose(Recipe::Q4KM, "token_embd.weight", &w, false, &mut c),
            Some(GgmlType::Q6_K)
        );
        assert_eq!(
            choose(Recipe::Q4KM, "blk.0.attn_v.weight", &w, true, &mut c),
            Some(GgmlType::Q6_K)
        );
        assert_eq!(
            choose(
                Recipe::Q4KM,
                "blk.1.attn_v.weight",
                &[1024, 64],
                true,
                &mut c
            ),
            Some(GgmlType::Q6_K)
        );
        c.attn_v = 3;
        assert_eq!(
            choose(
                Recipe::Q4KM,
                "blk.3.attn_v.weight",
                &[1024, 64],
                true,
                &mut c
            ),
            Some(GgmlType::Q4_K)
        );
        assert_eq!(
            choose(Recipe::Q4KM, "blk.0.attn_norm.weight", &[576], true, &mut c),
            None
        );
        assert_eq!(
            choose(Recipe::Q8_0, "output.weight", &w, true, &mut c),
            Some(GgmlType::Q8_0)
        );
        // 576-wide rows (SmolLM2's) are not whole super-blocks: they fall back.
        assert_eq!(
            choose(Recipe::Q4KM, "output.weight", &[576, 8], true, &mut c),
            Some(GgmlType::Q8_0)
        );
        assert_eq!(
            choose(Recipe::Q4KM, "blk.9.ffn_up.weight", &[576, 8], true, &mut c),
            Some(GgmlType::Q5_0)
        );
        assert_eq!(
            choose(Recipe::Q6K, "blk.0.ffn_up.weight", &[64, 8], true, &mut c),
            Some(GgmlType::Q8_0)
        );
        assert_eq!(
            choose(Recipe::Q4KS, "blk.0.ffn_up.weight", &[64, 8], true, &mut c),
            Some(GgmlType::Q5_0)
        );
    }
}
