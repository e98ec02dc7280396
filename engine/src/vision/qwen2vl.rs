//! The Qwen2-VL and Qwen2.5-VL vision encoders: patches in, rows of the
//! language model's width out.
//!
//! Both cut an image into 14×14 patches over two frames, embed each with one
//! matrix product (the Conv3d), run a ViT whose attention rotates queries and
//! keys by each patch's (row, column) and sees all patches of the image, then
//! merge each 2×2 group of patches into one token through an MLP. What
//! differs, as data:
//!
//! | | Qwen2-VL | Qwen2.5-VL |
//! |---|---|---|
//! | norms | LayerNorm | RMSNorm |
//! | MLP | fc1, quick GELU, fc2 | SwiGLU (gate, up, down), with biases |
//! | attention | the whole image | windows of 112 px, the whole image on `fullatt_block_indexes` |
//!
//! Names as transformers' `modeling_qwen2_vl.py` / `modeling_qwen2_5_vl.py`
//! (`visual.` in Qwen's releases, `model.visual.` as transformers 4.52+ saves).

use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;

use crate::backend::cpu::dequantize_row;
use crate::backend::{Activation, Backend, Buf, Weight, Workspace};
use crate::gguf::Gguf;
use crate::hf::HfFolder;
use crate::models::Source;
use crate::ops::RopeStyle;
use crate::quant::GgmlType;
use crate::tensor::{Bytes, QTensor};
use crate::vision::preprocess::{Pixels, Processor};
use crate::{Error, Result};

/// Which of the two encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Qwen2-VL.
    Qwen2Vl,
    /// Qwen2.5-VL.
    Qwen25Vl,
}

/// `vision_config` of a Qwen2-VL / Qwen2.5-VL `config.json`.
#[derive(Deserialize)]
struct HfVisionConfig {
    depth: usize,
    /// Qwen2-VL: the ViT's width.
    embed_dim: Option<usize>,
    /// Qwen2-VL: the language model's width; Qwen2.5-VL: the ViT's width.
    hidden_size: usize,
    /// Qwen2.5-VL: the language model's width.
    out_hidden_size: Option<usize>,
    num_heads: usize,
    /// Qwen2-VL: the MLP's width over the ViT's.
    mlp_ratio: Option<f32>,
    /// Qwen2.5-VL: the MLP's width.
    intermediate_size: Option<usize>,
    #[serde(default = "default_patch")]
    patch_size: usize,
    #[serde(default = "default_merge")]
    spatial_merge_size: usize,
    #[serde(default = "default_temporal")]
    temporal_patch_size: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    /// Qwen2.5-VL: window side in pixels.
    window_size: Option<usize>,
    /// Qwen2.5-VL: the blocks that attend over the whole image.
    #[serde(default)]
    fullatt_block_indexes: Vec<usize>,
}

fn default_patch() -> usize {
    14
}
fn default_merge() -> usize {
    2
}
fn default_temporal() -> usize {
    2
}

/// The encoder's shape.
#[derive(Clone, Debug)]
pub struct VisionSpec {
    /// Which encoder.
    pub family: Family,
    /// Blocks.
    pub depth: usize,
    /// The ViT's width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// The MLP's width.
    pub mlp: usize,
    /// Rows out: the language model's width.
    pub out: usize,
    /// Window side in patches (Qwen2.5-VL), `None` for whole-image attention.
    pub window: Option<usize>,
    /// Blocks that attend over the whole image although the others use windows.
    pub full_blocks: Vec<usize>,
    /// Norm epsilon.
    pub eps: f32,
}

enum Norm {
    Layer { w: Buf, b: Buf },
    Rms { w: Buf },
}

impl Norm {
    fn load(
        src: &Source<'_>,
        name: &str,
        d: usize,
        family: Family,
        be: &dyn Backend,
    ) -> Result<Self> {
        let w = be.upload(src.vector(&format!("{name}.weight"), d)?)?;
        Ok(match family {
            Family::Qwen2Vl => Norm::Layer {
                w,
                b: be.upload(src.vector(&format!("{name}.bias"), d)?)?,
            },
            Family::Qwen25Vl => Norm::Rms { w },
        })
    }

    /// The norm of the first `n` rows of `x`.
    fn apply(&self, be: &dyn Backend, x: &mut Buf, n: usize, eps: f32) {
        match self {
            Norm::Layer { w, b } => be.layer_norm(x, n, w, b, eps),
            Norm::Rms { w } => be.rms_norm(x, n, w, eps),
        }
    }
}

/// A linear layer with its bias.
struct Linear {
    w: Weight,
    b: Buf,
}

impl Linear {
    fn load(
        src: &Source<'_>,
        name: &str,
        cols: usize,
        rows: usize,
        be: &dyn Backend,
    ) -> Result<Self> {
        let w = src.tensor(&format!("{name}.weight"), &[cols, rows])?;
        let b = src.vector(&format!("{name}.bias"), rows)?;
        Self::new(be, w, b)
    }

    fn new(be: &dyn Backend, w: QTensor, b: Vec<f32>) -> Result<Self> {
        Ok(Self {
            w: be.weight(w)?,
            b: be.upload(b)?,
        })
    }

    /// `y = w · x + b` over `n` rows.
    fn apply(&self, be: &dyn Backend, x: &Buf, n: usize, y: &mut Buf, ws: &mut Workspace) {
        be.matmul_dense(&self.w, x, n, y, ws);
        be.add_bias(y, n, &self.b);
    }
}

enum Mlp {
    /// fc2(quick_gelu(fc1(x))).
    Gelu { fc1: Linear, fc2: Linear },
    /// down(silu(gate(x)) * up(x)).
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

struct Block {
    norm1: Norm,
    /// The fused projection split into its Q, K and V rows.
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    norm2: Norm,
    mlp: Mlp,
}

/// How a file names the encoder's weights: as transformers does (under a
/// prefix: `visual.` or `model.visual.`) or as llama.cpp's mmproj files do.
#[derive(Clone, Copy)]
enum Names<'a> {
    Hf(&'a str),
    Gguf,
}

impl Names<'_> {
    fn global(&self, hf: &str, gguf: &str) -> String {
        match self {
            Names::Hf(prefix) => format!("{prefix}{hf}"),
            Names::Gguf => gguf.to_string(),
        }
    }

    fn block(&self, i: usize, hf: &str, gguf: &str) -> String {
        match self {
            Names::Hf(prefix) => format!("{prefix}blocks.{i}.{hf}"),
            Names::Gguf => format!("v.blk.{i}.{gguf}"),
        }
    }

    /// The patch embedding as one matrix over patch rows (channel, frame,
    /// row, column). Transformers stores the Conv3d's kernel, already that
    /// matrix; llama.cpp splits it into one Conv2d kernel per frame, which
    /// are interleaved back here.
    fn patch_embed(&self, src: &Source<'_>, pr: &Processor, w: usize) -> Result<QTensor> {
        let p = pr.patch;
        let name = self.global("patch_embed.proj.weight", "v.patch_embd.weight");
        if let Names::Hf(_) = self {
            let mut t = src.tensor(&name, &[p, p, pr.temporal, 3, w])?;
            t.shape = vec![pr.patch_len(), w];
            return Ok(t);
        }
        let frames: Vec<QTensor> = (0..pr.temporal)
            .map(|f| {
                let n = if f == 0 {
                    name.clone()
                } else {
                    format!("{name}.{f}")
                };
                let t = src.tensor(&n, &[p, p, 3, w])?;
                if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                    return Err(Error::Tensor {
                        path: src.path().to_path_buf(),
                        tensor: n,
                        message: format!(
                            "{:?}: the patch embedding must be F32, F16 or BF16",
                            t.ty
                        ),
                    });
                }
                Ok(t)
            })
            .collect::<Result<_>>()?;
        let (pp, row) = (p * p, pr.patch_len());
        let mut out = vec![0f32; w * row];
        let mut tmp = vec![0f32; p];
        for (f, t) in frames.iter().enumerate() {
            // Rows of `p` values: output, channel, kernel row.
            for r in 0..t.rows() {
                dequantize_row(t, r, &mut tmp);
                let (o, c, y) = (r / (3 * p), (r / p) % 3, r % p);
                let at = o * row + (c * pr.temporal + f) * pp + y * p;
                out[at..at + p].copy_from_slice(&tmp);
            }
        }
        Ok(QTensor {
            name,
            ty: GgmlType::F32,
            shape: vec![row, w],
            data: Bytes::from_vec(out.iter().flat_map(|v| v.to_le_bytes()).collect()),
        })
    }
}

/// Checks the dimensions a file gives before anything is sized by them.
fn check_shape(s: &VisionSpec, p: &Processor) -> std::result::Result<(), String> {
    if s.heads == 0 || !s.width.is_multiple_of(s.heads) || !(s.width / s.heads).is_multiple_of(4) {
        return Err(format!(
            "{} heads do not split a width of {} into heads of a multiple of 4",
            s.heads, s.width
        ));
    }
    if s.depth == 0 || s.depth > 256 || s.width > 16384 || s.mlp > 65536 || s.out > 65536 {
        return Err(format!(
            "depth {}, width {}, MLP {}, output {}: outside any Qwen-VL encoder",
            s.depth, s.width, s.mlp, s.out
        ));
    }
    if p.patch == 0 || p.patch > 64 || p.merge == 0 || p.merge > 8 {
        return Err(format!("patch {} and merge {} sizes", p.patch, p.merge));
    }
    if s.window
        .is_some_and(|w| w == 0 || !w.is_multiple_of(p.merge))
    {
        return Err(format!("a window of {:?} patches", s.window));
    }
    Ok(())
}

/// A loaded vision encoder.
pub struct VisionEncoder {
    spec: VisionSpec,
    processor: Processor,
    patch_embed: Weight, // [3 * temporal * patch², width]
    blocks: Vec<Block>,
    merger_norm: Norm,
    merger_fc1: Linear, // [width * merge², width * merge²]
    merger_fc2: Linear, // [width * merge², out]
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for VisionEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionEncoder")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl VisionEncoder {
    /// Loads the encoder of a Qwen2-VL or Qwen2.5-VL folder.
    pub fn load_hf(folder: &HfFolder, family: Family, backend: Arc<dyn Backend>) -> Result<Self> {
        let c: HfVisionConfig = folder.config_at("vision_config")?;
        let mut processor = Processor::from_dir(folder.dir())?;
        let path = folder.config_path();
        let meta = |key: &str, message: String| Error::Metadata {
            path: path.to_path_buf(),
            key: format!("vision_config.{key}"),
            message,
        };
        let (width, out, mlp) = match family {
            Family::Qwen2Vl => {
                let width = c
                    .embed_dim
                    .ok_or_else(|| meta("embed_dim", "missing".into()))?;
                let ratio = c.mlp_ratio.unwrap_or(4.0);
                (width, c.hidden_size, (width as f32 * ratio) as usize)
            }
            Family::Qwen25Vl => (
                c.hidden_size,
                c.out_hidden_size
                    .ok_or_else(|| meta("out_hidden_size", "missing".into()))?,
                c.intermediate_size
                    .ok_or_else(|| meta("intermediate_size", "missing".into()))?,
            ),
        };
        let act = c.hidden_act.as_deref();
        let expected = match family {
            Family::Qwen2Vl => "quick_gelu",
            Family::Qwen25Vl => "silu",
        };
        if act.is_some_and(|a| a != expected) {
            return Err(meta(
                "hidden_act",
                format!("{act:?}: only {expected} is supported"),
            ));
        }
        // The encoder's own patch geometry is authoritative.
        processor.patch = c.patch_size;
        processor.merge = c.spatial_merge_size;
        processor.temporal = c.temporal_patch_size;
        let window = match (family, c.window_size) {
            (Family::Qwen25Vl, Some(w)) => {
                let unit = c.patch_size * c.spatial_merge_size;
                if w == 0 || w % unit != 0 {
                    return Err(meta(
                        "window_size",
                        format!("{w} is not a multiple of {unit} pixels"),
                    ));
                }
                Some(w / c.patch_size)
            }
            _ => None,
        };
        if let Some(&b) = c.fullatt_block_indexes.iter().find(|&&b| b >= c.depth) {
            return Err(meta(
                "fullatt_block_indexes",
                format!("block {b} of {}", c.depth),
            ));
        }
        let spec = VisionSpec {
            family,
            depth: c.depth,
            width,
            heads: c.num_heads,
            mlp,
            out,
            window,
            full_blocks: c.fullatt_block_indexes,
            eps: 1e-6,
        };
        let prefix = if folder.has("visual.patch_embed.proj.weight") {
            "visual."
        } else {
            "model.visual."
        };
        check_shape(&spec, &processor).map_err(|m| meta("depth", m))?;
        // The encoder keeps its own weights' types.
        let src = Source::Hf {
            folder,
            prefix: "model.",
            config: "",
            quantize: None,
        };
        Self::load(&src, Names::Hf(prefix), spec, processor, backend)
    }

    /// Loads the encoder of llama.cpp's `mmproj` GGUF file (written by its
    /// `convert_hf_to_gguf.py --mmproj` from a Qwen2-VL or Qwen2.5-VL folder).
    pub fn load_gguf(g: &Gguf, backend: Arc<dyn Backend>) -> Result<Self> {
        let meta = |key: &str, message: String| Error::Metadata {
            path: g.path().to_path_buf(),
            key: key.into(),
            message,
        };
        let family = match g.get_str("clip.projector_type")? {
            "qwen2vl_merger" => Family::Qwen2Vl,
            "qwen2.5vl_merger" => Family::Qwen25Vl,
            other => {
                return Err(meta(
                    "clip.projector_type",
                    format!("'{other}': only the Qwen2-VL and Qwen2.5-VL mergers are supported"),
                ))
            }
        };
        let count = |key: &str| -> Result<usize> { Ok(g.get_u32(key)? as usize) };
        let opt = |key: &str, default: usize| -> Result<usize> {
            match g.get(key) {
                Some(_) => count(key),
                None => Ok(default),
            }
        };
        let width = count("clip.vision.embedding_length")?;
        let heads = count("clip.vision.attention.head_count")?;
        let patch = opt("clip.vision.patch_size", 14)?;
        let merge = opt("clip.vision.spatial_merge_size", 2)?;
        // The converter writes the language model's width here for Qwen2-VL;
        // the MLP's width is the up projection's.
        let up = g.tensor("v.blk.0.ffn_up.weight")?;
        let mlp = up.rows();
        let d = Processor::default();
        let floats3 = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match g.get(key) {
                None => Ok(default),
                Some(_) => g
                    .get_f32_array(key)?
                    .try_into()
                    .map_err(|_| meta(key, "expected three values".into())),
            }
        };
        let processor = Processor {
            patch,
            merge,
            min_pixels: opt("clip.vision.image_min_pixels", d.min_pixels)?,
            max_pixels: opt("clip.vision.image_max_pixels", d.max_pixels)?,
            mean: floats3("clip.vision.image_mean", d.mean)?,
            std: floats3("clip.vision.image_std", d.std)?,
            ..d
        };
        let depth = count("clip.vision.block_count")?;
        let (window, full_blocks) = match family {
            Family::Qwen2Vl => (None, Vec::new()),
            Family::Qwen25Vl => {
                let every = opt("clip.vision.n_wa_pattern", 0)?;
                let full = (0..depth)
                    .filter(|i| every > 0 && (i + 1) % every == 0)
                    .collect();
                (
                    Some(opt("clip.vision.window_size", 112)? / patch.max(1)),
                    full,
                )
            }
        };
        let eps = match g.get("clip.vision.attention.layer_norm_epsilon") {
            Some(_) => g.get_f32("clip.vision.attention.layer_norm_epsilon")?,
            None => 1e-6,
        };
        let spec = VisionSpec {
            family,
            depth,
            width,
            heads,
            mlp,
            out: count("clip.vision.projection_dim")?,
            window,
            full_blocks,
            eps,
        };
        check_shape(&spec, &processor).map_err(|m| meta("clip.vision", m))?;
        Self::load(&Source::Gguf(g), Names::Gguf, spec, processor, backend)
    }

    fn load(
        src: &Source<'_>,
        names: Names<'_>,
        spec: VisionSpec,
        processor: Processor,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        let (w, fam) = (spec.width, spec.family);
        let be = &*backend;
        let patch_embed = be.weight(names.patch_embed(src, &processor, w)?)?;
        let blocks = (0..spec.depth)
            .map(|i| {
                let n = |hf: &str, gguf: &str| names.block(i, hf, gguf);
                let lin = |hf: &str, gguf: &str, cols, rows| {
                    Linear::load(src, &n(hf, gguf), cols, rows, be)
                };
                let [q, k, v] = match names {
                    Names::Hf(_) => {
                        let name = n("attn.qkv", "");
                        let qkv = src.tensor(&format!("{name}.weight"), &[w, 3 * w])?;
                        let bias = src.vector(&format!("{name}.bias"), 3 * w)?;
                        let part = |r: Range<usize>| {
                            Linear::new(be, qkv.row_range(r.clone()), bias[r].to_vec())
                        };
                        [part(0..w)?, part(w..2 * w)?, part(2 * w..3 * w)?]
                    }
                    Names::Gguf => [
                        lin("", "attn_q", w, w)?,
                        lin("", "attn_k", w, w)?,
                        lin("", "attn_v", w, w)?,
                    ],
                };
                let mlp = match fam {
                    Family::Qwen2Vl => Mlp::Gelu {
                        fc1: lin("mlp.fc1", "ffn_up", w, spec.mlp)?,
                        fc2: lin("mlp.fc2", "ffn_down", spec.mlp, w)?,
                    },
                    Family::Qwen25Vl => Mlp::SwiGlu {
                        gate: lin("mlp.gate_proj", "ffn_gate", w, spec.mlp)?,
                        up: lin("mlp.up_proj", "ffn_up", w, spec.mlp)?,
                        down: lin("mlp.down_proj", "ffn_down", spec.mlp, w)?,
                    },
                };
                Ok(Block {
                    norm1: Norm::load(src, &n("norm1", "ln1"), w, fam, be)?,
                    q,
                    k,
                    v,
                    proj: lin("attn.proj", "attn_out", w, w)?,
                    norm2: Norm::load(src, &n("norm2", "ln2"), w, fam, be)?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let m2 = processor.merge * processor.merge;
        let merged = w * m2;
        let g = |hf: &str, gguf: &str| names.global(hf, gguf);
        Ok(Self {
            merger_norm: Norm::load(src, &g("merger.ln_q", "v.post_ln"), w, fam, be)?,
            merger_fc1: Linear::load(src, &g("merger.mlp.0", "mm.0"), merged, merged, be)?,
            merger_fc2: Linear::load(src, &g("merger.mlp.2", "mm.2"), merged, spec.out, be)?,
            spec,
            processor,
            patch_embed,
            blocks,
            backend,
        })
    }

    /// The encoder's shape.
    pub fn spec(&self) -> &VisionSpec {
        &self.spec
    }

    /// The image processor that prepares its input.
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// The width of the rows it returns.
    pub fn out_width(&self) -> usize {
        self.spec.out
    }

    /// Encodes one preprocessed image: `[tokens, out]` values, one row per
    /// merged token in the order the prompt's placeholders take them.
    pub fn encode(&self, px: &Pixels) -> Result<Vec<f32>> {
        let pr = &self.processor;
        let [t, gh, gw] = px.grid;
        let n = t * gh * gw;
        let m = pr.merge;
        if n == 0 || gh % m != 0 || gw % m != 0 || px.patches.len() != n * pr.patch_len() {
            return Err(Error::InvalidRequest(format!(
                "a {t}x{gh}x{gw} patch grid with {} values does not fit this encoder",
                px.patches.len()
            )));
        }
        let be = &*self.backend;
        let VisionSpec {
            width: w,
            heads,
            mlp,
            eps,
            ..
        } = self.spec;
        let hd = w / heads;
        let m2 = m * m;
        let mut ws = be.workspace(n, (w * m2).max(mlp).max(pr.patch_len()), 0);

        // Rotary angles per patch: the first half of the pairs by its row,
        // the second by its column. Qwen2.5-VL runs patches window by window;
        // `order[i]` is the merged token at place `i`, and the patches are
        // put in that order before they go in (the patch embedding treats
        // each row alone).
        let (order, windows) = self.windows(px.grid);
        let angles = be.upload(self.rotary(px.grid, &order))?;
        let patches = match windows {
            None => be.upload(px.patches.clone())?,
            Some(_) => be.upload(permute(&px.patches, &order, m2 * pr.patch_len(), false))?,
        };
        let mut x = be.alloc(n * w)?;
        be.matmul_dense(&self.patch_embed, &patches, n, &mut x, &mut ws);
        drop(patches);
        let whole: Vec<Range<usize>> = (0..t).map(|i| i * gh * gw..(i + 1) * gh * gw).collect();

        let mut xn = be.alloc(n * w)?;
        let (mut q, mut k, mut v) = (be.alloc(n * w)?, be.alloc(n * w)?, be.alloc(n * w)?);
        let mut attn = be.alloc(n * w)?;
        let (mut h1, mut h2) = (be.alloc(n * mlp)?, be.alloc(n * mlp)?);
        for (bi, b) in self.blocks.iter().enumerate() {
            be.copy_rows(&x, 0, &mut xn, 0, n, w);
            b.norm1.apply(be, &mut xn, n, eps);
            b.q.apply(be, &xn, n, &mut q, &mut ws);
            b.k.apply(be, &xn, n, &mut k, &mut ws);
            b.v.apply(be, &xn, n, &mut v, &mut ws);
            be.rope_qk(
                &mut q,
                &mut k,
                n,
                (w, w),
                hd,
                RopeStyle::Halves,
                (&angles, hd / 2),
                None,
            );
            let segs = match &windows {
                Some(win) if !self.spec.full_blocks.contains(&bi) => win,
                _ => &whole,
            };
            let scale = 1.0 / (hd as f32).sqrt();
            be.attention_segments(&q, &k, &v, (heads, hd), scale, segs, &mut attn);
            b.proj.apply(be, &attn, n, &mut xn, &mut ws);
            be.add(&mut x, &xn, n * w);

            be.copy_rows(&x, 0, &mut xn, 0, n, w);
            b.norm2.apply(be, &mut xn, n, eps);
            match &b.mlp {
                Mlp::Gelu { fc1, fc2 } => {
                    fc1.apply(be, &xn, n, &mut h1, &mut ws);
                    be.activate(&mut h1, n * mlp, Activation::QuickGelu);
                    fc2.apply(be, &h1, n, &mut xn, &mut ws);
                }
                Mlp::SwiGlu { gate, up, down } => {
                    gate.apply(be, &xn, n, &mut h1, &mut ws);
                    up.apply(be, &xn, n, &mut h2, &mut ws);
                    be.swiglu(&mut h1, &h2, n * mlp);
                    down.apply(be, &h1, n, &mut xn, &mut ws);
                }
            }
            be.add(&mut x, &xn, n * w);
        }

        // Merge: each group of merge² consecutive rows becomes one row.
        self.merger_norm.apply(be, &mut x, n, eps);
        let tokens = n / m2;
        let mut hidden = be.alloc(tokens * w * m2)?;
        self.merger_fc1.apply(be, &x, tokens, &mut hidden, &mut ws);
        be.activate(&mut hidden, tokens * w * m2, Activation::GeluErf);
        let o = self.spec.out;
        let mut merged = be.alloc(tokens * o)?;
        self.merger_fc2
            .apply(be, &hidden, tokens, &mut merged, &mut ws);
        let mut out = vec![0.0; tokens * o];
        be.read(&merged, 0, &mut out);
        if windows.is_some() {
            // Back from window order to the image's.
            out = permute(&out, &order, o, true);
        }
        Ok(out)
    }

    /// (cos, sin) of each patch's rotation, `[n, head_dim / 2]`, patches in
    /// the order `order` puts merged tokens in: pairs `0..head_dim / 4` turn by
    /// the patch's row, the rest by its column, at `10000^(-4j / head_dim)`.
    fn rotary(&self, [t, gh, gw]: [usize; 3], order: &[usize]) -> Vec<f32> {
        let hd = self.spec.width / self.spec.heads;
        let (quarter, m) = (hd / 4, self.processor.merge);
        // transformers: VisionRotaryEmbedding(head_dim / 2) over positions.
        let dim = (hd / 2) as f32;
        let inv: Vec<f32> = (0..quarter)
            .map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / dim))
            .collect();
        let (bw, per_t) = (gw / m, gh * gw / (m * m));
        let mut out = Vec::with_capacity(t * gh * gw * hd);
        for &tok in order {
            let tok = tok % per_t.max(1);
            let (r0, c0) = ((tok / bw) * m, (tok % bw) * m);
            for dy in 0..m {
                for dx in 0..m {
                    let (row, col) = ((r0 + dy) as f32, (c0 + dx) as f32);
                    out.extend(inv.iter().flat_map(|&f| {
                        let a = row * f;
                        [a.cos(), a.sin()]
                    }));
                    out.extend(inv.iter().flat_map(|&f| {
                        let a = col * f;
                        [a.cos(), a.sin()]
                    }));
                }
            }
        }
        out
    }

    /// The order merged tokens run in and, for windowed attention, the
    /// patch ranges of each window in that order. Without windows the order
    /// is the image's own.
    fn windows(&self, [t, gh, gw]: [usize; 3]) -> (Vec<usize>, Option<Vec<Range<usize>>>) {
        let m = self.processor.merge;
        let (bh, bw) = (gh / m, gw / m);
        let Some(win) = self.spec.window else {
            return ((0..t * bh * bw).collect(), None);
        };
        // Window side in merged tokens; the grid is cut from the top-left
        // corner, so windows at the right and bottom edges may be smaller.
        let side = win / m;
        let m2 = m * m;
        let mut order = Vec::with_capacity(t * bh * bw);
        let mut segs = Vec::new();
        for f in 0..t {
            for wy in (0..bh).step_by(side) {
                for wx in (0..bw).step_by(side) {
                    let start = order.len() * m2;
                    for y in wy..(wy + side).min(bh) {
                        for x in wx..(wx + side).min(bw) {
                            order.push(f * bh * bw + y * bw + x);
                        }
                    }
                    segs.push(start..order.len() * m2);
                }
            }
        }
        (order, Some(segs))
    }
}

/// Rows of `unit` values put in `order`: row `i` of the result is row
/// `order[i]` of `rows`, or (`back`) row `order[i]` of the result is row
/// `i` of `rows`.
fn permute(rows: &[f32], order: &[usize], unit: usize, back: bool) -> Vec<f32> {
    let mut out = vec![0.0; rows.len()];
    for (i, &src) in order.iter().enumerate() {
        let (from, to) = if back { (i, src) } else { (src, i) };
        out[to * unit..(to + 1) * unit].copy_from_slice(&rows[from * unit..(from + 1) * unit]);
    }
    out
}
