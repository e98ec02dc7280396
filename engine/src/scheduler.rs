//! The step scheduler: many sequences share one model and one paged KV cache.
//!
//! Each [`Scheduler::step`] builds one ragged batch from every running
//! sequence: one token for each sequence that is decoding, and chunks of
//! pending prompts filling the rest of the token budget. One forward pass runs
//! the batch; each sequence that produced logits samples its next token, and its
//! text is handed to its event sink. Sequences are admitted when the KV pool can
//! hold their prompt, and when blocks run out mid-decode the newest sequence is
//! preempted (its blocks released, its tokens kept) and resumed later by
//! prefilling what it had.
//!
//! The scheduler is synchronous and owns no thread; the daemon's decoder actor
//! calls `step` on a dedicated OS thread.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::generate::{FinishReason, StopMatcher};
use crate::kv_cache::{BlockTable, KvCache};
use crate::models::{Logits, Model, SeqBatch};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

/// Limits of one scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    /// Most sequences decoding at once.
    pub max_running: usize,
    /// Most queued sequences; more are refused with [`Error::Overloaded`].
    pub max_queued: usize,
}

/// One generation request, already tokenized.
#[derive(Clone, Debug)]
pub struct SeqRequest {
    /// Caller-chosen id, unique among live requests.
    pub id: u64,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation (not included in the output).
    pub stop: Vec<String>,
    /// Higher runs first; equal priorities run in arrival order.
    pub priority: i32,
}

/// What a sequence reports as it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqEvent {
    /// The sequence was admitted and its prompt is being processed.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
    },
    /// New final text and the tokens that produced it.
    Delta {
        /// Text (may be empty while a multi-byte character or a possible stop string is pending).
        text: String,
        /// Token ids sampled since the last delta.
        token_ids: Vec<u32>,
    },
    /// The sequence ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The sequence failed; no further events follow.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Receives a sequence's events; returning `false` cancels the sequence
/// (the client went away).
pub type EventSink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

/// Counters for health and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences in the running set.
    pub running: usize,
    /// Sequences waiting for admission.
    pub queued: usize,
    /// KV blocks in use.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Forward passes run so far.
    pub steps: u64,
    /// Preemptions so far.
    pub preemptions: u64,
}

struct Seq {
    req: SeqRequest,
    sink: EventSink,
    table: BlockTable,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// Positions already in the KV cache.
    cached: usize,
    generated: usize,
    limit: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    started: bool,
    /// An `Error` event was sent: nothing may follow it.
    failed: bool,
}

impl Seq {
    fn prompt_len(&self) -> usize {
        self.req.prompt.len()
    }

    /// Tokens this sequence still has to run before it can sample.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cached
    }
}

/// Runs many sequences over one model.
pub struct Scheduler {
    model: Box<dyn Model>,
    tok: Arc<Tokenizer>,
    kv: KvCache,
    cfg: SchedulerConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    logits: Vec<f32>,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler over `model` with a KV pool of `cfg.kv_blocks` blocks.
    pub fn new(model: Box<dyn Model>, tok: Arc<Tokenizer>, cfg: SchedulerConfig) -> Self {
        let info = model.info().clone();
        let max_running = cfg.max_running.max(1);
        Self {
            kv: KvCache::new(info.kv, cfg.kv_blocks.max(1)),
            logits: vec![0.0; max_running * info.vocab_size],
            model,
            tok,
            cfg: SchedulerConfig { max_running, ..cfg },
            waiting: VecDeque::new(),
            running: Vec::with_capacity(max_running),
            stats: SchedulerStats::default(),
        }
    }

    /// The model being served.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tok
    }

    /// Queues a request. Requests that can never run (empty, too long for the
    /// context or the whole KV pool, bad sampling parameters) and requests
    /// beyond the queue bound are refused here, before any event.
    pub fn submit(&mut self, req: SeqRequest, sink: EventSink) -> Result<()> {
        req.sampling.validate()?;
        let info = self.model.info();
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("empty prompt".into()));
        }
        if req.prompt.len() >= info.context_length {
            return Err(Error::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {}",
                req.prompt.len(),
                info.context_length
            )));
        }
        if info.kv.blocks_for_tokens(req.prompt.len() + 1) > self.kv.n_blocks() {
            return Err(Error::InvalidRequest(format!(
                "prompt of {} tokens exceeds the KV cache ({} blocks of {})",
                req.prompt.len(),
                self.kv.n_blocks(),
                info.kv.block_size
            )));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "token id {t} outside the vocabulary"
            )));
        }
        if self.waiting.len() >= self.cfg.max_queued {
            return Err(Error::Overloaded(format!(
                "{} requests already queued",
                self.waiting.len()
            )));
        }
        let limit = req.max_tokens.min(info.context_length - req.prompt.len());
        let seq = Seq {
            sampler: Sampler::new(req.sampling.clone(), info.vocab_size),
            stops: StopMatcher::new(&req.stop),
            tokens: {
                let mut t = Vec::with_capacity(req.prompt.len() + limit);
                t.extend_from_slice(&req.prompt);
                t
            },
            table: BlockTable::new(),
            cached: 0,
            generated: 0,
            limit,
            decoder: StreamDecoder::new(true),
            started: false,
            failed: false,
            sink,
            req,
        };
        // Behind every queued request of the same or higher priority.
        let at = self
            .waiting
            .iter()
            .position(|w| w.req.priority < seq.req.priority)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
        Ok(())
    }

    /// Cancels a request wherever it is; its sink gets `Finished` with
    /// [`FinishReason::Cancelled`]. Returns whether it was found.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let s = self.waiting.remove(i).expect("index in range");
            self.finish(s, FinishReason::Cancelled);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let s = self.running.remove(i);
            self.finish(s, FinishReason::Cancelled);
            return true;
        }
        false
    }

    /// Ends every request with an error event (used when the engine must stop).
    pub fn fail_all(&mut self, message: &str) {
        let all: Vec<Seq> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for mut s in all {
            s.table.release(&mut self.kv);
            (s.sink)(SeqEvent::Error {
                message: message.to_string(),
            });
        }
    }

    /// Whether any request is running or waiting.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Current counters.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            queued: self.waiting.len(),
            kv_blocks_used: self.kv.n_blocks() - self.kv.free_blocks(),
            kv_blocks_total: self.kv.n_blocks(),
            ..self.stats
        }
    }

    /// Runs one forward pass over the running sequences and delivers the
    /// resulting events. Does nothing when there is no work.
    pub fn step(&mut self) -> Result<()> {
        self.admit();
        if self.running.is_empty() {
            return Ok(());
        }
        let budget = self.model.info().max_batch_tokens;
        // Plan: decoding sequences first (one token each), then prompt chunks.
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        let mut used = 0;
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].pending() > 1);
        for i in order {
            // Preemption removes sequences from the back of the running set.
            if i >= self.running.len() {
                continue;
            }
            let take = self.running[i].pending().min(budget - used);
            if take == 0 {
                continue;
            }
            let need = self.running[i].cached + take;
            if !self.reserve(i, need) {
                // The pool is exhausted even after preemption: try again next step.
                break;
            }
            plan.retain(|&(k, _)| k < self.running.len());
            plan.push((i, take));
            used = plan.iter().map(|&(_, t)| t).sum();
            if used == budget {
                break;
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        plan.sort_unstable();

        let batch: Vec<SeqBatch<'_>> = plan
            .iter()
            .map(|&(i, take)| {
                let s = &self.running[i];
                SeqBatch {
                    tokens: &s.tokens[s.cached..s.cached + take],
                    start_pos: s.cached,
                    table: &s.table,
                    logits: if s.cached + take == s.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                }
            })
            .collect();
        let wants: Vec<bool> = batch.iter().map(|b| b.logits == Logits::Last).collect();
        let result = self.model.forward(&batch, &mut self.kv, &mut self.logits);
        drop(batch);
        self.stats.steps += 1;
        if let Err(e) = result {
            // A failed forward leaves the cache contents of these positions unknown.
            let message = format!("forward pass failed: {e}");
            for &(i, _) in plan.iter().rev() {
                let mut s = self.running.remove(i);
                s.table.release(&mut self.kv);
                (s.sink)(SeqEvent::Error {
                    message: message.clone(),
                });
            }
            return Err(e);
        }

        let vocab = self.model.info().vocab_size;
        let mut row = 0;
        let mut done: Vec<(usize, Option<FinishReason>)> = Vec::new();
        for (&(i, take), &want) in plan.iter().zip(&wants) {
            let s = &mut self.running[i];
            s.cached += take;
            if !want {
                continue;
            }
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            if !s.started {
                s.started = true;
                let prompt_tokens = s.prompt_len();
                if !(s.sink)(SeqEvent::Started { prompt_tokens }) {
                    done.push((i, Some(FinishReason::Cancelled)));
                    continue;
                }
            }
            if let Some(reason) = sample_one(s, &self.tok, logits) {
                done.push((i, Some(reason)));
            }
        }
        for (i, reason) in done.into_iter().rev() {
            let s = self.running.remove(i);
            self.finish(s, reason.unwrap_or(FinishReason::Stop));
        }
        Ok(())
    }

    /// Moves waiting sequences into the running set while slots and blocks allow.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = self.kv.layout().blocks_for_tokens(front.tokens.len() + 1);
            if need > self.kv.free_blocks() {
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            self.running.push(s);
        }
    }

    /// Makes sequence `i`'s table hold `tokens` positions, preempting the newest
    /// other sequences if the pool is short. Returns false if it still cannot.
    fn reserve(&mut self, i: usize, tokens: usize) -> bool {
        // The next forward starts at `cached`: sliding-window layers release
        // the blocks no query from there on can see.
        let cached = self.running[i].cached;
        self.running[i].table.slide(&mut self.kv, cached);
        loop {
            if self.running[i].table.reserve(&mut self.kv, tokens).is_ok() {
                return true;
            }
            // Newest sequence other than `i`, taken from the back.
            let victim = (0..self.running.len()).rev().find(|&j| j != i);
            let Some(j) = victim else { return false };
            if j < i {
                // Never preempt an older sequence for a newer one's sake.
                return false;
            }
            let mut s = self.running.remove(j);
            s.table.release(&mut self.kv);
            s.cached = 0;
            self.stats.preemptions += 1;
            self.waiting.push_front(s);
        }
    }

    fn finish(&mut self, mut s: Seq, reason: FinishReason) {
        s.table.release(&mut self.kv);
        if s.failed {
            return;
        }
        let tail = if reason == FinishReason::Cancelled {
            String::new()
        } else {
            let flushed = s.decoder.flush(&self.tok).unwrap_or_default();
            let (mut text, _) = s.stops.push(&flushed);
            text.push_str(&s.stops.finish());
            text
        };
        if !tail.is_empty() {
            (s.sink)(SeqEvent::Delta {
                text: tail,
                token_ids: Vec::new(),
            });
        }
        let (prompt_tokens, completion_tokens) = (s.prompt_len(), s.generated);
        (s.sink)(SeqEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        });
    }
}

/// Samples the next token of `s` and delivers its text; returns why the
/// sequence ends, if it does.
fn sample_one(s: &mut Seq, tok: &Tokenizer, logits: &mut [f32]) -> Option<FinishReason> {
    let next = s.sampler.sample(logits, &s.tokens);
    if tok.is_eog(next) {
        return Some(FinishReason::Stop);
    }
    s.tokens.push(next);
    s.generated += 1;
    let piece = match s.decoder.push(tok, next) {
        Ok(p) => p,
        Err(e) => {
            (s.sink)(SeqEvent::Error {
                message: e.to_string(),
            });
            s.failed = true;
            return Some(FinishReason::Cancelled);
        }
    };
    let (text, stopped) = s.stops.push(&piece);
    if !(s.sink)(SeqEvent::Delta {
        text,
        token_ids: vec![next],
    }) {
        return Some(FinishReason::Cancelled);
    }
    if stopped {
        return Some(FinishReason::Stop);
    }
    (s.generated >= s.limit).then_some(FinishReason::Length)
}
