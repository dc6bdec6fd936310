//! x86-64 kernels, AVX-512 level: the `x86_kernels!` bodies of `avx2.rs` over VNNI
//! primitives. What AVX-512 buys here is VNNI (one instruction instead of three, no
//! saturation, so Q8_0 weights can be biased to u8) and 32 vector registers (8-token
//! tiles). Vectors stay 256 bits wide. Measured on Sapphire Rapids: `vpdpbusd zmm`
//! retires at about the same instruction rate as the ymm form (3.75 vs 4.0 G/s on one
//! core), i.e. ~1.9× the MACs, and the ymm panel gemm already runs at the ymm
//! `vpdpbusd` peak; a 16-row zmm panel is the next step for prompt throughput (the
//! float scaling shares the 512-bit ports, so expect ~1.3×, not 2×).

use core::arch::x86_64::*;

/// `vpdpbusd` sums u8·i8 products in i32 without saturation.
const VNNI: bool = true;
/// Tokens per panel tile: 32 ymm registers hold 8 int + 8 float accumulators.
const MAX_T: usize = 8;

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn dot_ss(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(a, w))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn madd_acc(acc: __m256i, p16: __m256i, s16: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, p16, s16)
}

super::avx2::x86_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");
