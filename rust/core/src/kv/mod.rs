//! Paged KV cache storage.
//!
//! Memory is a pool of fixed-size blocks; a sequence owns an ordered list of block ids
//! (its block table), and position `p` of that sequence lives in block
//! `table[p / block_size]`, slot `p % block_size`. Who owns which block is decided
//! outside (the scheduler, or `BlockAllocator` for single-sequence use); this module
//! only stores and reads.
//!
//! Layout per layer: K as `[n_blocks][block_size][n_head_kv * head_dim]` f16 and V the
//! same with `head_dim_v` — f16 like llama.cpp's default cache type, so attention reads
//! the same rounded values the peer reads. The buffers come zeroed from the allocator
//! (`alloc_zeroed` → fresh mmap'd pages): untouched blocks cost no resident memory
//! and no start-up time.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::mem::HugeF16;
use crate::threads::{Disjoint, ThreadPool};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub n_layer: usize,
    pub kv_dim_k: usize,
    pub kv_dim_v: usize,
    pub block_size: usize,
    pub n_blocks: usize,
}

impl KvShape {
    /// Check a block table can hold `n_pos` positions and names only real blocks.
    pub fn check_table(&self, table: &[u32], n_pos: usize) -> Result<()> {
        let need = n_pos.div_ceil(self.block_size);
        if table.len() < need {
            return Err(Error::invalid(format!(
                "block table has {} blocks but {n_pos} positions need {need} (block size {})",
                table.len(),
                self.block_size
            )));
        }
        if let Some(&b) = table[..need].iter().find(|&&b| b as usize >= self.n_blocks) {
            return Err(Error::invalid(format!(
                "block id {b} is out of range (the cache has {} blocks)",
                self.n_blocks
            )));
        }
        Ok(())
    }
    /// Bytes one token occupies across all layers (K and V).
    pub fn bytes_per_token(&self) -> usize {
        self.n_layer * (self.kv_dim_k + self.kv_dim_v) * 2
    }
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_token() * self.block_size * self.n_blocks
    }
}

pub struct KvCache {
    pub shape: KvShape,
    // Per layer, in 2 MiB pages (crate::mem): touched only as blocks are used.
    k: Vec<HugeF16>,
    v: Vec<HugeF16>,
}

impl KvCache {
    pub fn new(shape: KvShape) -> Result<KvCache> {
        if shape.block_size == 0 || shape.n_blocks == 0 {
            return Err(Error::invalid("KV cache needs at least one block of at least one token"));
        }
        let per_layer_k = shape.n_blocks.checked_mul(shape.block_size).and_then(|t| t.checked_mul(shape.kv_dim_k));
        let per_layer_v = shape.n_blocks.checked_mul(shape.block_size).and_then(|t| t.checked_mul(shape.kv_dim_v));
        let (Some(nk), Some(nv)) = (per_layer_k, per_layer_v) else {
            return Err(Error::invalid("KV cache size overflows"));
        };
        Ok(KvCache {
            shape,
            k: (0..shape.n_layer).map(|_| HugeF16::zeroed(nk)).collect(),
            v: (0..shape.n_layer).map(|_| HugeF16::zeroed(nv)).collect(),
        })
    }

    #[inline]
    fn slot(&self, table: &[u32], pos: usize) -> usize {
        let bs = self.shape.block_size;
        table[pos / bs] as usize * bs + pos % bs
    }

    /// Store one token's K and V rows for `layer` at sequence position `pos`.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let (dk, dv) = (self.shape.kv_dim_k, self.shape.kv_dim_v);
        debug_assert_eq!(k.len(), dk);
        debug_assert_eq!(v.len(), dv);
        let s = self.slot(table, pos);
        for (d, &x) in self.k[layer].as_mut_slice()[s * dk..(s + 1) * dk].iter_mut().zip(k) {
            *d = f16::from_f32(x);
        }
        for (d, &x) in self.v[layer].as_mut_slice()[s * dv..(s + 1) * dv].iter_mut().zip(v) {
            *d = f16::from_f32(x);
        }
    }

    /// K row (all kv heads) at a position.
    #[inline]
    pub fn k_row(&self, layer: usize, table: &[u32], pos: usize) -> &[f16] {
        let dk = self.shape.kv_dim_k;
        let s = self.slot(table, pos);
        &self.k[layer].as_slice()[s * dk..(s + 1) * dk]
    }

    #[inline]
    pub fn v_row(&self, layer: usize, table: &[u32], pos: usize) -> &[f16] {
        let dv = self.shape.kv_dim_v;
        let s = self.slot(table, pos);
        &self.v[layer].as_slice()[s * dv..(s + 1) * dv]
    }

    /// Check a block table can hold `n_pos` positions and names only real blocks.
    pub fn check_table(&self, table: &[u32], n_pos: usize) -> Result<()> {
        self.shape.check_table(table, n_pos)
    }

    /// Carry out `copies` in every layer (the layers spread over `pool`): K and V rows
    /// of positions `c.src_start..+n` (through `c.src_table`) go to `c.dst_start..+n`
    /// (through `c.dst_table`); where `turned(layer, copy)`, each K row goes through
    /// `turn(layer, copy, row)` (f32) on the way. Source and destination blocks never
    /// overlap (`KvCopy::check`, which the caller has run).
    pub fn copy_rows(
        &mut self,
        pool: &ThreadPool,
        copies: &[KvCopy],
        turned: &(dyn Fn(usize, usize) -> bool + Sync),
        turn: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    ) {
        let (dk, dv, bs) = (self.shape.kv_dim_k, self.shape.kv_dim_v, self.shape.block_size);
        let slot = |t: &[u32], p: usize| t[p / bs] as usize * bs + p % bs;
        let ks = Disjoint::new(&mut self.k[..]);
        let vs = Disjoint::new(&mut self.v[..]);
        pool.for_each(self.shape.n_layer, |il| {
            // SAFETY: each task takes its own layer.
            let (k, v) = unsafe { (&mut ks.range_mut(il..il + 1)[0], &mut vs.range_mut(il..il + 1)[0]) };
            let (k, v) = (k.as_mut_slice(), v.as_mut_slice());
            let mut tmp = vec![0f32; dk];
            for (ci, c) in copies.iter().enumerate() {
                let t = turned(il, ci);
                for i in 0..c.n {
                    let (s, d) = (slot(&c.src_table, c.src_start + i), slot(&c.dst_table, c.dst_start + i));
                    if t {
                        k[s * dk..(s + 1) * dk].convert_to_f32_slice(&mut tmp);
                        turn(il, ci, &mut tmp);
                        k[d * dk..(d + 1) * dk].convert_from_f32_slice(&tmp);
                    } else {
                        k.copy_within(s * dk..(s + 1) * dk, d * dk);
                    }
                    v.copy_within(s * dv..(s + 1) * dv, d * dv);
                }
            }
        });
    }
}

/// One run of cached KV entries taken over by another sequence (reuse of a prompt's
/// unchanged part past an early change): positions `src_start..src_start + n` of the
/// block table `src_table` become positions `dst_start..dst_start + n` of `dst_table`,
/// with K turned by RoPE for the distance moved.
#[derive(Clone, Debug)]
pub struct KvCopy {
    pub src_table: Vec<u32>,
    pub src_start: usize,
    pub dst_table: Vec<u32>,
    pub dst_start: usize,
    pub n: usize,
}

impl KvCopy {
    /// Check both tables cover their ranges, and that no slot is both read and written.
    pub fn check(&self, shape: &KvShape) -> Result<()> {
        if self.n == 0 {
            return Err(Error::invalid("a KV copy of 0 positions"));
        }
        shape.check_table(&self.src_table, self.src_start + self.n)?;
        shape.check_table(&self.dst_table, self.dst_start + self.n)?;
        let bs = shape.block_size;
        let blocks = |t: &[u32], a: usize| -> std::collections::HashSet<u32> {
            (a / bs..(a + self.n).div_ceil(bs)).map(|i| t[i]).collect()
        };
        if !blocks(&self.src_table, self.src_start).is_disjoint(&blocks(&self.dst_table, self.dst_start)) {
            return Err(Error::invalid("a KV copy reads and writes the same block"));
        }
        Ok(())
    }
}

/// A trivial free-list allocator for callers that run one sequence at a time
/// (`Model.generate`, perplexity). The serving scheduler has its own, with prefix
/// hashing and LRU eviction.
pub struct BlockAllocator {
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize) -> Self {
        BlockAllocator { free: (0..n_blocks as u32).rev().collect() }
    }
    /// Grow `table` so it holds `n_pos` positions.
    pub fn ensure(&mut self, table: &mut Vec<u32>, n_pos: usize, block_size: usize) -> Result<()> {
        while table.len() * block_size < n_pos {
            let b = self.free.pop().ok_or_else(|| {
                Error::OutOfBlocks(format!(
                    "{n_pos} positions need more than the cache's blocks; raise the context size"
                ))
            })?;
            table.push(b);
        }
        Ok(())
    }
}
