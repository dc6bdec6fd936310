//! Panel matmul for float weights (F16, F32) on x86: the prompt-side kernel of F16
//! models (BERT-family embedders are distributed as F16). `vec_dot` reads a weight row
//! and an activation row per (row, token) dot and converts the row each time; here a
//! tile of R rows × T tokens keeps R·T accumulators in registers, so each weight vector
//! is converted once for T tokens and each activation vector loaded once for R rows.
//!
//! Activations arrive as the weight's `vec_dot_type` (F16 for F16 weights: rounded to
//! f16 as llama.cpp rounds them, then widened exactly; F32 for F32 weights) and are
//! widened per token tile into a zero-padded f32 buffer. Per (row, token) the
//! arithmetic is fixed: lane-wise FMAs over the row in order of its 16-float (AVX-512)
//! or 8-float (AVX2) chunks, the last chunk masked, then one horizontal sum in a fixed
//! tree. It does not depend on R, T or the batch, so one token alone (`gemm_exact`)
//! gets the panel's bits: batching never changes a result.
//!
//! The scalar twin is `reference::vec_dot` (f64 sums), held to it by the tolerance
//! table in `tests.rs`.

use core::arch::x86_64::*;

use half::f16;

use super::Level;
use crate::quant::GgmlType;

/// `Kernels::gemm` for F16/F32 weights at an x86 level.
///
/// # Safety
/// The CPU has `level`'s features; `w` holds `n_rows` rows of `n` `ty` values, `a`
/// `n_tok` rows of `n` `ty.vec_dot_type()` values, `out` row t at `t * out_stride` with
/// room for `n_rows` floats (the sizes `Kernels::gemm` checks).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    level: Level,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    n_rows: usize,
    a: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let f16w = match ty {
        GgmlType::F16 => true,
        GgmlType::F32 => false,
        _ => unreachable!("float_gemm takes F16 and F32 weights"),
    };
    // SAFETY: the caller's contract.
    unsafe {
        match (level, f16w) {
            (Level::Avx512, true) => z::gemm::<true>(n, w, n_rows, a, n_tok, out, out_stride),
            (Level::Avx512, false) => z::gemm::<false>(n, w, n_rows, a, n_tok, out, out_stride),
            (_, true) => y::gemm::<true>(n, w, n_rows, a, n_tok, out, out_stride),
            (_, false) => y::gemm::<false>(n, w, n_rows, a, n_tok, out, out_stride),
        }
    }
}

/// Widen activation row `t` (`n` values of f16 or f32 at `a`) into `dst` (`np` floats,
/// the tail past `n` zero).
#[inline(always)]
fn widen<const F16: bool>(a: &[u8], n: usize, t: usize, dst: &mut [f32]) {
    if F16 {
        for (d, c) in dst.iter_mut().zip(a[t * 2 * n..(t + 1) * 2 * n].chunks_exact(2)) {
            *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
        }
    } else {
        for (d, c) in dst.iter_mut().zip(a[t * 4 * n..(t + 1) * 4 * n].chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    dst[n..].iter_mut().for_each(|x| *x = 0.0);
}

/// The driver both levels share: token tiles of up to `T` widened once, each swept
/// against every group of up to `R` rows by `$tile::<F16, r, t>`.
macro_rules! driver {
    ($lanes:expr, $r:expr, $t:expr, $tile:ident) => {
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn gemm<const F16: bool>(
            n: usize,
            w: &[u8],
            n_rows: usize,
            a: &[u8],
            n_tok: usize,
            out: &mut [f32],
            out_stride: usize,
        ) {
            let np = n.next_multiple_of($lanes);
            let wrb = if F16 { 2 * n } else { 4 * n };
            let mut af = vec![0f32; $t * np];
            let mut t0 = 0;
            while t0 < n_tok {
                let nt = ($t as usize).min(n_tok - t0);
                for i in 0..nt {
                    super::widen::<F16>(a, n, t0 + i, &mut af[i * np..(i + 1) * np]);
                }
                let mut r = 0;
                while r < n_rows {
                    let nr = if n_rows - r >= $r { $r } else { 1 };
                    // SAFETY: rows r..r+nr and tokens t0..t0+nt are inside w, af and out.
                    unsafe {
                        let (wp, o) = (w.as_ptr().add(r * wrb), out.as_mut_ptr().add(t0 * out_stride + r));
                        let ap = af.as_ptr();
                        match (nr, nt) {
                            ($r, 1) => $tile::<F16, $r, 1>(n, np, wp, wrb, ap, o, out_stride),
                            ($r, 2) => $tile::<F16, $r, 2>(n, np, wp, wrb, ap, o, out_stride),
                            ($r, 3) => $tile::<F16, $r, 3>(n, np, wp, wrb, ap, o, out_stride),
                            ($r, 4) => $tile::<F16, $r, 4>(n, np, wp, wrb, ap, o, out_stride),
                            ($r, 5) => $tile::<F16, $r, 5>(n, np, wp, wrb, ap, o, out_stride),
                            ($r, _) => $tile::<F16, $r, $t>(n, np, wp, wrb, ap, o, out_stride),
                            (_, 1) => $tile::<F16, 1, 1>(n, np, wp, wrb, ap, o, out_stride),
                            (_, 2) => $tile::<F16, 1, 2>(n, np, wp, wrb, ap, o, out_stride),
                            (_, 3) => $tile::<F16, 1, 3>(n, np, wp, wrb, ap, o, out_stride),
                            (_, 4) => $tile::<F16, 1, 4>(n, np, wp, wrb, ap, o, out_stride),
                            (_, 5) => $tile::<F16, 1, 5>(n, np, wp, wrb, ap, o, out_stride),
                            _ => $tile::<F16, 1, $t>(n, np, wp, wrb, ap, o, out_stride),
                        }
                    }
                    r += nr;
                }
                t0 += nt;
            }
        }
    };
}

/// AVX-512: zmm, 4 rows × 6 tokens (24 accumulators of 32 registers).
mod z {
    use super::*;

    driver!(16, 4, 6, tile);

    /// `R` rows (`wp`, `wrb` bytes apart) × `T` tokens (`ap`, `np` floats apart) into
    /// `out[t * stride + r]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const F16: bool, const R: usize, const T: usize>(
        n: usize,
        np: usize,
        wp: *const u8,
        wrb: usize,
        ap: *const f32,
        out: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let rem = n % 16;
        let mask: __mmask16 = if rem == 0 { 0xFFFF } else { (1u16 << rem) - 1 };
        let mut k = 0;
        // SAFETY: every weight load covers values k..k+16 of a row (masked past n), every
        // activation load k..k+16 of an np-float row; the stores hit out's R×T cells.
        unsafe {
            while k < np {
                let m = if k + 16 <= n { 0xFFFF } else { mask };
                let mut wv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = if F16 {
                        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, wp.add(r * wrb + 2 * k).cast()))
                    } else {
                        _mm512_maskz_loadu_ps(m, wp.add(r * wrb + 4 * k).cast())
                    };
                }
                for t in 0..T {
                    let av = _mm512_loadu_ps(ap.add(t * np + k));
                    for r in 0..R {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], av, acc[r][t]);
                    }
                }
                k += 16;
            }
            for r in 0..R {
                for t in 0..T {
                    *out.add(t * stride + r) = _mm512_reduce_add_ps(acc[r][t]);
                }
            }
        }
    }
}

/// AVX2: ymm, 2 rows × 4 tokens (8 accumulators of 16 registers).
mod y {
    use super::*;

    driver!(8, 2, 4, tile);

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const F16: bool, const R: usize, const T: usize>(
        n: usize,
        np: usize,
        wp: *const u8,
        wrb: usize,
        ap: *const f32,
        out: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let full = n / 8 * 8;
        // SAFETY: full-chunk loads stay below n in each weight row and np in each
        // activation row; the tail is copied into a zeroed 8-float buffer first.
        unsafe {
            let load = |r: usize, k: usize| -> __m256 {
                if k < full {
                    if F16 {
                        _mm256_cvtph_ps(_mm_loadu_si128(wp.add(r * wrb + 2 * k).cast()))
                    } else {
                        _mm256_loadu_ps(wp.add(r * wrb + 4 * k).cast())
                    }
                } else {
                    let mut tail = [0f32; 8];
                    for (i, x) in tail.iter_mut().enumerate().take(n - k) {
                        *x = if F16 {
                            f16::from_bits(std::ptr::read_unaligned(wp.add(r * wrb + 2 * (k + i)).cast::<u16>()))
                                .to_f32()
                        } else {
                            std::ptr::read_unaligned(wp.add(r * wrb + 4 * (k + i)).cast::<f32>())
                        };
                    }
                    _mm256_loadu_ps(tail.as_ptr())
                }
            };
            let mut k = 0;
            while k < np {
                let mut wv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = load(r, k);
                }
                for t in 0..T {
                    let av = _mm256_loadu_ps(ap.add(t * np + k));
                    for r in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(wv[r], av, acc[r][t]);
                    }
                }
                k += 8;
            }
            for r in 0..R {
                for t in 0..T {
                    let v = acc[r][t];
                    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                    *out.add(t * stride + r) = _mm_cvtss_f32(s);
                }
            }
        }
    }
}
