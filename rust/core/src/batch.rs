//! The executor the serving scheduler drives: one shared paged KV cache, the token
//! history, sampler, stop rule and text decoder of every live sequence, and `run`,
//! which carries out one step of the scheduler's plan: forget the sequences that ended,
//! register the new ones, run one batched forward pass over whatever the plan picked
//! (decode tokens of running sequences and prompt chunks of others), sample where
//! asked, and end the sequences whose token stops them (`StopRule`: the end of their
//! text comes with that token, and their state goes at once).
//!
//! Who owns which KV block, what is cached and what runs next is the scheduler's
//! business (Python, `edgelm/serve/scheduler.py`); this module checks what it is
//! handed — sequence ids, ranges, block tables — so a scheduler bug is an error,
//! never a wild write.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cuda::model::{GpuKv, GpuModel};
use crate::cuda::Gpu;
use crate::engine::{Engine, FinishReason, StopRule};
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvCopy, KvShape};
use crate::model::ops::FA_TILE_Q;
use crate::model::{LogitsWanted, SeqInput};
use crate::sample::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::StreamDecoder;

struct Seq {
    history: Vec<u32>,
    n_prompt: usize,
    /// Where the repetition penalties' window may start (0, or n_prompt).
    penalty_from: usize,
    sampler: Sampler,
    stop: StopRule,
    decoder: StreamDecoder,
}

/// One sequence's share of a step: feed `history[start..end]` at positions
/// `start..end` through `block_table`; when `sample`, draw the next token from the
/// logits of position `end - 1` (which must be the last token of the history).
#[derive(Clone, Debug)]
pub struct StepItem {
    pub seq: u64,
    pub start: usize,
    pub end: usize,
    pub block_table: Vec<u32>,
    pub sample: bool,
    /// Tokens the sample may take (constrained decoding): bit `t % 32` of word
    /// `t / 32` set = allowed. None = any.
    pub allowed: Option<Vec<u32>>,
}

#[derive(Clone, Debug)]
pub struct StepOut {
    pub seq: u64,
    pub sampled: Sampled,
    /// Text the token completes (empty while a UTF-8 character is incomplete, and for
    /// control tokens); on a sequence's last token, also what its decoder still held.
    pub text: String,
    /// Set when this token ended the sequence (its `StopRule`); the executor has
    /// forgotten it.
    pub finish: Option<FinishReason>,
}

/// A sequence the executor has not seen yet, registered before the step that first
/// feeds it.
#[derive(Clone, Debug)]
pub struct NewSeq {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopRule,
}

/// One step as the scheduler planned it.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Sequences the scheduler ended (aborted, timed out, stopped by a grammar or a
    /// stop string): forgotten first.
    pub finished: Vec<u64>,
    pub new: Vec<NewSeq>,
    /// KV entries taken over from cached blocks before the forward pass (prompt reuse
    /// past an early change); the items that follow read them.
    pub copies: Vec<KvCopy>,
    pub items: Vec<StepItem>,
}

#[derive(Clone, Debug, Default)]
pub struct PlanOut {
    pub tokens: Vec<StepOut>,
    /// New sequences that could not be registered, with why; their items did not run.
    pub refused: Vec<(u64, String)>,
}

/// Where the forward pass runs: the CPU kernels over a host KV cache, or the GPU
/// with the weights and the KV cache in device memory. The scheduler does not know.
enum Backend {
    Cpu(KvCache),
    Cuda(Box<GpuModel>, GpuKv),
}

pub struct Executor {
    engine: Arc<Engine>,
    backend: Backend,
    shape: KvShape,
    seqs: HashMap<u64, Seq>,
}

impl Executor {
    pub fn new(engine: Arc<Engine>, n_blocks: usize) -> Result<Executor> {
        let shape = engine.kv_shape(n_blocks);
        let kv = KvCache::new(shape)?;
        Ok(Executor { engine, backend: Backend::Cpu(kv), shape, seqs: HashMap::new() })
    }

    /// An executor whose steps run on `gpu`: the weights are uploaded now, the KV
    /// cache of `n_blocks` blocks lives in device memory.
    pub fn new_cuda(engine: Arc<Engine>, n_blocks: usize, gpu: &Arc<Gpu>) -> Result<Executor> {
        let shape = engine.kv_shape(n_blocks);
        let gm = GpuModel::upload(gpu, &engine.model)?;
        let kv = gm.new_kv(n_blocks, shape.block_size)?;
        Ok(Executor { engine, backend: Backend::Cuda(Box::new(gm), kv), shape, seqs: HashMap::new() })
    }

    /// "cpu", or "cuda:N" with the GPU's name.
    pub fn device(&self) -> String {
        match &self.backend {
            Backend::Cpu(_) => "cpu".into(),
            Backend::Cuda(gm, _) => format!("cuda:{} ({}, sm_{})", gm.gpu.ordinal, gm.gpu.name, gm.gpu.arch),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
    pub fn n_blocks(&self) -> usize {
        self.shape.n_blocks
    }
    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }
    pub fn n_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Carry out one step of a plan (see `Plan`).
    pub fn run(&mut self, plan: Plan) -> Result<PlanOut> {
        for id in &plan.finished {
            self.seqs.remove(id);
        }
        let mut refused = Vec::new();
        for n in plan.new {
            if let Err(e) = self.add(n.id, n.prompt, n.sampling, n.stop) {
                refused.push((n.id, e.to_string()));
            }
        }
        let items: Vec<StepItem> =
            plan.items.into_iter().filter(|it| !refused.iter().any(|(id, _)| *id == it.seq)).collect();
        if !plan.copies.is_empty() {
            self.copy_kv(&plan.copies)?;
        }
        Ok(PlanOut { tokens: self.step(&items)?, refused })
    }

    /// Whether the scheduler should plan `Plan::copies` for this backend. Both carry
    /// them out, but the GPU's `kv_copy` kernel has not yet run its test
    /// (`gpu_kv_copies_match_the_cpu`) on a GPU, so the GPU does not advertise them.
    pub fn supports_kv_copies(&self) -> bool {
        matches!(self.backend, Backend::Cpu(_))
    }

    fn copy_kv(&mut self, copies: &[KvCopy]) -> Result<()> {
        let model = &self.engine.model;
        match &mut self.backend {
            Backend::Cpu(kv) => model.copy_kv(self.engine.pool(), kv, copies),
            Backend::Cuda(gm, kv) => {
                let table = |il: usize, delta: i64| model.layer_rope(il).map(|r| r.shift_table(delta));
                gm.copy_kv(kv, copies, &table)
            }
        }
    }

    /// Register a sequence with its prompt. Ids are the caller's; reusing a live one
    /// is an error.
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, params: SamplingParams, stop: StopRule) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(Error::invalid(format!("sequence {id} already exists")));
        }
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty; give at least one token"));
        }
        let nv = self.engine.model.cfg.n_vocab;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= nv) {
            return Err(Error::invalid(format!("token id {bad} is out of range (vocabulary has {nv} tokens)")));
        }
        let max = self.engine.model.cfg.n_ctx_train;
        if prompt.len() > max {
            return Err(Error::invalid(format!("{} tokens exceed the model's context length of {max}", prompt.len())));
        }
        let penalty_from = if params.penalize_prompt { 0 } else { prompt.len() };
        let sampler = Sampler::new(params)?;
        self.seqs.insert(
            id,
            Seq { n_prompt: prompt.len(), penalty_from, history: prompt, sampler, stop, decoder: StreamDecoder::new() },
        );
        Ok(())
    }

    /// Forget a sequence; returns the text its decoder still held (an incomplete
    /// character renders as U+FFFD), or None when the id is unknown.
    pub fn remove(&mut self, id: u64) -> Option<String> {
        self.seqs.remove(&id).map(|mut s| s.decoder.finish())
    }

    pub fn history(&self, id: u64) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| &s.history[..])
    }

    /// Run one batched step. Sampled tokens are appended to their sequence's history
    /// (they are fed by a later step).
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<StepOut>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.engine.model.cfg.n_ctx_train;
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        for it in items {
            let s = self.seqs.get(&it.seq).ok_or_else(|| Error::invalid(format!("unknown sequence {}", it.seq)))?;
            if !seen.insert(it.seq) {
                return Err(Error::invalid(format!("sequence {} appears twice in one step", it.seq)));
            }
            if it.start >= it.end || it.end > s.history.len() {
                return Err(Error::invalid(format!(
                    "sequence {}: range {}..{} is not inside its {} tokens",
                    it.seq,
                    it.start,
                    it.end,
                    s.history.len()
                )));
            }
            if it.end > max {
                return Err(Error::invalid(format!("sequence {} runs past the context length of {max}", it.seq)));
            }
            if it.sample && it.end != s.history.len() {
                return Err(Error::invalid(format!("sequence {}: sampling needs the whole history fed", it.seq)));
            }
            if let Some(m) = &it.allowed {
                let nv = self.engine.model.cfg.n_vocab;
                if m.len() * 32 < nv {
                    return Err(Error::invalid(format!(
                        "sequence {}: the token mask covers {} of {nv} tokens",
                        it.seq,
                        m.len() * 32
                    )));
                }
                if m[..nv.div_ceil(32)].iter().all(|&w| w == 0) {
                    return Err(Error::invalid(format!("sequence {}: the token mask allows no token", it.seq)));
                }
            }
            self.shape.check_table(&it.block_table, it.end)?;
        }
        let inputs: Vec<SeqInput<'_>> = items
            .iter()
            .map(|it| {
                let s = &self.seqs[&it.seq];
                // Plain greedy rows let a backend skip the logits (the GPU returns only
                // each row's maximum): the same token and log-probability.
                let wanted = match it.sample {
                    true if it.allowed.is_none() && s.sampler.plain_greedy() => LogitsWanted::Greedy,
                    true => LogitsWanted::Last,
                    false => LogitsWanted::None,
                };
                let mut input = SeqInput::new(&s.history[it.start..it.end], it.start, &it.block_table, wanted);
                // The attention numerics of a prompt follow from its whole length, not
                // from how the scheduler chunked it this time (generated tokens, fed
                // one by one, take the row path either way).
                input.row_attention = it.start >= s.n_prompt || s.n_prompt < FA_TILE_Q;
                input
            })
            .collect();
        let logits = match &mut self.backend {
            // Batch-invariant kernels (`invariant: true`): a token's logits do not
            // depend on what else shares the step.
            Backend::Cpu(kv) => {
                let e = &*self.engine;
                e.model.forward_with(e.pool(), e.kernels, kv, &inputs, true)?
            }
            Backend::Cuda(gm, kv) => gm.forward(kv, &inputs)?,
        };
        drop(inputs);
        let nv = logits.n_vocab;
        // Each row's sequence, in row order (a sequence has at most one row).
        let row_of: HashMap<u64, usize> =
            logits.rows.iter().enumerate().map(|(k, &(si, _))| (items[si].seq, k)).collect();
        let mut work: Vec<(usize, u64, &mut Seq)> =
            self.seqs.iter_mut().filter_map(|(&id, s)| row_of.get(&id).map(|&k| (k, id, s))).collect();
        work.sort_unstable_by_key(|w| w.0);
        let tokenizer = &self.engine.tokenizer;
        let sample_one = |(k, id, s): &mut (usize, u64, &mut Seq)| -> StepOut {
            let row = || &logits.data[*k * nv..(*k + 1) * nv];
            let si = logits.rows[*k].0;
            let sampled = match &items[si].allowed {
                // The backend already picked this row's greedy token.
                None if !logits.greedy.is_empty() => {
                    let (token, logit) = logits.greedy[*k];
                    s.sampler.pick_greedy(token, logit, logits.lse[*k])
                }
                None => match logits.lse.get(*k) {
                    Some(&lse) => s.sampler.sample_with_lse(row(), &s.history[s.penalty_from..], lse),
                    None => s.sampler.sample(row(), &s.history[s.penalty_from..]),
                },
                Some(mask) => {
                    // Disallowed tokens get -inf: the sampler draws (and reports
                    // probabilities) within what the grammar allows.
                    let masked: Vec<f32> = row()
                        .iter()
                        .enumerate()
                        .map(|(t, &x)| if mask[t / 32] >> (t % 32) & 1 == 1 { x } else { f32::NEG_INFINITY })
                        .collect();
                    s.sampler.sample(&masked, &s.history[s.penalty_from..])
                }
            };
            s.history.push(sampled.token);
            let finish = s.stop.check(tokenizer, sampled.token, s.history.len() - s.n_prompt);
            let mut text = match finish {
                Some(FinishReason::Stop) => String::new(),
                _ => s.decoder.push(tokenizer, sampled.token),
            };
            if finish.is_some() {
                text.push_str(&s.decoder.finish());
            }
            StepOut { seq: *id, sampled, text, finish }
        };
        // Sequences sample independently (each has its own generator), so a large
        // batch's are spread over threads: a pass over the vocabulary per sequence is
        // the host's share of a GPU step. The results are the same in any split.
        const PER_THREAD: usize = 8;
        // (Greedy rows the backend already picked cost nothing: no threads for them.)
        let per = if logits.greedy.is_empty() { PER_THREAD } else { usize::MAX };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(work.len() / per);
        let out: Vec<StepOut> = if threads <= 1 {
            work.iter_mut().map(sample_one).collect()
        } else {
            let chunk = work.len().div_ceil(threads);
            std::thread::scope(|sc| {
                let handles: Vec<_> = work
                    .chunks_mut(chunk)
                    .map(|c| sc.spawn(|| c.iter_mut().map(sample_one).collect::<Vec<_>>()))
                    .collect();
                handles.into_iter().flat_map(|h| h.join().expect("sampling thread panicked")).collect()
            })
        };
        for o in out.iter().filter(|o| o.finish.is_some()) {
            self.seqs.remove(&o.seq);
        }
        Ok(out)
    }
}
