//! GGML tensor formats: block layouts, and the scalar reference kernels that decode,
//! encode and dot them, bit for bit as llama.cpp's ggml does.
//!
//! | type | id | elems/block | bytes/block | decode                          | dot with |
//! |------|----|-------------|-------------|---------------------------------|----------|
//! | F32  |  0 |   1 |   4 | x                                       | F32  |
//! | F16  |  1 |   1 |   2 | x                                       | F16  |
//! | Q4_0 |  2 |  32 |  18 | d·(q-8)                                 | Q8_0 |
//! | Q4_1 |  3 |  32 |  20 | d·q + m                                 | Q8_1 |
//! | Q5_0 |  6 |  32 |  22 | d·(q-16)                                | Q8_0 |
//! | Q5_1 |  7 |  32 |  24 | d·q + m                                 | Q8_1 |
//! | Q8_0 |  8 |  32 |  34 | d·q                                     | Q8_0 |
//! | Q8_1 |  9 |  32 |  36 | d·q (activations only)                  | Q8_1 |
//! | Q2_K | 10 | 256 |  84 | d·sc·q - dmin·m, 16×16                  | Q8_K |
//! | Q3_K | 11 | 256 | 110 | d·(sc-32)·q, 16×16                      | Q8_K |
//! | Q4_K | 12 | 256 | 144 | d·sc·q - dmin·m, 8×32                   | Q8_K |
//! | Q5_K | 13 | 256 | 176 | d·sc·q - dmin·m, 8×32                   | Q8_K |
//! | Q6_K | 14 | 256 | 210 | d·sc·(q-32), 16×16                      | Q8_K |
//! | Q8_K | 15 | 256 | 292 | d·q, f32 d (activations only)           | Q8_K |
//! | BF16 | 30 |   1 |   2 | x                                       | BF16 |
//!
//! Sources of truth, in llama.cpp: `ggml/src/ggml-common.h` (layouts),
//! `ggml/src/ggml-quants.c` (`dequantize_row_*`, `quantize_row_*_ref`),
//! `ggml/src/ggml-cpu/quants.c` (`ggml_vec_dot_*_generic`) and `ggml-cpu/vec.cpp`
//! (`ggml_vec_dot_f32/f16/bf16`, scalar branch). The float operations here are written
//! in the same order as there, so results match ggml built without FMA contraction, and
//! match the `gguf` Python package's numpy decoder bit for bit (see
//! `tests/quant_gguf_py.rs`).
//!
//! These kernels are the slow twins: the runtime fallback, and the oracle every SIMD or
//! CUDA kernel is tested against.

mod blocks;
pub mod dispatch;
pub mod packed;
mod quantize;
mod reference;
#[cfg(test)]
mod tests;

pub use blocks::{
    BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K, BlockQ8_0,
    BlockQ8_1, BlockQ8_K, K_SCALE_SIZE, QK4_0, QK4_1, QK5_0, QK5_1, QK8_0, QK8_1, QK_K,
};

pub use dispatch::{Kernels, Level};

use blocks::Block;

/// A tensor element type, numbered as ggml's `enum ggml_type` (and GGUF's tensor info).
/// Only the types edgelm can compute with are listed; `from_u32` rejects the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    BF16 = 30,
}

const ALL_TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::BF16,
];

impl GgmlType {
    /// The type with ggml id `v`; `None` for ids ggml has (IQ*, TQ*, MXFP4, I8…) or had
    /// (4 and 5 were Q4_2/Q4_3) that edgelm does not compute with.
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        ALL_TYPES.iter().copied().find(|t| *t as u32 == v)
    }

    /// The name as llama.cpp's tools and gguf-py print it, e.g. "Q4_K" (ggml's own
    /// `ggml_type_name` is lower-case, "q4_K").
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            BF16 => "BF16",
        }
    }

    /// Elements per block: 1 for the float types, 32 for Q4_0…Q8_1, 256 for K-quants.
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => BlockQ4_0::SIZE,
            Q4_1 => BlockQ4_1::SIZE,
            Q5_0 => BlockQ5_0::SIZE,
            Q5_1 => BlockQ5_1::SIZE,
            Q8_0 => BlockQ8_0::SIZE,
            Q8_1 => BlockQ8_1::SIZE,
            Q2_K => BlockQ2_K::SIZE,
            Q3_K => BlockQ3_K::SIZE,
            Q4_K => BlockQ4_K::SIZE,
            Q5_K => BlockQ5_K::SIZE,
            Q6_K => BlockQ6_K::SIZE,
            Q8_K => BlockQ8_K::SIZE,
        }
    }

    /// Bytes of a row of `n_elems` elements; `None` if `n_elems` is not a whole number
    /// of blocks or the size overflows `usize`.
    // `%` rather than `is_multiple_of`: that needs Rust 1.87, the workspace says 1.80.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn row_bytes(self, n_elems: usize) -> Option<usize> {
        if n_elems % self.block_size() != 0 {
            return None;
        }
        (n_elems / self.block_size()).checked_mul(self.type_size())
    }

    /// The format activations are quantized to before `vec_dot` with a weight row of
    /// this type (ggml's `type_traits_cpu[t].vec_dot_type`). ggml has no dot for
    /// Q8_1 and Q8_K weights; we pair them with themselves.
    pub fn vec_dot_type(self) -> GgmlType {
        use GgmlType::*;
        match self {
            F32 => F32,
            F16 => F16,
            BF16 => BF16,
            Q4_0 | Q5_0 | Q8_0 => Q8_0,
            Q4_1 | Q5_1 | Q8_1 => Q8_1,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K => Q8_K,
        }
    }

    /// Every supported type, in id order.
    pub fn all() -> &'static [GgmlType] {
        &ALL_TYPES
    }

    /// True for the block formats (everything but F32, F16, BF16).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks `bytes.len() == ty.row_bytes(n)`; a mismatch is a caller bug that would
/// otherwise silently drop or misread a partial block.
#[inline]
#[track_caller]
fn assert_row(ty: GgmlType, n: usize, bytes: usize, what: &str) {
    let want = ty.row_bytes(n);
    assert!(want == Some(bytes), "quant: {what} of {n} {ty} elements needs {want:?} bytes, got {bytes}");
}

/// Decodes one row: `src` holds `dst.len()` elements of type `ty`
/// (`src.len() == ty.row_bytes(dst.len())`). Any byte alignment is fine.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_row(ty, dst.len(), src.len(), "dequantize_row src");
    reference::dequantize_row(ty, src, dst);
}

/// Decodes `n` elements of type `ty` into a new vector.
pub fn dequantize(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize_row(ty, src, &mut out);
    out
}

/// Encodes one row of f32 as `ty` (`dst.len() == ty.row_bytes(src.len())`), with
/// ggml's reference quantizers (`quantize_row_*_ref`, no importance matrix). ggml's
/// `quantize_q*` calls exactly these when given no imatrix, so a tensor encoded here
/// matches `llama-quantize` without `--imatrix`. All types are supported.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert_row(ty, src.len(), dst.len(), "quantize_row dst");
    quantize::quantize_row(ty, src, dst);
}

/// Dot product of one weight row `w` of type `ty` with one activation row `a` already
/// encoded as `ty.vec_dot_type()`, both of `n` elements. Computed as ggml's generic
/// scalar `ggml_vec_dot_*`: exact integer sums per block, then scaled and summed in f32
/// (f64 for the float types) in ggml's order; bit-identical to ggml built without FMA
/// contraction (see `reference.rs`). A Q8_K or Q8_1 activation must come from
/// `quantize_row`: the Q2_K/Q4_K/Q5_K dots read its `bsums` and the Q4_1/Q5_1 dots its
/// `s` instead of re-summing the quants.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    assert_row(ty, n, w.len(), "vec_dot weights");
    assert_row(ty.vec_dot_type(), n, a.len(), "vec_dot activations");
    reference::vec_dot(ty, w, a)
}
