//! Every SIMD kernel against its scalar twin (`quant::vec_dot`, `quant::quantize_row`)
//! and against an f64 dot of the decoded rows, at every level this CPU has.
//!
//! Tolerances are relative to `Σ|w_i·a_i|` (the size of the terms, so a row whose dot
//! cancels to ~0 is not held to a relative bound it cannot meet). Integer block sums are
//! exact at every level; what differs is float rounding of the per-block scaling (fused
//! multiply-adds, 8 lanes instead of one chain), so the SIMD-vs-scalar bound is a few
//! f32 ulps per block. Against the f64 dot of the decoded rows the scalar reference
//! itself is off by f16 rounding where the format stores a rounded sum (Q8_1's
//! `s = f16(d·Σq)`), hence the looser Q4_1/Q5_1 column, relative to Σ|w·a| + Σ|m·s|.

// `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.80.
#![allow(clippy::needless_range_loop, clippy::manual_is_multiple_of)]

use super::*;
use crate::quant::{dequantize, quantize_row as ref_quantize_row, vec_dot as ref_vec_dot};
use std::mem::offset_of;

/// (format, vs scalar twin, vs f64 of the decoded rows), both × Σ|w·a|.
const TOLERANCE: &[(GgmlType, f64, f64)] = &[
    (GgmlType::Q4_0, 1e-5, 1e-5),
    (GgmlType::Q4_1, 1e-5, 1e-3),
    (GgmlType::Q5_0, 1e-5, 1e-5),
    (GgmlType::Q5_1, 1e-5, 1e-3),
    (GgmlType::Q8_0, 1e-5, 1e-5),
    (GgmlType::Q2_K, 1e-5, 1e-5),
    (GgmlType::Q3_K, 1e-5, 1e-5),
    (GgmlType::Q4_K, 1e-5, 1e-5),
    (GgmlType::Q5_K, 1e-5, 1e-5),
    (GgmlType::Q6_K, 1e-5, 1e-5),
    (GgmlType::Q8_1, 1e-5, 1e-5),
    (GgmlType::Q8_K, 1e-5, 1e-5),
    // Float rows: the SIMD dots sum in f32 over 4×8 lanes (as ggml's do), the scalar
    // twin in f64; about 70 terms per lane at n = 2080, each rounding by ≤ 2^-24.
    (GgmlType::F32, 1e-5, 1e-5),
    (GgmlType::F16, 1e-5, 1e-5),
    (GgmlType::BF16, 1e-5, 1e-5),
];

fn tol(ty: GgmlType) -> (f64, f64) {
    let &(_, s, f) = TOLERANCE.iter().find(|(t, _, _)| *t == ty).expect("type in table");
    (s, f)
}

/// Formats with SIMD kernels at every level (the rest must still be right: fallback).
const SIMD_TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Row lengths: block-sized, model-sized (576 SmolLM2 hidden, 1536 its FFN), and
/// 2048+32 / 2304, which leave a partial 1024-element panel chunk.
fn lengths(ty: GgmlType) -> Vec<usize> {
    if ty.block_size() == 256 {
        vec![256, 512, 1536, 2304]
    } else if ty.block_size() == 1 {
        // Float rows also take lengths that leave a tail after the 8-lane loop.
        vec![7, 45, 64, 576, 1536, 2080]
    } else {
        vec![32, 64, 256, 576, 1536, 2080]
    }
}

use crate::quant::tests::Rng;

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    ref_quantize_row(ty, x, &mut out);
    out
}

/// Random raw blocks (every quant pattern, including ones no encoder emits) with finite
/// f16 scale fields; for types without a layout here, an encoded random row.
fn raw_row(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    use crate::quant::*;
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 => &[offset_of!(BlockQ4_0, d)],
        GgmlType::Q4_1 => &[offset_of!(BlockQ4_1, d), offset_of!(BlockQ4_1, m)],
        GgmlType::Q5_0 => &[offset_of!(BlockQ5_0, d)],
        GgmlType::Q5_1 => &[offset_of!(BlockQ5_1, d), offset_of!(BlockQ5_1, m)],
        GgmlType::Q8_0 => &[offset_of!(BlockQ8_0, d)],
        GgmlType::Q2_K => &[offset_of!(BlockQ2_K, d), offset_of!(BlockQ2_K, dmin)],
        GgmlType::Q3_K => &[offset_of!(BlockQ3_K, d)],
        GgmlType::Q4_K => &[offset_of!(BlockQ4_K, d), offset_of!(BlockQ4_K, dmin)],
        GgmlType::Q5_K => &[offset_of!(BlockQ5_K, d), offset_of!(BlockQ5_K, dmin)],
        GgmlType::Q6_K => &[offset_of!(BlockQ6_K, d)],
        _ => return quantize(ty, &rng.row(n)),
    };
    let mut b: Vec<u8> = (0..ty.row_bytes(n).unwrap()).map(|_| rng.next_u64() as u8).collect();
    for blk in b.chunks_exact_mut(ty.type_size()) {
        for &off in fields {
            let mag = 1e-3 + (rng.uniform() * 0.5 + 0.5) * 0.05;
            let s = if rng.next_u64() & 1 == 0 { mag } else { -mag };
            blk[off..off + 2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
        }
    }
    b
}

/// f64 dot of the decoded rows and `Σ|w_i·a_i|`.
fn f64_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
    let wf = dequantize(ty, w, n);
    let af = dequantize(ty.vec_dot_type(), a, n);
    let mut dot = 0f64;
    let mut mag = 0f64;
    for (x, y) in wf.iter().zip(&af) {
        dot += *x as f64 * *y as f64;
        mag += (*x as f64 * *y as f64).abs();
    }
    if ty.vec_dot_type() == GgmlType::Q8_1 {
        // The dots use the stored s = f16(d·Σq) for the m term; its rounding is
        // relative to |m·s|, which Σ|w·a| does not bound when d·q cancels m.
        let (wb, ab) = (ty.type_size(), GgmlType::Q8_1.type_size());
        for (x, y) in w.chunks_exact(wb).zip(a.chunks_exact(ab)) {
            let m = f16::from_le_bytes([x[2], x[3]]).to_f64();
            let s = f16::from_le_bytes([y[2], y[3]]).to_f64();
            mag += (m * s).abs();
        }
    }
    (dot, mag)
}

fn kernels() -> Vec<&'static Kernels> {
    Kernels::available().into_iter().map(|l| Kernels::for_level(l).expect("available level")).collect()
}

/// Lists the levels this run exercises (scripts/test_arm.sh greps this line).
#[test]
fn levels_that_ran() {
    let names: Vec<&str> = Kernels::available().iter().map(|l| l.name()).collect();
    println!("kernel levels tested: {}", names.join(" "));
    assert_eq!(Kernels::available()[0], Level::Scalar);
    let best = Kernels::detect().level;
    assert!(Kernels::available().contains(&best));
    for l in ALL_LEVELS {
        assert_eq!(Level::parse(l.name()), Some(l));
        assert_eq!(Level::parse(&l.name().to_uppercase()), Some(l));
        assert_eq!(Kernels::for_level(l).is_some(), Kernels::available().contains(&l));
    }
    assert_eq!(Level::parse("neon-dotprod"), Some(Level::NeonDotprod));
    assert_eq!(Level::parse("sse4"), None);
    if std::env::var(LEVEL_ENV).is_err() {
        assert_eq!(best, *Kernels::available().last().unwrap());
    }
}

#[test]
fn quantize_row_is_bit_identical() {
    let mut rng = Rng::new(11);
    let acts = [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::F16, GgmlType::BF16, GgmlType::F32];
    for k in kernels() {
        for ty in acts {
            for n in [256usize, 512, 2304] {
                let mut x = rng.row(n);
                // Edge cases: an all-zero block, a block whose extreme is negative and
                // repeated with both signs, and exact ties for the rounding.
                x[..32].fill(0.0);
                for v in &mut x[32..64] {
                    *v = (rng.next_u64() % 255) as f32 - 127.0;
                }
                x[40] = -127.0;
                x[41] = 127.0;
                for (i, v) in x[64..96].iter_mut().enumerate() {
                    *v = (i as f32 - 16.0) + 0.5;
                }
                x[70] = -15.5;
                let want = quantize(ty, &x);
                let mut got = vec![0xAAu8; want.len()];
                k.quantize_row(ty, &x, &mut got);
                assert!(got == want, "{} quantize_row {ty} n={n} differs from the reference", k.level);
            }
        }
    }
}

fn check_dot(level: Level, ty: GgmlType, n: usize, w: &[u8], a: &[u8], got: f32, what: &str) {
    let (ts, tf) = tol(ty);
    let want = ref_vec_dot(ty, n, w, a) as f64;
    let (exact, mag) = f64_dot(ty, n, w, a);
    let g = got as f64;
    assert!(
        (g - want).abs() <= ts * mag + 1e-30,
        "{level} {what} {ty} n={n}: {g} vs scalar {want} (Σ|wa| {mag}, tol {ts})"
    );
    assert!(
        (g - exact).abs() <= tf * mag + 1e-30,
        "{level} {what} {ty} n={n}: {g} vs f64 {exact} (Σ|wa| {mag}, tol {tf})"
    );
}

#[test]
fn vec_dot_matches_scalar_and_f64() {
    let mut rng = Rng::new(5);
    for k in kernels() {
        for &ty in GgmlType::all() {
            for n in lengths(ty) {
                for raw in [false, true] {
                    let w = if raw { raw_row(&mut rng, ty, n) } else { quantize(ty, &rng.row(n)) };
                    let a = quantize(ty.vec_dot_type(), &rng.row(n));
                    let got = k.vec_dot(ty, n, &w, &a);
                    check_dot(k.level, ty, n, &w, &a, got, if raw { "vec_dot(raw)" } else { "vec_dot" });
                }
            }
        }
    }
}

#[test]
fn gemm_matches_scalar_and_f64() {
    let mut rng = Rng::new(7);
    let rows: &[usize] = &[1, 3, 5, 8, 17];
    let toks: &[usize] = &[1, 2, 3, 5, 9, 17];
    let types: Vec<GgmlType> =
        SIMD_TYPES.iter().copied().chain([GgmlType::Q3_K, GgmlType::F16, GgmlType::F32]).collect();
    for k in kernels() {
        for &ty in &types {
            for n in lengths(ty) {
                let wrb = ty.row_bytes(n).unwrap();
                let arb = ty.vec_dot_type().row_bytes(n).unwrap();
                let max_r = *rows.last().unwrap();
                let max_t = *toks.last().unwrap();
                let w: Vec<u8> = (0..max_r)
                    .flat_map(|r| if r % 2 == 0 { raw_row(&mut rng, ty, n) } else { quantize(ty, &rng.row(n)) })
                    .collect();
                let a: Vec<u8> = (0..max_t).flat_map(|_| quantize(ty.vec_dot_type(), &rng.row(n))).collect();
                for &nr in rows {
                    for &nt in toks {
                        let stride = nr + 3;
                        let mut out = vec![f32::NAN; nt * stride];
                        k.gemm(ty, n, &w[..nr * wrb], nr, &a[..nt * arb], nt, &mut out, stride);
                        for t in 0..nt {
                            for r in 0..stride {
                                let got = out[t * stride + r];
                                if r >= nr {
                                    assert!(got.is_nan(), "{} gemm {ty} wrote outside its rows", k.level);
                                    continue;
                                }
                                let (wr, at) = (&w[r * wrb..(r + 1) * wrb], &a[t * arb..(t + 1) * arb]);
                                let what = format!("gemm rows={nr} toks={nt} (r={r}, t={t})");
                                check_dot(k.level, ty, n, wr, at, got, &what);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A token's result from the panel does not depend on the other tokens in it, and
/// where `single_token_matches_panel` says so, equals the one-token kernel's bit for
/// bit (the serving executor's batching guarantee rests on both).
#[test]
fn token_results_do_not_depend_on_the_batch() {
    let mut rng = Rng::new(11);
    let types: Vec<GgmlType> =
        SIMD_TYPES.iter().copied().chain([GgmlType::Q3_K, GgmlType::F16, GgmlType::F32]).collect();
    for k in kernels() {
        for &ty in &types {
            for n in lengths(ty) {
                let arb = ty.vec_dot_type().row_bytes(n).unwrap();
                for nr in [1usize, 7, 8, 9, 24, 33] {
                    let w: Vec<u8> = (0..nr).flat_map(|_| quantize(ty, &rng.row(n))).collect();
                    let nt = 11;
                    let a: Vec<u8> = (0..nt).flat_map(|_| quantize(ty.vec_dot_type(), &rng.row(n))).collect();
                    let mut all = vec![0f32; nt * nr];
                    k.gemm(ty, n, &w, nr, &a, nt, &mut all, nr);
                    for t in 0..nt {
                        let at = &a[t * arb..(t + 1) * arb];
                        // In a two-token panel with a different partner.
                        let partner = &a[((t + 1) % nt) * arb..((t + 1) % nt + 1) * arb];
                        let pair: Vec<u8> = at.iter().chain(partner).copied().collect();
                        let mut two = vec![0f32; 2 * nr];
                        k.gemm(ty, n, &w, nr, &pair, 2, &mut two, nr);
                        assert!(
                            bits_eq(&two[..nr], &all[t * nr..(t + 1) * nr]),
                            "{} {ty} n={n} rows={nr}: panel token {t} depends on its batch",
                            k.level
                        );
                        if k.single_token_matches_panel(ty) {
                            let mut one = vec![0f32; nr];
                            k.gemm_exact(ty, n, &w, nr, at, 1, &mut one, nr);
                            assert!(
                                bits_eq(&one, &all[t * nr..(t + 1) * nr]),
                                "{} {ty} n={n} rows={nr}: one-token kernel differs from the panel",
                                k.level
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Rows at every byte offset give bit-identical results (no alignment assumptions).
#[test]
fn unaligned_inputs_give_identical_results() {
    let mut rng = Rng::new(9);
    for k in kernels() {
        for ty in SIMD_TYPES {
            let n = if ty.block_size() == 256 { 512 } else { 96 };
            let (nr, nt) = (5, 3);
            let wrb = ty.row_bytes(n).unwrap();
            let arb = ty.vec_dot_type().row_bytes(n).unwrap();
            let w: Vec<u8> = (0..nr).flat_map(|_| quantize(ty, &rng.row(n))).collect();
            let a: Vec<u8> = (0..nt).flat_map(|_| quantize(ty.vec_dot_type(), &rng.row(n))).collect();
            let mut base = vec![0f32; nt * nr];
            k.gemm(ty, n, &w, nr, &a, nt, &mut base, nr);
            let base_dot = k.vec_dot(ty, n, &w[..wrb], &a[..arb]);
            let x: Vec<f32> = rng.row(n);
            let mut qbase = vec![0u8; arb];
            k.quantize_row(ty.vec_dot_type(), &x, &mut qbase);
            for off in 1..4 {
                let mut wbuf = vec![0u8; w.len() + off];
                wbuf[off..].copy_from_slice(&w);
                let mut abuf = vec![0u8; a.len() + off];
                abuf[off..].copy_from_slice(&a);
                let mut out = vec![0f32; nt * nr + 1];
                k.gemm(ty, n, &wbuf[off..], nr, &abuf[off..], nt, &mut out[1..], nr);
                assert!(bits_eq(&out[1..], &base), "{} gemm {ty} at offset {off}", k.level);
                let d = k.vec_dot(ty, n, &wbuf[off..off + wrb], &abuf[off..off + arb]);
                assert_eq!(d.to_bits(), base_dot.to_bits(), "{} vec_dot {ty} at offset {off}", k.level);
                let mut xbuf = vec![0f32; n + 1];
                xbuf[1..].copy_from_slice(&x);
                let mut qbuf = vec![0u8; arb + off];
                k.quantize_row(ty.vec_dot_type(), &xbuf[1..], &mut qbuf[off..]);
                assert!(qbuf[off..] == qbase[..], "{} quantize_row at offset {off}", k.level);
            }
        }
    }
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn f16_helpers_match_scalar() {
    let mut rng = Rng::new(13);
    for k in kernels() {
        for n in [0usize, 1, 7, 8, 31, 32, 33, 100, 257] {
            let a = rng.row(n);
            let bf: Vec<f16> = rng.row(n).iter().map(|&v| f16::from_f32(v)).collect();
            let want: f64 = a.iter().zip(&bf).map(|(x, y)| *x as f64 * y.to_f64()).sum();
            let mag: f64 = a.iter().zip(&bf).map(|(x, y)| (*x as f64 * y.to_f64()).abs()).sum();
            let got = k.dot_f32_f16(&a, &bf) as f64;
            assert!((got - want).abs() <= 1e-6 * mag + 1e-30, "{} dot_f32_f16 n={n}", k.level);

            let mut y = rng.row(n);
            let mut y_ref = y.clone();
            k.axpy_f16(&mut y, 0.37, &bf);
            for (yr, x) in y_ref.iter_mut().zip(&bf) {
                *yr += 0.37 * x.to_f32();
            }
            for (g, w) in y.iter().zip(&y_ref) {
                assert!((g - w).abs() <= 1e-6 * (w.abs() + 1.0), "{} axpy_f16 n={n}", k.level);
            }

            let mut back = vec![0f32; n];
            k.f16_to_f32_row(&bf, &mut back);
            assert!(back.iter().zip(&bf).all(|(x, y)| x.to_bits() == y.to_f32().to_bits()));
            let mut h = vec![f16::ZERO; n];
            k.f32_to_f16_row(&a, &mut h);
            assert!(h.iter().zip(&a).all(|(x, y)| x.to_bits() == f16::from_f32(*y).to_bits()));
        }
    }
}

/// The packed layout (`quant::packed`): every level bit-identical to the scalar twin
/// `packed::gemm_ref` for every token count (tiles of 8, 4, 2, 1 mixed; more than one
/// tile takes the decoded-group path of the x86 K-quants), each (row, token) within the
/// table's bounds of the file layout's scalar dot and of the f64 dot of the decoded
/// rows, results independent of the batch, and packed rows decoding to the file rows'
/// values.
#[test]
fn packed_gemm_matches_twin_and_file_layout() {
    use crate::quant::packed::{self, Packed};
    let mut rng = Rng::new(11);
    for &ty in &[GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q4_0, GgmlType::Q8_0] {
        let lens: &[usize] = if ty.block_size() == 256 { &[256, 512, 2304] } else { &[32, 96, 2080] };
        for &n in lens {
            let rows = 24;
            let wrb = ty.row_bytes(n).unwrap();
            let w: Vec<u8> = (0..rows)
                .flat_map(|i| if i % 2 == 0 { raw_row(&mut rng, ty, n) } else { quantize(ty, &rng.row(n)) })
                .collect();
            let p = Packed::new(ty, &w, rows, n).expect("packs");
            for r in [0, 5, 13, 23] {
                let mut got = vec![0f32; n];
                p.dequantize_row(r, &mut got);
                assert!(bits_eq(&got, &dequantize(ty, &w[r * wrb..(r + 1) * wrb], n)), "{ty} row {r} decodes");
            }
            let spb = p.nb() * packed::sums_per_block(ty);
            let n_tok = 21;
            let act = ty.vec_dot_type();
            let arb = act.row_bytes(n).unwrap();
            let a: Vec<u8> = (0..n_tok).flat_map(|_| quantize(act, &rng.row(n))).collect();
            let mut sums = vec![0i16; n_tok * spb];
            for t in 0..n_tok {
                packed::act_sums(ty, &a[t * arb..(t + 1) * arb], &mut sums[t * spb..(t + 1) * spb]);
            }
            let mut want = vec![0f32; n_tok * rows];
            packed::gemm_ref(ty, p.nb(), p.groups(0, rows / 8), &a, &sums, n_tok, &mut want, rows);
            for t in 0..n_tok {
                for r in 0..rows {
                    let at = &a[t * arb..(t + 1) * arb];
                    check_dot(Level::Scalar, ty, n, &w[r * wrb..(r + 1) * wrb], at, want[t * rows + r], "packed twin");
                }
            }
            for k in kernels() {
                // 9 and up: the K-quants' prompt shape (a group decoded once for its tiles).
                for nt in [1, 2, 3, 4, 5, 8, 9, 15, 16, 21] {
                    let mut got = vec![f32::NAN; nt * rows];
                    k.gemm_packed(&p, 0, rows / 8, &a[..nt * arb], &sums[..nt * spb], nt, &mut got, rows);
                    assert!(bits_eq(&got, &want[..nt * rows]), "{} packed {ty} n={n} n_tok={nt}", k.level);
                }
                // A slice of the groups, written with a wider stride.
                let mut got = vec![0f32; 3 * 40];
                k.gemm_packed(&p, 1, 3, &a[..3 * arb], &sums[..3 * spb], 3, &mut got, 40);
                for t in 0..3 {
                    assert!(
                        bits_eq(&got[t * 40..t * 40 + 16], &want[t * rows + 8..t * rows + 24]),
                        "{} groups 1..3",
                        k.level
                    );
                }
            }
        }
    }
}
