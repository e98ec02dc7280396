//! The daemon's configuration: one TOML file (`configs/default.toml` documents
//! every field with its default), then command-line flags over it.
//!
//! Every section and field is optional; a missing one takes its default. An
//! unknown field or a value of the wrong type is an error that names it, so
//! a typo never passes silently.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use embody_actors::{Limits, RuntimeConfig, RuntimeOptions};
use embody_engine::kv_cache::KvType;
use embody_engine::scheduler::MAX_DRAFT;
use embody_robot_adapters::{AdaptersConfig, CameraConfig, Ros2Config, TaskConfig, ZenohConfig};

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The model and the device that runs it.
    pub model: ModelConfig,
    /// The paged KV cache.
    pub cache: CacheConfig,
    /// Admission and generation limits.
    pub decoder: DecoderConfig,
    /// Restarts and health.
    pub supervisor: SupervisorConfig,
    /// The local Unix socket.
    pub ipc: IpcConfig,
    /// The OpenAI-compatible HTTP API.
    pub http: HttpConfig,
    /// Behaviour as a service.
    pub service: ServiceConfig,
    /// Logging.
    pub log: LogConfig,
    /// Switches for tests of the daemon itself.
    pub testing: TestingConfig,
    /// The zenoh session and key space.
    pub zenoh: ZenohConfig,
    /// The daemon as a ROS 2 node (through rmw_zenoh).
    pub ros2: Ros2Config,
    /// Cameras whose latest frame requests can attach by name.
    pub cameras: Vec<CameraConfig>,
    /// Periodic perception tasks.
    pub tasks: Vec<TaskConfig>,
    /// Several models in one daemon; none means the one of `[model]`.
    pub models: Vec<ModelsEntry>,
}

/// One `[[models]]` entry: a model served under `name`. Fields left out take
/// the `[model]` and `[cache]` values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsEntry {
    /// The name requests use (`model`).
    pub name: String,
    /// A GGUF file, a Hugging Face folder or a Hugging Face id, as `model.path`.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmproj: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_mb: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_type: Option<String>,
    /// Load at start (true) or on the first request that names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload: Option<bool>,
}

/// `[model]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The model: a GGUF file or a Hugging Face folder. A relative path is
    /// looked up in the models folder (`$EMBODY_MODELS`, else
    /// `~/.cache/embody/models`); `~/` is the home folder.
    /// Default: "SmolLM2-135M-Instruct.Q4_1.gguf".
    pub path: String,
    /// llama.cpp's vision projector (`mmproj`) GGUF file that goes with a
    /// GGUF vision-language model, looked up as `path` is. Default: none.
    pub mmproj: Option<String>,
    /// The backend: "cpu", "reference" (the scalar oracle, slow), "cuda" or
    /// "vulkan". Default: "cpu".
    pub backend: String,
    /// The GPU a GPU backend runs on: its index or part of its name, as the
    /// driver reports it (`embody status` shows the one chosen); empty takes
    /// the first GPU. Default: "".
    pub device: String,
    /// Compute threads; 0 means one per core. Default: 0.
    pub threads: usize,
    /// Longest context served, in tokens; 0 means the model's own. Default: 4096.
    pub context_length: usize,
    /// Most tokens in one forward pass; longer prompts are prefilled in chunks. Default: 512.
    pub max_batch_tokens: usize,
    /// Read control-token text inside messages and tool definitions (such as
    /// `<|im_end|>`) as the control token, as transformers and llama.cpp do.
    /// Off, message text is plain text, so it cannot close its own turn or
    /// forge another; only the chat template's markup makes control tokens.
    /// Default: false.
    pub special_tokens_in_messages: bool,
    /// Unload the model after this many ms without requests (a request
    /// loads it again); 0 means never. Default: 0.
    pub keep_alive_ms: u64,
    /// Quantize a Hugging Face folder's float weight matrices as they load:
    /// "q8_0" (or another weight type); empty keeps them as stored. GGUF
    /// files keep their own types. Default: "".
    pub quantize: String,
    /// Speculative decoding by prompt lookup: most tokens drafted per step
    /// from the request's own text; 0 turns it off. Default: 8.
    pub draft_tokens: usize,
}

/// `[cache]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory for the KV cache, in MiB. Default: 256.
    pub kv_cache_mb: usize,
    /// Tokens per KV block. Default: 16.
    pub block_size: usize,
    /// How the KV cache stores keys and values: "f16"; "q8_0" (about half
    /// the memory per token, so twice the context or requests in the same
    /// kv_cache_mb); "q4_0" (about a quarter, less exact). Quantized types
    /// run on the CPU backend. Default: "f16".
    pub kv_cache_type: String,
    /// Reuse the KV of prompt prefixes seen before, across requests and
    /// clients. Default: true.
    pub prefix_cache: bool,
    /// Memory for the encoded rows of recent images (looked up by the
    /// image's content), in MiB. Default: 64.
    pub image_cache_mb: usize,
}

/// `[decoder]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecoderConfig {
    /// Most requests decoding at once. Default: 8.
    pub max_running: usize,
    /// Most requests waiting for a slot; more are refused as "overloaded". Default: 64.
    pub max_queued: usize,
    /// Tokens generated when a request does not say. Default: 256.
    pub default_max_tokens: u32,
    /// Most tokens a request may ask for. Default: 4096.
    pub max_tokens_limit: u32,
    /// Every request ends with a "timeout" error when it has not finished
    /// this long after it arrived (queueing included), in ms; 0 means none
    /// but the request's own `timeout_ms`. Default: 0.
    pub request_timeout_ms: u64,
}

/// `[supervisor]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Wait before restarting a failed actor, in ms; doubles with each failure
    /// in a row. Default: 100.
    pub restart_backoff_ms: u64,
    /// Longest wait between restarts, in ms. Default: 10000.
    pub restart_backoff_max_ms: u64,
    /// When the decoder has made no progress for this long, in ms, the daemon
    /// is unhealthy (and stops feeding the systemd watchdog) and the
    /// supervisor replaces the decoder in-process. Default: 20000.
    pub stall_timeout_ms: u64,
    /// Time limit of requests between actors, in ms. Default: 5000.
    pub call_timeout_ms: u64,
}

/// `[ipc]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpcConfig {
    /// The socket, used when neither `$RUNTIME_DIRECTORY` nor
    /// `$XDG_RUNTIME_DIR` is set (then it is `embodyd.sock` in that folder).
    /// Default: "/run/embodyd/embodyd.sock".
    pub socket: String,
    /// Most client connections at once. Default: 64.
    pub max_connections: usize,
    /// Once a frame has begun, the rest must arrive within this many ms. Default: 10000.
    pub frame_timeout_ms: u64,
    /// A client that takes none of a reply's bytes for this many ms is
    /// closed and its requests cancelled. Default: 30000.
    pub write_timeout_ms: u64,
}

/// `[http]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve the HTTP API. Default: true.
    pub enabled: bool,
    /// Address and port to listen on; port 0 picks a free one (the log says
    /// which). Default: "127.0.0.1:8080".
    pub bind: String,
    /// The bearer token clients must send (`Authorization: Bearer <key>`) on
    /// `/v1/` routes; empty means none is needed. Default: "".
    pub api_key: String,
    /// Most bytes of a request body; larger ones get 413. Default: 8388608.
    pub max_body_bytes: usize,
    /// The model id `/v1/models` lists and requests name; empty means the
    /// model file's name without its extension. Default: "".
    pub model_id: String,
    /// Most connections at once; more are answered 503 and closed. Default: 256.
    pub max_connections: usize,
    /// A request's line and headers must arrive within this many ms of the
    /// connection opening or of its previous response; an idle keep-alive
    /// connection is closed then. Default: 10000.
    pub header_timeout_ms: u64,
    /// Host names requests may carry in `Host` besides IP addresses and
    /// `localhost` (DNS rebinding). Default: [].
    pub allowed_hosts: Vec<String>,
    /// Web origins (`Origin`) whose pages may call the API; requests from
    /// any other page are refused. Default: [].
    pub allowed_origins: Vec<String>,
}

/// `[service]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// On SIGTERM or SIGINT, requests in flight may finish for this long, in ms;
    /// those still running then end with an "unavailable" error. Default: 10000.
    pub drain_timeout_ms: u64,
    /// Most memory the loaded models may take together (weights, KV caches,
    /// image caches), in MiB; a load over it is refused. 0 means no limit.
    /// Default: 0.
    pub memory_budget_mb: u64,
}

/// `[log]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Level or filter, as in RUST_LOG ("info", "debug", "info,embody_actors=debug").
    /// Default: "info".
    pub level: String,
    /// "auto" (journald format when started by systemd, text otherwise),
    /// "journald" or "text". Default: "auto".
    pub format: String,
}

/// `[testing]`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    /// Accept fault-injection requests that panic or wedge the decoder. For
    /// tests of the daemon only; never turn it on in production. Default: false.
    pub fault_injection: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            mmproj: None,
            backend: "cpu".into(),
            device: String::new(),
            threads: 0,
            context_length: 4096,
            max_batch_tokens: 512,
            special_tokens_in_messages: false,
            keep_alive_ms: 0,
            quantize: String::new(),
            draft_tokens: 8,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            kv_cache_mb: 256,
            block_size: 16,
            kv_cache_type: "f16".into(),
            prefix_cache: true,
            image_cache_mb: 64,
        }
    }
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            max_running: 8,
            max_queued: 64,
            default_max_tokens: 256,
            max_tokens_limit: 4096,
            request_timeout_ms: 0,
        }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            restart_backoff_ms: 100,
            restart_backoff_max_ms: 10_000,
            stall_timeout_ms: 20_000,
            call_timeout_ms: 5_000,
        }
    }
}

impl Default for IpcConfig {
    fn default() -> Self {
        Self {
            socket: embody_client::SYSTEM_SOCKET.into(),
            max_connections: 64,
            frame_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: "127.0.0.1:8080".into(),
            api_key: String::new(),
            max_body_bytes: 8 << 20,
            model_id: String::new(),
            max_connections: 256,
            header_timeout_ms: 10_000,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            memory_budget_mb: 0,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "auto".into(),
        }
    }
}

/// Flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--model`
    pub model: Option<PathBuf>,
    /// `--threads`
    pub threads: Option<usize>,
    /// `--log-level`
    pub log_level: Option<String>,
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            // toml's message already quotes the line and points at the column.
            anyhow::anyhow!("{origin}: invalid configuration: {e}")
        })?;
        cfg.validate()
            .with_context(|| format!("{origin}: invalid configuration"))?;
        Ok(cfg)
    }

    /// Reads the file (defaults when `None`) and applies the flags.
    pub fn load(file: Option<&Path>, over: &Overrides) -> Result<Self> {
        let mut cfg = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading the configuration {}", p.display()))?;
                Self::parse(&text, &p.display().to_string())?
            }
            None => Config::default(),
        };
        if let Some(m) = &over.model {
            // A path given on the command line is relative to the working directory.
            let abs = std::path::absolute(m).unwrap_or_else(|_| m.clone());
            cfg.model.path = abs.display().to_string();
        }
        if let Some(t) = over.threads {
            cfg.model.threads = t;
        }
        if let Some(l) = &over.log_level {
            cfg.log.level = l.clone();
        }
        cfg.validate().context("invalid command-line flags")?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        self.model
            .backend
            .parse::<embody_engine::backend::BackendKind>()
            .map_err(|e| anyhow::anyhow!("model.backend: {e}"))?;
        let quantize = std::iter::once(("model.quantize", &self.model.quantize)).chain(
            self.models
                .iter()
                .filter_map(|m| Some(("[[models]] quantize", m.quantize.as_ref()?))),
        );
        for (what, q) in quantize {
            if !q.is_empty() && weight_type(q).is_none() {
                bail!("{what}: {q:?} is not a weight type (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)");
            }
        }
        if self.model.draft_tokens > MAX_DRAFT {
            bail!("model.draft_tokens must be at most {MAX_DRAFT}");
        }
        let kv_types = std::iter::once(("cache.kv_cache_type", &self.cache.kv_cache_type)).chain(
            self.models
                .iter()
                .filter_map(|m| Some(("[[models]] kv_cache_type", m.kv_cache_type.as_ref()?))),
        );
        for (what, t) in kv_types {
            t.parse::<KvType>()
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        }
        if self.model.max_batch_tokens == 0 {
            bail!("model.max_batch_tokens must be at least 1");
        }
        if self.cache.kv_cache_mb == 0 {
            bail!("cache.kv_cache_mb must be at least 1");
        }
        if self.cache.block_size == 0 {
            bail!("cache.block_size must be at least 1");
        }
        if self.decoder.max_running == 0 {
            bail!("decoder.max_running must be at least 1");
        }
        if self.decoder.default_max_tokens == 0
            || self.decoder.default_max_tokens > self.decoder.max_tokens_limit
        {
            bail!(
                "decoder.default_max_tokens ({}) must be between 1 and decoder.max_tokens_limit ({})",
                self.decoder.default_max_tokens,
                self.decoder.max_tokens_limit
            );
        }
        if self.ipc.max_connections == 0 {
            bail!("ipc.max_connections must be at least 1");
        }
        if self.http.max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        if self.http.header_timeout_ms == 0 {
            bail!("http.header_timeout_ms must be at least 1");
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if m.name.is_empty() || m.path.is_empty() {
                bail!("every [[models]] entry needs a name and a path");
            }
            if !names.insert(m.name.as_str()) {
                bail!("two [[models]] entries are named {:?}", m.name);
            }
            if let Some(b) = &m.backend {
                b.parse::<embody_engine::backend::BackendKind>()
                    .map_err(|e| anyhow::anyhow!("[[models]] {:?} backend: {e}", m.name))?;
            }
            if m.draft_tokens.is_some_and(|d| d > MAX_DRAFT) {
                bail!(
                    "[[models]] {:?}: draft_tokens must be at most {MAX_DRAFT}",
                    m.name
                );
            }
            if m.kv_cache_mb == Some(0) || m.max_batch_tokens == Some(0) {
                bail!(
                    "[[models]] {:?}: kv_cache_mb and max_batch_tokens must be at least 1",
                    m.name
                );
            }
        }
        if !self.models.is_empty() {
            let named = std::iter::once(("ros2.prompt_model", &self.ros2.prompt_model))
                .chain(self.tasks.iter().map(|t| ("[[tasks]] model", &t.model)));
            for (what, model) in named {
                if !model.is_empty() && !names.contains(model.as_str()) {
                    let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                    bail!(
                        "{what} names no [[models]] entry: {model:?} (known: {})",
                        known.join(", ")
                    );
                }
            }
        }
        self.adapters()
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if self.http.enabled && self.http.bind.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "http.bind must be an address and port such as \"127.0.0.1:8080\", not {:?}",
                self.http.bind
            );
        }
        if self.http.max_body_bytes == 0 {
            bail!("http.max_body_bytes must be at least 1");
        }
        if !matches!(self.log.format.as_str(), "auto" | "journald" | "text") {
            bail!(
                "log.format must be \"auto\", \"journald\" or \"text\", not {:?}",
                self.log.format
            );
        }
        Ok(())
    }

    /// The model file this configuration names.
    pub fn model_path(&self) -> PathBuf {
        resolve_model(&self.model.path)
    }

    /// The models to serve: the `[[models]]` entries, or the one of
    /// `[model]` (named `http.model_id`, else after its file). Paths are
    /// looked up here, so a model that cannot be found stops the start with
    /// a message naming it.
    pub fn runtime_models(&self) -> Result<Vec<RuntimeConfig>> {
        let base = self.runtime_base();
        if self.models.is_empty() {
            let mut cfg = base;
            let at =
                locate_model(&self.model.path).map_err(|e| anyhow::anyhow!("model.path: {e}"))?;
            cfg.name = self.http.model_id.clone();
            cfg.model_path = at.path;
            cfg.mmproj = self
                .model
                .mmproj
                .as_deref()
                .map(resolve_model)
                .or(at.mmproj);
            return Ok(vec![cfg]);
        }
        self.models
            .iter()
            .map(|m| {
                let mut cfg = base.clone();
                let at = locate_model(&m.path)
                    .map_err(|e| anyhow::anyhow!("[[models]] {:?}: {e}", m.name))?;
                cfg.name = m.name.clone();
                cfg.model_path = at.path;
                cfg.mmproj = m.mmproj.as_deref().map(resolve_model).or(at.mmproj);
                if let Some(b) = &m.backend {
                    cfg.backend = b.parse().unwrap_or_default();
                }
                if let Some(d) = &m.device {
                    cfg.device = Some(d.clone()).filter(|d| !d.is_empty());
                }
                cfg.threads = m.threads.unwrap_or(cfg.threads);
                cfg.context_length = m.context_length.unwrap_or(cfg.context_length);
                cfg.max_batch_tokens = m.max_batch_tokens.unwrap_or(cfg.max_batch_tokens);
                cfg.kv_cache_mb = m.kv_cache_mb.unwrap_or(cfg.kv_cache_mb);
                if let Some(k) = m.keep_alive_ms {
                    cfg.keep_alive = (k > 0).then(|| Duration::from_millis(k));
                }
                if let Some(q) = &m.quantize {
                    cfg.quantize = weight_type(q);
                }
                cfg.draft_tokens = m.draft_tokens.unwrap_or(cfg.draft_tokens);
                if let Some(t) = &m.kv_cache_type {
                    cfg.kv_type = t.parse().unwrap_or_default();
                }
                cfg.load_at_start = m.preload.unwrap_or(true);
                Ok(cfg)
            })
            .collect()
    }

    /// What the runtime as a whole needs beside each model's settings.
    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            memory_budget: (self.service.memory_budget_mb > 0)
                .then_some(self.service.memory_budget_mb << 20),
            unload_drain: Duration::from_millis(self.service.drain_timeout_ms),
            resolve_path: Some(std::sync::Arc::new(|p: &str| {
                locate_model(p).map(|at| at.path)
            })),
        }
    }

    /// The `[model]`, `[cache]`, `[decoder]` and `[supervisor]` settings
    /// every model starts from.
    fn runtime_base(&self) -> RuntimeConfig {
        RuntimeConfig {
            name: String::new(),
            model_path: self.model_path(),
            load_at_start: true,
            keep_alive: (self.model.keep_alive_ms > 0)
                .then(|| Duration::from_millis(self.model.keep_alive_ms)),
            mmproj: self.model.mmproj.as_deref().map(resolve_model),
            backend: self.model.backend.parse().unwrap_or_default(),
            device: Some(self.model.device.clone()).filter(|d| !d.is_empty()),
            threads: self.model.threads,
            context_length: self.model.context_length,
            max_batch_tokens: self.model.max_batch_tokens,
            quantize: weight_type(&self.model.quantize),
            special_tokens_in_messages: self.model.special_tokens_in_messages,
            kv_cache_mb: self.cache.kv_cache_mb,
            block_size: self.cache.block_size,
            kv_type: self.cache.kv_cache_type.parse().unwrap_or_default(),
            prefix_cache: self.cache.prefix_cache,
            draft_tokens: self.model.draft_tokens,
            image_cache_mb: self.cache.image_cache_mb,
            max_running: self.decoder.max_running,
            limits: self.limits(),
            restart_backoff: Duration::from_millis(self.supervisor.restart_backoff_ms),
            restart_backoff_max: Duration::from_millis(self.supervisor.restart_backoff_max_ms),
            call_timeout: Duration::from_millis(self.supervisor.call_timeout_ms),
        }
    }

    pub fn adapters(&self) -> AdaptersConfig {
        AdaptersConfig {
            zenoh: self.zenoh.clone(),
            ros2: self.ros2.clone(),
            cameras: self.cameras.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// The limits that a reload can change.
    pub fn limits(&self) -> Limits {
        Limits {
            max_queued: self.decoder.max_queued,
            default_max_tokens: self.decoder.default_max_tokens,
            max_tokens_limit: self.decoder.max_tokens_limit,
            stall_timeout: Duration::from_millis(self.supervisor.stall_timeout_ms),
            request_timeout: (self.decoder.request_timeout_ms > 0)
                .then(|| Duration::from_millis(self.decoder.request_timeout_ms)),
            fault_injection: self.testing.fault_injection,
        }
    }

    /// Fields that differ from `new` and only take effect after a restart.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.model != new.model {
            out.push("[model]");
        }
        if self.models != new.models {
            out.push("[[models]] (or load and unload them at run time)");
        }
        if self.service.memory_budget_mb != new.service.memory_budget_mb {
            out.push("service.memory_budget_mb");
        }
        if self.cache != new.cache {
            out.push("[cache]");
        }
        if self.decoder.max_running != new.decoder.max_running {
            out.push("decoder.max_running");
        }
        if (
            self.supervisor.restart_backoff_ms,
            self.supervisor.restart_backoff_max_ms,
            self.supervisor.call_timeout_ms,
        ) != (
            new.supervisor.restart_backoff_ms,
            new.supervisor.restart_backoff_max_ms,
            new.supervisor.call_timeout_ms,
        ) {
            out.push("[supervisor] backoff and call timeout");
        }
        if self.ipc != new.ipc {
            out.push("[ipc]");
        }
        if self.http != new.http {
            out.push("[http]");
        }
        if self.log.format != new.log.format {
            out.push("log.format");
        }
        if self.adapters() != new.adapters() {
            out.push("[zenoh], [ros2], [[cameras]] and [[tasks]]");
        }
        out
    }
}

/// The models folder: `$EMBODY_MODELS`, else `~/.cache/embody/models`.
/// The weight type a `quantize` setting names; none for "".
fn weight_type(name: &str) -> Option<embody_engine::quant::GgmlType> {
    embody_engine::quant::GgmlType::weight_type(name)
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("EMBODY_MODELS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/embody/models"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Where a configured model is, and the vision projector its Hugging Face
/// repository carries.
pub struct Located {
    pub path: PathBuf,
    pub mmproj: Option<PathBuf>,
}

/// A model's path as configured: `~/` is the home folder, an absolute path
/// is itself, a relative one is looked up in the models folder and, when it
/// is not there and reads as a Hugging Face id (`org/name[@revision][:QUANT]`),
/// in the local Hugging Face cache.
pub fn locate_model(p: &str) -> std::result::Result<Located, String> {
    let path = resolve_model(p);
    let id = (!path.exists() && !p.starts_with("~/") && !Path::new(p).is_absolute())
        .then(|| embody_engine::hub_cache::HubId::parse(p))
        .flatten();
    match id {
        None => Ok(Located { path, mmproj: None }),
        Some(id) => {
            let cache = embody_engine::hub_cache::cache_dir();
            embody_engine::hub_cache::resolve(&id, &cache)
                .map(|r| Located {
                    path: r.path,
                    mmproj: r.mmproj,
                })
                .map_err(|e| {
                    format!(
                        "{p} is neither in the models folder {} nor in the Hugging Face cache: {e}",
                        models_dir().display()
                    )
                })
        }
    }
}

fn resolve_model(p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/") {
        return home().join(rest);
    }
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        models_dir().join(path)
    }
}

/// The socket path: `--socket`, else `$RUNTIME_DIRECTORY/embodyd.sock`,
/// else `$XDG_RUNTIME_DIR/embodyd.sock`, else `ipc.socket`.
pub fn socket_path(flag: Option<&Path>, cfg: &Config) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
        if let Some(dir) = embody_client::runtime_dir(var) {
            return dir.join(embody_client::SOCKET_NAME);
        }
    }
    PathBuf::from(&cfg.ipc.socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_toml() -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
        std::fs::read_to_string(p).expect("configs/default.toml")
    }

    #[test]
    fn the_shipped_default_config_holds_exactly_the_defaults() {
        let cfg = Config::parse(&default_toml(), "default.toml").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn every_field_of_the_shipped_config_is_documented_with_its_default() {
        // Each `key = value` line is preceded by a comment that states the value.
        let text = default_toml();
        let lines: Vec<&str> = text.lines().collect();
        let mut fields = 0;
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let (key, value) = line.split_once(" = ").expect("key = value");
            let comment: Vec<&str> = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with('#'))
                .copied()
                .collect();
            assert!(!comment.is_empty(), "{key} has no comment");
            let doc = comment.join(" ");
            assert!(
                doc.contains(&format!("Default: {value}")),
                "the comment of {key} does not state its default {value}: {doc}"
            );
            fields += 1;
        }
        assert_eq!(fields, 60, "every field appears in the shipped config");
    }

    #[test]
    fn draft_tokens_reach_each_model_and_too_many_are_refused() {
        let text =
            "[model]\ndraft_tokens = 4\n\n[[models]]\nname = \"a\"\npath = \"/m/a.gguf\"\n\n\
                    [[models]]\nname = \"b\"\npath = \"/m/b.gguf\"\ndraft_tokens = 0\n";
        let cfg = Config::parse(text, "x.toml").unwrap();
        let drafts: Vec<usize> = cfg
            .runtime_models()
            .unwrap()
            .iter()
            .map(|m| m.draft_tokens)
            .collect();
        assert_eq!(drafts, [4, 0]);
        assert_eq!(ModelConfig::default().draft_tokens, 8);
        let e = format!(
            "{:#}",
            Config::parse("[model]\ndraft_tokens = 33\n", "x.toml").unwrap_err()
        );
        assert!(e.contains("model.draft_tokens must be at most 32"), "{e}");
        let e = format!(
            "{:#}",
            Config::parse(
                &text.replace("draft_tokens = 0", "draft_tokens = 99"),
                "x.toml"
            )
            .unwrap_err()
        );
        assert!(e.contains("\"b\": draft_tokens must be at most 32"), "{e}");
    }

    #[test]
    fn kv_cache_type_reaches_each_model_and_unknown_types_are_refused() {
        let text = "[cache]\nkv_cache_type = \"q8_0\"\n\n[[models]]\nname = \"a\"\n\
                    path = \"/m/a.gguf\"\n\n[[models]]\nname = \"b\"\npath = \"/m/b.gguf\"\n\
                    kv_cache_type = \"q4_0\"\n";
        let cfg = Config::parse(text, "x.toml").unwrap();
        let types: Vec<KvType> = cfg
            .runtime_models()
            .unwrap()
            .iter()
            .map(|m| m.kv_type)
            .collect();
        assert_eq!(types, [KvType::Q8_0, KvType::Q4_0]);
        assert_eq!(CacheConfig::default().kv_cache_type, "f16");
        let e = format!(
            "{:#}",
            Config::parse(&text.replace("\"q4_0\"", "\"int8\""), "x.toml").unwrap_err()
        );
        assert!(
            e.contains("[[models]] kv_cache_type: unknown KV cache type 'int8'"),
            "{e}"
        );
    }

    #[test]
    fn models_entries_parse_and_what_names_them_is_checked() {
        let text = "[model]\nthreads = 3\n\n[[models]]\nname = \"a\"\npath = \"/m/a.gguf\"\n\n\
                    [[models]]\nname = \"b\"\npath = \"/m/b.gguf\"\nthreads = 1\nkeep_alive_ms = 500\npreload = false\n";
        let cfg = Config::parse(text, "x.toml").unwrap();
        let models = cfg.runtime_models().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!((models[0].name.as_str(), models[0].threads), ("a", 3));
        assert_eq!(models[1].model_path, PathBuf::from("/m/b.gguf"));
        assert_eq!(models[1].threads, 1);
        assert_eq!(models[1].keep_alive, Some(Duration::from_millis(500)));
        assert!(models[0].load_at_start && !models[1].load_at_start);

        let twice = format!("{text}\n[[models]]\nname = \"a\"\npath = \"/m/c.gguf\"\n");
        let e = format!("{:#}", Config::parse(&twice, "x.toml").unwrap_err());
        assert!(e.contains("two [[models]] entries are named \"a\""), "{e}");
        let e = format!(
            "{:#}",
            Config::parse("[model]\nquantize = \"q3\"\n", "x.toml").unwrap_err()
        );
        assert!(
            e.contains("model.quantize: \"q3\" is not a weight type"),
            "{e}"
        );
        let q = Config::parse("[model]\nquantize = \"Q8_0\"\n", "x.toml").unwrap();
        assert_eq!(
            q.runtime_models().unwrap()[0].quantize,
            Some(embody_engine::quant::GgmlType::Q8_0)
        );
        let wrong = format!("{text}\n[ros2]\nprompt_model = \"c\"\n");
        let e = format!("{:#}", Config::parse(&wrong, "x.toml").unwrap_err());
        assert!(
            e.contains("ros2.prompt_model names no [[models]] entry: \"c\" (known: a, b)"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_named() {
        let e = Config::parse("[decoder]\nmax_runing = 4\n", "x.toml").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("x.toml") && msg.contains("unknown field `max_runing`"),
            "{msg}"
        );
        assert!(
            msg.contains("max_running"),
            "suggests the known fields: {msg}"
        );
        let e = Config::parse("[cache]\nkv_cache_mb = \"lots\"\n", "x.toml").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("invalid type") && msg.contains("kv_cache_mb"),
            "{msg}"
        );
        let e = Config::parse("[modle]\n", "x.toml").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `modle`"));
        let e = Config::parse("[decoder]\nmax_running = 0\n", "x.toml").unwrap_err();
        assert!(format!("{e:#}").contains("decoder.max_running must be at least 1"));
        let e = Config::parse("[model]\nbackend = \"tpu\"\n", "x.toml").unwrap_err();
        assert!(format!("{e:#}").contains("unknown backend 'tpu'"), "{e:#}");
    }

    #[test]
    fn cameras_and_tasks_parse_and_are_checked_together() {
        let text = r#"
[zenoh]
node = "arm1"

[[cameras]]
name = "front"
key = "/camera/image_raw"
format = "ros2_image"

[[tasks]]
name = "door"
camera = "front"
prompt = "Is the door open?"
period_ms = 2000
schema = '{"type": "object"}'
"#;
        let cfg = Config::parse(text, "x.toml").unwrap();
        assert_eq!(cfg.cameras[0].max_bytes, 16 << 20);
        assert_eq!(cfg.tasks[0].max_age_ms, 1000);
        assert_eq!(cfg.adapters().zenoh.key_prefix(), "embody/arm1");
        // What --print-config writes reads back the same.
        let printed = toml::to_string(&cfg).unwrap();
        assert_eq!(Config::parse(&printed, "printed").unwrap(), cfg);

        let e = Config::parse(
            &text.replace("camera = \"front\"", "camera = \"rear\""),
            "x.toml",
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("camera \"rear\" is not one of the [[cameras]]"),
            "{e:#}"
        );
        let e = Config::parse(&text.replace("format = ", "fromat = "), "x.toml").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `fromat`"), "{e:#}");
        let e = Config::parse("[zenoh]\nmode = \"mesh\"\n", "x.toml").unwrap_err();
        assert!(format!("{e:#}").contains("zenoh.mode"), "{e:#}");
    }

    #[test]
    fn model_paths_resolve_against_the_models_folder() {
        assert_eq!(resolve_model("/abs/m.gguf"), PathBuf::from("/abs/m.gguf"));
        assert_eq!(resolve_model("m.gguf"), models_dir().join("m.gguf"));
        assert_eq!(resolve_model("~/m.gguf"), home().join("m.gguf"));
    }

    #[test]
    fn flags_override_the_file() {
        let over = Overrides {
            model: Some("/tmp/x.gguf".into()),
            threads: Some(3),
            log_level: Some("debug".into()),
        };
        let cfg = Config::load(None, &over).unwrap();
        assert_eq!(cfg.model_path(), PathBuf::from("/tmp/x.gguf"));
        assert_eq!(cfg.model.threads, 3);
        assert_eq!(cfg.log.level, "debug");
    }

    #[test]
    fn reload_reports_what_needs_a_restart() {
        let a = Config::default();
        let mut b = a.clone();
        b.decoder.max_queued = 3;
        b.testing.fault_injection = true;
        assert!(a.needs_restart(&b).is_empty());
        b.model.threads = 2;
        b.ipc.max_connections = 2;
        assert_eq!(a.needs_restart(&b), vec!["[model]", "[ipc]"]);
    }
}
