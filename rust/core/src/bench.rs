//! Machine measures used by the benchmarks: memory read bandwidth, the bound on
//! decode speed (every weight is read once per generated token).

use std::time::Instant;

use crate::threads::ThreadPool;

/// Best-of-`reps` read bandwidth in bytes/s over a buffer of `bytes` (far larger than
/// the last-level cache), read by `n_threads` threads in parallel.
pub fn read_bandwidth(bytes: usize, n_threads: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1 << 20);
    // Non-zero contents so the pages are really backed (zero pages share one frame).
    let buf: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let pool = ThreadPool::new(n_threads.max(1)).expect("threads");
    let parts = pool.n_threads();
    let chunk = n.div_ceil(parts);
    let mut best = 0f64;
    let sink = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        pool.for_each(parts, |p| {
            let s = &buf[(p * chunk).min(n)..((p + 1) * chunk).min(n)];
            // Eight independent lanes keep the loads in flight; xor is cheaper than add.
            let mut acc = [0u64; 8];
            for c in s.chunks_exact(8) {
                for (a, &x) in acc.iter_mut().zip(c) {
                    *a ^= x;
                }
            }
            let v = acc.iter().fold(0, |x, &y| x ^ y);
            sink.fetch_xor(v, std::sync::atomic::Ordering::Relaxed);
        });
        let dt = t0.elapsed().as_secs_f64();
        best = best.max((n * 8) as f64 / dt);
    }
    std::hint::black_box(sink.into_inner());
    best
}
