"""`edgelm convert model.onnx OUT.gguf`: a llama-family decoder exported to ONNX, as GGUF.

What it reads
- The graph (`onnx`, external data included). Weights are found by the node and
  initializer names the exporters write: Hugging Face Optimum (torch.onnx) names a
  projection's MatMul ``/model/layers.N/self_attn/q_proj/MatMul``; onnxruntime-genai
  names it ``/model/layers.N/attn/q_proj/MatMul`` or ``…/MatMulNBits`` (and may fuse
  ``qkv_proj`` / ``gate_up_proj``). Norms and the embedding are initializers named as in
  the Hugging Face checkpoint (``model.layers.N.input_layernorm.weight``, …).
- ``config.json`` beside the model (both exporters write it): sizes, heads, RoPE base,
  RMSNorm epsilon; the graph's weight shapes are checked against it.
- ``tokenizer.json`` beside it: a byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2
  families), with ``tokenizer_config.json`` for the chat template and BOS handling.

What it writes
- Float weights as F16 (or F32); norms and biases as F32.
- int4 ``MatMulNBits`` weights keep their 4-bit codes: a block of 32 with no zero
  point (or zero point 8 everywhere) is exactly Q4_0 (``d·(q−8)``); with zero points it
  is Q4_1 (``d·q + m``, ``m = −d·zp``). Larger power-of-two blocks split into 32s with
  the same scale. Only the scales (and ``m``) are rounded, to f16, as GGUF stores them;
  the codes are never requantized. Blocks of 16 cannot be expressed and are widened to
  F16 (said in the summary).
- Query and key rows are permuted from Hugging Face's half-split RoPE layout to
  GGUF's interleaved one (what llama.cpp's convert_hf_to_gguf does for ``llama``).

Anything else is refused with the op or tensor that does not fit: an operator outside
a llama-family decoder, an initializer no layer claims, a shape that disagrees with
config.json, ``g_idx`` reordering, 2/3/8-bit codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm import EdgelmError, _native


class ConvertError(EdgelmError):
    """The ONNX model (or its config/tokenizer) cannot be imported; the message names
    the op, tensor or key."""


# Operators a llama-family decoder export uses (Optimum's decomposed attention and
# RoPE; onnxruntime-genai's fused contrib ops). Anything else is another architecture.
ALLOWED_OPS = {
    "Add",
    "And",
    "Cast",
    "CastLike",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "CumSum",
    "Div",
    "Equal",
    "Expand",
    "Flatten",
    "Gather",
    "GatherElements",
    "GatherND",
    "Greater",
    "GreaterOrEqual",
    "Identity",
    "IsNaN",
    "Less",
    "LessOrEqual",
    "MatMul",
    "Max",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Reshape",
    "ScatterND",
    "Shape",
    "Sigmoid",
    "Sin",
    "Cos",
    "Size",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Tile",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
    "Sum",
    "Erf",
    "Abs",
    "Floor",
    "Ceil",
    "Clip",
    "Exp",
    "Log",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "MatMulNBits",
    "RotaryEmbedding",
    "GroupQueryAttention",
    "MultiHeadAttention",
    "Attention",
}

_PROJ = re.compile(
    r"^/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|"
    r"down_proj|gate_up_proj)/(?:MatMul|MatMulNBits)(?:_\d+)?$"
)
_LM_HEAD = re.compile(r"^/lm_head/(?:MatMul|MatMulNBits)(?:_\d+)?$")
_GGUF_PROJ = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}

# Pre-tokenizer regexes of the byte-level BPE families edgelm's tokenizer implements.
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class Weight:
    """One matrix as found in the graph, in GGUF orientation: rows = outputs."""

    name: str  # ONNX initializer (or node) name, for messages
    rows: int
    cols: int
    # float [rows, cols], or int4 codes [rows, cols] (uint8 0..15) with per-32 scales
    # and zero points [rows, cols/32] (zero points None = symmetric 8).
    data: np.ndarray | None = None
    codes: np.ndarray | None = None
    scales: np.ndarray | None = None
    zeros: np.ndarray | None = None

    def take_rows(self, idx: np.ndarray) -> Weight:
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Weight(
            self.name, len(idx), self.cols, pick(self.data), pick(self.codes), pick(self.scales), pick(self.zeros)
        )


@dataclass
class Found:
    proj: dict[tuple[int, str], Weight] = field(default_factory=dict)
    lm_head: Weight | None = None
    used: set[str] = field(default_factory=set)
    widened: list[str] = field(default_factory=list)


def _load(path: Path) -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConvertError("`edgelm convert` needs the onnx package: pip install onnx") from e
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing external data, …
        raise ConvertError(
            f"cannot read ONNX model {path}: {type(e).__name__}: {e} "
            f"(is the file complete? external data files must sit beside it)"
        ) from e


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(
            f"{what} not found at {path}: the exporter writes it beside model.onnx; copy the model's "
            f"Hugging Face {path.name} there or pass --{'config' if 'config' in path.name else 'tokenizer'}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return data


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _int4_weight(node: Any, inits: dict[str, np.ndarray]) -> tuple[Weight, bool]:
    """A MatMulNBits node's weight as int4 codes + per-32 scales/zeros (exact), or as
    floats when its blocks are smaller than 32. Returns (weight, widened)."""
    k, n = int(_attr(node, "K")), int(_attr(node, "N"))
    bits, block = int(_attr(node, "bits", 4)), int(_attr(node, "block_size"))
    inputs = list(node.input) + [""] * (6 - len(node.input))
    if bits != 4:
        raise ConvertError(f"MatMulNBits node {node.name}: {bits}-bit weights are not supported (only 4-bit)")
    if inputs[4]:
        raise ConvertError(f"MatMulNBits node {node.name}: g_idx (act-order reordering) is not supported")
    if inputs[5]:
        raise ConvertError(f"MatMulNBits node {node.name}: a bias input is not supported")
    for i in (1, 2) + ((3,) if inputs[3] else ()):
        if inputs[i] not in inits:
            raise ConvertError(f"MatMulNBits node {node.name}: input {inputs[i]!r} is not an initializer")
    if block < 16 or block & (block - 1):
        raise ConvertError(f"MatMulNBits node {node.name}: block_size {block} is not a power of two ≥ 16")
    if k % 32:
        raise ConvertError(f"MatMulNBits node {node.name}: K = {k} is not a multiple of 32, which GGUF blocks need")
    n_blocks = -(-k // block)
    b = inits[inputs[1]]
    if b.dtype != np.uint8 or b.size != n * n_blocks * block // 2:
        raise ConvertError(
            f"MatMulNBits node {node.name}: B {inputs[1]} has shape {b.shape} {b.dtype}; "
            f"expected uint8 [{n}, {n_blocks}, {block // 2}]"
        )
    b = b.reshape(n, n_blocks * block // 2)
    codes = np.empty((n, n_blocks * block), np.uint8)
    codes[:, 0::2] = b & 0x0F  # low nibble first along K
    codes[:, 1::2] = b >> 4
    codes = codes[:, :k]
    scales = inits[inputs[2]].astype(np.float32).reshape(n, n_blocks)
    if inputs[3]:
        zp = inits[inputs[3]]
        if zp.dtype == np.uint8:
            per_row = -(-n_blocks // 2)
            if zp.size != n * per_row:
                raise ConvertError(
                    f"MatMulNBits node {node.name}: zero_points {inputs[3]} has {zp.size} bytes; "
                    f"expected {n * per_row} (4-bit, packed per row)"
                )
            zp = zp.reshape(n, per_row)
            z = np.empty((n, per_row * 2), np.float32)
            z[:, 0::2] = zp & 0x0F
            z[:, 1::2] = zp >> 4
            zeros = z[:, :n_blocks]
        else:
            zeros = zp.astype(np.float32).reshape(n, n_blocks)
    else:
        zeros = np.full((n, n_blocks), 8.0, np.float32)
    if block < 32:  # no GGUF block this small: dequantize (exact in f32) and keep F16
        deq = (codes.astype(np.float32).reshape(n, n_blocks, block) - zeros[:, :, None]) * scales[:, :, None]
        return Weight(node.name, n, k, data=deq.reshape(n, k)), True
    rep = block // 32  # every 32-sub-block of a block shares its scale and zero point
    scales32 = np.repeat(scales, rep, axis=1)[:, : k // 32]
    zeros32 = np.repeat(zeros, rep, axis=1)[:, : k // 32]
    symmetric = bool(np.all(zeros32 == 8.0))
    return Weight(node.name, n, k, codes=codes, scales=scales32, zeros=None if symmetric else zeros32), False


def _float_weight(node: Any, inits: dict[str, np.ndarray], producers: dict[str, Any]) -> tuple[Weight, str]:
    """A MatMul's constant operand [in, out], possibly behind a Transpose, as rows = out."""
    w_name = node.input[1]
    if w_name in inits:
        w = inits[w_name]
        if w.ndim != 2:
            raise ConvertError(f"MatMul node {node.name}: weight {w_name} has shape {list(w.shape)}; expected 2-D")
        return Weight(w_name, w.shape[1], w.shape[0], data=np.ascontiguousarray(w.T)), w_name
    p = producers.get(w_name)
    if p is not None and p.op_type == "Transpose" and p.input[0] in inits:
        w = inits[p.input[0]]  # stored [out, in]: already GGUF's orientation
        return Weight(p.input[0], w.shape[0], w.shape[1], data=w), p.input[0]
    raise ConvertError(f"MatMul node {node.name}: its weight {w_name!r} is not a constant initializer")


def _scan(model: Any, inits: dict[str, np.ndarray]) -> Found:
    f = Found()
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type not in ALLOWED_OPS:
            raise ConvertError(
                f"unsupported op {node.op_type} (node {node.name or '?'}, domain "
                f"{node.domain or 'ai.onnx'}): not part of a llama-family decoder this importer knows"
            )
        if node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        m, head = _PROJ.match(node.name), _LM_HEAD.match(node.name)
        if not (m or head):
            if node.op_type == "MatMulNBits" or (
                len(node.input) > 1 and node.input[1] in inits and inits[node.input[1]].ndim == 2
            ):
                raise ConvertError(
                    f"weight matrix of node {node.name or '?'} ({node.op_type}) belongs to no projection "
                    f"this importer knows (expected /model/layers.N/(self_attn|attn|mlp)/*_proj/"
                    f"{node.op_type} or /lm_head/{node.op_type})"
                )
            continue  # activation × activation (attention scores)
        if node.op_type == "MatMulNBits":
            w, widened = _int4_weight(node, inits)
            f.used.update(i for i in node.input[1:4] if i)
            if widened:
                f.widened.append(node.name)
        else:
            w, used = _float_weight(node, inits, producers)
            f.used.add(used)
        if head:
            f.lm_head = w
        else:
            assert m is not None
            f.proj[(int(m.group(1)), m.group(2))] = w
    return f


def _permute_rope_rows(w: Weight, n_head: int) -> Weight:
    """Hugging Face keeps each head's rotary pairs as (i, i + d/2); GGUF's llama keeps
    them adjacent (2i, 2i+1). Reorder rows the way convert_hf_to_gguf.py does."""
    d = w.rows // n_head
    idx = np.arange(w.rows).reshape(n_head, 2, d // 2).swapaxes(1, 2).reshape(-1)
    return w.take_rows(idx)


def _q4_blocks(w: Weight) -> tuple[str, bytes]:
    """int4 codes to Q4_0 (symmetric) or Q4_1 blocks, codes untouched."""
    assert w.codes is not None and w.scales is not None
    q = w.codes.reshape(w.rows, w.cols // 32, 32)
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)  # ggml: element j and j+16 share a byte
    d = w.scales.astype(np.float16).reshape(w.rows, -1, 1).view(np.uint8)
    if w.zeros is None:
        return "Q4_0", np.concatenate([d, qs], axis=2).tobytes()
    m = (-w.scales * w.zeros).astype(np.float16).reshape(w.rows, -1, 1).view(np.uint8)
    return "Q4_1", np.concatenate([d, m, qs], axis=2).tobytes()


def _matrix(w: Weight, out_type: str) -> tuple[str, bytes]:
    if w.codes is not None:
        return _q4_blocks(w)
    assert w.data is not None
    dt = np.float16 if out_type == "F16" else np.float32
    return out_type, np.ascontiguousarray(w.data, dtype=dt).tobytes()


def _tokenizer_kv(
    tok: dict[str, Any], tok_cfg: dict[str, Any], cfg: dict[str, Any], n_vocab: int, where: Path
) -> list[tuple[str, str, Any]]:
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(
            f"{where}: tokenizer model {model.get('type')!r} is not supported; only byte-level BPE "
            f"(GPT-2, Llama 3, SmolLM2, Qwen2 families) is"
        )
    pre = _pre_name(tok.get("pre_tokenizer"), where)
    vocab: dict[str, int] = model.get("vocab") or {}
    tokens: list[str | None] = [None] * n_vocab
    types = [1] * n_vocab  # 1 normal, 3 control, 4 user-defined
    for text, i in vocab.items():
        if not 0 <= i < n_vocab:
            raise ConvertError(f"{where}: token {text!r} has id {i}, outside the model's vocabulary of {n_vocab}")
        tokens[i] = text
    for a in tok.get("added_tokens") or []:
        i = int(a["id"])
        if not 0 <= i < n_vocab:
            raise ConvertError(
                f"{where}: added token {a.get('content')!r} has id {i}, outside the vocabulary of {n_vocab}"
            )
        tokens[i] = a["content"]
        types[i] = 3 if a.get("special") else 4
    for i, t in enumerate(tokens):
        if t is None:  # ids the tokenizer never produces (padded vocabularies)
            tokens[i] = f"[PAD{i}]"
            types[i] = 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    def special_id(key: str) -> int | None:
        v = cfg.get(key + "_id")
        if isinstance(v, list):
            v = v[0] if v else None
        if v is None:
            name = tok_cfg.get(key)
            if isinstance(name, dict):
                name = name.get("content")
            if isinstance(name, str) and name in vocab:
                v = vocab[name]
            for a in tok.get("added_tokens") or []:
                if a["content"] == name:
                    v = a["id"]
        return int(v) if v is not None else None

    kv: list[tuple[str, str, Any]] = [
        ("tokenizer.ggml.model", "str", "gpt2"),
        ("tokenizer.ggml.pre", "str", pre),
        ("tokenizer.ggml.tokens", "arr[str]", tokens),
        ("tokenizer.ggml.token_type", "arr[i32]", types),
        ("tokenizer.ggml.merges", "arr[str]", merges),
    ]
    for key, gg in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        v = special_id(key)
        if v is not None:
            kv.append((f"tokenizer.ggml.{gg}_token_id", "u32", v))
    if "add_bos_token" in tok_cfg:
        kv.append(("tokenizer.ggml.add_bos_token", "bool", bool(tok_cfg["add_bos_token"])))
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, str):
        kv.append(("tokenizer.chat_template", "str", tmpl))
    return kv


def _pre_name(pre: Any, where: Path) -> str:
    """The GGUF `tokenizer.ggml.pre` for a tokenizer.json pre_tokenizer."""
    steps: list[Any] = list((pre or {}).get("pretokenizers") or []) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps if isinstance(s, dict)]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and kinds[1:] == ["ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_RE:
            return "llama-bpe"
        if pattern == _QWEN2_RE:
            return "qwen2"
    raise ConvertError(
        f"{where}: pre-tokenizer {json.dumps(pre)[:200]} is not one edgelm implements "
        f"(GPT-2, Llama 3, SmolLM2 or Qwen2 splitting)"
    )


def convert_onnx(
    model_path: str | Path,
    output: str | Path,
    tokenizer: str | Path | None = None,
    config: str | Path | None = None,
    out_type: str = "F16",
    progress: Callable[[int, int, str, str, str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert; returns a summary (architecture, n_layer, n_tensors, file_bytes, types, widened)."""
    if out_type not in ("F16", "F32"):
        raise ConvertError(
            f"--type {out_type!r}: float weights can be written as F16 or F32 (quantize afterwards "
            f"with `edgelm quantize`)"
        )
    from onnx import numpy_helper

    model_path = Path(model_path)
    if not model_path.is_file():
        raise ConvertError(f"{model_path} does not exist")
    here = model_path.parent
    cfg = _read_json(Path(config) if config else here / "config.json", "config.json")
    tok = _read_json(Path(tokenizer) if tokenizer else here / "tokenizer.json", "tokenizer.json")
    tok_cfg_path = (Path(tokenizer).parent if tokenizer else here) / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path, "tokenizer_config.json") if tok_cfg_path.is_file() else {}

    model_type = cfg.get("model_type", "llama")
    arch = {"llama": "llama", "mistral": "llama", "smollm": "llama", "qwen2": "qwen2"}.get(model_type)
    if arch is None:
        raise ConvertError(
            f"config.json model_type {model_type!r} is not a llama-family decoder this importer knows "
            f"(llama, mistral, qwen2)"
        )

    def need(key: str) -> int:
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ConvertError(f"config.json: {key} is missing or not a positive integer")
        return int(cfg[key])

    n_embd, n_layer, n_head = need("hidden_size"), need("num_hidden_layers"), need("num_attention_heads")
    n_ff, n_vocab = need("intermediate_size"), need("vocab_size")
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    if cfg.get("rope_scaling"):
        raise ConvertError(f"config.json rope_scaling {cfg['rope_scaling']} is not supported yet")

    graph = _load(model_path)
    inits: dict[str, np.ndarray] = {}
    for t in graph.graph.initializer:
        try:
            inits[t.name] = numpy_helper.to_array(t)
        except Exception as e:
            raise ConvertError(
                f"initializer {t.name}: cannot read its data ({e}); is the external data complete?"
            ) from e
    found = _scan(graph, inits)

    def init(name: str, shape: tuple[int, ...], *alts: str) -> np.ndarray:
        for n in (name, *alts):
            if n in inits:
                a = inits[n]
                if tuple(a.shape) != shape:
                    raise ConvertError(f"tensor {n} has shape {list(a.shape)}; config.json implies {list(shape)}")
                found.used.add(n)
                return a.astype(np.float32)
        raise ConvertError(f"tensor {name} is missing from the graph")

    tensors: list[tuple[str, list[int], str, bytes]] = []
    n_expected = 3 + (12 if arch == "qwen2" else 9) * n_layer  # for the progress bar; the last call says 100%

    def report(name: str, ty: str) -> None:
        if progress is not None:
            progress(len(tensors), n_expected, name, "onnx", ty, len(tensors), n_expected)

    def put_matrix(gguf_name: str, w: Weight, rows: int, cols: int) -> None:
        if (w.rows, w.cols) != (rows, cols):
            raise ConvertError(
                f"tensor {w.name} ({gguf_name}) is {w.rows}x{w.cols} (out x in); config.json implies {rows}x{cols}"
            )
        ty, data = _matrix(w, out_type)
        tensors.append((gguf_name, [cols, rows], ty, data))
        report(gguf_name, ty)

    def put_vector(gguf_name: str, v: np.ndarray) -> None:
        tensors.append((gguf_name, [int(v.size)], "F32", np.ascontiguousarray(v, np.float32).tobytes()))

    embd = init("model.embed_tokens.weight", (n_vocab, n_embd))
    tensors.append(
        (
            "token_embd.weight",
            [n_embd, n_vocab],
            out_type,
            embd.astype(np.float16 if out_type == "F16" else np.float32).tobytes(),
        )
    )
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        put_vector(f"blk.{i}.attn_norm.weight", init(f"model.layers.{i}.input_layernorm.weight", (n_embd,)))
        put_vector(f"blk.{i}.ffn_norm.weight", init(f"model.layers.{i}.post_attention_layernorm.weight", (n_embd,)))
        p = dict((k[1], w) for k, w in found.proj.items() if k[0] == i)
        if "qkv_proj" in p:  # onnxruntime-genai fuses q, k and v: split the rows
            w = p.pop("qkv_proj")
            if w.rows != q_dim + 2 * kv_dim:
                raise ConvertError(f"tensor {w.name}: {w.rows} rows; q+k+v need {q_dim + 2 * kv_dim}")
            p["q_proj"] = w.take_rows(np.arange(0, q_dim))
            p["k_proj"] = w.take_rows(np.arange(q_dim, q_dim + kv_dim))
            p["v_proj"] = w.take_rows(np.arange(q_dim + kv_dim, q_dim + 2 * kv_dim))
        if "gate_up_proj" in p:
            w = p.pop("gate_up_proj")
            if w.rows != 2 * n_ff:
                raise ConvertError(f"tensor {w.name}: {w.rows} rows; gate+up need {2 * n_ff}")
            p["gate_proj"] = w.take_rows(np.arange(0, n_ff))
            p["up_proj"] = w.take_rows(np.arange(n_ff, 2 * n_ff))
        shapes = {
            "q_proj": (q_dim, n_embd),
            "k_proj": (kv_dim, n_embd),
            "v_proj": (kv_dim, n_embd),
            "o_proj": (n_embd, q_dim),
            "gate_proj": (n_ff, n_embd),
            "up_proj": (n_ff, n_embd),
            "down_proj": (n_embd, n_ff),
        }
        for proj, (rows, cols) in shapes.items():
            if proj not in p:
                raise ConvertError(
                    f"layer {i}: no {proj} MatMul found (expected a node named "
                    f"/model/layers.{i}/self_attn|attn|mlp/{proj}/MatMul)"
                )
            w = p[proj]
            if arch == "llama" and proj in ("q_proj", "k_proj"):
                w = _permute_rope_rows(w, n_head if proj == "q_proj" else n_head_kv)
            put_matrix(f"blk.{i}.{_GGUF_PROJ[proj]}.weight", w, rows, cols)
        for proj, n in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            for attn in ("self_attn", "attn"):
                bias = f"model.layers.{i}.{attn}.{proj}.bias"
                if bias in inits:
                    if arch != "qwen2":
                        raise ConvertError(f"tensor {bias}: biases are only supported for qwen2 models")
                    put_vector(f"blk.{i}.{_GGUF_PROJ[proj]}.bias", init(bias, (n,)))
    put_vector(
        "output_norm.weight",
        init("model.norm.weight", (n_embd,), f"model.layers.{n_layer}.final_norm_layernorm.weight"),
    )
    if found.lm_head is not None:
        head = found.lm_head
        tied = head.data is not None and head.data.shape == embd.shape and np.array_equal(head.data, embd)
        if not tied:
            put_matrix("output.weight", head, n_vocab, n_embd)
    elif not cfg.get("tie_word_embeddings", False):
        raise ConvertError("no /lm_head/MatMul found and config.json does not say the embeddings are tied")

    # Every sizeable initializer must have been claimed by a layer above.
    for name, a in inits.items():
        if name in found.used or a.size < 64 or re.search(r"(cos|sin|rotary|inv_freq|mask|causal)", name, re.I):
            continue
        raise ConvertError(
            f"tensor {name} (shape {list(a.shape)}) is not part of any layer this importer knows; "
            f"the graph is not a plain llama-family decoder"
        )

    n_quant = sum(1 for t in tensors if t[2] in ("Q4_0", "Q4_1"))
    ftype = 2 if n_quant else (1 if out_type == "F16" else 0)
    name = cfg.get("_name_or_path") or model_path.stem
    kv: list[tuple[str, str, Any]] = [
        ("general.architecture", "str", arch),
        ("general.name", "str", str(name)),
        ("general.file_type", "u32", ftype),
        ("general.quantization_version", "u32", 2),
        (f"{arch}.context_length", "u32", int(cfg.get("max_position_embeddings") or 2048)),
        (f"{arch}.embedding_length", "u32", n_embd),
        (f"{arch}.block_count", "u32", n_layer),
        (f"{arch}.feed_forward_length", "u32", n_ff),
        (f"{arch}.attention.head_count", "u32", n_head),
        (f"{arch}.attention.head_count_kv", "u32", n_head_kv),
        (f"{arch}.attention.layer_norm_rms_epsilon", "f32", float(cfg.get("rms_norm_eps") or 1e-6)),
        (f"{arch}.rope.freq_base", "f32", float(cfg.get("rope_theta") or 10000.0)),
        (f"{arch}.rope.dimension_count", "u32", head_dim),
        (f"{arch}.vocab_size", "u32", n_vocab),
    ]
    if head_dim != n_embd // n_head:
        kv += [(f"{arch}.attention.key_length", "u32", head_dim), (f"{arch}.attention.value_length", "u32", head_dim)]
    kv += _tokenizer_kv(tok, tok_cfg, cfg, n_vocab, Path(tokenizer) if tokenizer else here / "tokenizer.json")

    if progress is not None:
        progress(len(tensors), len(tensors), "(writing)", "onnx", "gguf", 1, 1)
    file_bytes = _native.write_gguf(str(output), kv, tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t[2]] = types.get(t[2], 0) + 1
    return {
        "architecture": arch,
        "n_layer": n_layer,
        "n_tensors": len(tensors),
        "file_bytes": file_bytes,
        "types": types,
        "widened": found.widened,
    }
