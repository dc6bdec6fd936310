"""OpenAI-compatible endpoints, as the `openai` Python SDK sends and parses them:
`/v1/completions`, `/v1/chat/completions` (SSE streaming and not), `/v1/models`.

Extra sampling fields the SDK passes through `extra_body`: `top_k`, `min_p`,
`repeat_penalty`, `repeat_last_n`, `ignore_eos`, `timeout` (seconds; the request ends
with finish_reason "timeout").
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgelm._native import SamplingParams
from edgelm.engine.loop import Delta, EngineError, GenRequest, Stream
from edgelm.errors import RequestError
from edgelm.prompt.chat import ChatTemplateError
from edgelm.prompt.grammar import ANY_JSON_OBJECT
from edgelm.prompt.volatile import move_time_line
from edgelm.server import access, thinking, tools
from edgelm.server.embed import require_generation
from edgelm.server.params import ApiError, Body, int_list
from edgelm.server.state import SERVER, Server

if TYPE_CHECKING:
    from edgelm.engine.pool import LoadedModel

ROLES = ("system", "developer", "user", "assistant", "tool")


OPENAI_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0)
"""OpenAI's defaults, where they differ from the engine's (llama.cpp's)."""


def from_openai(b: Body) -> SamplingParams:
    """The sampling settings of an OpenAI request: OpenAI's fields, and the llama.cpp
    ones the SDK sends through `extra_body` (`top_k`, `min_p`, `repeat_penalty`,
    `repeat_last_n`), within OpenAI's ranges; each refusal names its field."""
    d = OPENAI_DEFAULTS
    seed = b.get("seed", int)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError("'seed' must fit in 64 bits", "seed")
    return SamplingParams(
        temperature=float(b.get("temperature", float, d.temperature, lo=0.0, hi=2.0)),
        # Open-ended lower bounds: a positive value too small for f32 means "as small as can be".
        top_p=max(float(b.get("top_p", float, d.top_p, lo=0.0, hi=1.0, lo_open=True)), 1e-6),
        top_k=int(b.get("top_k", int, d.top_k, lo=0, hi=1 << 20)),
        min_p=float(b.get("min_p", float, d.min_p, lo=0.0, hi=1.0)),
        repeat_penalty=max(
            float(b.get("repeat_penalty", float, d.repeat_penalty, lo=0.0, hi=10.0, lo_open=True)), 1e-6
        ),
        repeat_last_n=int(b.get("repeat_last_n", int, d.repeat_last_n, lo=-1, hi=1 << 20)),
        presence_penalty=float(b.get("presence_penalty", float, d.presence_penalty, lo=-2.0, hi=2.0)),
        frequency_penalty=float(b.get("frequency_penalty", float, d.frequency_penalty, lo=-2.0, hi=2.0)),
        seed=None if seed is None else seed % (2**64),
    )


def _common(srv: Server, b: Body) -> dict[str, Any]:
    if b.has("logit_bias") and b.data["logit_bias"] != {}:
        raise ApiError("'logit_bias' is not supported", "logit_bias")
    so = b.data.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError("'stream_options' must be an object", "stream_options")
    include_usage = Body(so or {}, "stream_options").get("include_usage", bool, False)
    timeout = b.get("timeout", float, srv.cfg.request_timeout_s, lo=0.0, lo_open=True)
    return {
        "n": b.get("n", int, 1, lo=1, hi=16),
        "stream": b.get("stream", bool, False),
        "include_usage": include_usage,
        "stop": b.stop(),
        "sampling": from_openai(b),
        "ignore_eos": b.get("ignore_eos", bool, False),
        "prompt_reuse": b.get("prompt_reuse", bool, None),
        "timeout": timeout,
    }


def _max_tokens(lm: LoadedModel, b: Body, key: str, n_prompt: int) -> int:
    """The token budget: the request's (at least 1, as OpenAI requires; /v1/completions
    takes 0 with `echo`, to score a prompt), capped by the room left in the context."""
    room = lm.max_context - n_prompt
    if room <= 0:
        raise ApiError(
            f"the prompt has {n_prompt} tokens; this model's context holds {lm.max_context}",
            "messages" if key == "max_completion_tokens" else "prompt",
            400,
            "context_length_exceeded",
        )
    lo = 0 if key == "max_tokens" and b.get("echo", bool, False) else 1
    mt = b.get(key, int, None, lo=lo)
    if mt is None and key == "max_completion_tokens":
        mt = b.get("max_tokens", int, None, lo=1)
    return room if mt is None else min(mt, room)


async def _submit(
    lm: LoadedModel,
    prompt: list[int],
    max_tokens: int,
    c: dict[str, Any],
    n_logprobs: int,
    n: int,
    grammar: str | None = None,
    thought: thinking.ThoughtRule | None = None,
) -> list[Stream]:
    streams: list[Stream] = []
    try:
        for i in range(n):
            sampling: SamplingParams = c["sampling"]
            seed = None if sampling.seed is None else (sampling.seed + i) % (2**64)  # n choices, n draws
            sampling = sampling.replace(n_logprobs=n_logprobs, seed=seed)
            matcher = tools.answer_matcher(lm, grammar, thought)
            req = GenRequest(
                prompt,
                max_tokens,
                sampling,
                c["stop"],
                frozenset(),
                c["ignore_eos"],
                c["timeout"],
                matcher,
                c["prompt_reuse"],
            )
            streams.append(lm.engine.submit(req))
            access.track(streams[-1], lm.id)
    except RequestError:  # busy, or too long for the context (edgelm.errors): none of the n runs
        for s in streams:
            s.abort()
        raise
    return streams


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from several streams as they come."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    q: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, s: Stream) -> None:
        try:
            async for d in s:
                q.put_nowait((i, d))
        except BaseException as e:
            q.put_nowait(e)
        finally:
            q.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _usage(streams: list[Stream]) -> dict[str, Any]:
    n_prompt = streams[0].n_prompt if streams else 0
    gen = sum(s.n_generated for s in streams)
    cached = max((s.n_cached for s in streams), default=0)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": gen,
        "total_tokens": n_prompt + gen,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _Chunks:
    """SSE events of one response: the fields every chunk repeats are encoded once."""

    def __init__(self, head: dict[str, Any]) -> None:
        self._prefix = (
            b"data: " + json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1].encode() + b',"choices":['
        )

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body = ",".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in choices)
        tail = "]" if usage is None else '],"usage":' + json.dumps(usage, separators=(",", ":"))
        return self._prefix + (body + tail).encode() + b"}\n\n"


async def _sse_response(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    return resp


# -- /v1/completions -------------------------------------------------------------------


def _prompts(lm: LoadedModel, b: Body) -> list[list[int]]:
    p = b.data.get("prompt")
    if p is None:
        raise ApiError("'prompt' is required", "prompt")
    native = lm.model.native
    n_vocab = native.n_vocab
    if isinstance(p, str):
        out = [native.tokenize(p, True, True)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        out = [native.tokenize(x, True, True) for x in p]
    elif isinstance(p, list) and p and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p):
        out = [int_list(p, "prompt")]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        out = [int_list(x, f"prompt[{i}]") for i, x in enumerate(p)]
    else:
        raise ApiError("'prompt' must be a string, an array of strings, or token ids", "prompt")
    if len(out) > 16:
        raise ApiError("'prompt' may hold at most 16 prompts", "prompt")
    for ids in out:
        if not ids:
            raise ApiError("'prompt' is empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ApiError(f"token id {bad} in 'prompt' is out of range (vocabulary has {n_vocab} tokens)", "prompt")
    return out


def _completion_logprobs(lm: LoadedModel, ds: list[Delta], offset0: int) -> dict[str, Any]:
    tokens, lps, tops, offs = [], [], [], []
    off = offset0
    for d in ds:
        if d.token is None:
            continue
        t = lm.token_str(d.token)
        tokens.append(t)
        lps.append(d.logprob)
        tops.append({lm.token_str(tid): lp for tid, lp in d.top})
        offs.append(off)
        off += len(d.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


async def completions(request: web.Request) -> web.StreamResponse:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    async with srv.use(b.get("model", str)) as lm:
        require_generation(lm, "completions")
        return await _completions(request, srv, lm, b)


async def _completions(request: web.Request, srv: Server, lm: LoadedModel, b: Body) -> web.StreamResponse:
    c = _common(srv, b)
    if b.has("suffix"):
        raise ApiError("'suffix' is not supported", "suffix")
    best_of = b.get("best_of", int, None, lo=1, hi=16)
    if best_of is not None and best_of != c["n"]:
        raise ApiError("'best_of' other than n is not supported", "best_of")
    n_lp = b.get("logprobs", int, None, lo=0, hi=20)
    echo = b.get("echo", bool, False)
    prompts = _prompts(lm, b)
    max_tokens = [_max_tokens(lm, b, "max_tokens", len(p)) for p in prompts]
    cid = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    streams: list[Stream] = []
    echoes: list[str] = []
    for p in prompts:
        echoes += [lm.model.native.detokenize(p, True) if echo else ""] * c["n"]
    if max_tokens[0] == 0:  # echo with max_tokens 0: the prompt back, nothing generated
        n_prompt = sum(len(p) for p in prompts)
        return web.json_response(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": lm.id,
                "system_fingerprint": srv.fingerprint,
                "choices": [
                    {"index": i, "text": e, "logprobs": None, "finish_reason": "length"} for i, e in enumerate(echoes)
                ],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": 0,
                    "total_tokens": n_prompt,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            }
        )
    for p, mt in zip(prompts, max_tokens):
        streams += await _submit(lm, p, mt, c, n_lp or 0, c["n"])

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": lm.id,
            "system_fingerprint": srv.fingerprint,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    try:
        if c["stream"]:
            resp = await _sse_response(request)
            ev = _Chunks({k: v for k, v in chunk([]).items() if k != "choices"})
            for i, e in enumerate(echoes):
                if e:
                    await resp.write(ev.event([{"index": i, "text": e, "logprobs": None, "finish_reason": None}]))
            try:
                async for i, d in _merged(streams):
                    lp = _completion_logprobs(lm, [d], 0) if n_lp is not None else None
                    await resp.write(
                        ev.event([{"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}])
                    )
            except EngineError as e:
                await resp.write(_sse(ApiError(str(e)).body()))
            if c["include_usage"]:
                await resp.write(ev.event([], _usage_multi(streams, prompts, c["n"])))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        texts = list(echoes)
        deltas: list[list[Delta]] = [[] for _ in streams]
        finish: list[str | None] = [None] * len(streams)
        async for i, d in _merged(streams):
            texts[i] += d.text
            deltas[i].append(d)
            finish[i] = d.finish_reason or finish[i]
        choices = [
            {
                "index": i,
                "text": texts[i],
                "logprobs": _completion_logprobs(lm, deltas[i], len(echoes[i])) if n_lp is not None else None,
                "finish_reason": finish[i],
            }
            for i in range(len(streams))
        ]
        return web.json_response(chunk(choices, _usage_multi(streams, prompts, c["n"])))
    finally:
        for s in streams:
            s.abort()


def _usage_multi(streams: list[Stream], prompts: list[list[int]], n: int) -> dict[str, Any]:
    n_prompt = sum(len(p) for p in prompts)
    gen = sum(s.n_generated for s in streams)
    cached = sum(streams[i * n].n_cached for i in range(len(prompts)))
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": gen,
        "total_tokens": n_prompt + gen,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# -- /v1/chat/completions --------------------------------------------------------------


def _messages(b: Body) -> list[dict[str, Any]]:
    msgs = b.data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise ApiError(
                f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content"
            )
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise ApiError(f"messages[{i}].content is required", f"messages[{i}].content")
        msg = dict(m)
        msg["role"] = "system" if role == "developer" else role
        msg["content"] = content
        out.append(msg)
    return out


def _response_schema(b: Body) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks for (json_object: any object), or None."""
    rf = b.data.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_JSON_OBJECT)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise ApiError("'response_format.json_schema' must be an object with a 'schema' object", "response_format")
        schema = js.get("schema")
        return dict(schema) if schema else dict(ANY_JSON_OBJECT)
    raise ApiError("'response_format.type' must be text, json_object or json_schema", "response_format")


def _chat_logprobs(lm: LoadedModel, ds: list[Delta]) -> dict[str, Any]:
    content = []
    for d in ds:
        if d.token is None:
            continue
        t = lm.token_str(d.token)
        content.append(
            {
                "token": t,
                "logprob": d.logprob,
                "bytes": list(lm.token_bytes(d.token)),
                "top_logprobs": [
                    {"token": lm.token_str(tid), "logprob": lp, "bytes": list(lm.token_bytes(tid))} for tid, lp in d.top
                ],
            }
        )
    return {"content": content, "refusal": None}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    async with srv.use(b.get("model", str)) as lm:
        require_generation(lm, "chat")
        return await _chat_completions(request, srv, lm, b)


async def _chat_completions(request: web.Request, srv: Server, lm: LoadedModel, b: Body) -> web.StreamResponse:
    c = _common(srv, b)
    msgs = _messages(b)
    want_lp = b.get("logprobs", bool, False)
    top_lp = b.get("top_logprobs", int, None, lo=0, hi=20)
    if top_lp is not None and not want_lp:
        raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    plan = tools.parse_tools(b.data.get("tools"), b.data.get("tool_choice"), b.data.get("parallel_tool_calls"))
    if plan:
        plan = plan.limit_rounds(msgs, srv.cfg.max_tool_rounds)
    schema = _response_schema(b)
    style = lm.template.thinking
    think = thinking.from_openai(b.data, style)
    msgs, tools_arg = tools.prompt_messages(msgs, plan, lm.template.renders_tools)
    if srv.cfg.move_time_line:  # after the tool prompt, which goes into the system message
        msgs = move_time_line(msgs)
    if plan:
        c["sampling"] = c["sampling"].replace(penalize_prompt=False)  # see SamplingParams
    try:
        text = lm.template.render(msgs, add_generation_prompt=True, tools=tools_arg, **think.template_vars(style))
    except ChatTemplateError as e:
        raise ApiError(f"the chat template failed: {e}", "messages") from None
    opened = thinking.forced_open(text, style)
    rule = thinking.thought_rule(think, style, opened)
    grammar = await tools.answer_grammar(lm, plan, schema, rule)
    prompt = lm.chat_tokens(text)
    max_tokens = _max_tokens(lm, b, "max_completion_tokens", len(prompt))
    streams = await _submit(lm, prompt, max_tokens, c, (top_lp or 0) if want_lp else 0, c["n"], grammar, rule)

    def reply() -> tools.Reply:
        return tools.Reply(plan, style if think.split else None, think.on, opened)

    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())

    def chunk(obj: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": cid,
            "object": obj,
            "created": created,
            "model": lm.id,
            "system_fingerprint": srv.fingerprint,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    try:
        if c["stream"]:
            resp = await _sse_response(request)
            ev = _Chunks({k: v for k, v in chunk("chat.completion.chunk", []).items() if k != "choices"})
            replies = [reply() for _ in streams]
            for i in range(len(streams)):
                first = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                await resp.write(ev.event([first]))
            try:
                async for i, d in _merged(streams):
                    lp = _chat_logprobs(lm, [d]) if want_lp else None
                    rp, reason = replies[i], d.finish_reason
                    thought, piece = rp.feed(d.text)
                    calls: list[tools.ToolCall] = []
                    if reason is not None:
                        t2, rest, calls = rp.finish()
                        thought, piece = thought + t2, piece + rest
                        if calls:
                            reason = "tool_calls" if reason != "length" else reason
                    elif not piece and not thought and (rp.holding_calls or rp.think is not None):
                        continue  # held back: a call goes out whole at the end, a tag when it is whole
                    body: dict[str, Any] = {}
                    if thought:  # as llama-server and vLLM send a thought
                        body["reasoning_content"] = thought
                    if piece or (reason is None and not thought):
                        body["content"] = piece
                    if calls:
                        if body:
                            await resp.write(
                                ev.event([{"index": i, "delta": body, "logprobs": lp, "finish_reason": None}])
                            )
                            body, lp = {}, None
                        for k, call in enumerate(calls):
                            delta = {"role": "assistant", "content": None, "tool_calls": [call.openai(k)]}
                            await resp.write(
                                ev.event([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                            )
                    await resp.write(ev.event([{"index": i, "delta": body, "logprobs": lp, "finish_reason": reason}]))
            except EngineError as e:
                await resp.write(_sse(ApiError(str(e)).body()))
            if c["include_usage"]:
                await resp.write(ev.event([], _usage(streams)))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        texts = [""] * len(streams)
        deltas: list[list[Delta]] = [[] for _ in streams]
        finish: list[str | None] = [None] * len(streams)
        async for i, d in _merged(streams):
            texts[i] += d.text
            deltas[i].append(d)
            finish[i] = d.finish_reason or finish[i]
        choices = []
        for i in range(len(streams)):
            thought, content, calls = reply().whole(texts[i])
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if thought:
                message["reasoning_content"] = thought
            if calls:
                message.update(
                    content=None, tool_calls=[{k: v for k, v in c.openai(0).items() if k != "index"} for c in calls]
                )
                finish[i] = "tool_calls" if finish[i] != "length" else finish[i]
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": _chat_logprobs(lm, deltas[i]) if want_lp else None,
                    "finish_reason": finish[i],
                }
            )
        return web.json_response(chunk("chat.completion", choices, _usage(streams)))
    finally:
        for s in streams:
            s.abort()


# -- /v1/models ------------------------------------------------------------------------


def _model_obj(srv: Server, mid: str) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": srv.created, "owned_by": "edgelm"}


async def list_models(request: web.Request) -> web.Response:
    """Every model this daemon can serve, under each of its names (loaded or not;
    listing never loads one)."""
    srv: Server = request.app[SERVER]
    return web.json_response({"object": "list", "data": [_model_obj(srv, name) for name, _, _ in srv.pool.names()]})


async def get_model(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    mid, _ = srv.pool.resolve(request.match_info["model"])
    return web.json_response(_model_obj(srv, mid))
