//! Image preprocessing as transformers' Qwen2-VL image processor does it (its
//! PIL path): decode, convert to RGB, pick a size that is a multiple of the
//! merged patch (`smart_resize`), resize with Pillow's bicubic filter, rescale
//! to 0..1, normalise by the CLIP mean and deviation, and cut into patches of
//! `temporal × patch × patch` pixels per channel, ordered so that each group of
//! `merge²` consecutive rows is one merged token.
//!
//! PNG and other lossless inputs give transformers' pixel values bit for bit
//! (up to the last f32 rounding of the normalisation). JPEG decoders differ in
//! their inverse DCT and chroma upsampling: the `image` crate and libjpeg may
//! disagree by a few levels on some pixels.

use std::io::Cursor;
use std::path::Path;

use serde::Deserialize;

use crate::vision::resize::{resize_bicubic_rgb8_as, PillowVersion};

/// Largest accepted side of a decoded image, in pixels.
pub const MAX_SIDE: u32 = 16384;
/// Largest decoded image, in bytes of memory the decoder may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// Shortest accepted side, in pixels.
pub const MIN_SIDE: usize = 4;
/// Most pixels an image may have after resizing, whatever the processor
/// config says (Qwen's own configs allow 16384 tokens, whose attention over
/// 65536 patches would hold a 2-core robot computer for hours): 4096 merged
/// tokens, about 3.2 megapixels, more than most robot cameras send. Larger
/// images are scaled down to it, as `max_pixels` scales them.
pub const MAX_PIXELS_CAP: usize = 4096 * 28 * 28;

/// Why an image cannot be used. Every variant is the sender's mistake.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The bytes are not an image the decoder reads.
    #[error("the image cannot be decoded ({0}); send PNG or JPEG")]
    Decode(String),
    /// A side is over [`MAX_SIDE`] or the pixels need too much memory.
    #[error("the image is {width}x{height}: larger than this daemon decodes (at most {MAX_SIDE} pixels a side, {} MiB decoded)", MAX_DECODE_BYTES >> 20)]
    TooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Smaller than one patch on a side.
    #[error("the image is {width}x{height}: each side must be at least {min} pixels")]
    TooSmall {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The smallest side accepted.
        min: usize,
    },
    /// Longer side over 200 times the shorter one.
    #[error("the image is {width}x{height}: its aspect ratio must be below 200")]
    TooElongated {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

/// The image processor's settings (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Processor {
    /// Side of a patch in pixels (14).
    pub patch: usize,
    /// Patches merged per side into one token (2).
    pub merge: usize,
    /// Frames per patch (2): a still image is repeated.
    pub temporal: usize,
    /// Fewest pixels after resizing.
    pub min_pixels: usize,
    /// Most pixels after resizing.
    pub max_pixels: usize,
    /// Per-channel mean, subtracted after rescaling.
    pub mean: [f32; 3],
    /// Per-channel deviation, divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Multiplier from 0..255 to 0..1.
    pub rescale: f64,
    /// The Pillow release whose bicubic resize to reproduce: releases differ
    /// in which pass runs first for some shapes, and each pass rounds.
    pub pillow: PillowVersion,
}

/// OpenAI CLIP's normalisation, which Qwen2-VL uses.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl Default for Processor {
    /// Qwen2-VL's published processor.
    fn default() -> Self {
        Self {
            patch: 14,
            merge: 2,
            temporal: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            rescale: 1.0 / 255.0,
            pillow: PillowVersion::default(),
        }
    }
}

/// The fields of `preprocessor_config.json` the processor reads; missing ones
/// keep Qwen2-VL's values.
#[derive(Deserialize)]
struct ProcessorFile {
    patch_size: Option<usize>,
    merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: Option<SizeField>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f64>,
}

/// `size` as transformers 4.45+ writes it.
#[derive(Deserialize)]
struct SizeField {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

/// A preprocessed image: patches ready for the encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    /// Patches along time, height and width.
    pub grid: [usize; 3],
    /// `[t * h * w, 3 * temporal * patch * patch]` values, each row channel
    /// by channel, frame by frame, row by row of the patch.
    pub patches: Vec<f32>,
}

impl Pixels {
    /// Tokens the image takes in the prompt once merged.
    pub fn tokens(&self, merge: usize) -> usize {
        self.grid.iter().product::<usize>() / (merge * merge)
    }
}

impl Processor {
    /// Reads `preprocessor_config.json` in `dir`, or Qwen2-VL's defaults when
    /// the folder has none.
    pub fn from_dir(dir: &Path) -> crate::Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(crate::Error::Io { path, source }),
        };
        let de = &mut serde_json::Deserializer::from_str(&text);
        let f: ProcessorFile =
            serde_path_to_error::deserialize(de).map_err(|e| crate::Error::Metadata {
                path: path.clone(),
                key: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        let d = Self::default();
        let size = f.size.as_ref();
        let p = Self {
            patch: f.patch_size.unwrap_or(d.patch),
            merge: f.merge_size.unwrap_or(d.merge),
            temporal: f.temporal_patch_size.unwrap_or(d.temporal),
            // The explicit keys win over `size`, as in transformers.
            min_pixels: f
                .min_pixels
                .or(size.and_then(|s| s.shortest_edge))
                .unwrap_or(d.min_pixels),
            max_pixels: f
                .max_pixels
                .or(size.and_then(|s| s.longest_edge))
                .unwrap_or(d.max_pixels),
            mean: f.image_mean.unwrap_or(d.mean),
            std: f.image_std.unwrap_or(d.std),
            rescale: f.rescale_factor.unwrap_or(d.rescale),
            pillow: d.pillow,
        };
        p.check().map_err(|message| crate::Error::Metadata {
            path,
            key: "preprocessor_config".into(),
            message,
        })?;
        Ok(p)
    }

    fn check(&self) -> Result<(), String> {
        if self.patch == 0 || self.merge == 0 || self.temporal == 0 {
            return Err("patch_size, merge_size and temporal_patch_size must be at least 1".into());
        }
        if self.patch > 64 || self.merge > 8 || self.temporal > 8 {
            return Err(format!(
                "patch_size {}, merge_size {}, temporal_patch_size {}: larger than any Qwen-VL model uses",
                self.patch, self.merge, self.temporal
            ));
        }
        if self.min_pixels > self.max_pixels {
            return Err(format!(
                "min_pixels {} is over max_pixels {}",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err("image_std must be finite and non-zero".into());
        }
        Ok(())
    }

    /// Values in one patch row.
    pub fn patch_len(&self) -> usize {
        3 * self.temporal * self.patch * self.patch
    }

    /// Decodes encoded bytes (PNG, JPEG, ...) and preprocesses them.
    pub fn process(&self, bytes: &[u8]) -> Result<Pixels, ImageError> {
        let reader = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        if w > MAX_SIDE || h > MAX_SIDE {
            return Err(ImageError::TooLarge {
                width: w,
                height: h,
            });
        }
        let mut reader = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        let img = reader.decode().map_err(|e| match e {
            image::ImageError::Limits(_) => ImageError::TooLarge {
                width: w,
                height: h,
            },
            e => ImageError::Decode(e.to_string()),
        })?;
        let rgb = if img.color().has_alpha() {
            on_white(&img.to_rgba8())
        } else {
            img.to_rgb8().into_raw()
        };
        self.process_rgb(&rgb, w as usize, h as usize)
    }

    /// Preprocesses interleaved 8-bit RGB pixels, `width * height * 3` bytes.
    ///
    /// # Panics
    /// If `rgb` is not `width * height * 3` bytes.
    pub fn process_rgb(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<Pixels, ImageError> {
        assert_eq!(rgb.len(), width * height * 3, "process_rgb: buffer size");
        let (rh, rw) = self.target_size(height, width)?;
        let resized;
        let src = if (rh, rw) == (height, width) {
            rgb
        } else {
            resized = resize_bicubic_rgb8_as(rgb, width, height, rw, rh, self.pillow);
            &resized[..]
        };
        Ok(self.patchify(src, rw, rh))
    }

    /// The size transformers' `smart_resize` picks: both sides multiples of
    /// `patch * merge`, the pixel count within `[min_pixels, max_pixels]`,
    /// the aspect ratio kept as well as that allows. Returns (height, width).
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), ImageError> {
        let factor = self.patch * self.merge;
        let (w32, h32) = (width as u32, height as u32);
        // transformers scales any image up to min_pixels; a side this short
        // holds nothing to see.
        if height < MIN_SIDE || width < MIN_SIDE {
            return Err(ImageError::TooSmall {
                width: w32,
                height: h32,
                min: MIN_SIDE,
            });
        }
        if height.max(width) as f64 / height.min(width) as f64 > 200.0 {
            return Err(ImageError::TooElongated {
                width: w32,
                height: h32,
            });
        }
        let max_pixels = self.max_pixels.min(MAX_PIXELS_CAP);
        let f = factor as f64;
        // Python's round() rounds ties to even.
        let round = |x: usize| (x as f64 / f).round_ties_even() as usize * factor;
        let (mut h, mut w) = (round(height), round(width));
        let (hf, wf) = (height as f64, width as f64);
        if h * w > max_pixels {
            let beta = (hf * wf / max_pixels as f64).sqrt();
            h = factor.max((hf / beta / f).floor() as usize * factor);
            w = factor.max((wf / beta / f).floor() as usize * factor);
        } else if h * w < self.min_pixels {
            let beta = (self.min_pixels as f64 / (hf * wf)).sqrt();
            h = (hf * beta / f).ceil() as usize * factor;
            w = (wf * beta / f).ceil() as usize * factor;
        }
        Ok((h, w))
    }

    /// Rescales, normalises and cuts a resized image into patch rows, in the
    /// order of transformers' reshape: merged token by merged token (row-major
    /// over the grid of `merge × merge` blocks), patch by patch inside one.
    fn patchify(&self, rgb: &[u8], width: usize, height: usize) -> Pixels {
        let (p, m, tp) = (self.patch, self.merge, self.temporal);
        let (gh, gw) = (height / p, width / p);
        let row_len = self.patch_len();
        let mut patches = Vec::with_capacity(gh * gw * row_len);
        // numpy: f64 rescale rounded to f32, then (x - mean) / std in f32.
        let value = |y: usize, x: usize, c: usize| {
            let v = (rgb[(y * width + x) * 3 + c] as f64 * self.rescale) as f32;
            (v - self.mean[c]) / self.std[c]
        };
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (py0, px0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            // A still image: every frame is the same.
                            for _ in 0..tp {
                                for y in py0..py0 + p {
                                    patches.extend((px0..px0 + p).map(|x| value(y, x, c)));
                                }
                            }
                        }
                    }
                }
            }
        }
        Pixels {
            grid: [1, gh, gw],
            patches,
        }
    }
}

/// RGBA composited onto opaque white, as transformers' `convert_rgb` does
/// with Pillow's `alpha_composite` (its fixed-point arithmetic: 7 fraction
/// bits, division by 255 by shifts).
fn on_white(rgba: &image::RgbaImage) -> Vec<u8> {
    const BITS: u32 = 7;
    let shift_div255 = |a: u32| ((a >> 8) + a) >> 8;
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.pixels() {
        let a = px[3] as u32;
        let (coef1, coef2) = (a << BITS, (255 - a) << BITS);
        for &c in &px.0[..3] {
            let t = c as u32 * coef1 + 255 * coef2;
            out.push((shift_div255(t + (0x80 << BITS)) >> BITS) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_ties_to_even_as_python_does() {
        let p = Processor::default();
        // 42 / 28 = 1.5 rounds to 2 (even); 70 / 28 = 2.5 rounds to 2.
        assert_eq!(p.target_size(42, 70).unwrap(), (56, 56));
        // 98 / 28 = 3.5 rounds to 4.
        assert_eq!(p.target_size(98, 98).unwrap(), (112, 112));
        assert_eq!(p.target_size(480, 640).unwrap(), (476, 644));
    }

    #[test]
    fn smart_resize_keeps_within_the_pixel_bounds() {
        let p = Processor {
            max_pixels: 256 * 28 * 28,
            ..Processor::default()
        };
        let (h, w) = p.target_size(2160, 3840).unwrap();
        assert!(
            h * w <= p.max_pixels && h % 28 == 0 && w % 28 == 0,
            "{h}x{w}"
        );
        let (h, w) = p.target_size(20, 30).unwrap();
        assert!(h * w >= p.min_pixels, "{h}x{w}");
    }

    #[test]
    fn odd_images_are_refused_with_a_reason() {
        let p = Processor::default();
        assert!(matches!(
            p.target_size(3, 100),
            Err(ImageError::TooSmall { .. })
        ));
        // Small but real images are scaled up, as transformers does.
        assert_eq!(p.target_size(10, 10).unwrap(), (56, 56));
        assert_eq!(p.target_size(50, 90).unwrap(), (56, 84));
        assert_eq!(p.target_size(2000, 3000).unwrap(), (812, 1204));
        assert!(matches!(
            p.target_size(20, 5000),
            Err(ImageError::TooElongated { .. })
        ));
        assert!(matches!(
            p.process(b"not an image"),
            Err(ImageError::Decode(_))
        ));
    }

    #[test]
    fn patches_are_ordered_by_merged_token() {
        // A 56x56 image whose red channel encodes the 14x14 patch index.
        let p = Processor::default();
        let mut rgb = vec![0u8; 56 * 56 * 3];
        for y in 0..56 {
            for x in 0..56 {
                rgb[(y * 56 + x) * 3] = ((y / 14) * 4 + x / 14) as u8;
            }
        }
        let px = p.process_rgb(&rgb, 56, 56).unwrap();
        assert_eq!(px.grid, [1, 4, 4]);
        let first_red = |row: usize| {
            let v = px.patches[row * p.patch_len()];
            ((v * p.std[0] + p.mean[0]) * 255.0).round() as usize
        };
        // Rows 0..4 are the top-left 2x2 block: patches (0,0), (0,1), (1,0), (1,1).
        let order: Vec<usize> = (0..16).map(first_red).collect();
        assert_eq!(
            order,
            [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
        );
    }
}
