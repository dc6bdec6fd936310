//! A loaded model ready to run: weights + tokenizer + the thread pool its steps run
//! on, and the single-sequence conveniences built on the batched step (`logits`,
//! `Generation`, `perplexity`). The serving scheduler drives `Model::forward` with its
//! own batches and block tables through the same pool.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::kv::{BlockAllocator, KvCache, KvShape};
use crate::model::{LogitsWanted, Model, SeqInput};
use crate::quant::{Kernels, Level};
use crate::sample::{log_softmax, Sampled, Sampler, SamplingParams};
use crate::threads::ThreadPool;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Tokens per KV block (the serving scheduler uses the same size).
pub const BLOCK_SIZE: usize = 16;
/// Prompt tokens per step when a caller feeds a long prompt on its own; bounds the
/// scratch activations (n_batch × n_ff floats).
pub const PROMPT_CHUNK: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Threads for compute; None = physical cores.
    pub n_threads: Option<usize>,
    /// Force a kernel level (tests, bug reports); None = the best this CPU has, as
    /// lowered by EDGELM_KERNEL_LEVEL.
    pub kernel_level: Option<Level>,
    /// Tokens per sequence the caller will run; None = the model's context length.
    /// LongRoPE models (phi3) pick their RoPE factors by it, as llama.cpp does.
    pub n_ctx: Option<usize>,
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pool: ThreadPool,
    pub n_threads: usize,
    pub kernels: &'static Kernels,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Engine> {
        let file = Gguf::open(path)?;
        Self::from_gguf(file, opts)
    }

    pub fn from_gguf(file: Arc<Gguf>, opts: &LoadOptions) -> Result<Engine> {
        let model = Model::load_with(Arc::clone(&file), opts.n_ctx)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.n_vocab() != model.cfg.n_vocab {
            return Err(Error::model(format!(
                "tokenizer has {} tokens but the output layer has {} rows",
                tokenizer.n_vocab(),
                model.cfg.n_vocab
            )));
        }
        let n_threads = match opts.n_threads {
            Some(0) => return Err(Error::invalid("n_threads must be at least 1")),
            Some(n) => n,
            None => physical_cores(),
        };
        let pool = ThreadPool::new(n_threads)
            .map_err(|e| Error::model(format!("cannot start {n_threads} compute threads: {e}")))?;
        let kernels = match opts.kernel_level {
            None => Kernels::detect(),
            Some(l) => Kernels::for_level(l).ok_or_else(|| {
                let have: Vec<&str> = Kernels::available().iter().map(|l| l.name()).collect();
                Error::invalid(format!("this CPU cannot run {} kernels (available: {})", l.name(), have.join(", ")))
            })?,
        };
        Ok(Engine { model, tokenizer, pool, n_threads, kernels })
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// One model step on this engine's threads.
    pub fn forward(&self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<crate::model::StepLogits> {
        self.model.forward(&self.pool, self.kernels, kv, seqs)
    }

    pub fn kv_shape(&self, n_blocks: usize) -> KvShape {
        let c = &self.model.cfg;
        KvShape { n_layer: c.n_layer, kv_dim_k: c.kv_dim_k(), kv_dim_v: c.kv_dim_v(), block_size: BLOCK_SIZE, n_blocks }
    }

    fn check_len(&self, n: usize) -> Result<()> {
        let max = self.model.cfg.n_ctx_train;
        if n > max {
            return Err(Error::invalid(format!("{n} tokens exceed the model's context length of {max}")));
        }
        Ok(())
    }

    /// Logits for every position of one sequence: `[ids.len()][n_vocab]`, row-major.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.check_len(ids.len())?;
        let mut kv = KvCache::new(self.kv_shape(ids.len().div_ceil(BLOCK_SIZE)))?;
        let table: Vec<u32> = (0..kv.shape.n_blocks as u32).collect();
        let mut out = Vec::with_capacity(ids.len() * self.model.cfg.n_vocab);
        for (ci, chunk) in ids.chunks(PROMPT_CHUNK).enumerate() {
            let seq = SeqInput::new(chunk, ci * PROMPT_CHUNK, &table, LogitsWanted::All);
            let r = self.forward(&mut kv, &[seq])?;
            out.extend_from_slice(&r.data);
        }
        Ok(out)
    }

    /// One pooled, unnormalized vector per sequence (`[seqs.len()][n_embd]`), the
    /// sequences run as one batch on this engine's threads (see `Model::embed`).
    pub fn embed(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>> {
        let refs: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
        self.model.embed(&self.pool, self.kernels, &refs)
    }

    /// Every MoE layer's routing for one sequence run as a single prompt (tests: the
    /// router against a float64 reference). Empty for dense models.
    pub fn moe_trace(&self, ids: &[u32]) -> Result<Vec<crate::model::moe::Trace>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.check_len(ids.len())?;
        let mut kv = KvCache::new(self.kv_shape(ids.len().div_ceil(BLOCK_SIZE)))?;
        let table: Vec<u32> = (0..kv.shape.n_blocks as u32).collect();
        let seq = SeqInput::new(ids, 0, &table, LogitsWanted::None);
        let mut trace = Vec::new();
        self.model.forward_traced(&self.pool, self.kernels, &mut kv, &[seq], false, Some(&mut trace))?;
        Ok(trace)
    }

    /// Perplexity the way llama-perplexity computes it: the text is cut into chunks of
    /// `n_ctx` tokens, each evaluated from an empty cache with BOS (when the tokenizer
    /// adds one) replacing its first token, and only the second half of each chunk is
    /// scored. Returns (ppl, per-chunk negative log-likelihood sums, tokens scored).
    pub fn perplexity(&self, ids: &[u32], n_ctx: usize) -> Result<(f64, Vec<f64>, usize)> {
        if n_ctx < 16 {
            return Err(Error::invalid("perplexity needs n_ctx ≥ 16"));
        }
        let n_chunks = ids.len() / n_ctx;
        if n_chunks == 0 {
            return Err(Error::invalid(format!(
                "text has {} tokens; perplexity needs at least n_ctx = {n_ctx}",
                ids.len()
            )));
        }
        let first = n_ctx / 2;
        let mut nll = 0f64;
        let mut count = 0usize;
        let mut per_chunk = Vec::with_capacity(n_chunks);
        for c in 0..n_chunks {
            let mut chunk = ids[c * n_ctx..(c + 1) * n_ctx].to_vec();
            if self.tokenizer.add_bos() {
                if let Some(bos) = self.tokenizer.bos() {
                    chunk[0] = bos;
                }
            }
            let logits = self.logits(&chunk)?;
            let nv = self.model.cfg.n_vocab;
            let mut chunk_nll = 0f64;
            for i in first..n_ctx - 1 {
                let lp = log_softmax(&logits[i * nv..(i + 1) * nv]);
                chunk_nll -= lp[ids[c * n_ctx + i + 1] as usize] as f64;
                count += 1;
            }
            nll += chunk_nll;
            per_chunk.push(chunk_nll);
        }
        Ok(((nll / count as f64).exp(), per_chunk, count))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a caller's stop token.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// When a generated sequence ends: the one rule, for `Generation` and for the serving
/// executor (`batch::Executor`). What it cannot see stays with the caller: stop
/// strings (text), a grammar that is complete, a client that went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopRule {
    /// Tokens to generate at most (the caller folds the room left in the context in).
    pub max_tokens: usize,
    /// Extra token ids that end generation (besides the model's end-of-generation ones).
    pub stop_tokens: Vec<u32>,
    /// Stop at end-of-generation tokens (false lets a caller run past EOS).
    pub stop_at_eog: bool,
}

impl StopRule {
    /// Never stops (tests and benchmarks that step a sequence by hand).
    pub fn never() -> StopRule {
        StopRule { max_tokens: usize::MAX, stop_tokens: Vec::new(), stop_at_eog: false }
    }

    /// Whether `token`, the `n_generated`-th generated token, ends the sequence. A stop
    /// token ends it without its text; the last of `max_tokens` ends it with.
    pub fn check(&self, tokenizer: &Tokenizer, token: u32, n_generated: usize) -> Option<FinishReason> {
        if (self.stop_at_eog && tokenizer.is_eog(token)) || self.stop_tokens.contains(&token) {
            Some(FinishReason::Stop)
        } else if n_generated >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenParams {
    pub sampling: SamplingParams,
    pub stop: StopRule,
}

#[derive(Clone, Debug)]
pub struct GenToken {
    pub sampled: Sampled,
    /// Text that this token completes (may be empty when it ends mid-character).
    pub text: String,
    /// Set on the last token of the generation.
    pub finish: Option<FinishReason>,
}

/// One sequence generating on its own cache.
pub struct Generation {
    engine: Arc<Engine>,
    kv: KvCache,
    alloc: BlockAllocator,
    table: Vec<u32>,
    history: Vec<u32>,
    /// Tokens of `history` already in the cache.
    n_past: usize,
    n_generated: usize,
    /// Where the penalties' window may start (0, or the prompt's length).
    penalty_from: usize,
    sampler: Sampler,
    /// `params.stop` with the room in the context folded into its `max_tokens`.
    stop: StopRule,
    decoder: StreamDecoder,
    done: bool,
}

impl Generation {
    pub fn new(engine: Arc<Engine>, prompt: &[u32], params: GenParams) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty; give at least one token"));
        }
        let cfg = &engine.model.cfg;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.n_vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is out of range (vocabulary has {} tokens)",
                cfg.n_vocab
            )));
        }
        engine.check_len(prompt.len())?;
        let n_ctx = prompt.len().saturating_add(params.stop.max_tokens).min(cfg.n_ctx_train);
        let n_blocks = n_ctx.div_ceil(BLOCK_SIZE);
        let kv = KvCache::new(engine.kv_shape(n_blocks))?;
        let penalty_from = if params.sampling.penalize_prompt { 0 } else { prompt.len() };
        let sampler = Sampler::new(params.sampling)?;
        // A full context still gives the one token its last position's logits make.
        let mut stop = params.stop;
        if stop.max_tokens > 0 {
            stop.max_tokens = stop.max_tokens.min((cfg.n_ctx_train - prompt.len()).max(1));
        }
        Ok(Generation {
            engine,
            kv,
            alloc: BlockAllocator::new(n_blocks),
            table: Vec::new(),
            history: prompt.to_vec(),
            n_past: 0,
            n_generated: 0,
            penalty_from,
            sampler,
            stop,
            decoder: StreamDecoder::new(),
            done: false,
        })
    }

    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Produce the next token, or None once finished.
    pub fn next_token(&mut self) -> Result<Option<GenToken>> {
        if self.done {
            return Ok(None);
        }
        if self.stop.max_tokens == 0 {
            self.done = true;
            return Ok(None);
        }
        let engine = Arc::clone(&self.engine);
        // Feed everything not yet in the cache (the prompt in chunks, then one token).
        let mut logits = Vec::new();
        while self.n_past < self.history.len() {
            let end = (self.n_past + PROMPT_CHUNK).min(self.history.len());
            self.alloc.ensure(&mut self.table, end, BLOCK_SIZE)?;
            let wanted = if end == self.history.len() { LogitsWanted::Last } else { LogitsWanted::None };
            let seq = SeqInput::new(&self.history[self.n_past..end], self.n_past, &self.table, wanted);
            let kv = &mut self.kv;
            let r = engine.forward(kv, &[seq])?;
            self.n_past = end;
            logits = r.data;
        }
        let sampled = self.sampler.sample(&logits, &self.history[self.penalty_from..]);
        let tok = sampled.token;
        self.n_generated += 1;
        let tk = &engine.tokenizer;
        let finish = self.stop.check(tk, tok, self.n_generated);
        let mut text = String::new();
        if finish != Some(FinishReason::Stop) {
            self.history.push(tok);
            text = self.decoder.push(tk, tok);
        }
        if finish.is_some() {
            text.push_str(&self.decoder.finish());
            self.done = true;
        }
        Ok(Some(GenToken { sampled, text, finish }))
    }
}

/// Physical cores (hyper-threads share execution units; decode gains nothing from them).
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(target_os = "linux")]
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        let mut cores = std::collections::HashSet::new();
        let (mut phys, mut core) = (None, None);
        for line in info.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                    cores.insert((p, c));
                }
                continue;
            }
            let mut kv = line.splitn(2, ':').map(str::trim);
            match (kv.next(), kv.next()) {
                (Some("physical id"), Some(v)) => phys = Some(v.to_owned()),
                (Some("core id"), Some(v)) => core = Some(v.to_owned()),
                _ => {}
            }
        }
        if !cores.is_empty() {
            return cores.len().min(logical);
        }
    }
    logical
}

/// Timings of the llama-bench style measures: `pp` = one step over `n_prompt` tokens
/// (logits for the last only), `tg` = `n_gen` single-token steps from an empty cache.
#[derive(Clone, Copy, Debug)]
pub struct BenchTimes {
    pub pp_s: f64,
    pub tg_s: f64,
}

impl Engine {
    pub fn bench(&self, n_prompt: usize, n_gen: usize) -> Result<BenchTimes> {
        let n_vocab = self.model.cfg.n_vocab as u32;
        // Deterministic, varied token ids (content does not change the work).
        let ids: Vec<u32> = (0..n_prompt.max(n_gen) as u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
        let n_blocks = n_prompt.max(n_gen).max(1).div_ceil(BLOCK_SIZE);
        let table: Vec<u32> = (0..n_blocks as u32).collect();
        let mut pp_s = 0.0;
        if n_prompt > 0 {
            let mut kv = KvCache::new(self.kv_shape(n_blocks))?;
            let t0 = std::time::Instant::now();
            for (ci, chunk) in ids[..n_prompt].chunks(PROMPT_CHUNK).enumerate() {
                let seq = SeqInput::new(chunk, ci * PROMPT_CHUNK, &table, LogitsWanted::Last);
                self.forward(&mut kv, &[seq])?;
            }
            pp_s = t0.elapsed().as_secs_f64();
        }
        let mut tg_s = 0.0;
        if n_gen > 0 {
            let mut kv = KvCache::new(self.kv_shape(n_blocks))?;
            let t0 = std::time::Instant::now();
            for i in 0..n_gen {
                let seq = SeqInput::new(&ids[i..i + 1], i, &table, LogitsWanted::Last);
                self.forward(&mut kv, &[seq])?;
            }
            tg_s = t0.elapsed().as_secs_f64();
        }
        Ok(BenchTimes { pp_s, tg_s })
    }
}
