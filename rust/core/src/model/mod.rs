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
//! Encoders (bert, nomic-bert) have a forward of their own (bert.rs), and embeddings
//! of either kind are pooled in embed.rs.

pub mod attn;
pub mod bert;
pub mod config;
pub mod embed;
pub mod moe;
pub mod ops;

use std::sync::Arc;

pub use config::{Arch, Config, MoeConfig, Pooling, SUPPORTED_ARCHS};

use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorData};
use crate::kv::KvCache;
use crate::quant::{self, GgmlType, Kernels};
use crate::threads::{Disjoint, ThreadPool};

/// (cos, sin) of each RoPE pair's angle for one move (`ops::Rope::shift_table`).
type AngleTable = Vec<(f32, f32)>;

/// A weight matrix `[rows][cols]` in ggml order: each of `rows` output rows is
/// `cols` contiguous input weights (GGUF dims = [cols, rows]).
///
/// On the CPU, a matrix whose type packs (`quant::packed`) is repacked the first time
/// a CPU matmul reads it, and its file pages are let go: the packed copy (in 2 MiB
/// pages) is what CPU steps read from then on. A model that runs on a GPU never packs.
/// Clones share the packed copy (a tied output matrix is the embedding's clone).
#[derive(Clone, Debug)]
pub struct Weight {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: TensorData,
    packed: Arc<std::sync::OnceLock<Option<quant::packed::Packed>>>,
}

/// `EDGELM_PACK=0` keeps every weight in the file's layout (comparisons, bug reports).
pub const PACK_ENV: &str = "EDGELM_PACK";

impl Weight {
    fn new(ty: GgmlType, rows: usize, cols: usize, data: TensorData) -> Weight {
        Weight { ty, rows, cols, data, packed: Arc::default() }
    }

    /// The packed copy for the CPU kernels `k`, packed now (on `pool`) if this is the
    /// first use; None where the type, shape or level does not pack.
    pub fn packed(&self, pool: &ThreadPool, k: &Kernels) -> Option<&quant::packed::Packed> {
        if !k.packs(self.ty) || !quant::packed::packable(self.ty, self.rows, self.cols) {
            return None;
        }
        self.packed
            .get_or_init(|| {
                static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                if !*ENABLED.get_or_init(|| std::env::var(PACK_ENV).map_or(true, |v| v.trim() != "0")) {
                    return None;
                }
                let p = quant::packed::Packed::new_with(self.ty, self.bytes(), self.rows, self.cols, |n, f| {
                    pool.for_ranges(n, 1, 4, f)
                });
                // Best effort: if the pages stay, they only cost memory.
                let _ = self.data.release_pages();
                p
            })
            .as_ref()
    }

    /// The packed copy if one was made (no packing here).
    pub fn packed_if_made(&self) -> Option<&quant::packed::Packed> {
        self.packed.get().and_then(|p| p.as_ref())
    }

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
    /// Rows `first..first + n` as a weight of their own (no copy): the parts of a fused
    /// tensor (phi3's `attn_qkv`, `ffn_up`), one expert of a stacked `ffn_*_exps`.
    pub fn rows_view(&self, first: usize, n: usize) -> Weight {
        assert!(first + n <= self.rows, "rows {first}..{} of a {}-row weight", first + n, self.rows);
        let rb = self.row_bytes();
        Weight::new(self.ty, n, self.cols, self.data.slice(first * rb, n * rb))
    }
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,              // [n_embd]
    pub(crate) wq: Weight,                       // [q_dim][n_embd]
    pub(crate) wk: Weight,                       // [kv_dim_k][n_embd]
    pub(crate) wv: Weight,                       // [kv_dim_v][n_embd]
    pub(crate) wo: Weight,                       // [n_embd][n_head * head_dim_v]
    pub(crate) bq: Option<Vec<f32>>,             // [q_dim]      (qwen2)
    pub(crate) bk: Option<Vec<f32>>,             // [kv_dim_k]   (qwen2)
    pub(crate) bv: Option<Vec<f32>>,             // [kv_dim_v]   (qwen2)
    pub(crate) bo: Option<Vec<f32>>,             // [n_embd]     (some llama variants)
    pub(crate) q_norm: Option<Vec<f32>>,         // [head_dim] (gemma3)
    pub(crate) k_norm: Option<Vec<f32>>,         // [head_dim] (gemma3)
    pub(crate) post_attn_norm: Option<Vec<f32>>, // [n_embd] (gemma3)
    pub(crate) ffn_norm: Vec<f32>,               // [n_embd]
    pub(crate) ffn: Ffn,
    pub(crate) post_ffn_norm: Option<Vec<f32>>, // [n_embd] (gemma3)
}

/// A layer's feed-forward block.
#[derive(Debug)]
pub enum Ffn {
    /// down(act(gate·x + b_gate) · (up·x + b_up)) + b_down; act is SiLU (GELU on gemma3).
    /// Phi-3's fused `ffn_up` is `[2 n_ff][n_embd]`, gate rows first: gate and up are
    /// its two halves.
    Dense {
        gate: Weight,             // [n_ff][n_embd]
        up: Weight,               // [n_ff][n_embd]
        down: Weight,             // [n_embd][n_ff]
        b_gate: Option<Vec<f32>>, // [n_ff]   (granite, optional)
        b_up: Option<Vec<f32>>,   // [n_ff]   (granite, optional)
        b_down: Option<Vec<f32>>, // [n_embd] (granite, optional)
    },
    /// Mixture of experts (see `moe`).
    Moe(moe::Experts),
}

pub struct Model {
    pub cfg: Config,
    pub file: Arc<Gguf>,
    pub(crate) tok_embd: Weight,              // [n_vocab][n_embd]
    pub(crate) layers: Vec<Layer>,            // decoder layers (none in an encoder)
    pub(crate) output_norm: Vec<f32>,         // [n_embd] (empty in an encoder)
    pub(crate) output: Weight,                // [n_vocab][n_embd] (tied to tok_embd when absent; unused by encoders)
    pub(crate) output_bias: Option<Vec<f32>>, // [n_vocab]
    /// [n_rot/2] RoPE frequency divisors: llama3's `rope_freqs`, or the LongRoPE factors
    /// chosen at load (`rope_factors_long`/`_short`).
    pub(crate) rope_freqs: Option<Vec<f32>>,
    /// Which tensor `rope_freqs` came from ("rope_freqs", "rope_factors_long",
    /// "rope_factors_short"), if any.
    pub rope_freqs_name: Option<&'static str>,
    /// The rest of an encoder's weights (bert, nomic-bert); None for decoders.
    pub(crate) encoder: Option<bert::Encoder>,
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
    /// MoE: the router's softmax and top-k, the sort by expert, the weighted sum.
    Routing,
}

impl Op {
    const COUNT: usize = 6;
    pub const ALL: [Op; Op::COUNT] = [Op::Matmul, Op::Attention, Op::Norm, Op::Rope, Op::Activation, Op::Routing];
    pub fn name(self) -> &'static str {
        match self {
            Op::Matmul => "matmul",
            Op::Attention => "attention",
            Op::Norm => "norm",
            Op::Rope => "rope",
            Op::Activation => "activation",
            Op::Routing => "routing",
        }
    }
}

impl Profile {
    pub(crate) fn time<R>(&self, op: Op, f: impl FnOnce() -> R) -> R {
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
        Op::ALL
            .iter()
            .map(|&op| (op.name(), self.ns[op as usize].swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9))
            .collect()
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
        SeqInput {
            tokens,
            pos,
            block_table,
            logits,
            solo_from: if n == 1 { 0 } else { n },
            row_attention: n < ops::FA_TILE_Q,
        }
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
        Self::load_with(file, None)
    }

    /// Load for a context of `n_ctx` tokens per sequence (default: the model's
    /// `context_length`). Only LongRoPE files depend on it: like llama.cpp, they take
    /// `rope_factors_long` when the context is larger than the original one
    /// (`rope.scaling.original_context_length`), else `rope_factors_short`.
    pub fn load_with(file: Arc<Gguf>, n_ctx: Option<usize>) -> Result<Model> {
        let cfg = Config::from_gguf(&file)?;
        let (e, v) = (cfg.n_embd, cfg.n_vocab);
        let t = Tensors { g: &file };
        let tok_embd = t.weight("token_embd.weight", e, v)?;
        let profile = Profile {
            enabled: std::env::var_os("EDGELM_PROFILE").is_some_and(|v| !v.is_empty() && v != "0"),
            ..Default::default()
        };
        if cfg.arch.is_encoder() {
            let encoder = Some(bert::Encoder::load(&t, &cfg)?);
            let output = tok_embd.clone();
            return Ok(Model {
                cfg,
                tok_embd,
                layers: Vec::new(),
                output_norm: Vec::new(),
                output,
                output_bias: None,
                rope_freqs: None,
                rope_freqs_name: None,
                encoder,
                profile,
                file: Arc::clone(&file),
            });
        }
        let output = match t.g.tensor_info("output.weight") {
            Some(_) => t.weight("output.weight", e, v)?,
            None => tok_embd.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
            let gemma = cfg.arch == Arch::Gemma3;
            let qk_norm = matches!(cfg.arch, Arch::Gemma3 | Arch::Qwen3 | Arch::Qwen3Moe);
            let (wq, wk, wv, bq, bk, bv) = t.qkv(il, &cfg)?;
            layers.push(Layer {
                attn_norm: t.vector(&n("attn_norm.weight"), e)?,
                wq,
                wk,
                wv,
                wo: t.weight(&n("attn_output.weight"), cfg.n_head * cfg.head_dim_v, e)?,
                bq,
                bk,
                bv,
                bo: t.opt_vector(&n("attn_output.bias"), e)?,
                q_norm: if qk_norm { Some(t.vector(&n("attn_q_norm.weight"), cfg.head_dim)?) } else { None },
                k_norm: if qk_norm { Some(t.vector(&n("attn_k_norm.weight"), cfg.head_dim)?) } else { None },
                post_attn_norm: if gemma { Some(t.vector(&n("post_attention_norm.weight"), e)?) } else { None },
                ffn_norm: t.vector(&n("ffn_norm.weight"), e)?,
                ffn: t.ffn(il, &cfg)?,
                post_ffn_norm: if gemma { Some(t.vector(&n("post_ffw_norm.weight"), e)?) } else { None },
            });
        }
        let output_norm = t.vector("output_norm.weight", e)?;
        // RoPE frequency divisors, where the architecture reads them (llama.cpp's
        // get_rope_factors: a `rope_freqs` tensor wins, else LongRoPE's pair by context).
        let half = cfg.n_rot / 2;
        let longrope = file.get_str(&format!("{}.rope.scaling.type", cfg.arch.name()))? == Some("longrope");
        let (rope_freqs, rope_freqs_name) = match cfg.arch {
            Arch::Llama => (t.opt_vector("rope_freqs.weight", half)?, "rope_freqs"),
            Arch::Granite if !longrope => (t.opt_vector("rope_freqs.weight", half)?, "rope_freqs"),
            Arch::Phi3 | Arch::Granite => {
                let long = n_ctx.unwrap_or(cfg.n_ctx_train) > cfg.n_ctx_orig;
                let name = if long { "rope_factors_long" } else { "rope_factors_short" };
                // Both are checked, whichever is used.
                let (l, s) =
                    (t.opt_vector("rope_factors_long.weight", half)?, t.opt_vector("rope_factors_short.weight", half)?);
                (if long { l } else { s }, name)
            }
            _ => (None, ""),
        };
        if let Some(f) = rope_freqs.as_ref().and_then(|f| f.iter().find(|x| !(x.is_finite() && **x > 0.0))) {
            return Err(Error::model(format!(
                "tensor \"{rope_freqs_name}.weight\" holds {f}; RoPE frequency factors must be positive"
            )));
        }
        let rope_freqs_name = rope_freqs.as_ref().map(|_| rope_freqs_name);
        let output_bias = t.opt_vector("output.bias", v)?;
        Ok(Model {
            cfg,
            tok_embd,
            layers,
            output_norm,
            output,
            output_bias,
            rope_freqs,
            rope_freqs_name,
            encoder: None,
            profile,
            file: Arc::clone(&file),
        })
    }

    /// Bytes of weights the forward pass reads per token (the bandwidth bound).
    pub fn weight_bytes_per_token(&self) -> usize {
        if let Some(enc) = &self.encoder {
            return enc.weight_bytes();
        }
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                let ffn = match &l.ffn {
                    Ffn::Dense { gate, up, down, .. } => gate.n_bytes() + up.n_bytes() + down.n_bytes(),
                    // The router and the experts a token uses.
                    Ffn::Moe(x) => {
                        let m = self.cfg.moe.as_ref().expect("MoE layers have a MoE config");
                        x.router.n_bytes()
                            + (x.gate.n_bytes() + x.up.n_bytes() + x.down.n_bytes()) / m.n_expert * m.n_expert_used
                    }
                };
                l.wq.n_bytes() + l.wk.n_bytes() + l.wv.n_bytes() + l.wo.n_bytes() + ffn
            })
            .sum();
        per_layer + self.output.n_bytes()
    }

    /// Run one step for a batch of sequences, writing their new K/V into `kv`.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        kern: &Kernels,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
    ) -> Result<StepLogits> {
        self.forward_with(pool, kern, kv, seqs, false)
    }

    /// `forward`, optionally batch-invariant: each sequence's results are then the same
    /// whatever else shares the step (see `ops::matmul`).
    /// Layer `il`'s RoPE (None when the architecture has none).
    pub fn layer_rope(&self, il: usize) -> Option<ops::Rope<'_>> {
        let cfg = &self.cfg;
        let swa = cfg.swa_layers[il];
        cfg.use_rope.then_some(ops::Rope {
            n_rot: cfg.n_rot,
            head_dim: cfg.head_dim,
            base: if swa { cfg.rope_base_swa } else { cfg.rope_base },
            neox: cfg.rope_neox,
            freq_factors: self.rope_freqs.as_deref(),
            // llama.cpp's sliding-window layers never scale positions (gemma3).
            freq_scale: if swa { 1.0 } else { cfg.rope_freq_scale },
            mscale: cfg.rope_attn_factor,
        })
    }

    /// Carry out KV copies (`KvCopy`: reuse of cached entries at other positions) in
    /// every layer, turning K by RoPE for the distance each run moved.
    pub fn copy_kv(&self, pool: &ThreadPool, kv: &mut KvCache, copies: &[crate::kv::KvCopy]) -> Result<()> {
        for c in copies {
            c.check(&kv.shape)?;
        }
        let ropes: Vec<Option<ops::Rope<'_>>> = (0..self.cfg.n_layer).map(|il| self.layer_rope(il)).collect();
        // Angle tables per layer and copy (None: no move, or no RoPE: a plain copy).
        let tables: Vec<Vec<Option<AngleTable>>> = ropes
            .iter()
            .map(|r| {
                copies
                    .iter()
                    .map(|c| {
                        let delta = c.dst_start as i64 - c.src_start as i64;
                        r.as_ref().filter(|_| delta != 0).map(|r| r.shift_table(delta))
                    })
                    .collect()
            })
            .collect();
        let turned = |il: usize, ci: usize| tables[il][ci].is_some();
        let turn = |il: usize, ci: usize, row: &mut [f32]| {
            if let (Some(r), Some(cs)) = (&ropes[il], &tables[il][ci]) {
                r.turn(row, cs);
            }
        };
        kv.copy_rows(pool, copies, &turned, &turn);
        Ok(())
    }

    pub fn forward_with(
        &self,
        pool: &ThreadPool,
        kern: &Kernels,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        invariant: bool,
    ) -> Result<StepLogits> {
        self.forward_traced(pool, kern, kv, seqs, invariant, None)
    }

    /// `forward_with`, recording each MoE layer's routing into `trace` (tests: the
    /// router against a float64 reference).
    pub fn forward_traced(
        &self,
        pool: &ThreadPool,
        kern: &Kernels,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        invariant: bool,
        trace: Option<&mut Vec<moe::Trace>>,
    ) -> Result<StepLogits> {
        if self.encoder.is_some() {
            return Err(Error::invalid(format!(
                "{} is an encoder (an embedding model): it computes embeddings, not next-token logits",
                self.cfg.arch.name()
            )));
        }
        let x = self.run_layers(pool, kern, kv, seqs, invariant, trace)?;
        let cfg = &self.cfg;
        let e = cfg.n_embd;

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
            self.profile.time(Op::Matmul, || {
                ops::matmul(pool, kern, &self.output, &hs, n_out, &mut logits, &solo_out, invariant)
            });
        }
        if let Some(b) = &self.output_bias {
            ops::add_bias_rows(&mut logits, b);
        }
        if let Some(ls) = cfg.logit_scale {
            // ggml_scale by the reciprocal, as llama.cpp's granite graph does.
            let inv = 1.0 / ls;
            logits.iter_mut().for_each(|v| *v *= inv);
        }
        if let Some(c) = cfg.final_logit_softcap {
            logits.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
        }
        Ok(StepLogits {
            n_vocab: cfg.n_vocab,
            data: logits,
            rows: rows.iter().map(|&(s, i, _)| (s, i)).collect(),
            lse: Vec::new(),
            greedy: Vec::new(),
        })
    }

    /// Embed → layers: the last layer's output `[n_tok][n_embd]` for every token of
    /// the step (before the final norm), with the new K/V written into `kv`.
    pub(crate) fn run_layers(
        &self,
        pool: &ThreadPool,
        kern: &Kernels,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        invariant: bool,
        mut trace: Option<&mut Vec<moe::Trace>>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        // Validate everything before touching the cache.
        let mut tok_meta = Vec::new(); // (seq index, position) per stacked token
        for (si, s) in seqs.iter().enumerate() {
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
                return Err(Error::invalid(format!(
                    "token id {bad} is out of range (vocabulary has {} tokens)",
                    cfg.n_vocab
                )));
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
                    match self.tok_embd.packed_if_made() {
                        Some(p) => p.dequantize_row(t as usize, row),
                        None => quant::dequantize_row(self.tok_embd.ty, self.tok_embd.row(t as usize), row),
                    }
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
        let n_ff = if cfg.moe.is_some() { 0 } else { cfg.n_ff };
        let mut g = vec![0f32; n_tok * n_ff];
        let mut u = vec![0f32; n_tok * n_ff];

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
            if let Some(rope) = self.layer_rope(il) {
                self.profile.time(Op::Rope, || rope.apply(pool, &mut q, &positions, cfg.n_head));
                self.profile.time(Op::Rope, || rope.apply(pool, &mut k, &positions, cfg.n_head_kv));
            }
            if let Some(s) = cfg.q_scale {
                q.iter_mut().for_each(|x| *x *= s);
            }

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
            self.profile
                .time(Op::Attention, || ops::attention(pool, kern, kv, il, cfg, seqs, &tok_meta, &q, &mut att, window));
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, &l.wo, &att, n_tok, &mut o, &solo, invariant));
            if let Some(b) = &l.bo {
                ops::add_bias_rows(&mut o, b);
            }
            if let Some(pn) = &l.post_attn_norm {
                self.profile.time(Op::Norm, || ops::rms_norm_inplace_rows(pool, &mut o, pn, e, cfg.rms_eps));
            }
            if let Some(rs) = cfg.residual_scale {
                o.iter_mut().for_each(|x| *x *= rs);
            }
            ops::add_inplace(&mut x, &o);

            // feed-forward block
            self.profile.time(Op::Norm, || ops::rms_norm_rows(pool, &x, &mut h, &l.ffn_norm, e, cfg.rms_eps));
            match &l.ffn {
                Ffn::Dense { gate, up, down, b_gate, b_up, b_down } => {
                    self.profile
                        .time(Op::Matmul, || ops::matmul(pool, kern, gate, &h, n_tok, &mut g, &solo, invariant));
                    self.profile.time(Op::Matmul, || ops::matmul(pool, kern, up, &h, n_tok, &mut u, &solo, invariant));
                    for (buf, b) in [(&mut g, b_gate), (&mut u, b_up)] {
                        if let Some(b) = b {
                            ops::add_bias_rows(buf, b);
                        }
                    }
                    match cfg.arch {
                        Arch::Gemma3 => {
                            self.profile.time(Op::Activation, || ops::geglu_inplace(pool, &mut g, &u, cfg.n_ff))
                        }
                        _ => self.profile.time(Op::Activation, || ops::swiglu_inplace(pool, &mut g, &u, cfg.n_ff)),
                    }
                    self.profile
                        .time(Op::Matmul, || ops::matmul(pool, kern, down, &g, n_tok, &mut o, &solo, invariant));
                    if let Some(b) = b_down {
                        ops::add_bias_rows(&mut o, b);
                    }
                }
                Ffn::Moe(experts) => {
                    let m = cfg.moe.as_ref().expect("MoE layers have a MoE config");
                    let routes = moe::ffn(pool, kern, experts, m, &h, n_tok, &mut o, &solo, invariant, &self.profile);
                    if let Some(t) = trace.as_deref_mut() {
                        t.push(moe::Trace {
                            layer: il,
                            input: h.clone(),
                            experts: routes.experts,
                            weights: routes.weights,
                        });
                    }
                }
            }
            if let Some(pn) = &l.post_ffn_norm {
                self.profile.time(Op::Norm, || ops::rms_norm_inplace_rows(pool, &mut o, pn, e, cfg.rms_eps));
            }
            if let Some(rs) = cfg.residual_scale {
                o.iter_mut().for_each(|x| *x *= rs);
            }
            ops::add_inplace(&mut x, &o);
        }

        Ok(x)
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
        let data =
            self.g.tensor_data(name).ok_or_else(|| Error::model(format!("required tensor {name:?} is missing")))?;
        let dims = &data.info.dims;
        let want = [cols as u64, rows as u64];
        let ok = dims.len() >= 2 && dims[..2] == want && dims[2..].iter().all(|&d| d == 1);
        if !ok {
            return Err(Error::model(format!(
                "tensor {name:?} has shape {dims:?} but the metadata implies [{cols}, {rows}]"
            )));
        }
        Ok(Weight::new(data.info.ty, rows, cols, data))
    }

    /// `[n][rows][cols]` stacked experts (GGUF dims `[cols, rows, n]`), as one weight of
    /// `n * rows` rows: expert `x` is rows `x * rows..(x + 1) * rows`.
    fn experts(&self, name: &str, cols: usize, rows: usize, n: usize) -> Result<Weight> {
        let data =
            self.g.tensor_data(name).ok_or_else(|| Error::model(format!("required tensor {name:?} is missing")))?;
        let dims = &data.info.dims;
        let want = [cols as u64, rows as u64, n as u64];
        if !(dims.len() >= 3 && dims[..3] == want && dims[3..].iter().all(|&d| d == 1)) {
            return Err(Error::model(format!("tensor {name:?} has shape {dims:?} but the metadata implies {want:?}")));
        }
        Ok(Weight::new(data.info.ty, rows * n, cols, data))
    }

    /// Q, K, V and their biases: `attn_qkv` (fused, rows q then k then v) when the file
    /// has it, as llama.cpp's create_tensor_qkv prefers, else `attn_q`/`attn_k`/`attn_v`.
    #[allow(clippy::type_complexity)]
    fn qkv(
        &self,
        il: usize,
        cfg: &Config,
    ) -> Result<(Weight, Weight, Weight, Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>)> {
        let n = |s: &str| format!("blk.{il}.{s}");
        let (e, qd, kd, vd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim_k(), cfg.kv_dim_v());
        let separate_biases = || -> Result<_> {
            Ok((
                self.opt_vector(&n("attn_q.bias"), qd)?,
                self.opt_vector(&n("attn_k.bias"), kd)?,
                self.opt_vector(&n("attn_v.bias"), vd)?,
            ))
        };
        if self.g.tensor_info(&n("attn_qkv.weight")).is_some() {
            let w = self.weight(&n("attn_qkv.weight"), e, qd + kd + vd)?;
            let (bq, bk, bv) = match self.opt_vector(&n("attn_qkv.bias"), qd + kd + vd)? {
                Some(b) => (Some(b[..qd].to_vec()), Some(b[qd..qd + kd].to_vec()), Some(b[qd + kd..].to_vec())),
                // llama.cpp adds separate biases to a fused product only when all three are there.
                None => match separate_biases()? {
                    (Some(q), Some(k), Some(v)) => (Some(q), Some(k), Some(v)),
                    _ => (None, None, None),
                },
            };
            return Ok((w.rows_view(0, qd), w.rows_view(qd, kd), w.rows_view(qd + kd, vd), bq, bk, bv));
        }
        let (bq, bk, bv) = separate_biases()?;
        Ok((
            self.weight(&n("attn_q.weight"), e, qd)?,
            self.weight(&n("attn_k.weight"), e, kd)?,
            self.weight(&n("attn_v.weight"), e, vd)?,
            bq,
            bk,
            bv,
        ))
    }

    fn ffn(&self, il: usize, cfg: &Config) -> Result<Ffn> {
        let n = |s: &str| format!("blk.{il}.{s}");
        let e = cfg.n_embd;
        if let Some(m) = &cfg.moe {
            let (x, f) = (m.n_expert, m.n_ff_exp);
            return Ok(Ffn::Moe(moe::Experts {
                router: self.weight(&n("ffn_gate_inp.weight"), e, x)?,
                gate: self.experts(&n("ffn_gate_exps.weight"), e, f, x)?,
                up: self.experts(&n("ffn_up_exps.weight"), e, f, x)?,
                down: self.experts(&n("ffn_down_exps.weight"), f, e, x)?,
                n_expert: x,
            }));
        }
        let f = cfg.n_ff;
        let (gate, up) = if cfg.arch == Arch::Phi3 {
            let gu = self.weight(&n("ffn_up.weight"), e, 2 * f)?;
            (gu.rows_view(0, f), gu.rows_view(f, f))
        } else {
            (self.weight(&n("ffn_gate.weight"), e, f)?, self.weight(&n("ffn_up.weight"), e, f)?)
        };
        let granite = cfg.arch == Arch::Granite;
        let bias = |s: &str, len| if granite { self.opt_vector(&n(s), len) } else { Ok(None) };
        Ok(Ffn::Dense {
            gate,
            up,
            down: self.weight(&n("ffn_down.weight"), f, e)?,
            b_gate: bias("ffn_gate.bias", f)?,
            b_up: bias("ffn_up.bias", f)?,
            b_down: bias("ffn_down.bias", e)?,
        })
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.opt_vector(name, n)?.ok_or_else(|| Error::model(format!("required tensor {name:?} is missing")))
    }

    fn opt_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        let Some(info) = self.g.tensor_info(name) else { return Ok(None) };
        if info.n_elements() != n as u64 {
            return Err(Error::model(format!(
                "tensor {name:?} has shape {:?} but the metadata implies [{n}]",
                info.dims
            )));
        }
        // Norm vectors and biases are a few KiB; a copy in f32 keeps the hot loops simple.
        Ok(Some(quant::dequantize(info.ty, self.g.tensor_bytes(info), n)))
    }
}
