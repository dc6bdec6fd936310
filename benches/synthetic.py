"""Synthetic GGUF files of real model shapes, for benchmarks: each family's exact tensor
layout and metadata with random weights (σ 0.02, one random 4M-value block tiled: the
values do not matter for speed), and the tiny fixtures' byte-level BPE padded to the
real vocabulary size (the output matrix is a large share of a small model's reads).
No weights of these models can be downloaded here. `write_f16` writes tensor by tensor,
so memory holds one tensor at a time; quantize the F16 file with llama-quantize or
`edgelm quantize` (byte-identical).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_tiny_models import vocab  # noqa: E402  (the fixtures' tokenizer)

# Hyper-parameters of the published models (their config.json), layers cut only for the MoE.
SHAPES: dict[str, dict] = {  # type: ignore[type-arg]
    "llama-3.2-1b": dict(
        arch="llama",
        n_embd=2048,
        n_layer=16,
        n_head=32,
        n_head_kv=8,
        head_dim=64,
        n_ff=8192,
        n_vocab=128256,
        tied=True,
        ctx=131072,
        rope_base=500000.0,
        eps=1e-5,
    ),
    "llama-3.2-3b": dict(
        arch="llama",
        n_embd=3072,
        n_layer=28,
        n_head=24,
        n_head_kv=8,
        head_dim=128,
        n_ff=8192,
        n_vocab=128256,
        tied=True,
        ctx=131072,
        rope_base=500000.0,
        eps=1e-5,
    ),
    "qwen3-1.7b": dict(
        arch="qwen3",
        n_embd=2048,
        n_layer=28,
        n_head=16,
        n_head_kv=8,
        head_dim=128,
        n_ff=6144,
        n_vocab=151936,
        tied=True,
        ctx=40960,
        rope_base=1e6,
        eps=1e-6,
    ),
    "phi4-mini": dict(
        arch="phi3",
        n_embd=3072,
        n_layer=32,
        n_head=24,
        n_head_kv=8,
        head_dim=128,
        n_ff=8192,
        n_vocab=200064,
        tied=True,
        ctx=131072,
        orig_ctx=4096,
        n_rot=96,
        rope_base=10000.0,
        eps=1e-5,
    ),
    "qwen3-30b-a3b-8l": dict(
        arch="qwen3moe",
        n_embd=2048,
        n_layer=8,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_expert=128,
        n_used=8,
        n_ff_exp=768,
        n_ff=6144,
        n_vocab=151936,
        tied=False,
        ctx=40960,
        rope_base=1e6,
        eps=1e-6,
    ),
}
# The same layouts on tiny shapes (rows whole 256-blocks, so Q4_K_M applies).
TINY: dict[str, dict] = {  # type: ignore[type-arg]
    "qwen3-tiny": dict(
        SHAPES["qwen3-1.7b"], n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=4096
    ),
    "phi4-tiny": dict(
        SHAPES["phi4-mini"], n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=4096, n_rot=48
    ),
    "qwen3moe-tiny": dict(
        SHAPES["qwen3-30b-a3b-8l"],
        n_embd=256,
        n_layer=2,
        n_head=4,
        n_head_kv=2,
        head_dim=64,
        n_expert=16,
        n_used=4,
        n_ff_exp=256,
        n_vocab=4096,
    ),
}


def tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:  # type: ignore[type-arg]
    """(name, numpy shape) of every tensor of the layout, in the order converters write."""
    e, hd, L = s["n_embd"], s["head_dim"], s["n_layer"]
    qd, kvd = s["n_head"] * hd, s["n_head_kv"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s["n_vocab"], e)), ("output_norm.weight", (e,))]
    if not s["tied"]:
        out.append(("output.weight", (s["n_vocab"], e)))
    if s["arch"] == "phi3":
        out += [("rope_factors_long.weight", (s["n_rot"] // 2,)), ("rope_factors_short.weight", (s["n_rot"] // 2,))]
    for il in range(L):
        p = f"blk.{il}."
        out.append((p + "attn_norm.weight", (e,)))
        if s["arch"] == "phi3":
            out.append((p + "attn_qkv.weight", (qd + 2 * kvd, e)))
        else:
            out += [(p + "attn_q.weight", (qd, e)), (p + "attn_k.weight", (kvd, e)), (p + "attn_v.weight", (kvd, e))]
        if s["arch"].startswith("qwen3"):
            out += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        out += [(p + "attn_output.weight", (e, qd)), (p + "ffn_norm.weight", (e,))]
        if s["arch"] == "qwen3moe":
            x, f = s["n_expert"], s["n_ff_exp"]
            out += [
                (p + "ffn_gate_inp.weight", (x, e)),
                (p + "ffn_gate_exps.weight", (x, f, e)),
                (p + "ffn_up_exps.weight", (x, f, e)),
                (p + "ffn_down_exps.weight", (x, e, f)),
            ]
        elif s["arch"] == "phi3":
            out += [(p + "ffn_up.weight", (2 * s["n_ff"], e)), (p + "ffn_down.weight", (e, s["n_ff"]))]
        else:
            out += [
                (p + "ffn_gate.weight", (s["n_ff"], e)),
                (p + "ffn_up.weight", (s["n_ff"], e)),
                (p + "ffn_down.weight", (e, s["n_ff"])),
            ]
    return out


def write_f16(path: Path, s: dict) -> None:  # type: ignore[type-arg]
    """The layout with random weights (σ 0.02; norms 1; router and RoPE factors F32),
    written tensor by tensor so that memory holds one tensor at a time."""
    import gguf

    a = s["arch"]
    w = gguf.GGUFWriter(str(path), a)
    # Not "phi3": llama.cpp's vocabulary loader then wants SentencePiece's "</s>".
    w.add_name(f"bench-{a}-synthetic".replace("phi3", "phi"))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_vocab_size(s["n_vocab"])
    if a.startswith("qwen3"):
        w.add_key_length(s["head_dim"])
        w.add_value_length(s["head_dim"])
        w.add_rope_dimension_count(s["head_dim"])
    if a == "qwen3moe":
        w.add_expert_count(s["n_expert"])
        w.add_expert_used_count(s["n_used"])
        w.add_expert_feed_forward_length(s["n_ff_exp"])
    if a == "phi3":
        w.add_rope_dimension_count(s["n_rot"])
        w.add_rope_scaling_orig_ctx_len(s["orig_ctx"])
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(s["ctx"] / s["orig_ctx"]) / math.log(s["orig_ctx"])))
        w.add_sliding_window(0)
    toks, types, merges = vocab()
    pad = s["n_vocab"] - len(toks)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if a.startswith("qwen3") else "llama-bpe")
    w.add_token_list(toks[:-2] + [f"extra{i}" for i in range(pad)] + toks[-2:])
    w.add_token_types(types[:-2] + [int(gguf.TokenType.NORMAL)] * pad + types[-2:])
    w.add_token_merges(merges)
    w.add_bos_token_id(s["n_vocab"] - 2)
    w.add_eos_token_id(s["n_vocab"] - 1)
    w.add_add_bos_token(False)

    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22) * 0.02).astype(np.float16)  # tiled: the values do not matter here
    layout = tensors(s)

    def data(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            if name.startswith("rope_factors"):
                return np.geomspace(1.0, 8.0 if "long" in name else 1.5, shape[0]).astype(np.float32)
            return np.ones(shape, np.float32)
        if name.endswith("ffn_gate_inp.weight"):
            return (rng.standard_normal(shape) * 0.02).astype(np.float32)
        return np.resize(block, shape)

    for name, shape in layout:
        dt = np.float32 if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in layout:
        w.write_tensor_data(data(name, shape))
    w.close()
