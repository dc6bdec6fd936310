//! Scalar decode and dot kernels, one pair per format, in ggml's arithmetic order.
//!
//! Decode matches `dequantize_row_*` in `ggml-quants.c`; dots match
//! `ggml_vec_dot_*_generic` in `ggml-cpu/quants.c`. Integer sums are exact, so their
//! order is free and the loops below are shaped for LLVM to vectorise (fixed-size
//! arrays, i32 accumulators). Float operations are not reordered: each `*`, `+` and
//! `-` on f32 sits where ggml has it, because a reassociated sum is a different number.
//!
//! Trap: GCC compiles GNU C with `-ffp-contract=fast`, so a ggml built with FMA enabled
//! (`GGML_NATIVE` on any recent x86) fuses `sumf += d * sumi` into one rounding and its
//! dots differ from these in the last bits. Against ggml's generic kernels compiled with
//! `-ffp-contract=off` every dot here is bit-identical (and so are decode and encode
//! against `libggml-base`, which is built without `-march`). Rust never contracts.
//!
//! Callers (`super::dequantize_row`, `super::vec_dot`) have checked the row lengths.

// Index loops mirror ggml's C line for line, which is what makes them checkable.
#![allow(clippy::needless_range_loop)]

use super::blocks::{
    blocks, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K,
    BlockQ8_0, BlockQ8_1, BlockQ8_K, QK_K,
};
use super::GgmlType;
use half::{bf16, f16};

pub(super) fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    use GgmlType::*;
    match ty {
        F32 => {
            for (y, x) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *y = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            }
        }
        F16 => {
            for (y, x) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = f16::from_le_bytes([x[0], x[1]]).to_f32();
            }
        }
        BF16 => {
            for (y, x) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = bf16::from_le_bytes([x[0], x[1]]).to_f32();
            }
        }
        Q4_0 => dequantize_row_q4_0(src, dst),
        Q4_1 => dequantize_row_q4_1(src, dst),
        Q5_0 => dequantize_row_q5_0(src, dst),
        Q5_1 => dequantize_row_q5_1(src, dst),
        Q8_0 => dequantize_row_q8_0(src, dst),
        Q8_1 => dequantize_row_q8_1(src, dst),
        Q2_K => dequantize_row_q2_k(src, dst),
        Q3_K => dequantize_row_q3_k(src, dst),
        Q4_K => dequantize_row_q4_k(src, dst),
        Q5_K => dequantize_row_q5_k(src, dst),
        Q6_K => dequantize_row_q6_k(src, dst),
        Q8_K => dequantize_row_q8_k(src, dst),
    }
}

pub(super) fn vec_dot(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
    use GgmlType::*;
    match ty {
        F32 => vec_dot_f32(w, a),
        F16 => vec_dot_f16(w, a),
        BF16 => vec_dot_bf16(w, a),
        Q4_0 => vec_dot_q4_0_q8_0(w, a),
        Q4_1 => vec_dot_q4_1_q8_1(w, a),
        Q5_0 => vec_dot_q5_0_q8_0(w, a),
        Q5_1 => vec_dot_q5_1_q8_1(w, a),
        Q8_0 => vec_dot_q8_0_q8_0(w, a),
        Q8_1 => vec_dot_q8_1_q8_1(w, a),
        Q2_K => vec_dot_q2_k_q8_k(w, a),
        Q3_K => vec_dot_q3_k_q8_k(w, a),
        Q4_K => vec_dot_q4_k_q8_k(w, a),
        Q5_K => vec_dot_q5_k_q8_k(w, a),
        Q6_K => vec_dot_q6_k_q8_k(w, a),
        Q8_K => vec_dot_q8_k_q8_k(w, a),
    }
}

/// `dst` split into fixed-size arrays, so the per-block loops have constant bounds.
#[inline(always)]
fn out_blocks<const N: usize>(dst: &mut [f32]) -> impl Iterator<Item = &mut [f32; N]> {
    dst.chunks_exact_mut(N).map(|c| c.try_into().expect("chunks_exact_mut yields N"))
}

// ---- shared unpacking of packed scales ------------------------------------------------

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block: six bits each, packed
/// in 12 bytes. j<4: low 6 bits of bytes j and j+4. j≥4: a nibble of byte j+4 plus
/// the top two bits of bytes j-4 (scale) and j (min). ggml's `get_scale_min_k4`.
#[inline(always)]
pub(super) fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The 16 six-bit scales of a Q3_K block, still biased by 32. Scale j has its low
/// nibble in byte j (j<8) or the high nibble of byte j-8, and its top two bits at bit
/// 2*(j/4) of byte 8 + j%4. Equivalent to ggml's kmask1/kmask2 u32 shuffle.
#[inline(always)]
pub(super) fn q3_k_scales(s: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (lo | (hi << 4)) as i8;
    }
    out
}

// ---- decode: 32-element blocks ------------------------------------------------------

fn dequantize_row_q4_0(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ4_0>(src).zip(out_blocks::<32>(dst)) {
        let d = x.d.to_f32();
        for j in 0..16 {
            let x0 = (x.qs[j] & 0x0F) as i32 - 8;
            let x1 = (x.qs[j] >> 4) as i32 - 8;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
    }
}

fn dequantize_row_q4_1(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ4_1>(src).zip(out_blocks::<32>(dst)) {
        let d = x.d.to_f32();
        let m = x.m.to_f32();
        for j in 0..16 {
            y[j] = (x.qs[j] & 0x0F) as f32 * d + m;
            y[j + 16] = (x.qs[j] >> 4) as f32 * d + m;
        }
    }
}

fn dequantize_row_q5_0(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ5_0>(src).zip(out_blocks::<32>(dst)) {
        let d = x.d.to_f32();
        let qh = u32::from_le_bytes(x.qh);
        for j in 0..16 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = ((x.qs[j] & 0x0F) | xh_0) as i32 - 16;
            let x1 = ((x.qs[j] >> 4) | xh_1) as i32 - 16;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
    }
}

fn dequantize_row_q5_1(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ5_1>(src).zip(out_blocks::<32>(dst)) {
        let d = x.d.to_f32();
        let m = x.m.to_f32();
        let qh = u32::from_le_bytes(x.qh);
        for j in 0..16 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = ((x.qs[j] & 0x0F) | xh_0) as f32 * d + m;
            y[j + 16] = ((x.qs[j] >> 4) | xh_1) as f32 * d + m;
        }
    }
}

fn dequantize_row_q8_0(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ8_0>(src).zip(out_blocks::<32>(dst)) {
        let d = x.d.to_f32();
        for j in 0..32 {
            y[j] = x.qs[j] as f32 * d;
        }
    }
}

/// ggml has no decoder for Q8_1 (it only ever feeds dots); this is the obvious one.
fn dequantize_row_q8_1(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ8_1>(src).zip(out_blocks::<32>(dst)) {
        let d = x.d.to_f32();
        for j in 0..32 {
            y[j] = x.qs[j] as f32 * d;
        }
    }
}

// ---- decode: K-quant super-blocks -----------------------------------------------------

fn dequantize_row_q2_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ2_K>(src).zip(out_blocks::<QK_K>(dst)) {
        let d = x.d.to_f32();
        let min = x.dmin.to_f32();
        // Element 128*n + 32*j + l is 2 bits at shift 2*j of qs[32*n + l]; each run of
        // 16 has its own scale byte, in element order.
        for n in 0..2 {
            for j in 0..4 {
                let shift = 2 * j;
                for side in 0..2 {
                    let sc = x.scales[8 * n + 2 * j + side];
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for l in 0..16 {
                        let q = (x.qs[32 * n + 16 * side + l] >> shift) & 3;
                        y[128 * n + 32 * j + 16 * side + l] = dl * q as f32 - ml;
                    }
                }
            }
        }
    }
}

fn dequantize_row_q3_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ3_K>(src).zip(out_blocks::<QK_K>(dst)) {
        let d_all = x.d.to_f32();
        let scales = q3_k_scales(&x.scales);
        // Layout as Q2_K, plus: the high bit of element 128*n + 32*j + l is bit 4*n + j
        // of hmask[l]; a *clear* bit subtracts 4 (so q ranges -4..=3).
        for n in 0..2 {
            for j in 0..4 {
                let shift = 2 * j;
                let m = 1u8 << (4 * n + j);
                for side in 0..2 {
                    let dl = d_all * (scales[8 * n + 2 * j + side] as i32 - 32) as f32;
                    for l in 0..16 {
                        let i = 16 * side + l;
                        let q = ((x.qs[32 * n + i] >> shift) & 3) as i32 - if x.hmask[i] & m != 0 { 0 } else { 4 };
                        y[128 * n + 32 * j + i] = dl * q as f32;
                    }
                }
            }
        }
    }
}

fn dequantize_row_q4_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ4_K>(src).zip(out_blocks::<QK_K>(dst)) {
        let d = x.d.to_f32();
        let min = x.dmin.to_f32();
        // 64 elements per step: the low nibbles of 32 bytes, then their high nibbles.
        for k in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * k, &x.scales);
            let (sc2, m2) = get_scale_min_k4(2 * k + 1, &x.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                let q = x.qs[32 * k + l];
                y[64 * k + l] = d1 * (q & 0xF) as f32 - m1;
                y[64 * k + 32 + l] = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

fn dequantize_row_q5_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ5_K>(src).zip(out_blocks::<QK_K>(dst)) {
        let d = x.d.to_f32();
        let min = x.dmin.to_f32();
        // As Q4_K; the 5th bit of element 64*k + l is bit 2k of qh[l], of element
        // 64*k + 32 + l bit 2k+1.
        for k in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * k, &x.scales);
            let (sc2, m2) = get_scale_min_k4(2 * k + 1, &x.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
            for l in 0..32 {
                let q = x.qs[32 * k + l];
                let h1 = if x.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if x.qh[l] & u2 != 0 { 16 } else { 0 };
                y[64 * k + l] = d1 * ((q & 0xF) as i32 + h1) as f32 - m1;
                y[64 * k + 32 + l] = d2 * ((q >> 4) as i32 + h2) as f32 - m2;
            }
        }
    }
}

/// The 256 signed quants of a Q6_K block (-32..=31), in element order. Element
/// 128*n + 32*i + l has its low nibble in ql[64*n + 32*(i&1) + l] (high nibble when
/// i≥2) and its top two bits at bit 2*i of qh[32*n + l].
#[inline(always)]
fn q6_k_quants(x: &BlockQ6_K) -> [i8; QK_K] {
    let mut a = [0i8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (&x.ql[64 * n..64 * n + 64], &x.qh[32 * n..32 * n + 32]);
        let a = &mut a[128 * n..128 * n + 128];
        for l in 0..32 {
            a[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            a[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            a[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            a[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    a
}

fn dequantize_row_q6_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ6_K>(src).zip(out_blocks::<QK_K>(dst)) {
        let d = x.d.to_f32();
        let q = q6_k_quants(&x);
        // ggml computes (d * sc) * q per element; keep that grouping.
        for (g, (y, q)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let ds = d * x.scales[g] as f32;
            for (y, &q) in y.iter_mut().zip(q) {
                *y = ds * q as f32;
            }
        }
    }
}

fn dequantize_row_q8_k(src: &[u8], dst: &mut [f32]) {
    for (x, y) in blocks::<BlockQ8_K>(src).zip(out_blocks::<QK_K>(dst)) {
        for j in 0..QK_K {
            y[j] = x.d * x.qs[j] as f32;
        }
    }
}

// ---- dots: float rows -------------------------------------------------------------------
//
// ggml's scalar branch multiplies in f32 and accumulates in f64 (`ggml_float`), one
// element at a time. That chain does not vectorise; SIMD backends replace it.

fn vec_dot_f32(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in w.chunks_exact(4).zip(a.chunks_exact(4)) {
        let x = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
        let y = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
        sum += (x * y) as f64;
    }
    sum as f32
}

fn vec_dot_f16(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        let x = f16::from_le_bytes([x[0], x[1]]).to_f32();
        let y = f16::from_le_bytes([y[0], y[1]]).to_f32();
        sum += (x * y) as f64;
    }
    sum as f32
}

fn vec_dot_bf16(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        let x = bf16::from_le_bytes([x[0], x[1]]).to_f32();
        let y = bf16::from_le_bytes([y[0], y[1]]).to_f32();
        sum += (x * y) as f64;
    }
    sum as f32
}

// ---- dots: 32-element blocks ------------------------------------------------------------

fn vec_dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ4_0>(w).zip(blocks::<BlockQ8_0>(a)) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x.qs[j] & 0x0F) as i32 - 8;
            let v1 = (x.qs[j] >> 4) as i32 - 8;
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
        }
        sumf += sumi as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sumf
}

fn vec_dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ4_1>(w).zip(blocks::<BlockQ8_1>(a)) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x.qs[j] & 0x0F) as i32;
            let v1 = (x.qs[j] >> 4) as i32;
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
        }
        // Σ (d_x q_x + m)(d_y q_y) = d_x d_y Σ q_x q_y + m · (d_y Σ q_y) = … + m · s.
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

/// The 32 five-bit quants of a Q5_0/Q5_1 block, unbiased, in element order.
#[inline(always)]
fn q5_quants(qs: &[u8; 16], qh: [u8; 4]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) << 4) & 0x10) as u8);
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
    }
    q
}

fn vec_dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ5_0>(w).zip(blocks::<BlockQ8_0>(a)) {
        let q = q5_quants(&x.qs, x.qh);
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += (q[j] as i32 - 16) * y.qs[j] as i32;
        }
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32;
    }
    sumf
}

fn vec_dot_q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ5_1>(w).zip(blocks::<BlockQ8_1>(a)) {
        let q = q5_quants(&x.qs, x.qh);
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += q[j] as i32 * y.qs[j] as i32;
        }
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

fn vec_dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ8_0>(w).zip(blocks::<BlockQ8_0>(a)) {
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += x.qs[j] as i32 * y.qs[j] as i32;
        }
        sumf += sumi as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sumf
}

/// Not in ggml (Q8_1 is never a weight there); same shape as Q8_0·Q8_0.
fn vec_dot_q8_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ8_1>(w).zip(blocks::<BlockQ8_1>(a)) {
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += x.qs[j] as i32 * y.qs[j] as i32;
        }
        sumf += sumi as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sumf
}

// ---- dots: K-quant super-blocks ---------------------------------------------------------

fn vec_dot_q2_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ2_K>(w).zip(blocks::<BlockQ8_K>(a)) {
        // The mins term needs only the activation's per-16 sums.
        let mut summs = 0i32;
        for j in 0..16 {
            summs += y.bsums[j] as i32 * (x.scales[j] >> 4) as i32;
        }
        let dall = y.d * x.d.to_f32();
        let dmin = y.d * x.dmin.to_f32();

        let mut isum = 0i32;
        for n in 0..2 {
            for j in 0..4 {
                let shift = 2 * j;
                for side in 0..2 {
                    let d = (x.scales[8 * n + 2 * j + side] & 0xF) as i32;
                    let mut isuml = 0i32;
                    for l in 0..16 {
                        let q = ((x.qs[32 * n + 16 * side + l] >> shift) & 3) as i32;
                        isuml += y.qs[128 * n + 32 * j + 16 * side + l] as i32 * q;
                    }
                    isum += d * isuml;
                }
            }
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// ggml's K-quant dots (Q3_K…Q6_K) keep eight lane sums: lane l accumulates
/// `scale(g) * q8[8g+l] * q[8g+l]` over the 32 groups of 8 in a block (exact, i32), then
/// `sums[l] += d * lane` in f32 per block, and only at the end adds the eight lanes.
/// The lane split changes the float result, so we keep it. `scale_of_16[i]` is the
/// scale of elements 16i..16i+16.
#[inline(always)]
fn lane_sums(q: &[i8; QK_K], q8: &[i8; QK_K], scale_of_16: &[i32; 16]) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    for g in 0..QK_K / 8 {
        let s = scale_of_16[g / 2];
        for l in 0..8 {
            // ggml stores q8*q in an i16 first; |q8*q| ≤ 128*32 fits, so no wrap.
            aux32[l] += s * (q8[8 * g + l] as i32 * q[8 * g + l] as i32);
        }
    }
    aux32
}

#[inline(always)]
fn add_lanes(sums: &mut [f32; 8], d: f32, aux32: &[i32; 8]) {
    for l in 0..8 {
        sums[l] += d * aux32[l] as f32;
    }
}

#[inline(always)]
fn finish_lanes(mut sumf: f32, sums: &[f32; 8]) -> f32 {
    for s in sums {
        sumf += s;
    }
    sumf
}

fn vec_dot_q3_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in blocks::<BlockQ3_K>(w).zip(blocks::<BlockQ8_K>(a)) {
        let mut q = [0i8; QK_K];
        for n in 0..2 {
            for j in 0..4 {
                let m = 1u8 << (4 * n + j);
                for l in 0..32 {
                    let lo = ((x.qs[32 * n + l] >> (2 * j)) & 3) as i8;
                    q[128 * n + 32 * j + l] = lo - if x.hmask[l] & m != 0 { 0 } else { 4 };
                }
            }
        }
        let sc = q3_k_scales(&x.scales);
        let scales: [i32; 16] = std::array::from_fn(|i| sc[i] as i32 - 32);
        let d = x.d.to_f32() * y.d;
        add_lanes(&mut sums, d, &lane_sums(&q, &y.qs, &scales));
    }
    finish_lanes(0.0, &sums)
}

fn vec_dot_q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ4_K>(w).zip(blocks::<BlockQ8_K>(a)) {
        let mut q = [0i8; QK_K];
        for k in 0..4 {
            for l in 0..32 {
                q[64 * k + l] = (x.qs[32 * k + l] & 0xF) as i8;
                q[64 * k + 32 + l] = (x.qs[32 * k + l] >> 4) as i8;
            }
        }
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| get_scale_min_k4(j, &x.scales));
        let scales: [i32; 16] = std::array::from_fn(|i| sm[i / 2].0 as i32);
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += y.bsums[j] as i32 * sm[j / 2].1 as i32;
        }
        add_lanes(&mut sums, x.d.to_f32() * y.d, &lane_sums(&q, &y.qs, &scales));
        sumf -= x.dmin.to_f32() * y.d * sumi as f32;
    }
    finish_lanes(sumf, &sums)
}

fn vec_dot_q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ5_K>(w).zip(blocks::<BlockQ8_K>(a)) {
        let mut q = [0i8; QK_K];
        for k in 0..4 {
            let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
            for l in 0..32 {
                let h1 = if x.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if x.qh[l] & u2 != 0 { 16 } else { 0 };
                q[64 * k + l] = (x.qs[32 * k + l] & 0xF) as i8 + h1;
                q[64 * k + 32 + l] = (x.qs[32 * k + l] >> 4) as i8 + h2;
            }
        }
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| get_scale_min_k4(j, &x.scales));
        let scales: [i32; 16] = std::array::from_fn(|i| sm[i / 2].0 as i32);
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += y.bsums[j] as i32 * sm[j / 2].1 as i32;
        }
        add_lanes(&mut sums, x.d.to_f32() * y.d, &lane_sums(&q, &y.qs, &scales));
        sumf -= x.dmin.to_f32() * y.d * sumi as f32;
    }
    finish_lanes(sumf, &sums)
}

fn vec_dot_q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in blocks::<BlockQ6_K>(w).zip(blocks::<BlockQ8_K>(a)) {
        let q = q6_k_quants(&x);
        let scales: [i32; 16] = std::array::from_fn(|i| x.scales[i] as i32);
        add_lanes(&mut sums, x.d.to_f32() * y.d, &lane_sums(&q, &y.qs, &scales));
    }
    finish_lanes(0.0, &sums)
}

/// Not in ggml (Q8_K is never a weight there); one integer sum per block.
fn vec_dot_q8_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks::<BlockQ8_K>(w).zip(blocks::<BlockQ8_K>(a)) {
        let mut sumi = 0i32;
        for j in 0..QK_K {
            sumi += x.qs[j] as i32 * y.qs[j] as i32;
        }
        sumf += sumi as f32 * (x.d * y.d);
    }
    sumf
}
