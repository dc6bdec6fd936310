//! The architectures added for Pi/Jetson users (qwen3, qwen3moe, phi3, granite) on the
//! CPU: every kernel level agrees with the scalar one on the whole forward pass, the
//! serving executor's batches never change a sequence's tokens (the MoE grouping
//! included), and their metadata is checked with errors that name the key. (Their
//! agreement with llama.cpp is tests/python/test_tiny_archs.py's.)

mod common;

use std::sync::Arc;

use common::{tiny_granite, tiny_phi3, tiny_qwen3, tiny_qwen3moe, Tiny};
use edgelm_core::batch::{Executor, StepItem};
use edgelm_core::engine::{Engine, LoadOptions, StopRule};
use edgelm_core::gguf::{Gguf, GgufWriter, Value};
use edgelm_core::model::Model;
use edgelm_core::quant::{GgmlType, Kernels, Level};
use edgelm_core::sample::SamplingParams;

/// (name, file) for each new architecture in weight format `ty` (256 wide: whole K-quant
/// blocks).
fn models(ty: GgmlType) -> Vec<(String, GgufWriter)> {
    let t = Tiny { n_embd: 256, n_ff: 256, n_head: 4, n_head_kv: 2, wtype: ty, ..Tiny::default() };
    vec![
        (format!("qwen3 {ty:?}"), tiny_qwen3(&t)),
        (format!("qwen3moe {ty:?}"), tiny_qwen3moe(&t, 6, 2)),
        (format!("phi3 {ty:?}"), tiny_phi3(&t)),
        (format!("granite {ty:?}"), tiny_granite(&t)),
    ]
}

fn engine(w: &GgufWriter, level: Option<Level>) -> Engine {
    let opts = LoadOptions { n_threads: Some(2), kernel_level: level, n_ctx: None };
    Engine::from_gguf(Gguf::from_bytes(w.to_bytes()).unwrap(), &opts).unwrap()
}

/// The whole forward pass at every kernel level this CPU has against the scalar one:
/// F32 weights to float rounding, quantized ones within the activation-rounding noise.
#[test]
fn every_kernel_level_runs_the_new_archs_like_scalar() {
    let prompt: Vec<u32> = (0..20).map(|i| (i * 11 + 5) % 250).collect();
    for (ty, bound) in [(GgmlType::F32, 1e-4f32), (GgmlType::F16, 1e-3), (GgmlType::Q8_0, 1e-4), (GgmlType::Q4_K, 1e-2)]
    {
        for (name, w) in models(ty) {
            let want = engine(&w, Some(Level::Scalar)).logits(&prompt).unwrap();
            assert!(want.iter().all(|x| x.is_finite()), "{name}: scalar logits not finite");
            for level in Kernels::available() {
                let got = engine(&w, Some(level)).logits(&prompt).unwrap();
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                eprintln!("{name} {}: largest logit difference to scalar {worst:.2e}", level.name());
                assert!(worst < bound, "{name} at {}: logits differ from scalar by {worst}", level.name());
            }
        }
    }
}

/// The serving executor: 6 sequences of different lengths decoded together give what
/// each gives alone, token for token, on every new architecture (for qwen3moe the
/// tokens of a step share experts in varying groups).
#[test]
fn batching_never_changes_the_new_archs_tokens() {
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let prompts: Vec<Vec<u32>> =
        (0..6u32).map(|i| (0..(3 + 5 * i)).map(|j| (i * 31 + j * 7 + 1) % 250).collect()).collect();
    let n_gen: usize = 12;
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0] {
        for (name, w) in models(ty) {
            let engine = Arc::new(engine(&w, None));
            let bs = engine.kv_shape(1).block_size;
            let per_seq = (3 + 5 * 6 + n_gen).div_ceil(bs) + 1;
            let run = |which: &[usize]| -> Vec<Vec<u32>> {
                let mut ex = Executor::new(Arc::clone(&engine), 6 * per_seq).unwrap();
                let tables: Vec<Vec<u32>> =
                    (0..6).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
                for &i in which {
                    ex.add(i as u64, prompts[i].clone(), greedy.clone(), StopRule::never()).unwrap();
                }
                let mut fed = [0usize; 6];
                for _ in 0..=n_gen {
                    let items: Vec<StepItem> = which
                        .iter()
                        .map(|&i| {
                            let len = ex.history(i as u64).unwrap().len();
                            StepItem {
                                seq: i as u64,
                                start: fed[i],
                                end: len,
                                block_table: tables[i].clone(),
                                sample: true,
                                allowed: None,
                            }
                        })
                        .collect();
                    for it in &items {
                        fed[it.seq as usize] = it.end;
                    }
                    ex.step(&items).unwrap();
                }
                which.iter().map(|&i| ex.history(i as u64).unwrap()[prompts[i].len()..].to_vec()).collect()
            };
            let together = run(&[0, 1, 2, 3, 4, 5]);
            for (i, batched) in together.iter().enumerate() {
                assert_eq!(&run(&[i])[0], batched, "{name}: sequence {i} alone and in a batch of 6 differ");
            }
            eprintln!("{name}: 6 sequences × {n_gen} tokens batched == alone");
        }
    }
}

/// The router's choices on the tiny qwen3moe spread over every expert, and a traced
/// forward reports one routing per layer with weights that sum to 1.
#[test]
fn moe_routing_is_traced_per_layer_and_normalised() {
    let t = Tiny { n_embd: 256, n_ff: 256, n_head: 4, n_head_kv: 2, wtype: GgmlType::Q8_0, ..Tiny::default() };
    let e = engine(&tiny_qwen3moe(&t, 6, 2), None);
    let ids: Vec<u32> = (0..40).map(|i| (i * 13 + 7) % 250).collect();
    let trace = e.moe_trace(&ids).unwrap();
    assert_eq!(trace.iter().map(|t| t.layer).collect::<Vec<_>>(), vec![0, 1]);
    let mut used = [false; 6];
    for tr in &trace {
        assert_eq!(tr.input.len(), ids.len() * 256);
        for (ex, w) in tr.experts.chunks(2).zip(tr.weights.chunks(2)) {
            assert!(ex[0] != ex[1] && ex.iter().all(|&x| x < 6));
            assert!(w[0] >= w[1] && ((w[0] + w[1]) - 1.0).abs() < 1e-6, "weights {w:?}");
            ex.iter().for_each(|&x| used[x as usize] = true);
        }
    }
    assert!(used.iter().all(|&u| u), "experts used: {used:?}");
}

fn load_err(w: &GgufWriter) -> String {
    match Model::load(Gguf::from_bytes(w.to_bytes()).unwrap()) {
        Ok(_) => "loaded".into(),
        Err(e) => e.to_string(),
    }
}

/// One defect per row → its error, naming the key or tensor.
#[test]
fn new_arch_metadata_errors_name_the_key() {
    let t = Tiny { n_embd: 64, n_ff: 64, ..Tiny::default() };
    let moe = || tiny_qwen3moe(&t, 4, 2);
    let cases: Vec<(&str, GgufWriter, &str)> = vec![
        (
            "more experts used than there are",
            {
                let mut w = moe();
                w.kv("qwen3moe.expert_used_count", Value::U32(5));
                w
            },
            "qwen3moe.expert_used_count (5) is larger than qwen3moe.expert_count (4)",
        ),
        (
            "no expert count",
            {
                let mut w = moe();
                w.remove_kv("qwen3moe.expert_count");
                w
            },
            "required metadata key \"qwen3moe.expert_count\" is missing",
        ),
        (
            "absurd expert count",
            {
                let mut w = moe();
                w.kv("qwen3moe.expert_count", Value::U32(100_000));
                w
            },
            "\"qwen3moe.expert_count\" is 100000; the limit is 512",
        ),
        (
            "expert tensor of the wrong shape",
            {
                let mut w = moe();
                w.remove_tensor("blk.1.ffn_up_exps.weight");
                w.tensor("blk.1.ffn_up_exps.weight", &[64, 64, 3], GgmlType::F32, vec![0; 64 * 64 * 3 * 4]);
                w
            },
            "tensor \"blk.1.ffn_up_exps.weight\" has shape [64, 64, 3] but the metadata implies [64, 64, 4]",
        ),
        (
            "missing router",
            {
                let mut w = moe();
                w.remove_tensor("blk.0.ffn_gate_inp.weight");
                w
            },
            "required tensor \"blk.0.ffn_gate_inp.weight\" is missing",
        ),
        (
            "granite without logit_scale",
            {
                let mut w = tiny_granite(&t);
                w.remove_kv("granite.logit_scale");
                w
            },
            "required metadata key \"granite.logit_scale\" is missing",
        ),
        (
            "YaRN",
            {
                let mut w = tiny_qwen3(&t);
                w.kv("qwen3.rope.scaling.type", Value::Str("yarn".into()));
                w
            },
            "qwen3.rope.scaling.type is \"yarn\", which edgelm does not implement yet",
        ),
        (
            "unknown RoPE scaling",
            {
                let mut w = tiny_qwen3(&t);
                w.kv("qwen3.rope.scaling.type", Value::Str("ntk".into()));
                w
            },
            "qwen3.rope.scaling.type is \"ntk\"; expected none, linear, yarn or longrope",
        ),
        (
            "qwen3 q norm missing",
            {
                let mut w = tiny_qwen3(&t);
                w.remove_tensor("blk.0.attn_q_norm.weight");
                w
            },
            "required tensor \"blk.0.attn_q_norm.weight\" is missing",
        ),
        (
            "phi3 fused qkv of the wrong height",
            {
                let mut w = tiny_phi3(&t);
                w.remove_tensor("blk.0.attn_qkv.weight");
                w.tensor("blk.0.attn_qkv.weight", &[64, 64], GgmlType::F32, vec![0; 64 * 64 * 4]);
                w
            },
            "tensor \"blk.0.attn_qkv.weight\" has shape [64, 64] but the metadata implies [64, 128]",
        ),
        (
            "phi3 LongRoPE factors of the wrong length",
            {
                let mut w = tiny_phi3(&t);
                w.remove_tensor("rope_factors_short.weight");
                w.tensor("rope_factors_short.weight", &[5], GgmlType::F32, vec![0; 20]);
                w
            },
            "tensor \"rope_factors_short.weight\" has shape [5] but the metadata implies [6]",
        ),
        (
            "phi3 LongRoPE factor of zero",
            {
                let mut w = tiny_phi3(&t);
                w.remove_tensor("rope_factors_long.weight");
                w.tensor("rope_factors_long.weight", &[6], GgmlType::F32, vec![0; 24]);
                w
            },
            "tensor \"rope_factors_long.weight\" holds 0; RoPE frequency factors must be positive",
        ),
    ];
    let mut failures = Vec::new();
    for (name, w, want) in cases {
        let got = load_err(&w);
        if !got.contains(want) {
            failures.push(format!("{name}: expected error containing {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
    // And each valid file loads.
    for w in [moe(), tiny_granite(&t), tiny_qwen3(&t), tiny_phi3(&t)] {
        assert_eq!(load_err(&w), "loaded");
    }
}
