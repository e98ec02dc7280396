//! The embodyd inference engine: synchronous Rust, no async runtime.
//!
//! The one decision to understand first: **every forward pass is batched, ragged
//! and paged.** A forward takes a batch of sequences, each with its new tokens,
//! its start position and its KV block table, and returns logits only for the rows
//! asked for. A single-sequence generate is the batch of one, so continuous
//! batching and prefix reuse add scheduling on top, never new model code.
//!
//! Layers, bottom up: [`gguf`] reads model files over mmap with every offset
//! bounds-checked, and [`hf`] Hugging Face folders (config.json, safetensors);
//! [`quant`] holds the block formats with a scalar reference for every kernel; [`backend`] runs the heavy operations; [`models`] are one file
//! per architecture; [`kv_cache`] is the paged block pool; [`tokenizer`],
//! [`chat_template`] and [`sampling`] turn logits into text.
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod chat_template;
pub mod constraint;
pub mod error;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod hub_cache;
pub mod kv_cache;
pub mod message_text;
pub mod models;
pub mod ops;
pub mod perplexity;
pub mod prefix_cache;
pub mod quant;
pub mod quantize;
pub mod radix;
pub mod sampling;
pub mod scheduler;
pub mod speculate;
pub mod tensor;
pub mod tokenizer;
pub mod tool_calls;
pub mod vision;

pub use error::{Error, Result};
