//! The operations of the forward pass, on row-major f32 activations `[n_tok][width]`.
//! Numerics follow ggml's CPU backend where it is cheap to do so (f64 sums in RMSNorm,
//! RoPE angles advanced by repeated f32 multiplication, GELU through an f16 table), so
//! greedy continuations agree with llama.cpp token for token.

use std::sync::OnceLock;

use half::f16;

use super::{Config, SeqInput, Weight};
use crate::kv::KvCache;
use crate::quant::Kernels;
use crate::threads::{Disjoint, ThreadPool};

/// Rows per task for row-wise ops: big enough that a task outweighs its dispatch.
const ROW_TASKS_PER_THREAD: usize = 2;

/// Apply `f(row_index, out_row)` to each `width`-wide row of `out` in parallel.
fn par_rows(pool: &ThreadPool, out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let n_rows = out.len() / width;
    let d = Disjoint::new(out);
    pool.for_ranges(n_rows, 1, ROW_TASKS_PER_THREAD, |rows| {
        // SAFETY: for_ranges hands each task its own row range.
        let chunk = unsafe { d.range_mut(rows.start * width..rows.end * width) };
        for (i, row) in chunk.chunks_mut(width).enumerate() {
            f(rows.start + i, row);
        }
    });
}

/// y = x / rms(x) * w, row by row (`w.len()` is the row width).
pub fn rms_norm_rows(pool: &ThreadPool, x: &[f32], y: &mut [f32], w: &[f32], width: usize, eps: f32) {
    debug_assert_eq!(x.len(), y.len());
    debug_assert_eq!(w.len(), width);
    par_rows(pool, y, width, |i, yr| {
        let xr = &x[i * width..(i + 1) * width];
        let scale = rms_scale(xr, eps);
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = (v * scale) * g;
        }
    });
}

/// In-place RMSNorm over consecutive `width`-wide pieces (per-head norms use
/// width = head_dim on a `[n_tok][n_head * head_dim]` buffer).
pub fn rms_norm_inplace_rows(pool: &ThreadPool, x: &mut [f32], w: &[f32], width: usize, eps: f32) {
    debug_assert_eq!(w.len(), width);
    par_rows(pool, x, width, |_, r| {
        let scale = rms_scale(r, eps);
        for (v, &g) in r.iter_mut().zip(w) {
            *v = (*v * scale) * g;
        }
    });
}

/// y = LayerNorm(x) · w + b, row by row: ggml's `norm` (mean and variance of the row,
/// here summed in f64), then its `mul` and `add`; in place.
pub fn layer_norm_rows(pool: &ThreadPool, x: &mut [f32], w: &[f32], b: &[f32], width: usize, eps: f32) {
    debug_assert_eq!(w.len(), width);
    debug_assert_eq!(b.len(), width);
    par_rows(pool, x, width, |_, r| {
        let n = r.len() as f64;
        let mean = (r.iter().map(|&v| v as f64).sum::<f64>() / n) as f32;
        let mut var = 0f64;
        for v in r.iter_mut() {
            *v -= mean;
            var += (*v * *v) as f64;
        }
        let scale = 1.0 / ((var / n) as f32 + eps).sqrt();
        for ((v, &g), &c) in r.iter_mut().zip(w).zip(b) {
            *v = (*v * scale) * g + c;
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
/// Activations are quantized once to the weight's dot-product format; each task then
/// runs the kernels' block matmul over its own range of weight rows for every token.
///
/// `invariant` (the serving executor): a token's result must not depend on what else
/// shares the step (batching must not change what a request gets). Where the kernels'
/// exact one-token path equals the panel (`single_token_matches_panel`), every token
/// simply shares the panel. Elsewhere `solo[t]` puts token `t` on the one-token kernel:
/// the weight rows a task covers are walked in cache-sized pieces, each piece for
/// every solo token, so batched decode still reads each weight from memory once.
/// Without `invariant` (the library, the goldens) a lone token takes the decode
/// kernel that follows llama.cpp's arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    pool: &ThreadPool,
    k: &Kernels,
    w: &Weight,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    solo: &[bool],
    invariant: bool,
) {
    debug_assert_eq!(x.len(), n_tok * w.cols);
    debug_assert_eq!(y.len(), n_tok * w.rows);
    debug_assert!(solo.is_empty() || solo.len() == n_tok);
    let act_ty = w.ty.vec_dot_type();
    let arb = act_ty.row_bytes(w.cols).expect("cols validated at load");
    let mut xq = vec![0u8; n_tok * arb];
    {
        let d = Disjoint::new(&mut xq);
        pool.for_ranges(n_tok, 1, 1, |toks| {
            // SAFETY: each task owns the activation rows of its token range.
            let q = unsafe { d.range_mut(toks.start * arb..toks.end * arb) };
            for (i, qr) in q.chunks_mut(arb).enumerate() {
                let t = toks.start + i;
                k.quantize_row(act_ty, &x[t * w.cols..(t + 1) * w.cols], qr);
            }
        });
    }
    if let Some(pw) = w.packed(pool, k) {
        matmul_packed(pool, k, pw, &xq, n_tok, y);
        return;
    }
    let rb = w.row_bytes();
    let (rows, cols) = (w.rows, w.cols);
    // Tokens on the panel (their quantized rows gathered) and tokens on their own.
    // Where one-token results equal the panel's, every token can share the panel.
    let exact = invariant && k.single_token_matches_panel(w.ty);
    let n_solo = if !invariant || exact { 0 } else { solo.iter().filter(|&&s| s).count() };
    let (panel_toks, solo_toks): (Vec<usize>, Vec<usize>) = if n_solo == 0 || n_tok == 1 {
        ((0..n_tok).collect(), Vec::new())
    } else {
        (0..n_tok).partition(|&t| !solo[t])
    };
    let xq_panel: std::borrow::Cow<'_, [u8]> = if panel_toks.len() == n_tok {
        std::borrow::Cow::Borrowed(&xq)
    } else {
        std::borrow::Cow::Owned(panel_toks.iter().flat_map(|&t| xq[t * arb..(t + 1) * arb].iter().copied()).collect())
    };
    let n_panel = panel_toks.len();
    // Rows per piece for solo tokens: ~32 KiB of weights, a multiple of 8 rows so the
    // one-token kernel groups rows exactly as it does over a whole task.
    let piece = ((32 << 10) / rb.max(1)).max(8) / 8 * 8;
    let out = Disjoint::new(y);
    // Whole groups of 8 rows per task, so the gemm kernels fill their panels.
    pool.for_ranges(rows, 8, 4, |r| {
        let wr = &w.bytes()[r.start * rb..r.end * rb];
        let n_r = r.end - r.start;
        if n_tok == 1 {
            // SAFETY: y[r] belongs to this task's row range alone.
            let dst = unsafe { out.range_mut(r.clone()) };
            if exact {
                k.gemm_exact(w.ty, cols, wr, n_r, &xq, 1, dst, n_r);
            } else {
                k.gemm(w.ty, cols, wr, n_r, &xq, 1, dst, n_r);
            }
            return;
        }
        if n_panel > 0 {
            let mut tile = vec![0f32; n_panel * n_r];
            k.gemm(w.ty, cols, wr, n_r, &xq_panel, n_panel, &mut tile, n_r);
            for (i, &t) in panel_toks.iter().enumerate() {
                // SAFETY: columns r of every token row belong to this task alone.
                let dst = unsafe { out.range_mut(t * rows + r.start..t * rows + r.end) };
                dst.copy_from_slice(&tile[i * n_r..(i + 1) * n_r]);
            }
        }
        let mut p0 = 0;
        while p0 < n_r && !solo_toks.is_empty() {
            let p1 = (p0 + piece).min(n_r);
            let wp = &wr[p0 * rb..p1 * rb];
            for &t in &solo_toks {
                let (a, b) = (t * rows + r.start + p0, t * rows + r.start + p1);
                // SAFETY: as above, these columns of row t belong to this task.
                let dst = unsafe { out.range_mut(a..b) };
                k.gemm(w.ty, cols, wp, p1 - p0, &xq[t * arb..(t + 1) * arb], 1, dst, p1 - p0);
            }
            p0 = p1;
        }
    });
}

/// RoPE as ggml's CPU backend computes it (`ggml_rope_cache_init` without YaRN's ramp):
/// pair i of a head at position p turns by θ = freq_scale · p · base^(-2i/n_rot) / ff[i],
/// and cos θ, sin θ are multiplied by `mscale`. Dims from `n_rot` on pass unchanged
/// (partial rotary).
/// `matmul` over a packed weight (`quant::packed`): each task takes a range of 8-row
/// groups and every token. Each token's result is computed alone in the same
/// arithmetic, whatever the batch, so no token needs the one-by-one treatment.
fn matmul_packed(
    pool: &ThreadPool,
    k: &Kernels,
    w: &crate::quant::packed::Packed,
    xq: &[u8],
    n_tok: usize,
    y: &mut [f32],
) {
    use crate::quant::packed::{act_sums, sums_per_block, ROWS};
    let spb = w.nb() * sums_per_block(w.ty);
    let arb = xq.len() / n_tok;
    let mut sums = vec![0i16; n_tok * spb];
    for (t, s) in sums.chunks_exact_mut(spb).enumerate() {
        act_sums(w.ty, &xq[t * arb..(t + 1) * arb], s);
    }
    let rows = w.rows;
    let out = Disjoint::new(y);
    pool.for_ranges(rows / ROWS, 1, 4, |g| {
        let width = (g.end - g.start) * ROWS;
        if n_tok == 1 {
            // SAFETY: columns of this task's groups belong to it alone.
            let dst = unsafe { out.range_mut(g.start * ROWS..g.end * ROWS) };
            k.gemm_packed(w, g.start, g.end, xq, &sums, 1, dst, width);
            return;
        }
        let mut tile = vec![0f32; n_tok * width];
        k.gemm_packed(w, g.start, g.end, xq, &sums, n_tok, &mut tile, width);
        for t in 0..n_tok {
            // SAFETY: as above, for every token's row.
            let dst = unsafe { out.range_mut(t * rows + g.start * ROWS..t * rows + g.end * ROWS) };
            dst.copy_from_slice(&tile[t * width..(t + 1) * width]);
        }
    });
}

pub struct Rope<'a> {
    pub n_rot: usize,
    pub head_dim: usize,
    pub base: f32,
    pub neox: bool,
    pub freq_factors: Option<&'a [f32]>,
    pub freq_scale: f32,
    pub mscale: f32,
}

impl Rope<'_> {
    /// Rotate every head of every token in `x` (`[n_tok][n_heads * head_dim]`).
    pub fn apply(&self, pool: &ThreadPool, x: &mut [f32], positions: &[usize], n_heads: usize) {
        let width = n_heads * self.head_dim;
        debug_assert_eq!(x.len(), positions.len() * width);
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f32);
        par_rows(pool, x, width, |ti, row| {
            let p = positions[ti];
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
                let t = self.freq_scale * (theta / ff);
                *c = (t.cos() * self.mscale, t.sin() * self.mscale);
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

impl Rope<'_> {
    /// (cos, sin) of each pair's angle for a move of `delta` positions.
    pub fn shift_table(&self, delta: i64) -> Vec<(f32, f32)> {
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f32);
        let mut theta = delta as f32;
        let mut cs = Vec::with_capacity(self.n_rot / 2);
        for i in 0..self.n_rot / 2 {
            let ff = self.freq_factors.map_or(1.0, |f| f[i]);
            let t = self.freq_scale * (theta / ff);
            cs.push((t.cos(), t.sin()));
            theta *= theta_scale;
        }
        cs
    }

    /// Move K rows that were rotated for position `p` to position `p + delta`: every
    /// pair turns by θ(delta) (θ is linear in the position), without `mscale`, which
    /// the stored rows already carry. The returned function turns one row
    /// (`[n_heads * head_dim]`).
    pub fn shifter(&self, delta: i64) -> impl Fn(&mut [f32]) + '_ {
        let cs = self.shift_table(delta);
        move |row: &mut [f32]| self.turn(row, &cs)
    }

    /// Turn every head of `row` by the angles `cs` (a `shift_table`).
    pub fn turn(&self, row: &mut [f32], cs: &[(f32, f32)]) {
        let half = self.n_rot / 2;
        for head in row.chunks_mut(self.head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Below this many new tokens in a sequence, attention follows llama.cpp's one-row
/// flash-attention numerics (Q rounded to f16, V accumulated in f16 with online
/// softmax); at or above it, its tiled f32 path. Matching both keeps greedy decoding
/// on the peer's tokens: 135M-parameter models are sensitive to rounding at the
/// 0.1-logprob level.
pub const FA_TILE_Q: usize = 64;

/// From this many visible keys on, a row-path token takes the long-context decode
/// kernel (`attn::decode`: f32 accumulation, keys 16 at a time) instead of llama.cpp's
/// one-row f16 numerics, which cost ~12x the short-context step at 4,000 keys. Decided by
/// the token's own position, so batching never changes which one it gets.
pub const LONG_DECODE_KEYS: usize = 128;

/// Tokens of one sequence per tiled-attention task (× the query heads of one KV head).
const ATTN_TILE_TOK: usize = 64;

/// Causal attention over the paged cache. `q`: `[n_tok][n_head * head_dim]` (already
/// rotated); `out`: `[n_tok][n_head * head_dim_v]`. `tok_meta[t] = (seq, pos)`.
/// Sequences on the row path are computed a token at a time; the others in tiles
/// (`attn`), one task per (token tile, KV head).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    kern: &Kernels,
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
    let qw = cfg.n_head * hd;
    let ow = cfg.n_head * hdv;
    // Tasks: (token, kv head) on the row path, or (first token, n tokens, kv head) of a
    // tiled sequence. One task per KV head, not per token: a decode step of one sequence
    // still spreads over every thread.
    enum Task {
        Row(usize, usize),
        Tile(usize, usize, usize),
    }
    let mut tasks = Vec::new();
    let mut t0 = 0;
    for s in seqs {
        let n = s.tokens.len();
        if s.row_attention || !hdv.is_multiple_of(16) {
            tasks.extend((t0..t0 + n).flat_map(|t| (0..cfg.n_head_kv).map(move |kvh| Task::Row(t, kvh))));
        } else {
            for c in (0..n).step_by(ATTN_TILE_TOK) {
                let nt = ATTN_TILE_TOK.min(n - c);
                tasks.extend((0..cfg.n_head_kv).map(|kvh| Task::Tile(t0 + c, nt, kvh)));
            }
        }
        t0 += n;
    }
    let lo_of = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    let d = Disjoint::new(out);
    pool.for_each(tasks.len(), |i| match tasks[i] {
        Task::Row(ti, kvh) => {
            let h0 = kvh * group;
            // SAFETY: the heads of KV head kvh in token ti's output row belong to this task.
            let o_row = unsafe { d.range_mut(ti * ow + h0 * hdv..ti * ow + (h0 + group) * hdv) };
            let q_row = &q[ti * qw..(ti + 1) * qw];
            let (si, p) = tok_meta[ti];
            let table = seqs[si].block_table;
            // Positions visible from p: causal, and within the window on SWA layers
            // (a key at j is masked when p - j >= window, as llama.cpp masks).
            let lo = lo_of(p);
            if p + 1 - lo >= LONG_DECODE_KEYS && hd.is_multiple_of(16) && hdv.is_multiple_of(16) {
                let mut qg = vec![0f32; group * hd];
                for (g, dst) in qg.chunks_exact_mut(hd).enumerate() {
                    let src = &q_row[(h0 + g) * hd..(h0 + g + 1) * hd];
                    dst.iter_mut().zip(src).for_each(|(a, &b)| *a = b * scale);
                }
                let keys = super::attn::Keys { kv, layer, table, kvh };
                super::attn::decode(
                    kern,
                    &qg,
                    group,
                    lo,
                    p,
                    hd,
                    hdv,
                    &keys,
                    &mut super::attn::Scratch::default(),
                    o_row,
                );
                return;
            }
            let mut sc = AttnScratch::new(hd, hdv);
            for h in h0..h0 + group {
                let qh = &q_row[h * hd..(h + 1) * hd];
                let o = &mut o_row[(h - h0) * hdv..(h - h0 + 1) * hdv];
                let k_at = |j: usize| &kv.k_row(layer, table, j)[kvh * hd..(kvh + 1) * hd];
                let v_at = |j: usize| &kv.v_row(layer, table, j)[kvh * hdv..(kvh + 1) * hdv];
                attend_row_f16(kern, &mut sc, qh, lo..p + 1, scale, k_at, v_at, o);
            }
        }
        Task::Tile(ta, nt, kvh) => {
            let rows = nt * group;
            let mut qt = vec![0f32; rows * hd];
            let (mut lo, mut hi) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
            for ti in 0..nt {
                let p = tok_meta[ta + ti].1;
                for g in 0..group {
                    let h = kvh * group + g;
                    let r = ti * group + g;
                    let src = &q[(ta + ti) * qw + h * hd..(ta + ti) * qw + (h + 1) * hd];
                    qt[r * hd..(r + 1) * hd].iter_mut().zip(src).for_each(|(a, &b)| *a = b * scale);
                    lo.push(lo_of(p));
                    hi.push(p);
                }
            }
            let si = tok_meta[ta].0;
            let keys = super::attn::Keys { kv, layer, table: seqs[si].block_table, kvh };
            let tile = super::attn::Tile { q: &qt, lo: &lo, hi: &hi, hd, hdv };
            let mut res = vec![0f32; rows * hdv];
            let mut sc = super::attn::Scratch::default();
            super::attn::run(kern, &tile, &keys, &mut sc, &mut res);
            for ti in 0..nt {
                let t = ta + ti;
                let h0 = kvh * group;
                // SAFETY: heads h0..h0+group of token t belong to this task alone.
                let o = unsafe { d.range_mut(t * ow + h0 * hdv..t * ow + (h0 + group) * hdv) };
                o.copy_from_slice(&res[ti * group * hdv..(ti + 1) * group * hdv]);
            }
        }
    });
}

struct AttnScratch {
    /// q rounded through f16, held as f32 (exact).
    q16: Vec<f32>,
    /// The f16 accumulator of the row path, held as f32 values that f16 represents.
    acc: Vec<f32>,
    round: Vec<f16>,
}

impl AttnScratch {
    fn new(hd: usize, hdv: usize) -> Self {
        AttnScratch { q16: vec![0.0; hd], acc: vec![0.0; hdv], round: vec![f16::ZERO; hdv.max(hd)] }
    }
}

/// Round every value through f16 (vectorised F16C/NEON conversions both ways).
fn round_f16(kern: &Kernels, x: &mut [f32], tmp: &mut [f16]) {
    let tmp = &mut tmp[..x.len()];
    kern.f32_to_f16_row(x, tmp);
    kern.f16_to_f32_row(tmp, x);
}

/// One query row the way ggml's `flash_attn_ext_f16_one_chunk` computes it for an
/// f16 cache: q → f16, s = q·k, online softmax, V accumulated in f16.
#[allow(clippy::too_many_arguments)]
fn attend_row_f16<'a>(
    kern: &Kernels,
    sc: &mut AttnScratch,
    q: &[f32],
    keys: std::ops::Range<usize>,
    scale: f32,
    k_at: impl Fn(usize) -> &'a [f16],
    v_at: impl Fn(usize) -> &'a [f16],
    out: &mut [f32],
) {
    sc.q16.copy_from_slice(q);
    round_f16(kern, &mut sc.q16, &mut sc.round);
    sc.acc.iter_mut().for_each(|a| *a = 0.0);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in keys {
        let s = kern.dot_f32_f16(&sc.q16, k_at(j)) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            sc.acc.iter_mut().for_each(|a| *a *= ms);
            round_f16(kern, &mut sc.acc, &mut sc.round);
        } else {
            vs = (s - m).exp();
        }
        kern.axpy_f16(&mut sc.acc, vs, v_at(j));
        round_f16(kern, &mut sc.acc, &mut sc.round);
        sum = sum * ms + vs;
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, &a) in out.iter_mut().zip(&sc.acc) {
        *o = a * inv;
    }
}

/// g = silu(g) * u, rows of `width`.
pub fn swiglu_inplace(pool: &ThreadPool, g: &mut [f32], u: &[f32], width: usize) {
    par_rows(pool, g, width, |i, gs| {
        for (a, &b) in gs.iter_mut().zip(&u[i * width..(i + 1) * width]) {
            *a = *a / (1.0 + (-*a).exp()) * b;
        }
    });
}

/// g = gelu(g) * u, GELU (tanh form) looked up through f16 like ggml's CPU backend.
pub fn geglu_inplace(pool: &ThreadPool, g: &mut [f32], u: &[f32], width: usize) {
    let table = gelu_table();
    par_rows(pool, g, width, |i, gs| {
        for (a, &b) in gs.iter_mut().zip(&u[i * width..(i + 1) * width]) {
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

/// x = gelu(x) in place (tanh form through the f16 table, as ggml's CPU `gelu`).
pub fn gelu_inplace(pool: &ThreadPool, x: &mut [f32], width: usize) {
    let table = gelu_table();
    par_rows(pool, x, width, |_, xs| {
        for a in xs.iter_mut() {
            let v = *a;
            *a = if v <= -10.0 {
                0.0
            } else if v >= 10.0 {
                v
            } else {
                table[f16::from_f32(v).to_bits() as usize].to_f32()
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

#[cfg(test)]
mod rope_shift_tests {
    use super::Rope;
    use crate::threads::ThreadPool;

    /// Turning a row rotated for position p by `shifter(d)` gives the row rotated for
    /// p + d, for both pairings, partial rotary, frequency factors, scaled positions,
    /// an mscale, and negative distances.
    #[test]
    fn shift_equals_rotation_at_the_new_position() {
        let pool = ThreadPool::new(1).unwrap();
        let ff: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 0.25).collect();
        for (neox, n_rot, ff, scale, mscale) in
            [(false, 64, None, 1.0, 1.0), (true, 64, None, 0.125, 1.0), (true, 32, Some(&ff[..]), 1.0, 1.2)]
        {
            let rope = Rope { n_rot, head_dim: 64, base: 10000.0, neox, freq_factors: ff, freq_scale: scale, mscale };
            let x: Vec<f32> = (0..128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            for (p, d) in [(100usize, 7i64), (2000, -13), (40, 3000), (5, 0)] {
                let mut a = x.clone();
                rope.apply(&pool, &mut a, &[p], 2);
                rope.shifter(d)(&mut a);
                let mut b = x.clone();
                rope.apply(&pool, &mut b, &[(p as i64 + d) as usize], 2);
                for (u, v) in a.iter().zip(&b) {
                    assert!((u - v).abs() < 2e-3, "neox {neox} n_rot {n_rot} p {p} d {d}: {u} vs {v}");
                }
            }
        }
    }
}
