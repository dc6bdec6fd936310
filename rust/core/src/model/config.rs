//! Hyper-parameters read from GGUF metadata, per architecture, with every check that
//! makes the forward pass safe to run (shapes agree with the tensors, heads divide).

use crate::error::{Error, Result};
use crate::gguf::Gguf;

pub const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2", "gemma3"];

/// Limits on hyper-parameters, checked before anything is sized from them (the file is
/// untrusted). Each is far beyond any published model of the supported families.
const LIMITS: &[(&str, usize)] = &[
    ("block_count", 1024),
    ("embedding_length", 1 << 17),
    ("feed_forward_length", 1 << 20),
    ("attention.head_count", 1 << 12),
    ("attention.head_count_kv", 1 << 12),
    ("attention.key_length", 1 << 13),
    ("attention.value_length", 1 << 13),
    ("context_length", 1 << 24),
    ("vocab_size", 1 << 22),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// SmolLM2, Llama 2/3, TinyLlama, Mistral: RMSNorm, RoPE (normal layout), SwiGLU.
    Llama,
    /// Qwen2: as llama with q/k/v biases and NEOX RoPE.
    Qwen2,
    /// Gemma 3: q/k norms, post-norms, GeGLU, scaled embeddings, interleaved SWA.
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head width of Q and K (`attention.key_length`, default n_embd / n_head).
    pub head_dim: usize,
    /// Per-head width of V.
    pub head_dim_v: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Gemma 3's local (sliding-window) layers use their own RoPE base.
    pub rope_base_swa: f32,
    /// Number of leading dims of each head that are rotated.
    pub n_rot: usize,
    /// NEOX layout rotates pairs (i, i + n_rot/2); normal layout rotates (2i, 2i+1).
    /// llama.cpp's converter permutes llama Q/K so that the normal layout is right there.
    pub rope_neox: bool,
    /// Sliding window (in tokens) and which layers use it.
    pub swa_window: Option<usize>,
    pub swa_layers: Vec<bool>,
    /// Multiplier applied to Q·K (1/sqrt(head_dim) unless the architecture says else).
    pub attn_scale: f32,
    /// Gemma multiplies embeddings by sqrt(n_embd).
    pub embd_scale: Option<f32>,
    pub final_logit_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config> {
        let arch_name = g
            .get_str("general.architecture")?
            .ok_or_else(|| Error::model("metadata key \"general.architecture\" is missing"))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(Error::model(format!(
                    "unsupported architecture {other:?}; supported architectures: {}",
                    SUPPORTED_ARCHS.join(", ")
                )))
            }
        };
        let a = arch_name;
        let req = |k: &str| -> Result<usize> {
            let key = format!("{a}.{k}");
            match g.get_usize(&key)? {
                Some(v) if v > 0 => Ok(v),
                Some(v) => Err(Error::model(format!("metadata key {key:?} is {v}; it must be positive"))),
                None => Err(Error::model(format!("required metadata key {key:?} is missing"))),
            }
        };
        let opt_f = |k: &str| g.get_f32(&format!("{a}.{k}"));
        for &(k, max) in LIMITS {
            let key = format!("{a}.{k}");
            if let Some(v) = g.get_usize(&key)? {
                if v > max {
                    return Err(Error::model(format!("metadata key {key:?} is {v}; the limit is {max}")));
                }
            }
        }
        let n_embd = req("embedding_length")?;
        let n_layer = req("block_count")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = g.get_usize(&format!("{a}.attention.head_count_kv"))?.unwrap_or(n_head);
        let n_ff = req("feed_forward_length")?;
        let n_ctx_train = req("context_length")?;
        let head_dim = g.get_usize(&format!("{a}.attention.key_length"))?.unwrap_or(n_embd / n_head);
        let head_dim_v = g.get_usize(&format!("{a}.attention.value_length"))?.unwrap_or(head_dim);
        let n_rot = g.get_usize(&format!("{a}.rope.dimension_count"))?.unwrap_or(head_dim);
        let rms_eps = opt_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
        let rope_base = opt_f("rope.freq_base")?.unwrap_or(10000.0);
        let n_vocab = match g.get_usize(&format!("{a}.vocab_size"))? {
            Some(v) => v,
            None => g.get_str_array("tokenizer.ggml.tokens")?.map(|t| t.len()).ok_or_else(|| {
                Error::model("neither \"<arch>.vocab_size\" nor \"tokenizer.ggml.tokens\" gives the vocabulary size")
            })?,
        };

        if n_vocab == 0 || n_vocab > 1 << 22 {
            return Err(Error::model(format!("vocabulary size {n_vocab} is out of range (1 to {})", 1 << 22)));
        }
        // Every layer needs at least 9 tensors: a block count beyond that is a lie.
        if n_layer * 9 > g.tensors().len() {
            return Err(Error::model(format!(
                "block_count {n_layer} needs at least {} tensors but the file has {}",
                n_layer * 9,
                g.tensors().len()
            )));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(Error::model(format!(
                "attention.head_count ({n_head}) must be a multiple of attention.head_count_kv ({n_head_kv})"
            )));
        }
        if head_dim == 0 || n_rot > head_dim || n_rot % 2 != 0 {
            return Err(Error::model(format!("rope.dimension_count {n_rot} must be even and at most the head size {head_dim}")));
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !positive(rms_eps) {
            return Err(Error::model(format!("{a}.attention.layer_norm_rms_epsilon is {rms_eps}; it must be a positive number")));
        }
        if !positive(rope_base) {
            return Err(Error::model(format!("{a}.rope.freq_base is {rope_base}; it must be a positive number")));
        }

        let mut cfg = Config {
            arch,
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_v,
            n_ff,
            rms_eps,
            rope_base,
            rope_base_swa: rope_base,
            n_rot,
            rope_neox: arch != Arch::Llama,
            swa_window: None,
            swa_layers: vec![false; n_layer],
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embd_scale: None,
            final_logit_softcap: None,
        };
        if arch == Arch::Gemma3 {
            cfg.embd_scale = Some((n_embd as f32).sqrt());
            // Gemma's query_pre_attn_scalar equals head_dim for all sizes but 27B,
            // which scales by n_embd / n_head (as llama.cpp does).
            if n_layer == 62 {
                cfg.attn_scale = 1.0 / ((n_embd / n_head) as f32).sqrt();
            }
            cfg.final_logit_softcap = opt_f("final_logit_softcapping")?.filter(|&c| c > 0.0);
            if let Some(w) = g.get_usize("gemma3.attention.sliding_window")?.filter(|&w| w > 0) {
                cfg.swa_window = Some(w);
                // Five local layers, then one global: layer il is local unless il % 6 == 5.
                let pattern = g.get_usize("gemma3.attention.sliding_window_pattern")?.unwrap_or(6);
                cfg.swa_layers = (0..n_layer).map(|il| pattern == 0 || il % pattern < pattern - 1).collect();
                cfg.rope_base_swa = opt_f("rope.freq_base_swa")?.unwrap_or(10000.0);
            }
        }
        Ok(cfg)
    }

    pub fn kv_dim_k(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    pub fn kv_dim_v(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}
