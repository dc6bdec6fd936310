//! Hyper-parameters read from GGUF metadata, per architecture, with every check that
//! makes the forward pass safe to run (shapes agree with the tensors, heads divide).

use crate::error::{Error, Result};
use crate::gguf::Gguf;

pub const SUPPORTED_ARCHS: &[&str] =
    &["llama", "qwen2", "gemma3", "qwen3", "qwen3moe", "phi3", "granite", "bert", "nomic-bert"];

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
    ("expert_feed_forward_length", 1 << 20),
    // llama.cpp's LLAMA_MAX_EXPERTS.
    ("expert_count", 512),
    ("expert_used_count", 512),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// SmolLM2, Llama 2/3, TinyLlama, Mistral: RMSNorm, RoPE (normal layout), SwiGLU.
    Llama,
    /// Qwen2: as llama with q/k/v biases and NEOX RoPE.
    Qwen2,
    /// Gemma 3: q/k norms, post-norms, GeGLU, scaled embeddings, interleaved SWA.
    Gemma3,
    /// Qwen3: per-head q/k RMSNorm before RoPE, no biases, NEOX RoPE.
    Qwen3,
    /// Qwen3's mixture of experts: qwen3 attention; a softmax router picks
    /// `expert_used_count` of `expert_count` SwiGLU experts per token.
    Qwen3Moe,
    /// Phi-3/3.5/4-mini: fused q/k/v and gate/up tensors, partial rotary, LongRoPE
    /// factors, NEOX RoPE, Q scaled before attention.
    Phi3,
    /// IBM Granite 3.x: llama with embedding, residual, attention and logit multipliers.
    Granite,
    /// BERT encoders (BERT, MiniLM, BGE, E5): learned positions, token-type embeddings,
    /// LayerNorm after each block, GELU feed-forward, bidirectional attention (bert.rs).
    Bert,
    /// nomic-embed-text: the BERT layout with NEOX RoPE instead of positions, a fused
    /// attn_qkv and a SwiGLU feed-forward.
    NomicBert,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Phi3 => "phi3",
            Arch::Granite => "granite",
            Arch::Bert => "bert",
            Arch::NomicBert => "nomic-bert",
        }
    }

    /// An encoder: it embeds, it cannot generate (no output matrix, no KV cache).
    pub fn is_encoder(self) -> bool {
        matches!(self, Arch::Bert | Arch::NomicBert)
    }
}

/// How an embedding is pooled from a sequence's hidden states (`{arch}.pooling_type`,
/// llama.cpp's `llama_pooling_type` numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// One vector per token (0): nothing to pool, so no embedding endpoint serves it.
    None,
    /// The average of every token's hidden state (1).
    Mean,
    /// The first token's ([CLS]) hidden state (2).
    Cls,
    /// The last token's hidden state (3): decoder embedders such as Qwen3-Embedding.
    Last,
    /// A reranker's classification head over CLS (4): scores, not embeddings.
    Rank,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::None => "none",
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
            Pooling::Rank => "rank",
        }
    }
}

/// The mixture-of-experts feed-forward of a layer (qwen3moe), as llama.cpp's
/// `build_moe_ffn` runs it: router logits → softmax over all experts → the
/// `n_expert_used` largest → their probabilities, renormalised to sum 1 when
/// `norm_weights`, times `weights_scale` → Σ weight · down(silu(gate x) · up x).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Rows of each expert's gate/up (`expert_feed_forward_length`).
    pub n_ff_exp: usize,
    pub norm_weights: bool,
    pub weights_scale: f32,
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
    /// RoPE positions times this (1 / `rope.scaling.factor` with linear scaling; 1
    /// without). Gemma 3's local layers never scale.
    pub rope_freq_scale: f32,
    /// RoPE's cos and sin times this (`rope.scaling.attn_factor`: LongRoPE's magnitude
    /// correction, so q·k is scaled by its square).
    pub rope_attn_factor: f32,
    /// Whether RoPE runs at all (Granite's `rope.scaling.finetuned` switch).
    pub use_rope: bool,
    /// The context LongRoPE's short factors cover (`rope.scaling.original_context_length`,
    /// default `context_length`): llama.cpp takes the long factors when its context per
    /// sequence is larger.
    pub n_ctx_orig: usize,
    /// Phi-3 multiplies Q by 1/sqrt(head_dim) after RoPE and attends with scale 1
    /// (`attn_scale` is then 1): the same math, but Q is rounded to f16 after the scale.
    pub q_scale: Option<f32>,
    /// Granite: each block's output times this before the residual add.
    pub residual_scale: Option<f32>,
    /// Granite: logits times 1 / this.
    pub logit_scale: Option<f32>,
    /// Set for the mixture-of-experts architectures (every layer is MoE).
    pub moe: Option<MoeConfig>,
    /// `{arch}.pooling_type` when the file sets it: such a file is an embedding model
    /// (Ollama's "embedding" capability); encoders embed either way.
    pub pooling: Option<Pooling>,
    /// `{arch}.attention.causal` (default true; BERT converters write false).
    pub causal: bool,
    /// LayerNorm epsilon (`attention.layer_norm_epsilon`), for the encoders.
    pub norm_eps: f32,
    /// Rows of the token-type embedding (`tokenizer.ggml.token_type_count`), encoders.
    pub n_token_types: usize,
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
            "qwen3" => Arch::Qwen3,
            "qwen3moe" => Arch::Qwen3Moe,
            "phi3" => Arch::Phi3,
            "granite" => Arch::Granite,
            "bert" => Arch::Bert,
            "nomic-bert" => Arch::NomicBert,
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
        // A MoE file's dense width is informational (llama.cpp reads it as optional).
        let n_ff = if arch == Arch::Qwen3Moe {
            g.get_usize(&format!("{a}.feed_forward_length"))?.unwrap_or(0)
        } else {
            req("feed_forward_length")?
        };
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
        // Every layer has at least 6 tensors (phi3's fused ones; 8 in an encoder, 9
        // elsewhere): a block count beyond that is a lie.
        let per_layer = match arch {
            Arch::Phi3 => 6,
            a if a.is_encoder() => 8,
            _ => 9,
        };
        if n_layer * per_layer > g.tensors().len() {
            return Err(Error::model(format!(
                "block_count {n_layer} needs at least {} tensors but the file has {}",
                n_layer * per_layer,
                g.tensors().len()
            )));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(Error::model(format!(
                "attention.head_count ({n_head}) must be a multiple of attention.head_count_kv ({n_head_kv})"
            )));
        }
        if head_dim == 0 || n_rot > head_dim || n_rot % 2 != 0 {
            return Err(Error::model(format!(
                "rope.dimension_count {n_rot} must be even and at most the head size {head_dim}"
            )));
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !positive(rms_eps) {
            return Err(Error::model(format!(
                "{a}.attention.layer_norm_rms_epsilon is {rms_eps}; it must be a positive number"
            )));
        }
        if !positive(rope_base) {
            return Err(Error::model(format!("{a}.rope.freq_base is {rope_base}; it must be a positive number")));
        }

        // RoPE scaling, read for every architecture as llama.cpp's load_hparams does.
        let scaling = g.get_str(&format!("{a}.rope.scaling.type"))?.unwrap_or("linear");
        let factor = match opt_f("rope.scaling.factor")? {
            Some(f) => Some(f),
            None => opt_f("rope.scale_linear")?,
        }
        .filter(|&f| f != 0.0);
        let rope_freq_scale = match scaling {
            "none" => 1.0,
            "linear" | "longrope" => factor.map_or(1.0, |f| 1.0 / f),
            "yarn" => {
                return Err(Error::model(format!(
                    "{a}.rope.scaling.type is \"yarn\", which edgelm does not implement yet; use a file without YaRN scaling \
                     (YaRN only matters beyond the model's original context)"
                )))
            }
            other => return Err(Error::model(format!("{a}.rope.scaling.type is {other:?}; expected none, linear, yarn or longrope"))),
        };
        if !positive(rope_freq_scale) {
            return Err(Error::model(format!(
                "{a}.rope.scaling.factor gives a RoPE scale of {rope_freq_scale}; it must be a positive number"
            )));
        }
        let rope_attn_factor = opt_f("rope.scaling.attn_factor")?.unwrap_or(1.0);
        if !positive(rope_attn_factor) {
            return Err(Error::model(format!(
                "{a}.rope.scaling.attn_factor is {rope_attn_factor}; it must be a positive number"
            )));
        }
        let n_ctx_orig = g
            .get_usize(&format!("{a}.rope.scaling.original_context_length"))?
            .filter(|&n| n > 0)
            .unwrap_or(n_ctx_train);
        let pooling = match g.get_u64(&format!("{a}.pooling_type"))? {
            None => None,
            Some(0) => Some(Pooling::None),
            Some(1) => Some(Pooling::Mean),
            Some(2) => Some(Pooling::Cls),
            Some(3) => Some(Pooling::Last),
            Some(4) => Some(Pooling::Rank),
            Some(v) => {
                return Err(Error::model(format!(
                    "{a}.pooling_type is {v}; expected 0 (none), 1 (mean), 2 (cls), 3 (last) or 4 (rank)"
                )))
            }
        };
        let causal = g.get_bool(&format!("{a}.attention.causal"))?.unwrap_or(true);

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
            // llama.cpp: NORM (pairs 2i, 2i+1) for llama and granite, whose converters permute
            // Q/K to it; NEOX for every other architecture here.
            rope_neox: !matches!(arch, Arch::Llama | Arch::Granite),
            swa_window: None,
            swa_layers: vec![false; n_layer],
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embd_scale: None,
            final_logit_softcap: None,
            rope_freq_scale,
            rope_attn_factor,
            use_rope: true,
            n_ctx_orig,
            q_scale: None,
            residual_scale: None,
            logit_scale: None,
            moe: None,
            pooling,
            causal,
            norm_eps: 1e-12,
            n_token_types: 0,
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
        match arch {
            Arch::Qwen3 | Arch::Qwen3Moe if n_rot != head_dim => {
                return Err(Error::model(format!(
                    "{a}.rope.dimension_count is {n_rot}; {a} rotates whole heads ({head_dim})"
                )));
            }
            Arch::Qwen3Moe => {
                let n_expert = req("expert_count")?;
                let n_expert_used = req("expert_used_count")?;
                if n_expert_used > n_expert {
                    return Err(Error::model(format!(
                        "{a}.expert_used_count ({n_expert_used}) is larger than {a}.expert_count ({n_expert})"
                    )));
                }
                // llama.cpp: expert_feed_forward_length, else feed_forward_length / used.
                let n_ff_exp = match g.get_usize(&format!("{a}.expert_feed_forward_length"))?.filter(|&n| n > 0) {
                    Some(n) => n,
                    None if n_ff >= n_expert_used => n_ff / n_expert_used,
                    None => {
                        return Err(Error::model(format!(
                            "{a}.expert_feed_forward_length is missing (and {a}.feed_forward_length does not give it)"
                        )))
                    }
                };
                // llama.cpp b11434's qwen3moe graph always renormalises the chosen
                // weights and never scales them (Qwen3-MoE's norm_topk_prob is true and its
                // converter writes neither key). edgelm also honours the keys when a file
                // sets them, with llama.cpp's behaviour as the default.
                let norm_weights = g.get_bool(&format!("{a}.expert_weights_norm"))?.unwrap_or(true);
                let weights_scale = opt_f("expert_weights_scale")?.filter(|&s| s != 0.0).unwrap_or(1.0);
                if !weights_scale.is_finite() {
                    return Err(Error::model(format!(
                        "{a}.expert_weights_scale is {weights_scale}; it must be a finite number"
                    )));
                }
                if g.get_usize(&format!("{a}.expert_group_count"))?.unwrap_or(0) > 1 {
                    return Err(Error::model(format!(
                        "{a}.expert_group_count is set; grouped expert selection is not supported"
                    )));
                }
                cfg.moe = Some(MoeConfig { n_expert, n_expert_used, n_ff_exp, norm_weights, weights_scale });
            }
            Arch::Phi3 => {
                if cfg.q_dim() != n_embd {
                    return Err(Error::model(format!(
                        "phi3 needs head_count × key_length = embedding_length, got {n_head} × {head_dim} = {} ≠ {n_embd}",
                        cfg.q_dim()
                    )));
                }
                // `phi3.attention.sliding_window` is read and then switched off by llama.cpp
                // b11434 ("Phi SWA is currently disabled", llama.cpp PR 13676: converted
                // files carry windows the models were not run with), so every layer attends
                // to the whole context here too.
                cfg.q_scale = Some(1.0 / (head_dim as f32).sqrt());
                cfg.attn_scale = 1.0;
            }
            Arch::Granite => {
                let logit = opt_f("logit_scale")?
                    .ok_or_else(|| Error::model("required metadata key \"granite.logit_scale\" is missing"))?;
                if !positive(logit) {
                    return Err(Error::model(format!("granite.logit_scale is {logit}; it must be a positive number")));
                }
                cfg.logit_scale = Some(logit);
                // Zero means "not set" for these, as in llama.cpp.
                let nonzero = |k: &str| -> Result<Option<f32>> {
                    match opt_f(k)? {
                        Some(v) if v != 0.0 && !v.is_finite() => {
                            Err(Error::model(format!("granite.{k} is {v}; it must be a finite number")))
                        }
                        v => Ok(v.filter(|&v| v != 0.0)),
                    }
                };
                cfg.residual_scale = nonzero("residual_scale")?;
                cfg.embd_scale = nonzero("embedding_scale")?;
                if let Some(s) = nonzero("attention.scale")? {
                    cfg.attn_scale = s;
                }
                cfg.use_rope = g.get_bool("granite.rope.scaling.finetuned")?.unwrap_or(true);
                if g.get_usize("granite.expert_count")?.unwrap_or(0) > 0 {
                    return Err(Error::model(
                        "granite.expert_count is set: Granite MoE files are not supported (dense granite is)",
                    ));
                }
                if g.get("granite.deepstack_mapping").is_some() {
                    return Err(Error::model(
                        "granite.deepstack_mapping is set: Granite Vision's deepstack layers are not supported",
                    ));
                }
            }
            Arch::Bert | Arch::NomicBert => {
                // llama.cpp reads both as required for these architectures.
                cfg.norm_eps = opt_f("attention.layer_norm_epsilon")?.ok_or_else(|| {
                    Error::model(format!("required metadata key \"{a}.attention.layer_norm_epsilon\" is missing"))
                })?;
                if !positive(cfg.norm_eps) {
                    return Err(Error::model(format!(
                        "{a}.attention.layer_norm_epsilon is {}; it must be a positive number",
                        cfg.norm_eps
                    )));
                }
                cfg.n_token_types = match g.get_usize("tokenizer.ggml.token_type_count")? {
                    Some(n) if n > 0 && n <= 1 << 16 => n,
                    Some(n) => {
                        return Err(Error::model(format!(
                            "tokenizer.ggml.token_type_count is {n}; expected 1 to 65536"
                        )))
                    }
                    None => {
                        return Err(Error::model(format!(
                            "{a} needs \"tokenizer.ggml.token_type_count\" (the token-type rows); re-convert the model"
                        )))
                    }
                };
                // BERT adds learned positions; nomic-bert rotates (NEOX, whole heads unless
                // rope.dimension_count says else).
                cfg.use_rope = arch == Arch::NomicBert;
                if cfg.head_dim_v != cfg.head_dim {
                    return Err(Error::model(format!(
                        "{a} needs equal key and value head sizes, got {} and {}",
                        cfg.head_dim, cfg.head_dim_v
                    )));
                }
            }
            _ => {}
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
