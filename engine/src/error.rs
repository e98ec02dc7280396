//! The engine's error type. Every variant carries the context a user needs to act
//! on it: the file, the tensor or metadata key, and what was expected.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A GGUF file is malformed: truncated, wrong magic, out-of-range offsets.
    #[error("{path}: invalid GGUF file: {message}")]
    Gguf {
        /// The file being parsed.
        path: PathBuf,
        /// What is wrong, naming the tensor or key where there is one.
        message: String,
    },
    /// A metadata key the model needs is missing or has the wrong type.
    #[error("{path}: metadata key '{key}': {message}")]
    Metadata {
        /// The model file.
        path: PathBuf,
        /// The GGUF key or config.json field.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is missing, has the wrong shape or an unsupported type.
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor {
        /// The model file.
        path: PathBuf,
        /// The tensor's name as written in the file.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// The file's architecture is not one this engine implements.
    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArchitecture {
        /// The model file.
        path: PathBuf,
        /// The architecture the file names.
        arch: String,
        /// The architectures this build supports.
        supported: String,
    },
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A request cannot be served as asked (too long for the context, empty prompt, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The server is at capacity: the queue is full.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The paged KV cache has no free block left.
    #[error("KV cache full: {needed} blocks needed, {free} free (raise kv_cache_mb)")]
    KvCacheFull {
        /// Blocks the operation needed.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// The KV cache's storage type cannot serve this model or backend.
    #[error("KV cache type: {0}")]
    KvType(String),
    /// A backend was requested that this build does not include.
    #[error("backend '{0}' is not compiled into this build")]
    NotCompiled(&'static str),
    /// A GPU device could not be opened or used (no driver, no memory).
    #[error("GPU device: {0}")]
    Device(String),
    /// An image a request sent cannot be used (the sender's mistake).
    #[error("{0}")]
    Image(#[from] crate::vision::ImageError),
}

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<embody_protocol::SamplingError> for Error {
    fn from(e: embody_protocol::SamplingError) -> Self {
        Error::InvalidRequest(e.to_string())
    }
}
