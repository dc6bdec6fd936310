//! Quantized weights repacked for the CPU: rows in groups of 8, interleaved, so that
//! one vector load holds four quants of each of 8 rows and one integer dot instruction
//! with a broadcast activation advances all 8 rows (ggml calls this "repack"; its x86
//! Q4_0 and Q4_K kernels do the same with `block_q4_0x8` and `block_q4_Kx8`).
//!
//! Why: decoding one token reads every weight once. The row-at-a-time kernels spend
//! most of their instructions unpacking 6-bit scales and shuffling them next to the
//! quants, once per row and super-block; at one thread that kept Q4_K decode at ~20 GB/s
//! of weights, under the ~30 GB/s one core can read. Here the scales are decoded once,
//! at load, into bytes laid out for the kernel, and the quants keep their bits, so the
//! bytes read per token stay what the file holds (Q4_K +2.8%, Q5_K +2.3%, the rest 0).
//! The copy lives in 2 MiB pages: with 4 KiB pages one core streamed 20 GB/s, with 2 MiB
//! pages 31–34 (2048×32768 Q4_K, this VM).
//!
//! Layout. A packed tensor is `rows / 8` groups; group g holds rows 8g..8g+8. Its blocks
//! (super-blocks of 256 for the K-quants, blocks of 32 for Q4_0 and Q8_0) follow one
//! another (`nb = cols / block` of them), each `group_bytes(ty)` long; "[8 row]" means
//! one entry per row of the group, row-minor. A "k-vector" is 32 bytes: dword k (bytes
//! 4k..4k+4) of the same chunk of each of the 8 rows.
//!
//! Q4_K (1184 bytes per group and super-block, for 8 × 144 in the file):
//!
//! | offset | bytes | what                                                         |
//! |--------|-------|--------------------------------------------------------------|
//! | 0      | 16    | d, f16 [8 row]                                               |
//! | 16     | 16    | dmin, f16 [8 row]                                            |
//! | 32     | 64    | scales, u8 [8 sub-block][8 row] (6-bit values)               |
//! | 96     | 64    | mins, u8 [4 pair][8 row][2] (sub-blocks 2p, 2p+1 of a row)   |
//! | 160    | 1024  | quants: [4 pair][8 k] k-vectors of the file's `qs[32p..]`    |
//!
//! In the file, byte l of `qs[32p..32p+32]` holds weight 64p+l of sub-block 2p in its
//! low nibble and weight 64p+32+l of sub-block 2p+1 in its high nibble; the packing
//! keeps that, so a k-vector's low nibbles meet activations 64p+4k..+4 and its high
//! nibbles activations 64p+32+4k..+4.
//!
//! Q5_K (1440 bytes): Q4_K's 1184, then `qh`'s 8 k-vectors (bit j of `qh[l]` is the
//! fifth bit of weight 32j + l).
//!
//! Q6_K (1680 bytes, as in the file):
//!
//! | offset | bytes | what                                                         |
//! |--------|-------|--------------------------------------------------------------|
//! | 0      | 16    | d, f16 [8 row]                                               |
//! | 16     | 128   | scales, i8 [16 sub-block][8 row]                             |
//! | 144    | 1536  | [2 half h][8 k][3]: the k-vectors of `ql[64h..]`,            |
//! |        |       | `ql[64h + 32..]` and `qh[32h..]`, one after the other          |
//!
//! The kernel reads a super-block front to back: quants in the order they are used (a
//! first layout with ql and qh in separate runs made the hardware prefetcher give up on
//! DRAM-resident weights: 5 GB/s instead of 25).
//!
//! Q4_0 (144 bytes per group and block of 32): d, f16 [8 row], then `qs`'s 4
//! k-vectors (low nibbles: weights 4k..4k+4, high: 16+4k..). Q8_0 (272 bytes): d, then
//! `qs`'s 8 k-vectors (signed bytes).
//!
//! The arithmetic, per row (lane) and block, is the same at every level and in the
//! scalar twin here, so they agree bit for bit: integer sums per sub-block (exact),
//! weighted by the sub-block scales in i32 (exact; the mins, Q6_K's -32 and Q4_0's -8
//! against the activation's sub-block sums likewise), then `acc = fma(d·a_d, isum,
//! acc)` and, for Q4_K/Q5_K, `acc = fma(-(dmin·a_d), msum, acc)` in f32, block after
//! block. Each token is computed alone in this order, so a token's result never depends
//! on the batch.

use super::{GgmlType, QK_K};
use crate::mem::HugeBuf;

/// Rows per group.
pub const ROWS: usize = 8;

/// Bytes of one group and block, for the types that pack.
pub fn group_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_K => Some(1184),
        GgmlType::Q5_K => Some(1440),
        GgmlType::Q6_K => Some(1680),
        GgmlType::Q4_0 => Some(144),
        GgmlType::Q8_0 => Some(272),
        _ => None,
    }
}

/// Activation sub-block sums per block (`act_sums`): the K-quants' 16 per super-block
/// (Q4_K/Q5_K use the first 8), one per block of 32 for Q4_0 and Q8_0.
pub fn sums_per_block(ty: GgmlType) -> usize {
    if ty.block_size() == QK_K {
        16
    } else {
        1
    }
}

/// Whether a `[rows][cols]` tensor of `ty` can be packed.
pub fn packable(ty: GgmlType, rows: usize, cols: usize) -> bool {
    group_bytes(ty).is_some()
        && rows > 0
        && rows.is_multiple_of(ROWS)
        && cols > 0
        && cols.is_multiple_of(ty.block_size())
}

/// A weight matrix in the packed layout (see the module doc), `[rows][cols]` of `ty`.
#[derive(Debug)]
pub struct Packed {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: HugeBuf,
}

impl Packed {
    /// Repacks `w` (`rows` rows of `cols` elements of `ty`, the file's layout). `None`
    /// when the type or shape does not pack (`packable`).
    pub fn new(ty: GgmlType, w: &[u8], rows: usize, cols: usize) -> Option<Packed> {
        Self::new_with(ty, w, rows, cols, |n, f| f(0..n))
    }

    /// As `new`, with the row groups split by `par(n_groups, f)`, which must call `f`
    /// on disjoint ranges covering `0..n_groups` (on threads: a thread pool's
    /// `for_ranges`).
    pub fn new_with(
        ty: GgmlType,
        w: &[u8],
        rows: usize,
        cols: usize,
        par: impl FnOnce(usize, &(dyn Fn(std::ops::Range<usize>) + Sync)),
    ) -> Option<Packed> {
        if !packable(ty, rows, cols) {
            return None;
        }
        let rb = ty.row_bytes(cols)?;
        assert_eq!(w.len(), rows * rb, "Packed::new: {rows} rows of {cols} {ty} need {} bytes", rows * rb);
        let nb = cols / ty.block_size();
        let gb = group_bytes(ty)?;
        let glen = nb * gb;
        let mut data = HugeBuf::zeroed(rows / ROWS * glen);
        let base = data.as_mut_slice().as_mut_ptr() as usize;
        par(rows / ROWS, &|groups| {
            for g in groups {
                // SAFETY: each call gets its own groups (par's contract), so the ranges
                // g*glen..(g+1)*glen written here never overlap another call's.
                let dst = unsafe { std::slice::from_raw_parts_mut((base as *mut u8).add(g * glen), glen) };
                let src = &w[g * ROWS * rb..(g + 1) * ROWS * rb];
                for b in 0..nb {
                    let blocks: [&[u8]; ROWS] =
                        std::array::from_fn(|r| &src[r * rb + b * ty.type_size()..][..ty.type_size()]);
                    let out = &mut dst[b * gb..(b + 1) * gb];
                    match ty {
                        GgmlType::Q4_K => pack_q45_k(&blocks, out, false),
                        GgmlType::Q5_K => pack_q45_k(&blocks, out, true),
                        GgmlType::Q6_K => pack_q6_k(&blocks, out),
                        _ => pack_legacy(&blocks, out),
                    }
                }
            }
        });
        Some(Packed { ty, rows, cols, data })
    }

    /// Row `r` decoded to f32 (the embedding lookup of a packed, tied output matrix),
    /// equal to `dequantize_row` of the file's row (ggml's operation order).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "Packed::dequantize_row: row {r} of {}", self.rows);
        let gb = group_bytes(self.ty).expect("a packed type");
        let (g, l) = (r / ROWS, r % ROWS);
        let n = self.ty.block_size();
        for (b, o) in out.chunks_exact_mut(n).enumerate() {
            let x = &self.groups(g, g + 1)[b * gb..(b + 1) * gb];
            let rb = row_block(self.ty, x, l);
            for (e, o) in o.iter_mut().enumerate() {
                *o = match self.ty {
                    GgmlType::Q4_K | GgmlType::Q5_K => {
                        let j = e / 32;
                        (rb.d * rb.sc[j] as f32) * rb.q[e] as f32 - rb.dmin * rb.mins[j] as f32
                    }
                    GgmlType::Q6_K => (rb.d * rb.sc[e / 16] as f32) * (rb.q[e] - 32) as f32,
                    GgmlType::Q4_0 => (rb.q[e] - 8) as f32 * rb.d,
                    _ => rb.q[e] as f32 * rb.d,
                };
            }
        }
    }

    /// Blocks per row.
    pub fn nb(&self) -> usize {
        self.cols / self.ty.block_size()
    }

    /// The bytes of row groups `g0..g1` (each `nb() * group_bytes` long).
    pub fn groups(&self, g0: usize, g1: usize) -> &[u8] {
        let len = self.nb() * group_bytes(self.ty).expect("packed types have a group size");
        &self.data.as_slice()[g0 * len..g1 * len]
    }

    pub fn n_bytes(&self) -> usize {
        self.data.len()
    }
}

/// The 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dword k (bytes 4k..4k+4) of `chunk` of each row, row-minor: one k-vector.
fn k_vector(out: &mut [u8], chunks: [&[u8]; ROWS], k: usize) {
    for (r, c) in chunks.iter().enumerate() {
        out[4 * r..4 * r + 4].copy_from_slice(&c[4 * k..4 * k + 4]);
    }
}

/// Q4_K, and Q5_K (`hi`: `qh` follows the quants).
fn pack_q45_k(x: &[&[u8]; ROWS], out: &mut [u8], hi: bool) {
    let (qs_off, blk) = if hi { (48, 176) } else { (16, 144) };
    for (r, b) in x.iter().enumerate() {
        debug_assert_eq!(b.len(), blk);
        out[2 * r..2 * r + 2].copy_from_slice(&b[0..2]);
        out[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            out[32 + 8 * j + r] = sc;
            out[96 + 16 * (j / 2) + 2 * r + j % 2] = m;
        }
    }
    for p in 0..4 {
        for k in 0..8 {
            let chunks: [&[u8]; ROWS] = std::array::from_fn(|r| &x[r][qs_off + 32 * p..qs_off + 32 * p + 32]);
            k_vector(&mut out[160 + 32 * (8 * p + k)..][..32], chunks, k);
        }
    }
    if hi {
        for k in 0..8 {
            let chunks: [&[u8]; ROWS] = std::array::from_fn(|r| &x[r][16..48]);
            k_vector(&mut out[1184 + 32 * k..][..32], chunks, k);
        }
    }
}

fn pack_q6_k(x: &[&[u8]; ROWS], out: &mut [u8]) {
    for (r, b) in x.iter().enumerate() {
        debug_assert_eq!(b.len(), 210);
        out[2 * r..2 * r + 2].copy_from_slice(&b[208..210]);
        for s in 0..16 {
            out[16 + 8 * s + r] = b[192 + s];
        }
    }
    for h in 0..2 {
        for k in 0..8 {
            for (i, off) in [64 * h, 64 * h + 32, 128 + 32 * h].into_iter().enumerate() {
                let chunks: [&[u8]; ROWS] = std::array::from_fn(|r| &x[r][off..off + 32]);
                k_vector(&mut out[144 + 32 * (3 * (8 * h + k) + i)..][..32], chunks, k);
            }
        }
    }
}

/// Q4_0 (18-byte blocks: d, 16 bytes of nibbles) and Q8_0 (34: d, 32 signed bytes).
fn pack_legacy(x: &[&[u8]; ROWS], out: &mut [u8]) {
    let n_k = (x[0].len() - 2) / 4;
    for (r, b) in x.iter().enumerate() {
        out[2 * r..2 * r + 2].copy_from_slice(&b[0..2]);
    }
    for k in 0..n_k {
        let chunks: [&[u8]; ROWS] = std::array::from_fn(|r| &x[r][2..]);
        k_vector(&mut out[16 + 32 * k..][..32], chunks, k);
    }
}

/// One row's block, decoded from a packed group block: the quants in element order as
/// the integers the dots use (Q4_K 0..16, Q5_K 0..32, Q6_K 0..64, Q4_0 0..16, Q8_0
/// -128..128) and the row's scales.
struct RowBlock {
    q: [i32; QK_K],
    sc: [i32; 16],
    mins: [i32; 8],
    d: f32,
    dmin: f32,
}

fn row_block(ty: GgmlType, x: &[u8], l: usize) -> RowBlock {
    let f16 = |o: usize| half::f16::from_le_bytes([x[o], x[o + 1]]).to_f32();
    let mut rb = RowBlock { q: [0; QK_K], sc: [0; 16], mins: [0; 8], d: f16(2 * l), dmin: 0.0 };
    // Byte e (0..4) of row l's dword in the k-vector at `off`.
    let kv = |off: usize, e: usize| x[off + 4 * l + e];
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => {
            rb.dmin = f16(16 + 2 * l);
            for j in 0..8 {
                rb.sc[j] = x[32 + 8 * j + l] as i32;
                rb.mins[j] = x[96 + 16 * (j / 2) + 2 * l + j % 2] as i32;
            }
            for p in 0..4 {
                for k in 0..8 {
                    for e in 0..4 {
                        let v = kv(160 + 32 * (8 * p + k), e);
                        let (lo, hi) = (64 * p + 4 * k + e, 64 * p + 32 + 4 * k + e);
                        rb.q[lo] = (v & 0xF) as i32;
                        rb.q[hi] = (v >> 4) as i32;
                        if ty == GgmlType::Q5_K {
                            let qh = kv(1184 + 32 * k, e);
                            rb.q[lo] += (((qh >> (2 * p)) & 1) as i32) << 4;
                            rb.q[hi] += (((qh >> (2 * p + 1)) & 1) as i32) << 4;
                        }
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for j in 0..16 {
                rb.sc[j] = x[16 + 8 * j + l] as i8 as i32;
            }
            for h in 0..2 {
                for k in 0..8 {
                    for e in 0..4 {
                        let v = |i: usize| kv(144 + 32 * (3 * (8 * h + k) + i), e);
                        let (l0, l1, qh) = (v(0), v(1), v(2));
                        let q = [
                            (l0 & 0xF) | ((qh & 3) << 4),
                            (l1 & 0xF) | (((qh >> 2) & 3) << 4),
                            (l0 >> 4) | (((qh >> 4) & 3) << 4),
                            (l1 >> 4) | (((qh >> 6) & 3) << 4),
                        ];
                        for (i, &q) in q.iter().enumerate() {
                            rb.q[128 * h + 32 * i + 4 * k + e] = q as i32;
                        }
                    }
                }
            }
        }
        GgmlType::Q4_0 => {
            for k in 0..4 {
                for e in 0..4 {
                    let v = kv(16 + 32 * k, e);
                    rb.q[4 * k + e] = (v & 0xF) as i32;
                    rb.q[16 + 4 * k + e] = (v >> 4) as i32;
                }
            }
        }
        _ => {
            for k in 0..8 {
                for e in 0..4 {
                    rb.q[4 * k + e] = kv(16 + 32 * k, e) as i8 as i32;
                }
            }
        }
    }
    rb
}

/// The activation's sub-block sums, per block: Q4_K/Q5_K's 8 sub-blocks of 32 (two of
/// Q8_K's 16-element `bsums` each), Q6_K's 16 of 16, or the sum of a Q8_0 block's 32
/// quants. Computed once per token and shared by every row group. `a` is one
/// activation row (Q8_K or Q8_0); `out` gets `nb * sums_per_block(ty)` i16.
pub fn act_sums(ty: GgmlType, a: &[u8], out: &mut [i16]) {
    let ab = ty.vec_dot_type().type_size();
    let spb = sums_per_block(ty);
    for (b, y) in a.chunks_exact(ab).enumerate() {
        let o = &mut out[b * spb..(b + 1) * spb];
        if spb == 1 {
            // 32 × 127 at most: fits.
            o[0] = y[2..34].iter().map(|&q| q as i8 as i16).sum();
            continue;
        }
        let bs = &y[4 + QK_K..][..32];
        let bsum = |i: usize| i16::from_le_bytes([bs[2 * i], bs[2 * i + 1]]);
        for (s, o) in o.iter_mut().enumerate() {
            *o = match ty {
                GgmlType::Q6_K => bsum(s),
                _ if s < 8 => bsum(2 * s) + bsum(2 * s + 1),
                _ => 0,
            };
        }
    }
}

/// The slow twin: `out[t * out_stride + r]` for the 8 rows of each group in `groups`
/// (consecutive groups of the packed tensor) and every token `t` of `a` (activation
/// rows of `ty.vec_dot_type()`), in the arithmetic of the module doc. `sums` holds each
/// token's `act_sums`.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)] // indices pair rows, sub-blocks and sums
pub fn gemm_ref(
    ty: GgmlType,
    nb: usize,
    groups: &[u8],
    a: &[u8],
    sums: &[i16],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let gb = group_bytes(ty).expect("a packed type");
    let n_groups = groups.len() / (nb * gb);
    let ab = ty.vec_dot_type().type_size();
    let spb = sums_per_block(ty);
    for t in 0..n_tok {
        for g in 0..n_groups {
            let mut acc = [0f32; ROWS];
            for b in 0..nb {
                let x = &groups[(g * nb + b) * gb..][..gb];
                let y = &a[(t * nb + b) * ab..][..ab];
                let s = &sums[(t * nb + b) * spb..][..spb];
                let (yd, yq) = if spb == 1 {
                    (half::f16::from_le_bytes([y[0], y[1]]).to_f32(), &y[2..34])
                } else {
                    (f32::from_le_bytes([y[0], y[1], y[2], y[3]]), &y[4..4 + QK_K])
                };
                let dot = |q: &[i32], from: usize, n: usize| -> i32 {
                    (from..from + n).map(|e| q[e] * yq[e] as i8 as i32).sum()
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let rb = row_block(ty, x, r);
                    let (mut isum, mut msum) = (0i32, 0i32);
                    match ty {
                        GgmlType::Q4_K | GgmlType::Q5_K => {
                            for j in 0..8 {
                                isum += rb.sc[j] * dot(&rb.q, 32 * j, 32);
                                msum += rb.mins[j] * s[j] as i32;
                            }
                        }
                        GgmlType::Q6_K => {
                            for j in 0..16 {
                                isum += rb.sc[j] * dot(&rb.q, 16 * j, 16);
                                msum += rb.sc[j] * s[j] as i32;
                            }
                            isum -= 32 * msum;
                        }
                        GgmlType::Q4_0 => isum = dot(&rb.q, 0, 32) - 8 * s[0] as i32,
                        _ => isum = dot(&rb.q, 0, 32),
                    }
                    *acc = (rb.d * yd).mul_add(isum as f32, *acc);
                    if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K) {
                        *acc = (-(rb.dmin * yd)).mul_add(msum as f32, *acc);
                    }
                }
            }
            out[t * out_stride + g * ROWS..][..ROWS].copy_from_slice(&acc);
        }
    }
}
