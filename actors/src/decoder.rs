//! The decoder actor: owns the engine's step scheduler on a dedicated OS
//! thread, so inference never runs on an async worker.
//!
//! The thread loops: take new requests from the shared admission queue (only
//! as many as there are free decoding slots, so the rest stay queued and
//! survive a restart), apply cancellations, run one scheduler step, publish
//! counters, and mark the loop's progress for the health check. Events go back
//! to each request's stream through its sink; a sink whose stream is gone
//! cancels the request. The loop marks progress when it runs a forward pass
//! or has nothing to do, never merely for turning: health is progress.
//!
//! When the thread fails (a panic anywhere in the engine, an injected fault),
//! it gives every request it held a terminal `decoder_restarted` error and
//! tells the actor, which fails in turn so that the supervisor restarts it.
//! A restart starts a new thread of a new generation; a thread that finds its
//! generation outdated leaves without touching the queue.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use embody_engine::generate::FinishReason as EngineFinish;
use embody_engine::prefix_cache::SharedPrefixCache;
use embody_engine::scheduler::{EventSink, Scheduler, SchedulerConfig, SeqEvent, SeqRequest};
use embody_engine::speculate::Lookup;
use embody_engine::tokenizer::Tokenizer;
use embody_protocol::{ErrorCode, Event, Fault, FinishReason, TokenLogprob, TopLogprob, Usage};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::device::ModelSource;
use crate::shared::{lock, DecoderStats, Pending, Shared};

pub(crate) struct DecoderArgs {
    pub shared: Arc<Shared>,
    pub source: Arc<ModelSource>,
    pub kv_blocks: usize,
    pub max_running: usize,
    /// Prompt-lookup drafting.
    pub lookup: Lookup,
    /// The prefix cache, when sharing is on.
    pub prefix: Option<Arc<SharedPrefixCache>>,
}

/// The decoder actor.
pub(crate) struct DecoderActor;

pub(crate) struct DecoderState {
    generation: u64,
    shared: Arc<Shared>,
}

pub(crate) enum DecoderMsg {
    /// The decoder thread of `generation` ended: cleanly, or with `failure`.
    ThreadExited {
        generation: u64,
        failure: Option<String>,
    },
}

/// The decoder thread failed; the supervisor restarts the actor.
#[derive(Debug, thiserror::Error)]
#[error("decoder thread failed: {0}")]
pub(crate) struct DecoderFailed(pub String);

impl Actor for DecoderActor {
    type Msg = DecoderMsg;
    type State = DecoderState;
    type Arguments = DecoderArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DecoderArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let shared = args.shared.clone();
        // A new generation: any thread left from an earlier one leaves.
        let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        shared.wake.notify_all();
        let thread = DecoderThread {
            generation,
            args,
            actor: myself,
        };
        std::thread::Builder::new()
            .name("embody-decoder".into())
            .spawn(move || thread.run())?;
        Ok(DecoderState { generation, shared })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: DecoderMsg,
        state: &mut DecoderState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DecoderMsg::ThreadExited {
                generation,
                failure,
            } => {
                if generation != state.generation {
                    return Ok(());
                }
                match failure {
                    Some(reason) => return Err(Box::new(DecoderFailed(reason))),
                    None => myself.stop(Some("decoder thread stopped".into())),
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut DecoderState,
    ) -> Result<(), ActorProcessingErr> {
        // A graceful stop retires the thread too.
        let _ = state.shared.generation.compare_exchange(
            state.generation,
            state.generation + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        state.shared.wake.notify_all();
        Ok(())
    }
}

struct DecoderThread {
    generation: u64,
    args: DecoderArgs,
    actor: ActorRef<DecoderMsg>,
}

impl DecoderThread {
    fn shared(&self) -> &Shared {
        &self.args.shared
    }

    fn current(&self) -> bool {
        self.shared().generation.load(Ordering::SeqCst) == self.generation
    }

    fn run(self) {
        let shared = self.args.shared.clone();
        shared.beat();
        shared.decoder_up.store(true, Ordering::SeqCst);
        tracing::debug!(generation = self.generation, "decoder thread started");
        let result = panic::catch_unwind(AssertUnwindSafe(|| self.decode_loop()));
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(payload) => Some(format!("panicked: {}", panic_message(payload.as_ref()))),
        };
        if self.current() {
            shared.decoder_up.store(false, Ordering::SeqCst);
        }
        let (code, message) = if shared.stopping.load(Ordering::SeqCst) {
            (
                ErrorCode::Unavailable,
                "embodyd stopped before this request finished".to_string(),
            )
        } else {
            let why = failure.as_deref().unwrap_or("replaced by a new decoder");
            (
                ErrorCode::DecoderRestarted,
                format!("the decoder failed while running this request ({why}); it is being restarted, send the request again"),
            )
        };
        if failure.is_some() && self.current() {
            // Counted before any request hears of the failure, so a status
            // asked right after an error event already includes it.
            shared.restarts.fetch_add(1, Ordering::SeqCst);
        }
        let failed = shared.fail_inflight(Some(self.generation), code, &message);
        match &failure {
            Some(f) => tracing::error!(
                generation = self.generation,
                failed_requests = failed,
                "decoder thread failed: {f}"
            ),
            None => tracing::debug!(generation = self.generation, "decoder thread left"),
        }
        shared.thread_left(self.generation);
        let _ = self.actor.send_message(DecoderMsg::ThreadExited {
            generation: self.generation,
            failure,
        });
    }

    fn decode_loop(&self) -> Result<(), String> {
        let shared = self.shared();
        let source = &self.args.source;
        let model = source
            .instantiate()
            .map_err(|e| format!("instantiating the model: {e}"))?;
        let max_running = self.args.max_running.max(1);
        let mut sched = Scheduler::new(
            model,
            source.tokenizer.clone(),
            SchedulerConfig {
                kv_blocks: self.args.kv_blocks,
                max_running,
                max_queued: max_running,
                lookup: self.args.lookup,
            },
        )
        .map_err(|e| format!("making the KV cache: {e}"))?;
        if let Some(pc) = &self.args.prefix {
            sched = sched.with_prefix_cache(pc.clone());
        }
        publish(shared, &sched);
        shared.beat();
        let mut last_steps = 0;
        loop {
            let stats = sched.stats();
            // Progress: nothing to do, or a forward pass ran since the last
            // turn. A scheduler with work that runs nothing does not count.
            if !sched.has_work() || stats.steps != last_steps {
                shared.beat();
                last_steps = stats.steps;
            }
            let free = max_running.saturating_sub(stats.running + stats.queued);
            let (taken, cancels, fault) = {
                let mut inbox = lock(&shared.inbox);
                loop {
                    if shared.stopping.load(Ordering::SeqCst) || !self.current() {
                        return Ok(());
                    }
                    let input = (free > 0 && !inbox.queue.is_empty())
                        || !inbox.cancels.is_empty()
                        || inbox.fault.is_some()
                        || self.args.prefix.as_ref().is_some_and(|p| p.has_flushed());
                    if input || sched.has_work() {
                        break;
                    }
                    let idle = (shared.limits().stall_timeout / 4)
                        .clamp(Duration::from_millis(10), Duration::from_millis(250));
                    inbox = shared
                        .wake
                        .wait_timeout(inbox, idle)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    shared.beat();
                }
                // An injected fault strikes before new requests are taken, so
                // that queued requests stay queued through it.
                let fault = inbox.fault.take();
                let mut taken = Vec::new();
                while fault.is_none() && taken.len() < free {
                    let Some(p) = inbox.queue.pop_front() else {
                        break;
                    };
                    if p.tx.is_closed() {
                        // The client left while the request waited.
                        continue;
                    }
                    // Held before the inbox lock is released, so a cancel
                    // always finds the request in one place or the other.
                    shared.hold(p.id, self.generation, p.tx.clone());
                    taken.push(p);
                }
                (taken, std::mem::take(&mut inbox.cancels), fault)
            };
            match fault {
                Some(Fault::PanicDecoder) => panic!("fault injection: decoder panic requested"),
                Some(Fault::WedgeDecoder { ms }) => {
                    tracing::warn!("fault injection: decoder wedged for {ms} ms");
                    std::thread::sleep(Duration::from_millis(ms));
                }
                None => {}
            }
            for p in taken {
                self.submit(&mut sched, p);
            }
            for id in cancels {
                sched.cancel(id);
            }
            sched.release_flushed();
            if sched.has_work() {
                let before = sched.stats();
                if let Err(e) = sched.step() {
                    // The scheduler has ended the batch's requests with errors.
                    tracing::error!("forward pass failed: {e}");
                }
                let after = sched.stats();
                shared.steps.fetch_add(1, Ordering::Relaxed);
                let drafted = after.drafted - before.drafted;
                if drafted > 0 {
                    shared.drafted.fetch_add(drafted, Ordering::Relaxed);
                    let accepted = after.accepted - before.accepted;
                    shared.accepted.fetch_add(accepted, Ordering::Relaxed);
                }
            }
            publish(shared, &sched);
        }
    }

    fn submit(&self, sched: &mut Scheduler, p: Pending) {
        let shared = self.args.shared.clone();
        let (id, tx) = (p.id, p.tx.clone());
        let tok = sched.tokenizer().clone();
        let mut done = false;
        let sink: EventSink = Box::new(move |ev| {
            if done {
                return false;
            }
            let event = convert(ev, &tok);
            if event.is_terminal() {
                done = true;
                shared.release(id);
            }
            tx.send(event).is_ok()
        });
        let req = SeqRequest {
            id: p.id,
            prompt: p.prompt.tokens,
            sampling: p.sampling,
            max_tokens: p.max_tokens,
            stop: p.stop,
            priority: p.priority,
            images: p.prompt.images,
            image_rows: p.prompt.rows,
            positions: p.prompt.positions,
            next_position: p.prompt.next_position,
            constraint: p.constraint,
            logprobs: p.logprobs,
        };
        if let Err(e) = sched.submit(req, sink) {
            self.shared().release(id);
            let code = match e {
                embody_engine::Error::InvalidRequest(_) => ErrorCode::BadRequest,
                embody_engine::Error::Overloaded(_) => ErrorCode::Overloaded,
                _ => ErrorCode::Internal,
            };
            let _ = p.tx.send(Event::error(code, e.to_string()));
        }
    }
}

fn publish(shared: &Shared, sched: &Scheduler) {
    let s = sched.stats();
    shared.publish(DecoderStats {
        kv_blocks_used: s.kv_blocks_used,
        kv_blocks_total: s.kv_blocks_total,
    });
}

/// A token's log-probability with its text, as the protocol carries it.
fn logprob(tok: &Tokenizer, token: u32, logprob: f32) -> TopLogprob {
    let bytes = tok.piece(token).map(|p| p.into_owned()).unwrap_or_default();
    TopLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
        logprob,
    }
}

/// The protocol event for an engine event.
fn convert(ev: SeqEvent, tok: &Tokenizer) -> Event {
    match ev {
        SeqEvent::Started { prompt_tokens } => Event::Started {
            prompt_tokens: prompt_tokens as u32,
        },
        SeqEvent::Delta {
            text,
            token_ids,
            logprobs,
        } => Event::Delta {
            text,
            token_ids,
            logprobs: logprobs
                .iter()
                .map(|l| {
                    let chosen = logprob(tok, l.chosen.token, l.chosen.logprob);
                    TokenLogprob {
                        token: chosen.token,
                        bytes: chosen.bytes,
                        logprob: chosen.logprob,
                        top: l
                            .top
                            .iter()
                            .map(|t| logprob(tok, t.token, t.logprob))
                            .collect(),
                    }
                })
                .collect(),
        },
        SeqEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        } => Event::Finished {
            reason: match reason {
                EngineFinish::Stop => FinishReason::Stop,
                EngineFinish::Length => FinishReason::Length,
                EngineFinish::Cancelled => FinishReason::Cancelled,
            },
            usage: Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
            },
        },
        SeqEvent::Error { message } => Event::error(ErrorCode::ModelError, message),
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}
