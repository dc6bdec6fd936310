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
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgelm import EdgelmError, __version__, modelinfo
from edgelm._native import SamplingParams
from edgelm.config import parse_keep_alive
from edgelm.engine.loop import Delta, EngineError, GenRequest, Stream
from edgelm.prompt.chat import ChatTemplateError
from edgelm.prompt.grammar import ANY_JSON_OBJECT
from edgelm.prompt.volatile import move_time_line
from edgelm.server import access, thinking, tools
from edgelm.server.embed import require_generation
from edgelm.server.params import ApiError, Body, int_list
from edgelm.server.security import require_admin
from edgelm.server.state import SERVER, Server

log = logging.getLogger("edgelm.serve")

if TYPE_CHECKING:
    from edgelm.engine.pool import LoadedModel

# The Ollama API level these endpoints follow (clients check it for features).
OLLAMA_API_VERSION = "0.12.3"

OLLAMA_DEFAULTS = SamplingParams(top_p=0.9, min_p=0.0, repeat_penalty=1.1)
"""Ollama's defaults for the options a request leaves out, where they differ from the
engine's (llama.cpp's)."""


def from_ollama(o: Body, model_params: Mapping[str, Any], penalize_prompt: bool = True) -> SamplingParams:
    """The sampling settings of an Ollama `options` object (Ollama's names and ranges;
    whole-number floats where integers go, as Home Assistant sends them; seed -1 =
    random). A pulled model's parameters (its registry layer) come before Ollama's
    defaults, as in Ollama. `penalize_prompt`: False for a tool turn (see
    SamplingParams)."""

    def dflt(name: str) -> Any:
        v = model_params.get(name)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else getattr(OLLAMA_DEFAULTS, name)

    return SamplingParams(
        temperature=float(o.get("temperature", float, dflt("temperature"), lo=0.0, hi=100.0)),
        top_k=int(o.get("top_k", int, dflt("top_k"), lo=0, hi=1 << 20)),
        top_p=max(float(o.get("top_p", float, dflt("top_p"), lo=0.0, hi=1.0)), 1e-6),
        min_p=float(o.get("min_p", float, dflt("min_p"), lo=0.0, hi=1.0)),
        repeat_penalty=max(float(o.get("repeat_penalty", float, dflt("repeat_penalty"), lo=0.0, hi=10.0)), 1e-6),
        repeat_last_n=int(o.get("repeat_last_n", int, dflt("repeat_last_n"), lo=-1, hi=1 << 20)),
        presence_penalty=float(o.get("presence_penalty", float, dflt("presence_penalty"), lo=-2.0, hi=2.0)),
        frequency_penalty=float(o.get("frequency_penalty", float, dflt("frequency_penalty"), lo=-2.0, hi=2.0)),
        seed=None if (seed := o.get("seed", int)) is None or seed < 0 else seed,
        penalize_prompt=penalize_prompt,
    )


def ollama_name(mid: str) -> str:
    return mid if ":" in mid else f"{mid}:latest"


def model_name(b: Body) -> str:
    name = b.get("model", str) or b.get("name", str)
    if not name:
        raise ApiError("'model' is required", "model")
    return str(name)


def _keep_alive(b: Body) -> float | None | str:
    """The request's keep_alive in seconds (None = forever), or "default"."""
    ka = b.data.get("keep_alive")
    if ka is None:
        return "default"
    try:
        return parse_keep_alive(ka)
    except ValueError as e:
        raise ApiError(str(e), "keep_alive", 400) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


async def _metadata(srv: Server, path: Path) -> dict[str, Any]:
    """A listed file's metadata, without loading it; {} for a file that is not GGUF."""
    try:
        return await srv.pool.file_metadata(path)
    except (EdgelmError, OSError):
        return {}


def _file_info(path: Path) -> tuple[int, str]:
    try:
        st = path.stat()
    except OSError:
        return 0, _now()
    return st.st_size, _iso(st.st_mtime)


def _digest(path: Path) -> str:
    if path.parent.name == "blobs" and path.name.startswith("sha256-"):
        return path.name[len("sha256-") :]
    # A stable identity without hashing gigabytes on every listing: name, size, mtime.
    size, mtime = _file_info(path)
    return hashlib.sha256(f"{path.name}:{size}:{mtime}".encode()).hexdigest()


# -- listing -----------------------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "edgelm": __version__})


async def tags(request: web.Request) -> web.Response:
    """The models in the models directory (and the configured one), under every name
    they have: file listing and metadata only, never a load."""
    srv: Server = request.app[SERVER]
    out = []
    for name, _, path in srv.pool.names():
        size, mtime = _file_info(path)
        md = await _metadata(srv, path)
        out.append(
            {
                "name": ollama_name(name),
                "model": ollama_name(name),
                "modified_at": mtime,
                "size": size,
                "digest": _digest(path),
                "details": modelinfo.details(md),
                "capabilities": modelinfo.capabilities(md),
            }
        )
    return web.json_response({"models": out})


def _expires(lm: LoadedModel) -> str:
    if lm.expires_at is None:
        return "2318-08-27T00:00:00Z"  # Ollama's "forever"
    try:
        return _iso(lm.expires_at)
    except (OverflowError, OSError, ValueError):
        return "2318-08-27T00:00:00Z"


async def ps(request: web.Request) -> web.Response:
    """The models in memory, and when each will be unloaded."""
    srv: Server = request.app[SERVER]
    out = []
    for lm in list(srv.pool.loaded.values()):
        md = await _metadata(srv, lm.path)
        out.append(
            {
                "name": ollama_name(lm.id),
                "model": ollama_name(lm.id),
                "size": lm.cost_bytes,
                "digest": _digest(lm.path),
                "details": modelinfo.details(md),
                "expires_at": _expires(lm),
                "size_vram": 0 if lm.device == "cpu" else _file_info(lm.path)[0],
                "context_length": lm.max_context,
            }
        )
    return web.json_response({"models": out})


async def show(request: web.Request) -> web.Response:
    """A model's metadata, template and capabilities, read from its file: /api/show
    never loads a model."""
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    mid, path = srv.pool.resolve(model_name(b))
    if not path.is_file():
        raise ApiError(f"model '{mid}' has no file at {path.name}", "model", 404, "model_not_found")
    try:
        md = await srv.pool.file_metadata(path)
    except EdgelmError as e:
        raise ApiError(f"model '{mid}' cannot be read: {e}", "model", 422) from None
    st = srv.pool.model_store()
    entry = srv.pool.entry(mid)
    body = await asyncio.get_running_loop().run_in_executor(None, modelinfo.describe, path, md, entry, st)
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


# -- generation ----------------------------------------------------------------------------


def _options(
    lm: LoadedModel, b: Body, penalize_prompt: bool
) -> tuple[SamplingParams, int | None, list[str], int, bool | None]:
    """Sampling settings, num_predict (None = until the context is full), stop strings,
    the context size and `prompt_reuse` (edgelm's own option) from an Ollama `options`
    object."""
    raw = b.data.get("options")
    if raw is not None and not isinstance(raw, dict):
        raise ApiError("'options' must be an object", "options")
    o = Body(raw or {}, "options", "options.")
    sampling = from_ollama(o, lm.params, penalize_prompt)
    n_predict = o.get("num_predict", int, -1, lo=-2)  # -1: until done, -2: until the context is full
    num_ctx = o.get("num_ctx", int, lm.max_context, lo=1)
    stop = o.stop("stop") if o.has("stop") else [str(x) for x in lm.params.get("stop") or [] if isinstance(x, str)][:16]
    reuse = o.get("prompt_reuse", bool, None)
    return sampling, (None if n_predict < 0 else n_predict), stop, min(num_ctx, lm.max_context), reuse


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
    return schema


def _thinking(lm: LoadedModel, b: Body) -> thinking.Thinking:
    """The request's `think` against what the model can do (a 400 for `think: true` on a
    model that cannot think, as Ollama answers; false and null always work)."""
    raw = b.data.get("options")
    budget = raw.get("thinking_budget") if isinstance(raw, dict) else None
    return thinking.from_ollama(b.data.get("think"), budget, lm.template.thinking, ollama_name(lm.id))


def _stats(st: Stream, t0: float, load_s: float) -> dict[str, Any]:
    now = time.perf_counter()
    first = st.first_token_at or now
    last = st.last_token_at or first
    return {
        "total_duration": int((now - t0) * 1e9),
        "load_duration": int(load_s * 1e9),
        "prompt_eval_count": st.n_prompt - st.n_cached,
        "prompt_eval_duration": int((first - st.submitted) * 1e9),
        "eval_count": st.n_generated,
        "eval_duration": int((last - first) * 1e9),
    }


def _done_reason(d: Delta) -> str:
    return "length" if d.finish_reason == "length" else "stop"


async def _run(
    srv: Server,
    lm: LoadedModel,
    request: web.Request,
    text: str,
    prompt: list[int],
    b: Body,
    kind: str,
    schema: dict[str, Any] | None,
    plan: tools.ToolPlan | None,
    think: thinking.Thinking,
    load_s: float = 0.0,
) -> web.StreamResponse:
    """Generate the answer to a rendered prompt (`text`, as `prompt` tokens) and send it
    back as Ollama does: content, `thinking` apart (thinking models), tool calls whole."""
    sampling, n_predict, stop, num_ctx, reuse = _options(lm, b, penalize_prompt=plan is None)
    style = lm.template.thinking
    opened = thinking.forced_open(text, style)
    rule = thinking.thought_rule(think, style, opened)
    grammar = await tools.answer_grammar(lm, plan, schema, rule)
    matcher = tools.answer_matcher(lm, grammar, rule)
    room = num_ctx - len(prompt)
    if room <= 0:
        raise ApiError(f"the prompt has {len(prompt)} tokens; the context holds {num_ctx}", "prompt", 400)
    max_tokens = room if n_predict is None else min(n_predict, room)
    stream_mode = b.get("stream", bool, True)
    t0 = time.perf_counter()
    model = ollama_name(lm.id)
    if max_tokens == 0:  # num_predict 0: "at most 0 tokens" — nothing to compute
        done: dict[str, Any] = {
            "model": model,
            "created_at": _now(),
            "done": True,
            "done_reason": "length",
            "total_duration": 0,
            "load_duration": int(load_s * 1e9),
            "prompt_eval_count": 0,
            "prompt_eval_duration": 0,
            "eval_count": 0,
            "eval_duration": 0,
        }
        done.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
        if stream_mode:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            await resp.write(json.dumps(done).encode() + b"\n")
            return resp
        return web.json_response(done)
    st = lm.engine.submit(
        GenRequest(prompt, max_tokens, sampling, stop, frozenset(), False, srv.cfg.request_timeout_s, matcher, reuse)
    )  # edgelm.errors: busy, too long
    access.track(st, lm.id)

    def line(
        piece: str, done: bool, d: Delta | None = None, calls: list[tools.ToolCall] | None = None, thought: str = ""
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": piece}
            if thought:
                out["message"]["thinking"] = thought
            if calls:
                out["message"]["tool_calls"] = [c.ollama() for c in calls]
        else:
            out["response"] = piece
            if thought:
                out["thinking"] = thought
        out["done"] = done
        if done and d is not None:
            out["done_reason"] = _done_reason(d)
            if kind == "generate":
                out["context"] = st.tokens
            out.update(_stats(st, t0, load_s))
        return out

    def ndjson(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode() + b"\n"

    reply = tools.Reply(plan, style, think.on and think.split, opened)
    try:
        if stream_mode:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            try:
                async for d in st:
                    thought, piece = reply.feed(d.text)
                    if piece or thought:
                        await resp.write(ndjson(line(piece, False, thought=thought)))
                    if d.finish_reason is not None:
                        thought, rest, calls = reply.finish()
                        if rest or thought:
                            await resp.write(ndjson(line(rest, False, thought=thought)))
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
        thought, content, calls = reply.whole(text)
        out = line(content, True, last, calls, thought)
        return web.json_response(out, dumps=lambda o: json.dumps(o, ensure_ascii=False))
    finally:
        st.abort()


async def _load_or_unload(
    srv: Server, request: web.Request, name: str, ka: float | None | str, kind: str
) -> web.Response:
    """Ollama's requests without a prompt: load the model (and set its keep_alive), or
    with keep_alive 0, unload it — an admin action (it may take the configured model
    out of memory, which no other request's keep_alive does)."""
    head: dict[str, Any] = {"model": ollama_name(srv.pool.resolve(name)[0]), "created_at": _now()}
    head.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
    if ka == 0:
        require_admin(request)
        srv.ready_or_503()
        mid, _ = srv.pool.resolve(name)
        lm = srv.pool.loaded.get(mid)
        if lm is not None and not lm.busy:
            await srv.pool.unload(mid)
        elif lm is not None:
            lm.keep_alive_s = 0.0  # unloaded when its requests end
        return web.json_response({**head, "done": True, "done_reason": "unload"})
    async with srv.use(name, ka):
        return web.json_response({**head, "done": True, "done_reason": "load"})


async def generate(request: web.Request) -> web.StreamResponse:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    name = model_name(b)
    schema = _format(b)
    ka = _keep_alive(b)
    prompt = b.get("prompt", str, "")
    if b.has("images"):
        raise ApiError("this model does not take images", "images")
    if not prompt and not b.has("context"):
        return await _load_or_unload(srv, request, name, ka, "generate")
    system = b.get("system", str)
    raw = b.get("raw", bool, False)
    ctx = b.data.get("context")
    t0 = time.perf_counter()
    async with srv.use(name, ka) as lm:
        require_generation(lm, "generate")
        load_s = time.perf_counter() - t0
        native = lm.model.native
        think = _thinking(lm, b)
        system = system or lm.system  # a pulled model's system prompt, unless the request has one
        if raw:
            text = prompt
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            try:
                text = lm.template.render(msgs, add_generation_prompt=True, **think.template_vars(lm.template.thinking))
            except ChatTemplateError as e:
                raise ApiError(f"the chat template failed: {e}", "prompt") from None
        if ctx is not None:
            ctx = int_list(ctx, "context")
            if not all(0 <= t < native.n_vocab for t in ctx):
                raise ApiError("'context' must be the token ids a previous /api/generate returned", "context")
        ids = (list(ctx) if ctx else []) + (lm.chat_tokens(text) if not ctx else native.tokenize(text, False, True))
        return await _run(srv, lm, request, text, ids, b, "generate", schema, None, think, load_s)


async def chat(request: web.Request) -> web.StreamResponse:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    name = model_name(b)
    schema = _format(b)
    ka = _keep_alive(b)
    msgs = b.data.get("messages")
    if msgs is None:
        msgs = []
    if not isinstance(msgs, list):
        raise ApiError("'messages' must be an array", "messages")
    if not msgs:
        return await _load_or_unload(srv, request, name, ka, "chat")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ApiError(f"messages[{i}] must be an object with role system, user, assistant or tool", "messages")
        content = m.get("content", "")
        if content is not None and not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", "messages")
        if m.get("images"):
            raise ApiError("this model does not take images", "messages")
        msg = {**m, "content": content or ""}
        thought = m.get("thinking")
        if thought is not None:  # an earlier answer's thought: templates read it as reasoning_content
            if not isinstance(thought, str):
                raise ApiError(f"messages[{i}].thinking must be a string", "messages")
            msg["reasoning_content"] = msg.pop("thinking")
        out.append(msg)
    plan = tools.parse_tools(b.data.get("tools"))
    if plan:
        plan = plan.limit_rounds(out, srv.cfg.max_tool_rounds)
    t0 = time.perf_counter()
    async with srv.use(name, ka) as lm:
        require_generation(lm, "chat")
        load_s = time.perf_counter() - t0
        think = _thinking(lm, b)
        if lm.system and not any(m["role"] == "system" for m in out):
            out.insert(0, {"role": "system", "content": lm.system})
        msgs2, tools_arg = tools.prompt_messages(out, plan, lm.template.renders_tools)
        if srv.cfg.move_time_line:  # after the tool prompt, which goes into the system message
            msgs2 = move_time_line(msgs2)
        try:
            text = lm.template.render(
                msgs2, add_generation_prompt=True, tools=tools_arg, **think.template_vars(lm.template.thinking)
            )
        except ChatTemplateError as e:
            raise ApiError(f"the chat template failed: {e}", "messages") from None
        return await _run(srv, lm, request, text, lm.chat_tokens(text), b, "chat", schema, plan, think, load_s)
