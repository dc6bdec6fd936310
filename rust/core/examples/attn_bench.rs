//! Decode attention alone, one thread: a token of a Llama-3.2-1B-shaped layer (8 KV
//! heads of 64, 4 query heads each) against 4,096 cached keys, per kernel level.
//!
//!     cargo run --release -p edgelm-core --example attn_bench [-- LEVEL...]
use edgelm_core::kv::{KvCache, KvShape};
use edgelm_core::model::attn::{decode, Keys, Scratch};
use edgelm_core::quant::Kernels;
use std::time::Instant;

fn main() {
    let (hd, n_kv, group, n_pos) = (64usize, 8usize, 4usize, 4096usize);
    let shape = KvShape { n_layer: 1, kv_dim_k: hd * n_kv, kv_dim_v: hd * n_kv, block_size: 16, n_blocks: n_pos / 16 };
    let mut kv = KvCache::new(shape).unwrap();
    let table: Vec<u32> = (0..shape.n_blocks as u32).collect();
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
    };
    for p in 0..n_pos {
        let k: Vec<f32> = (0..hd * n_kv).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..hd * n_kv).map(|_| rnd()).collect();
        kv.write(0, &table, p, &k, &v);
    }
    let q: Vec<f32> = (0..group * hd).map(|_| rnd() * 0.1).collect();
    let only: Vec<String> = std::env::args().skip(1).collect();
    for level in Kernels::available().into_iter().filter(|l| only.is_empty() || only.iter().any(|o| o == l.name())) {
        let kern = Kernels::for_level(level).unwrap();
        let mut out = vec![0f32; group * hd];
        let mut sc = Scratch::default();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            for kvh in 0..n_kv {
                let keys = Keys { kv: &kv, layer: 0, table: &table, kvh };
                decode(kern, &q, group, 0, n_pos - 1, hd, hd, &keys, &mut sc, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{:>7}: {:6.1} us a layer ({:.1} ns a key and KV head)",
            level.name(),
            best * 1e6,
            best * 1e9 / (n_pos * n_kv) as f64
        );
    }
}
