//! Runtime-dispatched SIMD kernels: the fast twins of `super::reference`.
//!
//! One `Kernels` value per instruction-set level; `Kernels::detect()` picks the best the
//! CPU has, once, and `EDGELM_KERNEL_LEVEL` may lower it (tests and benchmarks force
//! each level in turn through `Kernels::for_level`). Every entry point checks lengths
//! and then calls into the level's module under one `unsafe` line whose justification
//! is always the same: a `Kernels` for a level exists only if the CPU has the level's
//! features (see `supported`).
//!
//! | level   | x86-64 / aarch64 features          | integer dot                          |
//! |---------|------------------------------------|--------------------------------------|
//! | scalar  | –                                  | `super::reference`                   |
//! | avx2    | AVX2 + FMA + F16C                  | `vpmaddubsw` + `vpmaddwd`            |
//! | avx512  | + AVX-512 F/BW/VL/VNNI (256-bit)   | `vpdpbusd`, `vpdpwssd`               |
//! | neon    | ASIMD (aarch64 baseline)           | `smull` + `sadalp`                   |
//! | dotprod | + FEAT_DotProd                     | `sdot` (by element in gemm)          |
//! | i8mm    | + FEAT_I8MM                        | `smmla` 2×2 tiles in gemm            |
//!
//! Formats with SIMD at every level: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
//! (vec_dot and gemm); float weights F32, F16, BF16 (vec_dot, f32 sums; on x86 a
//! register-tiled gemm for F32 and F16, `float_gemm`); activation
//! quantizers Q8_0, Q8_1, Q8_K and F16. Everything else (Q2_K, Q3_K, Q8_1/Q8_K weights)
//! answers with the scalar reference.
//!
//! Results equal the reference up to float rounding (the integer sums are exact; the
//! per-block scaling is fused and reassociated), see the tolerance table in
//! `dispatch/tests.rs`. `quantize_row` is bit-identical to `super::quantize_row` for
//! finite inputs.

use super::{assert_row, reference, GgmlType};
use half::f16;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod float_gemm;
#[cfg(target_arch = "aarch64")]
mod neon;

/// An instruction-set level. The x86 and ARM levels are separate ladders; the order
/// only matters within one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Scalar,
    /// AVX2 + FMA + F16C (Haswell, Zen 1 and later).
    Avx2,
    /// Avx2 plus AVX-512 F/BW/VL/VNNI (Ice Lake, Sapphire Rapids, Zen 4). The kernels
    /// still use 256-bit vectors: VNNI on ymm issues on two ports, zmm on one.
    Avx512,
    /// aarch64 Advanced SIMD (always present on aarch64).
    Neon,
    /// Neon plus the `sdot` dot-product instructions (Cortex-A76, Apple M1 and later).
    NeonDotprod,
    /// NeonDotprod plus the `smmla` int8 matrix multiply (Cortex-A510/X2, Graviton 3).
    NeonI8mm,
}

const ALL_LEVELS: [Level; 6] =
    [Level::Scalar, Level::Avx2, Level::Avx512, Level::Neon, Level::NeonDotprod, Level::NeonI8mm];

impl Level {
    /// The name `EDGELM_KERNEL_LEVEL` accepts for this level.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
            Level::NeonDotprod => "dotprod",
            Level::NeonI8mm => "i8mm",
        }
    }

    /// Parses a level name (case-insensitive; also accepts `neon-dotprod`/`neon-i8mm`).
    pub fn parse(s: &str) -> Option<Level> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("neon-").unwrap_or(&s);
        ALL_LEVELS.iter().copied().find(|l| l.name() == s)
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this CPU can run `level`'s kernels.
fn supported(level: Level) -> bool {
    match level {
        Level::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            supported(Level::Avx2)
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(target_arch = "aarch64")]
        Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        #[cfg(target_arch = "aarch64")]
        Level::NeonDotprod => supported(Level::Neon) && std::arch::is_aarch64_feature_detected!("dotprod"),
        #[cfg(target_arch = "aarch64")]
        Level::NeonI8mm => supported(Level::NeonDotprod) && std::arch::is_aarch64_feature_detected!("i8mm"),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The kernels of one level. Only `detect` and `for_level` hand these out, and only for
/// levels the CPU supports: holding a `&Kernels` is the proof the SIMD code may run.
#[derive(Debug)]
pub struct Kernels {
    pub level: Level,
}

static KERNELS: [Kernels; 6] = [
    Kernels { level: Level::Scalar },
    Kernels { level: Level::Avx2 },
    Kernels { level: Level::Avx512 },
    Kernels { level: Level::Neon },
    Kernels { level: Level::NeonDotprod },
    Kernels { level: Level::NeonI8mm },
];

/// Env var that lowers the detected level (`scalar|avx2|avx512|neon|dotprod|i8mm`).
pub const LEVEL_ENV: &str = "EDGELM_KERNEL_LEVEL";

impl Kernels {
    /// The best level this CPU supports, lowered by `EDGELM_KERNEL_LEVEL`. An unknown
    /// name, or a level this CPU lacks, is reported on stderr and the best available
    /// level is used. Decided once per process.
    pub fn detect() -> &'static Kernels {
        static CHOSEN: OnceLock<&'static Kernels> = OnceLock::new();
        CHOSEN.get_or_init(|| {
            let best = *Self::available().last().expect("scalar is always available");
            let level = match std::env::var(LEVEL_ENV) {
                Ok(s) if !s.trim().is_empty() => match Level::parse(&s) {
                    Some(l) if supported(l) => l,
                    Some(l) => {
                        eprintln!(
                            "edgelm: {LEVEL_ENV}={s}: this CPU does not support {l} kernels \
                             (available: {}); using {best}",
                            Self::available_names()
                        );
                        best
                    }
                    None => {
                        eprintln!(
                            "edgelm: {LEVEL_ENV}={s} is not a kernel level (expected one of \
                             scalar|avx2|avx512|neon|dotprod|i8mm); using {best}"
                        );
                        best
                    }
                },
                _ => best,
            };
            Self::for_level(level).expect("chosen level is supported")
        })
    }

    /// The kernels of `level`, if this CPU supports it.
    pub fn for_level(level: Level) -> Option<&'static Kernels> {
        supported(level).then(|| &KERNELS[level as usize])
    }

    /// The levels this CPU supports, lowest first (always starts with `Scalar`).
    pub fn available() -> Vec<Level> {
        ALL_LEVELS.iter().copied().filter(|&l| supported(l)).collect()
    }

    fn available_names() -> String {
        let names: Vec<&str> = Self::available().iter().map(|l| l.name()).collect();
        names.join(", ")
    }

    /// Quantizes one activation row (`dst.len() == ty.row_bytes(src.len())`). For Q8_0,
    /// Q8_1, Q8_K and F16 the SIMD encoders produce the same bytes as
    /// `super::quantize_row` for every finite input (they keep its operation order and
    /// rounding: `roundf` for Q8_0/Q8_1, round-half-even for Q8_K). ggml's own AVX2
    /// `quantize_row_q8_0` does *not* (it rounds half to even and scales by 127/amax),
    /// so edgelm's activations can differ from llama.cpp's in the last quant of ties.
    /// Rows containing NaN or infinity may encode differently. Other types use the
    /// scalar encoder.
    pub fn quantize_row(&self, ty: GgmlType, src: &[f32], dst: &mut [u8]) {
        assert_row(ty, src.len(), dst.len(), "Kernels::quantize_row dst");
        let done = match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: this `Kernels` exists only if the CPU has the level's features;
            // lengths were checked above.
            Level::Avx2 => unsafe { avx2::quantize_row(ty, src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::quantize_row(ty, src, dst) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above (NEON is part of every level from `Neon` up).
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe { neon::quantize_row(ty, src, dst) },
            _ => false,
        };
        if !done {
            super::quantize::quantize_row(ty, src, dst);
        }
    }

    /// Dot product of weight row `w` (type `ty`, `n` elements) with activation row `a`
    /// (type `ty.vec_dot_type()`, from `quantize_row`: the Q8_1 `s` and Q8_K `bsums`
    /// fields are read, not recomputed).
    pub fn vec_dot(&self, ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        assert_row(ty, n, w.len(), "Kernels::vec_dot weights");
        assert_row(ty.vec_dot_type(), n, a.len(), "Kernels::vec_dot activations");
        let r = match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level's features are present (see `Kernels`); lengths checked.
            Level::Avx2 => unsafe { avx2::vec_dot(ty, n, w, a) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::vec_dot(ty, n, w, a) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe { neon::vec_dot(self.level, ty, n, w, a) },
            _ => None,
        };
        r.unwrap_or_else(|| reference::vec_dot(ty, w, a))
    }

    /// Whether `gemm_exact` with one token computes exactly what the multi-token panel
    /// computes for that token (same arithmetic, bit for bit). Where it does, a token's
    /// result never depends on what else shares its matmul; where it does not, callers
    /// that need that (the serving executor) run such tokens one by one (see
    /// `ops::matmul`). Every per-token result of the panel is independent of the other
    /// tokens in it either way.
    pub fn single_token_matches_panel(&self, ty: GgmlType) -> bool {
        let panel_type = matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        );
        match self.level {
            // Everything on the scalar level goes one (row, token) dot at a time.
            Level::Scalar => true,
            // x86: the legacy formats have a one-token kernel written to the panel's
            // arithmetic; the K-quants decode through vec_dot.
            Level::Avx2 | Level::Avx512 => {
                !panel_type
                    || matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0)
            }
            // NEON decode kernels have their own arithmetic.
            _ => !panel_type,
        }
    }

    /// Block matmul. For `r in 0..n_rows`, `t in 0..n_tok`:
    /// `out[t * out_stride + r] = dot(w row r, a row t)`, rows of `n` elements.
    ///
    /// Shapes: `w: [n_rows][ty.row_bytes(n)]` contiguous; `a: [n_tok][act.row_bytes(n)]`
    /// contiguous with `act = ty.vec_dot_type()`; `out` holds `n_tok` rows of stride
    /// `out_stride >= n_rows` (the last one may be short). Elements of `out` outside
    /// `[t * out_stride, t * out_stride + n_rows)` are not touched.
    ///
    /// For `n_tok >= 2` the SIMD levels decode 8 weight rows (4 on ARM) into an
    /// interleaved int8 panel once and run every token against it, so one call with all
    /// tokens is much faster than one call per token. Give each thread whole groups of
    /// 8 rows (`n_rows % 8 == 0`, except the last chunk) for full panels.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        self.gemm_with(ty, n, w, n_rows, a, n_tok, out, out_stride, false)
    }

    /// `gemm` whose one-token case computes exactly what the panel computes, where
    /// `single_token_matches_panel` says this level can (the serving executor's
    /// batch-invariant mode). Plain `gemm` decodes with arithmetic that follows
    /// llama.cpp's vec_dot instead, to stay on the peer's greedy tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_exact(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        self.gemm_with(ty, n, w, n_rows, a, n_tok, out, out_stride, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_with(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
        exact: bool,
    ) {
        // Only the x86 levels have a separate exact one-token kernel.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = exact;
        let wrb = ty.row_bytes(n);
        let arb = ty.vec_dot_type().row_bytes(n);
        let (Some(wrb), Some(arb)) = (wrb, arb) else {
            panic!("Kernels::gemm: {n} elements is not a whole number of {ty} blocks");
        };
        assert_eq!(w.len(), n_rows * wrb, "Kernels::gemm: w must hold {n_rows} rows of {n} {ty}");
        assert_eq!(a.len(), n_tok * arb, "Kernels::gemm: a must hold {n_tok} activation rows");
        if n_rows == 0 || n_tok == 0 {
            return;
        }
        assert!(n_tok == 1 || out_stride >= n_rows, "Kernels::gemm: out_stride {out_stride} < n_rows {n_rows}");
        assert!(
            out.len() >= (n_tok - 1) * out_stride + n_rows,
            "Kernels::gemm: out has {} floats, needs {}",
            out.len(),
            (n_tok - 1) * out_stride + n_rows
        );
        // Float weights: the register-tiled panel for prompts, and for a lone token
        // that must get the panel's bits (`exact`); a plain lone token keeps vec_dot,
        // llama.cpp's decode arithmetic.
        #[cfg(target_arch = "x86_64")]
        if matches!(ty, GgmlType::F16 | GgmlType::F32)
            && matches!(self.level, Level::Avx2 | Level::Avx512)
            && (n_tok > 1 || exact)
        {
            // SAFETY: the level's features are present; all slice lengths were checked above.
            unsafe { float_gemm::gemm(self.level, ty, n, w, n_rows, a, n_tok, out, out_stride) };
            return;
        }
        let done = match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level's features are present (see `Kernels`); all slice
            // lengths were checked above.
            Level::Avx2 => unsafe { avx2::gemm(ty, n, w, n_rows, a, n_tok, out, out_stride, exact) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::gemm(ty, n, w, n_rows, a, n_tok, out, out_stride, exact) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe {
                neon::gemm(self.level, ty, n, w, n_rows, a, n_tok, out, out_stride)
            },
            _ => false,
        };
        if done {
            return;
        }
        for t in 0..n_tok {
            let at = &a[t * arb..(t + 1) * arb];
            for r in 0..n_rows {
                out[t * out_stride + r] = self.vec_dot(ty, n, &w[r * wrb..(r + 1) * wrb], at);
            }
        }
    }

    /// Whether weights of `ty` go through the packed kernels at this level: every
    /// level has them for the packed types (the scalar level runs their scalar twin, so
    /// results are the same at every level).
    pub fn packs(&self, ty: GgmlType) -> bool {
        super::packed::group_bytes(ty).is_some()
    }

    /// Packed matmul (`super::packed`): for row groups `g0..g1` of `w` and every token,
    /// `out[t * out_stride + 8 * (g - g0) + r] = dot(row 8g + r, token t)`. `a` holds
    /// `n_tok` activation rows (`w.ty.vec_dot_type()`) of `w.cols` elements, `sums`
    /// their `packed::act_sums`. Every level computes each (row, token) with the same
    /// arithmetic (see `packed`), so results are bit-identical across levels and batch
    /// sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_packed(
        &self,
        w: &super::packed::Packed,
        g0: usize,
        g1: usize,
        a: &[u8],
        sums: &[i16],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        use super::packed::{sums_per_block, ROWS};
        let nb = w.nb();
        let arb = w.ty.vec_dot_type().row_bytes(w.cols).expect("packed cols are whole blocks");
        assert!(g0 <= g1 && g1 * ROWS <= w.rows, "Kernels::gemm_packed: groups {g0}..{g1} of {}", w.rows / ROWS);
        assert_eq!(a.len(), n_tok * arb, "Kernels::gemm_packed: a must hold {n_tok} activation rows");
        assert_eq!(sums.len(), n_tok * nb * sums_per_block(w.ty), "Kernels::gemm_packed: sums must hold {n_tok} rows");
        let width = (g1 - g0) * ROWS;
        if n_tok == 0 || width == 0 {
            return;
        }
        assert!(n_tok == 1 || out_stride >= width, "Kernels::gemm_packed: out_stride {out_stride} < {width}");
        assert!(out.len() >= (n_tok - 1) * out_stride + width, "Kernels::gemm_packed: out is too short");
        let groups = w.groups(g0, g1);
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level's features are present (see `Kernels`); sizes checked above.
            Level::Avx2 => unsafe { avx2::gemm_packed(w.ty, nb, groups, a, sums, n_tok, out, out_stride) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::gemm_packed(w.ty, nb, groups, a, sums, n_tok, out, out_stride) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above (NEON is part of every level from `Neon` up).
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe {
                neon::gemm_packed(self.level, w.ty, nb, groups, a, sums, n_tok, out, out_stride)
            },
            _ => super::packed::gemm_ref(w.ty, nb, groups, a, sums, n_tok, out, out_stride),
        }
    }

    /// `Σ a[i] * b[i]` with f16 `b` (attention scores over an f16 K cache), in f32.
    pub fn dot_f32_f16(&self, a: &[f32], b: &[f16]) -> f32 {
        assert_eq!(a.len(), b.len(), "Kernels::dot_f32_f16: lengths differ");
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level's features are present (see `Kernels`); lengths checked.
            Level::Avx2 => unsafe { avx2::dot_f32_f16(a, b) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::dot_f32_f16(a, b) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON present at every ARM level; lengths checked.
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe { neon::dot_f32_f16(a, b) },
            _ => a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum(),
        }
    }

    /// `y[i] += s * x[i]` with f16 `x` (attention-weighted sum over an f16 V cache).
    pub fn axpy_f16(&self, y: &mut [f32], s: f32, x: &[f16]) {
        assert_eq!(y.len(), x.len(), "Kernels::axpy_f16: lengths differ");
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level's features are present (see `Kernels`); lengths checked.
            Level::Avx2 => unsafe { avx2::axpy_f16(y, s, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::axpy_f16(y, s, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON present at every ARM level; lengths checked.
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe { neon::axpy_f16(y, s, x) },
            _ => y.iter_mut().zip(x).for_each(|(y, x)| *y += s * x.to_f32()),
        }
    }

    /// f16 → f32, element for element (exact).
    pub fn f16_to_f32_row(&self, src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "Kernels::f16_to_f32_row: lengths differ");
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: F16C present at both x86 levels; lengths checked.
            Level::Avx2 => unsafe { avx2::f16_to_f32_row(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::f16_to_f32_row(src, dst) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON present at every ARM level; lengths checked.
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe { neon::f16_to_f32_row(src, dst) },
            _ => dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32()),
        }
    }

    /// f32 → f16, round to nearest even (as `half::f16::from_f32` for finite values).
    pub fn f32_to_f16_row(&self, src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len(), "Kernels::f32_to_f16_row: lengths differ");
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: F16C present at both x86 levels; lengths checked.
            Level::Avx2 => unsafe { avx2::f32_to_f16_row(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { avx512::f32_to_f16_row(src, dst) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON present at every ARM level; lengths checked.
            Level::Neon | Level::NeonDotprod | Level::NeonI8mm => unsafe { neon::f32_to_f16_row(src, dst) },
            _ => dst.iter_mut().zip(src).for_each(|(d, s)| *d = f16::from_f32(*s)),
        }
    }
}

#[cfg(test)]
mod tests;
