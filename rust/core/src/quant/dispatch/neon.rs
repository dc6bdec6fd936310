//! aarch64 kernels: NEON, NEON + dotprod (`sdot`), NEON + i8mm (`smmla`).
//!
//! `sdot`/`smmla` are emitted with `asm!` (their intrinsics were unstable when this was
//! written), so the functions themselves only need NEON; a kernel runs them only when
//! its `DP`/i8mm path was chosen from a level the CPU has. Without dotprod, `dot4`
//! emulates `sdot` lane for lane (`smull` + pairwise adds), so one set of kernels serves
//! all three levels.
//!
//! Weights are decoded to *signed* bytes (`q - C`, e.g. Q4_0's `q - 8`): `sdot` and
//! `smmla` are i8·i8, so unlike x86 no activation-sum correction is needed except for
//! the float offsets (Q4_1/Q5_1 `m`, K-quant mins).
//!
//! Kernel shapes, as on x86 (see `avx2.rs`): direct row dots for one token, and for two
//! or more tokens a panel of 4 decoded rows shared by every token:
//! * dotprod / plain NEON: rows interleaved by 4 bytes, `sdot v.4s, w.16b, a.4b[lane]`
//!   advances 4 rows by 4 quants of one token;
//! * i8mm: row pairs interleaved by 8 bytes against token pairs likewise interleaved,
//!   `smmla` computes a 2×2 (rows × tokens) tile of 8-quant dots: twice the MACs of
//!   `sdot` per instruction.

use super::Level;
use crate::quant::GgmlType;
use core::arch::aarch64::*;
use core::arch::asm;
use half::f16;

const Q4_0_B: usize = 18;
const Q4_1_B: usize = 20;
const Q5_0_B: usize = 22;
const Q5_1_B: usize = 24;
const Q8_0_B: usize = 34;
const Q8_1_B: usize = 36;
const Q4_K_B: usize = 144;
const Q5_K_B: usize = 176;
const Q6_K_B: usize = 210;
const Q8_K_B: usize = 292;

// ---- primitives --------------------------------------------------------------------------

/// `sdot acc.4s, a.16b, b.16b`. Only reached from the dotprod/i8mm levels.
#[inline(always)]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: pure register arithmetic; the caller runs it only on CPUs with FEAT_DotProd.
    unsafe {
        asm!(".arch_extension dotprod", "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
            inout(vreg) acc, in(vreg) a, in(vreg) b, options(pure, nomem, nostack));
    }
    acc
}

/// `sdot acc.4s, w.16b, a.4b[L]`: every lane dots its 4 bytes of `w` with dword L of `a`.
#[inline(always)]
unsafe fn sdot_lane<const L: i32>(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: as `sdot`.
    unsafe {
        asm!(".arch_extension dotprod", "sdot {0:v}.4s, {1:v}.16b, {2:v}.4b[{l}]",
            inout(vreg) acc, in(vreg) w, in(vreg) a, l = const L, options(pure, nomem, nostack));
    }
    acc
}

/// `smmla acc.4s, w.16b, a.16b`: `w` = 2 rows × 8 bytes, `a` = 2 tokens × 8 bytes,
/// `acc += [r0·t0, r0·t1, r1·t0, r1·t1]`. Only reached from the i8mm level.
#[inline(always)]
unsafe fn smmla(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: pure register arithmetic; the caller runs it only on CPUs with FEAT_I8MM.
    unsafe {
        asm!(".arch_extension i8mm", "smmla {0:v}.4s, {1:v}.16b, {2:v}.16b",
            inout(vreg) acc, in(vreg) w, in(vreg) a, options(pure, nomem, nostack));
    }
    acc
}

/// acc + Σ4 a·b per i32 lane: `sdot` with dotprod, else widening multiplies that sum
/// the same four bytes into the same lane.
#[inline(always)]
unsafe fn dot4<const DP: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: DP is true only on dotprod CPUs; the rest is baseline NEON.
    unsafe {
        if DP {
            sdot(acc, a, b)
        } else {
            let p0 = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let p1 = vmull_high_s8(a, b);
            vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)))
        }
    }
}

/// `dot4` of `w` against dword `L` of `a` broadcast to every lane.
#[inline(always)]
unsafe fn dot4_lane<const DP: bool, const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: as `dot4`.
    unsafe {
        if DP {
            sdot_lane::<L>(acc, w, a)
        } else {
            let b = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(a)));
            dot4::<false>(acc, w, b)
        }
    }
}

/// f16 bits → f32 (`fcvt`; the `half` crate would convert in software here).
#[inline(always)]
fn fp16(bits: u16) -> f32 {
    let r: f32;
    // SAFETY: pure register conversion, baseline ARMv8.
    unsafe {
        asm!("fcvt {0:s}, {1:h}", out(vreg) r, in(vreg) bits, options(pure, nomem, nostack));
    }
    r
}

/// Four f16 → four f32.
#[inline(always)]
fn fcvtl(h: uint16x4_t) -> float32x4_t {
    let r: float32x4_t;
    // SAFETY: pure register conversion, baseline ARMv8.
    unsafe {
        asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) r, in(vreg) h, options(pure, nomem, nostack));
    }
    r
}

/// Four f32 → four f16, round to nearest even (FPCR default).
#[inline(always)]
fn fcvtn(x: float32x4_t) -> uint16x4_t {
    let r: uint16x4_t;
    // SAFETY: pure register conversion, baseline ARMv8.
    unsafe {
        asm!("fcvtn {0:v}.4h, {1:v}.4s", out(vreg) r, in(vreg) x, options(pure, nomem, nostack));
    }
    r
}

#[inline(always)]
unsafe fn rd_u16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes.
    unsafe { p.cast::<u16>().read_unaligned() }
}

#[inline(always)]
unsafe fn rd_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { p.cast::<u32>().read_unaligned() }
}

#[inline(always)]
unsafe fn rd_f32(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { p.cast::<f32>().read_unaligned() }
}

#[inline(always)]
unsafe fn ld(p: *const u8) -> int8x16_t {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe { vld1q_s8(p.cast()) }
}

// ---- block decoding ----------------------------------------------------------------------

const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q5_0: u8 = 2;
const F_Q5_1: u8 = 3;
const F_Q8_0: u8 = 4;
const F_Q4_K: u8 = 5;
const F_Q5_K: u8 = 6;
const F_Q6_K: u8 = 7;

const fn sub16(f: u8) -> bool {
    f == F_Q6_K
}
const fn has_o(f: u8) -> bool {
    matches!(f, F_Q4_1 | F_Q5_1 | F_Q4_K | F_Q5_K)
}
/// Activation format: 0 = Q8_0, 1 = Q8_1, 2 = Q8_K.
const fn act(f: u8) -> u8 {
    match f {
        F_Q4_0 | F_Q5_0 | F_Q8_0 => 0,
        F_Q4_1 | F_Q5_1 => 1,
        _ => 2,
    }
}
/// Byte offset of the 32 quants of 32-block `b` inside an activation row.
const fn act_off(ak: u8, b: usize) -> usize {
    match ak {
        0 => b * Q8_0_B + 2,
        1 => b * Q8_1_B + 4,
        _ => (b / 8) * Q8_K_B + 4 + (b % 8) * 32,
    }
}
const fn legacy_bytes(f: u8) -> usize {
    match f {
        F_Q4_0 => Q4_0_B,
        F_Q4_1 => Q4_1_B,
        F_Q5_0 => Q5_0_B,
        F_Q5_1 => Q5_1_B,
        _ => Q8_0_B,
    }
}

/// Bits 0..16 (or 16..32) of `qh` → 0x10 in bytes 0..16: the fifth bits of Q5_0/Q5_1.
#[inline(always)]
unsafe fn fifth_bits(qh: u32, half: u32) -> uint8x16_t {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let b = (qh >> (16 * half)).to_le_bytes();
    // SAFETY: baseline NEON; BIT is 16 bytes.
    unsafe {
        let v = vcombine_u8(vdup_n_u8(b[0]), vdup_n_u8(b[1]));
        vandq_u8(vtstq_u8(v, vld1q_u8(BIT.as_ptr())), vdupq_n_u8(0x10))
    }
}

/// The 32 quants of the legacy block at `x`, signed (`q - C`): elements 0..16, 16..32.
#[inline(always)]
unsafe fn legacy_q<const F: u8>(x: *const u8) -> [int8x16_t; 2] {
    // SAFETY: the caller passes a whole block at `x`; baseline NEON.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        match F {
            F_Q4_0 | F_Q4_1 => {
                let qs = vld1q_u8(x.add(if F == F_Q4_0 { 2 } else { 4 }));
                let (lo, hi) = (vandq_u8(qs, m4), vshrq_n_u8::<4>(qs));
                let c = vdupq_n_u8(if F == F_Q4_0 { 8 } else { 0 });
                [vreinterpretq_s8_u8(vsubq_u8(lo, c)), vreinterpretq_s8_u8(vsubq_u8(hi, c))]
            }
            F_Q5_0 | F_Q5_1 => {
                let (qh_off, qs_off) = if F == F_Q5_0 { (2, 6) } else { (4, 8) };
                let qh = rd_u32(x.add(qh_off));
                let qs = vld1q_u8(x.add(qs_off));
                let lo = vorrq_u8(vandq_u8(qs, m4), fifth_bits(qh, 0));
                let hi = vorrq_u8(vshrq_n_u8::<4>(qs), fifth_bits(qh, 1));
                let c = vdupq_n_u8(if F == F_Q5_0 { 16 } else { 0 });
                [vreinterpretq_s8_u8(vsubq_u8(lo, c)), vreinterpretq_s8_u8(vsubq_u8(hi, c))]
            }
            _ => [ld(x.add(2)), ld(x.add(18))],
        }
    }
}

/// Q4_K/Q5_K: 6-bit scales (bytes 0..8) and mins (8..16) of the block at `p` (12 bytes).
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    // SAFETY: the caller passes 12 readable bytes.
    let mut u = unsafe { [rd_u32(p), rd_u32(p.add(4)), rd_u32(p.add(8)), 0] };
    u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let uaux = u[1] & KMASK1;
    u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    u[2] = uaux;
    u[0] &= KMASK1;
    core::array::from_fn(|i| (u[i / 4] >> (8 * (i % 4))) as u8)
}

/// Sub-blocks 2j and 2j+1 (32 quants each, unsigned) of a Q4_K/Q5_K block at `x`.
#[inline(always)]
unsafe fn k45_pair<const HI: bool>(x: *const u8, j: usize) -> [[int8x16_t; 2]; 2] {
    let qs_off = if HI { 48 } else { 16 };
    // SAFETY: the caller passes a whole block; j < 4.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let b0 = vld1q_u8(x.add(qs_off + 32 * j));
        let b1 = vld1q_u8(x.add(qs_off + 32 * j + 16));
        let mut q = [[vandq_u8(b0, m4), vandq_u8(b1, m4)], [vshrq_n_u8::<4>(b0), vshrq_n_u8::<4>(b1)]];
        if HI {
            // The fifth bit of sub-block s is bit s of qh[l] (l = element within it).
            let (h0, h1) = (vld1q_u8(x.add(16)), vld1q_u8(x.add(32)));
            for (k, q) in q.iter_mut().enumerate() {
                let bit = vdupq_n_u8(1 << (2 * j + k));
                let v = vdupq_n_u8(0x10);
                q[0] = vorrq_u8(q[0], vandq_u8(vtstq_u8(h0, bit), v));
                q[1] = vorrq_u8(q[1], vandq_u8(vtstq_u8(h1, bit), v));
            }
        }
        q.map(|p| p.map(|v| vreinterpretq_s8_u8(v)))
    }
}

/// The 32-quant group `g` (0..8, elements 32g..32g+32) of a Q6_K block, signed (q-32).
#[inline(always)]
unsafe fn q6_group(x: *const u8, g: usize) -> [int8x16_t; 2] {
    let (h, i) = (g / 4, g % 4);
    // SAFETY: the caller passes a whole block; g < 8.
    unsafe {
        let ql = x.add(64 * h + 32 * (i & 1));
        let qh = x.add(128 + 32 * h);
        let c = vdupq_n_s8(32);
        let mut out = [vdupq_n_s8(0); 2];
        for (k, o) in out.iter_mut().enumerate() {
            let l = vld1q_u8(ql.add(16 * k));
            let l = if i >= 2 { vshrq_n_u8::<4>(l) } else { vandq_u8(l, vdupq_n_u8(0x0F)) };
            let hb = vld1q_u8(qh.add(16 * k));
            let hb = match i {
                0 => vshlq_n_u8::<4>(vandq_u8(hb, vdupq_n_u8(3))),
                1 => vshlq_n_u8::<2>(vandq_u8(hb, vdupq_n_u8(12))),
                2 => vandq_u8(hb, vdupq_n_u8(48)),
                _ => vshrq_n_u8::<2>(vandq_u8(hb, vdupq_n_u8(192))),
            };
            *o = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, hb)), c);
        }
        out
    }
}

// ---- direct dots: one row, one token ----------------------------------------------------

#[target_feature(enable = "neon")]
unsafe fn dot_legacy<const F: u8, const DP: bool>(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let bb = legacy_bytes(F);
    let yb = if act(F) == 1 { Q8_1_B } else { Q8_0_B };
    let qoff = if act(F) == 1 { 4 } else { 2 };
    // SAFETY: blocks b < nb of both rows are in bounds.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut summs = 0f32;
        for b in 0..nb {
            let (xb, yp) = (x.add(b * bb), y.add(b * yb));
            let q = legacy_q::<F>(xb);
            let s = dot4::<DP>(dot4::<DP>(vdupq_n_s32(0), q[0], ld(yp.add(qoff))), q[1], ld(yp.add(qoff + 16)));
            let d = fp16(rd_u16(xb)) * fp16(rd_u16(yp));
            acc[b & 1] = vfmaq_n_f32(acc[b & 1], vcvtq_f32_s32(s), d);
            if has_o(F) {
                summs += fp16(rd_u16(xb.add(2))) * fp16(rd_u16(yp.add(2)));
            }
        }
        vaddvq_f32(vaddq_f32(acc[0], acc[1])) + summs
    }
}

#[target_feature(enable = "neon")]
unsafe fn dot_q45_k<const HI: bool, const DP: bool>(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let blk = if HI { Q5_K_B } else { Q4_K_B };
    let mut sumf = 0f32;
    // SAFETY: super-blocks i < nb of both rows are in bounds.
    unsafe {
        for i in 0..nb {
            let (xb, yb) = (x.add(i * blk), y.add(i * Q8_K_B));
            let yd = rd_f32(yb);
            let sm = k4_scales_mins(xb.add(4));
            let bs = vpaddq_s16(vld1q_s16(yb.add(260).cast()), vld1q_s16(yb.add(276).cast()));
            let mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(sm.as_ptr().add(8))));
            let mp = vaddq_s32(vmull_s16(vget_low_s16(bs), vget_low_s16(mins)), vmull_high_s16(bs, mins));
            let mut isum = vdupq_n_s32(0);
            for j in 0..4 {
                let q = k45_pair::<HI>(xb, j);
                for (k, q) in q.iter().enumerate() {
                    let a = yb.add(4 + 64 * j + 32 * k);
                    let p = dot4::<DP>(dot4::<DP>(vdupq_n_s32(0), q[0], ld(a)), q[1], ld(a.add(16)));
                    isum = vmlaq_n_s32(isum, p, sm[2 * j + k] as i32);
                }
            }
            sumf += yd * fp16(rd_u16(xb)) * vaddvq_s32(isum) as f32;
            sumf -= yd * fp16(rd_u16(xb.add(2))) * vaddvq_s32(mp) as f32;
        }
    }
    sumf
}

#[target_feature(enable = "neon")]
unsafe fn dot_q6_k<const DP: bool>(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let mut sumf = 0f32;
    // SAFETY: super-blocks i < nb of both rows are in bounds.
    unsafe {
        for i in 0..nb {
            let (xb, yb) = (x.add(i * Q6_K_B), y.add(i * Q8_K_B));
            let mut isum = vdupq_n_s32(0);
            for g in 0..8 {
                let q = q6_group(xb, g);
                for (k, q) in q.iter().enumerate() {
                    let p = dot4::<DP>(vdupq_n_s32(0), *q, ld(yb.add(4 + 32 * g + 16 * k)));
                    isum = vmlaq_n_s32(isum, p, *xb.add(192 + 2 * g + k) as i8 as i32);
                }
            }
            sumf += rd_f32(yb) * fp16(rd_u16(xb.add(208))) * vaddvq_s32(isum) as f32;
        }
    }
    sumf
}

#[target_feature(enable = "neon")]
unsafe fn vec_dot_dp<const DP: bool>(ty: GgmlType, n: usize, x: *const u8, y: *const u8) -> Option<f32> {
    // SAFETY: whole rows (caller).
    unsafe {
        Some(match ty {
            GgmlType::Q4_0 => dot_legacy::<F_Q4_0, DP>(n / 32, x, y),
            GgmlType::Q4_1 => dot_legacy::<F_Q4_1, DP>(n / 32, x, y),
            GgmlType::Q5_0 => dot_legacy::<F_Q5_0, DP>(n / 32, x, y),
            GgmlType::Q5_1 => dot_legacy::<F_Q5_1, DP>(n / 32, x, y),
            GgmlType::Q8_0 => dot_legacy::<F_Q8_0, DP>(n / 32, x, y),
            GgmlType::Q4_K => dot_q45_k::<false, DP>(n / 256, x, y),
            GgmlType::Q5_K => dot_q45_k::<true, DP>(n / 256, x, y),
            GgmlType::Q6_K => dot_q6_k::<DP>(n / 256, x, y),
            GgmlType::F32 => dot_float::<0>(n, x, y),
            GgmlType::F16 => dot_float::<1>(n, x, y),
            GgmlType::BF16 => dot_float::<2>(n, x, y),
            _ => return None,
        })
    }
}

/// 4 values of float kind `K` (0 = f32, 1 = f16, 2 = bf16) at `p`, as f32.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn ld_float<const K: u8>(p: *const u8) -> float32x4_t {
    // SAFETY: the caller guarantees 4 readable values at `p`.
    unsafe {
        match K {
            0 => vld1q_f32(p.cast()),
            1 => {
                // `vcvt_f32_f16` needs the unstable f16 vector types: FCVTL is base ASIMD.
                let h = vld1_u16(p.cast());
                let f: float32x4_t;
                asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) f, in(vreg) h, options(pure, nomem, nostack));
                f
            }
            // bf16 is the top half of an f32.
            _ => vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast()))),
        }
    }
}

/// Float weights with same-type activations: f32 FMA over four 4-lane accumulators,
/// the tail in scalar f32 (the x86 levels do the same over 8 lanes).
#[target_feature(enable = "neon")]
unsafe fn dot_float<const K: u8>(n: usize, x: *const u8, y: *const u8) -> f32 {
    let sz = if K == 0 { 4 } else { 2 };
    // SAFETY: every load below stays within the n values of each row.
    unsafe {
        let get = |p: *const u8, i: usize| -> f32 {
            let q = p.add(i * sz);
            match K {
                0 => rd_f32(q),
                1 => f16::from_bits(rd_u16(q)).to_f32(),
                _ => f32::from_bits((rd_u16(q) as u32) << 16),
            }
        };
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let o = (i + 4 * k) * sz;
                *a = vfmaq_f32(*a, ld_float::<K>(x.add(o)), ld_float::<K>(y.add(o)));
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], ld_float::<K>(x.add(i * sz)), ld_float::<K>(y.add(i * sz)));
            i += 4;
        }
        let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
        while i < n {
            sum += get(x, i) * get(y, i);
            i += 1;
        }
        sum
    }
}

/// # Safety
/// The CPU supports `level`; `w`/`a` are whole rows of `n` elements.
pub(in crate::quant) unsafe fn vec_dot(level: Level, ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Option<f32> {
    let (x, y) = (w.as_ptr(), a.as_ptr());
    // SAFETY: dotprod is used only from the levels that include it.
    unsafe {
        if level >= Level::NeonDotprod {
            vec_dot_dp::<true>(ty, n, x, y)
        } else {
            vec_dot_dp::<false>(ty, n, x, y)
        }
    }
}

// ---- panel gemm ----------------------------------------------------------------------------

/// 32-blocks per K-chunk (a multiple of 8: K-quant super-blocks stay whole).
const KC: usize = 32;
/// Rows per panel.
const PR: usize = 4;

struct Panel {
    /// `[PR][KC]` decoded blocks (32 signed quants), row-major.
    tmp: [[int8x16_t; 2]; PR * KC],
    /// dotprod: `[KC][8 k]`, lane r = quants 4k..4k+4 of row r.
    /// i8mm: `[KC][4 k8][2 pairs]`, = quants 8k8..8k8+8 of rows 2p, 2p+1.
    q: [int8x16_t; KC * 8],
    /// `[KC·ns][PR]` scale per (sub-block, row).
    s: [f32; KC * 2 * PR],
    /// `[KC][PR]` float offset per (block, row).
    o: [f32; KC * PR],
}

/// Per-token activation summaries, once per gemm call. `da`, `sf`: `[n_tok][nb]` (scale
/// and `d·Σq` of each 32-block). For i8mm, token pairs: `ai [n_pairs][nb][4]` quants
/// interleaved by 8 bytes, `dap`/`sfp [n_pairs][nb][2]`; an odd last token is paired
/// with itself.
struct ActInfo {
    da: Vec<f32>,
    sf: Vec<f32>,
    ai: Vec<int8x16_t>,
    dap: Vec<f32>,
    sfp: Vec<f32>,
}

#[target_feature(enable = "neon")]
unsafe fn act_info<const F: u8>(a: &[u8], n_tok: usize, nb: usize, arb: usize, pairs: bool) -> ActInfo {
    let mut info = ActInfo {
        da: vec![0.0; n_tok * nb],
        sf: vec![0.0; n_tok * nb],
        ai: Vec::new(),
        dap: Vec::new(),
        sfp: Vec::new(),
    };
    for t in 0..n_tok {
        let p = a[t * arb..(t + 1) * arb].as_ptr();
        for b in 0..nb {
            // SAFETY: block b (or its super-block) lies inside row t.
            unsafe {
                let (da, sf) = match act(F) {
                    0 => (fp16(rd_u16(p.add(b * Q8_0_B))), 0.0),
                    1 => (fp16(rd_u16(p.add(b * Q8_1_B))), fp16(rd_u16(p.add(b * Q8_1_B + 2)))),
                    _ => {
                        let blk = p.add((b / 8) * Q8_K_B);
                        let bs = blk.add(260 + (b % 8) * 4);
                        let d = rd_f32(blk);
                        (d, d * (rd_u16(bs) as i16 as i32 + rd_u16(bs.add(2)) as i16 as i32) as f32)
                    }
                };
                info.da[t * nb + b] = da;
                info.sf[t * nb + b] = sf;
            }
        }
    }
    if pairs {
        let np = n_tok.div_ceil(2);
        info.ai = Vec::with_capacity(np * nb * 4);
        for tp in 0..np {
            let (t0, t1) = (2 * tp, (2 * tp + 1).min(n_tok - 1));
            for b in 0..nb {
                // SAFETY: block b of rows t0, t1 (< n_tok) is in bounds.
                unsafe {
                    let (p0, p1) =
                        (a.as_ptr().add(t0 * arb + act_off(act(F), b)), a.as_ptr().add(t1 * arb + act_off(act(F), b)));
                    for h in 0..2 {
                        let (v0, v1) =
                            (vreinterpretq_s64_s8(ld(p0.add(16 * h))), vreinterpretq_s64_s8(ld(p1.add(16 * h))));
                        info.ai.push(vreinterpretq_s8_s64(vtrn1q_s64(v0, v1)));
                        info.ai.push(vreinterpretq_s8_s64(vtrn2q_s64(v0, v1)));
                    }
                }
                info.dap.extend([info.da[t0 * nb + b], info.da[t1 * nb + b]]);
                info.sfp.extend([info.sf[t0 * nb + b], info.sf[t1 * nb + b]]);
            }
        }
    }
    info
}

/// Decodes blocks `b0..b0+kb` of one weight row into `p.tmp[r]`, `p.s`, `p.o`.
#[target_feature(enable = "neon")]
unsafe fn decode<const F: u8>(row: *const u8, b0: usize, kb: usize, r: usize, p: &mut Panel) {
    let tmp = &mut p.tmp[r * KC..(r + 1) * KC];
    // SAFETY: (all arms) the row holds blocks b0..b0+kb; offsets stay inside a block.
    unsafe {
        match F {
            F_Q4_0 | F_Q4_1 | F_Q5_0 | F_Q5_1 | F_Q8_0 => {
                for b in 0..kb {
                    let x = row.add((b0 + b) * legacy_bytes(F));
                    tmp[b] = legacy_q::<F>(x);
                    p.s[b * PR + r] = fp16(rd_u16(x));
                    if has_o(F) {
                        p.o[b * PR + r] = fp16(rd_u16(x.add(2)));
                    }
                }
            }
            F_Q4_K | F_Q5_K => {
                let blk = if F == F_Q5_K { Q5_K_B } else { Q4_K_B };
                for sbk in 0..kb / 8 {
                    let x = row.add((b0 / 8 + sbk) * blk);
                    let (d, dmin) = (fp16(rd_u16(x)), fp16(rd_u16(x.add(2))));
                    let sm = k4_scales_mins(x.add(4));
                    for j in 0..4 {
                        let q = if F == F_Q5_K { k45_pair::<true>(x, j) } else { k45_pair::<false>(x, j) };
                        tmp[sbk * 8 + 2 * j] = q[0];
                        tmp[sbk * 8 + 2 * j + 1] = q[1];
                    }
                    for j in 0..8 {
                        p.s[(sbk * 8 + j) * PR + r] = d * sm[j] as f32;
                        p.o[(sbk * 8 + j) * PR + r] = -(dmin * sm[8 + j] as f32);
                    }
                }
            }
            _ => {
                for sbk in 0..kb / 8 {
                    let x = row.add((b0 / 8 + sbk) * Q6_K_B);
                    let d = fp16(rd_u16(x.add(208)));
                    for g in 0..8 {
                        tmp[sbk * 8 + g] = q6_group(x, g);
                        for sb in 0..2 {
                            let sc = *x.add(192 + 2 * g + sb) as i8;
                            p.s[((sbk * 8 + g) * 2 + sb) * PR + r] = d * sc as f32;
                        }
                    }
                }
            }
        }
    }
}

/// `p.tmp` → `p.q`: 4×4 dword transposes (dotprod layout) or 8-byte row-pair zips (i8mm).
#[target_feature(enable = "neon")]
fn interleave(p: &mut Panel, kb: usize, mm: bool) {
    {
        for b in 0..kb {
            for h in 0..2 {
                let v: [int32x4_t; 4] = core::array::from_fn(|r| vreinterpretq_s32_s8(p.tmp[r * KC + b][h]));
                if mm {
                    for pr in 0..2 {
                        let (x0, x1) = (vreinterpretq_s64_s32(v[2 * pr]), vreinterpretq_s64_s32(v[2 * pr + 1]));
                        p.q[(b * 4 + 2 * h) * 2 + pr] = vreinterpretq_s8_s64(vtrn1q_s64(x0, x1));
                        p.q[(b * 4 + 2 * h + 1) * 2 + pr] = vreinterpretq_s8_s64(vtrn2q_s64(x0, x1));
                    }
                } else {
                    let t0 = vreinterpretq_s64_s32(vtrn1q_s32(v[0], v[1]));
                    let t1 = vreinterpretq_s64_s32(vtrn2q_s32(v[0], v[1]));
                    let t2 = vreinterpretq_s64_s32(vtrn1q_s32(v[2], v[3]));
                    let t3 = vreinterpretq_s64_s32(vtrn2q_s32(v[2], v[3]));
                    let q = &mut p.q[b * 8 + 4 * h..b * 8 + 4 * h + 4];
                    q[0] = vreinterpretq_s8_s64(vtrn1q_s64(t0, t2));
                    q[1] = vreinterpretq_s8_s64(vtrn1q_s64(t1, t3));
                    q[2] = vreinterpretq_s8_s64(vtrn2q_s64(t0, t2));
                    q[3] = vreinterpretq_s8_s64(vtrn2q_s64(t1, t3));
                }
            }
        }
    }
}

/// T tokens × 4 rows over one panel chunk with (emulated) `sdot` by element.
#[target_feature(enable = "neon")]
unsafe fn tile_dot<const F: u8, const DP: bool, const T: usize>(
    p: &Panel,
    kb: usize,
    b0: usize,
    arow: [*const u8; T],
    info: &ActInfo,
    t0: usize,
    nb: usize,
) -> [float32x4_t; T] {
    let ns = if sub16(F) { 2 } else { 1 };
    // SAFETY: blocks gb < nb of the T activation rows; info arrays hold n_tok·nb.
    unsafe {
        let mut accf = [vdupq_n_f32(0.0); T];
        for b in 0..kb {
            let gb = b0 + b;
            let a: [[int8x16_t; 2]; T] = core::array::from_fn(|t| {
                let ap = arow[t].add(act_off(act(F), gb));
                [ld(ap), ld(ap.add(16))]
            });
            for sb in 0..ns {
                let mut acc = [vdupq_n_s32(0); T];
                let kn = 8 / ns;
                for k in sb * kn..(sb + 1) * kn {
                    let w = p.q[b * 8 + k];
                    for t in 0..T {
                        let av = a[t][k / 4];
                        acc[t] = match k % 4 {
                            0 => dot4_lane::<DP, 0>(acc[t], w, av),
                            1 => dot4_lane::<DP, 1>(acc[t], w, av),
                            2 => dot4_lane::<DP, 2>(acc[t], w, av),
                            _ => dot4_lane::<DP, 3>(acc[t], w, av),
                        };
                    }
                }
                let sv = vld1q_f32(p.s.as_ptr().add((b * ns + sb) * PR));
                for t in 0..T {
                    let da = *info.da.get_unchecked((t0 + t) * nb + gb);
                    accf[t] = vfmaq_f32(accf[t], vcvtq_f32_s32(acc[t]), vmulq_n_f32(sv, da));
                }
            }
            if has_o(F) {
                let ov = vld1q_f32(p.o.as_ptr().add(b * PR));
                for t in 0..T {
                    accf[t] = vfmaq_n_f32(accf[t], ov, *info.sf.get_unchecked((t0 + t) * nb + gb));
                }
            }
        }
        accf
    }
}

/// Token pairs `tp0..tp0+TP` × 4 rows over one panel chunk with `smmla`. Result
/// `[pair of rows][pair of tokens]`, lanes `[r0·t0, r0·t1, r1·t0, r1·t1]`.
#[target_feature(enable = "neon")]
unsafe fn tile_mm<const F: u8, const TP: usize>(
    p: &Panel,
    kb: usize,
    b0: usize,
    info: &ActInfo,
    tp0: usize,
    nb: usize,
) -> [[float32x4_t; TP]; 2] {
    let ns = if sub16(F) { 2 } else { 1 };
    // SAFETY: i8mm is present (caller); info arrays hold n_pairs·nb entries, tp0+TP ≤
    // n_pairs, gb < nb; panel reads stay below kb blocks.
    unsafe {
        let mut accf = [[vdupq_n_f32(0.0); TP]; 2];
        for b in 0..kb {
            let gb = b0 + b;
            for sb in 0..ns {
                let mut acc = [[vdupq_n_s32(0); TP]; 2];
                let kn = 4 / ns;
                for k8 in sb * kn..(sb + 1) * kn {
                    let w = [p.q[(b * 4 + k8) * 2], p.q[(b * 4 + k8) * 2 + 1]];
                    for tp in 0..TP {
                        let av = *info.ai.get_unchecked(((tp0 + tp) * nb + gb) * 4 + k8);
                        acc[0][tp] = smmla(acc[0][tp], w[0], av);
                        acc[1][tp] = smmla(acc[1][tp], w[1], av);
                    }
                }
                let sv = vld1q_f32(p.s.as_ptr().add((b * ns + sb) * PR));
                let sp = [vzip1q_f32(sv, sv), vzip2q_f32(sv, sv)];
                for tp in 0..TP {
                    let d2 = vld1_f32(info.dap.as_ptr().add(((tp0 + tp) * nb + gb) * 2));
                    let da = vcombine_f32(d2, d2);
                    for pr in 0..2 {
                        accf[pr][tp] = vfmaq_f32(accf[pr][tp], vcvtq_f32_s32(acc[pr][tp]), vmulq_f32(sp[pr], da));
                    }
                }
            }
            if has_o(F) {
                let ov = vld1q_f32(p.o.as_ptr().add(b * PR));
                let op = [vzip1q_f32(ov, ov), vzip2q_f32(ov, ov)];
                for tp in 0..TP {
                    let s2 = vld1_f32(info.sfp.as_ptr().add(((tp0 + tp) * nb + gb) * 2));
                    let sf = vcombine_f32(s2, s2);
                    for pr in 0..2 {
                        accf[pr][tp] = vfmaq_f32(accf[pr][tp], op[pr], sf);
                    }
                }
            }
        }
        accf
    }
}

/// Adds (or, on the first chunk, stores) one f32 into `out`.
#[inline(always)]
unsafe fn put(o: *mut f32, v: f32, first: bool) {
    // SAFETY: the caller points inside `out`.
    unsafe { *o = if first { v } else { *o + v } }
}

#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_store<const F: u8, const DP: bool, const T: usize>(
    p: &Panel,
    kb: usize,
    b0: usize,
    a: *const u8,
    arb: usize,
    info: &ActInfo,
    t0: usize,
    nb: usize,
    out: *mut f32,
    out_stride: usize,
    r0: usize,
    nr: usize,
) {
    // SAFETY: tokens t0..t0+T < n_tok and rows r0..r0+nr < n_rows are inside `a`/`out`.
    unsafe {
        let arow: [*const u8; T] = core::array::from_fn(|t| a.add((t0 + t) * arb));
        let acc = tile_dot::<F, DP, T>(p, kb, b0, arow, info, t0, nb);
        for (t, v) in acc.iter().enumerate() {
            let mut lanes = [0f32; PR];
            vst1q_f32(lanes.as_mut_ptr(), *v);
            for (r, l) in lanes.iter().take(nr).enumerate() {
                put(out.add((t0 + t) * out_stride + r0 + r), *l, b0 == 0);
            }
        }
    }
}

#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn mm_store<const F: u8, const TP: usize>(
    p: &Panel,
    kb: usize,
    b0: usize,
    info: &ActInfo,
    tp0: usize,
    nb: usize,
    n_tok: usize,
    out: *mut f32,
    out_stride: usize,
    r0: usize,
    nr: usize,
) {
    // SAFETY: only tokens < n_tok and rows < r0 + nr are written.
    unsafe {
        let acc = tile_mm::<F, TP>(p, kb, b0, info, tp0, nb);
        for (pr, accp) in acc.iter().enumerate() {
            for (tp, v) in accp.iter().enumerate() {
                let mut lanes = [0f32; 4];
                vst1q_f32(lanes.as_mut_ptr(), *v);
                for (i, l) in lanes.iter().enumerate() {
                    let (r, t) = (2 * pr + i / 2, 2 * (tp0 + tp) + i % 2);
                    if r < nr && t < n_tok {
                        put(out.add(t * out_stride + r0 + r), *l, b0 == 0);
                    }
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_panel<const F: u8, const DP: bool>(
    mm: bool,
    n: usize,
    w: &[u8],
    wrb: usize,
    n_rows: usize,
    a: &[u8],
    arb: usize,
    n_tok: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let nb = n / 32;
    // SAFETY: `a` holds n_tok rows (caller).
    let info = unsafe { act_info::<F>(a, n_tok, nb, arb, mm) };
    let z = vdupq_n_s8(0);
    let mut p = Panel { tmp: [[z; 2]; PR * KC], q: [z; KC * 8], s: [0.0; KC * 2 * PR], o: [0.0; KC * PR] };
    let n_pairs = n_tok.div_ceil(2);
    for r0 in (0..n_rows).step_by(PR) {
        let nr = PR.min(n_rows - r0);
        for b0 in (0..nb).step_by(KC) {
            let kb = KC.min(nb - b0);
            // SAFETY: rows < n_rows are inside `w` (missing rows of the last panel
            // repeat row r0; their results are dropped); t/tp bounds as commented.
            unsafe {
                for r in 0..PR {
                    let row = if r < nr { r0 + r } else { r0 };
                    decode::<F>(w.as_ptr().add(row * wrb), b0, kb, r, &mut p);
                }
                interleave(&mut p, kb, mm);
                let ap = a.as_ptr();
                if mm {
                    let mut tp = 0;
                    while tp < n_pairs {
                        if n_pairs - tp >= 2 {
                            mm_store::<F, 2>(&p, kb, b0, &info, tp, nb, n_tok, out, out_stride, r0, nr);
                            tp += 2;
                        } else {
                            mm_store::<F, 1>(&p, kb, b0, &info, tp, nb, n_tok, out, out_stride, r0, nr);
                            tp += 1;
                        }
                    }
                } else {
                    let mut t0 = 0;
                    while t0 < n_tok {
                        let rem = n_tok - t0;
                        if rem >= 4 {
                            dot_store::<F, DP, 4>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                            t0 += 4;
                        } else if rem >= 2 {
                            dot_store::<F, DP, 2>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                            t0 += 2;
                        } else {
                            dot_store::<F, DP, 1>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                            t0 += 1;
                        }
                    }
                }
            }
        }
    }
}

/// # Safety
/// The CPU supports `level`; sizes as `Kernels::gemm` checks them.
#[allow(clippy::too_many_arguments)]
pub(in crate::quant) unsafe fn gemm(
    level: Level,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    n_rows: usize,
    a: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) -> bool {
    if !matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    ) {
        return false;
    }
    let wrb = w.len() / n_rows;
    let arb = a.len() / n_tok;
    if n_tok == 1 {
        for (r, wr) in w.chunks_exact(wrb).enumerate() {
            // SAFETY: whole rows; level per the contract.
            out[r] = unsafe { vec_dot(level, ty, n, wr, a) }.expect("SIMD format");
        }
        return true;
    }
    let o = out.as_mut_ptr();
    let mm = level >= Level::NeonI8mm;
    macro_rules! run {
        ($f:expr) => {
            if level >= Level::NeonDotprod {
                gemm_panel::<{ $f }, true>(mm, n, w, wrb, n_rows, a, arb, n_tok, o, out_stride)
            } else {
                gemm_panel::<{ $f }, false>(mm, n, w, wrb, n_rows, a, arb, n_tok, o, out_stride)
            }
        };
    }
    // SAFETY: level per the contract (dotprod/i8mm only from levels that have them);
    // sizes checked by `Kernels::gemm`.
    unsafe {
        match ty {
            GgmlType::Q4_0 => run!(F_Q4_0),
            GgmlType::Q4_1 => run!(F_Q4_1),
            GgmlType::Q5_0 => run!(F_Q5_0),
            GgmlType::Q5_1 => run!(F_Q5_1),
            GgmlType::Q8_0 => run!(F_Q8_0),
            GgmlType::Q4_K => run!(F_Q4_K),
            GgmlType::Q5_K => run!(F_Q5_K),
            _ => run!(F_Q6_K),
        }
    }
    true
}

// ---- packed weights (quant::packed): 8 rows as two halves of 4 lanes ----------------------
//
// The same arithmetic as x86's packed kernels and the scalar twin, per row: exact
// integer sums per sub-block (`dot4` is i8·i8 here, so Q8_0 weights need no bias, and
// the unsigned quants are small enough to be read as i8), scaled in i32, then the same
// f32 `fma` chain (`vfmaq_f32`/`vfmsq_f32` are fused like x86's fmadd/fnmadd).
// A k-vector's first 16 bytes are rows 0..4, its last 16 rows 4..8: each half of the
// group is one pass over the block, 4 rows a lane.

/// Packed-tile tokens at a time (registers: 2 accumulators a token and sub-block pair).
const PACKED_T: usize = 4;

/// u8 → i32 of the 4 bytes at `p`.
#[inline(always)]
unsafe fn ld_u8x4(p: *const u8) -> int32x4_t {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(rd_u32(p))))))) }
}

/// i8 → i32 of the 4 bytes at `p`.
#[inline(always)]
unsafe fn ld_i8x4(p: *const u8) -> int32x4_t {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(rd_u32(p)))))) }
}

/// The 4 bytes at `p` in every lane.
#[inline(always)]
unsafe fn bcast4(p: *const u8) -> int8x16_t {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { vreinterpretq_s8_u32(vdupq_n_u32(rd_u32(p))) }
}

/// `Σ m·s` for 4 rows: `m` = (m_a, m_b) u8 pairs of 4 rows at `p` (8 bytes), `s` = the
/// activation's sums of the two sub-blocks.
#[inline(always)]
unsafe fn min_pairs(acc: int32x4_t, p: *const u8, sa: i16, sb: i16) -> int32x4_t {
    // SAFETY: the caller guarantees 8 readable bytes.
    unsafe {
        let m = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(p)));
        let s = vreinterpretq_s16_s32(vdupq_n_s32((sa as u16 as i32) | ((sb as i32) << 16)));
        let lo = vmull_s16(vget_low_s16(m), vget_low_s16(s));
        let hi = vmull_high_s16(m, s);
        vaddq_s32(acc, vpaddq_s32(lo, hi))
    }
}

/// One block of one half (`hf`: rows 4hf..4hf+4) of a packed group against `T` tokens
/// (activation blocks `y[t]`, their sums `s[t]`); updates `acc[t]`.
#[inline(always)]
unsafe fn packed_half<const DP: bool, const T: usize>(
    ty: GgmlType,
    x: *const u8,
    hf: usize,
    y: &[*const u8; T],
    s: &[*const i16; T],
    acc: &mut [float32x4_t; T],
) {
    // SAFETY: the caller passes one packed block at `x`, one activation block at each
    // y[t] with its sums at s[t]; every offset below is inside them.
    unsafe {
        let o = 16 * hf; // byte offset of this half inside a k-vector
        let m4 = vdupq_n_s8(0x0F);
        let mut isum = [vdupq_n_s32(0); T];
        let mut msum = [vdupq_n_s32(0); T];
        match ty {
            GgmlType::Q4_K | GgmlType::Q5_K => {
                for p in 0..4 {
                    let mut lo = [vdupq_n_s32(0); T];
                    let mut hi = [vdupq_n_s32(0); T];
                    for k in 0..8 {
                        let v = ld(x.add(160 + 32 * (8 * p + k) + o));
                        let mut ql = vandq_s8(v, m4);
                        let mut qh = vreinterpretq_s8_u8(vshrq_n_u8::<4>(vreinterpretq_u8_s8(v)));
                        if ty == GgmlType::Q5_K {
                            let h = vreinterpretq_u8_s8(ld(x.add(1184 + 32 * k + o)));
                            let one = vdupq_n_u8(1);
                            let hl = vandq_u8(vshlq_u8(h, vdupq_n_s8(-(2 * p as i8))), one);
                            let hh = vandq_u8(vshlq_u8(h, vdupq_n_s8(-(2 * p as i8) - 1)), one);
                            ql = vorrq_s8(ql, vreinterpretq_s8_u8(vshlq_n_u8::<4>(hl)));
                            qh = vorrq_s8(qh, vreinterpretq_s8_u8(vshlq_n_u8::<4>(hh)));
                        }
                        for t in 0..T {
                            let ya = y[t].add(4 + 64 * p + 4 * k);
                            lo[t] = dot4::<DP>(lo[t], ql, bcast4(ya));
                            hi[t] = dot4::<DP>(hi[t], qh, bcast4(ya.add(32)));
                        }
                    }
                    let sc_lo = ld_u8x4(x.add(32 + 16 * p + 4 * hf));
                    let sc_hi = ld_u8x4(x.add(40 + 16 * p + 4 * hf));
                    for t in 0..T {
                        isum[t] = vmlaq_s32(isum[t], lo[t], sc_lo);
                        isum[t] = vmlaq_s32(isum[t], hi[t], sc_hi);
                        msum[t] =
                            min_pairs(msum[t], x.add(96 + 16 * p + 8 * hf), *s[t].add(2 * p), *s[t].add(2 * p + 1));
                    }
                }
            }
            GgmlType::Q6_K => {
                for h in 0..2 {
                    for kh in 0..2 {
                        for i in 0..4 {
                            let mut sub = [vdupq_n_s32(0); T];
                            for k in 4 * kh..4 * kh + 4 {
                                let v = x.add(144 + 96 * (8 * h + k) + o);
                                let l = vreinterpretq_u8_s8(ld(v.add(32 * (i & 1))));
                                let qh = vreinterpretq_u8_s8(ld(v.add(64)));
                                let lo4 = if i < 2 { vandq_u8(l, vdupq_n_u8(15)) } else { vshrq_n_u8::<4>(l) };
                                let hb =
                                    vshlq_n_u8::<4>(vandq_u8(vshlq_u8(qh, vdupq_n_s8(-2 * i as i8)), vdupq_n_u8(3)));
                                let q = vreinterpretq_s8_u8(vorrq_u8(lo4, hb));
                                for t in 0..T {
                                    sub[t] = dot4::<DP>(sub[t], q, bcast4(y[t].add(4 + 128 * h + 32 * i + 4 * k)));
                                }
                            }
                            let j = 8 * h + 2 * i + kh;
                            let sc = ld_i8x4(x.add(16 + 8 * j + 4 * hf));
                            for t in 0..T {
                                isum[t] = vmlaq_s32(isum[t], sub[t], sc);
                                msum[t] = vmlaq_s32(msum[t], sc, vdupq_n_s32(*s[t].add(j) as i32));
                            }
                        }
                    }
                }
                for t in 0..T {
                    isum[t] = vsubq_s32(isum[t], vshlq_n_s32::<5>(msum[t]));
                }
            }
            GgmlType::Q4_0 => {
                for k in 0..4 {
                    let v = ld(x.add(16 + 32 * k + o));
                    let ql = vandq_s8(v, m4);
                    let qh = vreinterpretq_s8_u8(vshrq_n_u8::<4>(vreinterpretq_u8_s8(v)));
                    for t in 0..T {
                        isum[t] = dot4::<DP>(isum[t], ql, bcast4(y[t].add(2 + 4 * k)));
                        isum[t] = dot4::<DP>(isum[t], qh, bcast4(y[t].add(18 + 4 * k)));
                    }
                }
                for t in 0..T {
                    isum[t] = vsubq_s32(isum[t], vdupq_n_s32(8 * *s[t] as i32));
                }
            }
            _ => {
                for k in 0..8 {
                    let v = ld(x.add(16 + 32 * k + o));
                    for t in 0..T {
                        isum[t] = dot4::<DP>(isum[t], v, bcast4(y[t].add(2 + 4 * k)));
                    }
                }
            }
        }
        let d = ld_f16x4(x.add(8 * hf).cast());
        let k = ty.block_size() == 256;
        for t in 0..T {
            let yd = if k { rd_f32(y[t]) } else { fp16(rd_u16(y[t])) };
            acc[t] = vfmaq_f32(acc[t], vmulq_n_f32(d, yd), vcvtq_f32_s32(isum[t]));
            if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K) {
                let dmin = ld_f16x4(x.add(16 + 8 * hf).cast());
                acc[t] = vfmsq_f32(acc[t], vmulq_n_f32(dmin, yd), vcvtq_f32_s32(msum[t]));
            }
        }
    }
}

/// Tokens `t0..t0+T` against row group `gx`: every block, then the 8×T results.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn packed_group<const DP: bool, const T: usize>(
    ty: GgmlType,
    nb: usize,
    gx: *const u8,
    gb: usize,
    a: *const u8,
    ab: usize,
    sums: *const i16,
    spb: usize,
    t0: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for hf in 0..2 {
        // SAFETY: NEON is baseline on aarch64.
        let mut acc = [unsafe { vdupq_n_f32(0.0) }; T];
        for b in 0..nb {
            // SAFETY: the caller's contract covers block b of the group and of tokens
            // t0..t0+T, and their output columns.
            unsafe {
                let y: [*const u8; T] = core::array::from_fn(|t| a.add(((t0 + t) * nb + b) * ab));
                let s: [*const i16; T] = core::array::from_fn(|t| sums.add(((t0 + t) * nb + b) * spb));
                packed_half::<DP, T>(ty, gx.add(b * gb), hf, &y, &s, &mut acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe { vst1q_f32(out.add((t0 + t) * out_stride + 4 * hf), *acc) };
        }
    }
}

/// `quant::packed::gemm_ref` with NEON, the same arithmetic per (row, token).
///
/// # Safety
/// The CPU supports `level`; `groups` holds whole groups of `nb` blocks of `ty`, `a`
/// n_tok activation rows, `sums` their `packed::act_sums`, `out` room for every result.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
pub(in crate::quant) unsafe fn gemm_packed(
    level: Level,
    ty: GgmlType,
    nb: usize,
    groups: &[u8],
    a: &[u8],
    sums: &[i16],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let gb = crate::quant::packed::group_bytes(ty).expect("a packed type");
    let spb = crate::quant::packed::sums_per_block(ty);
    let ab = ty.vec_dot_type().type_size();
    let n_groups = groups.len() / (nb * gb);
    let dp = level >= Level::NeonDotprod;
    for g in 0..n_groups {
        let mut t0 = 0;
        while t0 < n_tok {
            let t = if n_tok - t0 >= PACKED_T {
                PACKED_T
            } else if n_tok - t0 >= 2 {
                2
            } else {
                1
            };
            // SAFETY: g < n_groups, t0 + t <= n_tok; level per the contract.
            unsafe {
                let gx = groups.as_ptr().add(g * nb * gb);
                let (ap, sp, o) = (a.as_ptr(), sums.as_ptr(), out.as_mut_ptr().add(8 * g));
                match (dp, t) {
                    (true, PACKED_T) => {
                        packed_group::<true, PACKED_T>(ty, nb, gx, gb, ap, ab, sp, spb, t0, o, out_stride)
                    }
                    (true, 2) => packed_group::<true, 2>(ty, nb, gx, gb, ap, ab, sp, spb, t0, o, out_stride),
                    (true, _) => packed_group::<true, 1>(ty, nb, gx, gb, ap, ab, sp, spb, t0, o, out_stride),
                    (false, PACKED_T) => {
                        packed_group::<false, PACKED_T>(ty, nb, gx, gb, ap, ab, sp, spb, t0, o, out_stride)
                    }
                    (false, 2) => packed_group::<false, 2>(ty, nb, gx, gb, ap, ab, sp, spb, t0, o, out_stride),
                    (false, _) => packed_group::<false, 1>(ty, nb, gx, gb, ap, ab, sp, spb, t0, o, out_stride),
                }
            }
            t0 += t;
        }
    }
}

// ---- activation quantizers ---------------------------------------------------------------

/// # Safety
/// NEON present; `dst.len() == ty.row_bytes(src.len())`.
pub(in crate::quant) unsafe fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    // SAFETY: whole blocks; baseline NEON.
    unsafe {
        match ty {
            GgmlType::Q8_0 => quantize_q8_0(src, dst, false),
            GgmlType::Q8_1 => quantize_q8_0(src, dst, true),
            GgmlType::Q8_K => quantize_q8_k(src, dst),
            GgmlType::F16 => f32_to_f16_raw(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()),
            _ => return false,
        }
    }
    true
}

/// Eight i32 vectors (each in i8 range) → 32 i8 stored at `y`.
#[inline(always)]
unsafe fn store_i8x32(y: *mut u8, q: &[int32x4_t; 8]) {
    // SAFETY: the caller guarantees 32 writable bytes; baseline NEON.
    unsafe {
        for h in 0..2 {
            let a = vcombine_s16(vqmovn_s32(q[4 * h]), vqmovn_s32(q[4 * h + 1]));
            let b = vcombine_s16(vqmovn_s32(q[4 * h + 2]), vqmovn_s32(q[4 * h + 3]));
            vst1q_s8(y.add(16 * h).cast(), vcombine_s8(vqmovn_s16(a), vqmovn_s16(b)));
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn quantize_q8_0(src: &[f32], dst: &mut [u8], with_sum: bool) {
    let bb = if with_sum { Q8_1_B } else { Q8_0_B };
    for (x, y) in src.chunks_exact(32).zip(dst.chunks_exact_mut(bb)) {
        // SAFETY: `x` has 32 floats, `y` bb bytes.
        unsafe {
            let v: [float32x4_t; 8] = core::array::from_fn(|i| vld1q_f32(x.as_ptr().add(4 * i)));
            let mut m = vabsq_f32(v[0]);
            for vi in &v[1..] {
                m = vmaxq_f32(m, vabsq_f32(*vi));
            }
            let amax = vmaxvq_f32(m);
            // Same scalar arithmetic as the reference; `frinta` is C `roundf`.
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: [int32x4_t; 8] = core::array::from_fn(|i| vcvtq_s32_f32(vrndaq_f32(vmulq_n_f32(v[i], id))));
            y[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            let off = if with_sum { 4 } else { 2 };
            if with_sum {
                let s = q.iter().fold(vdupq_n_s32(0), |a, v| vaddq_s32(a, *v));
                y[2..4].copy_from_slice(&f16::from_f32(vaddvq_s32(s) as f32 * d).to_le_bytes());
            }
            store_i8x32(y.as_mut_ptr().add(off), &q);
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn quantize_q8_k(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(256).zip(dst.chunks_exact_mut(Q8_K_B)) {
        // SAFETY: `x` has 256 floats, `y` 292 bytes.
        unsafe {
            let v = |i: usize| vld1q_f32(x.as_ptr().add(4 * i));
            let mut m = vdupq_n_f32(0.0);
            for i in 0..64 {
                m = vmaxq_f32(m, vabsq_f32(v(i)));
            }
            let amax = vmaxvq_f32(m);
            if amax == 0.0 {
                y.fill(0);
                continue;
            }
            // The reference keeps the first element of largest magnitude, with its sign.
            let mut max = 0f32;
            for i in 0..64 {
                if vmaxvq_u32(vceqq_f32(vabsq_f32(v(i)), vdupq_n_f32(amax))) != 0 {
                    max = *x[4 * i..4 * i + 4].iter().find(|e| e.abs() == amax).expect("lane matched");
                    break;
                }
            }
            let iscale = -127.0 / max;
            y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
            let lim = vdupq_n_s32(127);
            for g in 0..8 {
                // `fcvtns` rounds half to even, like the reference's `nearest_int`.
                let q: [int32x4_t; 8] =
                    core::array::from_fn(|i| vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(v(8 * g + i), iscale)), lim));
                let s0 = vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
                let s1 = vaddvq_s32(vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])));
                store_i8x32(y.as_mut_ptr().add(4 + 32 * g), &q);
                y[260 + 4 * g..262 + 4 * g].copy_from_slice(&(s0 as i16).to_le_bytes());
                y[262 + 4 * g..264 + 4 * g].copy_from_slice(&(s1 as i16).to_le_bytes());
            }
        }
    }
}

// ---- f16 rows ------------------------------------------------------------------------------

#[target_feature(enable = "neon")]
unsafe fn f32_to_f16_raw(x: *const f32, y: *mut u16, n: usize) {
    let mut i = 0;
    // SAFETY: n readable floats at x, n writable u16 at y (caller).
    unsafe {
        while i + 4 <= n {
            vst1_u16(y.add(i), fcvtn(vld1q_f32(x.add(i))));
            i += 4;
        }
        while i < n {
            *y.add(i) = f16::from_f32(*x.add(i)).to_bits();
            i += 1;
        }
    }
}

#[inline(always)]
unsafe fn ld_f16x4(p: *const f16) -> float32x4_t {
    // SAFETY: the caller guarantees 4 readable f16.
    unsafe { fcvtl(vld1_u16(p.cast())) }
}

/// # Safety
/// NEON present; `a.len() == b.len()`.
#[target_feature(enable = "neon")]
pub(in crate::quant) unsafe fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len();
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    // SAFETY: every access is below n.
    unsafe {
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let k = i + 4 * j;
                *acc = vfmaq_f32(*acc, vld1q_f32(a.as_ptr().add(k)), ld_f16x4(b.as_ptr().add(k)));
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(a.as_ptr().add(i)), ld_f16x4(b.as_ptr().add(i)));
            i += 4;
        }
    }
    let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for k in i..n {
        sum += a[k] * b[k].to_f32();
    }
    sum
}

/// # Safety
/// NEON present; `y.len() == x.len()`.
#[target_feature(enable = "neon")]
pub(in crate::quant) unsafe fn axpy_f16(y: &mut [f32], s: f32, x: &[f16]) {
    let n = y.len();
    let mut i = 0;
    // SAFETY: every access is below n.
    unsafe {
        while i + 4 <= n {
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_n_f32(vld1q_f32(p), ld_f16x4(x.as_ptr().add(i)), s));
            i += 4;
        }
    }
    for k in i..n {
        y[k] += s * x[k].to_f32();
    }
}

/// # Safety
/// NEON present; `src.len() == dst.len()`.
#[target_feature(enable = "neon")]
pub(in crate::quant) unsafe fn f16_to_f32_row(src: &[f16], dst: &mut [f32]) {
    let n = src.len();
    let mut i = 0;
    // SAFETY: every access is below n.
    unsafe {
        while i + 4 <= n {
            vst1q_f32(dst.as_mut_ptr().add(i), ld_f16x4(src.as_ptr().add(i)));
            i += 4;
        }
    }
    for k in i..n {
        dst[k] = src[k].to_f32();
    }
}

/// # Safety
/// NEON present; `src.len() == dst.len()`.
#[target_feature(enable = "neon")]
pub(in crate::quant) unsafe fn f32_to_f16_row(src: &[f32], dst: &mut [f16]) {
    // SAFETY: same lengths (caller).
    unsafe { f32_to_f16_raw(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) }
}
