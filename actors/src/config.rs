//! What the runtime needs to start, and the limits that can change while it runs.

use std::path::PathBuf;
use std::time::Duration;

use embody_engine::backend::BackendKind;

/// Everything the runtime needs to start. The daemon fills it from its TOML
/// configuration; [`Default`] holds the documented defaults.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The name requests use to pick this model; empty means the file's name
    /// without its extension.
    pub name: String,
    /// The model: a GGUF file or a Hugging Face folder.
    pub model_path: PathBuf,
    /// Load the model when the runtime starts; otherwise on its first request.
    pub load_at_start: bool,
    /// Unload the model after this long without requests; none means never.
    pub keep_alive: Option<Duration>,
    /// llama.cpp's vision projector GGUF for a GGUF vision-language model.
    pub mmproj: Option<PathBuf>,
    /// The backend that runs the model.
    pub backend: BackendKind,
    /// The GPU of a GPU backend (an index or part of its name); none takes the first.
    pub device: Option<String>,
    /// Compute threads; 0 means one per core.
    pub threads: usize,
    /// Longest context to serve, in tokens; 0 means the model's own.
    pub context_length: usize,
    /// Most tokens in one forward pass (longer prompts are prefilled in chunks).
    pub max_batch_tokens: usize,
    /// Quantize a Hugging Face folder's float weight matrices to this type
    /// as they load; none keeps them as stored.
    pub quantize: Option<embody_engine::quant::GgmlType>,
    /// Read control-token text inside messages (`<|im_end|>`) as the control
    /// token, as transformers and llama.cpp do. Off: messages are plain text
    /// and only the chat template's markup makes control tokens.
    pub special_tokens_in_messages: bool,
    /// Memory for the paged KV cache, in MiB.
    pub kv_cache_mb: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// How the KV cache stores keys and values.
    pub kv_type: embody_engine::kv_cache::KvType,
    /// Most requests decoding at once.
    pub max_running: usize,
    /// Reuse the KV of prompt prefixes seen before, across requests.
    pub prefix_cache: bool,
    /// Most tokens drafted per decoding step by prompt lookup (speculative
    /// decoding); 0 turns it off.
    pub draft_tokens: usize,
    /// Memory for the encoded rows of recent images, in MiB.
    pub image_cache_mb: usize,
    /// Limits that can change while the runtime runs.
    pub limits: Limits,
    /// Wait before the first restart of a failed actor; doubles with each
    /// failure in a row.
    pub restart_backoff: Duration,
    /// Longest wait between restarts.
    pub restart_backoff_max: Duration,
    /// Time limit of every request/reply between actors.
    pub call_timeout: Duration,
}

/// Limits the runtime reads per request, so they can change while it runs
/// ([`crate::Runtime::set_limits`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Most requests waiting for a decoding slot; more are refused as overloaded.
    pub max_queued: usize,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: u32,
    /// Most tokens a request may ask for.
    pub max_tokens_limit: u32,
    /// The decoder is unhealthy when its loop has not turned for this long,
    /// and the supervisor restarts it.
    pub stall_timeout: Duration,
    /// Every request ends with a `timeout` error when it has not finished
    /// this long after it arrived; none means no deadline but the request's own.
    pub request_timeout: Option<Duration>,
    /// Accept injected faults (panics, wedges) in the decoder. For tests only.
    pub fault_injection: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued: 64,
            default_max_tokens: 256,
            max_tokens_limit: 4096,
            stall_timeout: Duration::from_secs(20),
            request_timeout: None,
            fault_injection: false,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            model_path: PathBuf::new(),
            load_at_start: true,
            keep_alive: None,
            mmproj: None,
            backend: BackendKind::Cpu,
            device: None,
            threads: 0,
            context_length: 4096,
            max_batch_tokens: 512,
            quantize: None,
            special_tokens_in_messages: false,
            kv_cache_mb: 256,
            block_size: embody_engine::kv_cache::DEFAULT_BLOCK_SIZE,
            kv_type: Default::default(),
            max_running: 8,
            prefix_cache: true,
            draft_tokens: 8,
            image_cache_mb: 64,
            limits: Limits::default(),
            restart_backoff: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(10),
            call_timeout: Duration::from_secs(5),
        }
    }
}
