//! GPU throughput of the serving executor on the measure model: Llama 3.2 1B
//! shapes (dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, RoPE base 500000) with
//! a 49152-token vocabulary and random weights in one format.
//!
//!     cargo run --release --example cuda_bench -- q4_0 [q4_k q8_0 ...]
//!
//! Prints, per format: prompt processing (pp512, one sequence), generation (tg128, one
//! sequence), aggregate generation with 16 and 64 concurrent sequences, and tg as a
//! fraction of the bound (weight bytes per token over the card's bandwidth, given by
//! EDGELM_GPU_BW_GBS, default 4800 for an H200). One JSON object per format on stdout.
//!
//! `EDGELM_KERNEL_BENCH=1` measures the matrix kernels alone instead (8192×2048, every
//! decode and prompt size, each `mmq` block shape); `=q4_k,q6_k` (say) only those
//! formats' block shapes.
//!
//! An argument ending in `.gguf` is a model file to measure instead (any architecture
//! edgelm runs: the synthetic real-shape files of benches/synthetic.py, say).
//!
//! `EDGELM_BENCH_SAVE=DIR` also writes each model to `DIR/measure-<type>.gguf` (the
//! same bytes edgelm runs), so llama-bench can run the very same file
//! (benches/cuda_side_by_side.sh); `EDGELM_BENCH_SAVE_ONLY=1` writes and exits.

use std::sync::Arc;
use std::time::Instant;

use edgelm_core::batch::{Executor, StepItem};
use edgelm_core::engine::{Engine, LoadOptions, StopRule};
use edgelm_core::gguf::{Array, Gguf, GgufWriter, Value};
use edgelm_core::quant::{self, GgmlType};
use edgelm_core::sample::SamplingParams;

const E: usize = 2048;
const LAYERS: usize = 16;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const FF: usize = 8192;
const VOCAB: usize = 49152;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * 0.035 // σ ≈ 0.02
        })
        .collect()
}

/// A `rows × cols` matrix in `ty`: 64 distinct random rows, repeated (the bytes read
/// per token are what matter here, not their variety).
fn matrix(w: &mut GgufWriter, name: &str, cols: usize, rows: usize, ty: GgmlType, seed: u64) {
    let rb = ty.row_bytes(cols).unwrap();
    let distinct = 64.min(rows);
    let mut base = vec![0u8; rb * distinct];
    for r in 0..distinct {
        quant::quantize_row(ty, &randn(cols, seed * 1000 + r as u64), &mut base[r * rb..(r + 1) * rb]);
    }
    let mut data = Vec::with_capacity(rb * rows);
    for r in 0..rows {
        data.extend_from_slice(&base[(r % distinct) * rb..(r % distinct + 1) * rb]);
    }
    w.tensor(name, &[cols as u64, rows as u64], ty, data);
}

fn model(ty: GgmlType) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::Str("llama".into()))
        .kv("llama.context_length", Value::U32(8192))
        .kv("llama.embedding_length", Value::U32(E as u32))
        .kv("llama.block_count", Value::U32(LAYERS as u32))
        .kv("llama.feed_forward_length", Value::U32(FF as u32))
        .kv("llama.attention.head_count", Value::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", Value::F32(500000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("llama.vocab_size", Value::U32(VOCAB as u32));
    let mut toks: Vec<String> = (0..256u32).map(|b| char::from_u32(0x100 + b).unwrap().to_string()).collect();
    while toks.len() < VOCAB - 1 {
        toks.push(format!("t{}", toks.len()));
    }
    toks.push("<|endoftext|>".into());
    let mut types = vec![1i32; VOCAB];
    types[VOCAB - 1] = 3;
    w.kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("gpt-2".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(toks)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .kv("tokenizer.ggml.merges", Value::Array(Array::Str(vec![])))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(VOCAB as u32 - 1));
    let hd = E / HEADS;
    matrix(&mut w, "token_embd.weight", E, VOCAB, ty, 1);
    w.tensor(
        "output_norm.weight",
        &[E as u64],
        GgmlType::F32,
        vec![0x3f80_0000u32; E].iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    for il in 0..LAYERS {
        let s = 100 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        let ones: Vec<u8> = vec![0x3f80_0000u32; E].iter().flat_map(|x| x.to_le_bytes()).collect();
        w.tensor(&n("attn_norm.weight"), &[E as u64], GgmlType::F32, ones.clone());
        w.tensor(&n("ffn_norm.weight"), &[E as u64], GgmlType::F32, ones);
        matrix(&mut w, &n("attn_q.weight"), E, HEADS * hd, ty, s + 1);
        matrix(&mut w, &n("attn_k.weight"), E, KV_HEADS * hd, ty, s + 2);
        matrix(&mut w, &n("attn_v.weight"), E, KV_HEADS * hd, ty, s + 3);
        matrix(&mut w, &n("attn_output.weight"), HEADS * hd, E, ty, s + 4);
        matrix(&mut w, &n("ffn_gate.weight"), E, FF, ty, s + 6);
        matrix(&mut w, &n("ffn_up.weight"), E, FF, ty, s + 7);
        matrix(&mut w, &n("ffn_down.weight"), FF, E, ty, s + 8);
    }
    w.to_bytes()
}

/// The measure model as Q4_K_M: built as F16, then quantized with llama.cpp's mix rules
/// (attn_v and ffn_down of the use_more_bits layers and the tied output in Q6_K) by
/// edgelm's quantizer, which writes the same bytes as llama-quantize.
fn mixed(_ty: GgmlType) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("edgelm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (f16, out) = (dir.join("measure-f16.gguf"), dir.join("measure-q4_k_m.gguf"));
    std::fs::write(&f16, model(GgmlType::F16)).unwrap();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let opts = edgelm_core::tools::Options {
        ftype: edgelm_core::tools::FileType::parse("Q4_K_M").unwrap(),
        threads,
        pure: false,
    };
    let sum = edgelm_core::tools::quantize_file(&f16, &out, &opts, &mut |_| Ok(())).unwrap();
    eprintln!("q4_k_m: quantized in {:.1}s: {:?}", sum.seconds, sum.by_type);
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// The matrix kernels alone, on an FFN-sized matrix: time per launch and the weight
/// bandwidth it amounts to.
fn kernel_bench(gpu: &Arc<edgelm_core::cuda::Gpu>, ty: GgmlType, name: &str, shapes_only: bool) {
    let (rows, cols) = (8192, 2048);
    let rb = ty.row_bytes(cols).unwrap();
    let mut w = vec![0u8; rb * rows];
    for r in 0..rows {
        quant::quantize_row(ty, &randn(cols, r as u64 % 97), &mut w[r * rb..(r + 1) * rb]);
    }
    // (tokens, as a prompt, tensor-core kernel from): decode runs through mmvq and mmq.
    let runs: &[(usize, bool, usize)] = if shapes_only {
        &[]
    } else {
        &[
            (1, false, 2),
            (1, false, 1),
            (2, false, 3),
            (8, false, 9),
            (8, false, 1),
            (16, false, 99),
            (16, false, 1),
            (64, false, 99),
            (64, false, 1),
            (512, true, 1),
        ]
    };
    for &(n_tok, tiled, from) in runs {
        let per = edgelm_core::cuda::model::matmul_seconds(gpu, ty, &w, rows, cols, n_tok, tiled, from, 200).unwrap();
        let kernel = if tiled {
            "prompt"
        } else if edgelm_core::cuda::model::decode_takes_mmvq(ty, n_tok, from) {
            "mmvq"
        } else {
            "mmq"
        };
        eprintln!("{name} {rows}x{cols} n_tok {n_tok:3} ({kernel}): {:7.1} µs per launch, {:5.0} GB/s of weights, {:6.2} TFLOP/s",
                  per * 1e6, w.len() as f64 / per / 1e9, 2.0 * (rows * cols * n_tok) as f64 / per / 1e12);
    }
    // Each mmq block shape at batch and prompt sizes, on this and a 2048-row matrix
    // (what `mmq_tile` chooses between).
    for tile in [(1, 4), (2, 4), (4, 4)] {
        edgelm_core::cuda::model::set_mmq_tile(Some(tile));
        for (r, n_tok) in [(8192, 64), (2048, 64), (8192, 512), (2048, 512)] {
            let per =
                edgelm_core::cuda::model::matmul_seconds(gpu, ty, &w[..r * rb], r, cols, n_tok, n_tok > 64, 1, 100)
                    .unwrap();
            eprintln!(
                "{name} {r}x{cols} n_tok {n_tok:3} mmq {}x{}: {:7.1} µs, {:6.2} TFLOP/s",
                tile.0,
                tile.1,
                per * 1e6,
                2.0 * (r * cols * n_tok) as f64 / per / 1e12
            );
        }
    }
    edgelm_core::cuda::model::set_mmq_tile(None);
}

fn main() {
    let gpu = edgelm_core::cuda::probe().unwrap_or_else(|e| panic!("no GPU: {e}"));
    // EDGELM_KERNEL_BENCH=1: every kernel measure; =q4_k,q6_k (say): those formats' mmq
    // block shapes only.
    if let Ok(which) = std::env::var("EDGELM_KERNEL_BENCH") {
        let only: Vec<&str> = which.split(',').filter(|w| *w != "1").collect();
        for (ty, name) in
            [(GgmlType::Q4_0, "q4_0"), (GgmlType::Q8_0, "q8_0"), (GgmlType::Q4_K, "q4_k"), (GgmlType::Q6_K, "q6_k")]
        {
            if only.is_empty() || only.contains(&name) {
                kernel_bench(&gpu, ty, name, !only.is_empty());
            }
        }
        return;
    }
    let bw = std::env::var("EDGELM_GPU_BW_GBS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(4800.0) * 1e9;
    let types: Vec<String> = std::env::args().skip(1).collect();
    for name in if types.is_empty() { vec!["q4_0".to_string()] } else { types } {
        let t0 = Instant::now();
        let file = if name.ends_with(".gguf") {
            Gguf::open(&name).unwrap_or_else(|e| panic!("{name}: {e}"))
        } else {
            let Some(bytes) = synthetic(&name) else { continue };
            Gguf::from_bytes(bytes).unwrap()
        };
        let name = std::path::Path::new(&name).file_stem().map_or(name.clone(), |s| s.to_string_lossy().into_owned());
        let engine = Arc::new(
            Engine::from_gguf(file, &LoadOptions { n_threads: Some(4), kernel_level: None, n_ctx: None }).unwrap(),
        );
        let vocab = engine.model.cfg.n_vocab;
        let weight_bytes = engine.model.weight_bytes_per_token();
        eprintln!(
            "{name}: model built in {:.1}s ({:.0} MiB of weights read per token)",
            t0.elapsed().as_secs_f64(),
            weight_bytes as f64 / 2f64.powi(20)
        );
        measure(&gpu, &engine, &name, vocab, weight_bytes, bw);
    }
}

/// The synthetic 1B measure model in the format `name`, written to EDGELM_BENCH_SAVE
/// if set; None when only saving.
fn synthetic(name: &str) -> Option<Vec<u8>> {
    {
        let ty = match name {
            "q4_0" => GgmlType::Q4_0,
            "q4_k" => GgmlType::Q4_K,
            "q8_0" => GgmlType::Q8_0,
            "q6_k" => GgmlType::Q6_K,
            // The Q4_K_M: llama-quantize's mix (edgelm quantize makes the same file).
            "q4_k_m" => GgmlType::Q4_K,
            other => panic!("unknown type {other}"),
        };
        let bytes = if name == "q4_k_m" { mixed(ty) } else { model(ty) };
        if let Some(dir) = std::env::var_os("EDGELM_BENCH_SAVE") {
            let path = std::path::Path::new(&dir).join(format!("measure-{name}.gguf"));
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            eprintln!("{name}: wrote {}", path.display());
            if std::env::var_os("EDGELM_BENCH_SAVE_ONLY").is_some() {
                return None;
            }
        }
        Some(bytes)
    }
}

/// pp512, tg128 and 16/64 streams of one model on the GPU; one JSON line on stdout.
fn measure(
    gpu: &Arc<edgelm_core::cuda::Gpu>,
    engine: &Arc<Engine>,
    name: &str,
    vocab: usize,
    weight_bytes: usize,
    bw: f64,
) {
    {
        let bs = engine.kv_shape(1).block_size;
        let per_seq = (512 + 128 + bs) / bs + 1;
        let mut ex = Executor::new_cuda(Arc::clone(engine), 64 * per_seq, gpu).unwrap();
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let table = |i: usize| -> Vec<u32> { ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect() };
        let mut next_id = 0u64;
        // Prompt processing: one 512-token sequence, best of 3.
        let mut pp = 0f64;
        for _ in 0..3 {
            let prompt: Vec<u32> = (0..512).map(|j| (j * 13 + 7) % (vocab as u32 - 1)).collect();
            ex.add(next_id, prompt, greedy.clone(), StopRule::never()).unwrap();
            let t = Instant::now();
            ex.step(&[StepItem {
                seq: next_id,
                start: 0,
                end: 512,
                block_table: table(0),
                sample: true,
                allowed: None,
            }])
            .unwrap();
            pp = pp.max(512.0 / t.elapsed().as_secs_f64());
            ex.remove(next_id);
            next_id += 1;
        }
        let prof = gpu.take_profile();
        if !prof.is_empty() {
            let total: f64 = prof.iter().map(|p| p.2).sum();
            eprintln!("{name}, pp512, per prompt (3 prompts; each launch waited for):");
            for (k, n, secs) in prof {
                eprintln!(
                    "  {k:10} {:6.1} launches  {:8.1} µs  {:5.1}%",
                    n as f64 / 3.0,
                    secs / 3.0 * 1e6,
                    100.0 * secs / total
                );
            }
        }
        // Generation with B concurrent sequences: 128 tokens each after a 32-token prompt.
        let mut gen = Vec::new();
        for batch in [1usize, 16, 64] {
            let ids: Vec<u64> = (0..batch as u64).map(|k| next_id + k).collect();
            next_id += batch as u64;
            for (k, &id) in ids.iter().enumerate() {
                let prompt: Vec<u32> = (0..32).map(|j| ((k * 31 + j * 7) % (vocab - 1)) as u32).collect();
                ex.add(id, prompt, greedy.clone(), StopRule::never()).unwrap();
            }
            let items: Vec<StepItem> = ids
                .iter()
                .enumerate()
                .map(|(k, &id)| StepItem {
                    seq: id,
                    start: 0,
                    end: 32,
                    block_table: table(k),
                    sample: true,
                    allowed: None,
                })
                .collect();
            ex.step(&items).unwrap();
            let t = Instant::now();
            let n_steps = 128;
            for step in 0..n_steps {
                let items: Vec<StepItem> = ids
                    .iter()
                    .enumerate()
                    .map(|(k, &id)| StepItem {
                        seq: id,
                        start: 32 + step,
                        end: 33 + step,
                        block_table: table(k),
                        sample: true,
                        allowed: None,
                    })
                    .collect();
                ex.step(&items).unwrap();
            }
            let tps = (batch * n_steps) as f64 / t.elapsed().as_secs_f64();
            let prof = gpu.take_profile();
            if !prof.is_empty() {
                let total: f64 = prof.iter().map(|p| p.2).sum();
                eprintln!("{name}, {batch} streams, per step ({n_steps} steps):");
                for (k, n, secs) in prof {
                    eprintln!(
                        "  {k:10} {:6.1} launches  {:8.1} µs  {:5.1}%",
                        n as f64 / n_steps as f64,
                        secs / n_steps as f64 * 1e6,
                        100.0 * secs / total
                    );
                }
            }
            for &id in &ids {
                ex.remove(id);
            }
            gen.push((batch, tps));
        }
        let tg = gen[0].1;
        let frac = tg * weight_bytes as f64 / bw;
        println!(
            "{{\"type\": \"{name}\", \"gpu\": \"{}\", \"pp512\": {pp:.1}, \"tg128\": {tg:.1}, \"agg16\": {:.1}, \"agg64\": {:.1}, \"weight_bytes_per_token\": {weight_bytes}, \"tg_fraction_of_bandwidth\": {frac:.4}}}",
            gpu.name, gen[1].1, gen[2].1
        );
        eprintln!("{name}: pp512 {pp:.0} tok/s; tg128 {tg:.0} tok/s ({:.1}% of the bandwidth bound); 16 streams {:.0} tok/s; 64 streams {:.0} tok/s", 100.0 * frac, gen[1].1, gen[2].1);
    }
}
