//! The mixture-of-experts feed-forward (qwen3moe), as llama.cpp's `build_moe_ffn`
//! computes it for a softmax router:
//!
//! ```text
//! logits = router · x                  [n_expert]     (ffn_gate_inp)
//! p      = softmax(logits)             over all experts, then
//! top    = the n_expert_used largest p, best first (ggml_argsort_top_k)
//! w      = p[top] / Σ p[top]           (when the weights are normalised; × scale)
//! out    = Σ_s w[s] · down_e(silu(gate_e x) · up_e x),  e = top[s], summed in that order
//! ```
//!
//! A step's tokens are grouped by expert so that each expert's weights are read once
//! per step, whatever the batch: the (token, slot) pairs are sorted by expert (stably:
//! token order within an expert), and each expert's run of pairs is one matrix panel
//! against that expert's rows. As in `ops::matmul`, a token's result never depends on
//! which other tokens chose the same expert: the panel computes every token on its own,
//! and in batch-invariant mode a pair takes the same kernel whether alone or not.

use super::{ops, MoeConfig, Op, Profile, Weight};
use crate::quant::Kernels;
use crate::threads::{Disjoint, ThreadPool};

/// One layer's experts, stacked as llama.cpp's 3-D tensors are (GGUF dims
/// `[cols, rows, n_expert]`): expert `x` is rows `x * rows..(x + 1) * rows`.
#[derive(Debug)]
pub struct Experts {
    pub(crate) router: Weight, // [n_expert][n_embd]            ffn_gate_inp
    pub(crate) gate: Weight,   // [n_expert * n_ff_exp][n_embd]  ffn_gate_exps
    pub(crate) up: Weight,     // [n_expert * n_ff_exp][n_embd]  ffn_up_exps
    pub(crate) down: Weight,   // [n_expert * n_embd][n_ff_exp]  ffn_down_exps
    pub(crate) n_expert: usize,
}

/// The router's choice for a step: per token, `n_expert_used` experts best first and
/// their weights (`[n_tok][n_expert_used]` each).
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// One MoE layer's routing in a traced forward (`Model::forward_traced`): the router's
/// input `[n_tok][n_embd]` and what it chose.
#[derive(Clone, Debug)]
pub struct Trace {
    pub layer: usize,
    pub input: Vec<f32>,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Softmax, top-k and weights from router logits `[n_tok][n_expert]`, with ggml's
/// arithmetic: exp(x - max) summed in f64, scaled by the f32 reciprocal; the chosen
/// probabilities summed in f64, the sum clamped to f16's smallest normal (6.1e-5) and
/// divided into each. Ties between equal probabilities go to the lower expert id.
pub fn route(logits: &[f32], m: &MoeConfig) -> Routes {
    let (n, k) = (m.n_expert, m.n_expert_used);
    debug_assert!(logits.len().is_multiple_of(n) && k <= n);
    let n_tok = logits.len() / n;
    let mut experts = Vec::with_capacity(n_tok * k);
    let mut weights = Vec::with_capacity(n_tok * k);
    let mut p = vec![0f32; n];
    let mut order: Vec<u32> = Vec::with_capacity(n);
    for row in logits.chunks_exact(n) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f64;
        for (pi, &l) in p.iter_mut().zip(row) {
            *pi = (l - max).exp();
            sum += *pi as f64;
        }
        let inv = (1.0 / sum) as f32;
        p.iter_mut().for_each(|x| *x *= inv);
        order.clear();
        order.extend(0..n as u32);
        order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
        let chosen = &order[..k];
        let mut w: Vec<f32> = chosen.iter().map(|&e| p[e as usize]).collect();
        if m.norm_weights {
            let s = (w.iter().map(|&x| x as f64).sum::<f64>() as f32).max(6.103_515_6e-5);
            w.iter_mut().for_each(|x| *x /= s);
        }
        if m.weights_scale != 1.0 {
            w.iter_mut().for_each(|x| *x *= m.weights_scale);
        }
        experts.extend_from_slice(chosen);
        weights.extend_from_slice(&w);
    }
    Routes { experts, weights }
}

/// The MoE feed-forward of `n_tok` tokens: `h` `[n_tok][n_embd]` in, `out` `[n_tok][n_embd]`.
/// `solo`/`invariant` as in `ops::matmul`. Returns the routing.
#[allow(clippy::too_many_arguments)]
pub fn ffn(
    pool: &ThreadPool,
    kern: &Kernels,
    x: &Experts,
    m: &MoeConfig,
    h: &[f32],
    n_tok: usize,
    out: &mut [f32],
    solo: &[bool],
    invariant: bool,
    profile: &Profile,
) -> Routes {
    let e = x.router.cols;
    let (k, f) = (m.n_expert_used, m.n_ff_exp);
    debug_assert_eq!(h.len(), n_tok * e);
    debug_assert_eq!(out.len(), n_tok * e);
    let mut logits = vec![0f32; n_tok * x.n_expert];
    profile.time(Op::Matmul, || ops::matmul(pool, kern, &x.router, h, n_tok, &mut logits, solo, invariant));
    let routes = profile.time(Op::Routing, || route(&logits, m));

    // Pairs (token, slot) sorted by expert; `pos[t * k + s]` is where pair (t, s) went.
    let n_pairs = n_tok * k;
    let mut pairs: Vec<u32> = (0..n_pairs as u32).collect();
    pairs.sort_by_key(|&p| routes.experts[p as usize]);
    let mut pos = vec![0usize; n_pairs];
    for (i, &p) in pairs.iter().enumerate() {
        pos[p as usize] = i;
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, &p) in pairs.iter().enumerate() {
        let ex = routes.experts[p as usize] as usize;
        match groups.last_mut() {
            Some(g) if g.expert == ex => g.count += 1,
            _ => groups.push(Group { expert: ex, first: i, count: 1 }),
        }
    }
    let pair_tok: Vec<usize> = pairs.iter().map(|&p| p as usize / k).collect();
    let pair_solo: Vec<bool> = if solo.is_empty() { Vec::new() } else { pair_tok.iter().map(|&t| solo[t]).collect() };

    // gate and up: every pair's copy of its token's input, quantized once per token.
    let mut g = vec![0f32; n_pairs * f];
    let mut u = vec![0f32; n_pairs * f];
    profile.time(Op::Matmul, || {
        if x.gate.ty.vec_dot_type() == x.up.ty.vec_dot_type() {
            let xq = gather(&quantize_rows(pool, kern, x.gate.ty, h, e), act_bytes(x.gate.ty, e), &pair_tok);
            grouped_matmul(
                pool,
                kern,
                &mut [(&x.gate, &mut g), (&x.up, &mut u)],
                f,
                &groups,
                &xq,
                &pair_solo,
                invariant,
            );
        } else {
            for (w, y) in [(&x.gate, &mut g), (&x.up, &mut u)] {
                let xq = gather(&quantize_rows(pool, kern, w.ty, h, e), act_bytes(w.ty, e), &pair_tok);
                grouped_matmul(pool, kern, &mut [(w, y)], f, &groups, &xq, &pair_solo, invariant);
            }
        }
    });
    profile.time(Op::Activation, || ops::swiglu_inplace(pool, &mut g, &u, f));
    // down: the pairs' own inputs, already in expert order.
    let mut d = vec![0f32; n_pairs * e];
    profile.time(Op::Matmul, || {
        let xq = quantize_rows(pool, kern, x.down.ty, &g, f);
        grouped_matmul(pool, kern, &mut [(&x.down, &mut d)], e, &groups, &xq, &pair_solo, invariant);
    });

    // out[t] = (d[t, 0] · w[t, 0]) + (d[t, 1] · w[t, 1]) + ..., in slot order (ggml's
    // multiply, then the views added one after the other).
    profile.time(Op::Routing, || {
        let od = Disjoint::new(out);
        pool.for_ranges(n_tok, 1, 1, |toks| {
            // SAFETY: each task owns the output rows of its token range.
            let rows = unsafe { od.range_mut(toks.start * e..toks.end * e) };
            for (i, o) in rows.chunks_mut(e).enumerate() {
                let t = toks.start + i;
                for s in 0..k {
                    let (p, w) = (pos[t * k + s], routes.weights[t * k + s]);
                    let src = &d[p * e..(p + 1) * e];
                    if s == 0 {
                        o.iter_mut().zip(src).for_each(|(a, &b)| *a = b * w);
                    } else {
                        o.iter_mut().zip(src).for_each(|(a, &b)| *a += b * w);
                    }
                }
            }
        });
    });
    routes
}

/// An expert's run of pairs in expert order.
#[derive(Clone, Copy, Debug)]
struct Group {
    expert: usize,
    first: usize,
    count: usize,
}

/// Bytes of one activation row of `cols` for weights of type `w_ty`.
fn act_bytes(w_ty: crate::quant::GgmlType, cols: usize) -> usize {
    w_ty.vec_dot_type().row_bytes(cols).expect("cols validated at load")
}

/// Rows of `x` (`[n][cols]`) quantized to `w_ty`'s activation format, `[n][act_bytes]`.
fn quantize_rows(pool: &ThreadPool, kern: &Kernels, w_ty: crate::quant::GgmlType, x: &[f32], cols: usize) -> Vec<u8> {
    let act = w_ty.vec_dot_type();
    let arb = act_bytes(w_ty, cols);
    let n = x.len() / cols;
    let mut q = vec![0u8; n * arb];
    let d = Disjoint::new(&mut q);
    pool.for_ranges(n, 1, 1, |rows| {
        // SAFETY: each task owns the quantized rows of its range.
        let dst = unsafe { d.range_mut(rows.start * arb..rows.end * arb) };
        for (i, qr) in dst.chunks_mut(arb).enumerate() {
            let r = rows.start + i;
            kern.quantize_row(act, &x[r * cols..(r + 1) * cols], qr);
        }
    });
    q
}

/// Rows `idx[0], idx[1], ...` of `q` (rows of `arb` bytes), one after the other.
fn gather(q: &[u8], arb: usize, idx: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(idx.len() * arb);
    for &i in idx {
        out.extend_from_slice(&q[i * arb..(i + 1) * arb]);
    }
    out
}

/// `y[p] = W_{e(p)} · x[p]` for pairs sorted by expert, every weight of `mats` against
/// the same activations (`xq`: `[n_pairs][act row bytes]`, quantized for the weights'
/// shared `vec_dot_type`). Each weight is `[n_expert * rows][cols]`; each output
/// `[n_pairs][rows]`. Tasks are (weight, expert, range of its rows), so an expert's
/// weights are read once for all its pairs.
#[allow(clippy::too_many_arguments)]
fn grouped_matmul(
    pool: &ThreadPool,
    kern: &Kernels,
    mats: &mut [(&Weight, &mut [f32])],
    rows: usize,
    groups: &[Group],
    xq: &[u8],
    solo: &[bool],
    invariant: bool,
) {
    let Some((w0, _)) = mats.first() else { return };
    let (cols, act) = (w0.cols, w0.ty.vec_dot_type());
    let arb = act_bytes(w0.ty, cols);
    debug_assert!(mats
        .iter()
        .all(|(w, _)| w.cols == cols && w.ty.vec_dot_type() == act && w.rows.is_multiple_of(rows)));
    let n_pairs = xq.len() / arb.max(1);
    debug_assert!(mats.iter().all(|(_, y)| y.len() == n_pairs * rows));
    // Row ranges: whole groups of 8 rows (the gemm panels), about 4 tasks a thread.
    let want = 4 * pool.n_threads();
    let per = want.div_ceil((groups.len() * mats.len()).max(1));
    let chunk = rows.div_ceil(per).div_ceil(8).max(1) * 8;
    let mut tasks: Vec<(usize, usize, usize, usize)> = Vec::new(); // (mat, group, r0, r1)
    for mi in 0..mats.len() {
        for gi in 0..groups.len() {
            for r0 in (0..rows).step_by(chunk) {
                tasks.push((mi, gi, r0, (r0 + chunk).min(rows)));
            }
        }
    }
    let weights: Vec<&Weight> = mats.iter().map(|(w, _)| *w).collect();
    let outs: Vec<Disjoint<'_, f32>> = mats.iter_mut().map(|(_, y)| Disjoint::new(y)).collect();
    pool.for_each(tasks.len(), |ti| {
        let (mi, gi, r0, r1) = tasks[ti];
        let (w, grp) = (weights[mi], groups[gi]);
        let rb = w.row_bytes();
        let base = grp.expert * rows;
        let wr = &w.bytes()[(base + r0) * rb..(base + r1) * rb];
        let n_r = r1 - r0;
        let pairs = grp.first..grp.first + grp.count;
        let exact = invariant && kern.single_token_matches_panel(w.ty);
        let write = |p: usize, vals: &[f32]| {
            // SAFETY: rows r0..r1 of pair p's output belong to this task alone (tasks
            // split each (weight, expert) into disjoint row ranges, pairs into experts).
            let dst = unsafe { outs[mi].range_mut(p * rows + r0..p * rows + r1) };
            dst.copy_from_slice(vals);
        };
        let mut tile = vec![0f32; grp.count * n_r];
        if !invariant || exact || solo.is_empty() {
            // One call for the expert's pairs: a lone pair takes the one-token kernel
            // (llama.cpp's arithmetic, or with `exact` the panel's own).
            let a = &xq[grp.first * arb..(grp.first + grp.count) * arb];
            if grp.count == 1 && exact {
                kern.gemm_exact(w.ty, cols, wr, n_r, a, 1, &mut tile, n_r);
            } else {
                kern.gemm(w.ty, cols, wr, n_r, a, grp.count, &mut tile, n_r);
            }
            for (i, p) in pairs.enumerate() {
                write(p, &tile[i * n_r..(i + 1) * n_r]);
            }
            return;
        }
        // Batch-invariant, where the one-token kernel differs from the panel: decode
        // pairs go one by one (as alone in a step), prompt pairs through the panel,
        // a lone one beside a copy of itself (the panel computes each row on its own).
        let (panel, alone): (Vec<usize>, Vec<usize>) = pairs.partition(|&p| !solo[p]);
        if !panel.is_empty() {
            let mut a: Vec<u8> = panel.iter().flat_map(|&p| xq[p * arb..(p + 1) * arb].iter().copied()).collect();
            let n = if panel.len() == 1 {
                a.extend_from_within(..arb);
                2
            } else {
                panel.len()
            };
            let mut tp = vec![0f32; n * n_r];
            kern.gemm(w.ty, cols, wr, n_r, &a, n, &mut tp, n_r);
            for (i, &p) in panel.iter().enumerate() {
                write(p, &tp[i * n_r..(i + 1) * n_r]);
            }
        }
        for &p in &alone {
            kern.gemm(w.ty, cols, wr, n_r, &xq[p * arb..(p + 1) * arb], 1, &mut tile[..n_r], n_r);
            write(p, &tile[..n_r]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Gguf, GgufWriter};
    use crate::quant::{self, GgmlType};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// `n` experts of `rows` × `cols` in format `ty`, stacked as a file stores them.
    fn stacked(ty: GgmlType, n: usize, rows: usize, cols: usize, seed: u64) -> (Weight, Vec<f32>) {
        let x = rand(n * rows * cols, seed);
        let rb = ty.row_bytes(cols).unwrap();
        let mut data = vec![0u8; n * rows * rb];
        for r in 0..n * rows {
            quant::quantize_row(ty, &x[r * cols..(r + 1) * cols], &mut data[r * rb..(r + 1) * rb]);
        }
        let deq = quant::dequantize(ty, &data, n * rows * cols);
        let mut w = GgufWriter::new();
        w.tensor("e", &[cols as u64, rows as u64, n as u64], ty, data);
        let g = Gguf::from_bytes(w.to_bytes()).unwrap();
        (Weight::new(ty, n * rows, cols, g.tensor_data("e").unwrap()), deq)
    }

    /// The grouped product against f64 dot products of the dequantized weights and the
    /// activations as quantized, at every kernel level this CPU has (the NEON levels
    /// under qemu, scripts/test_arm.sh); and in batch-invariant mode, each pair's row is
    /// bit for bit what it is when the pair is alone in its expert.
    #[test]
    fn grouped_matmul_matches_f64_and_is_batch_invariant() {
        let (n_expert, rows, cols) = (4, 24, 256);
        // 10 pairs: experts 0 (3 pairs), 2 (1), 3 (6).
        let groups = [
            Group { expert: 0, first: 0, count: 3 },
            Group { expert: 2, first: 3, count: 1 },
            Group { expert: 3, first: 4, count: 6 },
        ];
        let n_pairs = 10;
        let x = rand(n_pairs * cols, 99);
        for level in Kernels::available() {
            let kern = Kernels::for_level(level).unwrap();
            let pool = ThreadPool::new(2).unwrap();
            for ty in [GgmlType::F16, GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
                let (w, deq) = stacked(ty, n_expert, rows, cols, ty as u64 + 7);
                let act = ty.vec_dot_type();
                let xq = quantize_rows(&pool, kern, ty, &x, cols);
                let xa = quant::dequantize(act, &xq, n_pairs * cols);
                for invariant in [false, true] {
                    for solo_all in [false, true] {
                        let solo = vec![solo_all; n_pairs];
                        let mut y = vec![0f32; n_pairs * rows];
                        grouped_matmul(&pool, kern, &mut [(&w, &mut y)], rows, &groups, &xq, &solo, invariant);
                        for g in &groups {
                            for p in g.first..g.first + g.count {
                                for r in 0..rows {
                                    let wr = &deq[(g.expert * rows + r) * cols..][..cols];
                                    let xr = &xa[p * cols..(p + 1) * cols];
                                    let want: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                                    let scale: f64 =
                                        wr.iter().zip(xr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                                    let got = y[p * rows + r] as f64;
                                    assert!(
                                        (got - want).abs() <= 1e-3 * scale + 1e-6,
                                        "{} {ty:?} pair {p} row {r}: {got} vs {want}",
                                        level.name()
                                    );
                                }
                                if invariant {
                                    // The same pair alone in its expert.
                                    let one = [Group { expert: g.expert, first: 0, count: 1 }];
                                    let arb = act.row_bytes(cols).unwrap();
                                    let mut y1 = vec![0f32; rows];
                                    grouped_matmul(
                                        &pool,
                                        kern,
                                        &mut [(&w, &mut y1)],
                                        rows,
                                        &one,
                                        &xq[p * arb..(p + 1) * arb],
                                        &solo[..1],
                                        true,
                                    );
                                    assert_eq!(
                                        y1,
                                        y[p * rows..(p + 1) * rows],
                                        "{} {ty:?} pair {p} (solo {solo_all}): alone differs",
                                        level.name()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn cfg(n_expert: usize, k: usize, norm: bool, scale: f32) -> MoeConfig {
        MoeConfig { n_expert, n_expert_used: k, n_ff_exp: 8, norm_weights: norm, weights_scale: scale }
    }

    /// The router against a float64 softmax/top-k/normalisation, with ties broken
    /// towards the lower expert id.
    #[test]
    fn route_matches_f64_reference() {
        let n = 16;
        let logits: Vec<f32> = (0..5 * n).map(|i| (((i * 37) % 23) as f32 - 11.0) * 0.37).collect();
        for (k, norm, scale) in [(1, true, 1.0), (4, true, 1.0), (4, false, 1.0), (8, true, 2.5), (16, true, 1.0)] {
            let r = route(&logits, &cfg(n, k, norm, scale));
            for (t, row) in logits.chunks(n).enumerate() {
                let max = row.iter().map(|&x| x as f64).fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
                let s: f64 = ex.iter().sum();
                let p: Vec<f64> = ex.iter().map(|x| x / s).collect();
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
                let top = &idx[..k];
                let tot: f64 = top.iter().map(|&i| p[i]).sum();
                for (s_, &e) in top.iter().enumerate() {
                    assert_eq!(r.experts[t * k + s_] as usize, e, "token {t} slot {s_} (k {k})");
                    let want = if norm { p[e] / tot } else { p[e] } * scale as f64;
                    let got = r.weights[t * k + s_] as f64;
                    assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "token {t} slot {s_}: {got} vs {want}");
                }
            }
        }
    }
}
