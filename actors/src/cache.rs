//! The cache actor: KV block accounting and the radix prefix cache. It turns
//! the memory budget into a block count for the decoder's paged KV pool,
//! reports how many blocks are in use and cached, and flushes the cache.
//!
//! The prefix index holds references on blocks of the decoder's pool, and the
//! decoder thread is synchronous: asking this actor by message at every
//! admission would park inference on the async world. So the index sits in a
//! [`SharedPrefixCache`] that this actor answers for and the decoder thread
//! locks briefly at two points of a request's life (admission: look up and
//! pin its prefix; completion: index its blocks), plus when the pool runs
//! short. Like the admission queue, the handle outlives either actor: a
//! restarted decoder resets it for its new pool, a restarted cache actor
//! finds it as it was.

use std::sync::Arc;

use embody_engine::kv_cache::KvLayout;
use embody_engine::prefix_cache::{PrefixStats, SharedPrefixCache};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::shared::Shared;

/// The KV pool the decoder builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KvPlan {
    /// Blocks in the pool.
    pub blocks: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Bytes the pool takes.
    pub bytes: u64,
}

/// Blocks in use and in the pool, and the prefix cache's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KvUsage {
    pub used: usize,
    pub total: usize,
    pub prefix: PrefixStats,
}

pub(crate) struct CacheArgs {
    pub layout: KvLayout,
    pub budget_mb: usize,
    pub context_length: usize,
    pub shared: Arc<Shared>,
    pub prefix: Arc<SharedPrefixCache>,
}

/// The cache actor.
pub(crate) struct CacheActor;

pub(crate) struct CacheState {
    plan: KvPlan,
    shared: Arc<Shared>,
    prefix: Arc<SharedPrefixCache>,
}

pub(crate) enum CacheMsg {
    /// The pool to build.
    Plan(RpcReplyPort<KvPlan>),
    /// Blocks in use now.
    Usage(RpcReplyPort<KvUsage>),
    /// Drop every cached prefix no running request uses; replies with the
    /// blocks dropped.
    Flush(RpcReplyPort<usize>),
}

impl Actor for CacheActor {
    type Msg = CacheMsg;
    type State = CacheState;
    type Arguments = CacheArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: CacheArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let blocks = args.layout.blocks_for_budget(args.budget_mb);
        let plan = KvPlan {
            blocks,
            block_tokens: args.layout.block_size,
            bytes: (blocks * args.layout.block_bytes()) as u64,
        };
        let full = args.layout.blocks_for_tokens(args.context_length);
        if blocks < full {
            tracing::warn!(
                "kv_cache_mb = {} holds {} tokens, less than one full context of {}; long prompts will be refused",
                args.budget_mb,
                blocks * args.layout.block_size,
                args.context_length
            );
        }
        tracing::info!(
            blocks,
            block_tokens = plan.block_tokens,
            mib = plan.bytes >> 20,
            kv_cache_type = %args.layout.dtype,
            "KV cache planned"
        );
        Ok(CacheState {
            plan,
            shared: args.shared,
            prefix: args.prefix,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: CacheMsg,
        state: &mut CacheState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CacheMsg::Plan(reply) => {
                let _ = reply.send(state.plan);
            }
            CacheMsg::Usage(reply) => {
                let s = state.shared.stats();
                // The pool the decoder built; the plan until it has built one.
                let total = if s.kv_blocks_total > 0 {
                    s.kv_blocks_total
                } else {
                    state.plan.blocks
                };
                let _ = reply.send(KvUsage {
                    used: s.kv_blocks_used,
                    total,
                    prefix: state.prefix.stats(),
                });
            }
            CacheMsg::Flush(reply) => {
                let blocks = state.prefix.flush();
                // The decoder thread releases the blocks on its next turn.
                state.shared.wake.notify_all();
                tracing::info!(blocks, "prefix cache flushed");
                let _ = reply.send(blocks);
            }
        }
        Ok(())
    }
}
