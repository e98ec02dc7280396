//! The paged KV cache: pools of fixed-size blocks sized by a memory budget,
//! per-sequence block tables, and reference counts so that sequences can share
//! the blocks of a common prefix.
//!
//! Keys and values are stored as f16 by default (as llama.cpp does). Within a
//! block each KV head has its own contiguous part: values as rows
//! (`[block_size, head_dim]`) and keys transposed (`[head_dim, block_size]`), so
//! that attention computes a query's scores against a whole block with one
//! vector multiply-add per element of the head.
//!
//! A quantized cache ([`KvType::Q8_0`], [`KvType::Q4_0`]) quantizes each
//! position's head of keys and of values in groups of 32 values with one f16
//! scale each (GGUF's blocks, as llama.cpp does): a scale shared across
//! positions could not be written one position at a time. Keys and values
//! are laid out by group (see [`key_layout`] and [`value_layout`]): a chunk
//! of positions' scales are contiguous, and keys interleave for integer dot
//! products with a quantized query. Before quantizing,
//! keys and values are turned by a Hadamard rotation (see [`rotation`]), as
//! llama.cpp does: a few large channels no longer set the scale of their
//! whole group, and Q4_0 loses far less.

use half::f16;

use crate::quant::{self, GgmlType};
use crate::{Error, Result};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A window-pool table entry whose block slid out of the window and was released.
pub const RELEASED: u32 = u32::MAX;

/// Where a quantized cache's keys are, within one head of one block.
///
/// For each group of 32 dimensions: the block's `block_size` f16 scales, then
/// the values by quads of dimensions, `[quad][slot][4]`, so that the same
/// four dimensions of consecutive slots are contiguous (sixteen slots' make
/// one 64-byte integer dot product). Q8_0 stores `q + 128` in a byte; Q4_0
/// keeps GGUF's nibbles (`q + 8`): the byte of quad `p < 4` holds dimension
/// `4p + t` in its low nibble and `16 + 4p + t` in its high one.
pub mod key_layout {
    use super::KvType;

    /// Dimensions per scale.
    pub const GROUP: usize = 32;

    /// Bytes of one group of dimensions in one head of one block.
    pub fn group_bytes(ty: KvType, block_size: usize) -> usize {
        block_size * (2 + value_bytes(ty))
    }

    /// Bytes of a group's values at one slot.
    pub fn value_bytes(ty: KvType) -> usize {
        match ty {
            KvType::Q4_0 => GROUP / 2,
            _ => GROUP,
        }
    }

    /// Offset of quad `quad`'s bytes at `slot` within a group (after its scales).
    pub fn quad_at(block_size: usize, quad: usize, slot: usize) -> usize {
        2 * block_size + (quad * block_size + slot) * 4
    }
}

/// The rotation a quantized cache applies to keys and values before it
/// quantizes them: each block of a head by the normalized Walsh-Hadamard
/// transform, which is orthonormal and its own inverse. Queries are turned
/// by the same blocks, so scores do not change; the weighted sum of turned
/// values is turned back.
pub mod rotation {
    /// Blocks keys are turned in: the largest power of two from 64 up that
    /// divides the head (none when 64 does not).
    pub fn key_block(head_dim: usize) -> Option<usize> {
        let mut n = 64;
        if !head_dim.is_multiple_of(n) {
            return None;
        }
        while head_dim.is_multiple_of(2 * n) {
            n *= 2;
        }
        Some(n)
    }

    /// Blocks values are turned in: 64 (none when 64 does not divide the head).
    pub fn value_block(head_dim: usize) -> Option<usize> {
        head_dim.is_multiple_of(64).then_some(64)
    }

    /// Turns each block of `block` values of `x` (a power of two).
    pub fn apply(x: &mut [f32], block: usize) {
        let scale = 1.0 / (block as f32).sqrt();
        for b in x.chunks_exact_mut(block) {
            let mut h = 1;
            while h < block {
                for i in (0..block).step_by(2 * h) {
                    for j in i..i + h {
                        let (p, q) = (b[j], b[j + h]);
                        b[j] = p + q;
                        b[j + h] = p - q;
                    }
                }
                h *= 2;
            }
            for v in b.iter_mut() {
                *v *= scale;
            }
        }
    }

    /// `x` turned as `block` says, in `buf` (`x` itself without a block).
    pub fn turned<'a>(x: &'a [f32], block: Option<usize>, buf: &'a mut [f32]) -> &'a [f32] {
        match block {
            None => x,
            Some(n) => {
                let buf = &mut buf[..x.len()];
                buf.copy_from_slice(x);
                apply(buf, n);
                buf
            }
        }
    }
}

/// Where a quantized cache's values are, within one head of one block: for
/// each group of 32 values, the block's `block_size` f16 scales, then each
/// slot's values as GGUF stores them (Q8_0: 32 bytes; Q4_0: 16 bytes, value
/// `i` in the low nibble of byte `i` and `16 + i` in its high one).
pub mod value_layout {
    use super::{key_layout, KvType};

    /// Bytes of one group in one head of one block (as the keys').
    pub fn group_bytes(ty: KvType, block_size: usize) -> usize {
        key_layout::group_bytes(ty, block_size)
    }

    /// Offset of `slot`'s values within a group (after its scales).
    pub fn values_at(ty: KvType, block_size: usize, slot: usize) -> usize {
        2 * block_size + slot * key_layout::value_bytes(ty)
    }
}

/// Most values in one head of a quantized cache.
pub const MAX_QUANT_HEAD: usize = 512;

/// How keys and values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    /// Half floats: exact for what the model computes in f16.
    #[default]
    F16,
    /// 8-bit values with one f16 scale per 32 (34 bytes per 32 values).
    Q8_0,
    /// 4-bit values with one f16 scale per 32 (18 bytes per 32 values).
    Q4_0,
}

impl KvType {
    /// Every type, by name.
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// The name used in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// The type named `name` (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The GGUF block type of a quantized cache (`None` for f16).
    pub fn block_type(self) -> Option<GgmlType> {
        match self {
            KvType::F16 => None,
            KvType::Q8_0 => Some(GgmlType::Q8_0),
            KvType::Q4_0 => Some(GgmlType::Q4_0),
        }
    }

    /// Bytes one head of `head_dim` keys (or values) takes, or an error when
    /// a quantized type cannot hold that width.
    pub fn row_bytes(self, head_dim: usize) -> Result<usize> {
        match self.block_type() {
            None => Ok(2 * head_dim),
            Some(t) => t
                .row_bytes(head_dim)
                .filter(|_| head_dim <= MAX_QUANT_HEAD)
                .ok_or_else(|| {
                    Error::KvType(format!(
                        "{} stores heads of up to {MAX_QUANT_HEAD} values in blocks of 32; \
                         this model's heads have {head_dim} (use f16)",
                        self.name()
                    ))
                }),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::from_name(s).ok_or_else(|| format!("unknown KV cache type '{s}' (f16, q8_0, q4_0)"))
    }
}

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
    /// How keys and values are stored.
    pub dtype: KvType,
}

impl KvLayout {
    /// Elements of K (or of V) in one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.n_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes of one head's keys (or values) at one position. A quantized
    /// type whose blocks do not divide the head counts as f16 here;
    /// [`KvLayout::check`] refuses it before a cache is made.
    pub fn row_bytes(&self) -> usize {
        self.dtype
            .row_bytes(self.head_dim)
            .unwrap_or(2 * self.head_dim)
    }

    /// Bytes of K (or of V) in one block of one layer.
    pub fn layer_block_bytes(&self) -> usize {
        self.n_kv_heads * self.block_size * self.row_bytes()
    }

    /// Bytes one block of positions costs across all layers, K and V (one
    /// main-pool block plus one window-pool block when layers slide).
    pub fn block_bytes(&self) -> usize {
        2 * self.n_layers * self.layer_block_bytes()
    }

    /// Whether the storage type can hold this layout's heads.
    pub fn check(&self) -> Result<()> {
        self.dtype.row_bytes(self.head_dim).map(|_| ())
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
        // K and V per block of one layer.
        let layer_block = 2 * self.layer_block_bytes();
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

/// Keys and values of one pool in host memory, per layer in the pool:
/// `n_blocks` blocks of [`KvLayout::layer_block_bytes`] each.
enum HostPool {
    /// f16 keys (transposed) and values.
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
    /// Rows of quantized blocks.
    Quant { k: Vec<Vec<u8>>, v: Vec<Vec<u8>> },
}

impl HostPool {
    fn new(layout: &KvLayout, n_layers: usize, n_blocks: usize) -> Self {
        match layout.dtype {
            KvType::F16 => {
                let per_layer = n_blocks * layout.block_elems();
                let zeros = |_| vec![f16::ZERO; per_layer];
                HostPool::F16 {
                    k: (0..n_layers).map(zeros).collect(),
                    v: (0..n_layers).map(zeros).collect(),
                }
            }
            _ => {
                let per_layer = n_blocks * layout.layer_block_bytes();
                let zeros = |_| vec![0u8; per_layer];
                HostPool::Quant {
                    k: (0..n_layers).map(zeros).collect(),
                    v: (0..n_layers).map(zeros).collect(),
                }
            }
        }
    }

    /// Copies block `src` of every layer into block `dst`.
    fn copy_block(&mut self, layout: &KvLayout, src: u32, dst: u32) {
        fn copy<T: Copy>(layers: &mut [Vec<T>], per_block: usize, src: u32, dst: u32) {
            let (s, d) = (src as usize * per_block, dst as usize * per_block);
            for data in layers {
                data.copy_within(s..s + per_block, d);
            }
        }
        match self {
            HostPool::F16 { k, v } => {
                copy(k, layout.block_elems(), src, dst);
                copy(v, layout.block_elems(), src, dst);
            }
            HostPool::Quant { k, v } => {
                copy(k, layout.layer_block_bytes(), src, dst);
                copy(v, layout.layer_block_bytes(), src, dst);
            }
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
    /// If `n_blocks` is zero, either count exceeds `u32::MAX - 1`, the layout
    /// names a sliding layer beyond `n_layers`, or its storage type cannot
    /// hold its heads ([`KvLayout::check`] says so as an error).
    pub fn with_window_blocks(layout: KvLayout, n_blocks: usize, n_window_blocks: usize) -> Self {
        let (n_main, n_window) = Self::layers_per_pool(layout);
        let window_blocks = if n_window > 0 { n_window_blocks } else { 0 };
        let data = KvData::Host(
            HostPool::new(&layout, n_main, n_blocks),
            HostPool::new(&layout, n_window, window_blocks),
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
        if let Err(e) = layout.check() {
            panic!("{e}");
        }
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
        match &mut self.data {
            KvData::Host(main, _) => main.copy_block(&self.layout, src, dst),
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
        let slot_in_block = pos % l.block_size;
        match pool {
            HostPool::F16 { k: pk, v: pv } => {
                let base = block as usize * l.block_elems();
                for h in 0..l.n_kv_heads {
                    let head = base + h * l.block_size * l.head_dim;
                    let src = h * l.head_dim..(h + 1) * l.head_dim;
                    let keys = pk[slot][head + slot_in_block..].iter_mut();
                    for (d, s) in keys.step_by(l.block_size).zip(&k[src.clone()]) {
                        *d = f16::from_f32(*s);
                    }
                    let dst = head + slot_in_block * l.head_dim;
                    for (d, s) in pv[slot][dst..dst + l.head_dim].iter_mut().zip(&v[src]) {
                        *d = f16::from_f32(*s);
                    }
                }
            }
            HostPool::Quant { k: pk, v: pv } => {
                let ty = l.dtype.block_type().expect("a quantized type");
                let rb = l.row_bytes();
                let (kb, vb) = (
                    rotation::key_block(l.head_dim),
                    rotation::value_block(l.head_dim),
                );
                let mut row = [0u8; MAX_QUANT_HEAD / 32 * 34];
                let row = &mut row[..rb];
                let mut buf = [0f32; MAX_QUANT_HEAD];
                for h in 0..l.n_kv_heads {
                    let head = (block as usize * l.n_kv_heads + h) * l.block_size;
                    let src = h * l.head_dim..(h + 1) * l.head_dim;
                    let vt = rotation::turned(&v[src.clone()], vb, &mut buf);
                    quant::quantize_row(ty, vt, row);
                    let vals = &mut pv[slot][head * rb..(head + l.block_size) * rb];
                    scatter_value(l.dtype, l.block_size, slot_in_block, row, vals);
                    let kt = rotation::turned(&k[src], kb, &mut buf);
                    quant::quantize_row(ty, kt, row);
                    let keys = &mut pk[slot][head * rb..(head + l.block_size) * rb];
                    scatter_key(l.dtype, l.block_size, slot_in_block, row, keys);
                }
            }
        }
    }

    /// The pool that holds `layer`, and the layer's index in it.
    #[inline]
    fn pool(&self, layer: usize) -> (&HostPool, usize) {
        let (in_window, slot) = self.slots[layer];
        let (main, window) = self.host();
        (if in_window { window } else { main }, slot)
    }

    /// Keys of one head in one block of an f16 cache's `layer`, transposed:
    /// `[head_dim, block_size]`.
    ///
    /// # Panics
    /// If the cache is quantized.
    pub fn k_block(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        match self.pool(layer) {
            (HostPool::F16 { k, .. }, slot) => self.head_slice(&k[slot], block, head),
            _ => panic!("f16 keys read from a {} KV cache", self.layout.dtype),
        }
    }

    /// V rows of one head in one block of an f16 cache's `layer`:
    /// `[block_size, head_dim]`.
    ///
    /// # Panics
    /// If the cache is quantized.
    pub fn v_block(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        match self.pool(layer) {
            (HostPool::F16 { v, .. }, slot) => self.head_slice(&v[slot], block, head),
            _ => panic!("f16 values read from a {} KV cache", self.layout.dtype),
        }
    }

    /// Keys of one head in one block of a quantized cache's `layer`, as
    /// [`key_layout`] says (`block_size` times [`KvLayout::row_bytes`]).
    ///
    /// # Panics
    /// If the cache is f16.
    #[inline]
    pub fn k_rows(&self, layer: usize, block: u32, head: usize) -> &[u8] {
        match self.pool(layer) {
            (HostPool::Quant { k, .. }, slot) => self.head_rows(&k[slot], block, head),
            _ => panic!("quantized keys read from an f16 KV cache"),
        }
    }

    /// Values of one head in one block of a quantized cache's `layer`, as
    /// [`value_layout`] says (`block_size` times [`KvLayout::row_bytes`]).
    #[inline]
    pub fn v_rows(&self, layer: usize, block: u32, head: usize) -> &[u8] {
        match self.pool(layer) {
            (HostPool::Quant { v, .. }, slot) => self.head_rows(&v[slot], block, head),
            _ => panic!("quantized values read from an f16 KV cache"),
        }
    }

    /// The key and value of one head at slot `slot` of `block`, as f32: what
    /// the storage type kept of them (turned back by the [`rotation`] for a
    /// quantized cache).
    pub fn read(
        &self,
        layer: usize,
        block: u32,
        head: usize,
        slot: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) {
        let l = self.layout;
        let (bs, hd) = (l.block_size, l.head_dim);
        match l.dtype.block_type() {
            None => {
                let kb = self.k_block(layer, block, head);
                for (d, k) in k[..hd].iter_mut().enumerate() {
                    *k = kb[d * bs + slot].to_f32();
                }
                let vb = &self.v_block(layer, block, head)[slot * hd..(slot + 1) * hd];
                quant::f16_to_f32_slice(vb, &mut v[..hd]);
            }
            Some(ty) => {
                let rb = l.row_bytes();
                let mut row = [0u8; MAX_QUANT_HEAD / 32 * 34];
                gather_key(
                    l.dtype,
                    bs,
                    slot,
                    self.k_rows(layer, block, head),
                    &mut row[..rb],
                );
                quant::dequantize_row(ty, &row[..rb], &mut k[..hd]);
                gather_value(
                    l.dtype,
                    bs,
                    slot,
                    self.v_rows(layer, block, head),
                    &mut row[..rb],
                );
                quant::dequantize_row(ty, &row[..rb], &mut v[..hd]);
                if let Some(n) = rotation::key_block(hd) {
                    rotation::apply(&mut k[..hd], n);
                }
                if let Some(n) = rotation::value_block(hd) {
                    rotation::apply(&mut v[..hd], n);
                }
            }
        }
    }

    fn head_slice<'a>(&self, data: &'a [f16], block: u32, head: usize) -> &'a [f16] {
        let l = self.layout;
        let start = block as usize * l.block_elems() + head * l.block_size * l.head_dim;
        &data[start..start + l.block_size * l.head_dim]
    }

    fn head_rows<'a>(&self, data: &'a [u8], block: u32, head: usize) -> &'a [u8] {
        let l = self.layout;
        let n = l.block_size * l.row_bytes();
        let start = (block as usize * l.n_kv_heads + head) * n;
        &data[start..start + n]
    }
}

/// Stores one position's keys (`row`: a GGUF row of `ty`) at `slot` of a
/// head's block (`keys`), as [`key_layout`] says.
fn scatter_key(ty: KvType, bs: usize, slot: usize, row: &[u8], keys: &mut [u8]) {
    let (gb, vb) = (key_layout::group_bytes(ty, bs), key_layout::value_bytes(ty));
    for (g, blk) in row.chunks_exact(2 + vb).enumerate() {
        let group = &mut keys[g * gb..(g + 1) * gb];
        group[2 * slot..2 * slot + 2].copy_from_slice(&blk[..2]);
        for (i, &q) in blk[2..].iter().enumerate() {
            let at = key_layout::quad_at(bs, i / 4, slot) + i % 4;
            // Q8_0 keeps `q + 128` so that it is an unsigned byte.
            group[at] = if ty == KvType::Q8_0 { q ^ 0x80 } else { q };
        }
    }
}

/// The GGUF row of the keys at `slot` ([`scatter_key`] undone).
fn gather_key(ty: KvType, bs: usize, slot: usize, keys: &[u8], row: &mut [u8]) {
    let (gb, vb) = (key_layout::group_bytes(ty, bs), key_layout::value_bytes(ty));
    for (g, blk) in row.chunks_exact_mut(2 + vb).enumerate() {
        let group = &keys[g * gb..(g + 1) * gb];
        blk[..2].copy_from_slice(&group[2 * slot..2 * slot + 2]);
        for (i, q) in blk[2..].iter_mut().enumerate() {
            let b = group[key_layout::quad_at(bs, i / 4, slot) + i % 4];
            *q = if ty == KvType::Q8_0 { b ^ 0x80 } else { b };
        }
    }
}

/// Stores one position's values (`row`: a GGUF row of `ty`) at `slot` of a
/// head's block (`vals`), as [`value_layout`] says.
fn scatter_value(ty: KvType, bs: usize, slot: usize, row: &[u8], vals: &mut [u8]) {
    let (gb, vb) = (
        value_layout::group_bytes(ty, bs),
        key_layout::value_bytes(ty),
    );
    let at = value_layout::values_at(ty, bs, slot);
    for (g, blk) in row.chunks_exact(2 + vb).enumerate() {
        let group = &mut vals[g * gb..(g + 1) * gb];
        group[2 * slot..2 * slot + 2].copy_from_slice(&blk[..2]);
        group[at..at + vb].copy_from_slice(&blk[2..]);
    }
}

/// The GGUF row of the values at `slot` ([`scatter_value`] undone).
fn gather_value(ty: KvType, bs: usize, slot: usize, vals: &[u8], row: &mut [u8]) {
    let (gb, vb) = (
        value_layout::group_bytes(ty, bs),
        key_layout::value_bytes(ty),
    );
    let at = value_layout::values_at(ty, bs, slot);
    for (g, blk) in row.chunks_exact_mut(2 + vb).enumerate() {
        let group = &vals[g * gb..(g + 1) * gb];
        blk[..2].copy_from_slice(&group[2 * slot..2 * slot + 2]);
        blk[2..].copy_from_slice(&group[at..at + vb]);
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
            dtype: KvType::F16,
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

    #[test]
    fn the_rotation_is_orthonormal_and_its_own_inverse() {
        assert_eq!(
            [32, 64, 128, 192, 256].map(rotation::key_block),
            [None, Some(64), Some(128), Some(64), Some(256)]
        );
        assert_eq!(rotation::value_block(256), Some(64));
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
            .collect();
        let mut y = x.clone();
        rotation::apply(&mut y, 128);
        let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm(&y) - norm(&x)).abs() < 1e-4 * norm(&x));
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1.0), "turned");
        rotation::apply(&mut y, 128);
        assert!(y
            .iter()
            .zip(&x)
            .all(|(a, b)| (a - b).abs() < 1e-5 * (1.0 + b.abs())));
    }

    #[test]
    fn quantized_types_keep_keys_and_values_within_their_step() {
        assert_eq!(KvType::from_name("Q8_0"), Some(KvType::Q8_0));
        assert!("q5_0"
            .parse::<KvType>()
            .unwrap_err()
            .contains("f16, q8_0, q4_0"));
        // Q8_0 rounds to within half a step, plus the f16 scale's rounding
        // (2^-11 of up to 127 steps); Q4_0 also clips the largest value of
        // the sign opposite to the group's extreme by up to a whole step.
        for (ty, bytes, step) in [
            (KvType::Q8_0, 34, 0.57 / 127.0),
            (KvType::Q4_0, 18, 1.01 / 8.0),
        ] {
            let l = KvLayout {
                head_dim: 64,
                block_size: 16,
                dtype: ty,
                ..layout()
            };
            // Per 32 values: `bytes`, against 64 for f16.
            assert_eq!(l.block_bytes(), 2 * 2 * 2 * 16 * 2 * bytes);
            assert!(
                l.block_bytes()
                    < KvLayout {
                        dtype: KvType::F16,
                        ..l
                    }
                    .block_bytes()
            );
            let mut c = KvCache::new(l, 4);
            let mut t = BlockTable::new();
            c.allocate().unwrap();
            t.reserve(&mut c, 20).unwrap();
            let k: Vec<f32> = (0..128)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x / 3.0).collect();
            c.write(1, &t, 17, &k, &v);
            let (mut rk, mut rv) = (vec![0.0; 64], vec![0.0; 64]);
            for h in 0..2 {
                c.read(1, t.blocks[1], h, 1, &mut rk, &mut rv);
                // Quantized in the turned basis (a head of 64 turns as one
                // block, keys and values alike): compared there.
                let turn = |x: &[f32]| {
                    let mut x = x.to_vec();
                    rotation::apply(&mut x, 64);
                    x
                };
                let (kt, vt) = (
                    turn(&k[h * 64..(h + 1) * 64]),
                    turn(&v[h * 64..(h + 1) * 64]),
                );
                let (rk, rv) = (turn(&rk), turn(&rv));
                for g in 0..2 {
                    let at = g * 32..(g + 1) * 32;
                    let amax = |x: &[f32]| x.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let (ks, vs) = (amax(&kt[at.clone()]), amax(&vt[at.clone()]));
                    for i in at {
                        assert!((rk[i] - kt[i]).abs() <= ks * step + 1e-5, "{ty} key {i}");
                        assert!((rv[i] - vt[i]).abs() <= vs * step + 1e-5, "{ty} value {i}");
                    }
                }
                let (mut rk, mut rv) = (vec![0.0; 64], vec![0.0; 64]);
                // Another slot and another layer hold nothing.
                c.read(1, t.blocks[1], h, 0, &mut rk, &mut rv);
                assert!(rk.iter().chain(&rv).all(|x| *x == 0.0));
                c.read(0, t.blocks[1], h, 1, &mut rk, &mut rv);
                assert!(rk.iter().chain(&rv).all(|x| *x == 0.0));
            }
            // A prefix copy carries the quantized rows.
            let dst = c.allocate().unwrap();
            c.copy_block(t.blocks[1], dst);
            let (mut ck, mut cv) = (vec![0.0; 64], vec![0.0; 64]);
            c.read(1, dst, 1, 1, &mut ck, &mut cv);
            c.read(1, t.blocks[1], 1, 1, &mut rk, &mut rv);
            assert_eq!((ck, cv), (rk.clone(), rv.clone()));
        }
        let odd = KvLayout {
            head_dim: 48,
            dtype: KvType::Q8_0,
            ..layout()
        };
        let e = odd.check().unwrap_err().to_string();
        assert!(e.contains("48") && e.contains("use f16"), "{e}");
    }
}
