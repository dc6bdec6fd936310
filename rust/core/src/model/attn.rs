//! Tiled flash attention for prompts: a tile of query rows (several tokens of one
//! sequence × the query heads that share one KV head) walks the keys 16 at a time —
//! one KV block. Each block's K and V rows are converted from f16 once per tile (not
//! once per query), scores for 4 rows × 16 keys come from one register tile, softmax is
//! online (running max and sum per row), and exp is a vectorised polynomial.
//!
//! Per query row, the arithmetic does not depend on which other rows share its tile,
//! so the result is the same however the scheduler chunks a prompt or batches it.
//!
//! The generic body is compiled once per SIMD level through `#[target_feature]`
//! wrappers; fixed-width `[f32; 16]` lanes let the compiler keep the score tile in
//! vector registers.

use crate::kv::KvCache;
use crate::quant::Kernels;
#[cfg(target_arch = "x86_64")]
use crate::quant::Level;

const KB: usize = 16; // keys per step (= one KV block when block_size is 16)
const RT: usize = 8; // query rows per register tile

/// 16 f32 lanes: one zmm (AVX-512), two ymm (AVX2), or a plain array.
trait V16: Copy {
    /// # Safety
    /// `p` points to 16 readable floats.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` points to 16 writable floats.
    unsafe fn store(self, p: *mut f32);
    fn zero() -> Self;
    /// self + a * k
    fn fma_b(self, a: f32, k: Self) -> Self;
    /// self + a * b, lane by lane
    fn fma_v(self, a: Self, b: Self) -> Self;
    /// Whether `load_f16` converts in registers (else callers convert rows through
    /// `Kernels::f16_to_f32_row` first: the plain array would convert in software).
    const F16: bool;
    /// 16 f16 values at `p`, as f32.
    /// # Safety
    /// `p` points to 16 readable f16.
    unsafe fn load_f16(p: *const half::f16) -> Self;
    fn hmax(self) -> f32;
    fn hsum(self) -> f32;
    /// The horizontal sums of four vectors (one reduction tree for the four).
    #[inline(always)]
    fn hsum4(v: [Self; 4]) -> [f32; 4] {
        [v[0].hsum(), v[1].hsum(), v[2].hsum(), v[3].hsum()]
    }
}

#[derive(Clone, Copy)]
struct Arr([f32; KB]);

impl V16 for Arr {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: caller's contract.
        Arr(unsafe { *(p as *const [f32; KB]) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: caller's contract.
        unsafe { *(p as *mut [f32; KB]) = self.0 }
    }
    #[inline(always)]
    fn zero() -> Self {
        Arr([0.0; KB])
    }
    #[inline(always)]
    fn fma_b(mut self, a: f32, k: Self) -> Self {
        for l in 0..KB {
            self.0[l] =
                if cfg!(target_arch = "aarch64") { a.mul_add(k.0[l], self.0[l]) } else { a * k.0[l] + self.0[l] };
        }
        self
    }
    #[inline(always)]
    fn fma_v(mut self, a: Self, b: Self) -> Self {
        for l in 0..KB {
            self.0[l] = a.0[l].mul_add(b.0[l], self.0[l]);
        }
        self
    }
    const F16: bool = false;
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> Self {
        // SAFETY: caller's contract.
        Arr(std::array::from_fn(|l| unsafe { *p.add(l) }.to_f32()))
    }
    #[inline(always)]
    fn hmax(self) -> f32 {
        self.0.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        self.0.iter().sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::V16;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Z(__m512);
    impl V16 for Z {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: caller's contract; only instantiated under avx512f.
            Z(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: only instantiated inside avx512f functions.
            Z(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        fn fma_b(self, a: f32, k: Self) -> Self {
            // SAFETY: as above.
            Z(unsafe { _mm512_fmadd_ps(_mm512_set1_ps(a), k.0, self.0) })
        }
        #[inline(always)]
        fn fma_v(self, a: Self, b: Self) -> Self {
            // SAFETY: as above.
            Z(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }
        const F16: bool = true;
        #[inline(always)]
        unsafe fn load_f16(p: *const half::f16) -> Self {
            // SAFETY: caller's contract; F16C/AVX-512 present where Z is used.
            Z(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) })
        }
        #[inline(always)]
        fn hmax(self) -> f32 {
            // SAFETY: as above.
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            // SAFETY: as above.
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        fn hsum4(v: [Self; 4]) -> [f32; 4] {
            // SAFETY: as above.
            unsafe {
                // (extractf64x4 is AVX-512F; the f32x8 form needs DQ.)
                let h = |z: __m512| {
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)));
                    _mm256_add_ps(_mm512_castps512_ps256(z), hi)
                };
                let (a, b, c, d) = (h(v[0].0), h(v[1].0), h(v[2].0), h(v[3].0));
                let t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
                let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), s);
                out
            }
        }
    }

    #[derive(Clone, Copy)]
    pub struct Y(__m256, __m256);
    impl V16 for Y {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: caller's contract; only instantiated under avx2+fma.
            unsafe { Y(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(8), self.1)
            }
        }
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: only instantiated inside avx2 functions.
            unsafe { Y(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn fma_b(self, a: f32, k: Self) -> Self {
            // SAFETY: as above.
            unsafe {
                let b = _mm256_set1_ps(a);
                Y(_mm256_fmadd_ps(b, k.0, self.0), _mm256_fmadd_ps(b, k.1, self.1))
            }
        }
        #[inline(always)]
        fn fma_v(self, a: Self, b: Self) -> Self {
            // SAFETY: as above.
            unsafe { Y(_mm256_fmadd_ps(a.0, b.0, self.0), _mm256_fmadd_ps(a.1, b.1, self.1)) }
        }
        const F16: bool = true;
        #[inline(always)]
        unsafe fn load_f16(p: *const half::f16) -> Self {
            // SAFETY: caller's contract; F16C present where Y is used.
            unsafe { Y(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast()))) }
        }
        #[inline(always)]
        fn hmax(self) -> f32 {
            let mut a = [0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), _mm256_max_ps(self.0, self.1)) };
            a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            let mut a = [0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), _mm256_add_ps(self.0, self.1)) };
            a.iter().sum()
        }
        #[inline(always)]
        fn hsum4(v: [Self; 4]) -> [f32; 4] {
            // SAFETY: as above.
            unsafe {
                let h = |y: Y| _mm256_add_ps(y.0, y.1);
                let (a, b, c, d) = (h(v[0]), h(v[1]), h(v[2]), h(v[3]));
                let t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
                let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), s);
                out
            }
        }
    }
}

/// One tile of work: `q` holds `rows` query rows of `hd` floats, already multiplied by
/// the attention scale; row `r` may see keys `lo[r]..=hi[r]`.
pub struct Tile<'a> {
    pub q: &'a [f32],
    pub lo: &'a [usize],
    pub hi: &'a [usize],
    pub hd: usize,
    pub hdv: usize,
}

/// Keys of one KV head of one sequence.
pub struct Keys<'a> {
    pub kv: &'a KvCache,
    pub layer: usize,
    pub table: &'a [u32],
    pub kvh: usize,
}

/// Where a tile's keys and values come from: the paged f16 cache (`Keys`), or f32 rows
/// an encoder computed for this step (`DenseKeys`).
pub trait KeyRows {
    /// Key `j`'s K row (`k.len()` = hd floats) and V row (`v.len()` = hdv floats).
    fn load(&self, kern: &Kernels, j: usize, k: &mut [f32], v: &mut [f32]);
}

impl KeyRows for Keys<'_> {
    #[inline(always)]
    fn load(&self, kern: &Kernels, j: usize, k: &mut [f32], v: &mut [f32]) {
        let (hd, hdv) = (k.len(), v.len());
        kern.f16_to_f32_row(&self.kv.k_row(self.layer, self.table, j)[self.kvh * hd..(self.kvh + 1) * hd], k);
        kern.f16_to_f32_row(&self.kv.v_row(self.layer, self.table, j)[self.kvh * hdv..(self.kvh + 1) * hdv], v);
    }
}

/// One head's keys and values of one sequence as f32 rows, with no cache (an
/// encoder's step): key `j` is `k[j * k_stride + k_off..][..hd]`, its value
/// `v[j * v_stride + v_off..][..hdv]`.
pub struct DenseKeys<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub k_stride: usize,
    pub v_stride: usize,
    pub k_off: usize,
    pub v_off: usize,
}

impl KeyRows for DenseKeys<'_> {
    #[inline(always)]
    fn load(&self, _: &Kernels, j: usize, k: &mut [f32], v: &mut [f32]) {
        let (a, b) = (j * self.k_stride + self.k_off, j * self.v_stride + self.v_off);
        k.copy_from_slice(&self.k[a..a + k.len()]);
        v.copy_from_slice(&self.v[b..b + v.len()]);
    }
}

/// Scratch reused across tiles of one task.
#[derive(Default)]
pub struct Scratch {
    kt: Vec<[f32; KB]>, // [hd] rows of 16 keys (K transposed)
    v: Vec<f32>,        // [KB][hdv]
    tmp: Vec<f32>,
    acc: Vec<f32>, // [rows][hdv]
    m: Vec<f32>,
    l: Vec<f32>,
}

/// out: `rows × hdv`, row-major.
pub fn run<K: KeyRows>(kern: &Kernels, t: &Tile<'_>, k: &K, sc: &mut Scratch, out: &mut [f32]) {
    assert!(t.hdv.is_multiple_of(KB), "tiled attention needs head_dim_v to be a multiple of {KB}");
    assert_eq!(t.q.len(), t.lo.len() * t.hd);
    match kern.level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected (or forced to one this CPU has) at load.
        Level::Avx512 => unsafe { run_avx512(kern, t, k, sc, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { run_avx2(kern, t, k, sc, out) },
        _ => run_generic::<Arr, K>(kern, t, k, sc, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn run_avx512<K: KeyRows>(kern: &Kernels, t: &Tile<'_>, k: &K, sc: &mut Scratch, out: &mut [f32]) {
    run_generic::<x86::Z, K>(kern, t, k, sc, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<K: KeyRows>(kern: &Kernels, t: &Tile<'_>, k: &K, sc: &mut Scratch, out: &mut [f32]) {
    run_generic::<x86::Y, K>(kern, t, k, sc, out)
}

/// e^x on 16 lanes: range reduction by ln 2, degree-6 polynomial, 2^n through the
/// exponent bits. Relative error ~2e-7; -inf and very negative inputs give 0.
#[inline(always)]
fn exp16(x: &mut [f32; KB]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    for v in x.iter_mut() {
        let xi = v.clamp(-87.0, 88.0);
        let n = (xi * LOG2E + 12_582_912.0) - 12_582_912.0; // round to nearest
        let r = xi - n * LN2_HI - n * LN2_LO;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 5e-1;
        let e = (p * r * r + r) + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        *v = if *v < -87.0 { 0.0 } else { e * scale };
    }
}

// Index loops mirror the register tiles; iterators would hide the structure.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn run_generic<V: V16, K: KeyRows>(kern: &Kernels, t: &Tile<'_>, k: &K, sc: &mut Scratch, out: &mut [f32]) {
    let (hd, hdv) = (t.hd, t.hdv);
    let rows = t.lo.len();
    debug_assert_eq!(t.q.len(), rows * hd);
    debug_assert_eq!(out.len(), rows * hdv);
    let key_lo = *t.lo.iter().min().expect("a tile has rows");
    let key_hi = *t.hi.iter().max().expect("a tile has rows");
    sc.kt.clear();
    sc.kt.resize(hd, [0.0; KB]);
    sc.v.clear();
    sc.v.resize(KB * hdv, 0.0);
    sc.tmp.resize(hd.max(hdv), 0.0);
    sc.acc.clear();
    sc.acc.resize(rows * hdv, 0.0);
    sc.m.clear();
    sc.m.resize(rows, f32::NEG_INFINITY);
    sc.l.clear();
    sc.l.resize(rows, 0.0);
    let mut j0 = key_lo / KB * KB;
    while j0 <= key_hi {
        let nk = KB.min(key_hi + 1 - j0);
        // K (transposed) and V of keys j0..j0+nk as f32.
        for jj in 0..KB {
            let j = j0 + jj;
            if jj < nk && j >= key_lo {
                k.load(kern, j, &mut sc.tmp[..hd], &mut sc.v[jj * hdv..(jj + 1) * hdv]);
                for (d, &x) in sc.tmp[..hd].iter().enumerate() {
                    sc.kt[d][jj] = x;
                }
            } else {
                for d in 0..hd {
                    sc.kt[d][jj] = 0.0;
                }
                sc.v[jj * hdv..(jj + 1) * hdv].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        let mut r0 = 0;
        while r0 < rows {
            let nr = RT.min(rows - r0);
            // Scores of up to 8 rows × 16 keys: 8 independent FMA chains.
            let mut q = [std::ptr::null::<f32>(); RT];
            for (r, qp) in q.iter_mut().enumerate() {
                *qp = t.q[(r0 + r.min(nr - 1)) * hd..].as_ptr();
            }
            let mut acc8 = [V::zero(); RT];
            for d in 0..hd {
                // SAFETY: kt has hd rows of 16; each q row has hd floats.
                unsafe {
                    let kd = V::load(sc.kt[d].as_ptr());
                    for r in 0..RT {
                        acc8[r] = acc8[r].fma_b(*q[r].add(d), kd);
                    }
                }
            }
            let mut s = [[0f32; KB]; RT];
            let mut active = [false; RT];
            for r in 0..nr {
                let sr = &mut s[r];
                // SAFETY: each s[r] holds 16 floats.
                unsafe { acc8[r].store(sr.as_mut_ptr()) };
                let row = r0 + r;
                let (lo, hi) = (t.lo[row], t.hi[row]);
                if hi < j0 || lo >= j0 + nk {
                    continue; // no visible key in this block
                }
                active[r] = true;
                if !(lo <= j0 && j0 + KB <= hi + 1 && nk == KB) {
                    // A block at the edge of this row's window: mask what it may not see.
                    for (l, x) in sr.iter_mut().enumerate() {
                        let j = j0 + l;
                        if l >= nk || j < lo || j > hi {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                // SAFETY: sr holds 16 floats.
                let mx = unsafe { V::load(sr.as_ptr()) }.hmax();
                let m_old = sc.m[row];
                let m_new = m_old.max(mx);
                for x in sr.iter_mut() {
                    *x -= m_new;
                }
                exp16(sr);
                let corr = if m_old == m_new {
                    1.0
                } else if m_old == f32::NEG_INFINITY {
                    0.0
                } else {
                    (m_old - m_new).exp()
                };
                // SAFETY: sr holds 16 floats.
                let psum = unsafe { V::load(sr.as_ptr()) }.hsum();
                sc.l[row] = sc.l[row] * corr + psum;
                sc.m[row] = m_new;
                if corr != 1.0 {
                    sc.acc[row * hdv..(row + 1) * hdv].iter_mut().for_each(|a| *a *= corr);
                }
            }
            // acc += p · V (masked keys have p = 0; V rows past the end are zero):
            // two rows at a time share each V load; 4 × 16 lanes per row, so 8
            // independent chains. Per lane the sum runs over keys in order either way.
            let vp = sc.v.as_ptr();
            let mut r = 0;
            while r < nr {
                let pair = r + 1 < nr && active[r] && active[r + 1];
                if !active[r] {
                    r += 1;
                    continue;
                }
                let a0 = sc.acc[(r0 + r) * hdv..].as_mut_ptr();
                let mut c = 0;
                // SAFETY: acc rows and every V row have hdv floats; every access is < hdv;
                // with `pair`, row r0 + r + 1 exists too.
                unsafe {
                    if pair {
                        let a1 = a0.add(hdv);
                        let (p0, p1) = (&s[r], &s[r + 1]);
                        while c + 4 * KB <= hdv {
                            let mut x = [
                                V::load(a0.add(c)),
                                V::load(a0.add(c + KB)),
                                V::load(a0.add(c + 2 * KB)),
                                V::load(a0.add(c + 3 * KB)),
                            ];
                            let mut y = [
                                V::load(a1.add(c)),
                                V::load(a1.add(c + KB)),
                                V::load(a1.add(c + 2 * KB)),
                                V::load(a1.add(c + 3 * KB)),
                            ];
                            for jj in 0..KB {
                                let v = vp.add(jj * hdv + c);
                                let (q0, q1) = (p0[jj], p1[jj]);
                                for i in 0..4 {
                                    let vv = V::load(v.add(i * KB));
                                    x[i] = x[i].fma_b(q0, vv);
                                    y[i] = y[i].fma_b(q1, vv);
                                }
                            }
                            for i in 0..4 {
                                x[i].store(a0.add(c + i * KB));
                                y[i].store(a1.add(c + i * KB));
                            }
                            c += 4 * KB;
                        }
                        while c < hdv {
                            let (mut x, mut y) = (V::load(a0.add(c)), V::load(a1.add(c)));
                            for jj in 0..KB {
                                let vv = V::load(vp.add(jj * hdv + c));
                                x = x.fma_b(p0[jj], vv);
                                y = y.fma_b(p1[jj], vv);
                            }
                            x.store(a0.add(c));
                            y.store(a1.add(c));
                            c += KB;
                        }
                    } else {
                        let p0 = &s[r];
                        while c + 4 * KB <= hdv {
                            let mut x = [
                                V::load(a0.add(c)),
                                V::load(a0.add(c + KB)),
                                V::load(a0.add(c + 2 * KB)),
                                V::load(a0.add(c + 3 * KB)),
                            ];
                            for jj in 0..KB {
                                let v = vp.add(jj * hdv + c);
                                for i in 0..4 {
                                    x[i] = x[i].fma_b(p0[jj], V::load(v.add(i * KB)));
                                }
                            }
                            for i in 0..4 {
                                x[i].store(a0.add(c + i * KB));
                            }
                            c += 4 * KB;
                        }
                        while c < hdv {
                            let mut x = V::load(a0.add(c));
                            for jj in 0..KB {
                                x = x.fma_b(p0[jj], V::load(vp.add(jj * hdv + c)));
                            }
                            x.store(a0.add(c));
                            c += KB;
                        }
                    }
                }
                r += if pair { 2 } else { 1 };
            }
            r0 += RT;
        }
        j0 += KB;
    }
    for row in 0..rows {
        let inv = if sc.l[row] > 0.0 { 1.0 / sc.l[row] } else { 0.0 };
        for (o, &a) in out[row * hdv..(row + 1) * hdv].iter_mut().zip(&sc.acc[row * hdv..(row + 1) * hdv]) {
            *o = a * inv;
        }
    }
}

/// Decode attention over a long context: the query rows of one token that share a KV
/// head (`q`: `rows × hd`, already scaled) against keys `lo..=hi`, 16 at a time.
/// The prompt tile above transposes K so that many rows share each key; for the few
/// rows of one decode token that transposition costs more than the dots, so here each
/// key's row is dotted with each query row directly (the same lane order for every
/// row and key), with the same online softmax and f32 accumulation of V. Each row's
/// result depends only on its own query and keys, never on the batch.
/// out: `rows × hdv`, row-major.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    kern: &Kernels,
    q: &[f32],
    rows: usize,
    lo: usize,
    hi: usize,
    hd: usize,
    hdv: usize,
    k: &Keys<'_>,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    assert!(
        hd.is_multiple_of(KB) && hdv.is_multiple_of(KB),
        "decode attention needs head sizes that are multiples of {KB}"
    );
    assert!(q.len() == rows * hd && out.len() == rows * hdv && lo <= hi);
    match kern.level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected (or forced to one this CPU has) at load.
        Level::Avx512 => unsafe { decode_avx512(kern, q, rows, lo, hi, hd, hdv, k, sc, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { decode_avx2(kern, q, rows, lo, hi, hd, hdv, k, sc, out) },
        _ => decode_generic::<Arr>(kern, q, rows, lo, hi, hd, hdv, k, sc, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_avx512(
    kern: &Kernels,
    q: &[f32],
    rows: usize,
    lo: usize,
    hi: usize,
    hd: usize,
    hdv: usize,
    k: &Keys<'_>,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    decode_generic::<x86::Z>(kern, q, rows, lo, hi, hd, hdv, k, sc, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_avx2(
    kern: &Kernels,
    q: &[f32],
    rows: usize,
    lo: usize,
    hi: usize,
    hd: usize,
    hdv: usize,
    k: &Keys<'_>,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    decode_generic::<x86::Y>(kern, q, rows, lo, hi, hd, hdv, k, sc, out)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn decode_generic<V: V16>(
    kern: &Kernels,
    q: &[f32],
    rows: usize,
    lo: usize,
    hi: usize,
    hd: usize,
    hdv: usize,
    k: &Keys<'_>,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    // Rows in fours, then one at a time: a fixed count lets the compiler keep each
    // row's accumulators in registers. A row's arithmetic is the same either way.
    let mut r0 = 0;
    while r0 < rows {
        let n = if rows - r0 >= 4 { 4 } else { 1 };
        let (qs, os) = (&q[r0 * hd..(r0 + n) * hd], &mut out[r0 * hdv..(r0 + n) * hdv]);
        if n == 4 {
            decode_rows::<V, 4>(kern, qs, lo, hi, hd, hdv, k, sc, os);
        } else {
            decode_rows::<V, 1>(kern, qs, lo, hi, hd, hdv, k, sc, os);
        }
        r0 += n;
    }
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
fn decode_rows<V: V16, const R: usize>(
    kern: &Kernels,
    q: &[f32],
    lo: usize,
    hi: usize,
    hd: usize,
    hdv: usize,
    k: &Keys<'_>,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    if !V::F16 {
        sc.tmp.clear();
        sc.tmp.resize(KB * hd, 0.0); // [16 keys][hd]
        sc.v.clear();
        sc.v.resize(KB * hdv, 0.0); // [16 keys][hdv]
    }
    sc.acc.clear();
    sc.acc.resize(R * hdv, 0.0);
    let mut m = [f32::NEG_INFINITY; R];
    let mut l = [0f32; R];
    let mut kp = [std::ptr::null::<half::f16>(); KB];
    let mut vp = [std::ptr::null::<half::f16>(); KB];
    let mut j0 = lo / KB * KB;
    while j0 <= hi {
        let (a, b) = (j0.max(lo) - j0, (j0 + KB).min(hi + 1) - j0); // keys j0+a..j0+b are visible
        for jj in a..b {
            let kr = &k.kv.k_row(k.layer, k.table, j0 + jj)[k.kvh * hd..(k.kvh + 1) * hd];
            let vr = &k.kv.v_row(k.layer, k.table, j0 + jj)[k.kvh * hdv..(k.kvh + 1) * hdv];
            (kp[jj], vp[jj]) = (kr.as_ptr(), vr.as_ptr());
            if !V::F16 {
                kern.f16_to_f32_row(kr, &mut sc.tmp[jj * hd..(jj + 1) * hd]);
                kern.f16_to_f32_row(vr, &mut sc.v[jj * hdv..(jj + 1) * hdv]);
            }
        }
        // SAFETY (every load below): c + 16 <= hd (hdv) for q rows, key rows and value
        // rows alike; kp/vp[jj] point at rows of hd (hdv) f16 for the keys a..b.
        #[allow(clippy::undocumented_unsafe_blocks)]
        let key = |jj: usize, c: usize| unsafe {
            if V::F16 {
                V::load_f16(kp[jj].add(c))
            } else {
                V::load(sc.tmp.as_ptr().add(jj * hd + c))
            }
        };
        // Scores: each key's chunk converted once and dotted with every row; the four
        // rows' sums share one reduction tree (hsum4), whose result per row does not
        // depend on the other rows.
        let mut s = [[f32::NEG_INFINITY; KB]; R];
        for jj in a..b {
            let mut acc = [V::zero(); R];
            let mut c = 0;
            while c < hd {
                let kc = key(jj, c);
                for r in 0..R {
                    // SAFETY: as above.
                    acc[r] = acc[r].fma_v(unsafe { V::load(q.as_ptr().add(r * hd + c)) }, kc);
                }
                c += KB;
            }
            let mut quad = [V::zero(); 4];
            quad[..R].copy_from_slice(&acc);
            let h = V::hsum4(quad);
            for r in 0..R {
                s[r][jj] = h[r];
            }
        }
        for r in 0..R {
            let sr = &mut s[r];
            let mx = sr.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let m_new = m[r].max(mx);
            for x in sr.iter_mut() {
                *x -= m_new;
            }
            exp16(sr);
            let corr = if m[r] == m_new {
                1.0
            } else if m[r] == f32::NEG_INFINITY {
                0.0
            } else {
                (m[r] - m_new).exp()
            };
            l[r] = l[r] * corr + sr.iter().sum::<f32>();
            m[r] = m_new;
            if corr != 1.0 {
                sc.acc[r * hdv..(r + 1) * hdv].iter_mut().for_each(|x| *x *= corr);
            }
        }
        // acc += p · V: each value chunk converted once for every row.
        let mut c = 0;
        while c < hdv {
            // SAFETY: as above, for the accumulator rows too.
            unsafe {
                let mut x = [V::zero(); R];
                for r in 0..R {
                    x[r] = V::load(sc.acc.as_ptr().add(r * hdv + c));
                }
                for jj in a..b {
                    let vc = if V::F16 { V::load_f16(vp[jj].add(c)) } else { V::load(sc.v.as_ptr().add(jj * hdv + c)) };
                    for r in 0..R {
                        x[r] = x[r].fma_b(s[r][jj], vc);
                    }
                }
                for r in 0..R {
                    x[r].store(sc.acc.as_mut_ptr().add(r * hdv + c));
                }
            }
            c += KB;
        }
        j0 += KB;
    }
    for r in 0..R {
        let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
        for (o, &a) in out[r * hdv..(r + 1) * hdv].iter_mut().zip(&sc.acc[r * hdv..(r + 1) * hdv]) {
            *o = a * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvShape;

    /// Tiled attention against an f64 reference on the same f16 cache, causal and
    /// windowed, at every kernel level; and each row's result is the same alone as in
    /// any tile (the serving executor relies on it).
    #[test]
    fn tiled_attention_matches_reference_and_is_per_row() {
        let (hd, hdv, n_kv_heads, n_pos) = (32, 32, 2, 83);
        let shape =
            KvShape { n_layer: 1, kv_dim_k: hd * n_kv_heads, kv_dim_v: hdv * n_kv_heads, block_size: 16, n_blocks: 8 };
        let mut kv = KvCache::new(shape).unwrap();
        let table: Vec<u32> = (0..8u32).rev().collect(); // non-contiguous blocks
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        for p in 0..n_pos {
            let k: Vec<f32> = (0..hd * n_kv_heads).map(|_| rnd()).collect();
            let v: Vec<f32> = (0..hdv * n_kv_heads).map(|_| rnd()).collect();
            kv.write(0, &table, p, &k, &v);
        }
        let rows = 7;
        let q: Vec<f32> = (0..rows * hd).map(|_| rnd() * 0.3).collect();
        let hi: Vec<usize> = (0..rows).map(|r| 40 + r * 6).collect();
        for window in [None, Some(20usize)] {
            let lo: Vec<usize> = hi.iter().map(|&p| window.map_or(0, |w| (p + 1).saturating_sub(w))).collect();
            for level in Kernels::available() {
                let kern = Kernels::for_level(level).unwrap();
                let keys = Keys { kv: &kv, layer: 0, table: &table, kvh: 1 };
                let tile = Tile { q: &q, lo: &lo, hi: &hi, hd, hdv };
                let mut out = vec![0f32; rows * hdv];
                run(kern, &tile, &keys, &mut Scratch::default(), &mut out);
                for r in 0..rows {
                    // f64 reference over the cached (f16-rounded) keys and values.
                    let qr = &q[r * hd..(r + 1) * hd];
                    let scores: Vec<f64> = (lo[r]..=hi[r])
                        .map(|j| {
                            let k = &kv.k_row(0, &table, j)[hd..2 * hd];
                            qr.iter().zip(k).map(|(&a, &b)| a as f64 * b.to_f64()).sum::<f64>()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for d in 0..hdv {
                        let want: f64 = (lo[r]..=hi[r])
                            .zip(&w)
                            .map(|(j, wj)| wj * kv.v_row(0, &table, j)[hdv + d].to_f64())
                            .sum::<f64>()
                            / z;
                        let got = out[r * hdv + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{level:?} window {window:?} row {r} dim {d}: {got} vs {want}"
                        );
                    }
                    // The same row alone in its own tile: bit-identical.
                    let one = Tile { q: qr, lo: &lo[r..r + 1], hi: &hi[r..r + 1], hd, hdv };
                    let mut o1 = vec![0f32; hdv];
                    run(kern, &one, &keys, &mut Scratch::default(), &mut o1);
                    assert!(
                        o1.iter().zip(&out[r * hdv..(r + 1) * hdv]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{level:?}: row {r} depends on its tile"
                    );
                }
            }
        }
    }

    /// The long-context decode kernel against the same f64 reference, every level:
    /// 1..9 query rows of one token, with and without a window, head sizes 64/128;
    /// each row alone gives the same bits as among the others.
    #[test]
    fn decode_attention_matches_reference() {
        for (hd, n_pos) in [(64usize, 300usize), (128, 70)] {
            let hdv = hd;
            let n_kv = 2;
            let shape = KvShape {
                n_layer: 1,
                kv_dim_k: hd * n_kv,
                kv_dim_v: hdv * n_kv,
                block_size: 16,
                n_blocks: n_pos.div_ceil(16),
            };
            let mut kv = KvCache::new(shape).unwrap();
            let table: Vec<u32> = (0..shape.n_blocks as u32).rev().collect();
            let mut seed = 777u64;
            let mut rnd = || {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            };
            for p in 0..n_pos {
                let k: Vec<f32> = (0..hd * n_kv).map(|_| rnd()).collect();
                let v: Vec<f32> = (0..hdv * n_kv).map(|_| rnd()).collect();
                kv.write(0, &table, p, &k, &v);
            }
            let q: Vec<f32> = (0..9 * hd).map(|_| rnd() * 0.2).collect();
            let hi = n_pos - 1;
            for lo in [0usize, 37] {
                for level in Kernels::available() {
                    let kern = Kernels::for_level(level).unwrap();
                    let keys = Keys { kv: &kv, layer: 0, table: &table, kvh: 1 };
                    for rows in [1usize, 4, 9] {
                        let mut out = vec![0f32; rows * hdv];
                        decode(kern, &q[..rows * hd], rows, lo, hi, hd, hdv, &keys, &mut Scratch::default(), &mut out);
                        for r in 0..rows {
                            let qr = &q[r * hd..(r + 1) * hd];
                            let scores: Vec<f64> = (lo..=hi)
                                .map(|j| {
                                    let k = &kv.k_row(0, &table, j)[hd..2 * hd];
                                    qr.iter().zip(k).map(|(&a, &b)| a as f64 * b.to_f64()).sum::<f64>()
                                })
                                .collect();
                            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                            let z: f64 = w.iter().sum();
                            for d in 0..hdv {
                                let want: f64 = (lo..=hi)
                                    .zip(&w)
                                    .map(|(j, wj)| wj * kv.v_row(0, &table, j)[hdv + d].to_f64())
                                    .sum::<f64>()
                                    / z;
                                let got = out[r * hdv + d] as f64;
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "{level:?} hd {hd} lo {lo} rows {rows} row {r} dim {d}: {got} vs {want}"
                                );
                            }
                            let mut o1 = vec![0f32; hdv];
                            decode(kern, qr, 1, lo, hi, hd, hdv, &keys, &mut Scratch::default(), &mut o1);
                            assert!(
                                o1.iter().zip(&out[r * hdv..(r + 1) * hdv]).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{level:?}: row {r} depends on the others"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exp16_matches_libm() {
        let mut worst = 0f32;
        for i in -2000..=200 {
            let mut x = [0f32; KB];
            for (l, v) in x.iter_mut().enumerate() {
                *v = (i as f32) * 0.0437 + l as f32 * 0.0013;
            }
            let want: Vec<f32> = x.iter().map(|v| v.exp()).collect();
            exp16(&mut x);
            for (g, w) in x.iter().zip(&want) {
                if *w > 1e-30 {
                    worst = worst.max(((g - w) / w).abs());
                }
            }
        }
        assert!(worst < 1e-6, "relative error {worst}");
        let mut x = [f32::NEG_INFINITY; KB];
        exp16(&mut x);
        assert!(x.iter().all(|&v| v == 0.0));
    }
}
