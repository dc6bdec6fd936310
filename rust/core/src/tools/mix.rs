//! Which type each tensor gets: llama.cpp's file types (`llama_ftype`) and the rules of
//! `llama_tensor_get_type` (src/llama-quant.cpp, b11434) for the mixes built from
//! Q2_K…Q6_K and the legacy 32-blocks.
//!
//! The rules are kept in llama.cpp's order and with its counters, so a file quantized
//! here gets, tensor for tensor, the types `llama-quantize` gives it (tests compare the
//! two on SmolLM2). What is left out, on purpose:
//! - the IQ* and TQ* families and MXFP4 (no encoders here; the parser refuses them by
//!   name);
//! - the 8-expert rules (edgelm runs no mixture-of-experts model; a file with
//!   `expert_count` > 1 needs `--pure`);
//! - importance matrices (without one, llama.cpp's encoders are the `_ref` ones, which
//!   is what `quant::quantize_row` reproduces bit for bit).

// `x % n == 0` as in llama.cpp's source, which these lines mirror.
#![allow(clippy::manual_is_multiple_of)]

use crate::error::{Error, Result};
use crate::quant::GgmlType;

/// A whole-file target, `llama_ftype` numbering (written to `general.file_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

/// (file type, name, `llama_ftype` id, default tensor type).
const FILE_TYPES: [(FileType, &str, u32, GgmlType); 17] = [
    (FileType::F32, "F32", 0, GgmlType::F32),
    (FileType::F16, "F16", 1, GgmlType::F16),
    (FileType::BF16, "BF16", 32, GgmlType::BF16),
    (FileType::Q4_0, "Q4_0", 2, GgmlType::Q4_0),
    (FileType::Q4_1, "Q4_1", 3, GgmlType::Q4_1),
    (FileType::Q5_0, "Q5_0", 8, GgmlType::Q5_0),
    (FileType::Q5_1, "Q5_1", 9, GgmlType::Q5_1),
    (FileType::Q8_0, "Q8_0", 7, GgmlType::Q8_0),
    (FileType::Q2_K, "Q2_K", 10, GgmlType::Q2_K),
    (FileType::Q3_K_S, "Q3_K_S", 11, GgmlType::Q3_K),
    (FileType::Q3_K_M, "Q3_K_M", 12, GgmlType::Q3_K),
    (FileType::Q3_K_L, "Q3_K_L", 13, GgmlType::Q3_K),
    (FileType::Q4_K_S, "Q4_K_S", 14, GgmlType::Q4_K),
    (FileType::Q4_K_M, "Q4_K_M", 15, GgmlType::Q4_K),
    (FileType::Q5_K_S, "Q5_K_S", 16, GgmlType::Q5_K),
    (FileType::Q5_K_M, "Q5_K_M", 17, GgmlType::Q5_K),
    (FileType::Q6_K, "Q6_K", 18, GgmlType::Q6_K),
];

/// llama-quantize's shorthands: a bare K type means its medium mix.
const ALIASES: [(&str, FileType); 3] =
    [("Q3_K", FileType::Q3_K_M), ("Q4_K", FileType::Q4_K_M), ("Q5_K", FileType::Q5_K_M)];

impl FileType {
    pub fn parse(s: &str) -> Result<FileType> {
        let up = s.trim().to_ascii_uppercase();
        if let Some(&(t, ..)) = FILE_TYPES.iter().find(|(_, n, ..)| *n == up) {
            return Ok(t);
        }
        if let Some(&(_, t)) = ALIASES.iter().find(|(n, _)| *n == up) {
            return Ok(t);
        }
        let known: Vec<&str> = FILE_TYPES.iter().map(|(_, n, ..)| *n).collect();
        let hint = if up.starts_with("IQ") || up.starts_with("TQ") || up == "MXFP4_MOE" || up == "Q2_K_S" {
            " (this type needs an importance matrix or encoders edgelm does not have; use llama-quantize for it)"
        } else {
            ""
        };
        Err(Error::invalid(format!(
            "unknown quantization type {s:?}{hint}; choose one of {} (Q4_K means Q4_K_M, Q5_K Q5_K_M, Q3_K Q3_K_M)",
            known.join(", ")
        )))
    }

    fn row(self) -> &'static (FileType, &'static str, u32, GgmlType) {
        FILE_TYPES.iter().find(|r| r.0 == self).expect("every FileType has a row")
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The `general.file_type` value (`enum llama_ftype`).
    pub fn id(self) -> u32 {
        self.row().2
    }

    pub fn default_type(self) -> GgmlType {
        self.row().3
    }

    pub fn names() -> Vec<&'static str> {
        FILE_TYPES.iter().map(|r| r.1).collect()
    }
}

/// The model facts the rules look at.
#[derive(Clone, Debug)]
pub struct ModelFacts {
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Number of attention-V-like tensors (attn_v, attn_qkv, attn_kv_b) in the file.
    pub n_attention_wv: usize,
    /// No `output.weight`: the token embedding doubles as the output matrix.
    pub tied_embeddings: bool,
    /// `<arch>.expert_count` (0 for dense models): llama.cpp gives 8-expert models
    /// (Mixtral's shape) wider attention tensors.
    pub n_expert: usize,
}

impl ModelFacts {
    fn n_gqa(&self) -> usize {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }
    fn is_falcon(&self) -> bool {
        self.arch == "falcon"
    }
    /// `LLM_TYPE_70B` as llama-quant infers it: the only model size the rules use.
    fn is_70b(&self) -> bool {
        self.arch == "llama" && self.n_layer == 80 && self.n_head != self.n_head_kv
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    // Same tests, same order as `tensor_get_category`: first match wins.
    if name == "output.weight" {
        Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        AttnQkv
    } else if name.contains("attn_kv_b.weight") {
        AttnKvB
    } else if name.contains("attn_v.weight") {
        AttnV
    } else if name.contains("attn_k.weight") {
        AttnK
    } else if name.contains("attn_q.weight") {
        AttnQ
    } else if name.contains("attn_output.weight") {
        AttnOutput
    } else if name.contains("ffn_up") {
        FfnUp
    } else if name.contains("ffn_gate") {
        FfnGate
    } else if name.contains("ffn_down") {
        FfnDown
    } else {
        Other
    }
}

pub fn is_attention_v(name: &str) -> bool {
    matches!(category(name), Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// `ggml_n_dims`: trailing dimensions of 1 do not count.
fn n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// `tensor_allows_quantization`: only 2-D and 3-D weights, and never norms, gates of
/// experts, positional or token-type embeddings, small convolution or RWKV mixing
/// weights, or the multimodal and audio tensors llama.cpp keeps as they are. (The
/// glm5-next-only exclusions are left out: edgelm does not read that architecture.)
pub fn allows_quantization(name: &str, dims: &[u64]) -> bool {
    if n_dims(dims) < 2 || !name.ends_with("weight") {
        return false;
    }
    const NEVER_CONTAINS: [&str; 35] = [
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    !NEVER_CONTAINS.iter().any(|s| name.contains(s)) && name != "position_embd.weight" && name != "token_types.weight"
}

/// The running state of one pass over the tensors (llama.cpp's `quantize_state_impl`
/// counters): tensors must be visited in `tensor_order`.
pub struct Mixer {
    ftype: FileType,
    pure: bool,
    facts: ModelFacts,
    i_attention_wv: usize,
    i_ffn_down: usize,
    pub n_fallback: usize,
}

/// llama.cpp visits tensors by layer number, then name (`weight_name_comparer`);
/// tensors outside the blocks (layer −1) come first. The counters depend on it.
pub fn tensor_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn layer(n: &str) -> i64 {
        n.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|d| d.parse::<i64>().ok()).unwrap_or(-1)
    }
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

impl Mixer {
    pub fn new(ftype: FileType, pure: bool, facts: ModelFacts) -> Mixer {
        Mixer { ftype, pure, facts, i_attention_wv: 0, i_ffn_down: 0, n_fallback: 0 }
    }

    /// The type for one tensor (call once per tensor, in `tensor_order`).
    pub fn target(&mut self, name: &str, dims: &[u64], current: GgmlType) -> GgmlType {
        if !allows_quantization(name, dims) {
            return current;
        }
        let default = self.ftype.default_type();
        if !default.is_quantized() {
            return default;
        }
        let chosen = if self.pure { default } else { self.rules(name, dims, default) };
        self.fallback(dims[0], chosen)
    }

    /// `tensor_type_fallback`: rows that are not a whole number of 256-blocks take the
    /// nearest 32-block type; rows that are not even a number of 32-blocks stay F16.
    fn fallback(&mut self, n_cols: u64, ty: GgmlType) -> GgmlType {
        use GgmlType::*;
        if n_cols % ty.block_size() as u64 == 0 {
            return ty;
        }
        self.n_fallback += 1;
        let t = match ty {
            Q2_K | Q3_K => Q4_0,
            Q4_K => Q5_0,
            Q5_K => Q5_1,
            Q6_K => Q8_0,
            other => other,
        };
        if n_cols % t.block_size() as u64 == 0 {
            t
        } else {
            F16
        }
    }

    /// `llama_tensor_get_type_impl`, for the file types above.
    fn rules(&mut self, name: &str, dims: &[u64], mut t: GgmlType) -> GgmlType {
        use FileType as F;
        use GgmlType::*;
        let ft = self.ftype;
        let f = &self.facts;
        let use_more_bits =
            |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2;
        let cat = category(name);
        // The embedding of a tied model is also its output matrix, so it gets the
        // output's type.
        if cat == Category::Output || (f.tied_embeddings && cat == Category::TokenEmbd) {
            let block = t.block_size() as u64;
            if f.is_falcon() || dims[0] % block != 0 {
                t = Q8_0;
            } else if t != Q8_0 {
                t = Q6_K;
            }
            return t;
        }
        if cat == Category::TokenEmbd {
            return t;
        }
        match cat {
            Category::AttnV | Category::AttnQkv | Category::AttnKvB => {
                let (i, n) = (self.i_attention_wv, f.n_attention_wv);
                match ft {
                    F::Q2_K => t = if f.n_gqa() >= 4 { Q4_K } else { Q3_K },
                    F::Q3_K_M => t = if i < 2 { Q5_K } else { Q4_K },
                    F::Q3_K_L => t = Q5_K,
                    F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => t = Q6_K,
                    F::Q4_K_S if i < 4 => t = Q5_K,
                    _ => {}
                }
                if f.is_70b() && (t == Q3_K || t == Q4_K) {
                    t = Q5_K;
                }
                if f.n_expert == 8 {
                    t = Q8_0;
                }
                self.i_attention_wv += 1;
                // llama.cpp's ATTENTION_QKV branch is unreachable: attn_qkv counts as
                // attention-V above, which is tested first.
            }
            Category::FfnDown => {
                let (i, n) = (self.i_ffn_down, f.n_layer);
                match ft {
                    F::Q2_K => t = Q3_K,
                    F::Q3_K_M => {
                        t = if i < n / 16 {
                            Q5_K
                        } else if !f.is_falcon() || use_more_bits(i, n) {
                            Q4_K
                        } else {
                            Q3_K
                        }
                    }
                    F::Q3_K_L => t = if f.is_falcon() { Q4_K } else { Q5_K },
                    F::Q4_K_M => {
                        if f.is_falcon() {
                            t = if i < n / 16 {
                                Q6_K
                            } else if use_more_bits(i, n) {
                                Q5_K
                            } else {
                                Q4_K
                            };
                        } else if use_more_bits(i, n) {
                            t = Q6_K;
                        }
                    }
                    F::Q5_K_M if use_more_bits(i, n) => t = Q6_K,
                    F::Q4_K_S if !f.is_falcon() && i < n / 8 => t = Q5_K,
                    _ => {}
                }
                self.i_ffn_down += 1;
            }
            Category::AttnK if f.n_expert == 8 => t = Q8_0,
            Category::AttnOutput => {
                if !f.is_falcon() && f.n_expert == 8 {
                    if matches!(ft, F::Q2_K | F::Q3_K_S | F::Q3_K_M | F::Q4_K_S | F::Q4_K_M) {
                        t = Q5_K;
                    }
                } else if !f.is_falcon() {
                    match ft {
                        F::Q2_K => t = Q3_K,
                        F::Q3_K_M => t = Q4_K,
                        F::Q3_K_L => t = Q5_K,
                        _ => {}
                    }
                } else if ft == F::Q3_K_L {
                    t = Q4_K;
                }
            }
            _ => {}
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(n_layer: usize) -> ModelFacts {
        ModelFacts {
            arch: "llama".into(),
            n_layer,
            n_head: 32,
            n_head_kv: 8,
            n_attention_wv: n_layer,
            tied_embeddings: false,
            n_expert: 0,
        }
    }

    #[test]
    fn q4_k_m_gives_more_bits_to_the_layers_llama_cpp_picks() {
        // For 16 layers use_more_bits is true at 0, 1, 4, 7, 10, 13, 14, 15.
        let mut m = Mixer::new(FileType::Q4_K_M, false, facts(16));
        let mut v = Vec::new();
        for i in 0..16 {
            v.push(m.target(&format!("blk.{i}.attn_v.weight"), &[2048, 512], GgmlType::F16));
        }
        let six: Vec<usize> = v.iter().enumerate().filter(|(_, t)| **t == GgmlType::Q6_K).map(|(i, _)| i).collect();
        assert_eq!(six, vec![0, 1, 4, 7, 10, 13, 14, 15]);
        assert!(v.iter().all(|t| *t == GgmlType::Q6_K || *t == GgmlType::Q4_K));
        assert_eq!(m.target("output.weight", &[2048, 49152], GgmlType::F16), GgmlType::Q6_K);
        assert_eq!(m.target("token_embd.weight", &[2048, 49152], GgmlType::F16), GgmlType::Q4_K);
        assert_eq!(m.target("blk.0.attn_norm.weight", &[2048], GgmlType::F32), GgmlType::F32);
    }

    #[test]
    fn eight_expert_models_get_llama_cpps_wider_attention() {
        let f = ModelFacts { n_expert: 8, ..facts(16) };
        let mut m = Mixer::new(FileType::Q4_K_M, false, f.clone());
        assert_eq!(m.target("blk.3.attn_v.weight", &[2048, 512], GgmlType::F16), GgmlType::Q8_0);
        assert_eq!(m.target("blk.3.attn_k.weight", &[2048, 512], GgmlType::F16), GgmlType::Q8_0);
        assert_eq!(m.target("blk.3.attn_output.weight", &[2048, 2048], GgmlType::F16), GgmlType::Q5_K);
        assert_eq!(m.target("blk.3.attn_q.weight", &[2048, 2048], GgmlType::F16), GgmlType::Q4_K);
        // Other expert counts (Qwen3-30B-A3B's 128) keep the dense rules.
        let mut m = Mixer::new(FileType::Q4_K_M, false, ModelFacts { n_expert: 128, ..facts(16) });
        assert_eq!(m.target("blk.3.attn_k.weight", &[2048, 512], GgmlType::F16), GgmlType::Q4_K);
        assert_eq!(m.target("blk.3.attn_output.weight", &[2048, 2048], GgmlType::F16), GgmlType::Q4_K);
    }

    #[test]
    fn rows_that_are_not_whole_k_blocks_fall_back_like_llama_cpp() {
        let mut m = Mixer::new(FileType::Q4_K_S, false, facts(30));
        assert_eq!(m.target("blk.5.attn_q.weight", &[576, 576], GgmlType::F16), GgmlType::Q5_0);
        let mut m = Mixer::new(FileType::Q6_K, false, facts(30));
        assert_eq!(m.target("blk.5.attn_q.weight", &[576, 576], GgmlType::F16), GgmlType::Q8_0);
        let mut m = Mixer::new(FileType::Q4_0, false, facts(30));
        assert_eq!(m.target("blk.5.attn_q.weight", &[40, 8], GgmlType::F16), GgmlType::F16);
        assert_eq!(m.n_fallback, 1);
    }

    #[test]
    fn exclusions_are_llama_cpps_names_not_prefixes() {
        assert!(!allows_quantization("blk.0.time_mix_w1.weight", &[64, 64]));
        assert!(allows_quantization("blk.0.time_mix_key.weight", &[64, 64]));
        assert!(!allows_quantization("blk.0.ffn_norm.weight", &[64, 64]));
        assert!(!allows_quantization("blk.0.attn_q.weight", &[64]));
        assert!(allows_quantization("blk.0.attn_q.weight", &[64, 64, 1]));
    }

    #[test]
    fn names_and_aliases_parse_and_unknown_types_are_refused_by_name() {
        assert_eq!(FileType::parse("q4_k").unwrap(), FileType::Q4_K_M);
        assert_eq!(FileType::parse("Q8_0").unwrap().id(), 7);
        let e = FileType::parse("IQ2_XXS").unwrap_err().to_string();
        assert!(e.contains("IQ2_XXS") && e.contains("importance matrix"), "{e}");
        let e = FileType::parse("Q9").unwrap_err().to_string();
        assert!(e.contains("Q4_K_M"), "{e}");
    }
}
