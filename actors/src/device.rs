//! The device actor: one per backend device. It creates the backend, maps the
//! weights, builds the tokenizer and chat template, and hands the decoder a
//! [`ModelSource`] from which each decoder (re)start instantiates its model.
//! It reports the memory the model takes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use embody_engine::backend::{self, Backend, BackendKind};
use embody_engine::chat_template::ChatTemplate;
use embody_engine::constraint::Grammars;
use embody_engine::models::{self, LoadOptions, Model, ModelFiles, ModelInfo};
use embody_engine::tokenizer::Tokenizer;
use embody_engine::tool_calls::ToolFormat;
use embody_engine::vision::VisionModel;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::shared::lock;

/// Where and how to load the model.
#[derive(Clone, Debug)]
pub(crate) struct DeviceArgs {
    pub model_path: PathBuf,
    /// llama.cpp's vision projector for a GGUF vision-language model.
    pub mmproj: Option<PathBuf>,
    pub backend: BackendKind,
    /// The GPU of a GPU backend (an index or part of its name).
    pub device: Option<String>,
    pub threads: usize,
    pub opts: LoadOptions,
    pub special_tokens_in_messages: bool,
}

/// Memory the device holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MemoryReport {
    /// Bytes of weights (mapped from the file).
    pub weights_bytes: u64,
    /// Resident memory of the process.
    pub rss_bytes: u64,
}

/// A loaded model (a GGUF file or a Hugging Face folder) from which
/// decoders instantiate models.
pub(crate) struct ModelSource {
    pub path: PathBuf,
    files: ModelFiles,
    /// The image side of a vision-language model.
    pub vision: Option<Arc<VisionModel>>,
    /// The backend, replaced by a fresh one when its device is lost.
    backend: Mutex<Arc<dyn Backend>>,
    /// How to open the backend again: kind, threads, device.
    backend_args: (BackendKind, usize, Option<String>),
    opts: LoadOptions,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// How the chat template shows tools and how the model calls them.
    pub tool_format: ToolFormat,
    /// The grammar compiler over the tokenizer, built on first use.
    grammars: OnceLock<Result<Grammars, String>>,
    pub info: ModelInfo,
    /// The most bytes of text a prompt can have and still fit the context
    /// (context length times the longest token's text): longer ones are
    /// refused before they are tokenized.
    pub max_prompt_bytes: usize,
    /// Control-token text in messages acts as the control token.
    pub special_tokens_in_messages: bool,
    pub name: String,
    pub weights_bytes: u64,
    /// The instance built while loading, kept for the first decoder.
    first: Mutex<Option<Box<dyn Model>>>,
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSource")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl ModelSource {
    /// Opens the file, creates the backend and builds one model instance, so
    /// that every error a model file can raise shows at startup.
    pub fn load(args: &DeviceArgs) -> Result<Self, embody_engine::Error> {
        // A GPU backend copies the weights to the device: the host only maps
        // the file (its pages given back as each weight is uploaded) instead
        // of keeping a copy of its own.
        let files = if args.backend.on_device() {
            ModelFiles::open_mapped(&args.model_path)?
        } else {
            ModelFiles::open(&args.model_path)?
        };
        let tokenizer = files.tokenizer()?;
        // The files' own template, else the architecture's standard one
        // (Gemma 3 conversions often carry none).
        let arch = files.arch()?;
        let template_src = match tokenizer.chat_template() {
            Some(t) => Some(t),
            None => {
                let standard = models::default_chat_template(&arch);
                if standard.is_some() {
                    tracing::info!(
                        "the model has no chat template; using the standard {arch} template"
                    );
                }
                standard
            }
        };
        let tool_format = ToolFormat::for_template(template_src.unwrap_or(""));
        let template = template_src.map(ChatTemplate::new).transpose()?;
        let backend: Arc<dyn Backend> =
            backend::create(args.backend, args.threads, args.device.as_deref())?.into();
        tracing::info!("backend: {}", backend.describe());
        let mut opts = args.opts;
        let trained = files.trained_context();
        if opts.context_length == 0 || trained.is_some_and(|t| opts.context_length > t) {
            opts.context_length = trained.unwrap_or(0);
        }
        let model = files.load(backend.clone(), opts)?;
        // The encoder runs on the decoder's backend: one set of threads.
        let vision = files
            .vision(&tokenizer, args.mmproj.as_deref(), backend.clone())?
            .map(Arc::new);
        let info = model.info().clone();
        let name = files
            .name()
            .or_else(|| file_stem(&args.model_path))
            .unwrap_or_default();
        let weights_bytes = files.weights_bytes();
        log_residency(&files, weights_bytes);
        let max_prompt_bytes = info
            .context_length
            .saturating_mul(tokenizer.longest_piece());
        Ok(Self {
            path: args.model_path.clone(),
            files,
            vision,
            backend: Mutex::new(backend),
            backend_args: (args.backend, args.threads, args.device.clone()),
            opts,
            tokenizer: Arc::new(tokenizer),
            template,
            tool_format,
            grammars: OnceLock::new(),
            info,
            max_prompt_bytes,
            special_tokens_in_messages: args.special_tokens_in_messages,
            name,
            weights_bytes,
            first: Mutex::new(Some(model)),
        })
    }

    /// A model instance for a decoder: the one built at load, then new ones
    /// over the same mapped weights. A GPU lost since (the decoder that
    /// used it failed) is opened again first, and the weights uploaded to it.
    pub fn instantiate(&self) -> Result<Box<dyn Model>, embody_engine::Error> {
        if let Some(m) = lock(&self.first).take() {
            return Ok(m);
        }
        let backend = {
            let mut b = lock(&self.backend);
            if b.is_lost() {
                tracing::warn!("the device of {} was lost: opening it again", b.describe());
                let (kind, threads, device) = &self.backend_args;
                *b = backend::create(*kind, *threads, device.as_deref())?.into();
            }
            b.clone()
        };
        self.files.load(backend, self.opts)
    }

    /// The grammar compiler for constrained decoding. Building it walks the
    /// whole vocabulary, so it happens on the first request that needs it
    /// (call from a blocking thread).
    pub fn grammars(&self) -> Result<&Grammars, String> {
        self.grammars
            .get_or_init(|| {
                Grammars::new(self.tokenizer.clone(), self.info.vocab_size)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The backend (with its device, for a GPU) and its thread count.
    pub fn backend(&self) -> (String, usize) {
        let b = lock(&self.backend);
        (b.describe(), b.threads())
    }
}

fn file_stem(p: &Path) -> Option<String> {
    p.file_stem().map(|s| s.to_string_lossy().into_owned())
}

/// Resident memory of this process, from `/proc/self/statm` (0 where there is none).
pub(crate) fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The device actor.
pub(crate) struct DeviceActor;

/// Its state: the loaded model.
pub(crate) struct DeviceState {
    source: Arc<ModelSource>,
}

/// Its messages.
pub(crate) enum DeviceMsg {
    /// The model source, for decoders.
    Source(RpcReplyPort<Arc<ModelSource>>),
    /// Memory held.
    Memory(RpcReplyPort<MemoryReport>),
}

/// How a device actor starts.
pub(crate) enum DeviceStart {
    /// Load the model file.
    Load(DeviceArgs),
    /// Take over a model loaded before (a restart after a failure).
    Reuse(Arc<ModelSource>),
}

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
#[error("loading {path}: {source}")]
pub(crate) struct DeviceError {
    pub path: PathBuf,
    pub source: embody_engine::Error,
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceStart;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        start: DeviceStart,
    ) -> Result<Self::State, ActorProcessingErr> {
        let args = match start {
            DeviceStart::Reuse(source) => return Ok(DeviceState { source }),
            DeviceStart::Load(args) => args,
        };
        let path = args.model_path.clone();
        // Loading maps and checks the whole file: keep it off the async workers.
        let source = tokio::task::spawn_blocking(move || ModelSource::load(&args))
            .await?
            .map_err(|source| DeviceError { path, source })?;
        let (backend, threads) = source.backend();
        tracing::info!(
            model = %source.name,
            arch = %source.info.arch,
            context = source.info.context_length,
            weights_mib = source.weights_bytes >> 20,
            backend = %backend,
            threads,
            "model loaded from {}",
            source.path.display()
        );
        Ok(DeviceState {
            source: Arc::new(source),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: DeviceMsg,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Source(reply) => {
                let _ = reply.send(state.source.clone());
            }
            DeviceMsg::Memory(reply) => {
                let _ = reply.send(MemoryReport {
                    weights_bytes: state.source.weights_bytes,
                    rss_bytes: resident_bytes(),
                });
            }
        }
        Ok(())
    }
}

/// Says how the weights sit in memory: copied (and how much of that in huge
/// pages, which decode speed depends on) or read through the file's map.
fn log_residency(files: &ModelFiles, weights_bytes: u64) {
    const MIB: f64 = 1024.0 * 1024.0;
    let copied = files.resident_bytes() as f64 / MIB;
    if copied == 0.0 {
        tracing::info!(
            "weights: {:.0} MiB read through the file map",
            weights_bytes as f64 / MIB
        );
        return;
    }
    match embody_engine::tensor::huge_page_bytes() {
        Some(huge) => tracing::info!(
            "weights: {copied:.0} MiB in memory of their own, {:.0} MiB of the process in huge pages",
            huge as f64 / MIB
        ),
        None => tracing::info!("weights: {copied:.0} MiB in memory of their own"),
    }
}
