//! K-quant weights repacked for the CPU: rows in groups of 8, interleaved, so that one
//! vector load holds four quants of each of 8 rows and one integer dot instruction with
//! a broadcast activation advances all 8 rows (ggml calls this "repack"; its x86 Q4_K
//! kernels do the same with their `block_q4_Kx8`).
//!
//! Why: decoding one token reads every weight once. The row-at-a-time kernels spend
//! most of their instructions unpacking 6-bit scales and shuffling them next to the
//! quants, once per row and super-block; at one thread that kept Q4_K decode at ~20 GB/s
//! of weights, under the ~30 GB/s one core can read. Here the scales are decoded once,
//! at load, into bytes laid out for the kernel, and the quants keep their 4 (Q4_K) or
//! 6 (Q6_K) bits, so the bytes read per token stay what the file holds (Q4_K: +2.8%).
//!
//! Layout. A packed tensor is `rows / 8` groups; group g holds rows 8g..8g+8. Its
//! super-blocks follow one another (`nb = cols / 256` of them), each `group_bytes(ty)`
//! long; "[8 row]" below means one entry per row of the group, row-minor. A "k-vector"
//! is 32 bytes: dword k (bytes 4k..4k+4) of the same 32-byte chunk of each of the 8 rows.
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
//! The arithmetic, per row (lane) and super-block, is the same at every level and in
//! the scalar twin here, so they agree bit for bit: integer sums per sub-block (exact),
//! weighted by the sub-block scales in i32 (exact; the mins against the activation's
//! sub-block sums likewise), then `acc = fma(d·a_d, isum, acc)` and, for Q4_K,
//! `acc = fma(-(dmin·a_d), msum, acc)` in f32, super-block after super-block. Each token
//! is computed alone with this order, so a token's result never depends on the batch.

use super::{GgmlType, QK_K};

/// Rows per group.
pub const ROWS: usize = 8;

/// Bytes of one group and super-block, for the types that pack.
pub fn group_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_K => Some(Q4K_GROUP),
        GgmlType::Q6_K => Some(Q6K_GROUP),
        _ => None,
    }
}

pub(crate) const Q4K_GROUP: usize = 1184;
pub(crate) const Q6K_GROUP: usize = 1680;
const Q4K_B: usize = 144;
const Q6K_B: usize = 210;
const Q8K_B: usize = 292;

/// Whether a `[rows][cols]` tensor of `ty` can be packed.
pub fn packable(ty: GgmlType, rows: usize, cols: usize) -> bool {
    group_bytes(ty).is_some() && rows > 0 && rows.is_multiple_of(ROWS) && cols > 0 && cols.is_multiple_of(QK_K)
}

/// A weight matrix in the packed layout (see the module doc), `[rows][cols]` of `ty`.
#[derive(Debug)]
pub struct Packed {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: HugeBuf,
}

/// Zeroed anonymous memory, in 2 MiB pages where the kernel gives them
/// (`MADV_HUGEPAGE`): streaming hundreds of megabytes of weights per token through
/// 4 KiB pages costs a TLB miss every 64 cache lines.
#[derive(Debug)]
struct HugeBuf {
    ptr: *mut u8,
    len: usize,
    map_len: usize,
}

// SAFETY: HugeBuf owns its mapping exclusively; &HugeBuf only reads it.
unsafe impl Send for HugeBuf {}
// SAFETY: as above.
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    fn zeroed(len: usize) -> HugeBuf {
        const HUGE: usize = 2 << 20;
        let map_len = len.max(1).div_ceil(HUGE) * HUGE;
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE,
                       libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert!(ptr != libc::MAP_FAILED, "packed weights: cannot map {map_len} bytes");
        // SAFETY: advice on our own mapping; failure (no THP) only costs speed.
        unsafe { libc::madvise(ptr, map_len, libc::MADV_HUGEPAGE) };
        HugeBuf { ptr: ptr.cast(), len, map_len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped, readable and initialised (zero or written).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `zeroed`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.map_len) };
    }
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
    pub fn new_with(ty: GgmlType, w: &[u8], rows: usize, cols: usize,
                    par: impl FnOnce(usize, &(dyn Fn(std::ops::Range<usize>) + Sync))) -> Option<Packed> {
        if !packable(ty, rows, cols) {
            return None;
        }
        let rb = ty.row_bytes(cols)?;
        assert_eq!(w.len(), rows * rb, "Packed::new: {rows} rows of {cols} {ty} need {} bytes", rows * rb);
        let nb = cols / QK_K;
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
                        GgmlType::Q4_K => pack_q4_k(&blocks, out),
                        _ => pack_q6_k(&blocks, out),
                    }
                }
            }
        });
        Some(Packed { ty, rows, cols, data })
    }

    /// Row `r` decoded to f32 (the embedding lookup of a packed, tied output matrix),
    /// equal to `dequantize_row` of the file's row.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "Packed::dequantize_row: row {r} of {}", self.rows);
        let gb = group_bytes(self.ty).expect("a packed type");
        let (g, l) = (r / ROWS, r % ROWS);
        let nb = self.nb();
        let f16 = |x: &[u8], o: usize| half::f16::from_le_bytes([x[o], x[o + 1]]).to_f32();
        for b in 0..nb {
            let x = &self.groups(g, g + 1)[b * gb..(b + 1) * gb];
            let o = &mut out[b * QK_K..(b + 1) * QK_K];
            let d = f16(x, 2 * l);
            if self.ty == GgmlType::Q4_K {
                let dmin = f16(x, 16 + 2 * l);
                for p in 0..4 {
                    let (sc_lo, sc_hi) = (x[32 + 16 * p + l] as f32, x[40 + 16 * p + l] as f32);
                    let (m_lo, m_hi) = (x[96 + 16 * p + 2 * l] as f32, x[96 + 16 * p + 2 * l + 1] as f32);
                    // ggml's dequantize_row_q4_K: d·sc and dmin·m first, then q·(d·sc) - dmin·m.
                    let (d1, m1, d2, m2) = (d * sc_lo, dmin * m_lo, d * sc_hi, dmin * m_hi);
                    for k in 0..8 {
                        for e in 0..4 {
                            let v = x[160 + 32 * (8 * p + k) + 4 * l + e];
                            o[64 * p + 4 * k + e] = d1 * (v & 0xF) as f32 - m1;
                            o[64 * p + 32 + 4 * k + e] = d2 * (v >> 4) as f32 - m2;
                        }
                    }
                }
            } else {
                for h in 0..2 {
                    for k in 0..8 {
                        for e in 0..4 {
                            let v = |i: usize| x[144 + 32 * (3 * (8 * h + k) + i) + 4 * l + e];
                            let (l0, l1, qh) = (v(0), v(1), v(2));
                            let q = [
                                (l0 & 0xF) | ((qh & 3) << 4),
                                (l1 & 0xF) | (((qh >> 2) & 3) << 4),
                                (l0 >> 4) | (((qh >> 4) & 3) << 4),
                                (l1 >> 4) | (((qh >> 6) & 3) << 4),
                            ];
                            for (i, &q) in q.iter().enumerate() {
                                let el = 128 * h + 32 * i + 4 * k + e;
                                let sc = x[16 + 8 * (el / 16) + l] as i8 as f32;
                                o[el] = d * sc * (q as i8 - 32) as f32;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Super-blocks per row.
    pub fn nb(&self) -> usize {
        self.cols / QK_K
    }

    /// The bytes of row groups `g0..g1` (each `nb() * group_bytes` long).
    pub fn groups(&self, g0: usize, g1: usize) -> &[u8] {
        let len = self.nb() * group_bytes(self.ty).expect("packed types have a group size");
        &self.data.as_slice()[g0 * len..g1 * len]
    }

    pub fn n_bytes(&self) -> usize {
        self.data.len
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

fn pack_q4_k(x: &[&[u8]; ROWS], out: &mut [u8]) {
    debug_assert_eq!(out.len(), Q4K_GROUP);
    for (r, b) in x.iter().enumerate() {
        debug_assert_eq!(b.len(), Q4K_B);
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
            let chunks: [&[u8]; ROWS] = std::array::from_fn(|r| &x[r][16 + 32 * p..16 + 32 * p + 32]);
            k_vector(&mut out[160 + 32 * (8 * p + k)..][..32], chunks, k);
        }
    }
}

fn pack_q6_k(x: &[&[u8]; ROWS], out: &mut [u8]) {
    debug_assert_eq!(out.len(), Q6K_GROUP);
    for (r, b) in x.iter().enumerate() {
        debug_assert_eq!(b.len(), Q6K_B);
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

/// The activation's per-sub-block sums, per super-block: Q4_K's 8 sub-blocks of 32
/// (two of Q8_K's 16-element `bsums` each) or Q6_K's 16 of 16. Computed once per token
/// and shared by every row group. `a` is one Q8_K row; `out` gets `nb * 16` i16.
pub fn sub_sums(ty: GgmlType, a: &[u8], out: &mut [i16]) {
    let nb = a.len() / Q8K_B;
    debug_assert_eq!(out.len(), nb * 16);
    for b in 0..nb {
        let bs = &a[b * Q8K_B + 4 + QK_K..][..32];
        let bsum = |i: usize| i16::from_le_bytes([bs[2 * i], bs[2 * i + 1]]);
        for s in 0..16 {
            out[16 * b + s] = match ty {
                // 32 × 127 at most: fits.
                GgmlType::Q4_K => if s < 8 { bsum(2 * s) + bsum(2 * s + 1) } else { 0 },
                _ => bsum(s),
            };
        }
    }
}

/// The slow twin: `out[t * out_stride + r]` for the 8 rows of each group in `groups`
/// (consecutive groups of the packed tensor) and every token `t` of `a` (Q8_K rows),
/// in the arithmetic of the module doc. `sums` holds each token's `sub_sums`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ref(ty: GgmlType, nb: usize, groups: &[u8], a: &[u8], sums: &[i16], n_tok: usize, out: &mut [f32],
                out_stride: usize) {
    let gb = group_bytes(ty).expect("a packed type");
    let n_groups = groups.len() / (nb * gb);
    let arb = nb * Q8K_B;
    for t in 0..n_tok {
        let at = &a[t * arb..(t + 1) * arb];
        let st = &sums[t * nb * 16..(t + 1) * nb * 16];
        for g in 0..n_groups {
            let mut acc = [0f32; ROWS];
            for b in 0..nb {
                let x = &groups[(g * nb + b) * gb..][..gb];
                let y = &at[b * Q8K_B..][..Q8K_B];
                let yd = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                let q8 = |i: usize| y[4 + i] as i8 as i32;
                let f16 = |o: usize| half::f16::from_le_bytes([x[o], x[o + 1]]).to_f32();
                let s = &st[16 * b..16 * b + 16];
                for r in 0..ROWS {
                    let (isum, msum, dmin) = match ty {
                        GgmlType::Q4_K => {
                            let mut isum = 0i32;
                            let mut msum = 0i32;
                            for p in 0..4 {
                                let (mut lo, mut hi) = (0i32, 0i32);
                                for k in 0..8 {
                                    for e in 0..4 {
                                        let v = x[160 + 32 * (8 * p + k) + 4 * r + e];
                                        lo += (v & 0xF) as i32 * q8(64 * p + 4 * k + e);
                                        hi += (v >> 4) as i32 * q8(64 * p + 32 + 4 * k + e);
                                    }
                                }
                                isum += lo * x[32 + 8 * (2 * p) + r] as i32 + hi * x[32 + 8 * (2 * p + 1) + r] as i32;
                                msum += x[96 + 16 * p + 2 * r] as i32 * s[2 * p] as i32
                                    + x[96 + 16 * p + 2 * r + 1] as i32 * s[2 * p + 1] as i32;
                            }
                            (isum, msum, f16(16 + 2 * r) * yd)
                        }
                        _ => {
                            let mut isum = 0i32;
                            let mut sub = [0i32; 16];
                            for h in 0..2 {
                                for k in 0..8 {
                                    for e in 0..4 {
                                        let v = |i: usize| x[144 + 32 * (3 * (8 * h + k) + i) + 4 * r + e];
                                        let (l0, l1, qh) = (v(0), v(1), v(2));
                                        let q = [
                                            (l0 & 0xF) | ((qh & 3) << 4),
                                            (l1 & 0xF) | (((qh >> 2) & 3) << 4),
                                            (l0 >> 4) | (((qh >> 4) & 3) << 4),
                                            (l1 >> 4) | (((qh >> 6) & 3) << 4),
                                        ];
                                        for (i, &q) in q.iter().enumerate() {
                                            let el = 128 * h + 32 * i + 4 * k + e;
                                            sub[el / 16] += q as i32 * q8(el);
                                        }
                                    }
                                }
                            }
                            for (j, &sq) in sub.iter().enumerate() {
                                let sc = x[16 + 8 * j + r] as i8 as i32;
                                isum += sc * (sq - 32 * s[j] as i32);
                            }
                            (isum, 0, 0.0)
                        }
                    };
                    let d = f16(2 * r) * yd;
                    acc[r] = d.mul_add(isum as f32, acc[r]);
                    if ty == GgmlType::Q4_K {
                        acc[r] = (-dmin).mul_add(msum as f32, acc[r]);
                    }
                }
            }
            out[t * out_stride + g * ROWS..][..ROWS].copy_from_slice(&acc);
        }
    }
}
