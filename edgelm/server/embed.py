"""The embedding endpoints, as the `openai` and `ollama` Python clients call them:

- `POST /v1/embeddings` (OpenAI): `input` a string, an array of strings, an array of
  token ids or an array of such arrays; `encoding_format` "float" or "base64" (the
  `openai` client asks for base64 by default: little-endian float32, base64-encoded);
  `dimensions`; `usage`. Vectors are L2-normalized (llama-server's `embd_normalize`
  2). An input longer than the context is a 400 unless the request says `truncate:
  true` (an extension; OpenAI refuses such inputs).
- `POST /api/embed` (Ollama): `input` a string or an array of strings, `truncate`
  (default true: cut to the context, keeping the model's [CLS]/[SEP] or BOS/EOS),
  `dimensions`, `keep_alive`, `options` (`num_ctx` lowers the context); normalized
  vectors with Ollama's `total_duration`, `load_duration`, `prompt_eval_count`. An
  empty `input` just loads the model.
- `POST /api/embeddings` (Ollama's older form): `prompt` → `embedding`, not normalized,
  as Ollama returns it; an empty prompt loads the model.

Texts are tokenized as llama.cpp's embedding tools do (the model's special tokens
added, special-token texts parsed); token ids are used as given. `dimensions` keeps the
first N components and normalizes again (Matryoshka models are trained for it), as
Ollama does. A model that cannot embed (a text generation model: no `pooling_type` in
its file) answers `"name" does not support embeddings`; an embedding model asked to
chat or generate answers `"name" does not support chat` (`require_generation`), as
Ollama words both. The batching of inputs (within a request and across requests) is
edgelm.engine.embed's.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from edgelm.config import parse_keep_alive
from edgelm.engine.embed import EmbedEngine
from edgelm.server import access
from edgelm.server.params import ApiError, Body, as_int
from edgelm.server.state import SERVER, Server

if TYPE_CHECKING:
    from edgelm.engine.pool import LoadedModel


def require_generation(lm: LoadedModel, what: str) -> None:
    """Refuse chat or generation on an embedding model, before anything is rendered."""
    if isinstance(lm.engine, EmbedEngine):
        raise ApiError(
            f'"{lm.id}" does not support {what}: it is an embedding model (use /api/embed or /v1/embeddings)',
            "model",
            400,
        )


def _embedder(lm: LoadedModel, name: str) -> EmbedEngine:
    if not isinstance(lm.engine, EmbedEngine):
        raise ApiError(
            f'"{name}" does not support embeddings: it is a text generation model (its file has no '
            f"{lm.model.architecture}.pooling_type)",
            "model",
            400,
        )
    pooling = lm.model.native.pooling
    if pooling not in ("mean", "cls", "last"):
        why = (
            "a reranker (pooling_type rank)"
            if pooling == "rank"
            else "converted without its pooling layer (one vector per token)"
        )
        raise ApiError(f'"{name}" cannot serve embeddings: it is {why}', "model", 400)
    return lm.engine


# -- inputs → token ids → vectors ----------------------------------------------------------


def _tokenize(
    lm: LoadedModel, inputs: list[str | list[int]], limit: int, truncate: bool, field: str
) -> list[list[int]]:
    """Token ids for each input, within `limit` tokens (cut when `truncate`, else a 400
    naming the input). Runs off the event loop (many inputs take a while)."""
    native = lm.model.native
    prefix, suffix = native.special_affixes()
    out = []
    for i, x in enumerate(inputs):
        name = f"{field}[{i}]" if len(inputs) > 1 else field
        is_text = isinstance(x, str)
        ids = native.tokenize(x, True, True) if isinstance(x, str) else x
        if not ids:
            raise ApiError(f"'{name}' is empty: it has no tokens to embed", field)
        if len(ids) > limit:
            if not truncate:
                raise ApiError(
                    f"'{name}' has {len(ids)} tokens, more than the context length of {limit}; shorten it "
                    'or set "truncate": true',
                    field,
                )
            if is_text:
                # Keep the model's own first and last tokens ([CLS] … [SEP], BOS … EOS).
                keep = limit - len(prefix) - len(suffix)
                if keep < 1:
                    raise ApiError(f"a context of {limit} tokens leaves no room for '{name}'", field)
                ids = ids[: len(prefix) + keep] + ids[len(ids) - len(suffix) :]
            else:
                ids = ids[:limit]
        out.append(ids)
    return out


def _dimensions(b: Body, n_embd: int) -> int | None:
    d = b.get("dimensions", int, None, lo=1)
    if d is not None and d > n_embd:
        raise ApiError(f"'dimensions' is {d}, but this model's embeddings have {n_embd}", "dimensions")
    return int(d) if d is not None else None


def _normalize(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Unit length per row (a zero vector stays zero); NaN or infinity is a model fault."""
    if not np.isfinite(v).all():
        raise ApiError("the model produced NaN or infinite values for this input", None, 500, None, "server_error")
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=1, keepdims=True))
    out: npt.NDArray[np.float32] = (v / np.maximum(norm, 1e-12)).astype(np.float32)
    return out


async def _vectors(
    srv: Server, lm: LoadedModel, name: str, inputs: list[str | list[int]], limit: int, truncate: bool, field: str
) -> tuple[npt.NDArray[np.float32], int]:
    """Raw pooled vectors for `inputs`, and the tokens they took."""
    engine = _embedder(lm, name)
    if inputs and any(isinstance(x, str) for x in inputs):
        seqs = await asyncio.get_running_loop().run_in_executor(None, _tokenize, lm, inputs, limit, truncate, field)
    else:
        seqs = _tokenize(lm, inputs, limit, truncate, field)
    n_vocab = lm.model.n_vocab
    for i, s in enumerate(seqs):
        bad = next((t for t in s if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ApiError(
                f"'{field}[{i}]' holds {bad}, which is not a token id (the vocabulary has {n_vocab} tokens)", field
            )
    vecs = await engine.embed(seqs)  # Busy (429) when the queue is full
    n_tok = sum(len(s) for s in seqs)
    access.count(lm.id, n_tok)
    return vecs, n_tok


def _keep_alive(b: Body) -> float | None | str:
    ka = b.data.get("keep_alive")
    if ka is None:
        return "default"
    try:
        return parse_keep_alive(ka)
    except ValueError as e:
        raise ApiError(str(e), "keep_alive", 400) from None


def _ollama_limit(lm: LoadedModel, b: Body) -> int:
    raw = b.data.get("options")
    if raw is not None and not isinstance(raw, dict):
        raise ApiError("'options' must be an object", "options")
    o = Body(raw or {}, "options", "options.")
    return min(int(o.get("num_ctx", int, lm.max_context, lo=1)), lm.max_context)


def _model_name(b: Body) -> str:
    name = b.get("model", str) or b.get("name", str)
    if not name:
        raise ApiError("'model' is required", "model")
    return str(name)


# -- OpenAI ----------------------------------------------------------------------------------


def _openai_inputs(v: Any) -> list[str | list[int]]:
    """OpenAI's `input`: a string, an array of strings, an array of token ids, or an
    array of arrays of token ids."""
    if v == "" or (isinstance(v, list) and "" in v):
        # As OpenAI: an empty text is refused (llama.cpp would embed [CLS] [SEP] alone).
        at = "" if v == "" else f"[{v.index('')}]"
        raise ApiError(f"'input{at}' is an empty string: there is no text to embed", "input")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise ApiError(
            "'input' must be a string, an array of strings, or token ids (an array of integers or of "
            "arrays of integers), and not empty",
            "input",
        )
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [[as_int(x, f"input[{i}]") for i, x in enumerate(v)]]
    out: list[str | list[int]] = []
    for i, x in enumerate(v):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list) and x:
            out.append([as_int(t, f"input[{i}][{j}]") for j, t in enumerate(x)])
        else:
            raise ApiError(f"'input[{i}]' must be a string or a non-empty array of token ids", "input")
    return out


async def openai_embeddings(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    inputs = _openai_inputs(b.data.get("input"))
    fmt = b.get("encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise ApiError('\'encoding_format\' must be "float" or "base64"', "encoding_format")
    truncate = bool(b.get("truncate", bool, False))
    async with srv.use(b.get("model", str)) as lm:
        dims = _dimensions(b, lm.model.native.n_embd)
        vecs, n_tok = await _vectors(srv, lm, lm.id, inputs, lm.max_context, truncate, "input")
    vecs = _normalize(vecs)
    if dims is not None:
        vecs = _normalize(vecs[:, :dims])
    data = []
    for i, v in enumerate(vecs):
        emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return web.json_response(
        {"object": "list", "data": data, "model": lm.id, "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}
    )


# -- Ollama ----------------------------------------------------------------------------------


async def ollama_embed(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    t0 = time.perf_counter()
    b = Body(await srv.json_body(request))
    name = _model_name(b)
    raw = b.data.get("input")
    if raw is None or raw == "":
        inputs: list[str | list[int]] = []
    elif isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    else:
        raise ApiError("'input' must be a string or an array of strings", "input")
    truncate = bool(b.get("truncate", bool, True))
    ka = _keep_alive(b)
    async with srv.use(name, ka) as lm:
        t_loaded = time.perf_counter()
        dims = _dimensions(b, lm.model.native.n_embd)
        limit = _ollama_limit(lm, b)
        vecs, n_tok = await _vectors(srv, lm, name, inputs, limit, truncate, "input")
    out = _normalize(vecs) if len(vecs) else vecs
    if dims is not None and len(out):
        out = _normalize(out[:, :dims])
    return web.json_response(
        {
            "model": name,
            "embeddings": out.tolist(),
            "total_duration": int((time.perf_counter() - t0) * 1e9),
            "load_duration": int((t_loaded - t0) * 1e9),
            "prompt_eval_count": n_tok,
        }
    )


async def ollama_embeddings(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    name = _model_name(b)
    prompt = b.get("prompt", str, "")
    truncate = bool(b.get("truncate", bool, True))
    async with srv.use(name, _keep_alive(b)) as lm:
        limit = _ollama_limit(lm, b)
        vecs, _ = await _vectors(srv, lm, name, [prompt] if prompt else [], limit, truncate, "prompt")
    return web.json_response({"embedding": vecs[0].tolist() if len(vecs) else []})
