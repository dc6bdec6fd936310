//! On-disk block layouts of the GGML quantized formats, field for field as
//! `ggml/src/ggml-common.h` declares them (same names, same order, same sizes).
//!
//! All multi-byte fields are little-endian on disk. We read them by copying a whole
//! block out of the byte slice with `read_unaligned`, so a row may start at any byte
//! offset: GGUF aligns each tensor to 32 bytes, but a row of an odd-sized type (Q4_0 is
//! 18 bytes a block) inside that tensor can start at an odd address, and `&[u8] as
//! &[BlockQ4_0]` would then be undefined behaviour. The copy is a few dozen bytes per
//! block and LLVM usually folds it into the loads the kernel does anyway.

use half::f16;
use std::mem::size_of;

// The in-memory layout of a `#[repr(C)]` block with `f16`/`i16`/`f32` fields equals the
// on-disk layout only on a little-endian host. Every target edgelm ships for (x86-64,
// aarch64, riscv64) is little-endian; a big-endian port needs byte-swapping readers.
#[cfg(target_endian = "big")]
compile_error!("edgelm quant: GGUF blocks are little-endian; big-endian hosts are not supported");

/// Elements in a "legacy" block (Q4_0 … Q8_1).
pub const QK4_0: usize = 32;
pub const QK4_1: usize = 32;
pub const QK5_0: usize = 32;
pub const QK5_1: usize = 32;
pub const QK8_0: usize = 32;
pub const QK8_1: usize = 32;
/// Elements in a K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in Q4_K / Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// A block type that may be copied out of (and into) arbitrary bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, have no padding, and consist only of integer,
/// `f32` and `f16` fields (or arrays of them), so that every bit pattern is a valid value
/// and every byte of a value is initialised.
pub(crate) unsafe trait Block: Copy + 'static {
    const SIZE: usize = size_of::<Self>();
}

/// Copies block `B` out of the first `B::SIZE` bytes of `bytes`, at any alignment.
#[inline(always)]
pub(crate) fn read_block<B: Block>(bytes: &[u8]) -> B {
    assert!(bytes.len() >= B::SIZE);
    // SAFETY: the assert above keeps the read inside `bytes`; `read_unaligned` has no
    // alignment requirement; `B: Block` promises every bit pattern is a valid `B`.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<B>()) }
}

/// Writes `block` into the first `B::SIZE` bytes of `bytes`, at any alignment.
#[inline(always)]
pub(crate) fn write_block<B: Block>(bytes: &mut [u8], block: &B) {
    assert!(bytes.len() >= B::SIZE);
    // SAFETY: the assert above keeps the write inside `bytes`; `write_unaligned` has no
    // alignment requirement; `B: Block` has no padding, so every written byte is
    // initialised and `bytes` stays a valid `[u8]`.
    unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast::<B>(), *block) }
}

/// Iterates the blocks of a row. The caller has checked `bytes.len() % B::SIZE == 0`.
#[inline(always)]
pub(crate) fn blocks<B: Block>(bytes: &[u8]) -> impl Iterator<Item = B> + '_ {
    debug_assert_eq!(bytes.len() % B::SIZE, 0);
    bytes.chunks_exact(B::SIZE).map(read_block::<B>)
}

macro_rules! block {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(size_of::<$name>() == $size);
        // SAFETY: #[repr(C)], only f16/f32/integer fields, and the size assert above
        // equals the sum of the field sizes, so there is no padding.
        unsafe impl Block for $name {}
    };
}

// ---- 32-element blocks: x = d * q (+ m) ----------------------------------------------

block!(
    /// 4.5 bits/weight. `x = d * (q - 8)`; element j in the low nibble of `qs[j]`,
    /// element j+16 in the high nibble.
    BlockQ4_0, 2 + QK4_0 / 2, { d: f16, qs: [u8; QK4_0 / 2] });
block!(
    /// 5 bits/weight. `x = d * q + m`, nibbles as in Q4_0.
    BlockQ4_1, 4 + QK4_1 / 2, { d: f16, m: f16, qs: [u8; QK4_1 / 2] });
block!(
    /// 5.5 bits/weight. `x = d * (q - 16)`; the 5th bit of element j is bit j of the
    /// little-endian u32 `qh`.
    BlockQ5_0, 2 + 4 + QK5_0 / 2, { d: f16, qh: [u8; 4], qs: [u8; QK5_0 / 2] });
block!(
    /// 6 bits/weight. `x = d * q + m`, bits as in Q5_0.
    BlockQ5_1, 4 + 4 + QK5_1 / 2, { d: f16, m: f16, qh: [u8; 4], qs: [u8; QK5_1 / 2] });
block!(
    /// 8.5 bits/weight. `x = d * q`.
    BlockQ8_0, 2 + QK8_0, { d: f16, qs: [i8; QK8_0] });
block!(
    /// Activation format for Q4_1/Q5_1 dots. `s = d * sum(qs)` lets the dot fold in the
    /// weight block's `m` without touching the quants.
    BlockQ8_1, 4 + QK8_1, { d: f16, s: f16, qs: [i8; QK8_1] });

// ---- 256-element super-blocks ---------------------------------------------------------

block!(
    /// 2.625 bits/weight: 16 sub-blocks of 16, `x = d*sc*q - dmin*m` with 4-bit `sc`
    /// (low nibble of `scales[i]`) and `m` (high nibble).
    BlockQ2_K, QK_K / 16 + QK_K / 4 + 4,
    { scales: [u8; QK_K / 16], qs: [u8; QK_K / 4], d: f16, dmin: f16 });
block!(
    /// 3.4375 bits/weight: 16 sub-blocks of 16, `x = d*(sc-32)*(q-4*!hbit)` with 6-bit
    /// `sc` packed in 12 bytes (see `q3_k_scales`).
    BlockQ3_K, QK_K / 8 + QK_K / 4 + 12 + 2,
    { hmask: [u8; QK_K / 8], qs: [u8; QK_K / 4], scales: [u8; 12], d: f16 });
block!(
    /// 4.5 bits/weight: 8 sub-blocks of 32, `x = d*sc*q - dmin*m`, 6-bit `sc`/`m`
    /// packed in 12 bytes (see `get_scale_min_k4`).
    BlockQ4_K, 4 + K_SCALE_SIZE + QK_K / 2,
    { d: f16, dmin: f16, scales: [u8; K_SCALE_SIZE], qs: [u8; QK_K / 2] });
block!(
    /// 5.5 bits/weight: Q4_K plus one high bit per weight in `qh`.
    BlockQ5_K, 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2,
    { d: f16, dmin: f16, scales: [u8; K_SCALE_SIZE], qh: [u8; QK_K / 8], qs: [u8; QK_K / 2] });
block!(
    /// 6.5625 bits/weight: 16 sub-blocks of 16, `x = d*sc*(q-32)`, 8-bit signed `sc`.
    BlockQ6_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
    { ql: [u8; QK_K / 2], qh: [u8; QK_K / 4], scales: [i8; QK_K / 16], d: f16 });
block!(
    /// Activation format for K-quant dots; never stored in model files. `d` is f32, not
    /// f16, and `bsums[i]` is the sum of `qs[16i..16i+16]` (the dots use it to apply the
    /// weight's mins without a second pass over the quants).
    BlockQ8_K, 4 + QK_K + QK_K / 16 * 2,
    { d: f32, qs: [i8; QK_K], bsums: [i16; QK_K / 16] });
