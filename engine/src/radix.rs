//! The radix prefix index: which KV blocks already hold which token prefixes.
//!
//! A pure data structure, in the manner of SGLang's RadixAttention: it knows
//! keys, blocks, pins and access times — not requests, not models. Keys are one
//! `u64` per position: a token id for text, and for image positions a value
//! derived from the image's content hash, so two different images never share
//! KV. Edges hold whole blocks only (`block_size` positions each), so a matched
//! prefix is always a list of complete blocks a new sequence can share.
//!
//! Ownership: the index holds one reference (in [`KvCache`]'s counts) on every
//! block it stores. A sequence that reuses a prefix takes its own references;
//! [`RadixIndex::evict`] drops the index's references of least-recently-used,
//! unpinned leaves. Pins mark nodes in use by running sequences; evicting those
//! would free nothing, so they are skipped.

use std::collections::HashMap;

use crate::kv_cache::KvCache;

/// A node handle.
pub type NodeId = usize;

const ROOT: NodeId = 0;

#[derive(Debug)]
struct Node {
    parent: NodeId,
    /// Positions on the edge into this node; a whole number of blocks.
    key: Vec<u64>,
    /// One block per `block_size` positions of `key`.
    blocks: Vec<u32>,
    /// Children by the first key of their edge.
    children: HashMap<u64, NodeId>,
    /// Running sequences that use this node (and so its ancestors).
    pins: u32,
    last_access: u64,
    live: bool,
}

/// The result of a prefix lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Blocks holding the matched positions, in order.
    pub blocks: Vec<u32>,
    /// Positions matched (`blocks.len() * block_size`).
    pub tokens: usize,
    /// The deepest node of the match (pin it while the blocks are in use).
    pub node: NodeId,
    /// A cached block whose first positions (fewer than a block) continue the
    /// match, and how many: a sequence may copy them instead of computing them.
    pub partial: Option<(u32, usize)>,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RadixStats {
    /// Positions served from the index.
    pub hit_tokens: u64,
    /// Positions looked up.
    pub lookup_tokens: u64,
    /// Blocks released by eviction.
    pub evicted_blocks: u64,
    /// Blocks the index holds now.
    pub cached_blocks: usize,
}

/// The prefix index.
#[derive(Debug)]
pub struct RadixIndex {
    block_size: usize,
    nodes: Vec<Node>,
    free_nodes: Vec<NodeId>,
    clock: u64,
    stats: RadixStats,
}

impl RadixIndex {
    /// An empty index over blocks of `block_size` positions.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 0);
        let root = Node {
            parent: ROOT,
            key: Vec::new(),
            blocks: Vec::new(),
            children: HashMap::new(),
            pins: 0,
            last_access: 0,
            live: true,
        };
        Self {
            block_size,
            nodes: vec![root],
            free_nodes: Vec::new(),
            clock: 0,
            stats: RadixStats::default(),
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Counters.
    pub fn stats(&self) -> RadixStats {
        self.stats
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Positions of `a` and `b` that agree, rounded down to whole blocks.
    fn common_blocks(&self, a: &[u64], b: &[u64]) -> usize {
        let same = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        same / self.block_size
    }

    /// The longest cached prefix of `key`, in whole blocks. Marks the path as used.
    pub fn match_prefix(&mut self, key: &[u64]) -> PrefixMatch {
        let now = self.tick();
        let bs = self.block_size;
        let mut node = ROOT;
        let mut pos = 0;
        let mut blocks = Vec::new();
        self.nodes[ROOT].last_access = now;
        while pos + bs <= key.len() {
            let Some(&child) = self.nodes[node].children.get(&key[pos]) else {
                break;
            };
            let n = self.common_blocks(&self.nodes[child].key, &key[pos..]);
            if n == 0 {
                break;
            }
            let child = if n < self.nodes[child].blocks.len() {
                self.split(child, n)
            } else {
                child
            };
            self.nodes[child].last_access = now;
            blocks.extend_from_slice(&self.nodes[child].blocks);
            pos += n * bs;
            node = child;
        }
        let partial = key.get(pos).and_then(|k| {
            let c = &self.nodes[*self.nodes[node].children.get(k)?];
            let same = c.key.iter().zip(&key[pos..]).take_while(|(a, b)| a == b);
            Some((c.blocks[0], same.count().min(bs - 1)))
        });
        self.stats.lookup_tokens += key.len() as u64;
        self.stats.hit_tokens += pos as u64;
        PrefixMatch {
            blocks,
            tokens: pos,
            node,
            partial,
        }
    }

    /// Splits `child`'s edge after `n` blocks; returns the new upper node.
    fn split(&mut self, child: NodeId, n: usize) -> NodeId {
        let bs = self.block_size;
        let parent = self.nodes[child].parent;
        let upper_key: Vec<u64> = self.nodes[child].key[..n * bs].to_vec();
        let upper_blocks: Vec<u32> = self.nodes[child].blocks[..n].to_vec();
        let lower_first = self.nodes[child].key[n * bs];
        let upper = self.alloc(Node {
            parent,
            key: upper_key,
            blocks: upper_blocks,
            children: HashMap::from([(lower_first, child)]),
            // The lower node's users use the upper node too.
            pins: self.nodes[child].pins,
            last_access: self.nodes[child].last_access,
            live: true,
        });
        let first = self.nodes[upper].key[0];
        self.nodes[parent].children.insert(first, upper);
        let c = &mut self.nodes[child];
        c.parent = upper;
        c.key.drain(..n * bs);
        c.blocks.drain(..n);
        upper
    }

    fn alloc(&mut self, node: Node) -> NodeId {
        match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id] = node;
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// Records that `blocks` hold the positions of `key` (its whole blocks; a
    /// partial last block is not indexed). Blocks of positions already indexed
    /// are left as they are; the index takes a reference on each block it adds.
    /// Returns the deepest node for `key`.
    ///
    /// # Panics
    /// If `blocks` is shorter than the whole blocks of `key`.
    pub fn insert(&mut self, key: &[u64], blocks: &[u32], kv: &mut KvCache) -> NodeId {
        let bs = self.block_size;
        let n_blocks = key.len() / bs;
        assert!(
            blocks.len() >= n_blocks,
            "insert: {} blocks for {n_blocks}",
            blocks.len()
        );
        let key = &key[..n_blocks * bs];
        let now = self.tick();
        let mut node = ROOT;
        let mut pos = 0;
        while pos < key.len() {
            let next = self.nodes[node].children.get(&key[pos]).copied();
            let Some(child) = next else {
                let new_blocks = blocks[pos / bs..n_blocks].to_vec();
                for &b in &new_blocks {
                    kv.retain(b);
                }
                self.stats.cached_blocks += new_blocks.len();
                let leaf = self.alloc(Node {
                    parent: node,
                    key: key[pos..].to_vec(),
                    blocks: new_blocks,
                    children: HashMap::new(),
                    pins: 0,
                    last_access: now,
                    live: true,
                });
                self.nodes[node].children.insert(key[pos], leaf);
                return leaf;
            };
            let n = self.common_blocks(&self.nodes[child].key, &key[pos..]);
            if n == 0 {
                // Same first position, different within the first block: the
                // edge keyed by this position is taken, so this suffix stays unindexed.
                return node;
            }
            let child = if n < self.nodes[child].blocks.len() {
                self.split(child, n)
            } else {
                child
            };
            self.nodes[child].last_access = now;
            pos += n * bs;
            node = child;
        }
        node
    }

    /// Marks `node` and its ancestors as in use by one more sequence.
    pub fn pin(&mut self, node: NodeId) {
        let mut n = node;
        loop {
            self.nodes[n].pins += 1;
            if n == ROOT {
                break;
            }
            n = self.nodes[n].parent;
        }
    }

    /// Undoes one [`pin`](Self::pin) of `node`.
    ///
    /// # Panics
    /// If the node is not pinned.
    pub fn unpin(&mut self, node: NodeId) {
        let mut n = node;
        loop {
            assert!(self.nodes[n].pins > 0, "unpin of an unpinned radix node");
            self.nodes[n].pins -= 1;
            if n == ROOT {
                break;
            }
            n = self.nodes[n].parent;
        }
    }

    /// Releases the index's references of least-recently-used unpinned leaves
    /// until at least `want` blocks were released or nothing more can go.
    /// Returns the blocks released (they are free in `kv` unless a sequence
    /// still holds them).
    pub fn evict(&mut self, want: usize, kv: &mut KvCache) -> Vec<u32> {
        let mut released = Vec::new();
        while released.len() < want {
            let Some(blocks) = self.remove_lru_leaf() else {
                break;
            };
            for &b in &blocks {
                kv.release(b);
            }
            released.extend(blocks);
        }
        released
    }

    /// Removes every unpinned node without releasing its blocks; the caller
    /// takes over the index's reference on each block returned (a flush asked
    /// for away from the pool's owner).
    pub fn detach_unpinned(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(blocks) = self.remove_lru_leaf() {
            out.extend(blocks);
        }
        out
    }

    /// Takes the least-recently-used unpinned leaf out of the tree and
    /// returns its blocks, whose references the caller now holds.
    fn remove_lru_leaf(&mut self) -> Option<Vec<u32>> {
        // Leaves are few next to the tokens they hold; a scan keeps this simple.
        let id = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(id, n)| *id != ROOT && n.live && n.pins == 0 && n.children.is_empty())
            .min_by_key(|(_, n)| n.last_access)
            .map(|(id, _)| id)?;
        let node = &mut self.nodes[id];
        node.live = false;
        let parent = node.parent;
        let first = node.key[0];
        let blocks = std::mem::take(&mut node.blocks);
        node.key.clear();
        self.nodes[parent].children.remove(&first);
        self.free_nodes.push(id);
        self.stats.cached_blocks -= blocks.len();
        self.stats.evicted_blocks += blocks.len() as u64;
        Some(blocks)
    }

    /// Releases everything not pinned (a cache flush).
    pub fn clear(&mut self, kv: &mut KvCache) -> usize {
        self.evict(usize::MAX, kv).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{BlockTable, KvLayout};
    use std::collections::HashMap as Map;

    const BS: usize = 2;

    fn kv(blocks: usize) -> KvCache {
        let l = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 1,
            block_size: BS,
            window: None,
            dtype: Default::default(),
        };
        KvCache::new(l, blocks)
    }

    /// A sequence's life: match, take the rest, insert, release its own references.
    fn run_seq(idx: &mut RadixIndex, kv: &mut KvCache, key: &[u64]) -> (usize, Vec<u32>) {
        let m = idx.match_prefix(key);
        let mut table = BlockTable::new();
        table.blocks = m.blocks.clone();
        for &b in &m.blocks {
            kv.retain(b);
        }
        table.reserve(kv, key.len()).unwrap();
        idx.insert(key, &table.blocks, kv);
        let blocks = table.blocks.clone();
        table.release(kv);
        (m.tokens, blocks)
    }

    #[test]
    fn shared_prefix_is_reused_and_split() {
        let mut kv = kv(32);
        let mut idx = RadixIndex::new(BS);
        let (hit, a) = run_seq(&mut idx, &mut kv, &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(hit, 0);
        // Three whole blocks were indexed; the partial last block went back.
        assert_eq!(idx.stats().cached_blocks, 3);
        assert_eq!(kv.free_blocks(), 32 - 3);
        let (hit, b) = run_seq(&mut idx, &mut kv, &[1, 2, 3, 4, 9, 9]);
        assert_eq!(hit, 4, "two whole blocks shared");
        assert_eq!(&b[..2], &a[..2]);
        assert_ne!(b[2], a[2]);
        let m = idx.match_prefix(&[1, 2, 3, 9]);
        assert_eq!(
            (m.tokens, m.blocks.as_slice()),
            (2, &a[..1]),
            "a match stops at block granularity"
        );
        assert_eq!(idx.stats().cached_blocks, 4);
    }

    #[test]
    fn image_keys_never_match_other_images() {
        let mut kv = kv(16);
        let mut idx = RadixIndex::new(BS);
        let img = |h: u64| [1u64 << 63 | h, 1u64 << 63 | h ^ 1];
        let key_a: Vec<u64> = [7, 8].into_iter().chain(img(100)).collect();
        let key_b: Vec<u64> = [7, 8].into_iter().chain(img(200)).collect();
        run_seq(&mut idx, &mut kv, &key_a);
        assert_eq!(idx.match_prefix(&key_b).tokens, 2, "text shared, image not");
        assert_eq!(idx.match_prefix(&key_a).tokens, 4);
    }

    #[test]
    fn pinned_nodes_survive_eviction_and_lru_goes_first() {
        let mut kv = kv(32);
        let mut idx = RadixIndex::new(BS);
        run_seq(&mut idx, &mut kv, &[1, 1, 2, 2]);
        run_seq(&mut idx, &mut kv, &[3, 3, 4, 4]);
        run_seq(&mut idx, &mut kv, &[5, 5, 6, 6]);
        // Touch the first, pin the second: the third is the LRU unpinned leaf.
        idx.match_prefix(&[1, 1, 2, 2]);
        let pinned = idx.match_prefix(&[3, 3, 4, 4]).node;
        idx.pin(pinned);
        let out = idx.evict(1, &mut kv);
        assert_eq!(out.len(), 2);
        assert_eq!(idx.match_prefix(&[5, 5, 6, 6]).tokens, 0);
        assert_eq!(idx.match_prefix(&[1, 1, 2, 2]).tokens, 4);
        assert_eq!(idx.clear(&mut kv), 2, "everything unpinned goes");
        assert_eq!(
            idx.match_prefix(&[3, 3, 4, 4]).tokens,
            4,
            "pinned survives a flush"
        );
        idx.unpin(pinned);
        idx.clear(&mut kv);
        assert_eq!(kv.free_blocks(), 32, "every reference balanced");
    }

    /// Evicts and removes the released prefixes from the model, checking that
    /// each was an unpinned leaf.
    fn evict_and_sync(
        idx: &mut RadixIndex,
        kv: &mut KvCache,
        model: &mut Map<Vec<u64>, u32>,
        pinned: &[(NodeId, Vec<u64>)],
        n: usize,
    ) {
        for b in idx.evict(n, kv) {
            let gone: Vec<Vec<u64>> = model
                .iter()
                .filter(|(_, v)| **v == b)
                .map(|(k, _)| k.clone())
                .collect();
            assert_eq!(gone.len(), 1, "block {b} indexed once");
            let p = &gone[0];
            assert!(
                !pinned.iter().any(|(_, k)| k.starts_with(p)),
                "evicted a pinned prefix {p:?}"
            );
            model.remove(p);
        }
        // Evicted prefixes were leaves: every remaining prefix's parent remains.
        for k in model.keys() {
            if k.len() > BS {
                assert!(model.contains_key(&k[..k.len() - BS]), "orphan {k:?}");
            }
        }
    }

    /// Random operations against a reference model: a map from each indexed
    /// whole-block prefix to its block. Invariants: lookups agree with the
    /// model, pinned prefixes are never evicted, evicted prefixes were leaves,
    /// and block references balance to zero at the end.
    #[test]
    fn property_random_operations_match_the_reference_model() {
        let mut rng = 0x9E3779B97F4A7C15u64;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        for _round in 0..40 {
            let mut kv = kv(64);
            let mut idx = RadixIndex::new(BS);
            let mut model: Map<Vec<u64>, u32> = Map::new();
            let mut pinned: Vec<(NodeId, Vec<u64>)> = Vec::new();
            for _op in 0..200 {
                let len = 1 + next(9) as usize;
                // A small alphabet makes shared prefixes common.
                let key: Vec<u64> = (0..len).map(|_| next(3)).collect();
                match next(10) {
                    0..=4 => {
                        let m = idx.match_prefix(&key);
                        let want = (1..=key.len() / BS)
                            .take_while(|&k| model.contains_key(&key[..k * BS]))
                            .last()
                            .unwrap_or(0);
                        assert_eq!(m.tokens, want * BS, "lookup of {key:?}");
                        for (k, b) in m.blocks.iter().enumerate() {
                            assert_eq!(model[&key[..(k + 1) * BS]], *b);
                        }
                        if next(3) == 0 && m.tokens > 0 {
                            idx.pin(m.node);
                            pinned.push((m.node, key[..m.tokens].to_vec()));
                        }
                    }
                    5..=7 => {
                        if kv.free_blocks() < key.len().div_ceil(BS) {
                            evict_and_sync(&mut idx, &mut kv, &mut model, &pinned, key.len());
                        }
                        let m = idx.match_prefix(&key);
                        let mut table = BlockTable::new();
                        table.blocks = m.blocks.clone();
                        for &b in &m.blocks {
                            kv.retain(b);
                        }
                        if table.reserve(&mut kv, key.len()).is_err() {
                            table.release(&mut kv);
                            continue;
                        }
                        idx.insert(&key, &table.blocks, &mut kv);
                        // The model mirrors insert: new whole-block prefixes get this table's blocks,
                        // unless the first position's edge is taken by a different block.
                        for k in 1..=key.len() / BS {
                            let p = key[..k * BS].to_vec();
                            if let Some(&b) = model.get(&p) {
                                assert_eq!(b, table.blocks[k - 1]);
                                continue;
                            }
                            let parent_has_conflict = model.keys().any(|q| {
                                q.len() == k * BS
                                    && q[..(k - 1) * BS] == p[..(k - 1) * BS]
                                    && q[(k - 1) * BS] == p[(k - 1) * BS]
                            });
                            if parent_has_conflict {
                                break;
                            }
                            model.insert(p, table.blocks[k - 1]);
                        }
                        table.release(&mut kv);
                    }
                    8 => {
                        let n = 1 + next(4) as usize;
                        evict_and_sync(&mut idx, &mut kv, &mut model, &pinned, n);
                    }
                    _ => {
                        if let Some(i) =
                            (!pinned.is_empty()).then(|| next(pinned.len() as u64) as usize)
                        {
                            let (node, _) = pinned.swap_remove(i);
                            idx.unpin(node);
                        }
                    }
                }
                assert_eq!(idx.stats().cached_blocks, model.len());
                assert_eq!(
                    kv.n_blocks() - kv.free_blocks(),
                    model.len(),
                    "only the index holds blocks"
                );
            }
            for (node, _) in pinned.drain(..) {
                idx.unpin(node);
            }
            idx.clear(&mut kv);
            assert_eq!(
                kv.free_blocks(),
                kv.n_blocks(),
                "references balance to zero"
            );
        }
    }
}
