"""Ollama-compatible endpoints, as the official `ollama` Python client (the library
Home Assistant's Ollama integration uses) sends and parses them: `GET /`,
`/api/version`, `/api/tags`, `/api/ps`, `POST /api/show`, `/api/chat`,
`/api/generate`. Streaming is NDJSON, one object per line; the last line has
`done: true`, the finish reason and Ollama's count and timing fields (nanoseconds).

Errors are `{"error": "..."}` with a 4xx, as Ollama answers them. `/api/tags`, `/api/ps`
and `/api/show` read the server's state only: they never load a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgelm import __version__
from edgelm.serve import tools
from edgelm.serve.chat import ChatTemplateError
from edgelm.serve.engine import Delta, EngineError, GenRequest, Stream
from edgelm.serve.grammar import ANY_JSON_OBJECT
from edgelm.serve.params import ApiError, Body
from edgelm.serve.scheduler import QueueFull

if TYPE_CHECKING:
    from edgelm.serve.app import Server

# The Ollama API level these endpoints follow (clients check it for features).
OLLAMA_API_VERSION = "0.12.3"

# Ollama's own defaults for the options a request leaves out.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1,
            "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def ollama_name(srv: Server) -> str:
    mid = srv.model_id
    return mid if ":" in mid else f"{mid}:latest"


def _check_model(srv: Server, b: Body) -> None:
    name = b.get("model", str)
    if name is None:
        raise ApiError("'model' is required", "model")
    ok = srv.model_aliases() | {ollama_name(srv)}
    if name not in ok and name.removesuffix(":latest") not in ok:
        raise ApiError(f"model '{name}' not found", "model", 404, "model_not_found")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _details(srv: Server) -> dict[str, Any]:
    md = srv.model.metadata if srv.model is not None else {}
    arch = str(md.get("general.architecture", srv.cfg.model))
    ftype = md.get("general.file_type")
    quant = {2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 1: "F16", 0: "F32"}
    size = md.get("general.size_label")
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": str(size) if size else "",
            "quantization_level": quant.get(ftype, str(ftype or "")) if isinstance(ftype, int) else ""}


def _file_info(srv: Server) -> tuple[int, str]:
    p = srv.cfg.model_path()
    try:
        st = p.stat()
    except OSError:
        return 0, _now()
    return st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")


def _digest(srv: Server) -> str:
    # A stable identity without hashing gigabytes on every listing: name, size, mtime.
    size, mtime = _file_info(srv)
    return hashlib.sha256(f"{Path(srv.cfg.model).name}:{size}:{mtime}".encode()).hexdigest()


# -- listing -----------------------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "edgelm": __version__})


async def tags(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    size, mtime = _file_info(srv)
    name = ollama_name(srv)
    return web.json_response({"models": [{"name": name, "model": name, "modified_at": mtime, "size": size,
                                          "digest": _digest(srv), "details": _details(srv)}]})


async def ps(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    if srv.model is None:
        return web.json_response({"models": []})
    size, _ = _file_info(srv)
    name = ollama_name(srv)
    return web.json_response({"models": [{
        "name": name, "model": name, "size": size, "digest": _digest(srv), "details": _details(srv),
        "expires_at": "2318-08-27T00:00:00Z", "size_vram": 0, "context_length": srv.max_context,
    }]})


async def show(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    _check_model(srv, b)
    model = srv.model_ready()
    md = model.metadata
    info = {k: v for k, v in md.items() if not (isinstance(v, list) and len(v) > 64)}
    caps = ["completion", "tools"]  # tools: through the template, or edgelm's tool prompt
    size, mtime = _file_info(srv)
    return web.json_response({
        "modified_at": mtime, "template": srv.template.source, "modelfile": f"FROM {srv.cfg.model_path()}\n",
        "license": str(md.get("general.license", "")), "details": _details(srv), "model_info": info,
        "parameters": "\n".join(f"{k} {v}" for k, v in DEFAULTS.items()), "capabilities": caps,
    }, dumps=lambda o: json.dumps(o, default=str))


# -- generation ----------------------------------------------------------------------------


def _options(srv: Server, b: Body) -> tuple[dict[str, Any], int | None, list[str], int]:
    """Sampling parameters, num_predict (None = until the context is full), stop
    strings and the context size from an Ollama `options` object."""
    raw = b.data.get("options")
    if raw is not None and not isinstance(raw, dict):
        raise ApiError("'options' must be an object", "options")
    o = Body(raw or {}, "options")
    sampling: dict[str, Any] = {
        "temperature": float(o.get("temperature", float, DEFAULTS["temperature"], lo=0.0, hi=100.0)),
        "top_k": int(o.get("top_k", int, DEFAULTS["top_k"], lo=0, hi=1 << 20)),
        "top_p": max(float(o.get("top_p", float, DEFAULTS["top_p"], lo=0.0, hi=1.0)), 1e-6),
        "min_p": float(o.get("min_p", float, DEFAULTS["min_p"], lo=0.0, hi=1.0)),
        "repeat_penalty": max(float(o.get("repeat_penalty", float, DEFAULTS["repeat_penalty"], lo=0.0, hi=10.0)), 1e-6),
        "repeat_last_n": int(o.get("repeat_last_n", int, DEFAULTS["repeat_last_n"], lo=-1, hi=1 << 20)),
        "presence_penalty": float(o.get("presence_penalty", float, 0.0, lo=-2.0, hi=2.0)),
        "frequency_penalty": float(o.get("frequency_penalty", float, 0.0, lo=-2.0, hi=2.0)),
    }
    seed = o.get("seed", int)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError("'options.seed' must fit in 64 bits", "options.seed")
    sampling["seed"] = None if seed is None or seed < 0 else seed  # Ollama: -1 = random
    n_predict = o.get("num_predict", int, -1, lo=-2)
    num_ctx = o.get("num_ctx", int, srv.max_context, lo=1)
    return sampling, (None if n_predict < 0 else n_predict), o.stop("stop"), min(num_ctx, srv.max_context)


def _format(b: Body) -> dict[str, Any] | None:
    """The JSON schema `format` asks for ("json": any object), or None; and the
    request fields this server refuses explicitly rather than ignoring."""
    f = b.data.get("format")
    schema: dict[str, Any] | None = None
    if f == "json":
        schema = dict(ANY_JSON_OBJECT)
    elif isinstance(f, dict):
        schema = f
    elif f not in (None, ""):
        raise ApiError("'format' must be \"json\" or a JSON schema object", "format", 400)
    think = b.data.get("think")
    if think not in (None, False, "false", "none"):
        raise ApiError("this model does not support thinking ('think')", "think", 400)
    ka = b.data.get("keep_alive")
    if ka is not None and not isinstance(ka, (int, float, str)) or isinstance(ka, bool):
        raise ApiError("'keep_alive' must be a duration such as \"5m\" or a number of seconds", "keep_alive", 400)
    return schema


def _stats(st: Stream, t0: float) -> dict[str, Any]:
    now = time.perf_counter()
    first = st.first_token_at or now
    last = st.last_token_at or first
    return {
        "total_duration": int((now - t0) * 1e9), "load_duration": 0,
        "prompt_eval_count": st.n_prompt - st.n_cached, "prompt_eval_duration": int((first - st.submitted) * 1e9),
        "eval_count": st.n_generated, "eval_duration": int((last - first) * 1e9),
    }


def _done_reason(d: Delta) -> str:
    return "length" if d.finish_reason == "length" else "stop"


async def _run(srv: Server, request: web.Request, prompt: list[int], b: Body, kind: str,
               schema: dict[str, Any] | None = None, plan: tools.ToolPlan | None = None) -> web.StreamResponse:
    sampling, n_predict, stop, num_ctx = _options(srv, b)
    grammar = await (srv.tool_grammar(plan, schema) if plan else srv.grammar_for(schema))
    if plan:
        sampling["penalize_prompt"] = False  # see Executor.add
    matcher = srv.grammars_ready().matcher(grammar) if grammar is not None else None
    room = num_ctx - len(prompt)
    if room <= 0:
        raise ApiError(f"the prompt has {len(prompt)} tokens; the context holds {num_ctx}", "prompt", 400)
    max_tokens = room if n_predict is None else min(n_predict, room)
    stream_mode = b.get("stream", bool, True)
    t0 = time.perf_counter()
    model = ollama_name(srv)
    try:
        st = srv.engine_ready().submit(GenRequest(prompt, max_tokens, sampling, stop, frozenset(), False,
                                                  srv.cfg.request_timeout_s, matcher))
    except QueueFull as e:
        raise ApiError(f"server busy: {e}", None, 429, headers={"Retry-After": "1"}) from None
    except ValueError as e:
        raise ApiError(str(e), "prompt", 400) from None

    def line(piece: str, done: bool, d: Delta | None = None, calls: list[tools.ToolCall] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": piece}
            if calls:
                out["message"]["tool_calls"] = [c.ollama() for c in calls]
        else:
            out["response"] = piece
        out["done"] = done
        if done and d is not None:
            out["done_reason"] = _done_reason(d)
            if kind == "generate":
                out["context"] = list(st.seq.tokens)
            out.update(_stats(st, t0))
        return out

    def ndjson(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode() + b"\n"

    try:
        if stream_mode:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            split = tools.ToolStream() if plan and plan.choice != "text" else None
            try:
                async for d in st:
                    piece = split.feed(d.text) if split is not None else d.text
                    if piece:
                        await resp.write(ndjson(line(piece, False)))
                    if d.finish_reason is not None:
                        if split is not None:
                            rest, calls = split.finish()
                            if rest:
                                await resp.write(ndjson(line(rest, False)))
                            if calls:  # each call whole, in one chunk, as Ollama sends them
                                await resp.write(ndjson(line("", False, calls=calls)))
                        await resp.write(ndjson(line("", True, d)))
            except EngineError as e:
                await resp.write(json.dumps({"error": str(e)}).encode() + b"\n")
            return resp
        text, last = "", None
        async for d in st:
            text += d.text
            last = d
        calls = tools.parse_calls(text) if plan and plan.choice != "text" and text.startswith("<") else []
        out = line("" if calls else text, True, last, calls)
        return web.json_response(out, dumps=lambda o: json.dumps(o, ensure_ascii=False))
    finally:
        st.abort()


async def generate(request: web.Request) -> web.StreamResponse:
    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    _check_model(srv, b)
    schema = _format(b)
    native = srv.model_ready().native
    prompt = b.get("prompt", str, "")
    if b.has("images"):
        raise ApiError("this model does not take images", "images")
    if not prompt and not b.has("context"):
        # Ollama's "load the model" request: answer at once, done.
        return web.json_response({"model": ollama_name(srv), "created_at": _now(), "response": "", "done": True,
                                  "done_reason": "load"})
    system = b.get("system", str)
    if b.get("raw", bool, False):
        text = prompt
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            text = srv.template.render(msgs, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ApiError(f"the chat template failed: {e}", "prompt") from None
    ctx = b.data.get("context")
    if ctx is not None and not (isinstance(ctx, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < native.n_vocab for t in ctx)):
        raise ApiError("'context' must be the token ids a previous /api/generate returned", "context")
    ids = (list(ctx) if ctx else []) + (srv.chat_tokens(text) if not ctx else native.tokenize(text, False, True))
    return await _run(srv, request, ids, b, "generate", schema)


async def embed(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    _check_model(srv, b)
    raise ApiError(f"model '{b.data.get('model')}' does not support embeddings", "model", 400)


async def chat(request: web.Request) -> web.StreamResponse:
    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    _check_model(srv, b)
    schema = _format(b)
    srv.model_ready()
    msgs = b.data.get("messages")
    if msgs is None:
        msgs = []
    if not isinstance(msgs, list):
        raise ApiError("'messages' must be an array", "messages")
    if not msgs:
        return web.json_response({"model": ollama_name(srv), "created_at": _now(),
                                  "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ApiError(f"messages[{i}] must be an object with role system, user, assistant or tool", "messages")
        content = m.get("content", "")
        if content is not None and not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", "messages")
        if m.get("images"):
            raise ApiError("this model does not take images", "messages")
        out.append({**m, "content": content or ""})
    plan = tools.parse_tools(b.data.get("tools"))
    if plan:
        plan = plan.limit_rounds(out, srv.cfg.max_tool_rounds)
    msgs2, tools_arg = tools.prompt_messages(out, plan, srv.template.renders_tools)
    try:
        text = srv.template.render(msgs2, add_generation_prompt=True, tools=tools_arg)
    except ChatTemplateError as e:
        raise ApiError(f"the chat template failed: {e}", "messages") from None
    return await _run(srv, request, srv.chat_tokens(text), b, "chat", schema, plan)


# -- models on the device ------------------------------------------------------------


def _models_dir(srv: Server) -> Path:
    return Path(srv.cfg.models_dir).expanduser()


async def list_files(request: web.Request) -> web.Response:
    """The GGUF files in the models directory (what other daemons may pull)."""
    srv: Server = request.app["server"]
    d = _models_dir(srv)
    files = sorted(p for p in d.glob("*.gguf") if p.is_file()) if d.is_dir() else []
    return web.json_response({"models": [{"file": p.name, "size": p.stat().st_size} for p in files]})


_sha_cache: dict[tuple[str, int, float], str] = {}


async def get_file(request: web.Request) -> web.StreamResponse:
    """One model file, with Range support (resumable pulls) and its sha256."""
    from edgelm.pull import PullError, file_sha256, safe_model_name

    srv: Server = request.app["server"]
    try:
        name = safe_model_name(request.match_info["file"])
    except PullError as e:
        raise ApiError(str(e), "file", 400) from None
    path = _models_dir(srv) / name
    if not path.is_file():
        raise ApiError(f"model file '{name}' not found", "file", 404)
    st = path.stat()
    key = (name, st.st_size, st.st_mtime)
    if key not in _sha_cache:
        _sha_cache[key] = await asyncio.get_running_loop().run_in_executor(None, file_sha256, path)
    return web.FileResponse(path, headers={"X-Edgelm-Sha256": _sha_cache[key], "Content-Type": "application/octet-stream"})


async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's /api/pull: NDJSON progress lines, then {"status": "success"}."""
    from edgelm.pull import PullError, safe_model_name
    from edgelm.pull import pull as do_pull

    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    source = b.get("model", str) or b.get("name", str)
    if not source:
        raise ApiError("'model' is required", "model")
    stream_mode = b.get("stream", bool, True)
    try:
        if "://" not in source:
            safe_model_name(source)
    except PullError as e:
        raise ApiError(str(e), "model", 400) from None
    if not stream_mode:
        try:
            await do_pull(source, _models_dir(srv))
        except (PullError, OSError) as e:
            raise ApiError(f"pull failed: {e}", "model", 400) from None
        return web.json_response({"status": "success"})
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def run() -> None:
        try:
            await do_pull(source, _models_dir(srv), progress=lines.put_nowait)
        finally:
            lines.put_nowait(None)

    task = asyncio.ensure_future(run())
    while (p := await lines.get()) is not None:
        await resp.write(json.dumps({k: v for k, v in p.items() if k != "rate"}).encode() + b"\n")
    try:
        task.result()
    except (PullError, OSError) as e:
        await resp.write(json.dumps({"error": f"pull failed: {e}"}).encode() + b"\n")
    return resp
