//! Unit tests of the scalar reference kernels: the type table, round-trip error bounds,
//! dot products against decoded rows, and unaligned rows. Bit-exactness against the
//! `gguf` Python package lives in `tests/quant_gguf_py.rs`.

// `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.80.
#![allow(clippy::needless_range_loop, clippy::manual_is_multiple_of)]

use super::*;
use half::{bf16, f16};
use std::mem::offset_of;

/// xorshift64*: tiny, deterministic, good enough to scatter test values (shared with
/// the dispatch tests).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly normal (Irwin–Hall of 4), with rare 8x outliers like real weights have.
    pub(crate) fn weight(&mut self) -> f32 {
        let g = (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 0.87;
        if self.next_u64() % 97 == 0 {
            g * 8.0
        } else {
            g
        }
    }
    pub(crate) fn row(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.weight()).collect()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// A finite f16 of random sign with magnitude in [1e-3, 2].
    fn scale_f16(&mut self) -> [u8; 2] {
        let mag = 1e-3 + (self.uniform() * 0.5 + 0.5) * 2.0;
        let s = if self.next_u64() & 1 == 0 { mag } else { -mag };
        f16::from_f32(s).to_le_bytes()
    }
}

fn row(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.weight()).collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quantize_row(ty, x, &mut out);
    out
}

/// Random raw blocks of `ty` (every quant pattern, including ones no quantizer emits),
/// with the scale fields forced to finite values so decoded rows are finite.
fn random_row_bytes(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    use GgmlType::*;
    let mut b = rng.bytes(ty.row_bytes(n).unwrap());
    let f16_fields: &[usize] = match ty {
        Q4_0 => &[offset_of!(BlockQ4_0, d)],
        Q4_1 => &[offset_of!(BlockQ4_1, d), offset_of!(BlockQ4_1, m)],
        Q5_0 => &[offset_of!(BlockQ5_0, d)],
        Q5_1 => &[offset_of!(BlockQ5_1, d), offset_of!(BlockQ5_1, m)],
        Q8_0 => &[offset_of!(BlockQ8_0, d)],
        Q8_1 => &[offset_of!(BlockQ8_1, d), offset_of!(BlockQ8_1, s)],
        Q2_K => &[offset_of!(BlockQ2_K, d), offset_of!(BlockQ2_K, dmin)],
        Q3_K => &[offset_of!(BlockQ3_K, d)],
        Q4_K => &[offset_of!(BlockQ4_K, d), offset_of!(BlockQ4_K, dmin)],
        Q5_K => &[offset_of!(BlockQ5_K, d), offset_of!(BlockQ5_K, dmin)],
        Q6_K => &[offset_of!(BlockQ6_K, d)],
        Q8_K | F32 | F16 | BF16 => &[],
    };
    match ty {
        F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.weight().to_le_bytes());
            }
        }
        F16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(rng.weight()).to_le_bytes());
            }
        }
        BF16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.weight()).to_le_bytes());
            }
        }
        Q8_K => {
            for c in b.chunks_exact_mut(ty.type_size()) {
                c[..4].copy_from_slice(&(rng.uniform() * 0.01).to_le_bytes());
            }
        }
        _ => {
            for c in b.chunks_exact_mut(ty.type_size()) {
                for &off in f16_fields {
                    c[off..off + 2].copy_from_slice(&rng.scale_f16());
                }
            }
        }
    }
    b
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

// ---- the type table -------------------------------------------------------------------

#[test]
fn type_table_matches_ggml() {
    use GgmlType::*;
    // (type, id, name, block_size, type_size) from ggml.c's type_traits.
    let table = [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 36),
        (Q2_K, 10, "Q2_K", 256, 84),
        (Q3_K, 11, "Q3_K", 256, 110),
        (Q4_K, 12, "Q4_K", 256, 144),
        (Q5_K, 13, "Q5_K", 256, 176),
        (Q6_K, 14, "Q6_K", 256, 210),
        (Q8_K, 15, "Q8_K", 256, 292),
        (BF16, 30, "BF16", 1, 2),
    ];
    assert_eq!(GgmlType::all().len(), table.len());
    for (t, &(ty, id, name, bs, ts)) in GgmlType::all().iter().zip(&table) {
        assert_eq!(*t, ty);
        assert_eq!(ty as u32, id);
        assert_eq!(GgmlType::from_u32(id), Some(ty));
        assert_eq!(ty.name(), name);
        assert_eq!(ty.to_string(), name);
        assert_eq!(ty.block_size(), bs, "{name}");
        assert_eq!(ty.type_size(), ts, "{name}");
        assert_eq!(ty.is_quantized(), bs > 1);
        // The activation format must tile rows the same way as the weights.
        assert_eq!(ty.vec_dot_type().block_size(), bs, "{name}");
    }
    // 4, 5 (removed Q4_2/Q4_3), IQ*, TQ*, I8…, and garbage.
    for id in [4, 5, 16, 17, 20, 23, 24, 29, 31, 34, 39, 40, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_u32(id), None, "id {id}");
    }
    assert_eq!(Q4_0.vec_dot_type(), Q8_0);
    assert_eq!(Q5_0.vec_dot_type(), Q8_0);
    assert_eq!(Q4_1.vec_dot_type(), Q8_1);
    assert_eq!(Q5_1.vec_dot_type(), Q8_1);
    assert_eq!(Q6_K.vec_dot_type(), Q8_K);
    assert_eq!(F16.vec_dot_type(), F16);
    assert_eq!(BF16.vec_dot_type(), BF16);
}

#[test]
fn row_bytes_rules() {
    use GgmlType::*;
    assert_eq!(F32.row_bytes(3), Some(12));
    assert_eq!(F16.row_bytes(7), Some(14));
    assert_eq!(Q4_0.row_bytes(0), Some(0));
    assert_eq!(Q4_0.row_bytes(64), Some(36));
    assert_eq!(Q4_0.row_bytes(33), None);
    assert_eq!(Q4_0.row_bytes(16), None);
    assert_eq!(Q4_K.row_bytes(4096), Some(16 * 144));
    assert_eq!(Q4_K.row_bytes(32), None);
    assert_eq!(Q6_K.row_bytes(255), None);
    // Overflow: a whole number of blocks whose byte count does not fit.
    assert_eq!(F32.row_bytes(usize::MAX / 2 + 1), None);
    assert_eq!(Q8_0.row_bytes((usize::MAX / 32) * 32), None);
    assert_eq!(Q8_K.row_bytes(usize::MAX), None);
}

#[test]
#[should_panic(expected = "needs")]
fn wrong_length_is_rejected() {
    let mut out = vec![0f32; 32];
    dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut out);
}

// ---- round trips ------------------------------------------------------------------------

/// (type, max RMS error / RMS of x, max |error| / amax of its 32 elements). The bounds
/// are about 1.5x the worst seen over 8 seeds of `Rng::weight` data, which has 8x
/// outliers: they widen blocks, so K-quants and Q8_K (one scale per 256) look worse
/// than on smooth data.
const ROUND_TRIP_BOUNDS: &[(GgmlType, f64, f64)] = &[
    (GgmlType::F32, 0.0, 0.0),
    (GgmlType::F16, 4e-4, 8e-4),
    (GgmlType::BF16, 3e-3, 6e-3),
    (GgmlType::Q8_0, 0.015, 0.007),
    (GgmlType::Q8_1, 0.015, 0.007),
    (GgmlType::Q8_K, 0.03, 0.006),
    (GgmlType::Q5_1, 0.075, 0.05),
    (GgmlType::Q5_0, 0.11, 0.09),
    (GgmlType::Q4_1, 0.15, 0.10),
    (GgmlType::Q4_0, 0.22, 0.19),
    (GgmlType::Q6_K, 0.04, 0.025),
    (GgmlType::Q5_K, 0.07, 0.045),
    (GgmlType::Q4_K, 0.15, 0.12),
    (GgmlType::Q3_K, 0.30, 0.24),
    (GgmlType::Q2_K, 0.50, 0.50),
];

#[test]
fn round_trip_error_bounds() {
    assert_eq!(ROUND_TRIP_BOUNDS.len(), GgmlType::all().len());
    let mut rng = Rng::new(1);
    let n = 8 * QK_K;
    for &(ty, rms_bound, max_bound) in ROUND_TRIP_BOUNDS {
        let x = row(&mut rng, n);
        let y = dequantize(ty, &quantize(ty, &x), n);
        let (mut se, mut sx) = (0f64, 0f64);
        let mut worst = 0f64;
        let bs = ty.block_size().max(32);
        for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            for (&a, &b) in xb.iter().zip(yb) {
                let e = (a as f64 - b as f64).abs();
                se += e * e;
                sx += (a as f64) * (a as f64);
                worst = worst.max(e / amax);
            }
        }
        let rel_rms = (se / sx).sqrt();
        assert!(rel_rms <= rms_bound, "{ty}: relative RMS error {rel_rms:.5} > {rms_bound}");
        assert!(worst <= max_bound, "{ty}: max error / block amax {worst:.5} > {max_bound}");
    }
}

#[test]
fn zeros_and_constants_decode_finite() {
    for &ty in GgmlType::all() {
        let n = QK_K;
        let zeros = dequantize(ty, &quantize(ty, &vec![0.0; n]), n);
        assert!(zeros.iter().all(|&v| v == 0.0), "{ty}: zeros decode to {zeros:?}");
        for c in [1.0f32, -0.25, 0.03] {
            let y = dequantize(ty, &quantize(ty, &vec![c; n]), n);
            for v in y {
                assert!((v - c).abs() <= c.abs() * 0.02, "{ty}: constant {c} decodes to {v}");
            }
        }
    }
}

#[test]
fn representable_values_round_trip_exactly() {
    // -4..=3.5 in steps of 0.5: Q4_0 picks d = -4 / -8 = 0.5, Q4_1 d = 7.5 / 15 = 0.5 and
    // m = -4, and both must then find exactly these quants.
    let x: Vec<f32> = (0..32).map(|i| 0.5 * (i % 16) as f32 - 4.0).collect();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        assert_eq!(dequantize(ty, &quantize(ty, &x), 32), x, "{ty}");
    }
    // Integers with amax 127: Q8_0 picks d = 1.
    let x: Vec<f32> = (0..32).map(|i| (i * 8 - 121) as f32).collect();
    assert_eq!(dequantize(GgmlType::Q8_0, &quantize(GgmlType::Q8_0, &x), 32), x);
}

#[test]
fn activation_blocks_carry_consistent_sums() {
    let mut rng = Rng::new(2);
    let x = row(&mut rng, 2 * QK_K);
    let q8k = quantize(GgmlType::Q8_K, &x);
    for b in blocks::blocks::<BlockQ8_K>(&q8k) {
        for j in 0..16 {
            let s: i32 = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(b.bsums[j] as i32, s);
        }
        assert!(b.qs.iter().all(|&q| q >= -127), "Q8_K uses -127..=127");
    }
    let q81 = quantize(GgmlType::Q8_1, &x);
    for b in blocks::blocks::<BlockQ8_1>(&q81) {
        // s = f16(d·Σq) from the unrounded d, so only ≈ the stored f16 d times Σq.
        let s: i32 = b.qs.iter().map(|&q| q as i32).sum();
        let want = s as f32 * b.d.to_f32();
        assert!((b.s.to_f32() - want).abs() <= want.abs() * 2e-3, "s {} vs {want}", b.s);
    }
}

#[test]
fn bf16_rounds_to_nearest_even_and_keeps_nan() {
    let cases: [(u32, u16); 5] = [
        (0x3f80_8000, 0x3f80), // tie, even stays
        (0x3f81_8000, 0x3f82), // tie, odd rounds up
        (0x3f80_8001, 0x3f81), // above the tie
        (0x7f80_0001, 0x7fc0), // signalling NaN becomes quiet, not infinity
        (0xff7f_ffff, 0xff80), // rounds to -inf, as ggml does
    ];
    for (x, want) in cases {
        let mut out = [0u8; 2];
        quantize_row(GgmlType::BF16, &[f32::from_bits(x)], &mut out);
        assert_eq!(u16::from_le_bytes(out), want, "{x:#x}");
    }
}

// ---- dot products ---------------------------------------------------------------------

/// (weight type, bound on |vec_dot - Σ w·x| / Σ|w||x|, where x is the unquantized
/// activation). Dominated by the activation's quantization error; about 1.5x the worst
/// seen over 8 seeds.
const DOT_BOUNDS: &[(GgmlType, f64)] = &[
    (GgmlType::F32, 1e-7),
    (GgmlType::F16, 1e-4),
    (GgmlType::BF16, 5e-4),
    (GgmlType::Q4_0, 3e-3),
    (GgmlType::Q4_1, 3e-3),
    (GgmlType::Q5_0, 3e-3),
    (GgmlType::Q5_1, 3e-3),
    (GgmlType::Q8_0, 3e-3),
    (GgmlType::Q8_1, 3e-3),
    (GgmlType::Q2_K, 6e-3),
    (GgmlType::Q3_K, 6e-3),
    (GgmlType::Q4_K, 6e-3),
    (GgmlType::Q5_K, 6e-3),
    (GgmlType::Q6_K, 6e-3),
    (GgmlType::Q8_K, 6e-3),
];

#[test]
fn vec_dot_matches_dequantized_dot() {
    assert_eq!(DOT_BOUNDS.len(), GgmlType::all().len());
    let mut rng = Rng::new(3);
    let n = 4 * QK_K;
    for &(ty, bound) in DOT_BOUNDS {
        let at = ty.vec_dot_type();
        // Weights both from the quantizer and as raw random blocks (all quant patterns).
        let weights = [quantize(ty, &row(&mut rng, n)), random_row_bytes(&mut rng, ty, n)];
        for (k, w) in weights.iter().enumerate() {
            let x = row(&mut rng, n);
            let a = quantize(at, &x);
            let got = vec_dot(ty, n, w, &a) as f64;
            let wd = dequantize(ty, w, n);
            let ad = dequantize(at, &a, n);

            // Against the decoded activation: only float rounding separates the two,
            // plus for Q8_1 the f16 rounding of its stored sum `s` (which the Q4_1/Q5_1
            // dots use for the mins term instead of d·Σq).
            let exact: f64 = wd.iter().zip(&ad).map(|(&p, &q)| p as f64 * q as f64).sum();
            let mag: f64 = wd.iter().zip(&ad).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            let tight = if at == GgmlType::Q8_1 { 5e-4 } else { 1e-6 };
            assert!(
                (got - exact).abs() <= tight * mag,
                "{ty} (weights #{k}): vec_dot {got} vs decoded dot {exact} (Σ|wa| {mag})"
            );

            // Against the unquantized activation: the per-format tolerance.
            let ideal: f64 = wd.iter().zip(&x).map(|(&p, &q)| p as f64 * q as f64).sum();
            let mag: f64 = wd.iter().zip(&x).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            assert!(
                (got - ideal).abs() <= bound * mag,
                "{ty} (weights #{k}): vec_dot {got} vs f32 dot {ideal}: rel {} > {bound}",
                (got - ideal).abs() / mag
            );
        }
    }
}

// ---- alignment --------------------------------------------------------------------------

#[test]
fn unaligned_rows_match_aligned() {
    let mut rng = Rng::new(4);
    let n = 2 * QK_K;
    for &ty in GgmlType::all() {
        let at = ty.vec_dot_type();
        let x = row(&mut rng, n);
        let w = random_row_bytes(&mut rng, ty, n);
        let a = quantize(at, &x);
        let want_deq = dequantize(ty, &w, n);
        let want_dot = vec_dot(ty, n, &w, &a);
        let want_q = quantize(ty, &x);
        for off in [1usize, 3, 5] {
            let mut wbuf = vec![0u8; off + w.len()];
            wbuf[off..].copy_from_slice(&w);
            let mut abuf = vec![0u8; off + a.len()];
            abuf[off..].copy_from_slice(&a);
            let (wu, au) = (&wbuf[off..], &abuf[off..]);

            assert!(bits_eq(&dequantize(ty, wu, n), &want_deq), "{ty} dequantize at +{off}");
            assert_eq!(vec_dot(ty, n, wu, au).to_bits(), want_dot.to_bits(), "{ty} vec_dot at +{off}");

            let mut qbuf = vec![0u8; off + want_q.len()];
            quantize_row(ty, &x, &mut qbuf[off..]);
            assert_eq!(&qbuf[off..], &want_q[..], "{ty} quantize_row at +{off}");
        }
    }
}
