"""One access-log line per request, on the `edgelm.access` logger:

    POST /v1/chat/completions 200 1234.5ms in=812 out=64 model=SmolLM2-135M-Instruct.Q4_1

method, route (the route's pattern, not the path, so no model file name, query string
or key reaches the log), status, duration, prompt and generated tokens, model. Never the
Authorization header, the body or a prompt. With `log_format: json` the same fields are
keys of the line (`method`, `route`, `status`, `duration_ms`, `tokens_in`, `tokens_out`,
`model`).

The generation routes say which streams a request started with `track`; the
middleware sums their tokens when the handler is done (a streamed answer is done when
its last chunk is written). A client that goes away is logged with status 499, as
nginx does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from typing import Any

from aiohttp import web

from edgelm.engine.loop import Stream

log = logging.getLogger("edgelm.access")


class _Usage:
    __slots__ = ("model", "streams", "tokens_in")

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.model: str | None = None
        self.tokens_in = 0  # read without a Stream (embeddings)


_CURRENT: ContextVar[_Usage | None] = ContextVar("edgelm_access_usage", default=None)


def track(stream: Stream, model: str) -> None:
    """Count `stream`'s tokens in the access-log line of the request being handled."""
    u = _CURRENT.get()
    if u is not None:
        u.streams.append(stream)
        u.model = model


def count(model: str, tokens_in: int) -> None:
    """Count prompt tokens read without a Stream (an embedding request's inputs)."""
    u = _CURRENT.get()
    if u is not None:
        u.tokens_in += tokens_in
        u.model = model


@web.middleware
async def access_log(request: web.Request, handler: Any) -> web.StreamResponse:
    usage = _Usage()
    token = _CURRENT.set(usage)
    t0 = time.perf_counter()
    status = 500
    try:
        resp: web.StreamResponse = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    finally:
        _CURRENT.reset(token)
        if log.isEnabledFor(logging.INFO):
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "-"
            ms = (time.perf_counter() - t0) * 1e3
            n_in = usage.tokens_in + sum({id(s.seq.prompt): s.n_prompt for s in usage.streams}.values())  # n: 1 prompt
            n_out = sum(s.n_generated for s in usage.streams)
            fields = {
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": round(ms, 1),
                "tokens_in": n_in,
                "tokens_out": n_out,
                "model": usage.model or "-",
            }
            log.info(
                "%s %s %d %.1fms in=%d out=%d model=%s",
                request.method,
                route,
                status,
                ms,
                n_in,
                n_out,
                usage.model or "-",
                extra=fields,
            )
