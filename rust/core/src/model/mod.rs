//! The model: weights borrowed from the GGUF map, and one forward step that serves a
//! batch of sequences at once.
//!
//! A step takes, for each sequence, its new tokens, the position of the first one and
//! its KV block table. All new tokens of all sequences are stacked into one activation
//! matrix so each weight matrix is read once per step, whatever the batch — decode is
//! bound by memory bandwidth, so batching is nearly free. Attention is the only part
//! that looks at sequences separately.
//!
//! Reading order: load (config + tensors) → forward (embed → layers → norm → logits).

pub mod attn;
pub mod config;
pub mod ops;

use std::sync::Arc;

pub use config::{Arch, Config, SUPPORTED_ARCHS};

use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorData};
use crate::kv::KvCache;
use crate::quant::{self, GgmlType, Kernels};
use crate::threads::{Disjoint, ThreadPool};

/// A weight matrix `[rows][cols]` in ggml order: each of `rows` output rows is
/// `cols` contiguous input weights (GGUF dims = [cols, rows]).
#[derive(Clone, Debug)]
pub struct Weight {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: TensorData,
}

impl Weight {
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.data.bytes().len() / self.rows
    }
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data.bytes()[r * rb..(r + 1) * rb]
    }
    pub fn n_bytes(&self) -> usize {
        self.data.bytes().len()
    }
    /// All rows, contiguous.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,    // [n_embd]
    pub(crate) wq: Weight,             // [q_dim][n_embd]
    pub(crate) wk: Weight,             // [kv_dim_k][n_embd]
    pub(crate) wv: Weight,             // [kv_dim_v][n_embd]
    pub(crate) wo: Weight,             // [n_embd][n_head * head_dim_v]
    pub(crate) bq: Option<Vec<f32>>,   // [q_dim]      (qwen2)
    pub(crate) bk: Option<Vec<f32>>,   // [kv_dim_k]   (qwen2)
    pub(crate) bv: Option<Vec<f32>>,   // [kv_dim_v]   (qwen2)
    pub(crate) bo: Option<Vec<f32>>,   // [n_embd]     (some llama variants)
    pub(crate) q_norm: Option<Vec<f32>>, // [head_dim] (gemma3)
    pub(crate) k_norm: Option<Vec<f32>>, // [head_dim] (gemma3)
    pub(crate) post_attn_norm: Option<Vec<f32>>, // [n_embd] (gemma3)
    pub(crate) ffn_norm: Vec<f32>,     // [n_embd]
    pub(crate) gate: Weight,           // [n_ff][n_embd]
    pub(crate) up: Weight,             // [n_ff][n_embd]
    pub(crate) down: Weight,           // [n_embd][n_ff]
    pub(crate) post_ffn_norm: Option<Vec<f32>>, // [n_embd] (gemma3)
}

pub struct Model {
    pub cfg: Config,
    pub file: Arc<Gguf>,
    pub(crate) tok_embd: Weight,          // [n_vocab][n_embd]
    pub(crate) layers: Vec<Layer>,
    pub(crate) output_norm: Vec<f32>,     // [n_embd]
    pub(crate) output: Weight,            // [n_vocab][n_embd] (tied to tok_embd when absent)
    pub(crate) output_bias: Option<Vec<f32>>, // [n_vocab]
    pub(crate) rope_freqs: Option<Vec<f32>>, // [n_rot/2] llama3-style frequency divisors
    pub profile: Profile,
}

/// Where a step's time goes, by kind of operation; on when `EDGELM_PROFILE` is set
/// at load (off, it costs one branch per operation).
#[derive(Debug, Default)]
pub struct Profile {
    enabled: bool,
    ns: [std::sync::atomic::AtomicU64; Op::COUNT],
}

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Matmul,
    Attention,
    Norm,
    Rope,
    Activation,
}

impl Op {
    const COUNT: usize = 5;
    pub const ALL: [Op; Op::COUNT] = [Op::Matmul, Op::Attention, Op::Norm, Op::Rope, Op::Activation];
    pub fn name(self) -> &'static str {
        match self {
            Op::Matmul => "matmul",
            Op::Attention => "attention",
            Op::Norm => "norm",
            Op::Rope => "rope",
            Op::Activation => "activation",
        }
    }
}

impl Profile {
    fn time<R>(&self, op: Op, f: impl FnOnce() -> R) -> R {
        if !self.enabled {
            return f();
        }
        let t0 = std::time::Instant::now();
        let r = f();
        self.ns[op as usize].fetch_add(t0.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        r
    }
    pub fn enabled(&self) -> bool {
        self.enabled
    }
    /// Seconds per kind of operation since the last call; resets the counters.
    pub fn take(&self) -> Vec<(&'static str, f64)> {
        Op::ALL.iter().map(|&op| (op.name(), self.ns[op as usize].swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9)).collect()
    }
}

/// What one sequence contributes to a step.
#[derive(Clone, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it must already be in the cache.
    pub pos: usize,
    pub block_table: &'a [u32],
    pub logits: LogitsWanted,
    /// `tokens[solo_from..]` run on the one-token (decode) matmul kernels, the rest
    /// on the multi-token panel; see `ops::matmul`.
    pub solo_from: usize,
    /// Attention on llama.cpp's one-row f16 numerics (true) or its tiled f32 path.
    pub row_attention: bool,
}

impl<'a> SeqInput<'a> {
    /// A sequence's share of a step with the numerics llama.cpp would use for the
    /// same ubatch: a single token takes the decode kernels, attention follows the
    /// row path below `FA_TILE_Q` tokens.
    pub fn new(tokens: &'a [u32], pos: usize, block_table: &'a [u32], logits: LogitsWanted) -> Self {
        let n = tokens.len();
        SeqInput { tokens, pos, block_table, logits, solo_from: if n == 1 { 0 } else { n }, row_attention: n < ops::FA_TILE_Q }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
    /// The last token's, for a greedy pick only: a backend may return just the row's
    /// first maximum and log-sum-exp (`StepLogits::greedy`) instead of the logits.
    Greedy,
}

impl LogitsWanted {
    /// One row, for the sequence's last token (`Last` or `Greedy`).
    pub fn last(self) -> bool {
        matches!(self, LogitsWanted::Last | LogitsWanted::Greedy)
    }
}

/// Logits of a step: one `n_vocab` row per requested token, in input order.
pub struct StepLogits {
    pub n_vocab: usize,
    pub data: Vec<f32>,
    /// (sequence index, token index within that sequence's input) for each row.
    pub rows: Vec<(usize, usize)>,
    /// Each row's log-sum-exp (`sample::log_sum_exp`), when the backend computed it
    /// (the GPU does, beside the logits); empty otherwise.
    pub lse: Vec<f32>,
    /// When every row was `LogitsWanted::Greedy` and the backend took the shortcut
    /// (the GPU does): each row's first maximum (`sample::argmax`) and its logit, and
    /// `data` is empty. Empty otherwise.
    pub greedy: Vec<(u32, f32)>,
}


impl Model {
    pub fn load(file: Arc<Gguf>) -> Result<Model> {
        let cfg = Config::from_gguf(&file)?;
        let (e, v) = (cfg.n_embd, cfg.n_vocab);
        let t = Tensors { g: &file };
        let tok_embd = t.weight("token_embd.weight", e, v)?;
        let output = match t.g.tensor_info("output.weight") {
            Some(_) => t.weight("output.weight", e, v)?,
            None => tok_embd.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
            let gemma = cfg.arch == Arch::Gemma3;
            layers.push(Layer {
                attn_norm: t.vector(&n("attn_norm.weight"), e)?,
                wq: t.weight(&n("attn_q.weight"), e, cfg.q_dim())?,
                wk: t.weight(&n("attn_k.weight"), e, cfg.kv_dim_k())?,
                wv: t.weight(&n("attn_v.weight"), e, cfg.kv_dim_v())?,
                wo: t.weight(&n("attn_output.weight"), cfg.n_head * cfg.head_dim_v, e)?,
                bq: t.opt_vector(&n("attn_q.bias"), cfg.q_dim())?,
                bk: t.opt_vector(&n("attn_k.bias"), cfg.kv_dim_k())?,
                bv: t.opt_vector(&n("attn_v.bias"), cfg.kv_dim_v())?,
                bo: t.opt_vector(&n("attn_output.bias"), e)?,
                q_norm: if gemma { Some(t.vector(&n("attn_q_norm.weight"), cfg.head_dim)?) } else { None },
                k_norm: if gemma { Some(t.vector(&n("attn_k_norm.weight"), cfg.head_dim)?) } else { None },
                post_attn_norm: if gemma { Some(t.vector(&n("post_attention_norm.weight"), e)?) } else { None },
                ffn_norm: t.vector(&n("ffn_norm.weight"), e)?,
                gate: t.weight(&n("ffn_gate.weight"), e, cfg.n_ff)?,
                up: t.weight(&n("ffn_up.weight"), e, cfg.n_ff)?,
                down: t.weight(&n("ffn_down.weight"), cfg.n_ff, e)?,
                post_ffn_norm: if gemma { Some(t.vector(&n("post_ffw_norm.weight"), e)?) } else { None },
            });
        }
        let output_norm = t.vector("output_norm.weight", e)?;
        let rope_freqs = t.opt_vector("rope_freqs.weight", cfg.n_rot / 2)?;
        let output_bias = t.opt_vector("output.bias", v)?;
        let profile = Profile { enabled: std::env::var_os("EDGELM_PROFILE").is_some_and(|v| !v.is_empty() && v != "0"), ..Default::default() };
        Ok(Model { cfg, tok_embd, layers, output_norm, output, output_bias, rope_freqs, profile, file: Arc::clone(&file) })
    }

    /// Bytes of weights the forward pass reads per token (the bandwidth bound).
    pub fn weight_bytes_per_token(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| l.wq.n_bytes() + l.wk.n_bytes() + l.wv.n_bytes() + l.wo.n_bytes() + l.gate.n_bytes() + l.up.n_bytes() + l.down.n_bytes())
            .sum();
        per_layer + self.output.n_bytes()
    }

    /// Run one step for a batch of sequences, writing their new K/V into `kv`.
    pub fn forward(&self, pool: &ThreadPool, kern: &Kernels, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<StepLogits> {
        self.forward_with(pool, kern, kv, seqs, false)
    }

    /// `forward`, optionally batch-invariant: each sequence's results are then the same
    /// whatever else shares the step (see `ops::matmul`).
    pub fn forward_with(
        &self,
        pool: &ThreadPool,
        kern: &Kernels,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        invariant: bool,
    ) -> Result<StepLogits> {
        let cfg = &self.cfg;
        // Validate everything before touching the cache.
        let mut tok_meta = Vec::new(); // (seq index, position) per stacked token
        for (si, s) in seqs.iter().enumerate() {
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
                return Err(Error::invalid(format!("token id {bad} is out of range (vocabulary has {} tokens)", cfg.n_vocab)));
            }
            kv.check_table(s.block_table, s.pos + s.tokens.len())?;
            tok_meta.extend((0..s.tokens.len()).map(|i| (si, s.pos + i)));
        }
        let n_tok = tok_meta.len();
        let e = cfg.n_embd;
        let solo: Vec<bool> = seqs.iter().flat_map(|s| (0..s.tokens.len()).map(move |i| i >= s.solo_from)).collect();

        // embed: x [n_tok][n_embd]
        let mut x = vec![0f32; n_tok * e];
        let all_tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        {
            let d = Disjoint::new(&mut x);
            pool.for_ranges(n_tok, 1, 1, |toks| {
                // SAFETY: each task owns the embedding rows of its token range.
                let rows = unsafe { d.range_mut(toks.start * e..toks.end * e) };
                for (row, &t) in rows.chunks_mut(e).zip(&all_tokens[toks]) {
                    quant::dequantize_row(self.tok_embd.ty, self.tok_embd.row(t as usize), row);
                    if let Some(s) = cfg.embd_scale {
                        row.iter_mut().for_each(|v| *v *= s);
                    }
                }
            });
        }

        let positions: Vec<usize> = tok_meta.iter().map(|&(_, p)| p).collect();
        let mut h = vec![0f32; n_tok * e];
        let mut q = vec![0f32; n_tok * cfg.q_dim()];
        let mut k = vec![0f32; n_tok * cfg.kv_dim_k()];
        let mut v = vec![0f32; n_tok * cfg.kv_dim_v()];
        let mut att = vec![0f32; n_tok * cfg.n_head * cfg.head_dim_v];
        let mut o = vec![0f32; n_tok * e];
        let mut g = vec![0f32; n_tok * cfg.n_ff];
        let mut u = vec![0f32; n_tok * cfg.n_ff];

        for (il, l) in self.layers.iter().enumerate() {
            // attention block
            self.profile.time(Op::Norm, || ops::rms_norm_rows(pool, &x, &mut h, &l.attn_norm, e, cfg.rms_eps));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.wq, &h, n_tok, &mut q, &solo, invariant));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.wk, &h, n_tok, &mut k, &solo, invariant));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.wv, &h, n_tok, &mut v, &solo, invariant));
            // Each bias is optional on its own, as llama.cpp loads them.
            for (buf, b) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
                if let Some(b) = b {
                    ops::add_bias_rows(buf, b);
                }
            }
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                self.profile.time(Op::Norm, || ops::rms_norm_inplace_rows(pool, &mut q, qn, cfg.head_dim, cfg.rms_eps));
                self.profile.time(Op::Norm, || ops::rms_norm_inplace_rows(pool, &mut k, kn, cfg.head_dim, cfg.rms_eps));
            }
            let swa = cfg.swa_layers[il];
            let base = if swa { cfg.rope_base_swa } else { cfg.rope_base };
            let rope = ops::Rope { n_rot: cfg.n_rot, head_dim: cfg.head_dim, base, neox: cfg.rope_neox, freq_factors: self.rope_freqs.as_deref() };
            self.profile.time(Op::Rope, || rope.apply(pool, &mut q, &positions, cfg.n_head));
            self.profile.time(Op::Rope, || rope.apply(pool, &mut k, &positions, cfg.n_head_kv));

            let mut t0 = 0;
            for s in seqs {
                for i in 0..s.tokens.len() {
                    let t = t0 + i;
                    kv.write(
                        il,
                        s.block_table,
                        s.pos + i,
                        &k[t * cfg.kv_dim_k()..(t + 1) * cfg.kv_dim_k()],
                        &v[t * cfg.kv_dim_v()..(t + 1) * cfg.kv_dim_v()],
                    );
                }
                t0 += s.tokens.len();
            }
            let window = if swa { cfg.swa_window } else { None };
            self.profile.time(Op::Attention, || ops::attention(pool, kern, kv, il, cfg, seqs, &tok_meta, &q, &mut att, window));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.wo, &att, n_tok, &mut o, &solo, invariant));
            if let Some(b) = &l.bo {
                ops::add_bias_rows(&mut o, b);
            }
            if let Some(pn) = &l.post_attn_norm {
                self.profile.time(Op::Norm, || ops::rms_norm_inplace_rows(pool, &mut o, pn, e, cfg.rms_eps));
            }
            ops::add_inplace(&mut x, &o);

            // feed-forward block
            self.profile.time(Op::Norm, || ops::rms_norm_rows(pool, &x, &mut h, &l.ffn_norm, e, cfg.rms_eps));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.gate, &h, n_tok, &mut g, &solo, invariant));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.up, &h, n_tok, &mut u, &solo, invariant));
            match cfg.arch {
                Arch::Gemma3 => self.profile.time(Op::Activation, || ops::geglu_inplace(pool, &mut g, &u, cfg.n_ff)),
                Arch::Llama | Arch::Qwen2 => self.profile.time(Op::Activation, || ops::swiglu_inplace(pool, &mut g, &u, cfg.n_ff)),
            }
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.down, &g, n_tok, &mut o, &solo, invariant));
            if let Some(pn) = &l.post_ffn_norm {
                self.profile.time(Op::Norm, || ops::rms_norm_inplace_rows(pool, &mut o, pn, e, cfg.rms_eps));
            }
            ops::add_inplace(&mut x, &o);
        }

        // logits, only for the rows asked for
        let rows = logit_rows(seqs);
        let n_out = rows.len();
        let mut xs = vec![0f32; n_out * e];
        for (j, &(_, _, t)) in rows.iter().enumerate() {
            xs[j * e..(j + 1) * e].copy_from_slice(&x[t * e..(t + 1) * e]);
        }
        let mut hs = vec![0f32; n_out * e];
        self.profile.time(Op::Norm, || ops::rms_norm_rows(pool, &xs, &mut hs, &self.output_norm, e, cfg.rms_eps));
        let mut logits = vec![0f32; n_out * cfg.n_vocab];
        if n_out > 0 {
            // A sequence's last-token logits always take the one-token kernels, so they
            // do not depend on how many sequences share the step.
            let solo_out: Vec<bool> = rows.iter().map(|&(si, _, _)| seqs[si].logits.last()).collect();
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &self.output, &hs, n_out, &mut logits, &solo_out, invariant));
        }
        if let Some(b) = &self.output_bias {
            ops::add_bias_rows(&mut logits, b);
        }
        if let Some(c) = cfg.final_logit_softcap {
            logits.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
        }
        Ok(StepLogits { n_vocab: cfg.n_vocab, data: logits, rows: rows.iter().map(|&(s, i, _)| (s, i)).collect(), lse: Vec::new(), greedy: Vec::new() })
    }
}

/// The rows of a step whose logits are wanted: (sequence index, token index within
/// that sequence's input, index among all stacked tokens), in input order.
pub(crate) fn logit_rows(seqs: &[SeqInput<'_>]) -> Vec<(usize, usize, usize)> {
    let mut rows = Vec::new();
    let mut t0 = 0;
    for (si, s) in seqs.iter().enumerate() {
        let n = s.tokens.len();
        match s.logits {
            LogitsWanted::None => {}
            LogitsWanted::Last | LogitsWanted::Greedy if n > 0 => rows.push((si, n - 1, t0 + n - 1)),
            LogitsWanted::Last | LogitsWanted::Greedy => {}
            LogitsWanted::All => rows.extend((0..n).map(|i| (si, i, t0 + i))),
        }
        t0 += n;
    }
    rows
}

/// Tensor lookup with shape checks; every failure names the tensor.
struct Tensors<'a> {
    g: &'a Arc<Gguf>,
}

impl Tensors<'_> {
    fn weight(&self, name: &str, cols: usize, rows: usize) -> Result<Weight> {
        let data = self.g.tensor_data(name).ok_or_else(|| Error::model(format!("required tensor {name:?} is missing")))?;
        let dims = &data.info.dims;
        let want = [cols as u64, rows as u64];
        let ok = dims.len() >= 2 && dims[..2] == want && dims[2..].iter().all(|&d| d == 1);
        if !ok {
            return Err(Error::model(format!(
                "tensor {name:?} has shape {dims:?} but the metadata implies [{cols}, {rows}]"
            )));
        }
        Ok(Weight { ty: data.info.ty, rows, cols, data })
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.opt_vector(name, n)?.ok_or_else(|| Error::model(format!("required tensor {name:?} is missing")))
    }

    fn opt_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        let Some(info) = self.g.tensor_info(name) else { return Ok(None) };
        if info.n_elements() != n as u64 {
            return Err(Error::model(format!("tensor {name:?} has shape {:?} but the metadata implies [{n}]", info.dims)));
        }
        // Norm vectors and biases are a few KiB; a copy in f32 keeps the hot loops simple.
        Ok(Some(quant::dequantize(info.ty, self.g.tensor_bytes(info), n)))
    }
}
