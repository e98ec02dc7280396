//! The models a runtime knows and their life: loaded at start or on a
//! request's first use, replaced (a swap keeps the old copy serving until the
//! new one is ready, and lets its running requests finish), unloaded on
//! demand or after `keep_alive` without requests, all within one memory
//! budget. Every change of state is sent to [`Runtime::model_events`].

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use embody_engine::backend::BackendKind;
use embody_engine::quant::GgmlType;
use embody_protocol::wire::ErrorBody;
use embody_protocol::{ErrorCode, Event, ModelEntry, ModelSpec, ModelState, Status};

use crate::config::RuntimeConfig;
use crate::runtime::{Inner, Runtime};
use crate::served::{Served, Stopped};
use crate::shared::lock;
use crate::RuntimeError;

/// Turns the `path` of a model loaded at run time into a file or folder
/// (the daemon looks names up in its models folder and the Hugging Face
/// cache).
pub type PathResolver = Arc<dyn Fn(&str) -> Result<PathBuf, String> + Send + Sync>;

/// Settings of the runtime as a whole, beside each model's [`RuntimeConfig`].
#[derive(Clone)]
pub struct RuntimeOptions {
    /// Most bytes the loaded models may take together (weights, KV cache and
    /// image cache, as [`memory_estimate`] counts them); none means no limit.
    pub memory_budget: Option<u64>,
    /// How long an unloaded or replaced model's running requests may take
    /// to finish before they end with an `unavailable` error.
    pub unload_drain: Duration,
    /// Resolves the paths of models loaded at run time; without it a path
    /// is used as given.
    pub resolve_path: Option<PathResolver>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            memory_budget: None,
            unload_drain: Duration::from_secs(30),
            resolve_path: None,
        }
    }
}

impl std::fmt::Debug for RuntimeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeOptions")
            .field("memory_budget", &self.memory_budget)
            .field("unload_drain", &self.unload_drain)
            .finish_non_exhaustive()
    }
}

/// One known model.
struct Slot {
    cfg: RuntimeConfig,
    state: ModelState,
    /// The copy serving it (while `Ready`, while a replacement loads, and
    /// while it drains before an unload).
    served: Option<Arc<Served>>,
    /// Bytes counted against the budget: the served copy's, plus the
    /// replacement's while one loads.
    memory: u64,
    loading_memory: u64,
    error: Option<String>,
}

/// Every model the runtime knows, in order (the first is the default).
pub(crate) struct Registry {
    slots: Vec<Slot>,
    /// Replaced copies finishing their requests, with their memory.
    retiring: Vec<(Arc<Served>, u64)>,
    /// The settings of a model loaded at run time under a new name: the
    /// first configured model's, with the load's own fields over them.
    template: RuntimeConfig,
}

/// How often models are checked against their keep_alive.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// Longest wait of a request for its model to load, when it sets no deadline.
const LOAD_WAIT: Duration = Duration::from_secs(300);

impl Registry {
    pub fn new(models: &[RuntimeConfig]) -> Result<Self, RuntimeError> {
        let mut slots: Vec<Slot> = Vec::with_capacity(models.len());
        for cfg in models {
            let mut cfg = cfg.clone();
            if cfg.name.is_empty() {
                cfg.name = default_name(&cfg.model_path);
            }
            check_name(&cfg.name).map_err(|e| RuntimeError::Start(e.message))?;
            if slots.iter().any(|s| s.cfg.name == cfg.name) {
                return Err(RuntimeError::Start(format!(
                    "two models are named {:?}; names must differ",
                    cfg.name
                )));
            }
            slots.push(Slot {
                cfg,
                state: ModelState::Unloaded,
                served: None,
                memory: 0,
                loading_memory: 0,
                error: None,
            });
        }
        let template = slots
            .first()
            .map(|s| s.cfg.clone())
            .ok_or_else(|| RuntimeError::Start("no model is configured".into()))?;
        Ok(Self {
            slots,
            retiring: Vec::new(),
            template,
        })
    }

    /// The slot a request's `model` names: a model's name, or for a loaded
    /// model also its file's stem or the name inside the file.
    fn find(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.cfg.name == name)
            .or_else(|| {
                self.slots.iter().position(|s| {
                    s.served.as_ref().is_some_and(|served| {
                        served.source.name == name
                            || default_name(&s.cfg.model_path) == name
                            || s.cfg.model_path.file_name().is_some_and(|f| f == name)
                    })
                })
            })
    }

    fn names(&self) -> String {
        let names: Vec<&str> = self.slots.iter().map(|s| s.cfg.name.as_str()).collect();
        names.join(", ")
    }

    /// Bytes counted against the budget now.
    fn used(&self) -> u64 {
        let slots: u64 = self.slots.iter().map(|s| s.memory + s.loading_memory).sum();
        slots + self.retiring.iter().map(|(_, m)| m).sum::<u64>()
    }

    fn entry(&self, i: usize) -> ModelEntry {
        let slot = &self.slots[i];
        let mut e = ModelEntry {
            name: slot.cfg.name.clone(),
            state: slot.state,
            path: slot.cfg.model_path.display().to_string(),
            backend: slot.cfg.backend.to_string(),
            memory_bytes: slot.memory,
            keep_alive_ms: slot.cfg.keep_alive.map_or(0, |d| d.as_millis() as u64),
            error: slot.error.clone(),
            ..ModelEntry::default()
        };
        if let Some(s) = &slot.served {
            let src = &s.source;
            e.arch = src.info.arch.clone();
            e.backend = src.backend().0;
            e.context_length = src.info.context_length as u32;
            e.vision = src.vision.is_some();
            e.tools = src.template.is_some();
            e.running = s.shared.inflight() as u32;
            e.queued = s.shared.queued() as u32;
        }
        e
    }
}

/// A model's name when its configuration gives none: the file's name
/// without its extension (the folder's name for a Hugging Face folder).
pub fn default_name(path: &Path) -> String {
    let stem = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn check_name(name: &str) -> Result<(), ErrorBody> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:/@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(error(
            ErrorCode::BadRequest,
            format!(
                "the model name {name:?} is not allowed: 1 to 128 characters of letters, digits and . _ - : / @"
            ),
        ))
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code,
        message: message.into(),
    }
}

/// Bytes a model takes once loaded, as the memory budget counts them: its
/// weight files (GGUF, or a folder's safetensors), the vision projector, the
/// KV cache, and for a model that sees the image cache. A GPU backend's weights live in
/// device memory but are counted the same: the budget is the machine's.
pub fn memory_estimate(cfg: &RuntimeConfig) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let weights = if cfg.model_path.is_dir() {
        std::fs::read_dir(&cfg.model_path)
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .map(|p| size(&p))
                    .sum()
            })
            .unwrap_or(0)
    } else {
        size(&cfg.model_path)
    };
    let mmproj = cfg.mmproj.as_deref().map_or(0, size);
    // Only a model that sees keeps encoded images.
    let sees = cfg.mmproj.is_some()
        || std::fs::read_to_string(cfg.model_path.join("config.json"))
            .is_ok_and(|c| c.contains("\"vision_config\""));
    let images = if sees { cfg.image_cache_mb } else { 0 };
    weights + mmproj + ((cfg.kv_cache_mb + images) as u64) * (1 << 20)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl Runtime {
    /// The models with a copy in memory, in order (the default first).
    pub(crate) fn serving(&self) -> Vec<(String, Arc<Served>)> {
        let reg = lock(&self.inner.models);
        reg.slots
            .iter()
            .filter_map(|s| Some((s.cfg.name.clone(), s.served.clone()?)))
            .collect()
    }

    /// Every copy in memory, replaced ones still finishing included.
    pub(crate) fn all_served(&self) -> Vec<Arc<Served>> {
        let reg = lock(&self.inner.models);
        let slots = reg.slots.iter().filter_map(|s| s.served.clone());
        let retiring = reg.retiring.iter().map(|(s, _)| s.clone());
        slots.chain(retiring).collect()
    }

    /// Every model's entry; `figures` holds the served ones' status.
    pub(crate) fn entries(&self, figures: &[(String, Status)]) -> Vec<ModelEntry> {
        let reg = lock(&self.inner.models);
        (0..reg.slots.len())
            .map(|i| {
                let mut e = reg.entry(i);
                if let Some((_, st)) = figures.iter().find(|(n, _)| *n == e.name) {
                    e.running = st.running;
                    e.queued = st.queued;
                }
                e
            })
            .collect()
    }

    /// The configured models loaded at start, in order.
    pub(crate) fn preloaded_names(&self) -> Vec<String> {
        let reg = lock(&self.inner.models);
        reg.slots
            .iter()
            .filter(|s| s.cfg.load_at_start)
            .map(|s| s.cfg.name.clone())
            .collect()
    }

    /// Whether a request's `model` names a model this runtime knows.
    pub fn knows_model(&self, name: &str) -> bool {
        lock(&self.inner.models).find(name).is_some()
    }

    /// The names of the models this runtime knows, the default first.
    pub fn model_names(&self) -> Vec<String> {
        let reg = lock(&self.inner.models);
        reg.slots.iter().map(|s| s.cfg.name.clone()).collect()
    }

    /// Every change of a model's state (loading, ready, draining, unloaded,
    /// failed), as it happens.
    pub fn model_events(&self) -> tokio::sync::broadcast::Receiver<ModelEntry> {
        self.inner.events.subscribe()
    }

    fn changed(&self, entry: ModelEntry) {
        tracing::info!(
            model = %entry.name,
            state = entry.state.as_str(),
            error = entry.error.as_deref().unwrap_or(""),
            "model state"
        );
        let _ = self.inner.events.send(entry);
        self.inner.changed.notify_waiters();
    }

    /// The copy that serves a request naming `name` (none: the default
    /// model). A known model that is not loaded is loaded, and the request
    /// waits for it.
    pub(crate) async fn pick(
        &self,
        name: Option<&str>,
        timeout_ms: Option<u64>,
    ) -> Result<Arc<Served>, Event> {
        let wait = timeout_ms.map_or(LOAD_WAIT, Duration::from_millis);
        let until = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let load = {
                let mut reg = lock(&self.inner.models);
                let i = match name {
                    None => 0,
                    Some(n) => reg.find(n).ok_or_else(|| {
                        Event::error(
                            ErrorCode::ModelNotFound,
                            format!(
                                "no model is named {n:?}; this daemon serves {}",
                                reg.names()
                            ),
                        )
                    })?,
                };
                let slot = &reg.slots[i];
                let model = slot.cfg.name.clone();
                match (slot.state, &slot.served) {
                    (ModelState::Draining, _) => {
                        return Err(Event::error(
                            ErrorCode::Unavailable,
                            format!("the model {model:?} is being unloaded and takes no new requests; load it again to use it"),
                        ))
                    }
                    (_, Some(s)) => return Ok(s.clone()),
                    (ModelState::Failed, None) => {
                        return Err(Event::error(
                            ErrorCode::Unavailable,
                            format!(
                                "the model {model:?} failed to load ({}); load it again to use it",
                                slot.error.as_deref().unwrap_or("no reason given")
                            ),
                        ))
                    }
                    (ModelState::Unloaded, None) => {
                        let cfg = slot.cfg.clone();
                        match self.begin_load(&mut reg, cfg) {
                            Ok(cfg) => Some(cfg),
                            Err(e) => return Err(Event::error(e.code, e.message)),
                        }
                    }
                    _ => None,
                }
            };
            if let Some(cfg) = load {
                let rt = self.clone();
                tokio::spawn(async move {
                    let _ = rt.finish_load(cfg).await;
                });
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Err(Event::error(
                    ErrorCode::Unavailable,
                    format!(
                        "the model {:?} did not finish loading within {} ms",
                        name.unwrap_or("(default)"),
                        wait.as_millis()
                    ),
                ));
            }
        }
    }

    /// Loads a configured model by name (at start, and on first use).
    pub(crate) async fn load_configured(&self, name: &str) -> Result<(), RuntimeError> {
        let cfg = {
            let mut reg = lock(&self.inner.models);
            let i = reg
                .find(name)
                .ok_or_else(|| RuntimeError::Start(format!("no model is named {name:?}")))?;
            let cfg = reg.slots[i].cfg.clone();
            self.begin_load(&mut reg, cfg)
                .map_err(|e| RuntimeError::Start(e.message))?
        };
        let path = cfg.model_path.clone();
        self.finish_load(cfg)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                LoadFailure::Model(source) => RuntimeError::Model { path, source },
                LoadFailure::Other(e) => e,
            })
    }

    /// Loads a model, or replaces the copy served under its name (requests
    /// running on the old copy finish on it; new ones go to the new copy
    /// once it serves). Returns once the model serves, or with why it
    /// cannot: a load over the memory budget is refused before it starts,
    /// and a load that fails leaves a replaced copy serving.
    pub async fn load(&self, spec: ModelSpec) -> Result<ModelEntry, ErrorBody> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(error(ErrorCode::Unavailable, crate::served::SHUTTING_DOWN));
        }
        let cfg = {
            let mut reg = lock(&self.inner.models);
            let cfg = self.spec_config(&reg, spec)?;
            self.begin_load(&mut reg, cfg)?
        };
        let name = cfg.name.clone();
        self.finish_load(cfg).await.map_err(|e| {
            let message = match e {
                LoadFailure::Model(e) => e.to_string(),
                LoadFailure::Other(e) => e.to_string(),
            };
            error(
                ErrorCode::ModelError,
                format!("the model {name:?} did not load: {message}"),
            )
        })
    }

    /// The configuration of a load: the named model's own (or the first
    /// model's, for a new name) with the spec's fields over it.
    fn spec_config(&self, reg: &Registry, spec: ModelSpec) -> Result<RuntimeConfig, ErrorBody> {
        let bad = |m: String| error(ErrorCode::BadRequest, m);
        let name = if spec.name.is_empty() {
            if spec.path.is_empty() {
                return Err(bad("a model load needs a name or a path".into()));
            }
            spec.path
                .rsplit(['/', ':'])
                .next()
                .unwrap_or(&spec.path)
                .trim_end_matches(".gguf")
                .to_string()
        } else {
            spec.name.clone()
        };
        check_name(&name)?;
        let known = reg.slots.iter().find(|s| s.cfg.name == name);
        let mut cfg = match (known, spec.path.is_empty()) {
            (Some(s), _) => s.cfg.clone(),
            (None, false) => {
                let mut c = reg.template.clone();
                c.mmproj = None;
                c.keep_alive = None;
                c
            }
            (None, true) => {
                return Err(bad(format!(
                    "no model is named {name:?}; a load of a new model needs its path (known: {})",
                    reg.names()
                )))
            }
        };
        cfg.name = name;
        cfg.load_at_start = false;
        let resolve = |p: &str| match &self.inner.options.resolve_path {
            Some(r) => r(p).map_err(|m| error(ErrorCode::ModelNotFound, m)),
            None => Ok(PathBuf::from(p)),
        };
        if !spec.path.is_empty() {
            cfg.model_path = resolve(&spec.path)?;
            cfg.mmproj = None;
        }
        if let Some(m) = &spec.mmproj {
            cfg.mmproj = Some(resolve(m)?);
        }
        if let Some(b) = &spec.backend {
            cfg.backend = b
                .parse::<BackendKind>()
                .map_err(|e| bad(format!("backend: {e}")))?;
        }
        if let Some(d) = &spec.device {
            cfg.device = Some(d.clone()).filter(|d| !d.is_empty());
        }
        if let Some(t) = spec.threads {
            cfg.threads = t;
        }
        if let Some(c) = spec.context_length {
            cfg.context_length = c;
        }
        if let Some(kv) = spec.kv_cache_mb {
            if kv == 0 {
                return Err(bad("kv_cache_mb must be at least 1".into()));
            }
            cfg.kv_cache_mb = kv;
        }
        if let Some(t) = &spec.kv_cache_type {
            cfg.kv_type = t.parse().map_err(|e| bad(format!("kv_cache_type: {e}")))?;
        }
        if let Some(q) = &spec.quantize {
            cfg.quantize = match q.as_str() {
                "" => None,
                name => Some(GgmlType::weight_type(name).ok_or_else(|| {
                    bad(format!(
                        "quantize: {name:?} is not a weight type (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)"
                    ))
                })?),
            };
        }
        if let Some(k) = spec.keep_alive_ms {
            cfg.keep_alive = (k > 0).then(|| Duration::from_millis(k));
        }
        cfg.limits = lock(&self.inner.limits).clone();
        Ok(cfg)
    }

    /// Under the registry's lock: checks that the load may start (not
    /// already loading or draining, within the budget) and marks it loading.
    fn begin_load(
        &self,
        reg: &mut Registry,
        cfg: RuntimeConfig,
    ) -> Result<RuntimeConfig, ErrorBody> {
        let need = memory_estimate(&cfg);
        let (i, created) = match reg.slots.iter().position(|s| s.cfg.name == cfg.name) {
            Some(i) => (i, false),
            None => {
                reg.slots.push(Slot {
                    cfg: cfg.clone(),
                    state: ModelState::Unloaded,
                    served: None,
                    memory: 0,
                    loading_memory: 0,
                    error: None,
                });
                (reg.slots.len() - 1, true)
            }
        };
        let name = cfg.name.clone();
        match reg.slots[i].state {
            ModelState::Loading => {
                return Err(error(
                    ErrorCode::Unavailable,
                    format!("the model {name:?} is already loading"),
                ))
            }
            ModelState::Draining => {
                return Err(error(
                    ErrorCode::Unavailable,
                    format!("the model {name:?} is being unloaded; load it once it is unloaded"),
                ))
            }
            _ => {}
        }
        if let Some(budget) = self.inner.options.memory_budget {
            let used = reg.used();
            if used + need > budget {
                if created {
                    reg.slots.remove(i);
                }
                return Err(error(
                    ErrorCode::OutOfMemory,
                    format!(
                        "loading {name:?} needs {} MiB (weights, KV cache and image cache); \
                         {} MiB of the {} MiB memory budget are in use, so {} MiB are missing: \
                         unload a model or raise the budget",
                        mib(need),
                        mib(used),
                        mib(budget),
                        mib(used + need - budget)
                    ),
                ));
            }
        }
        let slot = &mut reg.slots[i];
        slot.state = ModelState::Loading;
        slot.loading_memory = need;
        let entry = reg.entry(i);
        self.changed(entry);
        Ok(cfg)
    }

    /// Starts the model's actors and puts the new copy in its slot.
    async fn finish_load(&self, cfg: RuntimeConfig) -> Result<ModelEntry, LoadFailure> {
        let name = cfg.name.clone();
        let started = Served::start(cfg.clone(), self.inner.cameras.clone()).await;
        let mut reg = lock(&self.inner.models);
        let Some(i) = reg.slots.iter().position(|s| s.cfg.name == name) else {
            return Err(LoadFailure::Other(RuntimeError::Start(format!(
                "the model {name:?} went away while it loaded"
            ))));
        };
        let slot = &mut reg.slots[i];
        let need = std::mem::take(&mut slot.loading_memory);
        let result = match started {
            Ok(served) => {
                let old = slot.served.replace(Arc::new(served));
                let old_memory = std::mem::replace(&mut slot.memory, need);
                slot.cfg = cfg;
                slot.state = ModelState::Ready;
                slot.error = None;
                if let Some(old) = old {
                    reg.retiring.push((old.clone(), old_memory));
                    self.retire(old);
                }
                Ok(())
            }
            Err(e) => {
                slot.error = Some(match &e {
                    RuntimeError::Model { source, .. } => source.to_string(),
                    other => other.to_string(),
                });
                // A replaced copy keeps serving.
                slot.state = if slot.served.is_some() {
                    ModelState::Ready
                } else {
                    ModelState::Failed
                };
                Err(match e {
                    RuntimeError::Model { source, .. } => LoadFailure::Model(source),
                    other => LoadFailure::Other(other),
                })
            }
        };
        let entry = reg.entry(i);
        drop(reg);
        self.changed(entry.clone());
        result.map(|()| entry)
    }

    /// Lets a replaced copy finish its requests, then stops it.
    fn retire(&self, old: Arc<Served>) {
        let rt = Arc::downgrade(&self.inner);
        let drain = self.inner.options.unload_drain;
        tokio::spawn(async move {
            old.drain(drain).await;
            old.shutdown(Stopped::Model).await;
            if let Some(inner) = rt.upgrade() {
                lock(&inner.models)
                    .retiring
                    .retain(|(s, _)| !Arc::ptr_eq(s, &old));
            }
        });
    }

    /// Unloads a model: it takes no new requests, those it holds may finish
    /// (up to the runtime's `unload_drain`), then its memory is freed. It
    /// stays known: a request naming it loads it again.
    pub async fn unload(&self, name: &str) -> Result<ModelEntry, ErrorBody> {
        let served = {
            let mut reg = lock(&self.inner.models);
            let i = reg.find(name).ok_or_else(|| {
                error(
                    ErrorCode::ModelNotFound,
                    format!(
                        "no model is named {name:?}; this daemon serves {}",
                        reg.names()
                    ),
                )
            })?;
            let slot = &mut reg.slots[i];
            match (slot.state, slot.served.clone()) {
                (ModelState::Loading, _) => {
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!("the model {name:?} is loading; unload it once it has loaded"),
                    ))
                }
                (ModelState::Draining, _) => {
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!("the model {name:?} is already being unloaded"),
                    ))
                }
                (_, None) => {
                    slot.state = ModelState::Unloaded;
                    return Ok(reg.entry(i));
                }
                (_, Some(s)) => {
                    slot.state = ModelState::Draining;
                    let entry = reg.entry(i);
                    drop(reg);
                    self.changed(entry);
                    s
                }
            }
        };
        let s = served;
        s.drain(self.inner.options.unload_drain).await;
        s.shutdown(Stopped::Model).await;
        let mut reg = lock(&self.inner.models);
        let i = reg
            .slots
            .iter()
            .position(|slot| slot.served.as_ref().is_some_and(|x| Arc::ptr_eq(x, &s)))
            .ok_or_else(|| error(ErrorCode::Internal, "the unloaded model's slot went away"))?;
        let slot = &mut reg.slots[i];
        slot.served = None;
        slot.memory = 0;
        slot.state = ModelState::Unloaded;
        let entry = reg.entry(i);
        drop(reg);
        self.changed(entry.clone());
        Ok(entry)
    }

    /// Starts the task that unloads models idle for longer than their
    /// `keep_alive`.
    pub(crate) fn start_idle_unloader(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_CHECK);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let rt = Runtime { inner };
                for name in rt.idle_models() {
                    let rt = rt.clone();
                    tokio::spawn(async move {
                        tracing::info!(model = %name, "unloading after its keep_alive without requests");
                        let _ = rt.unload(&name).await;
                    });
                }
            }
        });
        *lock(&self.inner.idle_task) = Some(task);
    }

    /// Ready models with no request for longer than their keep_alive.
    fn idle_models(&self) -> Vec<String> {
        let reg = lock(&self.inner.models);
        reg.slots
            .iter()
            .filter(|s| s.state == ModelState::Ready)
            .filter_map(|s| {
                let keep = s.cfg.keep_alive?;
                let served = s.served.as_ref()?;
                let idle = lock(&served.last_used).elapsed() >= keep
                    && served.shared.queued() + served.shared.inflight() == 0;
                idle.then(|| s.cfg.name.clone())
            })
            .collect()
    }

    /// A model entry by name, as status shows it.
    pub fn model_entry(&self, name: &str) -> Option<ModelEntry> {
        let reg = lock(&self.inner.models);
        reg.find(name).map(|i| reg.entry(i))
    }
}

/// Why a load failed.
enum LoadFailure {
    Model(embody_engine::Error),
    Other(RuntimeError),
}
