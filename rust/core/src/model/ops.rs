//! The operations of the forward pass, on row-major f32 activations `[n_tok][width]`.
//! Numerics follow ggml's CPU backend where it is cheap to do so (f64 sums in RMSNorm,
//! RoPE angles advanced by repeated f32 multiplication, GELU through an f16 table), so
//! greedy continuations agree with llama.cpp token for token.

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use super::{Config, SeqInput, Weight};
use crate::kv::KvCache;
use crate::quant;

/// y = x / rms(x) * w, row by row (`w.len()` is the row width).
pub fn rms_norm_rows(x: &[f32], y: &mut [f32], w: &[f32], width: usize, eps: f32) {
    debug_assert_eq!(x.len(), y.len());
    debug_assert_eq!(w.len(), width);
    y.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(yr, xr)| {
        let scale = rms_scale(xr, eps);
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = (v * scale) * g;
        }
    });
}

/// In-place RMSNorm over consecutive `width`-wide pieces (per-head norms use
/// width = head_dim on a `[n_tok][n_head * head_dim]` buffer).
pub fn rms_norm_inplace_rows(x: &mut [f32], w: &[f32], width: usize, eps: f32) {
    debug_assert_eq!(w.len(), width);
    x.par_chunks_mut(width).for_each(|r| {
        let scale = rms_scale(r, eps);
        for (v, &g) in r.iter_mut().zip(w) {
            *v = (*v * scale) * g;
        }
    });
}

#[inline]
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    // ggml sums squares in double.
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}

pub fn add_bias_rows(x: &mut [f32], b: &[f32]) {
    x.chunks_mut(b.len()).for_each(|r| r.iter_mut().zip(b).for_each(|(a, &c)| *a += c));
}

/// y[t][r] = W[r] · x[t]. x: `[n_tok][w.cols]`, y: `[n_tok][w.rows]`.
/// Activations are quantized once to the weight's dot-product format; the weight row
/// then meets every token while it is in cache.
pub fn matmul(w: &Weight, x: &[f32], n_tok: usize, y: &mut [f32]) {
    debug_assert_eq!(x.len(), n_tok * w.cols);
    debug_assert_eq!(y.len(), n_tok * w.rows);
    let act_ty = w.ty.vec_dot_type();
    let arb = act_ty.row_bytes(w.cols).expect("cols validated at load");
    let mut xq = vec![0u8; n_tok * arb];
    xq.par_chunks_mut(arb).zip(x.par_chunks(w.cols)).for_each(|(q, r)| quant::quantize_row(act_ty, r, q));

    let threads = rayon::current_num_threads().max(1);
    let chunk = (w.rows / (threads * 8)).clamp(4, 256);
    if n_tok == 1 {
        y.par_chunks_mut(chunk).enumerate().for_each(|(ci, ys)| {
            for (j, out) in ys.iter_mut().enumerate() {
                *out = quant::vec_dot(w.ty, w.cols, w.row(ci * chunk + j), &xq);
            }
        });
        return;
    }
    // Row-major over weights: yt[r][t], then transpose.
    let mut yt = vec![0f32; n_tok * w.rows];
    yt.par_chunks_mut(chunk * n_tok).enumerate().for_each(|(ci, ys)| {
        for (j, out_r) in ys.chunks_mut(n_tok).enumerate() {
            let wr = w.row(ci * chunk + j);
            for (t, out) in out_r.iter_mut().enumerate() {
                *out = quant::vec_dot(w.ty, w.cols, wr, &xq[t * arb..(t + 1) * arb]);
            }
        }
    });
    y.par_chunks_mut(w.rows).enumerate().for_each(|(t, yr)| {
        for (r, out) in yr.iter_mut().enumerate() {
            *out = yt[r * n_tok + t];
        }
    });
}

pub struct Rope<'a> {
    pub n_rot: usize,
    pub head_dim: usize,
    pub base: f32,
    pub neox: bool,
    pub freq_factors: Option<&'a [f32]>,
}

impl Rope<'_> {
    /// Rotate every head of every token in `x` (`[n_tok][n_heads * head_dim]`).
    pub fn apply(&self, x: &mut [f32], positions: &[usize], n_heads: usize) {
        let width = n_heads * self.head_dim;
        debug_assert_eq!(x.len(), positions.len() * width);
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f32);
        x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &p)| {
            // cos/sin cache for this position, as ggml_rope_cache_init builds it.
            let half = self.n_rot / 2;
            let mut cs = [(0f32, 0f32); 256];
            let mut cs_vec;
            let cs: &mut [(f32, f32)] = if half <= 256 {
                &mut cs[..half]
            } else {
                cs_vec = vec![(0f32, 0f32); half];
                &mut cs_vec
            };
            let mut theta = p as f32;
            for (i, c) in cs.iter_mut().enumerate() {
                let ff = self.freq_factors.map_or(1.0, |f| f[i]);
                let t = theta / ff;
                *c = (t.cos(), t.sin());
                theta *= theta_scale;
            }
            for head in row.chunks_mut(self.head_dim) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c - x1 * s;
                    head[b] = x0 * s + x1 * c;
                }
            }
        });
    }
}

/// Causal attention over the paged cache. `q`: `[n_tok][n_head * head_dim]` (already
/// rotated); `out`: `[n_tok][n_head * head_dim_v]`. `tok_meta[t] = (seq, pos)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    kv: &KvCache,
    layer: usize,
    cfg: &Config,
    seqs: &[SeqInput<'_>],
    tok_meta: &[(usize, usize)],
    q: &[f32],
    out: &mut [f32],
    window: Option<usize>,
) {
    let (hd, hdv) = (cfg.head_dim, cfg.head_dim_v);
    let group = cfg.n_head / cfg.n_head_kv;
    let scale = cfg.attn_scale;
    out.par_chunks_mut(cfg.n_head * hdv).zip(q.par_chunks(cfg.n_head * hd)).zip(tok_meta.par_iter()).for_each(
        |((o_row, q_row), &(si, p))| {
            let table = seqs[si].block_table;
            // Positions visible from p: causal, and within the window on SWA layers
            // (a key at j is masked when p - j >= window, as llama.cpp masks).
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let n = p + 1 - lo;
            let mut scores = vec![0f32; n];
            let mut acc = vec![0f32; hdv];
            for h in 0..cfg.n_head {
                let kvh = h / group;
                let qh = &q_row[h * hd..(h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let kr = &kv.k_row(layer, table, lo + j)[kvh * hd..(kvh + 1) * hd];
                    *s = dot_f32_f16(qh, kr) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (j, &s) in scores.iter().enumerate() {
                    let vr = &kv.v_row(layer, table, lo + j)[kvh * hdv..(kvh + 1) * hdv];
                    for (a, &vv) in acc.iter_mut().zip(vr) {
                        *a += s * vv.to_f32();
                    }
                }
                let inv = 1.0 / sum;
                for (o, &a) in o_row[h * hdv..(h + 1) * hdv].iter_mut().zip(&acc) {
                    *o = a * inv;
                }
            }
        },
    );
}

#[inline]
fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum()
}

/// g = silu(g) * u
pub fn swiglu_inplace(g: &mut [f32], u: &[f32]) {
    g.par_chunks_mut(4096).zip(u.par_chunks(4096)).for_each(|(gs, us)| {
        for (a, &b) in gs.iter_mut().zip(us) {
            *a = *a / (1.0 + (-*a).exp()) * b;
        }
    });
}

/// g = gelu(g) * u, GELU (tanh form) looked up through f16 like ggml's CPU backend.
pub fn geglu_inplace(g: &mut [f32], u: &[f32]) {
    let table = gelu_table();
    g.par_chunks_mut(4096).zip(u.par_chunks(4096)).for_each(|(gs, us)| {
        for (a, &b) in gs.iter_mut().zip(us) {
            let x = *a;
            *a = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x * b
            } else {
                table[f16::from_f32(x).to_bits() as usize].to_f32() * b
            };
        }
    });
}

fn gelu_f32(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

fn gelu_table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|b| f16::from_f32(gelu_f32(f16::from_bits(b).to_f32()))).collect())
}
