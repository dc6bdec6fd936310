//! Encoders: `bert` (BERT, MiniLM, BGE, E5) and `nomic-bert` (nomic-embed-text), as
//! llama.cpp b11434 builds them (src/models/bert.cpp, one graph for both). No KV
//! cache: every step holds whole sequences, and each token attends to every token of
//! its own sequence.
//!
//! ```text
//! x = token_embd[t] + token_types[0] (+ position_embd[p], bert)   every token is type 0
//! x = LayerNorm(x)                                                token_embd_norm
//! per layer (post-norm):
//!   q, k, v = x·Wq + bq, x·Wk + bk, x·Wv + bv    attn_qkv (fused) or attn_q/k/v
//!   q, k    = RoPE_neox(q, k)                      nomic-bert only
//!   a       = softmax(q·kᵀ / √head_dim) · v         not causal (attention.causal = false)
//!   x       = LayerNorm(x + a·Wo + bo)              attn_output_norm
//!   f       = down(gelu(up·x + b_up)) + b_down      bert
//!           | down(silu(gate·x) · up·x)             nomic-bert (no biases, even if present)
//!   x       = LayerNorm(x + f)                      layer_output_norm
//! ```
//!
//! The last layer's `x` is the sequences' hidden states; `embed.rs` pools them.

use super::attn::{self, DenseKeys, Tile};
use super::ops;
use super::{Arch, Config, Model, Op, Tensors, Weight};
use crate::error::{Error, Result};
use crate::quant::{self, Kernels};
use crate::threads::{Disjoint, ThreadPool};

/// The weights an encoder has beyond `Model::tok_embd`.
#[derive(Debug)]
pub(crate) struct Encoder {
    /// Row 0 of `token_types` (llama.cpp feeds type 0, "sentence A", to every token).
    type_row: Option<Vec<f32>>, // [n_embd]
    pos_embd: Option<Weight>, // [n_ctx_train][n_embd] (bert)
    tok_norm: Vec<f32>,       // [n_embd]
    tok_norm_b: Vec<f32>,     // [n_embd]
    layers: Vec<EncLayer>,
}

#[derive(Debug)]
struct EncLayer {
    wq: Weight,                // [q_dim][n_embd]
    wk: Weight,                // [kv_dim][n_embd]
    wv: Weight,                // [kv_dim][n_embd]
    bq: Option<Vec<f32>>,      // [q_dim]
    bk: Option<Vec<f32>>,      // [kv_dim]
    bv: Option<Vec<f32>>,      // [kv_dim]
    wo: Weight,                // [n_embd][q_dim]
    bo: Option<Vec<f32>>,      // [n_embd]
    attn_out_norm: Vec<f32>,   // [n_embd]
    attn_out_norm_b: Vec<f32>, // [n_embd]
    ffn: EncFfn,
    layer_out_norm: Vec<f32>,   // [n_embd]
    layer_out_norm_b: Vec<f32>, // [n_embd]
}

#[derive(Debug)]
enum EncFfn {
    /// bert: down(gelu(up·x + b_up)) + b_down.
    Gelu {
        up: Weight,               // [n_ff][n_embd]
        b_up: Option<Vec<f32>>,   // [n_ff]
        down: Weight,             // [n_embd][n_ff]
        b_down: Option<Vec<f32>>, // [n_embd]
    },
    /// nomic-bert: down(silu(gate·x) · up·x).
    SwiGlu {
        gate: Weight, // [n_ff][n_embd]
        up: Weight,   // [n_ff][n_embd]
        down: Weight, // [n_embd][n_ff]
    },
}

impl Encoder {
    pub(super) fn load(t: &Tensors<'_>, cfg: &Config) -> Result<Encoder> {
        let e = cfg.n_embd;
        let type_row = match t.g.tensor_info("token_types.weight") {
            None => None,
            Some(_) => {
                let w = t.weight("token_types.weight", e, cfg.n_token_types)?;
                let mut row = vec![0f32; e];
                quant::dequantize_row(w.ty, w.row(0), &mut row);
                Some(row)
            }
        };
        let pos_embd =
            if cfg.arch == Arch::Bert { Some(t.weight("position_embd.weight", e, cfg.n_ctx_train)?) } else { None };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
            let (wq, wk, wv, bq, bk, bv) = t.qkv(il, cfg)?;
            let f = cfg.n_ff;
            let ffn = if cfg.arch == Arch::NomicBert {
                EncFfn::SwiGlu {
                    gate: t.weight(&n("ffn_gate.weight"), e, f)?,
                    up: t.weight(&n("ffn_up.weight"), e, f)?,
                    down: t.weight(&n("ffn_down.weight"), f, e)?,
                }
            } else {
                EncFfn::Gelu {
                    up: t.weight(&n("ffn_up.weight"), e, f)?,
                    b_up: t.opt_vector(&n("ffn_up.bias"), f)?,
                    down: t.weight(&n("ffn_down.weight"), f, e)?,
                    b_down: t.opt_vector(&n("ffn_down.bias"), e)?,
                }
            };
            layers.push(EncLayer {
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                wo: t.weight(&n("attn_output.weight"), cfg.q_dim(), e)?,
                bo: t.opt_vector(&n("attn_output.bias"), e)?,
                attn_out_norm: t.vector(&n("attn_output_norm.weight"), e)?,
                attn_out_norm_b: t.vector(&n("attn_output_norm.bias"), e)?,
                ffn,
                layer_out_norm: t.vector(&n("layer_output_norm.weight"), e)?,
                layer_out_norm_b: t.vector(&n("layer_output_norm.bias"), e)?,
            });
        }
        Ok(Encoder {
            type_row,
            pos_embd,
            tok_norm: t.vector("token_embd_norm.weight", e)?,
            tok_norm_b: t.vector("token_embd_norm.bias", e)?,
            layers,
        })
    }

    /// Bytes of weights a step reads per token (every matrix once; the embedding
    /// rows are gathered, not read whole).
    pub(super) fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let ffn = match &l.ffn {
                    EncFfn::Gelu { up, down, .. } => up.n_bytes() + down.n_bytes(),
                    EncFfn::SwiGlu { gate, up, down } => gate.n_bytes() + up.n_bytes() + down.n_bytes(),
                };
                l.wq.n_bytes() + l.wk.n_bytes() + l.wv.n_bytes() + l.wo.n_bytes() + ffn
            })
            .sum()
    }
}

/// Query rows of one sequence per attention task (× the query heads of one KV head).
const TILE_TOK: usize = 64;

impl Model {
    /// The last layer's hidden states of every token of `seqs`, stacked in order:
    /// `[Σ len][n_embd]`. Each sequence must fit the model's context.
    pub(crate) fn encode(&self, pool: &ThreadPool, kern: &Kernels, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let enc =
            self.encoder.as_ref().ok_or_else(|| Error::invalid(format!("{} is not an encoder", cfg.arch.name())))?;
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
            if let Some(&bad) = s.iter().find(|&&t| t as usize >= cfg.n_vocab) {
                return Err(Error::invalid(format!(
                    "token id {bad} is out of range (vocabulary has {} tokens)",
                    cfg.n_vocab
                )));
            }
        }
        let e = cfg.n_embd;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<usize> = seqs.iter().flat_map(|s| 0..s.len()).collect();
        let n_tok = tokens.len();
        // (first token, length) of each sequence in the stacked rows.
        let spans: Vec<(usize, usize)> = seqs
            .iter()
            .scan(0, |t0, s| {
                let span = (*t0, s.len());
                *t0 += s.len();
                Some(span)
            })
            .collect();

        // embed: x [n_tok][n_embd] = token + type 0 (+ position)
        let mut x = vec![0f32; n_tok * e];
        {
            let d = Disjoint::new(&mut x);
            pool.for_ranges(n_tok, 1, 1, |toks| {
                // SAFETY: each task owns the embedding rows of its token range.
                let rows = unsafe { d.range_mut(toks.start * e..toks.end * e) };
                let mut pos_row = vec![0f32; e];
                for (i, row) in rows.chunks_mut(e).enumerate() {
                    let t = toks.start + i;
                    quant::dequantize_row(self.tok_embd.ty, self.tok_embd.row(tokens[t] as usize), row);
                    if let Some(tr) = &enc.type_row {
                        ops::add_inplace(row, tr);
                    }
                    if let Some(pe) = &enc.pos_embd {
                        quant::dequantize_row(pe.ty, pe.row(positions[t]), &mut pos_row);
                        ops::add_inplace(row, &pos_row);
                    }
                }
            });
        }
        self.profile
            .time(Op::Norm, || ops::layer_norm_rows(pool, &mut x, &enc.tok_norm, &enc.tok_norm_b, e, cfg.norm_eps));

        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim_k());
        let mut q = vec![0f32; n_tok * qd];
        let mut k = vec![0f32; n_tok * kvd];
        let mut v = vec![0f32; n_tok * kvd];
        let mut att = vec![0f32; n_tok * qd];
        let mut o = vec![0f32; n_tok * e];
        let mut g = vec![0f32; n_tok * cfg.n_ff];
        let mut u = vec![0f32; n_tok * cfg.n_ff];
        // Every token is a prompt token: the panel kernels throughout, and a token's
        // result never depends on what else shares the step.
        let mm = |w: &Weight, input: &[f32], out: &mut [f32]| {
            self.profile.time(Op::Matmul, || ops::matmul(pool, kern, w, input, n_tok, out, &[], true))
        };
        for l in &enc.layers {
            mm(&l.wq, &x, &mut q);
            mm(&l.wk, &x, &mut k);
            mm(&l.wv, &x, &mut v);
            for (buf, b) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
                if let Some(b) = b {
                    ops::add_bias_rows(buf, b);
                }
            }
            if cfg.use_rope {
                let rope = ops::Rope {
                    n_rot: cfg.n_rot,
                    head_dim: cfg.head_dim,
                    base: cfg.rope_base,
                    neox: cfg.rope_neox,
                    freq_factors: None,
                    freq_scale: cfg.rope_freq_scale,
                    mscale: cfg.rope_attn_factor,
                };
                self.profile.time(Op::Rope, || rope.apply(pool, &mut q, &positions, cfg.n_head));
                self.profile.time(Op::Rope, || rope.apply(pool, &mut k, &positions, cfg.n_head_kv));
            }
            self.profile.time(Op::Attention, || attention(pool, kern, cfg, &spans, &q, &k, &v, &mut att));
            mm(&l.wo, &att, &mut o);
            if let Some(b) = &l.bo {
                ops::add_bias_rows(&mut o, b);
            }
            ops::add_inplace(&mut o, &x);
            self.profile.time(Op::Norm, || {
                ops::layer_norm_rows(pool, &mut o, &l.attn_out_norm, &l.attn_out_norm_b, e, cfg.norm_eps)
            });

            // feed-forward from o; x (no longer needed) takes its output
            match &l.ffn {
                EncFfn::Gelu { up, b_up, down, b_down } => {
                    mm(up, &o, &mut u);
                    if let Some(b) = b_up {
                        ops::add_bias_rows(&mut u, b);
                    }
                    self.profile.time(Op::Activation, || ops::gelu_inplace(pool, &mut u, cfg.n_ff));
                    mm(down, &u, &mut x);
                    if let Some(b) = b_down {
                        ops::add_bias_rows(&mut x, b);
                    }
                }
                EncFfn::SwiGlu { gate, up, down } => {
                    mm(gate, &o, &mut g);
                    mm(up, &o, &mut u);
                    self.profile.time(Op::Activation, || ops::swiglu_inplace(pool, &mut g, &u, cfg.n_ff));
                    mm(down, &g, &mut x);
                }
            }
            ops::add_inplace(&mut x, &o);
            self.profile.time(Op::Norm, || {
                ops::layer_norm_rows(pool, &mut x, &l.layer_out_norm, &l.layer_out_norm_b, e, cfg.norm_eps)
            });
        }
        Ok(x)
    }
}

/// Attention within each sequence (`spans`: first row, length), every token seeing
/// every token of its sequence (or those up to itself when the file says causal).
/// q: `[n_tok][n_head * hd]`, k/v: `[n_tok][n_head_kv * hd]`, out like q. Tasks are
/// (up to 64 tokens of one sequence, one KV head); each query row's arithmetic does not
/// depend on its task, so batching never changes a result.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &ThreadPool,
    kern: &Kernels,
    cfg: &Config,
    spans: &[(usize, usize)],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let hd = cfg.head_dim;
    let group = cfg.n_head / cfg.n_head_kv;
    let (qw, kvw) = (cfg.n_head * hd, cfg.n_head_kv * hd);
    // (sequence, first token within it, tokens, kv head)
    let tasks: Vec<(usize, usize, usize, usize)> = spans
        .iter()
        .enumerate()
        .flat_map(|(si, &(_, n))| {
            (0..n)
                .step_by(TILE_TOK)
                .flat_map(move |c| (0..cfg.n_head_kv).map(move |kvh| (si, c, TILE_TOK.min(n - c), kvh)))
        })
        .collect();
    let d = Disjoint::new(out);
    pool.for_each(tasks.len(), |ti| {
        let (si, c, nt, kvh) = tasks[ti];
        let (t0, n) = spans[si];
        let rows = nt * group;
        let mut qt = vec![0f32; rows * hd];
        let (mut lo, mut hi) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for i in 0..nt {
            let t = t0 + c + i;
            for gi in 0..group {
                let h = kvh * group + gi;
                let r = i * group + gi;
                qt[r * hd..(r + 1) * hd]
                    .iter_mut()
                    .zip(&q[t * qw + h * hd..t * qw + (h + 1) * hd])
                    .for_each(|(a, &b)| *a = b * cfg.attn_scale);
                lo.push(0);
                hi.push(if cfg.causal { c + i } else { n - 1 });
            }
        }
        let keys = DenseKeys {
            k: &k[t0 * kvw..(t0 + n) * kvw],
            v: &v[t0 * kvw..(t0 + n) * kvw],
            k_stride: kvw,
            v_stride: kvw,
            k_off: kvh * hd,
            v_off: kvh * hd,
        };
        let mut res = vec![0f32; rows * hd];
        if hd.is_multiple_of(16) {
            let tile = Tile { q: &qt, lo: &lo, hi: &hi, hd, hdv: hd };
            attn::run(kern, &tile, &keys, &mut attn::Scratch::default(), &mut res);
        } else {
            attend_plain(&qt, &hi, hd, &keys, &mut res);
        }
        for i in 0..nt {
            let t = t0 + c + i;
            let h0 = kvh * group;
            // SAFETY: heads h0..h0+group of token t belong to this task alone.
            let o = unsafe { d.range_mut(t * qw + h0 * hd..t * qw + (h0 + group) * hd) };
            o.copy_from_slice(&res[i * group * hd..(i + 1) * group * hd]);
        }
    });
}

/// The tiled kernel's math one row at a time, for head sizes it does not take (not a
/// multiple of 16): scores, softmax (max subtracted), weighted sum of values. Row `r`
/// (already scaled) sees keys `0..=hi[r]`.
fn attend_plain(q: &[f32], hi: &[usize], hd: usize, keys: &DenseKeys<'_>, out: &mut [f32]) {
    for (r, (qr, o)) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).enumerate() {
        let krow = |j: usize| &keys.k[j * keys.k_stride + keys.k_off..][..hd];
        let vrow = |j: usize| &keys.v[j * keys.v_stride + keys.v_off..][..hd];
        let s: Vec<f32> = (0..=hi[r]).map(|j| qr.iter().zip(krow(j)).map(|(a, b)| a * b).sum()).collect();
        let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let p: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
        let inv = 1.0 / p.iter().sum::<f32>();
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &pj) in p.iter().enumerate() {
            o.iter_mut().zip(vrow(j)).for_each(|(a, &b)| *a += pj * b);
        }
        o.iter_mut().for_each(|x| *x *= inv);
    }
}
