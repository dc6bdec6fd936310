//! Shared helpers for integration tests: locating the real models and building tiny
//! synthetic GGUF files with the writer.
#![allow(dead_code)]

use std::path::PathBuf;

use edgelm_core::gguf::{Array, GgufWriter, Value};
use edgelm_core::quant::{self, GgmlType};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// A real model from $EDGELM_MODELS_DIR (default ~/.cache/edgelm/models). Missing
/// models fail the test: CI installs them (scripts/fetch_models.py).
pub fn model_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("EDGELM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/edgelm/models"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "model {} not found; run `python scripts/fetch_models.py` (or set EDGELM_MODELS_DIR)",
        p.display()
    );
    p
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Deterministic pseudo-random floats in [-scale, scale].
pub fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub struct Tiny {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub wtype: GgmlType,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny { n_embd: 64, n_layer: 2, n_head: 4, n_head_kv: 2, n_ff: 128, n_vocab: 300, wtype: GgmlType::Q8_0 }
    }
}

fn tensor(w: &mut GgufWriter, name: &str, cols: usize, rows: usize, ty: GgmlType, seed: u64) {
    let x = randn(cols * rows, seed, 0.1);
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rb * rows];
    for r in 0..rows {
        quant::quantize_row(ty, &x[r * cols..(r + 1) * cols], &mut data[r * rb..(r + 1) * rb]);
    }
    let dims: Vec<u64> = if rows == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
    w.tensor(name, &dims, ty, data);
}

/// A complete, tiny llama-architecture model with a byte-level BPE vocabulary whose
/// tokens are the 256 byte symbols plus a few specials.
pub fn tiny_llama(t: &Tiny) -> GgufWriter {
    let mut w = GgufWriter::new();
    let hd = t.n_embd / t.n_head;
    w.kv("general.architecture", Value::Str("llama".into()))
        .kv("general.name", Value::Str("tiny".into()))
        .kv("llama.context_length", Value::U32(256))
        .kv("llama.embedding_length", Value::U32(t.n_embd as u32))
        .kv("llama.block_count", Value::U32(t.n_layer as u32))
        .kv("llama.feed_forward_length", Value::U32(t.n_ff as u32))
        .kv("llama.attention.head_count", Value::U32(t.n_head as u32))
        .kv("llama.attention.head_count_kv", Value::U32(t.n_head_kv as u32))
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("llama.vocab_size", Value::U32(t.n_vocab as u32));
    // GPT-2 byte symbols: printable bytes map to themselves, others to U+0100.. .
    let mut toks: Vec<String> = Vec::new();
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
        toks.push(c.to_string());
    }
    while toks.len() < t.n_vocab - 2 {
        toks.push(format!("ab{}", toks.len()));
    }
    toks.push("<|endoftext|>".into());
    toks.push("<|im_end|>".into());
    let mut types = vec![1i32; t.n_vocab];
    types[t.n_vocab - 2] = 3;
    types[t.n_vocab - 1] = 3;
    w.kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("gpt-2".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(toks)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .kv("tokenizer.ggml.merges", Value::Array(Array::Str(vec![])))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(t.n_vocab as u32 - 2))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(t.n_vocab as u32 - 2));

    let e = t.n_embd;
    tensor(&mut w, "token_embd.weight", e, t.n_vocab, t.wtype, 1);
    tensor(&mut w, "output_norm.weight", e, 1, GgmlType::F32, 2);
    for il in 0..t.n_layer {
        let s = 100 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        tensor(&mut w, &n("attn_norm.weight"), e, 1, GgmlType::F32, s);
        tensor(&mut w, &n("attn_q.weight"), e, t.n_head * hd, t.wtype, s + 1);
        tensor(&mut w, &n("attn_k.weight"), e, t.n_head_kv * hd, t.wtype, s + 2);
        tensor(&mut w, &n("attn_v.weight"), e, t.n_head_kv * hd, t.wtype, s + 3);
        tensor(&mut w, &n("attn_output.weight"), t.n_head * hd, e, t.wtype, s + 4);
        tensor(&mut w, &n("ffn_norm.weight"), e, 1, GgmlType::F32, s + 5);
        tensor(&mut w, &n("ffn_gate.weight"), e, t.n_ff, t.wtype, s + 6);
        tensor(&mut w, &n("ffn_up.weight"), e, t.n_ff, t.wtype, s + 7);
        tensor(&mut w, &n("ffn_down.weight"), t.n_ff, e, t.wtype, s + 8);
    }
    w
}

/// A tiny gemma3-architecture model: the llama one plus Gemma's per-head Q/K norms,
/// post-attention and post-FFN norms, GELU, embedding scaling, and sliding-window
/// attention (window 8, every other layer) with its own RoPE base.
#[allow(dead_code)]
pub fn tiny_gemma3(t: &Tiny) -> GgufWriter {
    let mut w = tiny_llama(t);
    for k in [
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "vocab_size",
    ] {
        w.remove_kv(&format!("llama.{k}"));
    }
    let hd = t.n_embd / t.n_head;
    w.kv("general.architecture", Value::Str("gemma3".into()))
        .kv("gemma3.context_length", Value::U32(256))
        .kv("gemma3.embedding_length", Value::U32(t.n_embd as u32))
        .kv("gemma3.block_count", Value::U32(t.n_layer as u32))
        .kv("gemma3.feed_forward_length", Value::U32(t.n_ff as u32))
        .kv("gemma3.attention.head_count", Value::U32(t.n_head as u32))
        .kv("gemma3.attention.head_count_kv", Value::U32(t.n_head_kv as u32))
        .kv("gemma3.attention.key_length", Value::U32(hd as u32))
        .kv("gemma3.attention.value_length", Value::U32(hd as u32))
        .kv("gemma3.rope.freq_base", Value::F32(1_000_000.0))
        .kv("gemma3.rope.freq_base_swa", Value::F32(10_000.0))
        .kv("gemma3.attention.sliding_window", Value::U32(8))
        .kv("gemma3.attention.sliding_window_pattern", Value::U32(2))
        .kv("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6))
        .kv("gemma3.vocab_size", Value::U32(t.n_vocab as u32));
    for il in 0..t.n_layer {
        let s = 1000 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        tensor(&mut w, &n("attn_q_norm.weight"), hd, 1, GgmlType::F32, s + 1);
        tensor(&mut w, &n("attn_k_norm.weight"), hd, 1, GgmlType::F32, s + 2);
        tensor(&mut w, &n("post_attention_norm.weight"), t.n_embd, 1, GgmlType::F32, s + 3);
        tensor(&mut w, &n("post_ffw_norm.weight"), t.n_embd, 1, GgmlType::F32, s + 4);
    }
    w
}

/// `tiny_llama`'s vocabulary and embeddings under another architecture name, without
/// any layer: the hyper-parameters are `<arch>.*`, the layers are the caller's.
fn tiny_base(arch: &str, t: &Tiny, head_dim: usize, n_ff: usize) -> GgufWriter {
    let mut w = tiny_llama(t);
    for k in [
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "vocab_size",
    ] {
        w.remove_kv(&format!("llama.{k}"));
    }
    for il in 0..t.n_layer {
        for n in
            ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        {
            w.remove_tensor(&format!("blk.{il}.{n}.weight"));
        }
    }
    w.kv("general.architecture", Value::Str(arch.into()))
        .kv(&format!("{arch}.context_length"), Value::U32(256))
        .kv(&format!("{arch}.embedding_length"), Value::U32(t.n_embd as u32))
        .kv(&format!("{arch}.block_count"), Value::U32(t.n_layer as u32))
        .kv(&format!("{arch}.feed_forward_length"), Value::U32(n_ff as u32))
        .kv(&format!("{arch}.attention.head_count"), Value::U32(t.n_head as u32))
        .kv(&format!("{arch}.attention.head_count_kv"), Value::U32(t.n_head_kv as u32))
        .kv(&format!("{arch}.attention.key_length"), Value::U32(head_dim as u32))
        .kv(&format!("{arch}.attention.value_length"), Value::U32(head_dim as u32))
        .kv(&format!("{arch}.rope.freq_base"), Value::F32(1_000_000.0))
        .kv(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6))
        .kv(&format!("{arch}.vocab_size"), Value::U32(t.n_vocab as u32));
    w
}

/// The attention tensors of layer `il` for q of `n_head * hd` rows (separate q/k/v).
fn attention(w: &mut GgufWriter, t: &Tiny, il: usize, hd: usize, s: u64) {
    let (e, n) = (t.n_embd, |x: &str| format!("blk.{il}.{x}"));
    tensor(w, &n("attn_norm.weight"), e, 1, GgmlType::F32, s);
    tensor(w, &n("attn_q.weight"), e, t.n_head * hd, t.wtype, s + 1);
    tensor(w, &n("attn_k.weight"), e, t.n_head_kv * hd, t.wtype, s + 2);
    tensor(w, &n("attn_v.weight"), e, t.n_head_kv * hd, t.wtype, s + 3);
    tensor(w, &n("attn_output.weight"), t.n_head * hd, e, t.wtype, s + 4);
    tensor(w, &n("ffn_norm.weight"), e, 1, GgmlType::F32, s + 5);
}

/// A tiny qwen3: per-head q/k norms, head size 2 × n_embd / n_head (q wider than the
/// model, as Qwen3-0.6B), NEOX RoPE, no biases, tied embeddings.
pub fn tiny_qwen3(t: &Tiny) -> GgufWriter {
    let hd = 2 * t.n_embd / t.n_head;
    let mut w = tiny_base("qwen3", t, hd, t.n_ff);
    for il in 0..t.n_layer {
        let s = 2000 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        attention(&mut w, t, il, hd, s);
        tensor(&mut w, &n("attn_q_norm.weight"), hd, 1, GgmlType::F32, s + 6);
        tensor(&mut w, &n("attn_k_norm.weight"), hd, 1, GgmlType::F32, s + 7);
        tensor(&mut w, &n("ffn_gate.weight"), t.n_embd, t.n_ff, t.wtype, s + 8);
        tensor(&mut w, &n("ffn_up.weight"), t.n_embd, t.n_ff, t.wtype, s + 9);
        tensor(&mut w, &n("ffn_down.weight"), t.n_ff, t.n_embd, t.wtype, s + 10);
    }
    w
}

/// A tiny qwen3moe: qwen3 attention (head size n_embd / n_head), a router over
/// `n_expert` experts of width `t.n_ff`, `n_used` used, stacked 3-D expert tensors.
pub fn tiny_qwen3moe(t: &Tiny, n_expert: usize, n_used: usize) -> GgufWriter {
    let hd = t.n_embd / t.n_head;
    let mut w = tiny_base("qwen3moe", t, hd, t.n_ff * n_used);
    w.kv("qwen3moe.expert_count", Value::U32(n_expert as u32))
        .kv("qwen3moe.expert_used_count", Value::U32(n_used as u32))
        .kv("qwen3moe.expert_feed_forward_length", Value::U32(t.n_ff as u32));
    for il in 0..t.n_layer {
        let s = 3000 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        attention(&mut w, t, il, hd, s);
        tensor(&mut w, &n("attn_q_norm.weight"), hd, 1, GgmlType::F32, s + 6);
        tensor(&mut w, &n("attn_k_norm.weight"), hd, 1, GgmlType::F32, s + 7);
        // The router stays F32 (llama-quantize never quantizes ffn_gate_inp); scaled up
        // so that the routing is decisive.
        let r = randn(t.n_embd * n_expert, s + 8, 2.0);
        w.tensor(
            &n("ffn_gate_inp.weight"),
            &[t.n_embd as u64, n_expert as u64],
            GgmlType::F32,
            r.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        experts(&mut w, &n("ffn_gate_exps.weight"), t.n_embd, t.n_ff, n_expert, t.wtype, s + 9);
        experts(&mut w, &n("ffn_up_exps.weight"), t.n_embd, t.n_ff, n_expert, t.wtype, s + 10);
        experts(&mut w, &n("ffn_down_exps.weight"), t.n_ff, t.n_embd, n_expert, t.wtype, s + 11);
    }
    w
}

fn experts(w: &mut GgufWriter, name: &str, cols: usize, rows: usize, n: usize, ty: GgmlType, seed: u64) {
    let x = randn(cols * rows * n, seed, 0.1);
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rb * rows * n];
    for r in 0..rows * n {
        quant::quantize_row(ty, &x[r * cols..(r + 1) * cols], &mut data[r * rb..(r + 1) * rb]);
    }
    w.tensor(name, &[cols as u64, rows as u64, n as u64], ty, data);
}

/// A tiny phi3: fused attn_qkv and ffn_up (gate rows, then up rows), partial rotary
/// (3/4 of each head), LongRoPE factors (context 256, originally 64, so the long ones
/// are used by default) with their magnitude factor, a sliding window llama.cpp ignores.
pub fn tiny_phi3(t: &Tiny) -> GgufWriter {
    let hd = t.n_embd / t.n_head;
    let n_rot = hd * 3 / 4;
    let mut w = tiny_base("phi3", t, hd, t.n_ff);
    w.remove_kv("phi3.attention.key_length").remove_kv("phi3.attention.value_length");
    w.kv("phi3.rope.dimension_count", Value::U32(n_rot as u32))
        .kv("phi3.rope.freq_base", Value::F32(10_000.0))
        .kv("phi3.rope.scaling.original_context_length", Value::U32(64))
        .kv("phi3.rope.scaling.attn_factor", Value::F32(1.19))
        .kv("phi3.attention.sliding_window", Value::U32(8));
    let long: Vec<f32> = (0..n_rot / 2).map(|i| 1.0 + i as f32).collect();
    let short: Vec<f32> = (0..n_rot / 2).map(|i| 1.0 + 0.1 * i as f32).collect();
    w.tensor(
        "rope_factors_long.weight",
        &[(n_rot / 2) as u64],
        GgmlType::F32,
        long.iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    w.tensor(
        "rope_factors_short.weight",
        &[(n_rot / 2) as u64],
        GgmlType::F32,
        short.iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    let (e, kvd) = (t.n_embd, t.n_head_kv * hd);
    for il in 0..t.n_layer {
        let s = 4000 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        tensor(&mut w, &n("attn_norm.weight"), e, 1, GgmlType::F32, s);
        tensor(&mut w, &n("attn_qkv.weight"), e, e + 2 * kvd, t.wtype, s + 1);
        tensor(&mut w, &n("attn_output.weight"), e, e, t.wtype, s + 2);
        tensor(&mut w, &n("ffn_norm.weight"), e, 1, GgmlType::F32, s + 3);
        tensor(&mut w, &n("ffn_up.weight"), e, 2 * t.n_ff, t.wtype, s + 4);
        tensor(&mut w, &n("ffn_down.weight"), t.n_ff, e, t.wtype, s + 5);
    }
    w
}

/// A tiny granite: the llama layout with Granite's four multipliers, NORM RoPE and
/// optional biases on attn_output and the FFN.
pub fn tiny_granite(t: &Tiny) -> GgufWriter {
    let hd = t.n_embd / t.n_head;
    let mut w = tiny_base("granite", t, hd, t.n_ff);
    w.kv("granite.embedding_scale", Value::F32(12.0))
        .kv("granite.residual_scale", Value::F32(0.22))
        .kv("granite.attention.scale", Value::F32(0.2))
        .kv("granite.logit_scale", Value::F32(8.0));
    for il in 0..t.n_layer {
        let s = 5000 * (il as u64 + 1);
        let n = |x: &str| format!("blk.{il}.{x}");
        attention(&mut w, t, il, hd, s);
        tensor(&mut w, &n("attn_output.bias"), t.n_embd, 1, GgmlType::F32, s + 6);
        tensor(&mut w, &n("ffn_gate.weight"), t.n_embd, t.n_ff, t.wtype, s + 7);
        tensor(&mut w, &n("ffn_up.weight"), t.n_embd, t.n_ff, t.wtype, s + 8);
        tensor(&mut w, &n("ffn_down.weight"), t.n_ff, t.n_embd, t.wtype, s + 9);
        tensor(&mut w, &n("ffn_up.bias"), t.n_ff, 1, GgmlType::F32, s + 10);
        tensor(&mut w, &n("ffn_down.bias"), t.n_embd, 1, GgmlType::F32, s + 11);
    }
    w
}
