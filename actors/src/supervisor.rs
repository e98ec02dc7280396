//! The supervisor: starts the children in dependency order (device, cache,
//! vision, decoder), restarts a failed child with backoff, and answers status.
//!
//! Backoff doubles with each failure in a row, from `restart_backoff` up to
//! `restart_backoff_max`; a child that made progress since its last start
//! (for the decoder: at least one step) starts its count again, so a rare
//! crash costs one short pause while a crash loop slows down. After three
//! decoder failures in a row without progress, queued requests are ended with
//! `unavailable` instead of waiting through the loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use embody_protocol::{ErrorCode, ModelStatus, Status};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};

use embody_engine::prefix_cache::SharedPrefixCache;
use embody_engine::speculate::Lookup;

use crate::cache::{CacheActor, CacheArgs, CacheMsg, KvPlan};
use crate::config::RuntimeConfig;
use crate::decoder::{DecoderActor, DecoderArgs, DecoderFailed};
use crate::device::{resident_bytes, DeviceActor, DeviceArgs, DeviceMsg, DeviceStart, ModelSource};
use crate::shared::{lock, Shared};
use crate::vision::{VisionActor, VisionArgs};
use crate::{call, Children};

/// Decoder failures in a row, without progress between them, after which
/// queued requests are refused instead of waiting for a recovery.
const CRASH_LOOP: u32 = 3;

/// The children, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ChildKind {
    Device,
    Cache,
    Vision,
    Decoder,
}

pub(crate) struct SupervisorArgs {
    pub cfg: RuntimeConfig,
    pub shared: Arc<Shared>,
    pub children: Arc<std::sync::Mutex<Children>>,
}

/// The supervisor actor.
pub(crate) struct Supervisor;

struct Restarts {
    /// Failures in a row (reset by progress).
    in_row: u32,
    /// When the child last started.
    started: Instant,
    /// Decoder steps when it last started.
    steps_at_start: u64,
}

pub(crate) struct SupervisorState {
    cfg: RuntimeConfig,
    shared: Arc<Shared>,
    children: Arc<std::sync::Mutex<Children>>,
    source: Arc<ModelSource>,
    plan: KvPlan,
    /// The prefix cache the cache actor answers for and the decoder uses.
    prefix: Arc<SharedPrefixCache>,
    ids: Vec<(ActorId, ChildKind)>,
    restarts: std::collections::HashMap<ChildKind, Restarts>,
    stopping: bool,
    /// A wedge past `MAX_ABANDONED` has been logged.
    wedge_reported: bool,
}

pub(crate) enum SupervisorMsg {
    /// The daemon's status.
    Status(RpcReplyPort<Status>),
    /// The model source (tokenizer, template, limits).
    Source(RpcReplyPort<Arc<ModelSource>>),
    /// Start a child again after its backoff.
    Restart(ChildKind),
    /// Stop the children and then the supervisor.
    Shutdown(RpcReplyPort<()>),
    /// Look for a wedged decoder (sent to itself periodically).
    Watch,
}

/// The stop reason of a decoder replaced for making no progress.
const WEDGED: &str = "no progress within the stall timeout";

/// Wedged decoder threads that may be alive at once (each holds its KV
/// cache): past this, the supervisor stops replacing the decoder and leaves
/// the restart to the service manager's watchdog.
const MAX_ABANDONED: usize = 2;

/// How often the supervisor looks for a wedged decoder.
fn watch_period(shared: &Shared) -> Duration {
    (shared.limits().stall_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

impl Supervisor {
    async fn spawn_child(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        kind: ChildKind,
    ) -> Result<(), ActorProcessingErr> {
        let cell = myself.get_cell();
        let id = match kind {
            ChildKind::Device => {
                let start = DeviceStart::Reuse(state.source.clone());
                let (r, _) = Actor::spawn_linked(None, DeviceActor, start, cell).await?;
                let id = r.get_id();
                lock(&state.children).device = Some(r);
                id
            }
            ChildKind::Cache => {
                let (r, _) = spawn_cache(
                    &cell,
                    &state.cfg,
                    &state.source,
                    &state.shared,
                    &state.prefix,
                )
                .await?;
                let id = r.get_id();
                lock(&state.children).cache = Some(r);
                id
            }
            ChildKind::Vision => {
                let (r, _) = Actor::spawn_linked(
                    None,
                    VisionActor,
                    vision_args(&state.cfg, &state.source),
                    cell,
                )
                .await?;
                let id = r.get_id();
                lock(&state.children).vision = Some(r);
                id
            }
            ChildKind::Decoder => {
                let args = decoder_args(
                    &state.cfg,
                    &state.shared,
                    &state.source,
                    state.plan,
                    &state.prefix,
                );
                let (r, _) = Actor::spawn_linked(None, DecoderActor, args, cell).await?;
                let id = r.get_id();
                lock(&state.children).decoder = Some(r);
                id
            }
        };
        state.ids.retain(|(_, k)| *k != kind);
        state.ids.push((id, kind));
        let steps = state.shared.steps.load(Ordering::Relaxed);
        let r = state.restarts.entry(kind).or_insert(Restarts {
            in_row: 0,
            started: Instant::now(),
            steps_at_start: steps,
        });
        r.started = Instant::now();
        r.steps_at_start = steps;
        Ok(())
    }

    /// Replaces a decoder that has made no progress for the stall timeout:
    /// its requests end with `decoder_restarted`, its thread is left to leave
    /// when it can, and a new decoder (a new thread, model instance and KV
    /// cache) takes the queue after the usual backoff.
    fn watch(&self, state: &mut SupervisorState) {
        let shared = state.shared.clone();
        if shared.healthy() {
            state.wedge_reported = false;
            return;
        }
        let since = shared.since_beat();
        if shared.abandoned() >= MAX_ABANDONED {
            if !state.wedge_reported {
                state.wedge_reported = true;
                tracing::error!(
                    "the decoder has made no progress for {} ms and {MAX_ABANDONED} replaced decoders are still wedged; leaving the restart to the service manager's watchdog",
                    since.as_millis()
                );
            }
            return;
        }
        let Some(decoder) = lock(&state.children).decoder.take() else {
            // Already being restarted.
            return;
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        let alive = shared.abandon(generation);
        shared.decoder_up.store(false, Ordering::SeqCst);
        // Counted before any request hears of it, as for a failed thread.
        shared.restarts.fetch_add(1, Ordering::SeqCst);
        let failed = shared.fail_inflight(
            Some(generation),
            ErrorCode::DecoderRestarted,
            &format!(
                "the decoder made no progress for {} ms (supervisor.stall_timeout_ms) while running this request; it is being replaced, send the request again",
                since.as_millis()
            ),
        );
        tracing::error!(
            failed_requests = failed,
            wedged_threads = alive,
            "the decoder has made no progress for {} ms; replacing it",
            since.as_millis()
        );
        // The actor's stop retires the thread's generation; the supervision
        // event that follows schedules the new decoder.
        decoder.stop(Some(WEDGED.into()));
    }

    fn schedule_restart(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        kind: ChildKind,
    ) {
        let steps = state.shared.steps.load(Ordering::Relaxed);
        let r = state.restarts.entry(kind).or_insert(Restarts {
            in_row: 0,
            started: Instant::now(),
            steps_at_start: steps,
        });
        let progressed = match kind {
            ChildKind::Decoder => steps > r.steps_at_start,
            _ => r.started.elapsed() > Duration::from_secs(30),
        };
        if progressed {
            r.in_row = 0;
        }
        if kind == ChildKind::Decoder && r.in_row + 1 >= CRASH_LOOP {
            // Restarts are not helping: end queued requests rather than keep
            // them waiting through a crash loop (health is already failing).
            let failed = state.shared.fail_queued(
                ErrorCode::Unavailable,
                &format!(
                    "the decoder failed {} times in a row without making progress; queued requests are refused until it recovers",
                    r.in_row + 1
                ),
            );
            if failed > 0 {
                tracing::error!(failed, "decoder crash loop: queued requests refused");
            }
        }
        let delay = state
            .cfg
            .restart_backoff
            .saturating_mul(1u32 << r.in_row.min(16))
            .min(state.cfg.restart_backoff_max);
        r.in_row += 1;
        tracing::warn!(
            child = ?kind,
            failures_in_row = r.in_row,
            "restarting in {} ms",
            delay.as_millis()
        );
        myself.send_after(delay, move || SupervisorMsg::Restart(kind));
    }

    async fn status(&self, state: &SupervisorState) -> Status {
        // The device reports memory and the cache its blocks; while either
        // restarts, the shared counters stand in.
        let quick = Duration::from_millis(200);
        let (device, cache) = {
            let c = lock(&state.children);
            (c.device.clone(), c.cache.clone())
        };
        let memory = match device {
            Some(d) => call(&d, DeviceMsg::Memory, quick, "device").await.ok(),
            None => None,
        };
        let kv = match cache {
            Some(c) => call(&c, CacheMsg::Usage, quick, "cache").await.ok(),
            None => None,
        };
        let shared = &state.shared;
        let limits = shared.limits();
        let stats = shared.stats();
        let src = &state.source;
        let (backend, threads) = src.backend();
        let up = shared.decoder_up.load(Ordering::SeqCst);
        let draining = shared.draining.load(Ordering::SeqCst);
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: up && !draining,
            healthy: shared.healthy(),
            draining,
            model: ModelStatus {
                name: src.name.clone(),
                arch: src.info.arch.clone(),
                path: src.path.display().to_string(),
                context_length: src.info.context_length as u32,
                vocab_size: src.info.vocab_size as u32,
                weights_bytes: memory.map_or(src.weights_bytes, |m| m.weights_bytes),
                vision: src.vision.is_some(),
            },
            backend,
            threads: threads as u32,
            // Counted where requests change hands, so a client that has just
            // received an event sees a count that already includes it.
            running: shared.inflight() as u32,
            queued: shared.queued() as u32,
            max_queued: limits.max_queued as u32,
            kv_blocks_used: kv.map_or(stats.kv_blocks_used, |k| k.used) as u32,
            kv_blocks_total: kv.map_or(state.plan.blocks, |k| k.total) as u32,
            kv_block_tokens: state.plan.block_tokens as u32,
            kv_cache_type: src.info.kv.dtype.name().into(),
            kv_blocks_cached: kv.map_or(0, |k| k.prefix.cached_blocks) as u32,
            prefix_hit_tokens: kv.map_or(0, |k| k.prefix.hit_tokens),
            prefix_lookup_tokens: kv.map_or(0, |k| k.prefix.lookup_tokens),
            prefix_evicted_blocks: kv.map_or(0, |k| k.prefix.evicted_blocks),
            steps: shared.steps.load(Ordering::Relaxed),
            draft_tokens: shared.drafted.load(Ordering::Relaxed),
            draft_accepted_tokens: shared.accepted.load(Ordering::Relaxed),
            decoder_restarts: shared.restarts.load(Ordering::Relaxed),
            rss_bytes: memory.map_or_else(resident_bytes, |m| m.rss_bytes),
            uptime_ms: shared.uptime().as_millis() as u64,
            models: Vec::new(),
        }
    }
}

fn vision_args(cfg: &RuntimeConfig, src: &ModelSource) -> VisionArgs {
    VisionArgs {
        model: src.name.clone(),
        arch: src.info.arch.clone(),
        vision: src.vision.clone(),
        cache_bytes: cfg.image_cache_mb << 20,
    }
}

fn decoder_args(
    cfg: &RuntimeConfig,
    shared: &Arc<Shared>,
    src: &Arc<ModelSource>,
    plan: KvPlan,
    prefix: &Arc<SharedPrefixCache>,
) -> DecoderArgs {
    DecoderArgs {
        shared: shared.clone(),
        source: src.clone(),
        kv_blocks: plan.blocks,
        max_running: cfg.max_running,
        lookup: Lookup::tokens(cfg.draft_tokens),
        prefix: cfg.prefix_cache.then(|| prefix.clone()),
    }
}

async fn spawn_cache(
    cell: &ActorCell,
    cfg: &RuntimeConfig,
    src: &ModelSource,
    shared: &Arc<Shared>,
    prefix: &Arc<SharedPrefixCache>,
) -> Result<(ActorRef<CacheMsg>, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
    let args = CacheArgs {
        layout: src.info.kv,
        budget_mb: cfg.kv_cache_mb,
        context_length: src.info.context_length,
        shared: shared.clone(),
        prefix: prefix.clone(),
    };
    Actor::spawn_linked(None, CacheActor, args, cell.clone()).await
}

/// The error inside a failed spawn, so that a child's startup error reaches
/// the caller as itself.
fn startup_error(e: ractor::SpawnErr) -> ActorProcessingErr {
    match e {
        ractor::SpawnErr::StartupFailed(inner) => inner,
        other => Box::new(other),
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cfg = args.cfg;
        let cell = myself.get_cell();
        let timeout = cfg.call_timeout;
        // 1. The device: backend, weights, tokenizer.
        let device_args = DeviceArgs {
            model_path: cfg.model_path.clone(),
            mmproj: cfg.mmproj.clone(),
            backend: cfg.backend,
            device: cfg.device.clone(),
            threads: cfg.threads,
            special_tokens_in_messages: cfg.special_tokens_in_messages,
            opts: embody_engine::models::LoadOptions {
                max_batch_tokens: cfg.max_batch_tokens,
                context_length: cfg.context_length,
                block_size: cfg.block_size,
                kv_type: cfg.kv_type,
                quantize: cfg.quantize,
            },
        };
        let (device, _) = Actor::spawn_linked(
            None,
            DeviceActor,
            DeviceStart::Load(device_args),
            cell.clone(),
        )
        .await
        .map_err(startup_error)?;
        let source = call(&device, DeviceMsg::Source, timeout, "device").await?;
        // 2. The cache: the KV pool's size.
        // Sharing is switched on by the decoder when the model allows it.
        let prefix = SharedPrefixCache::new(source.info.kv.block_size, false);
        let (cache, _) = spawn_cache(&cell, &cfg, &source, &args.shared, &prefix)
            .await
            .map_err(startup_error)?;
        let plan = call(&cache, CacheMsg::Plan, timeout, "cache").await?;
        // 3. Vision.
        let (vision, _) =
            Actor::spawn_linked(None, VisionActor, vision_args(&cfg, &source), cell.clone())
                .await
                .map_err(startup_error)?;
        // 4. The decoder.
        let (decoder, _) = Actor::spawn_linked(
            None,
            DecoderActor,
            decoder_args(&cfg, &args.shared, &source, plan, &prefix),
            cell.clone(),
        )
        .await
        .map_err(startup_error)?;
        let ids = vec![
            (device.get_id(), ChildKind::Device),
            (cache.get_id(), ChildKind::Cache),
            (vision.get_id(), ChildKind::Vision),
            (decoder.get_id(), ChildKind::Decoder),
        ];
        *lock(&args.children) = Children {
            device: Some(device),
            cache: Some(cache),
            vision: Some(vision),
            decoder: Some(decoder),
        };
        myself.send_after(watch_period(&args.shared), || SupervisorMsg::Watch);
        let now = Instant::now();
        let restarts = ids
            .iter()
            .map(|&(_, k)| {
                (
                    k,
                    Restarts {
                        in_row: 0,
                        started: now,
                        steps_at_start: 0,
                    },
                )
            })
            .collect();
        Ok(SupervisorState {
            cfg,
            shared: args.shared,
            children: args.children,
            source,
            plan,
            prefix,
            ids,
            restarts,
            stopping: false,
            wedge_reported: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Status(reply) => {
                let _ = reply.send(self.status(state).await);
            }
            SupervisorMsg::Source(reply) => {
                let _ = reply.send(state.source.clone());
            }
            SupervisorMsg::Watch => {
                if state.stopping {
                    return Ok(());
                }
                self.watch(state);
                myself.send_after(watch_period(&state.shared), || SupervisorMsg::Watch);
            }
            SupervisorMsg::Restart(kind) => {
                if state.stopping {
                    return Ok(());
                }
                if let Err(e) = self.spawn_child(&myself, state, kind).await {
                    tracing::error!(child = ?kind, "restart failed: {e}");
                    self.schedule_restart(&myself, state, kind);
                } else {
                    tracing::info!(child = ?kind, "restarted");
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                state.stopping = true;
                state.shared.stopping.store(true, Ordering::SeqCst);
                state.shared.wake.notify_all();
                let children = std::mem::take(&mut *lock(&state.children));
                if let Some(d) = children.decoder {
                    d.stop_and_wait(None, Some(state.cfg.call_timeout))
                        .await
                        .ok();
                }
                if let Some(v) = children.vision {
                    v.stop_and_wait(None, Some(state.cfg.call_timeout))
                        .await
                        .ok();
                }
                if let Some(c) = children.cache {
                    c.stop_and_wait(None, Some(state.cfg.call_timeout))
                        .await
                        .ok();
                }
                if let Some(d) = children.device {
                    d.stop_and_wait(None, Some(state.cfg.call_timeout))
                        .await
                        .ok();
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Overrides ractor's default, which stops the supervisor when a child dies.
        let (cell, failure, counted) = match event {
            // A failed decoder thread has counted itself; count other failures here.
            SupervisionEvent::ActorFailed(cell, err) => {
                let counted = err.downcast_ref::<DecoderFailed>().is_some();
                (cell, Some(err.to_string()), counted)
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if state.stopping {
                    return Ok(());
                }
                // A decoder replaced for a wedge was counted by `watch`.
                let counted = reason.as_deref() == Some(WEDGED);
                (cell, reason.or(Some("stopped".into())), counted)
            }
            _ => return Ok(()),
        };
        let Some(&(_, kind)) = state.ids.iter().find(|(id, _)| *id == cell.get_id()) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        state.ids.retain(|(id, _)| *id != cell.get_id());
        let reason = failure.unwrap_or_default();
        match kind {
            ChildKind::Decoder => {
                if counted {
                    // The thread has logged its failure.
                    tracing::debug!("decoder failed: {reason}");
                } else {
                    state.shared.restarts.fetch_add(1, Ordering::SeqCst);
                    tracing::error!("decoder actor failed: {reason}");
                }
                lock(&state.children).decoder = None;
                self.schedule_restart(&myself, state, kind);
            }
            ChildKind::Device | ChildKind::Cache | ChildKind::Vision => {
                // The model source outlives the device actor (the decoder holds
                // it), so serving goes on while any of these restarts.
                tracing::error!(child = ?kind, "actor failed: {reason}");
                self.schedule_restart(&myself, state, kind);
            }
        }
        Ok(())
    }
}
