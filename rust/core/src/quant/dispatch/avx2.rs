//! x86-64 kernels, AVX2 + FMA + F16C level; and the macro `x86_kernels!` that stamps
//! the same kernel bodies out again for the AVX-512 level (`avx512.rs`).
//!
//! The bodies are written once against four level primitives, defined next to each
//! invocation of the macro (macro-expanded code resolves them at the call site):
//!
//! | primitive           | meaning (per i32 lane)                 | AVX2                  | AVX-512 VNNI  |
//! |---------------------|----------------------------------------|-----------------------|---------------|
//! | `dot4(acc, u, s)`   | acc + Σ4 u8·i8                         | maddubs+madd+add      | `vpdpbusd`    |
//! | `dot_ss(acc, w, a)` | acc + Σ4 i8·i8                         | sign trick + `dot4`   | abs/sign + `vpdpbusd` |
//! | `madd_acc(acc,p,s)` | acc + Σ2 i16·i16                       | madd+add              | `vpdpwssd`    |
//! | `VNNI`, `MAX_T`     | u8 sums never saturate / token tile    | false, 4              | true, 8       |
//!
//! Trap: `vpmaddubsw` saturates its i16 pair sums. Every AVX2 caller keeps
//! `2·max(u)·127 ≤ 32767`: quants are at most 63 (Q6_K), and Q8_0 weights go through
//! `dot_ss`, whose |w| ≤ 128 times |a| ≤ 127 (our Q8 activations never hold -128).
//!
//! Two kernel shapes:
//! * `dot_*` (vec_dot, and gemm with one token): one weight row streamed once, each
//!   block unpacked to 32 bytes and dotted with the activation, as ggml's AVX2 kernels.
//! * the panel gemm (two or more tokens): 8 weight rows are decoded to unsigned bytes
//!   and interleaved by 4 (`Panel::q`: lane r of a vector = 4 consecutive quants of row
//!   r), so one `dot4` with a broadcast dword of activations advances 8 rows at once and
//!   the per-block float scaling is paid once per 8 rows; each weight vector then meets
//!   `MAX_T` tokens from registers. Offsets (Q4_0's -8, Q4_1's m, K-quant mins) are
//!   folded through per-block activation sums (`ActInfo`), so the hot loop is only
//!   `dot4`. This is repacking done on the fly, per call; repacking at load would save
//!   the decode (about one token's worth of work per call).

use core::arch::x86_64::*;

macro_rules! x86_kernels {
    ($feat:literal) => {
        use crate::quant::GgmlType;
        use half::f16;

        // ---- block byte sizes (ggml-common.h) -------------------------------------------
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

        // ---- small helpers ------------------------------------------------------------

        /// 32 bytes at `p`, any alignment.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn ld(p: *const u8) -> __m256i {
            // SAFETY: the caller guarantees 32 readable bytes at `p`.
            unsafe { _mm256_loadu_si256(p.cast()) }
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn ld128(p: *const u8) -> __m128i {
            // SAFETY: the caller guarantees 16 readable bytes at `p`.
            unsafe { _mm_loadu_si128(p.cast()) }
        }

        #[inline(always)]
        unsafe fn rd_u16(p: *const u8) -> u16 {
            // SAFETY: the caller guarantees 2 readable bytes at `p`.
            unsafe { p.cast::<u16>().read_unaligned() }
        }

        #[inline(always)]
        unsafe fn rd_f32(p: *const u8) -> f32 {
            // SAFETY: the caller guarantees 4 readable bytes at `p`.
            unsafe { p.cast::<f32>().read_unaligned() }
        }

        #[inline(always)]
        unsafe fn rd_i32(p: *const u8) -> i32 {
            // SAFETY: the caller guarantees 4 readable bytes at `p`.
            unsafe { p.cast::<i32>().read_unaligned() }
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn fp16(bits: u16) -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        /// `f16(a) * f16(b)` with one conversion.
        #[target_feature(enable = $feat)]
        #[inline]
        fn fp16_mul(a: u16, b: u16) -> f32 {
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128((a as u32 | (b as u32) << 16) as i32));
            _mm_cvtss_f32(_mm_mul_ss(v, _mm_movehdup_ps(v)))
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn hsum_ps(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn hsum_ps128(s: __m128) -> f32 {
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        #[target_feature(enable = $feat)]
        #[inline]
        fn hsum_i32(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01)))
        }

        /// 16 packed nibble bytes at `p` → 32 bytes in element order: low nibbles are
        /// elements 0..16, high nibbles 16..32 (the Q4_0/Q4_1/Q5 layout). A broadcast load
        /// and a per-half variable shift, rather than an insert, keep the shuffle port free.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn nibbles_at(p: *const u8) -> __m256i {
            // SAFETY: the caller guarantees 16 readable bytes at `p`.
            let x = unsafe { _mm256_broadcastsi128_si256(ld128(p)) };
            let both = _mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 0, 4, 4));
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }

        /// Bit j of `qh` → 0x10 in byte j (the fifth bit of a Q5 quant).
        #[target_feature(enable = $feat)]
        #[inline]
        fn fifth_bits(qh: u32) -> __m256i {
            let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
            let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        }

        /// 32 five-bit Q5 quants of the block at `x` (qh at `x + qh_off`, qs at `x + qs_off`).
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q5_quants(x: *const u8, qh_off: usize, qs_off: usize) -> __m256i {
            // SAFETY: the caller passes a whole Q5_0/Q5_1 block at `x`.
            let (qh, qs) = unsafe { (rd_i32(x.add(qh_off)) as u32, nibbles_at(x.add(qs_off))) };
            _mm256_or_si256(qs, fifth_bits(qh))
        }

        /// Q4_K/Q5_K scales and mins unpacked from 12 bytes: bytes 0..8 of the result are
        /// the 6-bit scales of sub-blocks 0..8, bytes 8..16 the mins (ggml's kmask shuffle).
        #[inline(always)]
        unsafe fn k4_scales_mins(p: *const u8) -> [u32; 4] {
            const KMASK1: u32 = 0x3f3f3f3f;
            const KMASK2: u32 = 0x0f0f0f0f;
            const KMASK3: u32 = 0x03030303;
            // SAFETY: the caller passes 12 readable bytes.
            let mut u = unsafe { [rd_i32(p) as u32, rd_i32(p.add(4)) as u32, rd_i32(p.add(8)) as u32, 0] };
            u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
            let uaux = u[1] & KMASK1;
            u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
            u[2] = uaux;
            u[0] &= KMASK1;
            u
        }

        /// Broadcasts i16 lane `i` of each 128-bit half (a `vpshufb` mask).
        #[target_feature(enable = $feat)]
        #[inline]
        fn bcast16(v: __m256i, i: i32) -> __m256i {
            _mm256_shuffle_epi8(v, _mm256_set1_epi16((((2 * i + 1) << 8) | (2 * i)) as i16))
        }

        // ---- direct dots: one row, one token -------------------------------------------
        //
        // Each takes `nb` blocks at `x` (weights) and `y` (activations); the caller
        // has checked both rows are whole.

        /// One 32-block of a legacy format: `(d_w·d_a, Σ(q-C)·a lanes, m·s)`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn legacy_block<const F: u8>(x: *const u8, y: *const u8, b: usize) -> (f32, __m256i, f32) {
            let z = _mm256_setzero_si256();
            // SAFETY: the caller passes rows holding block b (all arms).
            unsafe {
                match F {
                    F_Q4_0 => {
                        let (xb, yb) = (x.add(b * Q4_0_B), y.add(b * Q8_0_B));
                        let (q, a) = (nibbles_at(xb.add(2)), ld(yb.add(2)));
                        let s = _mm256_sub_epi32(dot4(z, q, a), dot4(z, _mm256_set1_epi8(8), a));
                        (fp16_mul(rd_u16(xb), rd_u16(yb)), s, 0.0)
                    }
                    F_Q4_1 => {
                        let (xb, yb) = (x.add(b * Q4_1_B), y.add(b * Q8_1_B));
                        let s = dot4(z, nibbles_at(xb.add(4)), ld(yb.add(4)));
                        let ms = fp16_mul(rd_u16(xb.add(2)), rd_u16(yb.add(2)));
                        (fp16_mul(rd_u16(xb), rd_u16(yb)), s, ms)
                    }
                    F_Q5_0 => {
                        let (xb, yb) = (x.add(b * Q5_0_B), y.add(b * Q8_0_B));
                        let (q, a) = (q5_quants(xb, 2, 6), ld(yb.add(2)));
                        let s = _mm256_sub_epi32(dot4(z, q, a), dot4(z, _mm256_set1_epi8(16), a));
                        (fp16_mul(rd_u16(xb), rd_u16(yb)), s, 0.0)
                    }
                    F_Q5_1 => {
                        let (xb, yb) = (x.add(b * Q5_1_B), y.add(b * Q8_1_B));
                        let s = dot4(z, q5_quants(xb, 4, 8), ld(yb.add(4)));
                        let ms = fp16_mul(rd_u16(xb.add(2)), rd_u16(yb.add(2)));
                        (fp16_mul(rd_u16(xb), rd_u16(yb)), s, ms)
                    }
                    _ => {
                        let (xb, yb) = (x.add(b * Q8_0_B), y.add(b * Q8_0_B));
                        let s = dot_ss(z, ld(xb.add(2)), ld(yb.add(2)));
                        (fp16_mul(rd_u16(xb), rd_u16(yb)), s, 0.0)
                    }
                }
            }
        }

        /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 rows: ggml's AVX2 loop, two blocks per step into
        /// two accumulators (one fma chain would cost its 4-cycle latency per block).
        #[target_feature(enable = $feat)]
        unsafe fn dot_legacy<const F: u8>(nb: usize, x: *const u8, y: *const u8) -> f32 {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut extra = 0f32;
            let mut b = 0;
            // SAFETY: b, b+1 < nb in the loop, b < nb after it.
            unsafe {
                while b + 1 < nb {
                    let (d0, s0, e0) = legacy_block::<F>(x, y, b);
                    let (d1, s1, e1) = legacy_block::<F>(x, y, b + 1);
                    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), _mm256_cvtepi32_ps(s0), acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), _mm256_cvtepi32_ps(s1), acc1);
                    extra += e0 + e1;
                    b += 2;
                }
                if b < nb {
                    let (d0, s0, e0) = legacy_block::<F>(x, y, b);
                    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), _mm256_cvtepi32_ps(s0), acc0);
                    extra += e0;
                }
            }
            hsum_ps(_mm256_add_ps(acc0, acc1)) + extra
        }

        /// Legacy-format row against one activation row whose per-block scale (`da`),
        /// integer correction (`ci`, formats with `c_off`) and `s` (`sf`, Q8_1) were computed once
        /// for all rows (`act_info`, padded by 8). The weight scales of 8 blocks go through
        /// one `vcvtph2ps`; the block loop is then load, `dot4`, convert, fma.
        #[target_feature(enable = $feat)]
        unsafe fn gemv_legacy<const F: u8>(nb: usize, x: *const u8, y: *const u8, info: &ActInfo) -> f32 {
            let (bb, _) = legacy_layout(F);
            let c = c_off(F);
            let (mut acc0, mut acc1, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b < nb {
                let m = 8.min(nb - b);
                // SAFETY: blocks b..b+m of the row exist; da/sf are padded by 8 entries
                // past the last block; every other access is to block b+j < nb.
                unsafe {
                    let rd = |j: usize, off: usize| {
                        if j < m {
                            rd_u16(x.add((b + j) * bb + off)) as i16
                        } else {
                            0
                        }
                    };
                    let dw = _mm256_cvtph_ps(_mm_setr_epi16(
                        rd(0, 0),
                        rd(1, 0),
                        rd(2, 0),
                        rd(3, 0),
                        rd(4, 0),
                        rd(5, 0),
                        rd(6, 0),
                        rd(7, 0),
                    ));
                    let sc = _mm256_mul_ps(dw, _mm256_loadu_ps(info.da.as_ptr().add(b)));
                    if has_o(F) {
                        let mw = _mm256_cvtph_ps(_mm_setr_epi16(
                            rd(0, 2),
                            rd(1, 2),
                            rd(2, 2),
                            rd(3, 2),
                            rd(4, 2),
                            rd(5, 2),
                            rd(6, 2),
                            rd(7, 2),
                        ));
                        accm = _mm256_fmadd_ps(mw, _mm256_loadu_ps(info.sf.as_ptr().add(b)), accm);
                    }
                    let mut scs = [0f32; 8];
                    _mm256_storeu_ps(scs.as_mut_ptr(), sc);
                    let one = |j: usize, acc: __m256| {
                        // Lanes are partial sums of this row: the correction goes in lane 0.
                        let init = if c != 0 {
                            _mm256_zextsi128_si256(_mm_cvtsi32_si128(*info.ci.get_unchecked(b + j)))
                        } else {
                            _mm256_setzero_si256()
                        };
                        let q = legacy_q::<F>(x.add((b + j) * bb));
                        let a = ld(y.add(act_off(act(F), b + j)));
                        let s = if signed(F) { dot_ss(init, q, a) } else { dot4(init, q, a) };
                        _mm256_fmadd_ps(_mm256_set1_ps(scs[j]), _mm256_cvtepi32_ps(s), acc)
                    };
                    if m == 8 {
                        for j in (0..8).step_by(2) {
                            acc0 = one(j, acc0);
                            acc1 = one(j + 1, acc1);
                        }
                    } else {
                        for j in 0..m {
                            acc0 = one(j, acc0);
                        }
                    }
                }
                b += 8;
            }
            hsum_ps(_mm256_add_ps(acc0, acc1)) + hsum_ps(accm)
        }

        /// How far ahead of each row `gemv_legacy4` prefetches, in bytes. The hardware
        /// prefetcher stops at 4 KiB pages and at the end of each weight matrix; 4 KiB
        /// ahead keeps the streams warm across both, on into the rows of the next group
        /// and the next tensor of the mapped file. Measured (SmolLM2-135M, one thread):
        /// 2 KiB is ~20% slower, 8 and 16 KiB are no faster.
        const PF_AHEAD: usize = 4096;

        /// `gemv_legacy` over 4 weight rows at once: each activation block (and its
        /// scale and correction) is loaded once for 4 rows, and the 4 rows' fma chains are
        /// independent, so the loop is bound by the weight stream instead of by one
        /// chain's latency. Each row sums its blocks in the same order as `gemv_legacy`
        /// but in one accumulator.
        #[target_feature(enable = $feat)]
        unsafe fn gemv_legacy4<const F: u8>(nb: usize, x: [*const u8; 4], y: *const u8, info: &ActInfo) -> [f32; 4] {
            let (bb, _) = legacy_layout(F);
            let c = c_off(F);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut accm = [_mm256_setzero_ps(); 4];
            let mut b = 0;
            while b < nb {
                let m = 8.min(nb - b);
                // SAFETY: blocks b..b+m of every row exist; da/sf are padded by 8 entries
                // past the last block; every other access is to block b+j < nb. The
                // prefetch address is never dereferenced (prefetches do not fault).
                unsafe {
                    let da = _mm256_loadu_ps(info.da.as_ptr().add(b));
                    let mut scs = [[0f32; 8]; 4];
                    for r in 0..4 {
                        let rd = |j: usize, off: usize| {
                            if j < m {
                                rd_u16(x[r].add((b + j) * bb + off)) as i16
                            } else {
                                0
                            }
                        };
                        let dw = _mm256_cvtph_ps(_mm_setr_epi16(
                            rd(0, 0),
                            rd(1, 0),
                            rd(2, 0),
                            rd(3, 0),
                            rd(4, 0),
                            rd(5, 0),
                            rd(6, 0),
                            rd(7, 0),
                        ));
                        _mm256_storeu_ps(scs[r].as_mut_ptr(), _mm256_mul_ps(dw, da));
                        if has_o(F) {
                            let mw = _mm256_cvtph_ps(_mm_setr_epi16(
                                rd(0, 2),
                                rd(1, 2),
                                rd(2, 2),
                                rd(3, 2),
                                rd(4, 2),
                                rd(5, 2),
                                rd(6, 2),
                                rd(7, 2),
                            ));
                            let sf = _mm256_loadu_ps(info.sf.as_ptr().add(b));
                            accm[r] = _mm256_fmadd_ps(mw, sf, accm[r]);
                        }
                        // One prefetch per 64-byte line of this group, `PF_AHEAD` on:
                        // worth ~1.5-2x decode speed over the hardware prefetcher alone.
                        let pf = x[r].wrapping_add(b * bb + PF_AHEAD);
                        let mut o = 0;
                        while o < 8 * bb {
                            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(o) as *const i8);
                            o += 64;
                        }
                    }
                    for j in 0..m {
                        // Lanes are partial sums of a row: the correction goes in lane 0.
                        let init = if c != 0 {
                            let ci = *info.ci.get_unchecked(b + j);
                            _mm256_zextsi128_si256(_mm_cvtsi32_si128(ci))
                        } else {
                            _mm256_setzero_si256()
                        };
                        let a = ld(y.add(act_off(act(F), b + j)));
                        for r in 0..4 {
                            let q = legacy_q::<F>(x[r].add((b + j) * bb));
                            let s = if signed(F) { dot_ss(init, q, a) } else { dot4(init, q, a) };
                            let sc = _mm256_set1_ps(scs[r][j]);
                            acc[r] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[r]);
                        }
                    }
                }
                b += 8;
            }
            let mut out = [0f32; 4];
            for r in 0..4 {
                out[r] = hsum_ps(acc[r]) + hsum_ps(accm[r]);
            }
            out
        }

        /// Block bytes and quant offset of a legacy format.
        const fn legacy_layout(f: u8) -> (usize, usize) {
            match f {
                F_Q4_0 => (Q4_0_B, 2),
                F_Q4_1 => (Q4_1_B, 4),
                F_Q5_0 => (Q5_0_B, 6),
                F_Q5_1 => (Q5_1_B, 8),
                _ => (Q8_0_B, 2),
            }
        }

        /// The 32 quants of the legacy block at `x` as the panel stores them: unsigned
        /// with the format's `c_off` bias, or signed (`signed(F)`).
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn legacy_q<const F: u8>(x: *const u8) -> __m256i {
            // SAFETY: the caller passes a whole block at `x`.
            unsafe {
                match F {
                    F_Q4_0 => nibbles_at(x.add(2)),
                    F_Q4_1 => nibbles_at(x.add(4)),
                    F_Q5_0 => q5_quants(x, 2, 6),
                    F_Q5_1 => q5_quants(x, 4, 8),
                    _ => {
                        let flip = if VNNI { _mm256_set1_epi8(-128) } else { _mm256_setzero_si256() };
                        _mm256_xor_si256(ld(x.add(2)), flip)
                    }
                }
            }
        }

        /// Q4_K and Q5_K (`HI`: with the fifth bits): integer sums weighted by the 6-bit
        /// sub-block scales inside `madd_acc`, one float multiply per super-block; the
        /// mins meet the activation's bsums.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q45_k<const HI: bool>(nb: usize, x: *const u8, y: *const u8) -> f32 {
            let (blk, qs_off) = if HI { (Q5_K_B, 48) } else { (Q4_K_B, 16) };
            let m4 = _mm256_set1_epi8(0x0F);
            let mut acc = _mm256_setzero_ps();
            let mut acc_m = _mm_setzero_ps();
            for i in 0..nb {
                // SAFETY: super-block i of both rows is in bounds (i < nb).
                let (xb, yb) = unsafe { (x.add(i * blk), y.add(i * Q8_K_B)) };
                // SAFETY: as above; every offset below is inside one block.
                unsafe {
                    let yd = rd_f32(yb);
                    let d = yd * fp16(rd_u16(xb));
                    let dmin = -yd * fp16(rd_u16(xb.add(2)));
                    let u = k4_scales_mins(xb.add(4));
                    let ms = _mm256_cvtepu8_epi16(_mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32));
                    let bsums = ld(yb.add(4 + 256));
                    let pair_sums = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1));
                    let prod = _mm_madd_epi16(_mm256_extracti128_si256(ms, 1), pair_sums);
                    acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
                    let sc128 = _mm256_castsi256_si128(ms);
                    let scales = _mm256_set_m128i(sc128, sc128);
                    let hbits = if HI { ld(xb.add(16)) } else { _mm256_setzero_si256() };
                    // Two chains (lo/hi halves): `madd_acc` latency, not throughput, bounds one.
                    let (mut sumi, mut sumi2) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for j in 0..4 {
                        let bits = ld(xb.add(qs_off + 32 * j));
                        let mut lo = _mm256_and_si256(bits, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                        if HI {
                            lo = _mm256_or_si256(lo, high_bit(hbits, 2 * j as i32));
                            hi = _mm256_or_si256(hi, high_bit(hbits, 2 * j as i32 + 1));
                        }
                        let a_lo = ld(yb.add(4 + 64 * j));
                        let a_hi = ld(yb.add(4 + 64 * j + 32));
                        let s_lo = bcast16(scales, 2 * j as i32);
                        let s_hi = bcast16(scales, 2 * j as i32 + 1);
                        sumi = madd_acc(sumi, _mm256_maddubs_epi16(lo, a_lo), s_lo);
                        sumi2 = madd_acc(sumi2, _mm256_maddubs_epi16(hi, a_hi), s_hi);
                    }
                    let sumi = _mm256_add_epi32(sumi, sumi2);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
                }
            }
            hsum_ps(acc) + hsum_ps128(acc_m)
        }

        /// Bit `j` of every byte of `qh`, moved to 0x10 (Q5_K's fifth bit of sub-block j).
        #[target_feature(enable = $feat)]
        #[inline]
        fn high_bit(qh: __m256i, j: i32) -> __m256i {
            // 16-bit shifts move bits across the byte boundary; the 0x10 mask only keeps
            // the bit that came from the same byte.
            let m = _mm256_set1_epi8(0x10);
            match j {
                0 => _mm256_and_si256(_mm256_slli_epi16(qh, 4), m),
                1 => _mm256_and_si256(_mm256_slli_epi16(qh, 3), m),
                2 => _mm256_and_si256(_mm256_slli_epi16(qh, 2), m),
                3 => _mm256_and_si256(_mm256_slli_epi16(qh, 1), m),
                4 => _mm256_and_si256(qh, m),
                5 => _mm256_and_si256(_mm256_srli_epi16(qh, 1), m),
                6 => _mm256_and_si256(_mm256_srli_epi16(qh, 2), m),
                _ => _mm256_and_si256(_mm256_srli_epi16(qh, 3), m),
            }
        }

        /// The four 32-quant vectors (unsigned, 0..64) of half `h` of a Q6_K block at `x`,
        /// elements 128h + 32i .. +32 for i = 0..4.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q6_k_quants(x: *const u8, h: usize) -> [__m256i; 4] {
            let m15 = _mm256_set1_epi8(15);
            // SAFETY: the caller passes a whole Q6_K block; h < 2.
            let (l1, l2, qh) = unsafe { (ld(x.add(64 * h)), ld(x.add(64 * h + 32)), ld(x.add(128 + 32 * h))) };
            let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(3)), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(12)), 2);
            let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(48));
            let h3 = _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(-64)), 2);
            [
                _mm256_or_si256(_mm256_and_si256(l1, m15), h0),
                _mm256_or_si256(_mm256_and_si256(l2, m15), h1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m15), h2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m15), h3),
            ]
        }

        #[target_feature(enable = $feat)]
        unsafe fn dot_q6_k(nb: usize, x: *const u8, y: *const u8) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for i in 0..nb {
                // SAFETY: super-block i of both rows is in bounds (i < nb).
                let (xb, yb) = unsafe { (x.add(i * Q6_K_B), y.add(i * Q8_K_B)) };
                // SAFETY: as above; every offset below is inside one block.
                unsafe {
                    let d = rd_f32(yb) * fp16(rd_u16(xb.add(208)));
                    let sc8 = ld128(xb.add(192));
                    let bsums = ld(yb.add(4 + 256));
                    // Σ sc·(q-32)·a = Σ sc·q·a - 32·Σ sc·bsum.
                    let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(sc8)), 5);
                    let mut sumi = [_mm256_setzero_si256(); 2];
                    for h in 0..2 {
                        let q = q6_k_quants(xb, h);
                        for (i4, q) in q.iter().enumerate() {
                            let g = 4 * h + i4; // 32-element group; scales 2g, 2g+1
                            let a = ld(yb.add(4 + 32 * g));
                            let sh = _mm_set_epi64x(
                                0x0101010101010101 * (2 * g as i64 + 1),
                                0x0101010101010101 * (2 * g as i64),
                            );
                            let s16 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, sh));
                            sumi[i4 & 1] = madd_acc(sumi[i4 & 1], _mm256_maddubs_epi16(*q, a), s16);
                        }
                    }
                    let sumi = _mm256_sub_epi32(_mm256_add_epi32(sumi[0], sumi[1]), sub);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
                }
            }
            hsum_ps(acc)
        }

        /// The direct dot for `ty`, or `None` for the formats left to the reference.
        ///
        /// # Safety
        /// The CPU has this module's features; `w`/`a` are whole rows of `n` elements.
        pub(in crate::quant) unsafe fn vec_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Option<f32> {
            let (x, y) = (w.as_ptr(), a.as_ptr());
            // SAFETY: features per the contract; each kernel reads exactly the n/32 or
            // n/256 blocks that `w` and `a` hold.
            unsafe {
                Some(match ty {
                    GgmlType::Q4_0 => dot_legacy::<F_Q4_0>(n / 32, x, y),
                    GgmlType::Q4_1 => dot_legacy::<F_Q4_1>(n / 32, x, y),
                    GgmlType::Q5_0 => dot_legacy::<F_Q5_0>(n / 32, x, y),
                    GgmlType::Q5_1 => dot_legacy::<F_Q5_1>(n / 32, x, y),
                    GgmlType::Q8_0 => dot_legacy::<F_Q8_0>(n / 32, x, y),
                    GgmlType::Q4_K => dot_q45_k::<false>(n / 256, x, y),
                    GgmlType::Q5_K => dot_q45_k::<true>(n / 256, x, y),
                    GgmlType::Q6_K => dot_q6_k(n / 256, x, y),
                    GgmlType::F32 => dot_float::<0>(n, x, y),
                    GgmlType::F16 => dot_float::<1>(n, x, y),
                    GgmlType::BF16 => dot_float::<2>(n, x, y),
                    _ => return None,
                })
            }
        }

        // ---- float rows ------------------------------------------------------------------

        /// 8 values of float kind `K` (0 = f32, 1 = f16, 2 = bf16) at `p`, as f32.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn ld_float<const K: u8>(p: *const u8) -> __m256 {
            // SAFETY: the caller guarantees 8 readable values at `p`.
            unsafe {
                match K {
                    0 => _mm256_loadu_ps(p.cast()),
                    1 => _mm256_cvtph_ps(ld128(p)),
                    // bf16 is the top half of an f32.
                    _ => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(p)), 16)),
                }
            }
        }

        /// Float weights (and their same-type activations): f32 FMA over four 8-lane
        /// accumulators, the tail in scalar f32. ggml's SIMD float dots sum in f32 the same
        /// way; the scalar reference keeps f64 sums, within the tolerance table.
        #[target_feature(enable = $feat)]
        unsafe fn dot_float<const K: u8>(n: usize, x: *const u8, y: *const u8) -> f32 {
            let sz = if K == 0 { 4 } else { 2 };
            let get = |p: *const u8, i: usize| -> f32 {
                // SAFETY: i < n, and the rows hold n values.
                unsafe {
                    let q = p.add(i * sz);
                    match K {
                        0 => rd_f32(q),
                        1 => f16::from_bits(rd_u16(q)).to_f32(),
                        _ => f32::from_bits((rd_u16(q) as u32) << 16),
                    }
                }
            };
            // SAFETY: every load below stays within the n values of each row.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= n {
                    for (k, a) in acc.iter_mut().enumerate() {
                        let o = (i + 8 * k) * sz;
                        *a = _mm256_fmadd_ps(ld_float::<K>(x.add(o)), ld_float::<K>(y.add(o)), *a);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps(ld_float::<K>(x.add(i * sz)), ld_float::<K>(y.add(i * sz)), acc[0]);
                    i += 8;
                }
                let mut sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
                while i < n {
                    sum += get(x, i) * get(y, i);
                    i += 1;
                }
                sum
            }
        }

        // ---- panel gemm ------------------------------------------------------------------

        // Format ids for the const-generic panel code.
        const F_Q4_0: u8 = 0;
        const F_Q4_1: u8 = 1;
        const F_Q5_0: u8 = 2;
        const F_Q5_1: u8 = 3;
        const F_Q8_0: u8 = 4;
        const F_Q4_K: u8 = 5;
        const F_Q5_K: u8 = 6;
        const F_Q6_K: u8 = 7;

        /// Sub-blocks of 16 (two scales per 32-block) rather than one scale per 32.
        const fn sub16(f: u8) -> bool {
            f == F_Q6_K
        }
        /// Quants are stored as u8 `q`, the value is `scale·(q - C)`: the panel folds
        /// `-C·Σa` into the integer accumulator's start.
        const fn c_off(f: u8) -> i32 {
            match f {
                F_Q4_0 => 8,
                F_Q5_0 => 16,
                F_Q8_0 if VNNI => 128,
                F_Q6_K => 32,
                _ => 0,
            }
        }
        /// A float offset per (32-block, row) that meets the activation's float block sum.
        const fn has_o(f: u8) -> bool {
            matches!(f, F_Q4_1 | F_Q5_1 | F_Q4_K | F_Q5_K)
        }
        /// Signed weights and `dot_ss` (Q8_0 without VNNI: u8 sums would saturate).
        const fn signed(f: u8) -> bool {
            f == F_Q8_0 && !VNNI
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
        #[inline(always)]
        const fn act_off(ak: u8, b: usize) -> usize {
            match ak {
                0 => b * Q8_0_B + 2,
                1 => b * Q8_1_B + 4,
                _ => (b / 8) * Q8_K_B + 4 + (b % 8) * 32,
            }
        }

        /// Per-token summaries of the activation rows, computed once per gemm call.
        /// Shapes: `da [n_tok][nb]`, `ci [n_tok][nb·ns]`, `sf [n_tok][nb]`, where `nb` is
        /// the number of 32-blocks in a row and `ns` the sub-blocks per 32-block.
        struct ActInfo {
            /// Activation scale of each 32-block (Q8_K: its super-block's `d`).
            da: Vec<f32>,
            /// `-c_off·Σq` over each sub-block (only when `c_off != 0`): the integer
            /// correction for weights stored as `q + c_off`.
            ci: Vec<i32>,
            /// `d·Σq` of each 32-block (only when `has_o`; Q8_1 stores it as `s`).
            sf: Vec<f32>,
        }

        #[target_feature(enable = $feat)]
        unsafe fn act_info<const F: u8>(a: &[u8], n_tok: usize, nb: usize, arb: usize) -> ActInfo {
            let ns = if sub16(F) { 2 } else { 1 };
            let mut info = ActInfo {
                // +8: `gemv_legacy` loads 8 entries at a time.
                da: vec![0.0; n_tok * nb + 8],
                ci: if c_off(F) != 0 { vec![0; n_tok * nb * ns] } else { Vec::new() },
                sf: if has_o(F) { vec![0.0; n_tok * nb + 8] } else { Vec::new() },
            };
            let ones = _mm256_set1_epi8(1);
            for t in 0..n_tok {
                let row = &a[t * arb..(t + 1) * arb];
                let p = row.as_ptr();
                for b in 0..nb {
                    // SAFETY: block b (or its super-block) lies inside `row`, which holds
                    // nb 32-blocks of the activation format.
                    unsafe {
                        match act(F) {
                            0 => {
                                let blk = p.add(b * Q8_0_B);
                                info.da[t * nb + b] = fp16(rd_u16(blk));
                                if c_off(F) != 0 {
                                    let s = dot4(_mm256_setzero_si256(), ones, ld(blk.add(2)));
                                    info.ci[t * nb + b] = -c_off(F) * hsum_i32(s);
                                }
                            }
                            1 => {
                                let blk = p.add(b * Q8_1_B);
                                info.da[t * nb + b] = fp16(rd_u16(blk));
                                info.sf[t * nb + b] = fp16(rd_u16(blk.add(2)));
                            }
                            _ => {
                                let blk = p.add((b / 8) * Q8_K_B);
                                let d = rd_f32(blk);
                                info.da[t * nb + b] = d;
                                let bs = blk.add(4 + 256 + (b % 8) * 4);
                                let (s0, s1) = (rd_u16(bs) as i16 as i32, rd_u16(bs.add(2)) as i16 as i32);
                                if has_o(F) {
                                    info.sf[t * nb + b] = d * (s0 + s1) as f32;
                                }
                                if sub16(F) {
                                    info.ci[(t * nb + b) * 2] = -c_off(F) * s0;
                                    info.ci[(t * nb + b) * 2 + 1] = -c_off(F) * s1;
                                }
                            }
                        }
                    }
                }
            }
            info
        }

        /// 32-blocks per K-chunk of a panel: 1024 elements, a multiple of 8 so K-quant
        /// super-blocks never straddle chunks. Panel + scratch ≈ 19 KiB, in L1.
        const KC: usize = 32;
        const PR: usize = 8;

        /// One K-chunk of 8 decoded, interleaved weight rows.
        struct Panel {
            /// `[PR rows][KC]` decoded 32-quant blocks, row-major (before the transpose).
            tmp: [__m256i; PR * KC],
            /// `[KC][8 k]`: lane r of `q[b*8 + k]` = quants 4k..4k+4 of row r, block b.
            q: [__m256i; KC * 8],
            /// `[KC·ns][PR]` scale of each (sub-block, row).
            s: [f32; KC * 2 * PR],
            /// `[KC][PR]` float offset of each (block, row).
            o: [f32; KC * PR],
        }

        /// Decodes blocks `b0..b0+kb` of one weight row into `p.tmp[r]`, `p.s`, `p.o`.
        #[target_feature(enable = $feat)]
        unsafe fn decode<const F: u8>(row: *const u8, b0: usize, kb: usize, r: usize, p: &mut Panel) {
            let tmp = &mut p.tmp[r * KC..(r + 1) * KC];
            // SAFETY: (all arms) the caller passes a whole weight row at `row` that holds
            // blocks b0..b0+kb; every offset below stays inside one block.
            unsafe {
                match F {
                    F_Q4_0 | F_Q4_1 | F_Q5_0 | F_Q5_1 | F_Q8_0 => {
                        let (bb, _) = legacy_layout(F);
                        for b in 0..kb {
                            let x = row.add((b0 + b) * bb);
                            tmp[b] = legacy_q::<F>(x);
                            p.s[b * PR + r] = fp16(rd_u16(x));
                            if has_o(F) {
                                p.o[b * PR + r] = fp16(rd_u16(x.add(2)));
                            }
                        }
                    }
                    F_Q4_K | F_Q5_K => {
                        let hi = F == F_Q5_K;
                        let (blk, qs_off) = if hi { (Q5_K_B, 48) } else { (Q4_K_B, 16) };
                        let m4 = _mm256_set1_epi8(0x0F);
                        for sbk in 0..kb / 8 {
                            let x = row.add((b0 / 8 + sbk) * blk);
                            let d = fp16(rd_u16(x));
                            let dmin = fp16(rd_u16(x.add(2)));
                            let u = k4_scales_mins(x.add(4));
                            let sm: [u8; 16] = core::array::from_fn(|i| (u[i / 4] >> (8 * (i % 4))) as u8);
                            let hbits = if hi { ld(x.add(16)) } else { _mm256_setzero_si256() };
                            for j in 0..4 {
                                let bits = ld(x.add(qs_off + 32 * j));
                                let mut lo = _mm256_and_si256(bits, m4);
                                let mut hv = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                                if hi {
                                    lo = _mm256_or_si256(lo, high_bit(hbits, 2 * j as i32));
                                    hv = _mm256_or_si256(hv, high_bit(hbits, 2 * j as i32 + 1));
                                }
                                tmp[sbk * 8 + 2 * j] = lo;
                                tmp[sbk * 8 + 2 * j + 1] = hv;
                            }
                            for j in 0..8 {
                                let b = sbk * 8 + j;
                                p.s[b * PR + r] = d * sm[j] as f32;
                                p.o[b * PR + r] = -(dmin * sm[8 + j] as f32);
                            }
                        }
                    }
                    _ => {
                        // Q6_K
                        for sbk in 0..kb / 8 {
                            let x = row.add((b0 / 8 + sbk) * Q6_K_B);
                            let d = fp16(rd_u16(x.add(208)));
                            for h in 0..2 {
                                let q = q6_k_quants(x, h);
                                for i in 0..4 {
                                    tmp[sbk * 8 + 4 * h + i] = q[i];
                                }
                            }
                            for g in 0..8 {
                                let b = sbk * 8 + g;
                                for sb in 0..2 {
                                    let sc = *x.add(192 + 2 * g + sb) as i8;
                                    p.s[(b * 2 + sb) * PR + r] = d * sc as f32;
                                }
                            }
                        }
                    }
                }
            }
        }

        /// `p.tmp` (row-major) → `p.q` (interleaved by 4 bytes): an 8×8 dword transpose
        /// per block.
        #[target_feature(enable = $feat)]
        fn interleave(p: &mut Panel, kb: usize) {
            for b in 0..kb {
                let v: [__m256i; 8] = core::array::from_fn(|r| p.tmp[r * KC + b]);
                let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
                let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
                let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
                let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
                let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
                let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
                let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
                let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
                let u0 = _mm256_unpacklo_epi64(t0, t2);
                let u1 = _mm256_unpackhi_epi64(t0, t2);
                let u2 = _mm256_unpacklo_epi64(t1, t3);
                let u3 = _mm256_unpackhi_epi64(t1, t3);
                let u4 = _mm256_unpacklo_epi64(t4, t6);
                let u5 = _mm256_unpackhi_epi64(t4, t6);
                let u6 = _mm256_unpacklo_epi64(t5, t7);
                let u7 = _mm256_unpackhi_epi64(t5, t7);
                let q = &mut p.q[b * 8..b * 8 + 8];
                q[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
                q[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
                q[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
                q[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
                q[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
                q[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
                q[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
                q[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
            }
        }

        /// T tokens against one panel chunk (`kb` blocks starting at global block `b0`);
        /// returns one 8-row f32 vector per token.
        #[target_feature(enable = $feat)]
        unsafe fn tile<const F: u8, const T: usize>(
            p: &Panel,
            kb: usize,
            b0: usize,
            arow: [*const u8; T],
            info: &ActInfo,
            t0: usize,
            nb: usize,
        ) -> [__m256; T] {
            let ns = if sub16(F) { 2 } else { 1 };
            let c = c_off(F);
            let mut accf = [_mm256_setzero_ps(); T];
            for b in 0..kb {
                let gb = b0 + b;
                let ap: [*const u8; T] = core::array::from_fn(|t| {
                    // SAFETY: block gb of each activation row is in bounds (gb < nb).
                    unsafe { arow[t].add(act_off(act(F), gb)) }
                });
                // One sub-block at a time, so only T integer accumulators are live.
                for sb in 0..ns {
                    let mut acc = [_mm256_setzero_si256(); T];
                    if c != 0 {
                        for t in 0..T {
                            let i = ((t0 + t) * nb + gb) * ns + sb;
                            // SAFETY: ci has n_tok·nb·ns entries; t0+t < n_tok, gb < nb.
                            let ci = unsafe { *info.ci.get_unchecked(i) };
                            // Lanes are rows: every row gets the token's correction.
                            acc[t] = _mm256_set1_epi32(ci);
                        }
                    }
                    let kn = 8 / ns;
                    for k in sb * kn..(sb + 1) * kn {
                        let w = p.q[b * 8 + k];
                        for t in 0..T {
                            // SAFETY: 4 bytes inside the 32 quants of block gb.
                            let av = _mm256_set1_epi32(unsafe { rd_i32(ap[t].add(4 * k)) });
                            acc[t] = if signed(F) { dot_ss(acc[t], w, av) } else { dot4(acc[t], w, av) };
                        }
                    }
                    // SAFETY: s holds KC·2·PR floats; (b·ns+sb)·PR + 8 ≤ that.
                    let sv = unsafe { _mm256_loadu_ps(p.s.as_ptr().add((b * ns + sb) * PR)) };
                    for t in 0..T {
                        // SAFETY: da has n_tok·nb entries.
                        let da = unsafe { *info.da.get_unchecked((t0 + t) * nb + gb) };
                        let sc = _mm256_mul_ps(sv, _mm256_set1_ps(da));
                        accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), sc, accf[t]);
                    }
                }
                if has_o(F) {
                    // SAFETY: o holds KC·PR floats.
                    let ov = unsafe { _mm256_loadu_ps(p.o.as_ptr().add(b * PR)) };
                    for t in 0..T {
                        // SAFETY: sf has n_tok·nb entries.
                        let sf = unsafe { *info.sf.get_unchecked((t0 + t) * nb + gb) };
                        accf[t] = _mm256_fmadd_ps(ov, _mm256_set1_ps(sf), accf[t]);
                    }
                }
            }
            accf
        }

        /// Runs `tile::<F, T>` for tokens t0..t0+T and adds (or, on the first chunk,
        /// stores) the results into `out`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_store<const F: u8, const T: usize>(
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
            // SAFETY: rows t0..t0+T of `a` exist (caller); `out` covers rows r0..r0+nr of
            // tokens t0..t0+T (checked by `Kernels::gemm`).
            unsafe {
                let arow: [*const u8; T] = core::array::from_fn(|t| a.add((t0 + t) * arb));
                let acc = tile::<F, T>(p, kb, b0, arow, info, t0, nb);
                for (t, v) in acc.iter().enumerate() {
                    let o = out.add((t0 + t) * out_stride + r0);
                    if nr == PR {
                        let v = if b0 == 0 { *v } else { _mm256_add_ps(*v, _mm256_loadu_ps(o)) };
                        _mm256_storeu_ps(o, v);
                    } else {
                        let mut lanes = [0f32; PR];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                        for (r, l) in lanes.iter().take(nr).enumerate() {
                            *o.add(r) = if b0 == 0 { *l } else { *o.add(r) + l };
                        }
                    }
                }
            }
        }

        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm_panel<const F: u8>(
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
            // SAFETY: `a` holds n_tok rows of arb bytes (checked by the caller).
            let info = unsafe { act_info::<F>(a, n_tok, nb, arb) };
            let mut p = Panel {
                tmp: [_mm256_setzero_si256(); PR * KC],
                q: [_mm256_setzero_si256(); KC * 8],
                s: [0.0; KC * 2 * PR],
                o: [0.0; KC * PR],
            };
            for r0 in (0..n_rows).step_by(PR) {
                let nr = PR.min(n_rows - r0);
                for b0 in (0..nb).step_by(KC) {
                    let kb = KC.min(nb - b0);
                    for r in 0..PR {
                        // Missing rows of the last panel repeat row r0; their lanes are
                        // computed and dropped.
                        let row = if r < nr { r0 + r } else { r0 };
                        // SAFETY: row < n_rows, so its wrb bytes are inside `w`.
                        unsafe { decode::<F>(w.as_ptr().add(row * wrb), b0, kb, r, &mut p) };
                    }
                    interleave(&mut p, kb);
                    let mut t0 = 0;
                    while t0 < n_tok {
                        let rem = n_tok - t0;
                        let ap = a.as_ptr();
                        // SAFETY: t0 + T ≤ n_tok in every arm; see `tile_store`.
                        unsafe {
                            if MAX_T >= 8 && rem >= 8 {
                                tile_store::<F, 8>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                                t0 += 8;
                            } else if rem >= 4 {
                                tile_store::<F, 4>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                                t0 += 4;
                            } else if rem >= 2 {
                                tile_store::<F, 2>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                                t0 += 2;
                            } else {
                                tile_store::<F, 1>(&p, kb, b0, ap, arb, &info, t0, nb, out, out_stride, r0, nr);
                                t0 += 1;
                            }
                        }
                    }
                }
            }
        }

        /// One token against every row (decode): activation summaries once, then a
        /// streaming pass over each row.
        #[target_feature(enable = $feat)]
        unsafe fn gemv<const F: u8>(n: usize, w: &[u8], wrb: usize, a: &[u8], out: &mut [f32]) {
            let nb = n / 32;
            // SAFETY: `a` is one whole activation row; each `wr` one whole weight row.
            unsafe {
                let info = act_info::<F>(a, 1, nb, a.len());
                let n_rows = out.len().min(w.len() / wrb);
                let wp = w.as_ptr();
                let mut r = 0;
                while r + 4 <= n_rows {
                    let x = [wp.add(r * wrb), wp.add((r + 1) * wrb), wp.add((r + 2) * wrb), wp.add((r + 3) * wrb)];
                    let o4 = gemv_legacy4::<F>(nb, x, a.as_ptr(), &info);
                    out[r..r + 4].copy_from_slice(&o4);
                    r += 4;
                }
                for (o, wr) in out[r..n_rows].iter_mut().zip(w[r * wrb..].chunks_exact(wrb)) {
                    *o = gemv_legacy::<F>(nb, wr.as_ptr(), a.as_ptr(), &info);
                }
            }
        }

        /// One token against every row with exactly the panel's arithmetic
        /// (`tile::<F, 1>`), so a token's result does not depend on whether it was
        /// computed alone or in a batch: 8 rows at a time with rows in lanes, each
        /// block's integer dot reduced per row (integer sums are exact, however
        /// grouped), then the same f32 multiply/fma chain over the blocks of each
        /// `KC` chunk, and chunks added in order. Weights stream once, with software
        /// prefetch `PF_AHEAD` bytes ahead of each row.
        #[target_feature(enable = $feat)]
        unsafe fn gemv_exact<const F: u8>(n: usize, w: &[u8], wrb: usize, a: &[u8], out: &mut [f32]) {
            let nb = n / 32;
            let (bb, _) = legacy_layout(F);
            let c = c_off(F);
            // SAFETY: `a` is one whole activation row; each row pointer below addresses a
            // whole weight row (missing rows of the last group repeat the first); block
            // offsets stay below nb; prefetch addresses are never dereferenced.
            unsafe {
                let info = act_info::<F>(a, 1, nb, a.len());
                let n_rows = out.len().min(w.len() / wrb);
                let wp = w.as_ptr();
                let y = a.as_ptr();
                let mut r0 = 0;
                while r0 < n_rows {
                    let nr = PR.min(n_rows - r0);
                    let x: [*const u8; PR] = core::array::from_fn(|r| wp.add((r0 + if r < nr { r } else { 0 }) * wrb));
                    let mut res = _mm256_setzero_ps();
                    for b0 in (0..nb).step_by(KC) {
                        let kb = KC.min(nb - b0);
                        let mut accf = _mm256_setzero_ps();
                        for b in b0..b0 + kb {
                            if (b - b0) % 8 == 0 {
                                for xr in x.iter() {
                                    let pf = xr.wrapping_add(b * bb + PF_AHEAD);
                                    let mut o = 0;
                                    while o < 8 * bb {
                                        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(o) as *const i8);
                                        o += 64;
                                    }
                                }
                            }
                            let av = ld(y.add(act_off(act(F), b)));
                            let z = _mm256_setzero_si256();
                            let d: [__m256i; PR] = core::array::from_fn(|r| {
                                let q = legacy_q::<F>(x[r].add(b * bb));
                                if signed(F) {
                                    dot_ss(z, q, av)
                                } else {
                                    dot4(z, q, av)
                                }
                            });
                            // Per-row totals, rows in lanes.
                            let h01 = _mm256_hadd_epi32(d[0], d[1]);
                            let h23 = _mm256_hadd_epi32(d[2], d[3]);
                            let h45 = _mm256_hadd_epi32(d[4], d[5]);
                            let h67 = _mm256_hadd_epi32(d[6], d[7]);
                            let h03 = _mm256_hadd_epi32(h01, h23);
                            let h47 = _mm256_hadd_epi32(h45, h67);
                            let mut isum = _mm256_add_epi32(
                                _mm256_permute2x128_si256::<0x20>(h03, h47),
                                _mm256_permute2x128_si256::<0x31>(h03, h47),
                            );
                            if c != 0 {
                                isum = _mm256_add_epi32(isum, _mm256_set1_epi32(*info.ci.get_unchecked(b)));
                            }
                            let rd = |r: usize, off: usize| rd_u16(x[r].add(b * bb + off)) as i16;
                            let sv = _mm256_cvtph_ps(_mm_setr_epi16(
                                rd(0, 0),
                                rd(1, 0),
                                rd(2, 0),
                                rd(3, 0),
                                rd(4, 0),
                                rd(5, 0),
                                rd(6, 0),
                                rd(7, 0),
                            ));
                            let sc = _mm256_mul_ps(sv, _mm256_set1_ps(*info.da.get_unchecked(b)));
                            accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, accf);
                            if has_o(F) {
                                let ov = _mm256_cvtph_ps(_mm_setr_epi16(
                                    rd(0, 2),
                                    rd(1, 2),
                                    rd(2, 2),
                                    rd(3, 2),
                                    rd(4, 2),
                                    rd(5, 2),
                                    rd(6, 2),
                                    rd(7, 2),
                                ));
                                accf = _mm256_fmadd_ps(ov, _mm256_set1_ps(*info.sf.get_unchecked(b)), accf);
                            }
                        }
                        res = if b0 == 0 { accf } else { _mm256_add_ps(accf, res) };
                    }
                    let mut lanes = [0f32; PR];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), res);
                    out[r0..r0 + nr].copy_from_slice(&lanes[..nr]);
                    r0 += PR;
                }
            }
        }

        /// gemm for the SIMD formats; `false` leaves the call to the caller's fallback.
        ///
        /// # Safety
        /// The CPU has this module's features; `w`, `a` and `out` have the sizes
        /// `Kernels::gemm` checks.
        #[allow(clippy::too_many_arguments)]
        pub(in crate::quant) unsafe fn gemm(
            ty: GgmlType,
            n: usize,
            w: &[u8],
            n_rows: usize,
            a: &[u8],
            n_tok: usize,
            out: &mut [f32],
            out_stride: usize,
            exact: bool,
        ) -> bool {
            let f = match ty {
                GgmlType::Q4_0 => F_Q4_0,
                GgmlType::Q4_1 => F_Q4_1,
                GgmlType::Q5_0 => F_Q5_0,
                GgmlType::Q5_1 => F_Q5_1,
                GgmlType::Q8_0 => F_Q8_0,
                GgmlType::Q4_K => F_Q4_K,
                GgmlType::Q5_K => F_Q5_K,
                GgmlType::Q6_K => F_Q6_K,
                _ => return false,
            };
            let wrb = w.len() / n_rows;
            let arb = a.len() / n_tok;
            if n_tok == 1 && exact && f <= F_Q8_0 {
                // SAFETY: features per the contract; whole rows.
                unsafe {
                    match f {
                        F_Q4_0 => gemv_exact::<F_Q4_0>(n, w, wrb, a, out),
                        F_Q4_1 => gemv_exact::<F_Q4_1>(n, w, wrb, a, out),
                        F_Q5_0 => gemv_exact::<F_Q5_0>(n, w, wrb, a, out),
                        F_Q5_1 => gemv_exact::<F_Q5_1>(n, w, wrb, a, out),
                        _ => gemv_exact::<F_Q8_0>(n, w, wrb, a, out),
                    }
                }
                return true;
            }
            if n_tok == 1 && !exact {
                // SAFETY: features per the contract; whole rows.
                unsafe {
                    match f {
                        F_Q4_0 => gemv::<F_Q4_0>(n, w, wrb, a, out),
                        F_Q4_1 => gemv::<F_Q4_1>(n, w, wrb, a, out),
                        F_Q5_0 => gemv::<F_Q5_0>(n, w, wrb, a, out),
                        F_Q5_1 => gemv::<F_Q5_1>(n, w, wrb, a, out),
                        F_Q8_0 => gemv::<F_Q8_0>(n, w, wrb, a, out),
                        _ => {
                            for (r, wr) in w.chunks_exact(wrb).enumerate() {
                                out[r] = vec_dot(ty, n, wr, a).expect("SIMD format");
                            }
                        }
                    }
                }
                return true;
            }
            let o = out.as_mut_ptr();
            // SAFETY: features per the contract; sizes checked by `Kernels::gemm`.
            unsafe {
                match f {
                    F_Q4_0 => gemm_panel::<F_Q4_0>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    F_Q4_1 => gemm_panel::<F_Q4_1>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    F_Q5_0 => gemm_panel::<F_Q5_0>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    F_Q5_1 => gemm_panel::<F_Q5_1>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    F_Q8_0 => gemm_panel::<F_Q8_0>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    F_Q4_K => gemm_panel::<F_Q4_K>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    F_Q5_K => gemm_panel::<F_Q5_K>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                    _ => gemm_panel::<F_Q6_K>(n, w, wrb, n_rows, a, arb, n_tok, o, out_stride),
                }
            }
            true
        }

        // ---- activation quantizers ---------------------------------------------------

        /// C `roundf` (half away from zero), exactly: trunc, then step by one where the
        /// (exact) fraction is ≥ ½.
        #[target_feature(enable = $feat)]
        #[inline]
        fn roundf8(x: __m256) -> __m256 {
            let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let sign = _mm256_set1_ps(-0.0);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let step = _mm256_or_ps(_mm256_and_ps(x, sign), _mm256_set1_ps(1.0));
            let ge = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5), _CMP_GE_OQ);
            _mm256_add_ps(t, _mm256_and_ps(ge, step))
        }

        /// Four vectors of 8 i32 (each in i8 range) → 32 i8 in order.
        #[target_feature(enable = $feat)]
        #[inline]
        fn pack_i8(i: [__m256i; 4]) -> __m256i {
            let a = _mm256_packs_epi32(i[0], i[1]);
            let b = _mm256_packs_epi32(i[2], i[3]);
            let x = _mm256_packs_epi16(a, b);
            _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        }

        #[target_feature(enable = $feat)]
        unsafe fn quantize_q8_0(src: &[f32], dst: &mut [u8], with_sum: bool) {
            let bb = if with_sum { Q8_1_B } else { Q8_0_B };
            let sign = _mm256_set1_ps(-0.0);
            for (x, y) in src.chunks_exact(32).zip(dst.chunks_exact_mut(bb)) {
                let v: [__m256; 4] = core::array::from_fn(|i| {
                    // SAFETY: `x` has 32 floats.
                    unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) }
                });
                let m = _mm256_max_ps(
                    _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
                );
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                // Same scalar arithmetic as the reference encoder.
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let idv = _mm256_set1_ps(id);
                let q: [__m256i; 4] = core::array::from_fn(|i| _mm256_cvttps_epi32(roundf8(_mm256_mul_ps(v[i], idv))));
                let off = if with_sum { 4 } else { 2 };
                y[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                if with_sum {
                    let sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
                    y[2..4].copy_from_slice(&f16::from_f32(sum as f32 * d).to_le_bytes());
                }
                // SAFETY: `y` has off + 32 bytes.
                unsafe { _mm256_storeu_si256(y.as_mut_ptr().add(off).cast(), pack_i8(q)) };
            }
        }

        #[target_feature(enable = $feat)]
        unsafe fn quantize_q8_k(src: &[f32], dst: &mut [u8]) {
            let sign = _mm256_set1_ps(-0.0);
            for (x, y) in src.chunks_exact(256).zip(dst.chunks_exact_mut(Q8_K_B)) {
                // SAFETY: `x` has 256 floats.
                let v = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) };
                let mut m = _mm256_setzero_ps();
                for i in 0..32 {
                    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v(i)));
                }
                let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
                if amax == 0.0 {
                    y.fill(0);
                    continue;
                }
                // The reference keeps the *first* element of largest magnitude, with its
                // sign; find it the same way.
                let am = _mm256_set1_ps(amax);
                let mut max = 0f32;
                for i in 0..32 {
                    let hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v(i)), am, _CMP_EQ_OQ));
                    if hit != 0 {
                        max = x[8 * i + hit.trailing_zeros() as usize];
                        break;
                    }
                }
                let iscale = -127.0 / max;
                let is = _mm256_set1_ps(iscale);
                let lim = _mm256_set1_epi32(127);
                y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
                for g in 0..8 {
                    let q: [__m256i; 4] = core::array::from_fn(|i| {
                        // Default MXCSR rounding is to nearest even, like `nearest_int`.
                        _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(is, v(4 * g + i))), lim)
                    });
                    let s0 = hsum_i32(_mm256_add_epi32(q[0], q[1]));
                    let s1 = hsum_i32(_mm256_add_epi32(q[2], q[3]));
                    // SAFETY: 32 bytes at 4 + 32g inside the 292-byte block.
                    unsafe { _mm256_storeu_si256(y.as_mut_ptr().add(4 + 32 * g).cast(), pack_i8(q)) };
                    y[260 + 4 * g..262 + 4 * g].copy_from_slice(&(s0 as i16).to_le_bytes());
                    y[262 + 4 * g..264 + 4 * g].copy_from_slice(&(s1 as i16).to_le_bytes());
                }
            }
        }

        // ---- packed K-quants (quant::packed): 8 rows a vector ----------------------------

        /// i8 → i32 for 8 bytes at `p`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn ld_i8x8(p: *const u8) -> __m256i {
            // SAFETY: the caller guarantees 8 readable bytes.
            unsafe { _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())) }
        }

        /// u8 → i32 for 8 bytes at `p`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn ld_u8x8(p: *const u8) -> __m256i {
            // SAFETY: the caller guarantees 8 readable bytes.
            unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())) }
        }

        /// The four activation bytes at `p`, in every dword.
        #[inline(always)]
        unsafe fn bcast4(p: *const u8) -> __m256i {
            // SAFETY: the caller guarantees 4 readable bytes.
            unsafe { _mm256_set1_epi32(rd_i32(p)) }
        }

        /// Bytes per token and block of a tile's activations (see `tile_acts`): K-quants
        /// (Q8_K blocks of 256) and Q4_0/Q8_0 (Q8_0 blocks of 32).
        const TILE_K: usize = 292;
        const TILE_L: usize = 40;

        /// The activations of tokens `t0..t0+T`, rearranged so that the tile kernels
        /// address every token's data from one base pointer (T pointers would not fit
        /// the general registers). Per block b, at `b * T * tile_bytes`: `[n dword][T]`
        /// quants (dword i = elements 4i..4i+4), then for the K-quants `[8 pair][T]`
        /// pairs of sub-block sums (i16, i16) and `[T]` scales `d` (f32); for Q4_0/Q8_0
        /// `[T]` scales `d` (f32) and `[T]` quant sums (i32).
        fn tile_acts(ty: GgmlType, a: &[u8], sums: &[i16], nb: usize, t0: usize, t: usize, out: &mut [u8]) {
            let k = ty.block_size() == 256;
            let (ab, tb, nd, spb) = if k { (Q8_K_B, TILE_K, 64, 16) } else { (Q8_0_B, TILE_L, 8, 1) };
            for b in 0..nb {
                let o = &mut out[b * t * tb..(b + 1) * t * tb];
                for j in 0..t {
                    let y = &a[((t0 + j) * nb + b) * ab..][..ab];
                    let s = &sums[((t0 + j) * nb + b) * spb..][..spb];
                    let q = if k { &y[4..] } else { &y[2..] };
                    for i in 0..nd {
                        o[(i * t + j) * 4..][..4].copy_from_slice(&q[4 * i..4 * i + 4]);
                    }
                    if k {
                        for p in 0..8 {
                            o[256 * t + (p * t + j) * 4..][..2].copy_from_slice(&s[2 * p].to_le_bytes());
                            o[256 * t + (p * t + j) * 4 + 2..][..2].copy_from_slice(&s[2 * p + 1].to_le_bytes());
                        }
                        o[288 * t + 4 * j..][..4].copy_from_slice(&y[0..4]);
                    } else {
                        let d = f16::from_le_bytes([y[0], y[1]]).to_f32();
                        o[32 * t + 4 * j..][..4].copy_from_slice(&d.to_le_bytes());
                        o[36 * t + 4 * j..][..4].copy_from_slice(&(s[0] as i32).to_le_bytes());
                    }
                }
            }
        }

        /// One super-block of a Q4_K group (8 rows; `HI`: Q5_K, with the fifth bits)
        /// against the tile's activations at `y` (`tile_acts`, one block): each token's
        /// `fma` steps on `acc[t]` (see `quant::packed`). A k-vector is unpacked once for
        /// the whole tile.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn packed_q45_k_tile<const HI: bool, const T: usize>(x: *const u8, y: *const u8, acc: &mut [__m256; T]) {
            let m4 = _mm256_set1_epi8(0x0F);
            let mut isum = [_mm256_setzero_si256(); T];
            let mut msum = [_mm256_setzero_si256(); T];
            // SAFETY: the caller passes one packed super-block at `x` and one tile
            // block at `y`; every offset is inside them.
            unsafe {
                for p in 0..4 {
                    let mut lo = [_mm256_setzero_si256(); T];
                    let mut hi = [_mm256_setzero_si256(); T];
                    // Q5_K: bits 2p and 2p+1 of qh are the fifth bits of this pair.
                    let shift = _mm_cvtsi32_si128(2 * p as i32);
                    for k in 0..8 {
                        let v = ld(x.add(160 + 32 * (8 * p + k)));
                        let mut ql = _mm256_and_si256(v, m4);
                        let mut qh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        if HI {
                            let h = _mm256_srl_epi16(ld(x.add(1184 + 32 * k)), shift);
                            let m10 = _mm256_set1_epi8(0x10);
                            ql = _mm256_or_si256(ql, _mm256_and_si256(_mm256_slli_epi16(h, 4), m10));
                            qh = _mm256_or_si256(qh, _mm256_and_si256(_mm256_slli_epi16(h, 3), m10));
                        }
                        for t in 0..T {
                            lo[t] = dot4(lo[t], ql, bcast4(y.add(4 * ((16 * p + k) * T + t))));
                            hi[t] = dot4(hi[t], qh, bcast4(y.add(4 * ((16 * p + 8 + k) * T + t))));
                        }
                    }
                    let (sc_lo, sc_hi) = (ld_u8x8(x.add(32 + 16 * p)), ld_u8x8(x.add(40 + 16 * p)));
                    let mins = _mm256_cvtepu8_epi16(ld128(x.add(96 + 16 * p)));
                    for t in 0..T {
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(lo[t], sc_lo));
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(hi[t], sc_hi));
                        msum[t] = madd_acc(msum[t], mins, bcast4(y.add(256 * T + 4 * (p * T + t))));
                    }
                }
                let (d, dmin) = (_mm256_cvtph_ps(ld128(x)), _mm256_cvtph_ps(ld128(x.add(16))));
                for t in 0..T {
                    let yd = _mm256_set1_ps(rd_f32(y.add(288 * T + 4 * t)));
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(isum[t]), acc[t]);
                    acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, yd), _mm256_cvtepi32_ps(msum[t]), acc[t]);
                }
            }
        }

        /// One super-block of a Q6_K group against the tile, as packed_q45_k_tile. The
        /// `-32` offset meets the sub-block sums once per row: `Σ sc·(q-32)·a =
        /// Σ sc·(Σ q·a) - 32·Σ sc·suma`, the second sum by `madd_acc` over (sc, sc) pairs.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn packed_q6_k_tile<const T: usize>(x: *const u8, y: *const u8, acc: &mut [__m256; T]) {
            let m15 = _mm256_set1_epi8(15);
            let m30 = _mm256_set1_epi8(0x30);
            let mut isum = [_mm256_setzero_si256(); T];
            let mut msum = [_mm256_setzero_si256(); T];
            // SAFETY: as in packed_q45_k_tile.
            unsafe {
                for p in 0..8 {
                    // Sub-blocks 2p and 2p+1 of each row as i16 pairs, one dword a row.
                    let pair = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(
                        _mm_loadl_epi64(x.add(16 + 16 * p).cast()),
                        _mm_loadl_epi64(x.add(24 + 16 * p).cast()),
                    ));
                    for t in 0..T {
                        msum[t] = madd_acc(msum[t], pair, bcast4(y.add(256 * T + 4 * (p * T + t))));
                    }
                }
                for h in 0..2 {
                    for kh in 0..2 {
                        for i in 0..4 {
                            // Sub-block j = 8h + 2i + kh: elements 128h + 32i + 16kh .. +16.
                            let mut sub = [_mm256_setzero_si256(); T];
                            for k in 4 * kh..4 * kh + 4 {
                                let v = x.add(144 + 96 * (8 * h + k));
                                let (l, qh) = (ld(v.add(32 * (i & 1))), ld(v.add(64)));
                                let lo4 = if i < 2 { l } else { _mm256_srli_epi16(l, 4) };
                                // The two high bits of quant class i, moved to bits 4..6.
                                let hb = match i {
                                    0 => _mm256_slli_epi16(qh, 4),
                                    1 => _mm256_slli_epi16(qh, 2),
                                    2 => qh,
                                    _ => _mm256_srli_epi16(qh, 2),
                                };
                                let q = _mm256_or_si256(_mm256_and_si256(lo4, m15), _mm256_and_si256(hb, m30));
                                let dw = 32 * h + 8 * i + k; // activation dword: elements 128h + 32i + 4k
                                for t in 0..T {
                                    sub[t] = dot4(sub[t], q, bcast4(y.add(4 * (dw * T + t))));
                                }
                            }
                            let sc = ld_i8x8(x.add(16 + 8 * (8 * h + 2 * i + kh)));
                            for t in 0..T {
                                isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sub[t], sc));
                            }
                        }
                    }
                }
                let d = _mm256_cvtph_ps(ld128(x));
                for t in 0..T {
                    let yd = _mm256_set1_ps(rd_f32(y.add(288 * T + 4 * t)));
                    let isum = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(msum[t], 5));
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(isum), acc[t]);
                }
            }
        }

        /// One block of 32 of a Q4_0 (`Q8`: Q8_0) group against the tile.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn packed_legacy_tile<const Q8: bool, const T: usize>(
            x: *const u8,
            y: *const u8,
            acc: &mut [__m256; T],
        ) {
            let m4 = _mm256_set1_epi8(0x0F);
            let mut isum = [_mm256_setzero_si256(); T];
            // SAFETY: the caller passes one packed block at `x` and one tile block at
            // `y`; every offset is inside them.
            unsafe {
                if Q8 {
                    // VNNI: weights biased to u8 (w + 128), the bias taken back through
                    // the quant sum below; AVX2's u8·i8 sums would saturate, so it takes
                    // the sign trick instead.
                    for k in 0..8 {
                        let v = ld(x.add(16 + 32 * k));
                        let vb = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
                        for t in 0..T {
                            let a = bcast4(y.add(4 * (k * T + t)));
                            isum[t] = if VNNI { dot4(isum[t], vb, a) } else { dot_ss(isum[t], v, a) };
                        }
                    }
                } else {
                    for k in 0..4 {
                        let v = ld(x.add(16 + 32 * k));
                        let (ql, qh) = (_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
                        for t in 0..T {
                            isum[t] = dot4(isum[t], ql, bcast4(y.add(4 * (k * T + t))));
                            isum[t] = dot4(isum[t], qh, bcast4(y.add(4 * ((4 + k) * T + t))));
                        }
                    }
                }
                let d = _mm256_cvtph_ps(ld128(x));
                let shift = if !Q8 {
                    3
                } else if VNNI {
                    7
                } else {
                    0
                }; // Q4_0: -8·Σa; biased Q8_0: -128·Σa
                for t in 0..T {
                    let yd = _mm256_set1_ps(rd_f32(y.add(32 * T + 4 * t)));
                    let mut is = isum[t];
                    if shift > 0 {
                        let suma = _mm256_set1_epi32(rd_i32(y.add(36 * T + 4 * t)) << shift);
                        is = _mm256_sub_epi32(is, suma);
                    }
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(is), acc[t]);
                }
            }
        }

        // ---- packed K-quants, prompt shape: a group decoded once for every tile ---------

        /// Bytes of one decoded super-block (`decode_k_block`): `[64 dword]` k-vectors of
        /// quants as unsigned bytes (k-vector i: elements 4i..4i+4 of the 8 rows, the
        /// activation dword it meets), then `[16 sub-block]` scale vectors (Q4_K/Q5_K use
        /// 8), `[8 pair]` offset vectors (Q4_K/Q5_K: the mins of sub-blocks 2p, 2p+1 as
        /// i16 pairs, 4 of them; Q6_K: -32·scale of sub-blocks 2p, 2p+1), and d, dmin as
        /// f32 `[8 row]`.
        const DEC_K: usize = 2880;
        const DEC_SC: usize = 2048;
        const DEC_OFF: usize = 2560;
        const DEC_D: usize = 2816;

        /// One packed K-quant super-block at `x` (8 rows) decoded to `out` (`DEC_K`
        /// bytes). A prompt's tiles then read ready bytes: decoding Q6_K's 6-bit or
        /// Q5_K's 5-bit quants once per tile cost as much as the dots (Q6_K ran at half
        /// Q4_K's speed). Scale vectors: VNNI multiplies whole sub-block sums (`i32`
        /// lanes); AVX2 folds the scale into the `vpmaddwd` of its dot, so there it is
        /// an i16 pair (scale, scale) a lane.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn decode_k_block(ty: GgmlType, x: *const u8, out: *mut u8) {
            let m4 = _mm256_set1_epi8(0x0F);
            let st = |o: usize, v: __m256i| {
                // SAFETY: `out` holds DEC_K bytes and every o + 32 ≤ DEC_K.
                unsafe { _mm256_storeu_si256(out.add(o).cast(), v) }
            };
            // i32 lanes → what the tile multiplies by (see above).
            let scale = |s: __m256i| {
                if VNNI {
                    s
                } else {
                    _mm256_or_si256(_mm256_and_si256(s, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(s, 16))
                }
            };
            // SAFETY: the caller passes one packed super-block of `ty` at `x`.
            unsafe {
                if ty == GgmlType::Q6_K {
                    let (m15, m30) = (_mm256_set1_epi8(15), _mm256_set1_epi8(0x30));
                    for h in 0..2 {
                        for k in 0..8 {
                            let v = x.add(144 + 96 * (8 * h + k));
                            let (l0, l1, qh) = (ld(v), ld(v.add(32)), ld(v.add(64)));
                            // Quant class i: elements 128h + 32i + 4k..+4 (as packed_q6_k_tile).
                            let q = [
                                (l0, _mm256_slli_epi16(qh, 4)),
                                (l1, _mm256_slli_epi16(qh, 2)),
                                (_mm256_srli_epi16(l0, 4), qh),
                                (_mm256_srli_epi16(l1, 4), _mm256_srli_epi16(qh, 2)),
                            ];
                            for (i, (lo4, hb)) in q.into_iter().enumerate() {
                                let q = _mm256_or_si256(_mm256_and_si256(lo4, m15), _mm256_and_si256(hb, m30));
                                st(32 * (32 * h + 8 * i + k), q);
                            }
                        }
                    }
                    for j in 0..16 {
                        st(DEC_SC + 32 * j, scale(ld_i8x8(x.add(16 + 8 * j))));
                    }
                    for p in 0..8 {
                        let pair = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(
                            _mm_loadl_epi64(x.add(16 + 16 * p).cast()),
                            _mm_loadl_epi64(x.add(24 + 16 * p).cast()),
                        ));
                        // |scale| ≤ 128, so -32·scale fits i16.
                        st(DEC_OFF + 32 * p, _mm256_mullo_epi16(pair, _mm256_set1_epi16(-32)));
                    }
                    _mm256_storeu_ps(out.add(DEC_D).cast(), _mm256_cvtph_ps(ld128(x)));
                    return;
                }
                let hi = ty == GgmlType::Q5_K;
                let m10 = _mm256_set1_epi8(0x10);
                for p in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * p as i32);
                    for k in 0..8 {
                        let v = ld(x.add(160 + 32 * (8 * p + k)));
                        let mut ql = _mm256_and_si256(v, m4);
                        let mut qh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        if hi {
                            let h = _mm256_srl_epi16(ld(x.add(1184 + 32 * k)), shift);
                            ql = _mm256_or_si256(ql, _mm256_and_si256(_mm256_slli_epi16(h, 4), m10));
                            qh = _mm256_or_si256(qh, _mm256_and_si256(_mm256_slli_epi16(h, 3), m10));
                        }
                        st(32 * (16 * p + k), ql);
                        st(32 * (16 * p + 8 + k), qh);
                    }
                }
                for j in 0..8 {
                    st(DEC_SC + 32 * j, scale(ld_u8x8(x.add(32 + 8 * j))));
                }
                for p in 0..4 {
                    st(DEC_OFF + 32 * p, _mm256_cvtepu8_epi16(ld128(x.add(96 + 16 * p))));
                }
                _mm256_storeu_ps(out.add(DEC_D).cast(), _mm256_cvtph_ps(ld128(x)));
                _mm256_storeu_ps(out.add(DEC_D + 32).cast(), _mm256_cvtph_ps(ld128(x.add(16))));
            }
        }

        /// One decoded super-block (`Q6`: of Q6_K, else Q4_K/Q5_K) against the tile's
        /// activations at `y`: the arithmetic of `packed_q45_k_tile`/`packed_q6_k_tile`,
        /// the same integers (sums in wrapping i32, whose result does not depend on the
        /// order) and the same float steps. VNNI: `vpdpbusd` per sub-block, then one
        /// `vpmulld` by its scale. AVX2: `vpmaddubsw`, then `vpmaddwd` by the
        /// (scale, scale) pair instead of by ones, so the scale costs nothing (pair sums
        /// ≤ 2·63·127, no saturation). Q6_K's -32 meets the sub-block sums through the
        /// same `madd_acc` into the same sum.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn dec_k_tile<const Q6: bool, const T: usize>(x: *const u8, y: *const u8, acc: &mut [__m256; T]) {
            let (n_sub, sub_dw) = if Q6 { (16, 4) } else { (8, 8) };
            let mut isum = [_mm256_setzero_si256(); T];
            // SAFETY: the caller passes one decoded super-block at `x` and one tile block
            // at `y`; every offset is inside them.
            unsafe {
                // Sub-blocks two at a time: with one, the T chains of `vpdpbusd` are too
                // few to hide its latency.
                for j in (0..n_sub).step_by(2) {
                    let (sc_a, sc_b) = (ld(x.add(DEC_SC + 32 * j)), ld(x.add(DEC_SC + 32 * (j + 1))));
                    if VNNI {
                        let mut sa = [_mm256_setzero_si256(); T];
                        let mut sb = [_mm256_setzero_si256(); T];
                        for k in 0..sub_dw {
                            let (da, db) = (sub_dw * j + k, sub_dw * (j + 1) + k);
                            let (qa, qb) = (ld(x.add(32 * da)), ld(x.add(32 * db)));
                            for t in 0..T {
                                sa[t] = dot4(sa[t], qa, bcast4(y.add(4 * (da * T + t))));
                                sb[t] = dot4(sb[t], qb, bcast4(y.add(4 * (db * T + t))));
                            }
                        }
                        for t in 0..T {
                            isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sa[t], sc_a));
                            isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sb[t], sc_b));
                        }
                    } else {
                        for k in 0..sub_dw {
                            let (da, db) = (sub_dw * j + k, sub_dw * (j + 1) + k);
                            let (qa, qb) = (ld(x.add(32 * da)), ld(x.add(32 * db)));
                            for t in 0..T {
                                let pa = _mm256_maddubs_epi16(qa, bcast4(y.add(4 * (da * T + t))));
                                let pb = _mm256_maddubs_epi16(qb, bcast4(y.add(4 * (db * T + t))));
                                isum[t] = madd_acc(isum[t], pa, sc_a);
                                isum[t] = madd_acc(isum[t], pb, sc_b);
                            }
                        }
                    }
                }
                let d = _mm256_loadu_ps(x.add(DEC_D).cast());
                if Q6 {
                    for p in 0..8 {
                        let o = ld(x.add(DEC_OFF + 32 * p));
                        for t in 0..T {
                            isum[t] = madd_acc(isum[t], o, bcast4(y.add(256 * T + 4 * (p * T + t))));
                        }
                    }
                    for t in 0..T {
                        let yd = _mm256_set1_ps(rd_f32(y.add(288 * T + 4 * t)));
                        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(isum[t]), acc[t]);
                    }
                } else {
                    let mut msum = [_mm256_setzero_si256(); T];
                    for p in 0..4 {
                        let mins = ld(x.add(DEC_OFF + 32 * p));
                        for t in 0..T {
                            msum[t] = madd_acc(msum[t], mins, bcast4(y.add(256 * T + 4 * (p * T + t))));
                        }
                    }
                    let dmin = _mm256_loadu_ps(x.add(DEC_D + 32).cast());
                    for t in 0..T {
                        let yd = _mm256_set1_ps(rd_f32(y.add(288 * T + 4 * t)));
                        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(isum[t]), acc[t]);
                        acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, yd), _mm256_cvtepi32_ps(msum[t]), acc[t]);
                    }
                }
            }
        }

        /// The tile (tokens `t0..t0+T`, activations at `ya`) against a decoded row group
        /// at `dec` (`nb` super-blocks of `DEC_K`), as `packed_group`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn dec_group<const Q6: bool, const T: usize>(
            nb: usize,
            dec: *const u8,
            ya: *const u8,
            t0: usize,
            out: *mut f32,
            out_stride: usize,
        ) {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                // SAFETY: the caller's contract covers block b of the group and of the
                // tile, and the output columns of tokens t0..t0+T.
                unsafe { dec_k_tile::<Q6, T>(dec.add(b * DEC_K), ya.add(b * T * TILE_K), &mut acc) };
            }
            for (t, acc) in acc.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(out.add((t0 + t) * out_stride), *acc) };
            }
        }

        /// The tile (tokens `t0..t0+T`, activations at `ya` from `tile_acts`) against
        /// row group `gx`: every block, then the 8×T results.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn packed_group<const T: usize>(
            ty: GgmlType,
            nb: usize,
            gx: *const u8,
            gb: usize,
            ya: *const u8,
            t0: usize,
            out: *mut f32,
            out_stride: usize,
        ) {
            let tb = if ty.block_size() == 256 { TILE_K } else { TILE_L };
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                // SAFETY: the caller's contract covers block b of the group and of the
                // tile, and the output columns of tokens t0..t0+T.
                unsafe {
                    let (x, y) = (gx.add(b * gb), ya.add(b * T * tb));
                    match ty {
                        GgmlType::Q4_K => packed_q45_k_tile::<false, T>(x, y, &mut acc),
                        GgmlType::Q5_K => packed_q45_k_tile::<true, T>(x, y, &mut acc),
                        GgmlType::Q6_K => packed_q6_k_tile::<T>(x, y, &mut acc),
                        GgmlType::Q4_0 => packed_legacy_tile::<false, T>(x, y, &mut acc),
                        _ => packed_legacy_tile::<true, T>(x, y, &mut acc),
                    }
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(out.add((t0 + t) * out_stride), *acc) };
            }
        }

        /// `quant::packed::gemm_ref` with SIMD: 8 rows a lane each, tokens in tiles of up
        /// to `MAX_T` that share each unpacked k-vector, the same arithmetic per token.
        ///
        /// # Safety
        /// The CPU has this module's features; `groups` holds whole groups of `nb`
        /// blocks of `ty`, `a` n_tok activation rows of nb blocks, `sums` their
        /// `packed::act_sums`, and `out` room for every (token, row).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
        pub(in crate::quant) unsafe fn gemm_packed(
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
            let tb = if ty.block_size() == 256 { TILE_K } else { TILE_L };
            let n_groups = groups.len() / (nb * gb);
            // Tiles: MAX_T tokens while they last, then 4, 2, 1.
            let mut tiles = Vec::new();
            let mut t0 = 0;
            for t in [MAX_T, 4, 2, 1] {
                while n_tok - t0 >= t {
                    tiles.push((t0, t));
                    t0 += t;
                }
            }
            let mut acts = vec![0u8; n_tok * nb * tb];
            for &(t0, t) in &tiles {
                tile_acts(ty, a, sums, nb, t0, t, &mut acts[t0 * nb * tb..(t0 + t) * nb * tb]);
            }
            // K-quants with more than one tile: each group decoded once, for all of them.
            // Not Q4_K with VNNI: its 4-bit unpack is three instructions per 2·MAX_T
            // dots, and there the inline kernel measured a few percent faster.
            let decode =
                tiles.len() > 1 && matches!((ty, VNNI), (GgmlType::Q5_K | GgmlType::Q6_K, _) | (GgmlType::Q4_K, false));
            let mut dec = vec![0u8; if decode { nb * DEC_K } else { 0 }];
            for g in 0..n_groups {
                if decode {
                    for b in 0..nb {
                        // SAFETY: block b of group g is inside `groups`, dec holds nb blocks.
                        unsafe {
                            decode_k_block(ty, groups.as_ptr().add((g * nb + b) * gb), dec.as_mut_ptr().add(b * DEC_K))
                        };
                    }
                }
                for &(t0, t) in &tiles {
                    // SAFETY: g < n_groups, the tile's activations are where tile_acts
                    // put them, and out holds (t0..t0+t, 8g..8g+8).
                    unsafe {
                        let gx = groups.as_ptr().add(g * nb * gb);
                        let ya = acts.as_ptr().add(t0 * nb * tb);
                        let o = out.as_mut_ptr().add(8 * g);
                        if decode {
                            let d = dec.as_ptr();
                            match (ty == GgmlType::Q6_K, t) {
                                (true, 1) => dec_group::<true, 1>(nb, d, ya, t0, o, out_stride),
                                (true, 2) => dec_group::<true, 2>(nb, d, ya, t0, o, out_stride),
                                (true, 4) => dec_group::<true, 4>(nb, d, ya, t0, o, out_stride),
                                (true, _) => dec_group::<true, MAX_T>(nb, d, ya, t0, o, out_stride),
                                (false, 1) => dec_group::<false, 1>(nb, d, ya, t0, o, out_stride),
                                (false, 2) => dec_group::<false, 2>(nb, d, ya, t0, o, out_stride),
                                (false, 4) => dec_group::<false, 4>(nb, d, ya, t0, o, out_stride),
                                (false, _) => dec_group::<false, MAX_T>(nb, d, ya, t0, o, out_stride),
                            }
                            continue;
                        }
                        match t {
                            1 => packed_group::<1>(ty, nb, gx, gb, ya, t0, o, out_stride),
                            2 => packed_group::<2>(ty, nb, gx, gb, ya, t0, o, out_stride),
                            4 => packed_group::<4>(ty, nb, gx, gb, ya, t0, o, out_stride),
                            _ => packed_group::<MAX_T>(ty, nb, gx, gb, ya, t0, o, out_stride),
                        }
                    }
                }
            }
        }

        /// SIMD encoders for the activation formats; `false` for other types.
        ///
        /// # Safety
        /// The CPU has this module's features; `dst.len() == ty.row_bytes(src.len())`.
        pub(in crate::quant) unsafe fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
            // SAFETY: features per the contract; whole blocks.
            unsafe {
                match ty {
                    GgmlType::Q8_0 => quantize_q8_0(src, dst, false),
                    GgmlType::Q8_1 => quantize_q8_0(src, dst, true),
                    GgmlType::Q8_K => quantize_q8_k(src, dst),
                    GgmlType::F16 => {
                        let (x, y) = (src.as_ptr(), dst.as_mut_ptr());
                        f32_to_f16_raw(x, y.cast(), src.len());
                    }
                    _ => return false,
                }
            }
            true
        }

        // ---- f16 rows --------------------------------------------------------------------

        #[target_feature(enable = $feat)]
        unsafe fn f32_to_f16_raw(x: *const f32, y: *mut u16, n: usize) {
            let mut i = 0;
            // SAFETY: the caller passes n readable floats and n writable u16.
            unsafe {
                while i + 8 <= n {
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.add(i)));
                    _mm_storeu_si128(y.add(i).cast(), h);
                    i += 8;
                }
                while i < n {
                    *y.add(i) = f16::from_f32(*x.add(i)).to_bits();
                    i += 1;
                }
            }
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn ld_f16x8(p: *const f16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f16 at `p`.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }

        /// # Safety
        /// The CPU has this module's features; `a.len() == b.len()`.
        #[target_feature(enable = $feat)]
        pub(in crate::quant) unsafe fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
            let n = a.len();
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY: every load is below n in both slices.
            unsafe {
                while i + 32 <= n {
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let k = i + 8 * j;
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), ld_f16x8(pb.add(k)), *acc);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), ld_f16x8(pb.add(i)), acc[0]);
                    i += 8;
                }
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut sum = hsum_ps(s);
            for k in i..n {
                sum += a[k] * b[k].to_f32();
            }
            sum
        }

        /// # Safety
        /// The CPU has this module's features; `y.len() == x.len()`.
        #[target_feature(enable = $feat)]
        pub(in crate::quant) unsafe fn axpy_f16(y: &mut [f32], s: f32, x: &[f16]) {
            let n = y.len();
            let (py, px) = (y.as_mut_ptr(), x.as_ptr());
            let sv = _mm256_set1_ps(s);
            let mut i = 0;
            // SAFETY: every access is below n in both slices.
            unsafe {
                while i + 8 <= n {
                    let v = _mm256_fmadd_ps(sv, ld_f16x8(px.add(i)), _mm256_loadu_ps(py.add(i)));
                    _mm256_storeu_ps(py.add(i), v);
                    i += 8;
                }
            }
            for k in i..n {
                y[k] += s * x[k].to_f32();
            }
        }

        /// # Safety
        /// The CPU has this module's features; `src.len() == dst.len()`.
        #[target_feature(enable = $feat)]
        pub(in crate::quant) unsafe fn f16_to_f32_row(src: &[f16], dst: &mut [f32]) {
            let n = src.len();
            let mut i = 0;
            // SAFETY: every access is below n in both slices.
            unsafe {
                while i + 8 <= n {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), ld_f16x8(src.as_ptr().add(i)));
                    i += 8;
                }
            }
            for k in i..n {
                dst[k] = src[k].to_f32();
            }
        }

        /// # Safety
        /// The CPU has this module's features; `src.len() == dst.len()`.
        #[target_feature(enable = $feat)]
        pub(in crate::quant) unsafe fn f32_to_f16_row(src: &[f32], dst: &mut [f16]) {
            // SAFETY: same length, features per the contract.
            unsafe { f32_to_f16_raw(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) }
        }
    };
}
pub(super) use x86_kernels;

// ---- AVX2 primitives --------------------------------------------------------------------

/// `vpmaddubsw` pair sums saturate; see the module note.
const VNNI: bool = false;
/// Tokens per panel tile: 16 ymm registers hold 4 int + 4 float accumulators and temps.
const MAX_T: usize = 4;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
    _mm256_add_epi32(acc, p)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_ss(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    dot4(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn madd_acc(acc: __m256i, p16: __m256i, s16: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(p16, s16))
}

x86_kernels!("avx2,fma,f16c");
