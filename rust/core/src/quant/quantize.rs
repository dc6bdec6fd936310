//! Reference encoders: ggml's `quantize_row_*_ref` (ggml-quants.c), and the f32 → f16 /
//! bf16 conversions of `ggml_cpu_fp32_to_fp16/bf16`.
//!
//! These decide which integer each weight becomes, so a single differently rounded
//! float flips a quant and the file no longer matches llama-quantize's. Every float
//! expression therefore keeps ggml's operand order and types (an `int * float` in C is
//! `(i as f32) * x` here), and rounding goes through the same helpers: `nearest_int`
//! (round half to even, via the 1.5·2^23 trick), `f32::round` (C `roundf`: half away
//! from zero), and truncating casts where C truncates.
//!
//! Callers (`super::quantize_row`) have checked the row lengths.

// Index loops mirror ggml's C line for line, which is what makes them checkable.
#![allow(clippy::needless_range_loop)]

use super::blocks::{
    write_block, Block, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K,
    BlockQ6_K, BlockQ8_0, BlockQ8_1, BlockQ8_K, K_SCALE_SIZE, QK_K,
};
use super::reference::{get_scale_min_k4, q3_k_scales};
use super::GgmlType;
use half::f16;

/// ggml's threshold below which a group counts as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

pub(super) fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    use GgmlType::*;
    match ty {
        F32 => {
            for (y, x) in dst.chunks_exact_mut(4).zip(src) {
                y.copy_from_slice(&x.to_le_bytes());
            }
        }
        F16 => {
            for (y, x) in dst.chunks_exact_mut(2).zip(src) {
                y.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        BF16 => {
            for (y, x) in dst.chunks_exact_mut(2).zip(src) {
                y.copy_from_slice(&fp32_to_bf16_bits(*x).to_le_bytes());
            }
        }
        Q4_0 => each_block(src, dst, quantize_block_q4_0),
        Q4_1 => each_block(src, dst, quantize_block_q4_1),
        Q5_0 => each_block(src, dst, quantize_block_q5_0),
        Q5_1 => each_block(src, dst, quantize_block_q5_1),
        Q8_0 => each_block(src, dst, quantize_block_q8_0),
        Q8_1 => each_block(src, dst, quantize_block_q8_1),
        Q2_K => each_block(src, dst, quantize_block_q2_k),
        Q3_K => each_block(src, dst, quantize_block_q3_k),
        Q4_K => each_block(src, dst, quantize_block_q4_k),
        Q5_K => each_block(src, dst, quantize_block_q5_k),
        Q6_K => each_block(src, dst, quantize_block_q6_k),
        Q8_K => each_block(src, dst, quantize_block_q8_k),
    }
}

/// Runs a per-block encoder over a row: `N` floats in, one `B` out.
#[inline(always)]
fn each_block<const N: usize, B: Block>(src: &[f32], dst: &mut [u8], f: fn(&[f32; N]) -> B) {
    for (x, y) in src.chunks_exact(N).zip(dst.chunks_exact_mut(B::SIZE)) {
        let x: &[f32; N] = x.try_into().expect("chunks_exact yields N");
        write_block(y, &f(x));
    }
}

/// `ggml_compute_fp32_to_bf16`: round to nearest even; NaN stays NaN (made quiet), where
/// plain rounding could carry a NaN's payload into the exponent and yield infinity.
fn fp32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
}

/// ggml's `nearest_int`: adding 1.5·2^23 makes the FPU round to an integer (half to
/// even) in the low mantissa bits. Only meaningful for |x| ≤ 2^22; ggml asserts that in
/// debug builds only, and we reproduce its release-build bits for any input.
#[inline(always)]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// C's `MAX(a, b)` = `a > b ? a : b`: unlike `f32::max`, a NaN in `b` wins.
#[inline(always)]
fn c_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `x` scaled by `1/d`, or zero when `d` is zero (`d ? 1.0f/d : 0.0f`).
#[inline(always)]
fn inv_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

// ---- 32-element blocks ----------------------------------------------------------------

/// The value of largest magnitude, with its sign (first one wins on ties).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn quantize_block_q4_0(x: &[f32; 32]) -> BlockQ4_0 {
    // d is chosen so the extreme value maps to -8 exactly, using the full 16 levels.
    let d = signed_absmax(x) / -8.0;
    let id = inv_or_zero(d);
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let xi0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let xi1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        qs[j] = xi0 | (xi1 << 4);
    }
    BlockQ4_0 { d: f16::from_f32(d), qs }
}

fn quantize_block_q4_1(x: &[f32; 32]) -> BlockQ4_1 {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = inv_or_zero(d);
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let xi0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let xi1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        qs[j] = xi0 | (xi1 << 4);
    }
    BlockQ4_1 { d: f16::from_f32(d), m: f16::from_f32(min), qs }
}

fn quantize_block_q5_0(x: &[f32; 32]) -> BlockQ5_0 {
    let d = signed_absmax(x) / -16.0;
    let id = inv_or_zero(d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        let xi0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let xi1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    BlockQ5_0 { d: f16::from_f32(d), qh: qh.to_le_bytes(), qs }
}

fn quantize_block_q5_1(x: &[f32; 32]) -> BlockQ5_1 {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = inv_or_zero(d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        // No clamp in ggml: (x - min) * id ≤ 31 up to rounding, and +0.5 truncates.
        let xi0 = ((x[j] - min) * id + 0.5) as u8;
        let xi1 = ((x[j + 16] - min) * id + 0.5) as u8;
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    BlockQ5_1 { d: f16::from_f32(d), m: f16::from_f32(min), qh: qh.to_le_bytes(), qs }
}

fn quantize_block_q8_0(x: &[f32; 32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0f32, |a, v| c_max(a, v.abs()));
    let d = amax / 127.0;
    let id = inv_or_zero(d);
    let qs = x.map(|v| (v * id).round() as i8);
    BlockQ8_0 { d: f16::from_f32(d), qs }
}

fn quantize_block_q8_1(x: &[f32; 32]) -> BlockQ8_1 {
    let amax = x.iter().fold(0f32, |a, v| c_max(a, v.abs()));
    let d = amax / 127.0;
    let id = inv_or_zero(d);
    let qs = x.map(|v| (v * id).round() as i8);
    let sum: i32 = qs.iter().map(|&q| q as i32).sum();
    // s is d times the sum of the *rounded* quants, computed in f32 before f16 rounding.
    BlockQ8_1 { d: f16::from_f32(d), s: f16::from_f32(sum as f32 * d), qs }
}

// ---- Q8_K ------------------------------------------------------------------------------

fn quantize_block_q8_k(x: &[f32; QK_K]) -> BlockQ8_K {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        // ggml leaves bsums as they were here; we zero them (they multiply zeros anyway).
        return BlockQ8_K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
    }
    // -127 rather than -128: ggml changed it so the IQ2_XXS AVX dot can negate quants.
    let iscale = -127.0 / max;
    let qs = x.map(|v| nearest_int(iscale * v).min(127) as i8);
    let bsums = std::array::from_fn(|j| qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum::<i32>() as i16);
    BlockQ8_K { d: 1.0 / iscale, qs, bsums }
}

// ---- K-quant helpers (make_*_quants in ggml-quants.c) ----------------------------------

/// Symmetric fit for Q6_K (ggml's `make_qx_quants` with `rmse_type == 1` and no
/// importance weights): quants in `0..2*nmax` (biased by `nmax`) and a scale chosen,
/// among 19 candidate `iscale`s, to minimise the x²-weighted squared error.
fn make_qx_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let mut iscale = -nmax_f / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            sumlx += w * xi * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let l = nearest_int(iscale * x[i]);
                l_out[i] = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Symmetric fit for Q3_K (`make_q3_quants` with `do_rmse`): start from the plain
/// rounding, then up to 5 sweeps of coordinate descent on the x²-weighted error.
/// Quants come out biased by `nmax` (0..2*nmax).
fn make_q3_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = l as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l_out[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for l in &mut l_out[..n] {
        *l += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Asymmetric fit `x ≈ scale*L - min` for Q2_K/Q4_K/Q5_K (`make_qkx2_quants`): quants
/// `0..=nmax`, min clamped to ≤ 0 (returned negated, so ≥ 0), trying `nstep+1`
/// stretched `iscale`s and a weighted least-squares refit for each; keeps the best by
/// weighted squared (or absolute, `use_mad`) error. Returns (scale, min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let err = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    let laux = &mut laux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 2-bit quants of a 256 block as Q2_K/Q3_K do: element 128*n + 32*j + l goes to
/// bits 2j of byte 32*n + l.
fn pack_2bit(l: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for n in 0..2 {
        let l = &l[128 * n..128 * n + 128];
        for i in 0..32 {
            qs[32 * n + i] = l[i] | (l[i + 32] << 2) | (l[i + 64] << 4) | (l[i + 96] << 6);
        }
    }
    qs
}

/// Packs the 6-bit scales and mins of Q4_K/Q5_K (inverse of `get_scale_min_k4`).
fn pack_scales_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut s = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// The per-32 scale/min fit shared by Q4_K and Q5_K, through the 6-bit requantization
/// of scales and mins; returns the block header and the quants (0..=nmax).
fn fit_k4(x: &[f32; QK_K], nmax: i32, rmin: f32, nstep: i32) -> (f16, f16, [u8; K_SCALE_SIZE], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xb = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xb {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xb[i].abs());
        let lb = &mut l[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(xb, &weights, nmax, lb, rmin, 0.1, nstep, false);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // ggml stores nearest_int's result in a uint8_t before MIN(63, ·): keep the wrap.
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let packed = pack_scales_k4(&ls, &lm);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);

    // Requantize against the scales as stored (6-bit, times an f16 d), not the fitted ones.
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

// ---- K-quant encoders ------------------------------------------------------------------

fn quantize_block_q2_k(x: &[f32; QK_K]) -> BlockQ2_K {
    const Q4SCALE: f32 = 15.0;
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xb = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|i| xb[i].abs());
        let lb = &mut l[16 * j..16 * j + 16];
        (scales[j], mins[j]) = make_qkx2_quants(xb, &weights, 3, lb, -0.5, 0.1, 15, true);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let mut sc = [0u8; 16];
    let d = if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        f16::from_f32(max_scale / Q4SCALE)
    } else {
        f16::from_f32(0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        f16::from_f32(max_min / Q4SCALE)
    } else {
        f16::from_f32(0.0)
    };

    for j in 0..16 {
        let dj = d.to_f32() * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int((x[16 * j + ii] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    BlockQ2_K { scales: sc, qs: pack_2bit(&l), d, dmin }
}

fn quantize_block_q3_k(x: &[f32; QK_K]) -> BlockQ3_K {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }

    let mut packed = [0u8; 12];
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // ggml: int8_t l = nearest_int(...) (truncating), then clamp and bias.
            let lj = ((nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                packed[j] = lj & 0xF;
            } else {
                packed[j - 8] |= (lj & 0xF) << 4;
            }
            packed[8 + j % 4] |= (lj >> 4) << (2 * (j / 4));
        }
        f16::from_f32(1.0 / iscale)
    } else {
        f16::from_f32(0.0)
    };

    let sc = q3_k_scales(&packed);
    for j in 0..16 {
        let dj = d.to_f32() * (sc[j] as i32 - 32) as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int(x[16 * j + ii] / dj).clamp(-4, 3) as i8 + 4;
        }
    }

    // Quants are 0..=7 here; bit 2 moves to hmask (element i → bit i/32 of byte i%32).
    let mut hmask = [0u8; QK_K / 8];
    let mut low = [0u8; QK_K];
    for i in 0..QK_K {
        let mut li = l[i] as u8;
        if li > 3 {
            hmask[i % 32] |= 1 << (i / 32);
            li -= 4;
        }
        low[i] = li;
    }
    BlockQ3_K { hmask, qs: pack_2bit(&low), scales: packed, d }
}

fn quantize_block_q4_k(x: &[f32; QK_K]) -> BlockQ4_K {
    let (d, dmin, scales, l) = fit_k4(x, 15, -1.0, 20);
    let mut qs = [0u8; QK_K / 2];
    for k in 0..4 {
        for i in 0..32 {
            qs[32 * k + i] = l[64 * k + i] | (l[64 * k + 32 + i] << 4);
        }
    }
    BlockQ4_K { d, dmin, scales, qs }
}

fn quantize_block_q5_k(x: &[f32; QK_K]) -> BlockQ5_K {
    let (d, dmin, scales, l) = fit_k4(x, 31, -0.5, 15);
    let mut qs = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 8];
    for k in 0..4 {
        let (m1, m2) = (1u8 << (2 * k), 2u8 << (2 * k));
        for i in 0..32 {
            let (mut l1, mut l2) = (l[64 * k + i], l[64 * k + 32 + i]);
            if l1 > 15 {
                l1 -= 16;
                qh[i] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[i] |= m2;
            }
            qs[32 * k + i] = l1 | (l2 << 4);
        }
    }
    BlockQ5_K { d, dmin, scales, qh, qs }
}

fn quantize_block_q6_k(x: &[f32; QK_K]) -> BlockQ6_K {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        scales[ib] = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
        if scales[ib].abs() > max_abs_scale {
            max_abs_scale = scales[ib].abs();
            max_scale = scales[ib];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return BlockQ6_K { ql: [0; QK_K / 2], qh: [0; QK_K / 4], scales: [0; QK_K / 16], d: f16::from_f32(0.0) };
    }

    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
        }
    }

    // Inverse of `q6_k_quants` in reference.rs.
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for n in 0..2 {
        let l = &l[128 * n..128 * n + 128];
        for i in 0..32 {
            let q = [l[i] as u8, l[i + 32] as u8, l[i + 64] as u8, l[i + 96] as u8];
            ql[64 * n + i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
            ql[64 * n + i + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
            qh[32 * n + i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
    BlockQ6_K { ql, qh, scales: sc, d }
}
