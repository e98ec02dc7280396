//! The prefix cache a scheduler shares with its owner: the [`RadixIndex`] of
//! KV blocks that hold prefixes seen before, behind a mutex.
//!
//! The index holds references on blocks of one scheduler's [`KvCache`], so
//! every change that moves references runs on the scheduler's thread, which
//! owns the pool: a lookup when a sequence is admitted, an insert when it
//! finishes or is preempted, and eviction when the pool is short. The owner
//! (the daemon's cache actor) reads counters and flushes; a flush drops the
//! index's nodes at once and leaves their block references for the scheduler
//! to release on its next turn ([`PrefixCache::flush`]).
//!
//! Keys are one `u64` per position ([`prefix_key`]): the token id, or for a
//! position inside an image span a value derived from the image's content
//! hash with the top bit set, which no token id has. Two different images
//! therefore never share KV, even behind identical placeholder tokens.
//!
//! A pool that a newer scheduler rebuilt (after a decoder restart) makes the
//! old index meaningless: [`PrefixCache::reset`] forgets it without touching
//! any pool and starts a new epoch; a scheduler of an older epoch finds the
//! cache closed to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kv_cache::KvCache;
use crate::radix::{NodeId, RadixIndex};

/// Positions `start..start + len` of a prompt hold an image whose content
/// hashes to `hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSpan {
    /// First position of the image.
    pub start: usize,
    /// Positions the image takes.
    pub len: usize,
    /// Hash of the image's content (its bytes, or its pixels).
    pub hash: u64,
}

/// The top bit marks image positions; token ids are below 2^32.
const IMAGE_BIT: u64 = 1 << 63;

/// Writes the radix key of `tokens` into `out`: token ids as they are, and
/// for each image position a value from the image's hash and the position's
/// offset in the image.
pub fn prefix_key(tokens: &[u32], images: &[ImageSpan], out: &mut Vec<u64>) {
    out.clear();
    out.extend(tokens.iter().map(|&t| t as u64));
    for img in images {
        let end = (img.start + img.len).min(out.len());
        for (off, k) in out[img.start.min(end)..end].iter_mut().enumerate() {
            *k = IMAGE_BIT | (mix(img.hash ^ mix(off as u64)) >> 1);
        }
    }
}

/// A 64-bit finalizer (splitmix64): nearby inputs give unrelated outputs.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Whether prefixes are shared at all.
    pub enabled: bool,
    /// Blocks the index holds now.
    pub cached_blocks: usize,
    /// Prompt positions served from the index instead of prefilled.
    pub hit_tokens: u64,
    /// Prompt positions looked up.
    pub lookup_tokens: u64,
    /// Blocks evicted (for room or by a flush).
    pub evicted_blocks: u64,
    /// Flushes asked for.
    pub flushes: u64,
}

/// A matched prefix a sequence now holds: its own reference on each block and
/// a pin on the index node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reuse {
    /// The shared blocks, in position order.
    pub blocks: Vec<u32>,
    /// Positions they hold.
    pub tokens: usize,
    /// A cached block whose first positions continue the prefix, and how
    /// many: the sequence holds a reference on it until it has copied them
    /// into a block of its own (see [`KvCache::copy_block`]).
    pub partial: Option<(u32, usize)>,
    /// The pinned node; give it back with [`PrefixCache::unpin`].
    pub node: NodeId,
    /// The epoch it was pinned in.
    pub epoch: u64,
}

/// The index and its counters.
#[derive(Debug)]
pub struct PrefixCache {
    index: RadixIndex,
    enabled: bool,
    epoch: u64,
    /// Blocks a flush took out of the index whose references the scheduler
    /// has yet to release.
    released: Vec<u32>,
    hit_tokens: u64,
    lookup_tokens: u64,
    evicted_blocks: u64,
    flushes: u64,
}

impl PrefixCache {
    /// An empty cache over blocks of `block_size` positions; `enabled: false`
    /// shares nothing (lookups miss, inserts are dropped).
    pub fn new(block_size: usize, enabled: bool) -> Self {
        Self {
            index: RadixIndex::new(block_size),
            enabled,
            epoch: 0,
            released: Vec::new(),
            hit_tokens: 0,
            lookup_tokens: 0,
            evicted_blocks: 0,
            flushes: 0,
        }
    }

    /// Counters.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            enabled: self.enabled,
            cached_blocks: self.index.stats().cached_blocks,
            hit_tokens: self.hit_tokens,
            lookup_tokens: self.lookup_tokens,
            evicted_blocks: self.evicted_blocks,
            flushes: self.flushes,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Forgets everything without touching any pool (the pool it indexed is
    /// gone) and starts a new epoch, which it returns. Counters stay.
    pub fn reset(&mut self, block_size: usize, enabled: bool) -> u64 {
        self.index = RadixIndex::new(block_size);
        self.enabled = enabled;
        self.released.clear();
        self.epoch += 1;
        self.epoch
    }

    /// The longest cached prefix of `key`: its whole blocks, with a reference
    /// taken on each and the node pinned, and the block whose first positions
    /// continue it, also referenced. `None` on a miss.
    pub fn lookup(&mut self, key: &[u64], kv: &mut KvCache) -> Option<Reuse> {
        self.lookup_tokens += key.len() as u64;
        if !self.enabled {
            return None;
        }
        let m = self.index.match_prefix(key);
        let partial = m.partial.filter(|&(_, n)| n > 0);
        // The index's own counters count every lookup; ours count admissions.
        if m.tokens == 0 && partial.is_none() {
            return None;
        }
        self.hit_tokens += (m.tokens + partial.map_or(0, |p| p.1)) as u64;
        for &b in m.blocks.iter().chain(partial.iter().map(|(b, _)| b)) {
            kv.retain(b);
        }
        self.index.pin(m.node);
        Some(Reuse {
            blocks: m.blocks,
            tokens: m.tokens,
            partial,
            node: m.node,
            epoch: self.epoch,
        })
    }

    /// Gives back a [`Reuse`]'s pin (its block references go with the
    /// sequence's table). A pin of an older epoch is ignored.
    pub fn unpin(&mut self, reuse: &Reuse) {
        if reuse.epoch == self.epoch {
            self.index.unpin(reuse.node);
        }
    }

    /// Indexes the whole blocks of `key` (`blocks` hold its positions).
    pub fn insert(&mut self, key: &[u64], blocks: &[u32], kv: &mut KvCache) {
        if self.enabled {
            self.index.insert(key, blocks, kv);
        }
    }

    /// Indexes the whole blocks of `key` like [`insert`](Self::insert) and
    /// pins the node that holds them, for a sequence that keeps using them.
    /// `None` when sharing is off or nothing was indexed.
    pub fn insert_pinned(
        &mut self,
        key: &[u64],
        blocks: &[u32],
        kv: &mut KvCache,
    ) -> Option<Reuse> {
        if !self.enabled || key.len() < self.index.block_size() {
            return None;
        }
        let node = self.index.insert(key, blocks, kv);
        self.index.pin(node);
        Some(Reuse {
            blocks: Vec::new(),
            tokens: key.len() / self.index.block_size() * self.index.block_size(),
            partial: None,
            node,
            epoch: self.epoch,
        })
    }

    /// Evicts least-recently-used unpinned leaves until `kv` has `free`
    /// free blocks or nothing more can go. Returns whether it has them.
    pub fn make_room(&mut self, free: usize, kv: &mut KvCache) -> bool {
        self.release_flushed(kv);
        while kv.free_blocks() < free {
            let out = self.index.evict(1, kv);
            if out.is_empty() {
                break;
            }
            self.evicted_blocks += out.len() as u64;
        }
        kv.free_blocks() >= free
    }

    /// Drops every unpinned node from the index (blocks running sequences use
    /// stay until they end). The references go at once when `kv` is given,
    /// else on the scheduler's next [`release_flushed`](Self::release_flushed).
    /// Returns the blocks dropped.
    pub fn flush(&mut self, kv: Option<&mut KvCache>) -> usize {
        self.flushes += 1;
        let n = self.index.stats().cached_blocks;
        match kv {
            Some(kv) => {
                self.index.clear(kv);
            }
            None => {
                let dropped = self.index.detach_unpinned();
                self.released.extend(dropped);
            }
        }
        let dropped = n - self.index.stats().cached_blocks;
        self.evicted_blocks += dropped as u64;
        dropped
    }

    /// Releases the references of blocks a flush dropped.
    pub fn release_flushed(&mut self, kv: &mut KvCache) {
        for b in self.released.drain(..) {
            kv.release(b);
        }
    }
}

/// A [`PrefixCache`] shared between its owner and one scheduler thread.
#[derive(Debug)]
pub struct SharedPrefixCache {
    cache: Mutex<PrefixCache>,
    /// A flush left references for the scheduler to release.
    flushed: AtomicBool,
}

impl SharedPrefixCache {
    /// A shared empty cache.
    pub fn new(block_size: usize, enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            cache: Mutex::new(PrefixCache::new(block_size, enabled)),
            flushed: AtomicBool::new(false),
        })
    }

    /// Locks the cache. Every structure in it stays consistent between
    /// statements, so a panic elsewhere while it was held is ignored.
    pub fn lock(&self) -> MutexGuard<'_, PrefixCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters.
    pub fn stats(&self) -> PrefixStats {
        self.lock().stats()
    }

    /// Flushes from outside the scheduler's thread: the index empties now and
    /// the scheduler releases the blocks on its next turn. Returns the blocks
    /// dropped.
    pub fn flush(&self) -> usize {
        let n = self.lock().flush(None);
        self.flushed.store(true, Ordering::Release);
        n
    }

    /// Whether a flush left references to release (cheap: no lock).
    pub fn has_flushed(&self) -> bool {
        self.flushed.load(Ordering::Acquire)
    }

    /// Releases what a flush left, on the scheduler's thread.
    pub fn release_flushed(&self, kv: &mut KvCache, epoch: u64) {
        if self.has_flushed() {
            let mut c = self.lock();
            // A scheduler of an older pool leaves the flag to the current one.
            if c.epoch == epoch {
                self.flushed.store(false, Ordering::Release);
                c.release_flushed(kv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{BlockTable, KvLayout};

    fn kv(blocks: usize) -> KvCache {
        let l = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 1,
            block_size: 2,
            window: None,
            dtype: Default::default(),
        };
        KvCache::new(l, blocks)
    }

    #[test]
    fn image_positions_key_by_content_and_offset() {
        let toks = [5, 9, 9, 9, 9, 6];
        let span = |hash| ImageSpan {
            start: 1,
            len: 4,
            hash,
        };
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        prefix_key(&toks, &[span(11)], &mut a);
        prefix_key(&toks, &[span(12)], &mut b);
        prefix_key(&toks, &[span(11)], &mut c);
        assert_eq!(a, c, "same image, same key");
        assert_eq!((a[0], a[5]), (5, 6), "text keeps its token ids");
        assert!(a[1..5].iter().all(|k| k & IMAGE_BIT != 0));
        assert!(a[1..5].iter().zip(&b[1..5]).all(|(x, y)| x != y));
        assert_eq!(
            a[1..5]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            4
        );
        // A span reaching past the prompt is clipped, not a panic.
        prefix_key(
            &toks,
            &[ImageSpan {
                start: 4,
                len: 10,
                hash: 1,
            }],
            &mut a,
        );
        assert_eq!(a.len(), 6);
    }

    #[test]
    fn different_images_share_only_the_text_before_them() {
        let mut kv = kv(16);
        let mut pc = PrefixCache::new(2, true);
        let toks = [3, 4, 7, 7, 7, 7];
        let mut key = Vec::new();
        prefix_key(
            &toks,
            &[ImageSpan {
                start: 2,
                len: 4,
                hash: 1,
            }],
            &mut key,
        );
        let mut t = BlockTable::new();
        t.reserve(&mut kv, 6).unwrap();
        pc.insert(&key, &t.blocks, &mut kv);
        t.release(&mut kv);
        prefix_key(
            &toks,
            &[ImageSpan {
                start: 2,
                len: 4,
                hash: 2,
            }],
            &mut key,
        );
        let r = pc.lookup(&key, &mut kv).unwrap();
        assert_eq!(r.tokens, 2, "only the text block is shared");
        pc.unpin(&r);
        for b in r.blocks {
            kv.release(b);
        }
        prefix_key(
            &toks,
            &[ImageSpan {
                start: 2,
                len: 4,
                hash: 1,
            }],
            &mut key,
        );
        let r = pc.lookup(&key, &mut kv).unwrap();
        assert_eq!(r.tokens, 6, "the same image is shared");
        pc.unpin(&r);
        for b in r.blocks {
            kv.release(b);
        }
        assert_eq!(pc.stats().hit_tokens, 8);
    }

    #[test]
    fn a_partly_shared_block_is_offered_for_copying() {
        let mut kv = kv(8);
        let mut pc = PrefixCache::new(2, true);
        let mut key = Vec::new();
        prefix_key(&[1, 2, 3, 4, 5, 6], &[], &mut key);
        let mut t = BlockTable::new();
        t.reserve(&mut kv, 6).unwrap();
        pc.insert(&key, &t.blocks, &mut kv);
        // Two whole blocks and the first position of the third.
        prefix_key(&[1, 2, 3, 4, 5, 9], &[], &mut key);
        let r = pc.lookup(&key, &mut kv).unwrap();
        assert_eq!((r.tokens, r.partial), (4, Some((t.blocks[2], 1))));
        assert_eq!(kv.refcount(t.blocks[2]), 3, "table, index and the copy's");
        assert_eq!(pc.stats().hit_tokens, 5);
        // Nothing in common within the third block: nothing to copy.
        prefix_key(&[1, 2, 3, 4, 7, 8], &[], &mut key);
        let r2 = pc.lookup(&key, &mut kv).unwrap();
        assert_eq!((r2.tokens, r2.partial), (4, None));
        // Only a part of the first block: still a hit.
        prefix_key(&[1, 7], &[], &mut key);
        let r3 = pc.lookup(&key, &mut kv).unwrap();
        assert_eq!((r3.tokens, r3.partial), (0, Some((t.blocks[0], 1))));
        for r in [r, r2, r3] {
            pc.unpin(&r);
            for b in r.blocks.into_iter().chain(r.partial.map(|p| p.0)) {
                kv.release(b);
            }
        }
        t.release(&mut kv);
        pc.flush(Some(&mut kv));
        assert_eq!(kv.free_blocks(), 8, "references balance");
    }

    #[test]
    fn deferred_flush_releases_on_the_next_turn_and_spares_pins() {
        let mut kv = kv(8);
        let shared = SharedPrefixCache::new(2, true);
        let epoch = shared.lock().epoch();
        let mut t = BlockTable::new();
        t.reserve(&mut kv, 4).unwrap();
        shared.lock().insert(&[1, 2, 3, 4], &t.blocks, &mut kv);
        let mut u = BlockTable::new();
        u.reserve(&mut kv, 4).unwrap();
        shared.lock().insert(&[9, 9, 9, 9], &u.blocks, &mut kv);
        t.release(&mut kv);
        u.release(&mut kv);
        assert_eq!(kv.free_blocks(), 4);
        let pinned = shared.lock().lookup(&[9, 9, 9, 9], &mut kv).unwrap();
        assert_eq!(shared.flush(), 2, "the unpinned prefix goes");
        assert_eq!(shared.stats().cached_blocks, 2);
        assert_eq!(kv.free_blocks(), 4, "references wait for the scheduler");
        assert!(shared.has_flushed());
        shared.release_flushed(&mut kv, epoch);
        assert_eq!(kv.free_blocks(), 6);
        shared.lock().unpin(&pinned);
        for b in pinned.blocks {
            kv.release(b);
        }
        assert_eq!(shared.lock().flush(Some(&mut kv)), 2);
        assert_eq!(kv.free_blocks(), 8, "every reference balanced");
        // A reset forgets without releasing: an old epoch's flush is ignored.
        let e2 = shared.lock().reset(2, true);
        assert_ne!(e2, epoch);
    }

    #[test]
    fn disabled_cache_shares_nothing() {
        let mut kv = kv(8);
        let mut pc = PrefixCache::new(2, false);
        let mut t = BlockTable::new();
        t.reserve(&mut kv, 4).unwrap();
        pc.insert(&[1, 2, 3, 4], &t.blocks, &mut kv);
        t.release(&mut kv);
        assert_eq!(kv.free_blocks(), 8);
        assert!(pc.lookup(&[1, 2, 3, 4], &mut kv).is_none());
    }
}
