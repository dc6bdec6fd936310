"""Small llama-shaped ONNX decoders, built with onnx.helper, in the two layouts the
importer reads:

- "float": Hugging Face Optimum's (torch.onnx) layout: ``/model/layers.N/self_attn/
  q_proj/MatMul`` nodes whose weights are [in, out] initializers named ``onnx::MatMul_*``,
  RMSNorm decomposed into Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, rotate-half RoPE from
  cos/sin caches, attention from MatMul/Softmax, SwiGLU from Sigmoid/Mul, an lm_head
  MatMul tied to the embedding;
- "int4": onnxruntime's int4 layout: the same graph with every projection a
  ``com.microsoft`` MatMulNBits node (``/model/layers.N/attn/q_proj/MatMulNBits``), in
  several block sizes, with and without zero points, plus an fp16 scale variant.

`MatMulNBits` below is a reference implementation of that contrib operator's
documented semantics (B: uint8 [N, k_blocks, block/2], codes low nibble first along K;
scales [N·k_blocks]; zero points uint8 packed two per byte per row, default 8;
Y = A · ((B − zp)·scale)ᵀ) for `onnx.reference.ReferenceEvaluator`, which has no
contrib ops of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference.op_run import OpRun


class MatMulNBits(OpRun):
    op_domain = "com.microsoft"

    def _run(
        self,
        a,
        b,
        scales,
        zero_points=None,
        g_idx=None,
        bias=None,
        K=None,
        N=None,  # noqa: N803
        bits=None,
        block_size=None,
        accuracy_level=None,
    ):
        k, n, block = int(K), int(N), int(block_size)
        n_blocks = -(-k // block)
        codes = np.empty((n, n_blocks * block), np.float32)
        packed = b.reshape(n, n_blocks * block // 2)
        codes[:, 0::2] = packed & 0x0F
        codes[:, 1::2] = packed >> 4
        codes = codes.reshape(n, n_blocks, block)
        s = scales.astype(np.float32).reshape(n, n_blocks, 1)
        if zero_points is None:
            z = np.full((n, n_blocks, 1), 8.0, np.float32)
        elif zero_points.dtype == np.uint8:
            zp = zero_points.reshape(n, -1)
            zz = np.empty((n, zp.shape[1] * 2), np.float32)
            zz[:, 0::2] = zp & 0x0F
            zz[:, 1::2] = zp >> 4
            z = zz[:, :n_blocks].reshape(n, n_blocks, 1)
        else:
            z = zero_points.astype(np.float32).reshape(n, n_blocks, 1)
        w = ((codes - z) * s).reshape(n, n_blocks * block)[:, :k]
        return (np.matmul(a.astype(np.float32), w.T).astype(a.dtype),)


@dataclass
class Shape:
    n_vocab: int = 49152
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 256
    seq: int = 12
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Per projection in the int4 layout: (block size, zero points: None | "u8" | "float").
INT4_BLOCKS = {
    "q_proj": (32, None),
    "k_proj": (32, None),
    "v_proj": (32, "u8"),
    "o_proj": (64, "u8"),
    "gate_proj": (128, "u8"),
    "up_proj": (32, "float"),
    "down_proj": (16, None),
    "qkv_proj": (32, "u8"),
}


def _quantize_int4(
    w: np.ndarray, block: int, zp_kind: str | None, rng: np.random.Generator, fp16_scales: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Random int4 codes for an [N, K] weight with w's scale; returns packed B, scales,
    zero points and the dequantized weight the graph then means."""
    n, k = w.shape
    n_blocks = k // block
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scales = (np.abs(rng.normal(0.0, 1.0, size=(n, n_blocks))) * w.std() / 4 + 1e-3).astype(np.float32)
    if fp16_scales:
        scales = scales.astype(np.float16)
    if zp_kind is None:
        zeros = np.full((n, n_blocks), 8.0, np.float32)
        zp = None
    else:
        zi = rng.integers(4, 12, size=(n, n_blocks)).astype(np.uint8)
        zeros = zi.astype(np.float32)
        if zp_kind == "u8":
            per_row = -(-n_blocks // 2)
            zpad = np.zeros((n, per_row * 2), np.uint8)
            zpad[:, :n_blocks] = zi
            zp = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).reshape(-1)
        else:
            zp = zeros.astype(scales.dtype).reshape(-1)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, n_blocks, block // 2)
    deq = (
        (codes.astype(np.float32).reshape(n, n_blocks, block) - zeros[:, :, None])
        * scales.astype(np.float32)[:, :, None]
    ).reshape(n, k)
    return packed, scales.reshape(-1), zp, deq


def build(
    layout: str,
    shape: Shape,
    seed: int = 0,
    fp16_scales: bool = False,
    meant: dict[tuple[int, str], np.ndarray] | None = None,
    fused: bool = False,
) -> onnx.ModelProto:
    """A decoder for `shape.seq` tokens: inputs input_ids [1, S] and position_ids [S]
    (int64), output logits [1, S, V]. `meant` receives each projection's weight as the
    graph defines it ([out, in], dequantized for int4). `fused` puts q, k and v in one
    qkv_proj MatMulNBits followed by a Split, as onnxruntime-genai does."""
    meant = {} if meant is None else meant
    rng = np.random.default_rng(seed)
    s = shape
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def tmp(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def node(op: str, inputs: list[str], name: str, domain: str = "", **attrs: object) -> str:
        out = tmp(name.strip("/").replace("/", "_"))
        nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs))
        return out

    def scalar(v: float) -> str:
        return const(tmp("c"), np.array(v, np.float32))

    def ints(v: list[int]) -> str:
        return const(tmp("i"), np.array(v, np.int64))

    def rmsnorm(x: str, w_name: str, where: str) -> str:
        const(w_name, (1.0 + rng.normal(0, 0.1, s.n_embd)).astype(np.float32))
        sq = node("Pow", [x, scalar(2.0)], f"{where}/Pow")
        mean = node("ReduceMean", [sq], f"{where}/ReduceMean", axes=[-1], keepdims=1)
        var = node("Add", [mean, scalar(s.eps)], f"{where}/Add")
        inv = node("Reciprocal", [node("Sqrt", [var], f"{where}/Sqrt")], f"{where}/Reciprocal")
        return node("Mul", [node("Mul", [x, inv], f"{where}/Mul"), w_name], f"{where}/Mul_1")

    def proj(x: str, layer: int, group: str, name: str, n_out: int, n_in: int, sd: float) -> str:
        w = rng.normal(0.0, sd, size=(n_out, n_in)).astype(np.float32)  # HF: [out, in]
        if layout == "float":
            meant[(layer, name)] = w
            wt = const(f"onnx::MatMul_{1000 + counter[0]}", np.ascontiguousarray(w.T))
            return node("MatMul", [x, wt], f"/model/layers.{layer}/{group}/{name}/MatMul")
        block, zp_kind = INT4_BLOCKS[name]
        packed, scales, zp, meant[(layer, name)] = _quantize_int4(w, block, zp_kind, rng, fp16_scales)
        base = f"model.layers.{layer}.attn.{name}.MatMulNBits"
        ins = [x, const(base + ".qweight", packed), const(base + ".scales", scales)]
        if zp is not None:
            ins.append(const(base + ".qzeros", zp))
        return node(
            "MatMulNBits",
            ins,
            f"/model/layers.{layer}/attn/{name}/MatMulNBits",
            domain="com.microsoft",
            K=n_in,
            N=n_out,
            bits=4,
            block_size=block,
            accuracy_level=0,
        )

    hd, half = s.head_dim, s.head_dim // 2
    inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(np.arange(64, dtype=np.float64), inv_freq)
    emb = np.concatenate([ang, ang], axis=1)
    const("cos_cached", np.cos(emb).astype(np.float32))
    const("sin_cached", np.sin(emb).astype(np.float32))
    mask = np.triu(np.full((s.seq, s.seq), -1e9, np.float32), k=1)
    const("causal_mask", mask)

    embed = rng.normal(0.0, 0.5, size=(s.n_vocab, s.n_embd)).astype(np.float32)
    const("model.embed_tokens.weight", embed)
    x = node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather", axis=0)
    cos = node("Gather", ["cos_cached", "position_ids"], "/model/rotary/Gather", axis=0)  # [S, hd]
    sin = node("Gather", ["sin_cached", "position_ids"], "/model/rotary/Gather_1", axis=0)

    def heads(t: str, n: int, where: str) -> str:  # [1,S,n*hd] -> [1,n,S,hd]
        r = node("Reshape", [t, ints([1, s.seq, n, hd])], f"{where}/Reshape")
        return node("Transpose", [r], f"{where}/Transpose", perm=[0, 2, 1, 3])

    def rope(t: str, where: str) -> str:
        lo = node("Slice", [t, ints([0]), ints([half]), ints([3])], f"{where}/Slice")
        hi = node("Slice", [t, ints([half]), ints([hd]), ints([3])], f"{where}/Slice_1")
        rot = node("Concat", [node("Neg", [hi], f"{where}/Neg"), lo], f"{where}/Concat", axis=3)
        return node(
            "Add", [node("Mul", [t, cos], f"{where}/Mul"), node("Mul", [rot, sin], f"{where}/Mul_1")], f"{where}/Add"
        )

    def repeat_kv(t: str, where: str) -> str:  # [1,nkv,S,hd] -> [1,nh,S,hd]
        rep = s.n_head // s.n_head_kv
        u = node("Unsqueeze", [t, ints([2])], f"{where}/Unsqueeze")
        e = node("Expand", [u, ints([1, s.n_head_kv, rep, s.seq, hd])], f"{where}/Expand")
        return node("Reshape", [e, ints([1, s.n_head, s.seq, hd])], f"{where}/Reshape")

    group_attn = "self_attn" if layout == "float" else "attn"
    sd = 0.5 / np.sqrt(s.n_embd)
    for i in range(s.n_layer):
        at = f"/model/layers.{i}/{group_attn}"
        h = rmsnorm(x, f"model.layers.{i}.input_layernorm.weight", f"/model/layers.{i}/input_layernorm")
        if fused:  # onnxruntime-genai: one qkv_proj MatMulNBits, then Split
            qkv = proj(h, i, group_attn, "qkv_proj", (s.n_head + 2 * s.n_head_kv) * hd, s.n_embd, sd)
            outs = [tmp("q"), tmp("k"), tmp("v")]
            nodes.append(
                helper.make_node(
                    "Split",
                    [qkv, ints([s.n_head * hd, s.n_head_kv * hd, s.n_head_kv * hd])],
                    outs,
                    name=at + "/qkv_split/Split",
                    axis=-1,
                )
            )
            q_lin, k_lin, v_lin = outs
            w = meant.pop((i, "qkv_proj"))
            meant[(i, "q_proj")] = w[: s.n_head * hd]
            meant[(i, "k_proj")] = w[s.n_head * hd : (s.n_head + s.n_head_kv) * hd]
            meant[(i, "v_proj")] = w[(s.n_head + s.n_head_kv) * hd :]
        else:
            q_lin = proj(h, i, group_attn, "q_proj", s.n_head * hd, s.n_embd, sd)
            k_lin = proj(h, i, group_attn, "k_proj", s.n_head_kv * hd, s.n_embd, sd)
            v_lin = proj(h, i, group_attn, "v_proj", s.n_head_kv * hd, s.n_embd, sd)
        q = rope(heads(q_lin, s.n_head, at + "/q"), at + "/q_rope")
        k = rope(heads(k_lin, s.n_head_kv, at + "/k"), at + "/k_rope")
        v = heads(v_lin, s.n_head_kv, at + "/v")
        k, v = repeat_kv(k, at + "/k_rep"), repeat_kv(v, at + "/v_rep")
        kt = node("Transpose", [k], at + "/kT", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], at + "/MatMul"), scalar(1.0 / np.sqrt(hd))], at + "/Mul")
        probs = node("Softmax", [node("Add", [scores, "causal_mask"], at + "/Add")], at + "/Softmax", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], at + "/MatMul_1")], at + "/Transpose", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, ints([1, s.seq, s.n_head * hd])], at + "/Reshape")
        x = node("Add", [x, proj(ctx, i, group_attn, "o_proj", s.n_embd, s.n_head * hd, sd)], f"/model/layers.{i}/Add")
        h = rmsnorm(
            x, f"model.layers.{i}.post_attention_layernorm.weight", f"/model/layers.{i}/post_attention_layernorm"
        )
        group_mlp = "mlp" if layout == "float" else "attn"
        g = proj(h, i, group_mlp, "gate_proj", s.n_ff, s.n_embd, sd)
        u = proj(h, i, group_mlp, "up_proj", s.n_ff, s.n_embd, sd)
        act = node(
            "Mul",
            [node("Mul", [g, node("Sigmoid", [g], f"/model/layers.{i}/mlp/Sigmoid")], f"/model/layers.{i}/mlp/Mul"), u],
            f"/model/layers.{i}/mlp/Mul_1",
        )
        x = node(
            "Add",
            [x, proj(act, i, group_mlp, "down_proj", s.n_embd, s.n_ff, 0.5 / np.sqrt(s.n_ff))],
            f"/model/layers.{i}/Add_1",
        )
    x = rmsnorm(x, "model.norm.weight", "/model/norm")
    head = const("onnx::MatMul_lm_head", np.ascontiguousarray(embed.T))  # tied embeddings
    nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="/lm_head/MatMul"))

    graph = helper.make_graph(
        nodes,
        f"tiny-llama-{layout}",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, s.seq]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [s.seq]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, s.seq, s.n_vocab])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17)]
    if layout == "int4":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgelm-tests")


def config_json(s: Shape) -> dict[str, object]:
    return {
        "model_type": "llama",
        "hidden_size": s.n_embd,
        "num_hidden_layers": s.n_layer,
        "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_head_kv,
        "intermediate_size": s.n_ff,
        "vocab_size": s.n_vocab,
        "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "_name_or_path": "tiny-onnx-llama",
    }


def tokenizer_json_from_gguf(gguf_path: Path) -> tuple[dict[str, object], dict[str, object]]:
    """SmolLM2's tokenizer as Hugging Face's tokenizer.json (+ tokenizer_config.json),
    rebuilt from its GGUF: vocabulary, merges, control tokens, digit-isolating pre-tokenizer."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = strings("tokenizer.ggml.merges")
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != 3}
    added = [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if types[i] == 3]
    tok = {
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }
    f = r.fields["tokenizer.chat_template"]
    cfg = {"chat_template": bytes(f.parts[f.data[0]]).decode("utf-8"), "bos_token": "<|im_start|>"}
    return tok, cfg


def write_model_dir(
    d: Path,
    layout: str,
    shape: Shape,
    smollm2: Path,
    seed: int = 0,
    fp16_scales: bool = False,
    meant: dict[tuple[int, str], np.ndarray] | None = None,
    fused: bool = False,
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model = build(layout, shape, seed, fp16_scales, meant, fused)
    onnx.save(model, str(d / "model.onnx"))
    (d / "config.json").write_text(json.dumps(config_json(shape)))
    tok, tok_cfg = tokenizer_json_from_gguf(smollm2)
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return d / "model.onnx"
