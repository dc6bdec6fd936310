//! Single-thread throughput of the quantized kernels at every level this CPU has.
//!
//!     cargo run --release -p edgelm-core --example kernel_bench [-- FORMAT...]
//!
//! Matvec (one token: decode) reports weight GB/s; gemm with 128 tokens (prompt)
//! reports GOP/s (2·rows·n·tokens), as does gemm with 4 tokens (batched decode). Shapes are SmolLM2-135M's (576 → 1536; 1536 → 576 for K-quants) and a
//! larger 2048 → 8192 whose weights do not fit in L2.

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

/// Seconds per call: repeats until `budget` has passed, keeps the best of 3 rounds.
fn time<F: FnMut()>(mut f: F, budget: Duration) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut iters = 0u32;
        while start.elapsed() < budget / 3 || iters == 0 {
            f();
            iters += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let formats: Vec<GgmlType> = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ]
    .into_iter()
    .filter(|t| args.is_empty() || args.iter().any(|a| a.eq_ignore_ascii_case(t.name())))
    .collect();
    let levels = Kernels::available();
    println!("levels: {:?}", levels.iter().map(|l| l.name()).collect::<Vec<_>>());
    let n_tok_gemm = 128;
    let mut seed = 0x1234_5678_9abc_def1u64;
    // Activation quantization, one 2048-float row.
    let x = rng_row(&mut seed, 2048);
    for act in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let mut q = vec![0u8; act.row_bytes(x.len()).unwrap()];
        let mut line = format!("quantize {:4} 2048", act.name());
        for &level in &levels {
            let k = Kernels::for_level(level).unwrap();
            let t = time(|| k.quantize_row(act, &x, &mut q), Duration::from_millis(200));
            line += &format!(" | {:>6}: {:7.1} ns", level.name(), t * 1e9);
        }
        println!("{line}");
    }
    for &ty in &formats {
        // K-quant rows need n % 256 == 0: SmolLM2's 1536 → 576 (ffn_down) instead.
        let shapes = if ty.block_size() == 256 { [(1536, 576), (2048, 8192)] } else { [(576, 1536), (2048, 8192)] };
        for (n, rows) in shapes {
            let wrb = ty.row_bytes(n).unwrap();
            let act = ty.vec_dot_type();
            let arb = act.row_bytes(n).unwrap();
            let mut w = vec![0u8; rows * wrb];
            for r in w.chunks_exact_mut(wrb) {
                edgelm_core::quant::quantize_row(ty, &rng_row(&mut seed, n), r);
            }
            let mut a = vec![0u8; n_tok_gemm * arb];
            for r in a.chunks_exact_mut(arb) {
                edgelm_core::quant::quantize_row(act, &rng_row(&mut seed, n), r);
            }
            let mut out = vec![0f32; rows * n_tok_gemm];
            let mut line = format!("{:5} {:4}x{:<5}", ty.name(), n, rows);
            for &level in &levels {
                let k = Kernels::for_level(level).unwrap();
                let budget = Duration::from_millis(if level == Level::Scalar { 300 } else { 600 });
                let t1 = time(|| k.gemm(ty, n, &w, rows, &a[..arb], 1, &mut out, rows), budget);
                let gbs = (rows * wrb) as f64 / t1 / 1e9;
                let tg = if level == Level::Scalar && rows * n > 1 << 20 {
                    f64::NAN // minutes of scalar work; skip
                } else {
                    time(|| k.gemm(ty, n, &w, rows, &a, n_tok_gemm, &mut out, rows), budget)
                };
                let gops = 2.0 * (rows * n * n_tok_gemm) as f64 / tg / 1e9;
                let t4 = time(|| k.gemm(ty, n, &w, rows, &a[..4 * arb], 4, &mut out, rows), budget);
                line += &format!(
                    " | {:>6}: mv {:5.1} GB/s, gemm4 {:5.1}, gemm128 {:5.1} GOP/s",
                    level.name(),
                    gbs,
                    8.0 * (rows * n) as f64 / t4 / 1e9,
                    gops
                );
            }
            println!("{line}");
            // The packed layout (quant::packed), where the type has one.
            if let Some(pw) = edgelm_core::quant::packed::Packed::new(ty, &w, rows, n) {
                let spb = pw.nb() * edgelm_core::quant::packed::sums_per_block(ty);
                let mut sums = vec![0i16; n_tok_gemm * spb];
                for (t, s) in sums.chunks_exact_mut(spb).enumerate() {
                    edgelm_core::quant::packed::act_sums(ty, &a[t * arb..(t + 1) * arb], s);
                }
                let g = rows / 8;
                let mut line = format!("{:5} {:4}x{:<5} packed", ty.name(), n, rows);
                for &level in &levels {
                    let k = Kernels::for_level(level).unwrap();
                    let budget = Duration::from_millis(if level == Level::Scalar { 300 } else { 600 });
                    let mv = time(|| k.gemm_packed(&pw, 0, g, &a[..arb], &sums[..spb], 1, &mut out, rows), budget);
                    let t4 =
                        time(|| k.gemm_packed(&pw, 0, g, &a[..4 * arb], &sums[..4 * spb], 4, &mut out, rows), budget);
                    let t16 = time(
                        || k.gemm_packed(&pw, 0, g, &a[..16 * arb], &sums[..16 * spb], 16, &mut out, rows),
                        budget,
                    );
                    let t128 = if level == Level::Scalar {
                        f64::NAN
                    } else {
                        time(|| k.gemm_packed(&pw, 0, g, &a, &sums, n_tok_gemm, &mut out, rows), budget)
                    };
                    line += &format!(
                        " | {:>6}: mv {:5.1} GB/s, gemm4 {:5.1}, gemm16 {:5.1}, gemm128 {:5.1} GOP/s",
                        level.name(),
                        pw.n_bytes() as f64 / mv / 1e9,
                        8.0 * (rows * n) as f64 / t4 / 1e9,
                        32.0 * (rows * n) as f64 / t16 / 1e9,
                        2.0 * (rows * n * n_tok_gemm) as f64 / t128 / 1e9
                    );
                }
                println!("{line}");
            }
        }
    }
}
