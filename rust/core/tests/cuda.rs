//! CUDA. Everywhere: the kernels compile through NVRTC for sm_87 (Jetson Orin) and
//! sm_90 (H100/H200); no GPU is needed, only NVRTC (CI points `EDGELM_NVRTC` at the
//! `nvidia-cuda-nvrtc` wheel's library and sets `EDGELM_REQUIRE_NVRTC=1`).
//! On a machine with a GPU (`EDGELM_REQUIRE_GPU=1` makes its absence a failure): each
//! weight format's matrix kernel against the CPU's dequantized f64 reference, and the
//! whole forward pass against the CPU's on tiny models of every architecture.

mod common;

use std::sync::Arc;

use common::{randn, tiny_gemma3, tiny_llama, Tiny};
use edgelm_core::cuda::model::{int8_decode, matmul_once, GpuModel, GPU_TYPES};
use edgelm_core::cuda::{self, Gpu};
use edgelm_core::engine::{Engine, LoadOptions};
use edgelm_core::gguf::Gguf;
use edgelm_core::kv::KvCache;
use edgelm_core::model::{LogitsWanted, SeqInput};
use edgelm_core::quant::{self, GgmlType};

fn required(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

fn gpu() -> Option<Arc<Gpu>> {
    match cuda::probe() {
        Ok(g) => {
            eprintln!("GPU {}: {} (sm_{}, driver {}, kernels from {})", g.ordinal, g.name, g.arch, g.driver_version, g.kernels_from);
            Some(g)
        }
        Err(e) if required("EDGELM_REQUIRE_GPU") => panic!("EDGELM_REQUIRE_GPU=1 but no GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

#[test]
fn kernels_compile_for_orin_and_hopper() {
    let v = match cuda::nvrtc_version() {
        Ok(v) => v,
        Err(e) if required("EDGELM_REQUIRE_NVRTC") => panic!("EDGELM_REQUIRE_NVRTC=1 but {e}"),
        Err(e) => return eprintln!("skipped: {e}"),
    };
    for arch in [87, 90] {
        let n = cuda::compile_kernels_for(arch).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("NVRTC {}.{}: kernels.cu → sm_{arch} cubin, {n} bytes", v.0, v.1);
        assert!(n > 1000);
    }
}

/// Tolerance: f32 accumulation over `cols` products, against an f64 reference.
fn close(got: f32, want: f64, scale: f64, quant: f64) -> bool {
    (got as f64 - want).abs() <= 2e-5 * scale + quant + 1e-6
}

/// The tolerance table, per kernel, against the f64 dot of the dequantized weights
/// with the f32 activations:
/// - f32 activations (`mmv` and `mmt`, the float formats' kernels): 2e-5 of Σ|w·x|
///   (f32 accumulation), nothing else.
/// - int8 activations (`mmvq` and `mmq`, the quantized formats' kernels): each
///   activation is rounded to the nearest multiple of its 32-block's d = amax / 127,
///   an error of at most d / 2, so the product moves by at most Σ_c |w_c| · d_c / 2
///   (`quant` below, with 1e-5 for the rounding of x / d itself), on top of the f32
///   term. The integer dot products are exact; this bound is what the CPU's own
///   Q8 activations allow too.
fn int8_bound(w: &[f32], x: &[f32]) -> f64 {
    let mut bound = 0f64;
    for (wb, xb) in w.chunks(32).zip(x.chunks(32)) {
        let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
        bound += wb.iter().map(|v| v.abs() as f64).sum::<f64>() * d * 0.5 * (1.0 + 1e-5);
    }
    bound
}

#[test]
fn gpu_matrix_kernel_matches_cpu_for_every_format() {
    let Some(g) = gpu() else { return };
    let (rows, cols) = (67, 768);
    for &ty in GPU_TYPES {
        let w = randn(rows * cols, 7 + ty as u64, 0.5);
        let rb = ty.row_bytes(cols).unwrap();
        let mut wq = vec![0u8; rows * rb];
        for r in 0..rows {
            quant::quantize_row(ty, &w[r * cols..(r + 1) * cols], &mut wq[r * rb..(r + 1) * rb]);
        }
        let mut deq = vec![0f32; rows * cols];
        for r in 0..rows {
            quant::dequantize_row(ty, &wq[r * rb..(r + 1) * rb], &mut deq[r * cols..(r + 1) * cols]);
        }
        let mut worst = [0f64; 2]; // largest |error| / tolerance: decode, prompt
        for (n_tok, tiled) in [(1, false), (2, false), (4, false), (5, false), (8, false), (13, false), (1, true), (13, true), (70, true), (130, true)] {
            let x = randn(n_tok * cols, 99 + n_tok as u64, 1.0);
            let y = matmul_once(&g, ty, &wq, rows, cols, &x, n_tok, tiled, 8).unwrap();
            let int8 = int8_decode(ty);
            for t in 0..n_tok {
                let xt = &x[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let wr = &deq[r * cols..(r + 1) * cols];
                    let (mut want, mut scale) = (0f64, 0f64);
                    for c in 0..cols {
                        let p = wr[c] as f64 * xt[c] as f64;
                        want += p;
                        scale += p.abs();
                    }
                    let quant = if int8 { int8_bound(wr, xt) } else { 0.0 };
                    let got = y[t * rows + r];
                    assert!(close(got, want, scale, quant), "{ty:?} n_tok {n_tok} tiled {tiled} token {t} row {r}: GPU {got} vs CPU {want} (tolerance {})", 2e-5 * scale + quant + 1e-6);
                    let k = tiled as usize;
                    worst[k] = worst[k].max((got as f64 - want).abs() / (2e-5 * scale + quant + 1e-6));
                }
            }
        }
        eprintln!("{ty:?}: GPU decode and prompt matrix kernels ({}) agree with the CPU's dequantized f64 dot; worst error / tolerance {:.3} and {:.3}",
                  if int8_decode(ty) { "int8 activations" } else { "f32" }, worst[0], worst[1]);
    }
}

/// The int8 kernels give every token the same bits whether it comes alone or with up
/// to 39 others, through `mmvq` (each launch variant: 1, 2, 4, 8 tokens a block) or the
/// tensor-core `mmq` (as decode tokens or as a prompt).
#[test]
fn gpu_int8_kernels_are_batch_invariant() {
    let Some(g) = gpu() else { return };
    for (rows, cols) in [(300, 512), (67, 768), (40, 8192)] {
        for &ty in GPU_TYPES.iter().filter(|&&t| int8_decode(t)) {
            let w = randn(rows * cols, 3 + ty as u64, 0.5);
            let rb = ty.row_bytes(cols).unwrap();
            let mut wq = vec![0u8; rows * rb];
            for r in 0..rows {
                quant::quantize_row(ty, &w[r * cols..(r + 1) * cols], &mut wq[r * rb..(r + 1) * rb]);
            }
            let x = randn(40 * cols, 5, 1.0);
            let all = matmul_once(&g, ty, &wq, rows, cols, &x, 40, false, usize::MAX).unwrap();
            let same = |v: &[f32], what: &str| {
                let bad = v.iter().zip(&all).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(bad.is_none(), "{ty:?} {rows}x{cols}: {what} differs from mmvq with 40 tokens at {bad:?}");
            };
            // mmvq1/2/4/8 and mmq1/2/4 (8, 16, 32 tokens a block), as decode and prompt.
            for n in [1usize, 2, 3, 4, 7, 8, 9, 16, 17, 40] {
                same(&matmul_once(&g, ty, &wq, rows, cols, &x[..n * cols], n, false, usize::MAX).unwrap(), &format!("mmvq, {n} tokens"));
                same(&matmul_once(&g, ty, &wq, rows, cols, &x[..n * cols], n, false, 1).unwrap(), &format!("mmq, {n} tokens"));
                same(&matmul_once(&g, ty, &wq, rows, cols, &x[..n * cols], n, true, 1).unwrap(), &format!("mmq as a prompt, {n} tokens"));
            }
        }
    }
    eprintln!("int8 kernels: mmvq and mmq, 1..40 tokens, give a token the same bits");
}

/// Greedy decoding of `n_gen` tokens after `prompt`, CPU and GPU side by side; returns
/// the largest logit difference seen, and fails if the tokens part other than at a
/// near-tie (top-2 gap under 1e-3 on the CPU).
fn compare_forward(engine: &Engine, name: &str, g: &Arc<Gpu>, prompt: &[u32], n_gen: usize) -> f32 {
    let gm = GpuModel::upload(g, &engine.model).unwrap_or_else(|e| panic!("{name}: {e}"));
    let n_blocks = 64;
    let mut kv_cpu = KvCache::new(engine.kv_shape(n_blocks)).unwrap();
    let mut kv_gpu = gm.new_kv(n_blocks, engine.kv_shape(n_blocks).block_size).unwrap();
    let bs = engine.kv_shape(n_blocks).block_size;
    // Blocks in a scrambled order, so the paging is exercised.
    let table: Vec<u32> = (0..(prompt.len() + n_gen).div_ceil(bs) as u32).map(|i| (i * 7 + 5) % n_blocks as u32).collect();
    let nv = engine.model.cfg.n_vocab;
    let mut worst = 0f32;
    // The prompt, all logits.
    let s = SeqInput::new(prompt, 0, &table, LogitsWanted::All);
    let a = engine.forward(&mut kv_cpu, std::slice::from_ref(&s)).unwrap();
    let b = gm.forward(&mut kv_gpu, &[s]).unwrap();
    assert_eq!(a.rows, b.rows);
    for (x, y) in a.data.iter().zip(&b.data) {
        worst = worst.max((x - y).abs());
    }
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|p, q| p.1.total_cmp(q.1)).map(|(i, _)| i as u32).unwrap();
    let mut last = argmax(&a.data[a.data.len() - nv..]);
    let mut toks = prompt.to_vec();
    for _ in 0..n_gen {
        toks.push(last);
        let one = [last];
        let s = SeqInput::new(&one, toks.len() - 1, &table, LogitsWanted::Last);
        let a = engine.forward(&mut kv_cpu, std::slice::from_ref(&s)).unwrap();
        let b = gm.forward(&mut kv_gpu, &[s]).unwrap();
        for (x, y) in a.data.iter().zip(&b.data) {
            worst = worst.max((x - y).abs());
        }
        let (ta, tb) = (argmax(&a.data), argmax(&b.data));
        if ta != tb {
            let mut sorted = a.data.clone();
            sorted.sort_by(|p, q| q.total_cmp(p));
            let gap = sorted[0] - sorted[1];
            assert!(gap < 1e-3, "{name}: GPU chose {tb}, CPU {ta}, at a top-2 gap of {gap}");
            eprintln!("{name}: parted at a near-tie (gap {gap}); stopping the comparison there");
            break;
        }
        last = ta;
    }
    worst
}

#[test]
fn gpu_forward_matches_cpu_on_tiny_models() {
    let Some(g) = gpu() else { return };
    let opts = LoadOptions { n_threads: Some(2), kernel_level: None };
    let prompt: Vec<u32> = (0..37).map(|i| (i * 7 + 3) % 250).collect();
    // Every weight format, on the llama architecture (256 columns: the K-quants' block).
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let t = Tiny { n_embd: 256, n_ff: 512, n_head: 4, n_head_kv: 2, wtype: ty, ..Tiny::default() };
        let file = Gguf::from_bytes(tiny_llama(&t).to_bytes()).unwrap();
        let engine = Engine::from_gguf(file, &opts).unwrap();
        let worst = compare_forward(&engine, &format!("tiny llama {ty:?}"), &g, &prompt, 24);
        eprintln!("tiny llama {ty:?}: largest logit difference GPU vs CPU {worst:.2e}");
        assert!(worst < 2e-2, "{ty:?}: logits differ by {worst}");
    }
    // Gemma 3: Q/K norms, post norms, GELU, embedding scale, sliding window + its RoPE base.
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K] {
        let t = Tiny { n_embd: 256, n_ff: 512, n_head: 4, n_head_kv: 1, wtype: ty, ..Tiny::default() };
        let file = Gguf::from_bytes(tiny_gemma3(&t).to_bytes()).unwrap();
        let engine = Engine::from_gguf(file, &opts).unwrap();
        assert!(engine.model.cfg.swa_window == Some(8) && engine.model.cfg.swa_layers == [true, false]);
        let worst = compare_forward(&engine, &format!("tiny gemma3 {ty:?}"), &g, &prompt, 24);
        eprintln!("tiny gemma3 {ty:?}: largest logit difference GPU vs CPU {worst:.2e}");
        assert!(worst < 2e-2, "gemma3 {ty:?}: logits differ by {worst}");
    }
    // The fixtures: llama3 (rope_freqs, untied output) and qwen2 (biases), F32.
    for name in ["tiny-llama3.gguf", "tiny-qwen2.gguf"] {
        // The build machine's path, or the repository root this runs in (a GPU machine).
        let dir = Some(common::fixtures_dir()).filter(|d| d.is_dir()).unwrap_or_else(|| "tests/fixtures".into());
        let engine = Engine::load(dir.join(name), &opts).unwrap();
        let worst = compare_forward(&engine, name, &g, &prompt, 24);
        eprintln!("{name}: largest logit difference GPU vs CPU {worst:.2e}");
        assert!(worst < 2e-2, "{name}: logits differ by {worst}");
    }
}

/// The serving executor on the GPU: 16 sequences decoded together give exactly what
/// each gives alone (the GPU forward treats every token on its own: the matrix
/// kernel's per-token sums, attention and norms never mix rows).
#[test]
fn gpu_executor_batches_without_changing_results() {
    use edgelm_core::batch::{Executor, StepItem};
    use edgelm_core::sample::SamplingParams;
    let Some(g) = gpu() else { return };
    let opts = LoadOptions { n_threads: Some(2), kernel_level: None };
    let t = Tiny { n_embd: 256, n_ff: 512, n_head: 4, n_head_kv: 2, wtype: GgmlType::Q4_K, ..Tiny::default() };
    let engine = Arc::new(Engine::from_gguf(Gguf::from_bytes(tiny_llama(&t).to_bytes()).unwrap(), &opts).unwrap());
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let prompts: Vec<Vec<u32>> = (0..16u32).map(|i| (0..(5 + 3 * i)).map(|j| (i * 31 + j * 7 + 1) % 250).collect()).collect();
    let n_gen: usize = 20;
    let bs = engine.kv_shape(1).block_size;
    let per_seq = (40 + 3 * 16 + n_gen).div_ceil(bs);
    let run = |which: &[usize]| -> Vec<Vec<u32>> {
        let mut ex = Executor::new_cuda(Arc::clone(&engine), 16 * per_seq, &g).unwrap();
        assert!(ex.device().starts_with("cuda:0"));
        let tables: Vec<Vec<u32>> = (0..16).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
        for &i in which {
            ex.add(i as u64, prompts[i].clone(), greedy.clone(), true).unwrap();
        }
        let mut fed: Vec<usize> = vec![0; 16];
        for _ in 0..=n_gen {
            let items: Vec<StepItem> = which
                .iter()
                .map(|&i| {
                    let len = ex.history(i as u64).unwrap().len();
                    StepItem { seq: i as u64, start: fed[i], end: len, block_table: tables[i].clone(), sample: true, allowed: None }
                })
                .collect();
            for it in &items {
                fed[it.seq as usize] = it.end;
            }
            ex.step(&items).unwrap();
        }
        which.iter().map(|&i| ex.history(i as u64).unwrap()[prompts[i].len()..].to_vec()).collect()
    };
    let together = run(&(0..16).collect::<Vec<_>>());
    for (i, batched) in together.iter().enumerate() {
        let alone = run(&[i]);
        assert_eq!(&alone[0], batched, "sequence {i}: alone and in a batch of 16 differ");
    }
    eprintln!("16 sequences × {n_gen} tokens on the GPU: batched == alone, token for token");
}

/// The tiny models the GPU comparisons use load and run on the CPU (checked
/// everywhere, so a GPU run never starts from a broken model).
#[test]
fn tiny_models_run_on_the_cpu() {
    let opts = LoadOptions { n_threads: Some(2), kernel_level: None };
    for w in [tiny_llama(&Tiny { n_embd: 256, n_ff: 512, wtype: GgmlType::Q4_K, ..Tiny::default() }),
              tiny_gemma3(&Tiny { n_embd: 256, n_ff: 512, n_head_kv: 1, wtype: GgmlType::Q8_0, ..Tiny::default() })] {
        let engine = Engine::from_gguf(Gguf::from_bytes(w.to_bytes()).unwrap(), &opts).unwrap();
        let logits = engine.logits(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
    }
}
