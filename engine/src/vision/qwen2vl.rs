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

use crate::backend::{Activation, Backend, MatIn, MatOut};
use crate::hf::HfFolder;
use crate::models::Source;
use crate::ops::RopeStyle;
use crate::tensor::QTensor;
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
    Layer { w: Vec<f32>, b: Vec<f32> },
    Rms { w: Vec<f32> },
}

impl Norm {
    fn load(src: &Source<'_>, name: &str, d: usize, family: Family) -> Result<Self> {
        let w = src.vector(&format!("{name}.weight"), d)?;
        Ok(match family {
            Family::Qwen2Vl => Norm::Layer {
                w,
                b: src.vector(&format!("{name}.bias"), d)?,
            },
            Family::Qwen25Vl => Norm::Rms { w },
        })
    }

    fn apply(&self, be: &dyn Backend, x: &mut [f32], eps: f32) {
        match self {
            Norm::Layer { w, b } => be.layer_norm(x, w, b, eps),
            Norm::Rms { w } => be.rms_norm(x, w, eps),
        }
    }
}

/// A linear layer with its bias.
struct Linear {
    w: QTensor,
    b: Vec<f32>,
}

impl Linear {
    fn load(src: &Source<'_>, name: &str, cols: usize, rows: usize) -> Result<Self> {
        Ok(Self {
            w: src.tensor(&format!("{name}.weight"), &[cols, rows])?,
            b: src.vector(&format!("{name}.bias"), rows)?,
        })
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

/// A loaded vision encoder.
pub struct VisionEncoder {
    spec: VisionSpec,
    processor: Processor,
    patch_embed: QTensor, // [3 * temporal * patch², width]
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
        if c.num_heads == 0
            || !width.is_multiple_of(c.num_heads)
            || !(width / c.num_heads).is_multiple_of(4)
        {
            return Err(meta(
                "num_heads",
                format!(
                    "{} heads do not split a width of {width} into heads of a multiple of 4",
                    c.num_heads
                ),
            ));
        }
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
        let src = Source::Hf {
            folder,
            prefix: "model.",
            config: "",
        };
        Self::load(&src, prefix, spec, processor, backend)
    }

    fn load(
        src: &Source<'_>,
        prefix: &str,
        spec: VisionSpec,
        processor: Processor,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        let (w, fam) = (spec.width, spec.family);
        let p = processor.patch;
        let pe_name = format!("{prefix}patch_embed.proj.weight");
        // The Conv3d's kernel is one row of `3 * temporal * p * p` per output.
        let mut patch_embed = src.tensor(&pe_name, &[p, p, processor.temporal, 3, w])?;
        patch_embed.shape = vec![processor.patch_len(), w];
        let blocks = (0..spec.depth)
            .map(|i| {
                let n = |s: &str| format!("{prefix}blocks.{i}.{s}");
                let qkv = Linear::load(src, &n("attn.qkv"), w, 3 * w)?;
                let part = |r: Range<usize>| Linear {
                    w: qkv.w.row_range(r.clone()),
                    b: qkv.b[r].to_vec(),
                };
                let mlp = match fam {
                    Family::Qwen2Vl => Mlp::Gelu {
                        fc1: Linear::load(src, &n("mlp.fc1"), w, spec.mlp)?,
                        fc2: Linear::load(src, &n("mlp.fc2"), spec.mlp, w)?,
                    },
                    Family::Qwen25Vl => Mlp::SwiGlu {
                        gate: Linear::load(src, &n("mlp.gate_proj"), w, spec.mlp)?,
                        up: Linear::load(src, &n("mlp.up_proj"), w, spec.mlp)?,
                        down: Linear::load(src, &n("mlp.down_proj"), spec.mlp, w)?,
                    },
                };
                Ok(Block {
                    norm1: Norm::load(src, &n("norm1"), w, fam)?,
                    q: part(0..w),
                    k: part(w..2 * w),
                    v: part(2 * w..3 * w),
                    proj: Linear::load(src, &n("attn.proj"), w, w)?,
                    norm2: Norm::load(src, &n("norm2"), w, fam)?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let m2 = processor.merge * processor.merge;
        let merged = w * m2;
        Ok(Self {
            merger_norm: Norm::load(src, &format!("{prefix}merger.ln_q"), w, fam)?,
            merger_fc1: Linear::load(src, &format!("{prefix}merger.mlp.0"), merged, merged)?,
            merger_fc2: Linear::load(src, &format!("{prefix}merger.mlp.2"), merged, spec.out)?,
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
        let mut x = vec![0.0; n * w];
        be.matmul(&self.patch_embed, &px.patches, n, &mut x, &mut ws);

        // Rotary angles per patch: the first half of the pairs by its row,
        // the second by its column. Qwen2.5-VL runs patches window by window;
        // `order[i]` is the merged token at place `i`.
        let (order, windows) = self.windows(px.grid);
        let angles = self.rotary(px.grid, &order);
        let permute = |rows: &mut Vec<f32>, width: usize| {
            let mut out = vec![0.0; rows.len()];
            for (i, &src) in order.iter().enumerate() {
                let r = src * m2 * width..(src + 1) * m2 * width;
                out[i * m2 * width..(i + 1) * m2 * width].copy_from_slice(&rows[r]);
            }
            *rows = out;
        };
        if windows.is_some() {
            permute(&mut x, w);
        }
        let whole: Vec<Range<usize>> = (0..t).map(|i| i * gh * gw..(i + 1) * gh * gw).collect();

        let mut xn = vec![0.0; n * w];
        let (mut q, mut k, mut v) = (vec![0.0; n * w], vec![0.0; n * w], vec![0.0; n * w]);
        let mut attn = vec![0.0; n * w];
        let (mut h1, mut h2) = (vec![0.0; n * mlp], vec![0.0; n * mlp]);
        for (bi, b) in self.blocks.iter().enumerate() {
            xn.copy_from_slice(&x);
            b.norm1.apply(be, &mut xn, eps);
            be.matmul_group(
                &xn,
                n,
                &mut [
                    MatOut {
                        w: &b.q.w,
                        y: &mut q,
                    },
                    MatOut {
                        w: &b.k.w,
                        y: &mut k,
                    },
                    MatOut {
                        w: &b.v.w,
                        y: &mut v,
                    },
                ],
                &mut ws,
            );
            be.add_bias(&mut q, &b.q.b);
            be.add_bias(&mut k, &b.k.b);
            be.add_bias(&mut v, &b.v.b);
            be.rope_qk(
                &mut q,
                &mut k,
                (w, w),
                hd,
                RopeStyle::Halves,
                &angles,
                hd / 2,
                None,
            );
            let segs = match &windows {
                Some(win) if !self.spec.full_blocks.contains(&bi) => win,
                _ => &whole,
            };
            let scale = 1.0 / (hd as f32).sqrt();
            be.attention_segments(&q, &k, &v, (heads, hd), scale, segs, &mut attn);
            be.matmul(&b.proj.w, &attn, n, &mut xn, &mut ws);
            be.add_bias(&mut xn, &b.proj.b);
            crate::ops::add_inplace(&mut x, &xn);

            xn.copy_from_slice(&x);
            b.norm2.apply(be, &mut xn, eps);
            match &b.mlp {
                Mlp::Gelu { fc1, fc2 } => {
                    be.matmul(&fc1.w, &xn, n, &mut h1, &mut ws);
                    be.add_bias(&mut h1, &fc1.b);
                    be.activate(&mut h1, Activation::QuickGelu);
                    be.matmul(&fc2.w, &h1, n, &mut xn, &mut ws);
                    be.add_bias(&mut xn, &fc2.b);
                }
                Mlp::SwiGlu { gate, up, down } => {
                    be.matmul_group(
                        &xn,
                        n,
                        &mut [
                            MatOut {
                                w: &gate.w,
                                y: &mut h1,
                            },
                            MatOut {
                                w: &up.w,
                                y: &mut h2,
                            },
                        ],
                        &mut ws,
                    );
                    be.add_bias(&mut h1, &gate.b);
                    be.add_bias(&mut h2, &up.b);
                    let act = MatIn::SwiGlu { gate: &h1, up: &h2 };
                    be.matmul_in(&down.w, act, n, &mut xn, &mut ws);
                    be.add_bias(&mut xn, &down.b);
                }
            }
            crate::ops::add_inplace(&mut x, &xn);
        }

        // Merge: each group of merge² consecutive rows becomes one row.
        self.merger_norm.apply(be, &mut x, eps);
        let tokens = n / m2;
        let mut hidden = vec![0.0; tokens * w * m2];
        be.matmul(&self.merger_fc1.w, &x, tokens, &mut hidden, &mut ws);
        be.add_bias(&mut hidden, &self.merger_fc1.b);
        be.activate(&mut hidden, Activation::GeluErf);
        let mut out = vec![0.0; tokens * self.spec.out];
        be.matmul(&self.merger_fc2.w, &hidden, tokens, &mut out, &mut ws);
        be.add_bias(&mut out, &self.merger_fc2.b);
        if windows.is_some() {
            // Back from window order to the image's.
            let mut back = vec![0.0; out.len()];
            let o = self.spec.out;
            for (i, &src) in order.iter().enumerate() {
                back[src * o..(src + 1) * o].copy_from_slice(&out[i * o..(i + 1) * o]);
            }
            out = back;
        }
        Ok(out)
    }

    /// (cos, sin) of each patch's rotation, `[n, head_dim / 2]`, patches in
    /// the order `order` puts merged tokens in: pairs `0..head_dim / 4` turn by
    /// the patch's row, the rest by its column, at `10000^(-4j / head_dim)`.
    fn rotary(&self, [t, gh, gw]: [usize; 3], order: &[usize]) -> Vec<(f32, f32)> {
        let hd = self.spec.width / self.spec.heads;
        let (quarter, m) = (hd / 4, self.processor.merge);
        // transformers: VisionRotaryEmbedding(head_dim / 2) over positions.
        let dim = (hd / 2) as f32;
        let inv: Vec<f32> = (0..quarter)
            .map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / dim))
            .collect();
        let (bw, per_t) = (gw / m, gh * gw / (m * m));
        let mut out = Vec::with_capacity(t * gh * gw * hd / 2);
        for &tok in order {
            let tok = tok % per_t.max(1);
            let (r0, c0) = ((tok / bw) * m, (tok % bw) * m);
            for dy in 0..m {
                for dx in 0..m {
                    let (row, col) = ((r0 + dy) as f32, (c0 + dx) as f32);
                    out.extend(inv.iter().map(|&f| {
                        let a = row * f;
                        (a.cos(), a.sin())
                    }));
                    out.extend(inv.iter().map(|&f| {
                        let a = col * f;
                        (a.cos(), a.sin())
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
