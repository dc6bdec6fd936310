"""What `/api/show` and `edgelm show` say about a model, from its file's metadata and its
store entry's layers (template, parameters, system prompt, license), never loading it.

The answer has the shape of Ollama's /api/show: `details` (family, parameter size,
quantization), `model_info` (the GGUF metadata, long arrays left out), `capabilities`
("embedding" for an embedding model, else "completion"; "tools" for a chat model;
"thinking" for a template with a thinking section), `template` (the registry's Go template when the model came with one, else the
GGUF's chat template), `parameters` (Ollama's text form, one `key value` a line),
`system`, `license`, `modelfile`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgelm import store
from edgelm.prompt.chat import template_style

QUANT = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
"""llama.cpp's `general.file_type` values, by name."""


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def read_metadata(path: Path) -> dict[str, Any]:
    """A GGUF's metadata without loading the model (arrays longer than 64 left out)."""
    from edgelm import _native

    _, _, raw, _ = _native.inspect_gguf(str(path))
    return {k: v for k, v in raw.items() if not (isinstance(v, list) and len(v) > 64)}


def details(md: dict[str, Any]) -> dict[str, Any]:
    arch = str(md.get("general.architecture") or "")
    ftype = md.get("general.file_type")
    size = md.get("general.size_label")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": str(size) if size else "",
        "quantization_level": QUANT.get(ftype, str(ftype)) if isinstance(ftype, int) else "",
    }


ENCODERS = ("bert", "nomic-bert")
"""Architectures that only embed (they have no output matrix to generate with)."""


def capabilities(md: dict[str, Any], go_template: str | None = None) -> list[str]:
    """What a model can do, as Ollama reports it: a file that sets `{arch}.pooling_type`
    (and any encoder) is an embedding model and nothing else; a model without a chat
    template is a base model (text completion only); edgelm gives any chat model tools
    (through its template, or edgelm's tool prompt); a template with a thinking section
    adds "thinking"."""
    arch = str(md.get("general.architecture") or "")
    if arch in ENCODERS or f"{arch}.pooling_type" in md:
        return ["embedding"]
    template = md.get("tokenizer.chat_template")
    if not template and not go_template:
        return ["completion"]
    caps = ["completion", "tools"]
    if template_style(template if isinstance(template, str) else go_template) is not None:
        caps.append("thinking")
    return caps


def params_of(entry: store.Entry | None, st: store.Store | None) -> dict[str, Any]:
    """A pulled model's parameters layer (Ollama's JSON: stop strings, sampling
    defaults), or {}."""
    if entry is None or st is None:
        return {}
    text = st.text_layer(entry, store.PARAMS)
    try:
        params = json.loads(text) if text else {}
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def parameters_text(params: dict[str, Any]) -> str:
    """Ollama's `parameters` text: `key value` lines, a list one line per item."""
    lines = []
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{k:<30} {json.dumps(item) if isinstance(item, str) else item}")
    return "\n".join(lines)


def describe(
    path: Path, md: dict[str, Any], entry: store.Entry | None = None, st: store.Store | None = None
) -> dict[str, Any]:
    """The /api/show answer for the model at `path` (its store entry, if it has one)."""

    def layer(media_type: str) -> str | None:
        return st.text_layer(entry, media_type) if entry is not None and st is not None else None

    go_template = layer(store.TEMPLATE)
    gguf_template = md.get("tokenizer.chat_template")
    params = params_of(entry, st)
    system = layer(store.SYSTEM)
    license_text = layer(store.LICENSE) or str(md.get("general.license", "") or "")
    template = go_template or (gguf_template if isinstance(gguf_template, str) else "")
    modelfile = f"FROM {path}\n"
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    if system:
        modelfile += f'SYSTEM """{system}"""\n'
    modelfile += "".join(f"PARAMETER {line}\n" for line in parameters_text(params).splitlines())
    out: dict[str, Any] = {
        "modified_at": iso(entry.modified if entry is not None else path.stat().st_mtime),
        "template": template,
        "modelfile": modelfile,
        "license": license_text,
        "details": details(md),
        "model_info": md,
        "parameters": parameters_text(params),
        "capabilities": capabilities(md, go_template),
    }
    if system:
        out["system"] = system
    return out
