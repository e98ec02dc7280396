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
//! With a [`SharedPrefixCache`] attached, admission reuses the longest cached
//! prefix of the prompt (its KV blocks are shared, only the rest is
//! prefilled), and a sequence that finishes or is preempted indexes its whole
//! blocks for later requests. The cache is locked only at those points and
//! when the pool runs short (to evict unused prefixes before preempting
//! anyone), never per token.
//!
//! With [`SchedulerConfig::lookup`] on, a decoding sequence may bring tokens
//! drafted by prompt lookup ([`crate::speculate`]) into the step; they are
//! checked against the rows they produce (`verify_drafts`), so the tokens
//! are those of decoding one at a time, in fewer forward passes.
//!
//! The scheduler is synchronous and owns no thread; the daemon's decoder actor
//! calls `step` on a dedicated OS thread.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::constraint::Constraint;
use crate::generate::{FinishReason, StopMatcher};
use crate::kv_cache::{BlockTable, KvCache};
use crate::models::{EmbedRows, Logits, Model, Positions, SeqBatch};
use crate::prefix_cache::{prefix_key, ImageSpan, Reuse, SharedPrefixCache};
use crate::sampling::{token_logprobs, Sampler, SamplingParams, TokenLogprobs};
use crate::speculate::{self, DraftLength, Lookup};
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
    /// Prompt-lookup drafting of decoding sequences ([`Lookup::OFF`]: none).
    pub lookup: Lookup,
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
    /// Prompt positions that hold images (their KV is shared only with the
    /// same image).
    pub images: Vec<ImageSpan>,
    /// The rows that enter in place of each image's placeholder tokens,
    /// `[images[i].len, d_model]` for image `i` (empty for text-only prompts).
    pub image_rows: Vec<Arc<[f32]>>,
    /// Multimodal RoPE: the three position ids of every prompt token, and the
    /// id the first generated token takes; empty for one-stream models.
    pub positions: Vec<[u32; 3]>,
    /// See `positions`.
    pub next_position: u32,
    /// A grammar the output must follow.
    pub constraint: Option<Constraint>,
    /// Report each token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
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
        /// Log-probabilities of `token_ids`, when the request asked for them.
        logprobs: Vec<TokenLogprobs>,
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
    /// Tokens drafted by prompt lookup so far.
    pub drafted: u64,
    /// Drafted tokens the model confirmed.
    pub accepted: u64,
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
    /// The logits row before sampling changed it, kept only for log-probabilities.
    raw_logits: Vec<f32>,
    started: bool,
    /// An `Error` event was sent: nothing may follow it.
    failed: bool,
    /// The cached prefix this sequence shares (its pin on the index).
    reuse: Option<Reuse>,
    /// Multimodal RoPE ids of `tokens` (empty for one-stream models), and
    /// the id of the next token.
    pos: Vec<[u32; 3]>,
    next_pos: u32,
    /// Drafted tokens at the end of `tokens` in the step under way.
    drafted: usize,
    draft_len: DraftLength,
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
    /// The shared prefix cache and the epoch this scheduler's pool has in it.
    prefix: Option<(Arc<SharedPrefixCache>, u64)>,
    /// Scratch for prefix keys.
    key: Vec<u64>,
    /// Scratch of a step, sized for `max_running` so that steps do not
    /// allocate: the (sequence, tokens) plan, the order sequences are
    /// considered in, and the sequences that finished.
    plan: Vec<(usize, usize)>,
    order: Vec<usize>,
    done: Vec<(usize, FinishReason)>,
}

impl Scheduler {
    /// A scheduler over `model` with a KV pool of `cfg.kv_blocks` blocks in
    /// the model's backend memory (as many again for sliding layers); an
    /// error where that memory cannot hold them.
    pub fn new(model: Box<dyn Model>, tok: Arc<Tokenizer>, cfg: SchedulerConfig) -> Result<Self> {
        let info = model.info().clone();
        let max_running = cfg.max_running.max(1);
        let blocks = cfg.kv_blocks.max(1);
        Ok(Self {
            kv: model.kv_cache(blocks, blocks)?,
            // A row per running sequence, and one per drafted token.
            logits: vec![0.0; (max_running + cfg.lookup.max_draft) * info.vocab_size],
            model,
            tok,
            cfg: SchedulerConfig { max_running, ..cfg },
            waiting: VecDeque::new(),
            running: Vec::with_capacity(max_running),
            stats: SchedulerStats::default(),
            prefix: None,
            key: Vec::new(),
            plan: Vec::with_capacity(max_running),
            order: Vec::with_capacity(max_running),
            done: Vec::with_capacity(max_running),
        })
    }

    /// Shares prefixes through `cache`, which is reset for this scheduler's
    /// pool (anything it indexed belonged to an earlier pool).
    ///
    /// Models with sliding-window layers share nothing: a reused prefix would
    /// also need the window-pool KV of its last `window` positions, which
    /// sequences release as they slide and the index does not keep.
    pub fn with_prefix_cache(mut self, cache: Arc<SharedPrefixCache>) -> Self {
        let layout = self.kv.layout();
        let epoch = cache
            .lock()
            .reset(layout.block_size, layout.window.is_none());
        self.prefix = Some((cache, epoch));
        self
    }

    /// Releases the blocks a flush of the prefix cache left to this thread
    /// (cheap when there are none). [`step`](Self::step) calls it too.
    pub fn release_flushed(&mut self) {
        if let Some((pc, epoch)) = &self.prefix {
            if pc.has_flushed() {
                pc.release_flushed(&mut self.kv, *epoch);
            }
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
        check_images(&req, info.d_model)?;
        if self.waiting.len() >= self.cfg.max_queued {
            return Err(Error::Overloaded(format!(
                "{} requests already queued",
                self.waiting.len()
            )));
        }
        // A sequence alone in the pool can always finish: preemption frees
        // the pool for the oldest sequence, eviction frees cached prefixes.
        let pool_tokens = self.kv.n_blocks() * info.kv.block_size;
        let limit = req
            .max_tokens
            .min(info.context_length - req.prompt.len())
            .min(pool_tokens - req.prompt.len());
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
            raw_logits: if req.logprobs.is_some() {
                vec![0.0; info.vocab_size]
            } else {
                Vec::new()
            },
            started: false,
            failed: false,
            reuse: None,
            pos: {
                let mut p = Vec::with_capacity(req.positions.len() + limit);
                p.extend_from_slice(&req.positions);
                p
            },
            next_pos: req.next_position,
            drafted: 0,
            draft_len: DraftLength::new(self.cfg.lookup.max_draft),
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
            self.retire(&mut s, false);
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
        self.release_flushed();
        self.admit();
        if self.running.is_empty() {
            return Ok(());
        }
        // The step's scratch is taken out of `self` while `self` is borrowed,
        // and put back with its capacity.
        let (mut plan, mut order, mut done) = (
            std::mem::take(&mut self.plan),
            std::mem::take(&mut self.order),
            std::mem::take(&mut self.done),
        );
        let result = self.step_with(&mut plan, &mut order, &mut done);
        plan.clear();
        order.clear();
        done.clear();
        (self.plan, self.order, self.done) = (plan, order, done);
        result
    }

    fn step_with(
        &mut self,
        plan: &mut Vec<(usize, usize)>,
        order: &mut Vec<usize>,
        done: &mut Vec<(usize, FinishReason)>,
    ) -> Result<()> {
        let budget = self.model.info().max_batch_tokens;
        // Plan: decoding sequences first (one token each), then prompt chunks.
        let mut used = 0;
        order.extend(0..self.running.len());
        order.sort_by_key(|&i| self.running[i].pending() > 1);
        for &i in order.iter() {
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
        // Drafts ride along in the rest of the token budget; they never take
        // blocks from another sequence. A step of several decoding sequences
        // already computes several rows per weight: drafts only fill it up to
        // the rows one drafting sequence would have.
        let decoding = plan.iter().filter(|&&(_, take)| take == 1).count();
        let mut left = self
            .cfg
            .lookup
            .max_draft
            .min(budget - used)
            .min((self.cfg.lookup.max_draft + 1).saturating_sub(decoding));
        for (i, take) in plan.iter_mut() {
            if left == 0 {
                break;
            }
            let k = self.draft_into(*i, left);
            *take += k;
            left -= k;
        }
        plan.sort_unstable();

        let running = &self.running;
        // The image rows each chunk covers (nothing is allocated for text).
        let d = self.model.info().d_model;
        let mut embeds = Vec::new();
        let mut embeds_of = Vec::new();
        for &(i, take) in plan.iter() {
            let s = &running[i];
            if !s.req.images.is_empty() {
                let lo = embeds.len();
                image_rows_in(s, s.cached..s.cached + take, d, &mut embeds);
                embeds_of.push((i, lo..embeds.len()));
            }
        }
        let seq = |&(i, take): &(usize, usize)| {
            let s = &running[i];
            let last = s.cached + take == s.tokens.len();
            let logits = match (last, s.drafted) {
                (false, _) => Logits::None,
                (true, 0) => Logits::Last,
                // Every drafted token is checked against the logits before it.
                (true, _) => Logits::All,
            };
            let mut b = SeqBatch::text(
                &s.tokens[s.cached..s.cached + take],
                s.cached,
                &s.table,
                logits,
            );
            if !s.pos.is_empty() {
                b.positions = Positions::MRope(&s.pos[s.cached..s.cached + take]);
            }
            if let Some((_, r)) = embeds_of.iter().find(|(k, _)| *k == i) {
                b.embeds = &embeds[r.clone()];
            }
            b
        };
        let (model, kv, logits) = (&mut self.model, &mut self.kv, &mut self.logits);
        let result = with_batch(plan, seq, |batch| model.forward(batch, kv, logits));
        self.stats.steps += 1;
        if let Err(e) = result {
            // A failed forward leaves the cache contents of these positions unknown.
            let message = format!("forward pass failed: {e}");
            for &(i, _) in plan.iter().rev() {
                let mut s = self.running.remove(i);
                self.retire(&mut s, false);
                (s.sink)(SeqEvent::Error {
                    message: message.clone(),
                });
            }
            return Err(e);
        }

        // Prompts that have just been prefilled are indexed at once, so that
        // requests arriving while they generate reuse them.
        if self.prefix.is_some() {
            for &(i, take) in plan.iter() {
                let s = &self.running[i];
                if !s.started && s.cached + take == s.tokens.len() {
                    self.index_prompt(i, s.cached + take);
                }
            }
        }

        let vocab = self.model.info().vocab_size;
        let mut row = 0;
        for &(i, take) in plan.iter() {
            let s = &mut self.running[i];
            if s.drafted > 0 {
                let rows = &mut self.logits[row * vocab..(row + take) * vocab];
                row += take;
                let (accepted, reason) = verify_drafts(s, &self.tok, rows, vocab);
                self.stats.drafted += take as u64 - 1;
                self.stats.accepted += accepted as u64;
                if let Some(reason) = reason {
                    done.push((i, reason));
                }
                continue;
            }
            // The sequences whose last token ran asked for logits.
            let want = s.cached + take == s.tokens.len();
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
                    done.push((i, FinishReason::Cancelled));
                    continue;
                }
            }
            if let Some(reason) = sample_one(s, &self.tok, logits) {
                done.push((i, reason));
            }
        }
        for &(i, reason) in done.iter().rev() {
            let s = self.running.remove(i);
            self.finish(s, reason);
        }
        Ok(())
    }

    /// Appends to decoding sequence `i`'s tokens what prompt lookup drafts
    /// for it, at most `most` tokens and only as far as free blocks allow;
    /// returns how many.
    fn draft_into(&mut self, i: usize, most: usize) -> usize {
        let lookup = self.cfg.lookup;
        let s = &mut self.running[i];
        if !s.started || s.pending() != 1 {
            return 0;
        }
        // Each accepted draft is a generated token, and one more is sampled
        // after the last: none may pass the sequence's limit.
        let most = s
            .draft_len
            .next(most)
            .min(MAX_DRAFT)
            .min(s.limit.saturating_sub(s.generated + 1));
        let range = speculate::draft(&s.tokens, &lookup, most);
        let mut k = range.len();
        if k == 0 {
            return 0;
        }
        if s.table.reserve(&mut self.kv, s.cached + 1 + k).is_err() {
            // What the blocks it holds have room for.
            let room = s.table.blocks.len() * self.kv.layout().block_size;
            k = k.min(room.saturating_sub(s.cached + 1));
            if k == 0 || s.table.reserve(&mut self.kv, s.cached + 1 + k).is_err() {
                return 0;
            }
        }
        let from = range.start;
        s.tokens.extend_from_within(from..from + k);
        if !s.pos.is_empty() {
            // Text after an image: the three streams move together.
            s.pos.extend((0..k as u32).map(|j| [s.next_pos + j; 3]));
        }
        s.drafted = k;
        k
    }

    /// Moves waiting sequences into the running set while slots and blocks
    /// allow, each starting from the longest cached prefix of its tokens.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.waiting.front_mut() else {
                break;
            };
            let need = self.kv.layout().blocks_for_tokens(front.tokens.len() + 1);
            match self.prefix.clone() {
                Some((pc, epoch)) => {
                    let mut c = pc.lock();
                    if c.epoch() != epoch {
                        // A newer pool owns the index: share nothing.
                        drop(c);
                        self.prefix = None;
                        continue;
                    }
                    if defer_behind_leader(front, &self.running, self.kv.layout().block_size) {
                        break;
                    }
                    // At least the last token runs, to give the logits to sample from.
                    let n = front.tokens.len() - 1;
                    prefix_key(&front.tokens[..n], &front.req.images, &mut self.key);
                    let reuse = c.lookup(&self.key, &mut self.kv);
                    let have = reuse.as_ref().map_or(0, |r| r.blocks.len());
                    if !c.make_room(need - have, &mut self.kv) {
                        if let Some(r) = reuse {
                            c.unpin(&r);
                            let partial = r.partial.map(|(b, _)| b);
                            for b in r.blocks.into_iter().chain(partial) {
                                self.kv.release(b);
                            }
                        }
                        break;
                    }
                    if let Some(mut r) = reuse {
                        front.table.blocks.extend_from_slice(&r.blocks);
                        front.cached = r.tokens;
                        if let Some((src, n)) = r.partial.take() {
                            // The block's first positions are ours too: a copy
                            // of our own, since the rest of it will differ.
                            let dst = self.kv.allocate().expect("make_room left room");
                            self.kv.copy_block(src, dst);
                            self.kv.release(src);
                            front.table.blocks.push(dst);
                            front.cached += n;
                        }
                        front.reuse = Some(r);
                    }
                }
                None => {
                    if need > self.kv.free_blocks() {
                        break;
                    }
                }
            }
            let s = self.waiting.pop_front().expect("front exists");
            // Behind every running sequence of the same or higher priority,
            // so preemption, which takes from the back, spares those.
            let at = self
                .running
                .iter()
                .position(|r| r.req.priority < s.req.priority)
                .unwrap_or(self.running.len());
            self.running.insert(at, s);
        }
    }

    /// Makes sequence `i`'s table hold `tokens` positions, evicting unused
    /// cached prefixes and then preempting the newest sequences that `i`
    /// outranks if the pool is short. Returns false if it still cannot.
    fn reserve(&mut self, i: usize, tokens: usize) -> bool {
        // The next forward starts at `cached`: sliding-window layers release
        // the blocks no query from there on can see.
        let cached = self.running[i].cached;
        self.running[i].table.slide(&mut self.kv, cached);
        loop {
            if self.running[i].table.reserve(&mut self.kv, tokens).is_ok() {
                return true;
            }
            let want = self
                .kv
                .layout()
                .blocks_for_tokens(tokens)
                .saturating_sub(self.running[i].table.blocks.len());
            if want > self.kv.free_blocks() {
                if let Some((pc, epoch)) = &self.prefix {
                    let mut c = pc.lock();
                    let before = self.kv.free_blocks();
                    if c.epoch() == *epoch {
                        c.make_room(want, &mut self.kv);
                    }
                    if self.kv.free_blocks() > before {
                        continue;
                    }
                }
            }
            // The running set is ordered by priority, then admission: the
            // last sequence is the lowest-priority newest one.
            let victim = (0..self.running.len()).rev().find(|&j| j != i);
            let Some(j) = victim else { return false };
            if j < i {
                // Never preempt a sequence that outranks `i`.
                return false;
            }
            let mut s = self.running.remove(j);
            // What it computed stays indexed, so resuming may skip it.
            self.retire(&mut s, true);
            s.cached = 0;
            self.stats.preemptions += 1;
            // Ahead of every waiting sequence it does not rank below.
            let at = self
                .waiting
                .iter()
                .position(|w| w.req.priority <= s.req.priority)
                .unwrap_or(self.waiting.len());
            self.waiting.insert(at, s);
        }
    }

    /// Indexes the first `upto` positions of running sequence `i` (computed,
    /// in its table) and moves its pin to the node that now holds them.
    fn index_prompt(&mut self, i: usize, upto: usize) {
        let Some((pc, epoch)) = &self.prefix else {
            return;
        };
        let mut c = pc.lock();
        if c.epoch() != *epoch {
            return;
        }
        let s = &mut self.running[i];
        prefix_key(&s.tokens[..upto], &s.req.images, &mut self.key);
        if let Some(pinned) = c.insert_pinned(&self.key, &s.table.blocks, &mut self.kv) {
            if let Some(old) = s.reuse.replace(pinned) {
                c.unpin(&old);
            }
        }
    }

    /// Gives back a sequence's blocks and its pin on the prefix cache,
    /// indexing its computed whole blocks first when `index` is set (not after
    /// a failed forward, which leaves the KV unknown).
    fn retire(&mut self, s: &mut Seq, index: bool) {
        if let Some((pc, epoch)) = &self.prefix {
            let mut c = pc.lock();
            if c.epoch() == *epoch {
                if index && s.cached > 0 {
                    prefix_key(&s.tokens[..s.cached], &s.req.images, &mut self.key);
                    c.insert(&self.key, &s.table.blocks, &mut self.kv);
                }
                if let Some(r) = s.reuse.take() {
                    c.unpin(&r);
                }
            }
        }
        s.reuse = None;
        s.table.release(&mut self.kv);
    }

    fn finish(&mut self, mut s: Seq, reason: FinishReason) {
        self.retire(&mut s, true);
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
                logprobs: Vec::new(),
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

/// Most tokens one sequence drafts in one step.
pub const MAX_DRAFT: usize = 32;

/// Samples from each row of logits of a drafted step in turn, as decoding
/// one token at a time would, for as long as the sampled token is the drafted
/// one that produced the next row: the output is what sampling without
/// drafts gives, whatever the sampler and grammar. Returns how many drafted
/// tokens were confirmed, and why the sequence ends if it does.
fn verify_drafts(
    s: &mut Seq,
    tok: &Tokenizer,
    rows: &mut [f32],
    vocab: usize,
) -> (usize, Option<FinishReason>) {
    let k = std::mem::take(&mut s.drafted);
    let base = s.tokens.len() - k;
    let mut drafts = [0u32; MAX_DRAFT];
    drafts[..k].copy_from_slice(&s.tokens[base..]);
    s.tokens.truncate(base);
    if !s.pos.is_empty() {
        s.pos.truncate(base);
    }
    let mut accepted = 0;
    let mut reason = None;
    for (j, logits) in rows.chunks_exact_mut(vocab).enumerate() {
        reason = sample_one(s, tok, logits);
        if reason.is_some() || j == k || s.tokens.last() != Some(&drafts[j]) {
            break;
        }
        accepted += 1;
    }
    // The pending token and the confirmed drafts are in the cache; the
    // positions after them are written over by the next step.
    s.cached = base + accepted;
    s.draft_len.update(k, accepted);
    (accepted, reason)
}

/// Samples the next token of `s` and delivers its text; returns why the
/// sequence ends, if it does.
fn sample_one(s: &mut Seq, tok: &Tokenizer, logits: &mut [f32]) -> Option<FinishReason> {
    if let Some(c) = s.req.constraint.as_mut() {
        if let Err(e) = c.mask(logits) {
            return fail(s, e.to_string());
        }
    }
    if s.req.logprobs.is_some() {
        s.raw_logits.copy_from_slice(logits);
    }
    let next = s.sampler.sample(logits, &s.tokens);
    if tok.is_eog(next) {
        return Some(FinishReason::Stop);
    }
    if let Some(c) = s.req.constraint.as_mut() {
        if let Err(e) = c.commit(next) {
            return fail(s, e.to_string());
        }
    }
    s.tokens.push(next);
    if !s.pos.is_empty() {
        s.pos.push([s.next_pos; 3]);
        s.next_pos += 1;
    }
    s.generated += 1;
    let piece = match s.decoder.push(tok, next) {
        Ok(p) => p,
        Err(e) => return fail(s, e.to_string()),
    };
    let (text, stopped) = s.stops.push(&piece);
    let logprobs = match s.req.logprobs {
        Some(n) => vec![token_logprobs(&s.raw_logits, next, n)],
        None => Vec::new(),
    };
    if !(s.sink)(SeqEvent::Delta {
        text,
        token_ids: vec![next],
        logprobs,
    }) {
        return Some(FinishReason::Cancelled);
    }
    // A complete grammar that admits nothing more ends the answer here.
    if stopped || s.req.constraint.as_ref().is_some_and(|c| c.is_finished()) {
        return Some(FinishReason::Stop);
    }
    (s.generated >= s.limit).then_some(FinishReason::Length)
}

/// Whether `s` should wait for a running sequence that is prefilling a prompt
/// sharing at least 4 more blocks with it than the index held when that one
/// started: once indexed, `s` reuses them instead of computing them again.
/// The leader takes the whole token budget meanwhile, so waiting costs no
/// throughput.
fn defer_behind_leader(s: &Seq, running: &[Seq], block_size: usize) -> bool {
    const MIN_GAIN: usize = 4;
    running.iter().any(|r| {
        let prompt = r.prompt_len();
        if r.started || r.cached >= prompt {
            return false;
        }
        let same = r.tokens[..prompt]
            .iter()
            .zip(&s.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let had = r.reuse.as_ref().map_or(0, |u| u.tokens);
        s.req.images.is_empty() && same / block_size >= had / block_size + MIN_GAIN
    })
}

/// Pushes the parts of `s`'s images that fall in `range` of its tokens, as
/// embedding rows at their offset in the range.
fn image_rows_in<'a>(
    s: &'a Seq,
    range: std::ops::Range<usize>,
    d: usize,
    out: &mut Vec<EmbedRows<'a>>,
) {
    for (img, rows) in s.req.images.iter().zip(&s.req.image_rows) {
        let (lo, hi) = (
            img.start.max(range.start),
            (img.start + img.len).min(range.end),
        );
        if lo < hi {
            out.push(EmbedRows {
                at: lo - range.start,
                rows: &rows[(lo - img.start) * d..(hi - img.start) * d],
            });
        }
    }
}

/// Refuses image spans and positions that do not fit the prompt.
fn check_images(req: &SeqRequest, d: usize) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidRequest(m));
    if req.images.len() != req.image_rows.len() {
        return bad(format!(
            "{} image spans with {} sets of rows",
            req.images.len(),
            req.image_rows.len()
        ));
    }
    let mut free = 0;
    for (img, rows) in req.images.iter().zip(&req.image_rows) {
        let end = img.start.saturating_add(img.len);
        if img.len == 0 || img.start < free || end > req.prompt.len() {
            return bad(format!(
                "image rows {}..{end} overlap another image or pass the prompt's {} tokens",
                img.start,
                req.prompt.len()
            ));
        }
        if rows.len() != img.len * d {
            return bad(format!(
                "an image of {} rows came with {} values (rows of {d})",
                img.len,
                rows.len()
            ));
        }
        free = end;
    }
    if !req.positions.is_empty() && req.positions.len() != req.prompt.len() {
        return bad(format!(
            "{} position ids for a prompt of {} tokens",
            req.positions.len(),
            req.prompt.len()
        ));
    }
    Ok(())
}

/// Sends the sequence's error event; nothing may follow it.
fn fail(s: &mut Seq, message: String) -> Option<FinishReason> {
    (s.sink)(SeqEvent::Error { message });
    s.failed = true;
    Some(FinishReason::Cancelled)
}

/// Calls `f` with the plan's sequences as one batch, held on the stack for
/// the common batch sizes (a step must not allocate).
///
/// # Panics
/// If the plan is empty.
fn with_batch<'a, R>(
    plan: &[(usize, usize)],
    seq: impl Fn(&(usize, usize)) -> SeqBatch<'a>,
    f: impl FnOnce(&[SeqBatch<'a>]) -> R,
) -> R {
    const INLINE: usize = 32;
    if plan.len() > INLINE {
        let v: Vec<SeqBatch<'a>> = plan.iter().map(seq).collect();
        return f(&v);
    }
    let mut arr = [seq(&plan[0]); INLINE];
    for (a, p) in arr.iter_mut().zip(plan) {
        *a = seq(p);
    }
    f(&arr[..plan.len()])
}
