//! The paged KV cache: pools of fixed-size blocks sized by a memory budget,
//! per-sequence block tables, and reference counts so that sequences can share
//! the blocks of a common prefix.
//!
//! Keys and values are stored as f16 (as llama.cpp does by default). Within a
//! block each KV head has its own contiguous part: values as rows
//! (`[block_size, head_dim]`) and keys transposed (`[head_dim, block_size]`), so
//! that attention computes a query's scores against a whole block with one
//! vector multiply-add per element of the head.
//!
//! Models whose layers attend through a sliding window (Gemma 3 interleaves five
//! sliding layers with one full-attention layer) keep those layers in a second
//! pool, the *window pool*. A sequence's table holds blocks of both pools, indexed
//! alike by position; [`BlockTable::slide`] releases the window-pool blocks that
//! no later query can see, so a sliding layer holds only its window (plus the
//! chunk being computed), while the full-attention layers keep the whole history.

use half::f16;

use crate::{Error, Result};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A window-pool table entry whose block slid out of the window and was released.
pub const RELEASED: u32 = u32::MAX;

/// A set of layer indices below [`LayerSet::MAX`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerSet([u64; 4]);

impl LayerSet {
    /// Layers a set can name.
    pub const MAX: usize = 256;

    /// Adds layer `i`.
    ///
    /// # Panics
    /// If `i >= LayerSet::MAX`.
    pub fn insert(&mut self, i: usize) {
        assert!(i < Self::MAX, "layer {i} beyond LayerSet::MAX");
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// Whether layer `i` is in the set.
    pub fn contains(&self, i: usize) -> bool {
        i < Self::MAX && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// Layers in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Layers that keep only a sliding window of positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    /// Positions a query sees, itself included.
    pub size: usize,
    /// The sliding layers; their K/V live in the window pool.
    pub layers: LayerSet,
}

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
    /// Sliding-window layers kept in the window pool (`None`: every layer keeps
    /// the whole history).
    pub window: Option<SlidingWindow>,
}

impl KvLayout {
    /// f16 elements of K (or of V) in one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.n_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block of positions costs across all layers, K and V (one
    /// main-pool block plus one window-pool block when layers slide).
    pub fn block_bytes(&self) -> usize {
        2 * self.n_layers * self.block_elems() * std::mem::size_of::<f16>()
    }

    /// Blocks that fit in `budget_mb` MiB (at least one).
    pub fn blocks_for_budget(&self, budget_mb: usize) -> usize {
        (budget_mb * 1024 * 1024 / self.block_bytes()).max(1)
    }

    /// Splits a budget of `budget_mb` MiB between the pools: the window pool
    /// gets what `max_sequences` sequences sliding before every forward of up
    /// to `max_batch_tokens` tokens need, the main pool the rest (at least one
    /// block). Returns `(main blocks, window blocks)` for
    /// [`KvCache::with_window_blocks`]; without sliding layers, the window
    /// count is 0 and the main pool takes the whole budget.
    pub fn pools_for_budget(
        &self,
        budget_mb: usize,
        max_sequences: usize,
        max_batch_tokens: usize,
    ) -> (usize, usize) {
        let Some(w) = self.window else {
            return (self.blocks_for_budget(budget_mb), 0);
        };
        // K and V, f16, per block of one layer.
        let layer_block = 2 * self.block_elems() * std::mem::size_of::<f16>();
        let n_window = w.layers.len();
        let window_blocks =
            self.window_blocks_per_sequence(max_batch_tokens) * max_sequences.max(1);
        let window_bytes = window_blocks * n_window * layer_block;
        let main_bytes = (budget_mb * 1024 * 1024).saturating_sub(window_bytes);
        let main_block = (self.n_layers - n_window) * layer_block;
        // When every layer slides, main blocks cost nothing and only count positions.
        let main_blocks = main_bytes
            .checked_div(main_block)
            .unwrap_or_else(|| window_blocks.max(self.blocks_for_budget(budget_mb)));
        (main_blocks.max(1), window_blocks)
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for_tokens(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether layer `layer` keeps its K/V in the window pool.
    pub fn is_window_layer(&self, layer: usize) -> bool {
        self.window.is_some_and(|w| w.layers.contains(layer))
    }

    /// Window-pool blocks one sequence holds at most when it calls
    /// [`BlockTable::slide`] before every forward of up to `max_batch_tokens`
    /// tokens (0 without sliding layers).
    pub fn window_blocks_per_sequence(&self, max_batch_tokens: usize) -> usize {
        match self.window {
            // The oldest visible position and the newest may each sit in a partial block.
            Some(w) => (w.size - 1 + max_batch_tokens).div_ceil(self.block_size) + 1,
            None => 0,
        }
    }
}

/// The bookkeeping of one pool of blocks (the data is in [`KvMemory`]).
struct Pool {
    refcount: Vec<u32>,
    free: Vec<u32>,
}

impl Pool {
    fn new(n_blocks: usize) -> Self {
        Self {
            refcount: vec![0; n_blocks],
            // Popped from the end: low block ids are handed out first.
            free: (0..n_blocks as u32).rev().collect(),
        }
    }

    fn allocate(&mut self) -> Result<u32> {
        let b = self
            .free
            .pop()
            .ok_or(Error::KvCacheFull { needed: 1, free: 0 })?;
        self.refcount[b as usize] = 1;
        Ok(b)
    }

    fn retain(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "retain of free KV block {block}");
        *rc += 1;
    }

    fn release(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "release of free KV block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }
}

/// Keys and values of one pool in host memory: `[layers in the pool][n_blocks * block_elems]`.
struct HostPool {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl HostPool {
    fn new(n_layers: usize, n_blocks: usize, block_elems: usize) -> Self {
        let per_layer = n_blocks * block_elems;
        Self {
            k: (0..n_layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
            v: (0..n_layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
        }
    }
}

/// The keys and values of a device backend's cache, in its own memory. The
/// cache keeps the block bookkeeping; what it asks of the memory is here.
pub trait KvMemory: std::any::Any + Send + Sync {
    /// Copies main-pool block `src`'s keys and values, every layer, into `dst`.
    fn copy_block(&mut self, src: u32, dst: u32);
    /// The memory as `Any`, for the backend that made it.
    fn as_any(&self) -> &dyn std::any::Any;
    /// [`KvMemory::as_any`], mutably.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// Where the keys and values are.
enum KvData {
    /// Host memory: the main pool's, then the window pool's.
    Host(HostPool, HostPool),
    /// A device backend's memory.
    Device(Box<dyn KvMemory>),
}

/// The block pools.
pub struct KvCache {
    layout: KvLayout,
    /// For each layer: whether it lives in the window pool, and its index there.
    slots: Vec<(bool, usize)>,
    main: Pool,
    window: Pool,
    data: KvData,
}

impl KvCache {
    /// A cache of `n_blocks` blocks in the main pool and as many in the window
    /// pool (when layers slide), all memory reserved now. A window pool that
    /// large never runs out before the main pool; [`KvCache::with_window_blocks`]
    /// sizes it by [`KvLayout::window_blocks_per_sequence`] instead.
    ///
    /// # Panics
    /// If `n_blocks` is zero or exceeds `u32::MAX - 1`.
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        let window = if layout.window.is_some() { n_blocks } else { 0 };
        Self::with_window_blocks(layout, n_blocks, window)
    }

    /// A cache with `n_blocks` main-pool blocks and `n_window_blocks` window-pool
    /// blocks.
    ///
    /// # Panics
    /// If `n_blocks` is zero, either count exceeds `u32::MAX - 1`, or the layout
    /// names a sliding layer beyond `n_layers`.
    pub fn with_window_blocks(layout: KvLayout, n_blocks: usize, n_window_blocks: usize) -> Self {
        let (n_main, n_window) = Self::layers_per_pool(layout);
        let window_blocks = if n_window > 0 { n_window_blocks } else { 0 };
        let be = layout.block_elems();
        let data = KvData::Host(
            HostPool::new(n_main, n_blocks, be),
            HostPool::new(n_window, window_blocks, be),
        );
        Self::with_data(layout, n_blocks, n_window_blocks, data)
    }

    /// A cache whose keys and values live in a device backend's `memory`,
    /// which holds `n_blocks` main-pool blocks and `n_window_blocks`
    /// window-pool blocks of `layout` (none without sliding layers).
    ///
    /// # Panics
    /// As [`KvCache::with_window_blocks`].
    pub fn on_device(
        layout: KvLayout,
        n_blocks: usize,
        n_window_blocks: usize,
        memory: Box<dyn KvMemory>,
    ) -> Self {
        Self::with_data(layout, n_blocks, n_window_blocks, KvData::Device(memory))
    }

    /// Layers in the main pool and in the window pool.
    fn layers_per_pool(layout: KvLayout) -> (usize, usize) {
        let n_window = (0..layout.n_layers)
            .filter(|&l| layout.is_window_layer(l))
            .count();
        (layout.n_layers - n_window, n_window)
    }

    fn with_data(layout: KvLayout, n_blocks: usize, n_window_blocks: usize, data: KvData) -> Self {
        assert!(n_blocks > 0 && n_blocks < u32::MAX as usize);
        assert!(n_window_blocks < u32::MAX as usize);
        let mut slots = Vec::with_capacity(layout.n_layers);
        let (mut n_main, mut n_window) = (0, 0);
        for l in 0..layout.n_layers {
            if layout.is_window_layer(l) {
                slots.push((true, n_window));
                n_window += 1;
            } else {
                slots.push((false, n_main));
                n_main += 1;
            }
        }
        if let Some(w) = layout.window {
            assert_eq!(w.layers.len(), n_window, "sliding layers beyond n_layers");
        }
        let window_blocks = if n_window > 0 { n_window_blocks } else { 0 };
        Self {
            layout,
            slots,
            main: Pool::new(n_blocks),
            window: Pool::new(window_blocks),
            data,
        }
    }

    /// A device backend's memory, where it is of type `T`.
    pub fn device<T: std::any::Any>(&self) -> Option<&T> {
        match &self.data {
            KvData::Device(m) => m.as_any().downcast_ref(),
            KvData::Host(..) => None,
        }
    }

    /// [`KvCache::device`], mutably.
    pub fn device_mut<T: std::any::Any>(&mut self) -> Option<&mut T> {
        match &mut self.data {
            KvData::Device(m) => m.as_any_mut().downcast_mut(),
            KvData::Host(..) => None,
        }
    }

    /// The host pools: main, window.
    fn host(&self) -> (&HostPool, &HostPool) {
        match &self.data {
            KvData::Host(m, w) => (m, w),
            KvData::Device(_) => panic!("a device KV cache given to a host backend"),
        }
    }

    /// The cache's shape.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Blocks in the main pool.
    pub fn n_blocks(&self) -> usize {
        self.main.refcount.len()
    }

    /// Main-pool blocks not referenced by anyone.
    pub fn free_blocks(&self) -> usize {
        self.main.free.len()
    }

    /// The reference count of a main-pool block.
    pub fn refcount(&self, block: u32) -> u32 {
        self.main.refcount[block as usize]
    }

    /// Blocks in the window pool (0 without sliding layers).
    pub fn n_window_blocks(&self) -> usize {
        self.window.refcount.len()
    }

    /// Window-pool blocks not referenced by anyone.
    pub fn free_window_blocks(&self) -> usize {
        self.window.free.len()
    }

    /// The reference count of a window-pool block.
    pub fn window_refcount(&self, block: u32) -> u32 {
        self.window.refcount[block as usize]
    }

    /// Takes a free main-pool block with a reference count of one.
    pub fn allocate(&mut self) -> Result<u32> {
        self.main.allocate()
    }

    /// Adds a reference to a main-pool block in use (a second sequence shares it).
    ///
    /// # Panics
    /// If the block is free: sharing a free block is a logic error.
    pub fn retain(&mut self, block: u32) {
        self.main.retain(block)
    }

    /// Copies main-pool block `src`'s keys and values, every layer, into
    /// `dst`: a sequence's own copy of a block whose first positions it
    /// shares with a cached prefix (the rest it overwrites before reading).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let be = self.layout.block_elems();
        let (s, d) = (src as usize * be, dst as usize * be);
        match &mut self.data {
            KvData::Host(main, _) => {
                for data in main.k.iter_mut().chain(main.v.iter_mut()) {
                    data.copy_within(s..s + be, d);
                }
            }
            KvData::Device(m) => m.copy_block(src, dst),
        }
    }

    /// Drops a reference to a main-pool block; it returns to the pool at zero.
    ///
    /// # Panics
    /// If the block is already free.
    pub fn release(&mut self, block: u32) {
        self.main.release(block)
    }

    /// The blocks that hold `layer`'s positions for a sequence: the table's
    /// main-pool or window-pool list. Position `p` is in `blocks[p / block_size]`.
    pub fn blocks<'a>(&self, layer: usize, table: &'a BlockTable) -> &'a [u32] {
        if self.slots[layer].0 {
            &table.window
        } else {
            &table.blocks
        }
    }

    /// Stores the K and V rows (`[n_kv_heads * head_dim]` each) of one position.
    ///
    /// # Panics
    /// If the table holds no block for `pos` in the layer's pool.
    pub fn write(&mut self, layer: usize, table: &BlockTable, pos: usize, k: &[f32], v: &[f32]) {
        let l = self.layout;
        let (in_window, slot) = self.slots[layer];
        let KvData::Host(main, window) = &mut self.data else {
            panic!("a device KV cache given to a host backend")
        };
        let (pool, blocks) = if in_window {
            (window, &table.window)
        } else {
            (main, &table.blocks)
        };
        let block = blocks[pos / l.block_size];
        assert_ne!(
            block, RELEASED,
            "KV write at position {pos} into a released window block"
        );
        let base = block as usize * l.block_elems();
        let slot_in_block = pos % l.block_size;
        for h in 0..l.n_kv_heads {
            let head = base + h * l.block_size * l.head_dim;
            let src = h * l.head_dim..(h + 1) * l.head_dim;
            let keys = pool.k[slot][head + slot_in_block..].iter_mut();
            for (d, s) in keys.step_by(l.block_size).zip(&k[src.clone()]) {
                *d = f16::from_f32(*s);
            }
            let dst = head + slot_in_block * l.head_dim;
            for (d, s) in pool.v[slot][dst..dst + l.head_dim].iter_mut().zip(&v[src]) {
                *d = f16::from_f32(*s);
            }
        }
    }

    /// Keys of one head in one block of `layer`'s pool, transposed:
    /// `[head_dim, block_size]`.
    pub fn k_block(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        let (in_window, slot) = self.slots[layer];
        let (main, window) = self.host();
        let pool = if in_window { window } else { main };
        self.head_slice(&pool.k[slot], block, head)
    }

    /// V rows of one head in one block of `layer`'s pool: `[block_size, head_dim]`.
    pub fn v_block(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        let (in_window, slot) = self.slots[layer];
        let (main, window) = self.host();
        let pool = if in_window { window } else { main };
        self.head_slice(&pool.v[slot], block, head)
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
    /// Main-pool block ids; position `p` lives in `blocks[p / block_size]`.
    pub blocks: Vec<u32>,
    /// Window-pool block ids (sliding layers), indexed like `blocks`; entries
    /// that slid out of the window are [`RELEASED`]. Empty without sliding layers.
    pub window: Vec<u32>,
}

impl BlockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table with room for `blocks` blocks in each pool, so growing it
    /// does not allocate.
    pub fn with_capacity(blocks: usize) -> Self {
        Self {
            blocks: Vec::with_capacity(blocks),
            window: Vec::with_capacity(blocks),
        }
    }

    /// Positions the table can hold without allocating.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }

    /// The first position whose window-pool block is still held.
    pub fn window_start(&self, block_size: usize) -> usize {
        self.released_window_blocks() * block_size
    }

    fn released_window_blocks(&self) -> usize {
        // Released entries are always a prefix.
        self.window.partition_point(|&b| b == RELEASED)
    }

    /// Window-pool blocks the table holds.
    pub fn window_blocks_held(&self) -> usize {
        self.window.len() - self.released_window_blocks()
    }

    /// Allocates blocks until `tokens` positions fit in every pool the layout
    /// uses; on failure nothing is taken.
    pub fn reserve(&mut self, cache: &mut KvCache, tokens: usize) -> Result<()> {
        let want = cache.layout.blocks_for_tokens(tokens);
        let need = want.saturating_sub(self.blocks.len());
        let need_window = if cache.layout.window.is_some() {
            want.saturating_sub(self.window.len())
        } else {
            0
        };
        if need > cache.free_blocks() {
            return Err(Error::KvCacheFull {
                needed: need,
                free: cache.free_blocks(),
            });
        }
        if need_window > cache.free_window_blocks() {
            return Err(Error::KvCacheFull {
                needed: need_window,
                free: cache.free_window_blocks(),
            });
        }
        for _ in 0..need {
            self.blocks.push(cache.main.allocate()?);
        }
        for _ in 0..need_window {
            self.window.push(cache.window.allocate()?);
        }
        Ok(())
    }

    /// Releases the window-pool blocks that no query at `next_pos` or later can
    /// see. Call it before each forward whose first new token is at `next_pos`;
    /// positions before `next_pos` then cannot be computed again.
    pub fn slide(&mut self, cache: &mut KvCache, next_pos: usize) {
        let Some(w) = cache.layout.window else {
            return;
        };
        let first_visible = (next_pos + 1).saturating_sub(w.size);
        let end = (first_visible / cache.layout.block_size).min(self.window.len());
        for b in &mut self.window[..end] {
            if *b != RELEASED {
                cache.window.release(*b);
                *b = RELEASED;
            }
        }
    }

    /// Releases every block and empties the table.
    pub fn release(&mut self, cache: &mut KvCache) {
        for b in self.blocks.drain(..) {
            cache.main.release(b);
        }
        for b in self.window.drain(..) {
            if b != RELEASED {
                cache.window.release(b);
            }
        }
    }

    /// Keeps the blocks needed for the first `tokens` positions, releasing the rest.
    pub fn truncate(&mut self, cache: &mut KvCache, tokens: usize) {
        let keep = cache.layout.blocks_for_tokens(tokens);
        for b in self.blocks.drain(keep.min(self.blocks.len())..) {
            cache.main.release(b);
        }
        for b in self.window.drain(keep.min(self.window.len())..) {
            if b != RELEASED {
                cache.window.release(b);
            }
        }
    }

    /// A table sharing this one's blocks (each gains a reference).
    pub fn fork(&self, cache: &mut KvCache) -> BlockTable {
        for &b in &self.blocks {
            cache.main.retain(b);
        }
        for &b in &self.window {
            if b != RELEASED {
                cache.window.retain(b);
            }
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
            window: None,
        }
    }

    /// Three layers, the middle one sliding with a window of 6 positions.
    fn sliding_layout() -> KvLayout {
        let mut layers = LayerSet::default();
        layers.insert(1);
        KvLayout {
            n_layers: 3,
            window: Some(SlidingWindow { size: 6, layers }),
            ..layout()
        }
    }

    /// A device's memory as the cache sees it: the copies it is asked for.
    #[derive(Default)]
    struct Copies(Vec<(u32, u32)>);

    impl KvMemory for Copies {
        fn copy_block(&mut self, src: u32, dst: u32) {
            self.0.push((src, dst));
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    #[test]
    fn device_memory_gets_the_copies_and_the_bookkeeping_stays_here() {
        let mut c = KvCache::on_device(sliding_layout(), 4, 2, Box::new(Copies::default()));
        assert_eq!((c.n_blocks(), c.n_window_blocks()), (4, 2));
        let (a, b) = (c.allocate().unwrap(), c.allocate().unwrap());
        c.copy_block(a, b);
        assert_eq!(c.device::<Copies>().unwrap().0, vec![(a, b)]);
        assert_eq!(c.free_blocks(), 2);
        assert!(KvCache::new(layout(), 4).device::<Copies>().is_none());
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.k_block(0, a, 0).len()));
        assert!(read.is_err(), "host reads of device memory are refused");
    }

    #[test]
    fn budget_sizes_the_pool() {
        let l = layout();
        // 2 layers * 2 (K,V) * 2 heads * 4 slots * 4 dims * 2 bytes = 256 bytes a block.
        assert_eq!(l.block_bytes(), 256);
        assert_eq!(l.blocks_for_budget(1), 4096);
        assert_eq!(l.blocks_for_tokens(9), 3);
        assert_eq!(l.window_blocks_per_sequence(8), 0);
        // A window of 6 and chunks of 8: 13 positions over at most 5 blocks of 4.
        assert_eq!(sliding_layout().window_blocks_per_sequence(8), 5);
        // 1 MiB for two sequences: 10 window blocks of one layer (1280 bytes),
        // the rest in main blocks of two layers (256 bytes each).
        assert_eq!(
            sliding_layout().pools_for_budget(1, 2, 8),
            ((1 << 20) / 256 - 5, 10)
        );
        assert_eq!(l.pools_for_budget(1, 2, 8), (4096, 0));
    }

    #[test]
    fn reserve_fails_whole_and_refcounts_balance() {
        let mut c = KvCache::new(layout(), 4);
        let mut a = BlockTable::new();
        a.reserve(&mut c, 9).unwrap();
        assert_eq!((a.blocks.len(), c.free_blocks()), (3, 1));
        assert!(a.window.is_empty(), "no window pool without sliding layers");
        let mut b = BlockTable::new();
        let e = b.reserve(&mut c, 8).unwrap_err();
        assert!(
            matches!(e, Error::KvCacheFull { needed: 2, free: 1 }),
            "{e}"
        );
        assert!(
            b.blocks.is_empty() && c.free_blocks() == 1,
            "nothing taken on failure"
        );
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
        // Position 5 is slot 1 of the second block; head 1 holds elements 4..8,
        // stored transposed (element d of slot 1 at d * block_size + 1).
        let col: Vec<f16> = (0..4).map(|d| kh1[d * 4 + 1]).collect();
        assert_eq!(col, [4.0, 5.0, 6.0, 7.0].map(f16::from_f32));
        assert_eq!(kh1[0], f16::ZERO, "slot 0 untouched");
        assert_eq!(c.v_block(1, blk, 0)[4], f16::from_f32(-0.0));
        assert_eq!(c.v_block(1, blk, 0)[5], f16::from_f32(-1.0));
        assert!(
            c.k_block(0, blk, 1).iter().all(|x| *x == f16::ZERO),
            "other layer untouched"
        );
    }

    #[test]
    fn copy_block_copies_every_layer() {
        let mut c = KvCache::new(layout(), 4);
        let mut t = BlockTable::new();
        t.reserve(&mut c, 2).unwrap();
        let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        for layer in 0..2 {
            c.write(layer, &t, 1, &k, &v);
        }
        let dst = c.allocate().unwrap();
        c.copy_block(t.blocks[0], dst);
        for layer in 0..2 {
            for h in 0..2 {
                assert_eq!(c.k_block(layer, dst, h), c.k_block(layer, t.blocks[0], h));
                assert_eq!(c.v_block(layer, dst, h), c.v_block(layer, t.blocks[0], h));
            }
        }
        assert_eq!(c.v_block(1, dst, 1)[4], f16::from_f32(-4.0));
    }

    #[test]
    fn sliding_layers_live_in_the_window_pool() {
        let mut c = KvCache::with_window_blocks(sliding_layout(), 8, 3);
        let mut t = BlockTable::new();
        t.reserve(&mut c, 5).unwrap();
        assert_eq!((t.blocks.len(), t.window.len()), (2, 2));
        assert_eq!((c.free_blocks(), c.free_window_blocks()), (6, 1));
        let k = [1.0; 8];
        let v = [2.0; 8];
        c.write(1, &t, 4, &k, &v);
        // Layer 1 wrote into its window block; layers 0 and 2 read the main pool.
        assert_eq!(c.blocks(1, &t), &t.window[..]);
        assert_eq!(c.blocks(2, &t), &t.blocks[..]);
        assert_eq!(c.k_block(1, t.window[1], 0)[0], f16::from_f32(1.0));
        assert!(c.k_block(0, t.blocks[1], 0).iter().all(|x| *x == f16::ZERO));
        assert!(c.k_block(2, t.blocks[1], 0).iter().all(|x| *x == f16::ZERO));
    }

    #[test]
    fn slide_releases_blocks_behind_the_window() {
        let mut c = KvCache::with_window_blocks(sliding_layout(), 8, 3);
        let mut t = BlockTable::new();
        t.reserve(&mut c, 12).unwrap();
        assert_eq!(c.free_window_blocks(), 0);
        // The window pool is full: growing needs a slide first.
        let e = t.reserve(&mut c, 13).unwrap_err();
        assert!(
            matches!(e, Error::KvCacheFull { needed: 1, free: 0 }),
            "{e}"
        );
        // A query at 12 sees 7..=12: block 0 (positions 0..4) is out, block 1 (4..8) is not.
        t.slide(&mut c, 12);
        assert_eq!(t.window[0], RELEASED);
        assert_eq!((t.window_start(4), t.window_blocks_held()), (4, 2));
        t.reserve(&mut c, 13).unwrap();
        assert_eq!(
            (t.blocks.len(), t.window.len(), c.free_window_blocks()),
            (4, 4, 0)
        );
        // Sharing and releasing skip the released entries.
        let mut f = t.fork(&mut c);
        assert_eq!(c.window_refcount(t.window[1]), 2);
        f.release(&mut c);
        t.truncate(&mut c, 8);
        assert_eq!((t.window.len(), c.free_window_blocks()), (2, 2));
        t.release(&mut c);
        assert_eq!((c.free_blocks(), c.free_window_blocks()), (8, 3));
    }
}
