//! Embeddings: one vector per sequence, pooled from the last hidden states as the
//! file's `pooling_type` says (llama.cpp's `build_pooling`):
//!
//! - encoders (bert.rs): the last layer's output, no final norm;
//! - decoders (a `qwen3` file with a pooling type, such as Qwen3-Embedding): the
//!   output of the final RMSNorm, causal attention over a scratch KV cache.
//!
//! Pooling: mean (every token's state × 1/len, summed), CLS (the first token's), last
//! (the last token's). The vectors are not normalized here: the APIs normalize (or,
//! Ollama's legacy `/api/embeddings`, do not).

use super::{ops, LogitsWanted, Model, Op, Pooling, SeqInput};
use crate::engine::BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvShape};
use crate::quant::Kernels;
use crate::threads::ThreadPool;

impl Model {
    /// The pooling this model embeds with, or why it cannot embed.
    pub fn embedding_pooling(&self) -> Result<Pooling> {
        let arch = self.cfg.arch.name();
        match self.cfg.pooling {
            Some(p @ (Pooling::Mean | Pooling::Cls | Pooling::Last)) => Ok(p),
            Some(Pooling::Rank) => Err(Error::invalid(format!(
                "this {arch} model is a reranker (pooling_type rank): it scores pairs, it does not embed"
            ))),
            Some(Pooling::None) if self.encoder.is_some() => Err(Error::invalid(format!(
                "this {arch} model has pooling_type none (one vector per token); the embedding APIs return one vector per \
                 input: use a file converted with its pooling layer (sentence-transformers' modules.json)"
            ))),
            None if self.encoder.is_some() => Err(Error::invalid(format!(
                "this {arch} model has no {arch}.pooling_type (one vector per token); the embedding APIs return one vector \
                 per input: use a file converted with its pooling layer (sentence-transformers' modules.json)"
            ))),
            _ => Err(Error::invalid(format!(
                "this {arch} model is a text generation model: its file has no {arch}.pooling_type, so it has no embeddings"
            ))),
        }
    }

    /// Whether this model embeds (an encoder, or a decoder whose file sets a pooling type).
    pub fn is_embedding(&self) -> bool {
        self.encoder.is_some() || self.cfg.pooling.is_some()
    }

    /// One pooled vector per sequence: `[seqs.len()][n_embd]`, row-major. All
    /// sequences run as one batch; each must be non-empty and fit the context. A
    /// sequence's vector does not depend on what else shares the batch.
    pub fn embed(&self, pool: &ThreadPool, kern: &Kernels, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let pooling = self.embedding_pooling()?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let e = self.cfg.n_embd;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        if self.encoder.is_some() {
            let h = self.encode(pool, kern, seqs)?;
            return Ok(pool_rows(pooling, &h, &lens, e));
        }

        // A decoder: the layers over a scratch cache, then the final norm of the rows
        // the pooling reads.
        let cfg = &self.cfg;
        for s in seqs {
            if s.is_empty() {
                return Err(Error::invalid("an input has no tokens; give at least one"));
            }
            if s.len() > cfg.n_ctx_train {
                return Err(Error::invalid(format!(
                    "{} tokens exceed the model's context length of {}",
                    s.len(),
                    cfg.n_ctx_train
                )));
            }
        }
        let blocks: Vec<usize> = lens.iter().map(|n| n.div_ceil(BLOCK_SIZE)).collect();
        let shape = KvShape {
            n_layer: cfg.n_layer,
            kv_dim_k: cfg.kv_dim_k(),
            kv_dim_v: cfg.kv_dim_v(),
            block_size: BLOCK_SIZE,
            n_blocks: blocks.iter().sum(),
        };
        let mut kv = KvCache::new(shape)?;
        let mut next = 0u32;
        let tables: Vec<Vec<u32>> = blocks
            .iter()
            .map(|&nb| {
                let t = (next..next + nb as u32).collect();
                next += nb as u32;
                t
            })
            .collect();
        let inputs: Vec<SeqInput<'_>> =
            seqs.iter().zip(&tables).map(|(s, t)| SeqInput::new(s, 0, t, LogitsWanted::None)).collect();
        let x = self.run_layers(pool, kern, &mut kv, &inputs, true, None)?;
        // Only the rows the pooling reads go through the final norm.
        let mut starts = Vec::with_capacity(lens.len());
        let mut t0 = 0;
        for &n in &lens {
            starts.push(t0);
            t0 += n;
        }
        let (picked, picked_lens): (Vec<usize>, Vec<usize>) = match pooling {
            Pooling::Mean => ((0..t0).collect(), lens.clone()),
            Pooling::Cls => (starts, vec![1; lens.len()]),
            _ => (starts.iter().zip(&lens).map(|(&t, &n)| t + n - 1).collect(), vec![1; lens.len()]),
        };
        let mut xs = vec![0f32; picked.len() * e];
        for (j, &t) in picked.iter().enumerate() {
            xs[j * e..(j + 1) * e].copy_from_slice(&x[t * e..(t + 1) * e]);
        }
        let mut hs = vec![0f32; xs.len()];
        self.profile.time(Op::Norm, || ops::rms_norm_rows(pool, &xs, &mut hs, &self.output_norm, e, cfg.rms_eps));
        // The picked rows are exactly what the pooling reads.
        let pooling = if pooling == Pooling::Mean { Pooling::Mean } else { Pooling::Cls };
        Ok(pool_rows(pooling, &hs, &picked_lens, e))
    }
}

/// Pool `h` (`[Σ lens][e]`, sequences in order) into `[lens.len()][e]`.
fn pool_rows(pooling: Pooling, h: &[f32], lens: &[usize], e: usize) -> Vec<f32> {
    let mut out = vec![0f32; lens.len() * e];
    let mut t0 = 0;
    for (s, &n) in lens.iter().enumerate() {
        let dst = &mut out[s * e..(s + 1) * e];
        match pooling {
            Pooling::Mean => {
                // ggml: the rows times a [1/n] column, summed in row order.
                let inv = 1.0 / n as f32;
                for t in t0..t0 + n {
                    dst.iter_mut().zip(&h[t * e..(t + 1) * e]).for_each(|(a, &b)| *a += b * inv);
                }
            }
            Pooling::Cls => dst.copy_from_slice(&h[t0 * e..(t0 + 1) * e]),
            _ => dst.copy_from_slice(&h[(t0 + n - 1) * e..(t0 + n) * e]),
        }
        t0 += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reads_the_right_rows() {
        // Two sequences (2 and 3 rows) of width 2.
        let h = [1.0, 2.0, 3.0, 4.0, /* seq 1 */ 10.0, 0.0, 20.0, 0.0, 30.0, 3.0];
        assert_eq!(pool_rows(Pooling::Mean, &h, &[2, 3], 2), [2.0, 3.0, 20.0, 1.0]);
        assert_eq!(pool_rows(Pooling::Cls, &h, &[2, 3], 2), [1.0, 2.0, 10.0, 0.0]);
        assert_eq!(pool_rows(Pooling::Last, &h, &[2, 3], 2), [3.0, 4.0, 30.0, 3.0]);
    }
}
