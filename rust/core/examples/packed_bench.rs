//! Single-thread throughput of the packed gemm (prompt tiles) at the SIMD levels this
//! CPU has, on Llama-3.2-1B's FFN shapes (2048 → 8192 and 8192 → 2048):
//!
//!     cargo run --release -p edgelm-core --example packed_bench [-- FORMAT...]
//!
//! Reports GOP/s (2·rows·cols·tokens) for 64 tokens (pp64) and 8, and weight GB/s for one.

use edgelm_core::quant::packed::{act_sums, sums_per_block, Packed};
use edgelm_core::quant::{GgmlType, Kernels, Level};
use std::time::{Duration, Instant};

fn rng_row(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Seconds per call: the best of 5 rounds of `budget / 5`.
fn time<F: FnMut()>(mut f: F, budget: Duration) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let mut iters = 0u32;
        while start.elapsed() < budget / 5 || iters == 0 {
            f();
            iters += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let formats: Vec<GgmlType> = [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q4_0, GgmlType::Q8_0]
        .into_iter()
        .filter(|t| args.is_empty() || args.iter().any(|a| a.eq_ignore_ascii_case(t.name())))
        .collect();
    let levels: Vec<Level> = Kernels::available().into_iter().filter(|&l| l != Level::Scalar).collect();
    let mut seed = 0x1234_5678_9abc_def1u64;
    let n_tok = 64;
    for &ty in &formats {
        for (n, rows) in [(2048, 8192), (8192, 2048)] {
            let wrb = ty.row_bytes(n).unwrap();
            let act = ty.vec_dot_type();
            let arb = act.row_bytes(n).unwrap();
            let mut w = vec![0u8; rows * wrb];
            for r in w.chunks_exact_mut(wrb) {
                edgelm_core::quant::quantize_row(ty, &rng_row(&mut seed, n), r);
            }
            let mut a = vec![0u8; n_tok * arb];
            for r in a.chunks_exact_mut(arb) {
                edgelm_core::quant::quantize_row(act, &rng_row(&mut seed, n), r);
            }
            let pw = Packed::new(ty, &w, rows, n).unwrap();
            let spb = pw.nb() * sums_per_block(ty);
            let mut sums = vec![0i16; n_tok * spb];
            for (t, s) in sums.chunks_exact_mut(spb).enumerate() {
                act_sums(ty, &a[t * arb..(t + 1) * arb], s);
            }
            let mut out = vec![0f32; rows * n_tok];
            let g = rows / 8;
            let mut line = format!("{:5} {:4}x{:<5}", ty.name(), n, rows);
            for &level in &levels {
                let k = Kernels::for_level(level).unwrap();
                let budget = Duration::from_millis(1000);
                let mv = time(|| k.gemm_packed(&pw, 0, g, &a[..arb], &sums[..spb], 1, &mut out, rows), budget);
                let t8 = time(|| k.gemm_packed(&pw, 0, g, &a[..8 * arb], &sums[..8 * spb], 8, &mut out, rows), budget);
                let t64 = time(|| k.gemm_packed(&pw, 0, g, &a, &sums, n_tok, &mut out, rows), budget);
                line += &format!(
                    " | {:>6}: mv {:5.1} GB/s, gemm8 {:6.1}, gemm64 {:6.1} GOP/s",
                    level.name(),
                    pw.n_bytes() as f64 / mv / 1e9,
                    16.0 * (rows * n) as f64 / t8 / 1e9,
                    2.0 * (rows * n * n_tok) as f64 / t64 / 1e9
                );
            }
            println!("{line}");
        }
    }
}
