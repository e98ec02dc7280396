//! The paged KV cache: a pool of fixed-size blocks sized by a memory budget,
//! per-sequence block tables, and reference counts so that sequences can share
//! the blocks of a common prefix.
//!
//! Keys and values are stored as f16 (as llama.cpp does by default). Within a
//! block, each KV head's rows are contiguous: `[n_kv_heads, block_size, head_dim]`,
//! so attention for one head streams memory in order.

use half::f16;

use crate::{Error, Result};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The shape of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers that keep KV.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl KvLayout {
    /// f16 elements of K (or of V) in one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.n_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block costs across all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.n_layers * self.block_elems() * std::mem::size_of::<f16>()
    }

    /// Blocks that fit in `budget_mb` MiB (at least one).
    pub fn blocks_for_budget(&self, budget_mb: usize) -> usize {
        (budget_mb * 1024 * 1024 / self.block_bytes()).max(1)
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for_tokens(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// The block pool.
pub struct KvCache {
    layout: KvLayout,
    n_blocks: usize,
    // [n_layers][n_blocks * block_elems]
    k: Vec<Vec<f16>>,
    // [n_layers][n_blocks * block_elems]
    v: Vec<Vec<f16>>,
    refcount: Vec<u32>,
    free: Vec<u32>,
}

impl KvCache {
    /// A pool of `n_blocks` blocks, all memory reserved now.
    ///
    /// # Panics
    /// If `n_blocks` is zero or exceeds `u32::MAX`.
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        assert!(n_blocks > 0 && n_blocks <= u32::MAX as usize);
        let per_layer = n_blocks * layout.block_elems();
        Self {
            layout,
            n_blocks,
            k: (0..layout.n_layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
            v: (0..layout.n_layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
            refcount: vec![0; n_blocks],
            // Popped from the end: low block ids are handed out first.
            free: (0..n_blocks as u32).rev().collect(),
        }
    }

    /// The cache's shape.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Total blocks.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Blocks not referenced by anyone.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// The reference count of a block.
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// Takes a free block with a reference count of one.
    pub fn allocate(&mut self) -> Result<u32> {
        let b = self.free.pop().ok_or(Error::KvCacheFull { needed: 1, free: 0 })?;
        self.refcount[b as usize] = 1;
        Ok(b)
    }

    /// Adds a reference to a block in use (a second sequence shares it).
    ///
    /// # Panics
    /// If the block is free: sharing a free block is a logic error.
    pub fn retain(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "retain of free KV block {block}");
        *rc += 1;
    }

    /// Drops a reference; the block returns to the pool at zero.
    ///
    /// # Panics
    /// If the block is already free.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "release of free KV block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }

    /// Stores the K and V rows (`[n_kv_heads * head_dim]` each) of one position.
    pub fn write(&mut self, layer: usize, table: &BlockTable, pos: usize, k: &[f32], v: &[f32]) {
        let l = self.layout;
        let block = table.blocks[pos / l.block_size] as usize;
        let slot = pos % l.block_size;
        let base = block * l.block_elems();
        for h in 0..l.n_kv_heads {
            let dst = base + (h * l.block_size + slot) * l.head_dim;
            let src = h * l.head_dim..(h + 1) * l.head_dim;
            for (d, s) in self.k[layer][dst..dst + l.head_dim].iter_mut().zip(&k[src.clone()]) {
                *d = f16::from_f32(*s);
            }
            for (d, s) in self.v[layer][dst..dst + l.head_dim].iter_mut().zip(&v[src]) {
                *d = f16::from_f32(*s);
            }
        }
    }

    /// K rows of one head in one block: `[block_size, head_dim]`.
    pub fn k_block(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        self.head_slice(&self.k[layer], block, head)
    }

    /// V rows of one head in one block: `[block_size, head_dim]`.
    pub fn v_block(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        self.head_slice(&self.v[layer], block, head)
    }

    fn head_slice<'a>(&self, data: &'a [f16], block: u32, head: usize) -> &'a [f16] {
        let l = self.layout;
        let start = block as usize * l.block_elems() + head * l.block_size * l.head_dim;
        &data[start..start + l.block_size * l.head_dim]
    }
}

/// The blocks that hold one sequence's positions, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    /// Block ids; position `p` lives in `blocks[p / block_size]`.
    pub blocks: Vec<u32>,
}

impl BlockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions the table can hold without allocating.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }

    /// Allocates blocks until `tokens` positions fit; on failure nothing is taken.
    pub fn reserve(&mut self, cache: &mut KvCache, tokens: usize) -> Result<()> {
        let need = cache.layout.blocks_for_tokens(tokens).saturating_sub(self.blocks.len());
        if need > cache.free_blocks() {
            return Err(Error::KvCacheFull {
                needed: need,
                free: cache.free_blocks(),
            });
        }
        for _ in 0..need {
            self.blocks.push(cache.allocate()?);
        }
        Ok(())
    }

    /// Releases every block and empties the table.
    pub fn release(&mut self, cache: &mut KvCache) {
        for b in self.blocks.drain(..) {
            cache.release(b);
        }
    }

    /// Keeps the blocks needed for the first `tokens` positions, releasing the rest.
    pub fn truncate(&mut self, cache: &mut KvCache, tokens: usize) {
        let keep = cache.layout.blocks_for_tokens(tokens);
        for b in self.blocks.drain(keep.min(self.blocks.len())..) {
            cache.release(b);
        }
    }

    /// A table sharing this one's blocks (each gains a reference).
    pub fn fork(&self, cache: &mut KvCache) -> BlockTable {
        for &b in &self.blocks {
            cache.retain(b);
        }
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
        }
    }

    #[test]
    fn budget_sizes_the_pool() {
        let l = layout();
        // 2 layers * 2 (K,V) * 2 heads * 4 slots * 4 dims * 2 bytes = 256 bytes a block.
        assert_eq!(l.block_bytes(), 256);
        assert_eq!(l.blocks_for_budget(1), 4096);
        assert_eq!(l.blocks_for_tokens(9), 3);
    }

    #[test]
    fn reserve_fails_whole_and_refcounts_balance() {
        let mut c = KvCache::new(layout(), 4);
        let mut a = BlockTable::new();
        a.reserve(&mut c, 9).unwrap();
        assert_eq!((a.blocks.len(), c.free_blocks()), (3, 1));
        let mut b = BlockTable::new();
        let e = b.reserve(&mut c, 8).unwrap_err();
        assert!(matches!(e, Error::KvCacheFull { needed: 2, free: 1 }), "{e}");
        assert!(b.blocks.is_empty() && c.free_blocks() == 1, "nothing taken on failure");
        let mut shared = a.fork(&mut c);
        assert_eq!(c.refcount(a.blocks[0]), 2);
        a.release(&mut c);
        assert_eq!(c.free_blocks(), 1, "shared blocks stay in use");
        shared.truncate(&mut c, 4);
        assert_eq!((shared.blocks.len(), c.free_blocks()), (1, 3));
        shared.release(&mut c);
        assert_eq!(c.free_blocks(), 4);
        assert!((0..4).all(|b| c.refcount(b) == 0));
    }

    #[test]
    fn write_lands_in_the_right_block_and_head() {
        let mut c = KvCache::new(layout(), 4);
        let mut t = BlockTable::new();
        // Take block 0 elsewhere so the table's blocks are not the identity.
        let other = c.allocate().unwrap();
        t.reserve(&mut c, 6).unwrap();
        let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        c.write(1, &t, 5, &k, &v);
        let blk = t.blocks[1];
        assert_ne!(blk, other);
        let kh1 = c.k_block(1, blk, 1);
        // Position 5 is slot 1 of the second block; head 1 holds elements 4..8.
        assert_eq!(&kh1[4..8], &[4.0, 5.0, 6.0, 7.0].map(f16::from_f32));
        assert_eq!(c.v_block(1, blk, 0)[4], f16::from_f32(-0.0));
        assert_eq!(c.v_block(1, blk, 0)[5], f16::from_f32(-1.0));
        assert!(c.k_block(0, blk, 1).iter().all(|x| *x == f16::ZERO), "other layer untouched");
    }
}
