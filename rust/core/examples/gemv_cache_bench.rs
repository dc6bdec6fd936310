//! The one-token (decode) matrix kernel on one thread, with the weights in cache and
//! in DRAM: how fast the core can consume weights when memory is not the limit, next to
//! the read bandwidth one thread gets. If the in-cache rate is not far above the DRAM
//! bound, the kernel's own instruction work is what keeps one thread from the bound.
//!
//!     cargo run --release -p edgelm-core --example gemv_cache_bench

use std::time::Instant;

use edgelm_core::quant::{GgmlType, Kernels};

fn main() {
    let k = Kernels::detect();
    let bw = edgelm_core::bench::read_bandwidth(1 << 30, 1, 5);
    println!("kernel level {}; one thread reads {:.1} GB/s from DRAM", k.level.name(), bw / 1e9);
    let cols = 576; // SmolLM2's width: the rows of q, k, v, gate, up
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
        let rb = ty.row_bytes(cols).unwrap();
        let act = ty.vec_dot_type();
        let mut xq = vec![0u8; act.row_bytes(cols).unwrap()];
        let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        k.quantize_row(act, &x, &mut xq);
        let mut row = vec![0u8; rb];
        let w: Vec<f32> = (0..cols).map(|i| ((i * 53 % 97) as f32 - 48.0) / 480.0).collect();
        k.quantize_row(ty, &w, &mut row);
        for bytes in [256usize << 10, 1 << 20, 512 << 20] {
            let rows = (bytes / rb) / 8 * 8;
            let wq: Vec<u8> = (0..rows).flat_map(|_| row.iter().copied()).collect();
            let mut out = vec![0f32; rows];
            let reps = ((2usize << 30) / wq.len()).max(3);
            k.gemm(ty, cols, &wq, rows, &xq, 1, &mut out, rows);
            // Best of five rounds: this is a shared VM, and other tenants only slow it.
            let mut gbs = 0f64;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    k.gemm(ty, cols, &wq, rows, &xq, 1, &mut out, rows);
                }
                gbs = gbs.max((wq.len() * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
            println!(
                "{ty:?} {:>9} KiB of weights: {gbs:6.1} GB/s ({:.0}% of the DRAM read bandwidth)",
                wq.len() >> 10,
                100.0 * gbs * 1e9 / bw
            );
        }
    }
}
