//! Laying images into a prompt: each image's placeholder token expanded to
//! one token per encoder row, and the multimodal RoPE position of every row.
//!
//! Positions follow transformers' `get_rope_index`: text advances all three
//! streams together; an image of `t × h × w` merged tokens takes ids
//! `start + (ti, hi, wi)`, and the text after it resumes one past the largest
//! id the image used, so an image costs `max(t, h, w)` positions however
//! many rows it has. Generated tokens continue from the last id.

use std::sync::Arc;

use crate::prefix_cache::ImageSpan;
use crate::vision::EncodedImage;
use crate::{Error, Result};

/// A rendered prompt with its images laid in: what a scheduler request needs.
#[derive(Clone, Debug, Default)]
pub struct Laid {
    /// Token ids, each image's placeholder repeated once per row.
    pub tokens: Vec<u32>,
    /// Where each image sits, keyed by its hash for the prefix cache.
    pub images: Vec<ImageSpan>,
    /// Each image's rows, in the order of `images`.
    pub rows: Vec<Arc<[f32]>>,
    /// Three position ids per token.
    pub positions: Vec<[u32; 3]>,
    /// The id of the first generated token.
    pub next_position: u32,
}

/// Lays `images` into `prompt`, which holds one `placeholder` per image in
/// order. With `mrope` (the model rotates by three streams) each row gets
/// its grid position; without, rows are numbered in order, as llama.cpp
/// does for such models.
pub fn lay_out(
    prompt: &[u32],
    placeholder: u32,
    images: &[EncodedImage],
    mrope: bool,
) -> Result<Laid> {
    let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid).collect();
    let (tokens, places) = expand(prompt, placeholder, &grids)?;
    let (positions, next_position) = if mrope {
        positions(tokens.len(), &places)
    } else {
        (Vec::new(), 0)
    };
    Ok(Laid {
        images: places
            .iter()
            .zip(images)
            .map(|(p, i)| ImageSpan {
                start: p.start,
                len: p.len(),
                hash: i.hash,
            })
            .collect(),
        rows: images.iter().map(|i| i.rows.clone()).collect(),
        tokens,
        positions,
        next_position,
    })
}

/// Where one image sits in an expanded prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImagePlace {
    /// The first of its rows.
    pub start: usize,
    /// Merged tokens along time, height and width; the rows are
    /// `t * h * w`, row-major.
    pub grid: [usize; 3],
}

impl ImagePlace {
    /// Rows the image takes.
    pub fn len(&self) -> usize {
        self.grid.iter().product()
    }

    /// Whether it takes none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Replaces the `i`-th `placeholder` in `prompt` by `grids[i]`'s rows of
/// placeholders. The prompt must hold exactly one placeholder per image.
pub fn expand(
    prompt: &[u32],
    placeholder: u32,
    grids: &[[usize; 3]],
) -> Result<(Vec<u32>, Vec<ImagePlace>)> {
    let found = prompt.iter().filter(|&&t| t == placeholder).count();
    if found != grids.len() {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {found} image placeholders for {} images (the text may not contain the image placeholder token)",
            grids.len()
        )));
    }
    let rows: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
    let mut out = Vec::with_capacity(prompt.len() + rows);
    let mut places = Vec::with_capacity(grids.len());
    let mut next = grids.iter();
    for &t in prompt {
        if t != placeholder {
            out.push(t);
            continue;
        }
        let grid = *next.next().expect("counted");
        places.push(ImagePlace {
            start: out.len(),
            grid,
        });
        out.extend(std::iter::repeat_n(placeholder, grid.iter().product()));
    }
    Ok((out, places))
}

/// The three position ids of each of `len` prompt rows with images at
/// `places` (sorted, not overlapping), and the id the next row takes.
pub fn positions(len: usize, places: &[ImagePlace]) -> (Vec<[u32; 3]>, u32) {
    let mut ids = Vec::with_capacity(len);
    let mut next: u32 = 0;
    let mut places = places.iter().peekable();
    while ids.len() < len {
        match places.peek() {
            Some(p) if p.start == ids.len() => {
                let [t, h, w] = p.grid;
                for ti in 0..t {
                    for hi in 0..h {
                        for wi in 0..w {
                            ids.push([next + ti as u32, next + hi as u32, next + wi as u32]);
                        }
                    }
                }
                next += t.max(h).max(w) as u32;
                places.next();
            }
            _ => {
                ids.push([next; 3]);
                next += 1;
            }
        }
    }
    (ids, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_and_text_resumes_after_the_image() {
        const PAD: u32 = 9;
        let (tokens, places) = expand(&[1, 2, PAD, 3], PAD, &[[1, 2, 3]]).unwrap();
        assert_eq!(tokens, [1, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3]);
        assert_eq!(
            places,
            [ImagePlace {
                start: 2,
                grid: [1, 2, 3]
            }]
        );
        let (ids, next) = positions(tokens.len(), &places);
        assert_eq!(&ids[..2], &[[0; 3], [1; 3]]);
        // Row-major over height then width, from the image's start id.
        assert_eq!(
            &ids[2..8],
            &[
                [2, 2, 2],
                [2, 2, 3],
                [2, 2, 4],
                [2, 3, 2],
                [2, 3, 3],
                [2, 3, 4]
            ]
        );
        // The image spans max(1, 2, 3) = 3 ids.
        assert_eq!(ids[8], [5; 3]);
        assert_eq!(next, 6);
    }

    #[test]
    fn a_placeholder_count_that_does_not_match_is_refused() {
        assert!(expand(&[1, 9, 9], 9, &[[1, 1, 1]]).is_err());
        assert!(expand(&[1, 2], 9, &[[1, 1, 1]]).is_err());
    }
}
