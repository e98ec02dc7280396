//! Vision: camera frames into rows of the language model's embedding width.
//!
//! [`preprocess`] turns encoded bytes into patches exactly as transformers'
//! image processor does; an encoder ([`qwen2vl`]) turns patches into rows
//! over the same [`Backend`](crate::backend::Backend) the decoder uses;
//! [`prompt`] lays those rows into a prompt: placeholder tokens expanded to
//! one per row, and the multimodal RoPE position of every row.

pub mod preprocess;
pub mod prompt;
pub mod qwen2vl;
pub mod resize;

pub use preprocess::{ImageError, Pixels, Processor};
pub use qwen2vl::{Family, VisionEncoder};
