"""The daemon's own routes: `/health`, `/metrics`, `/openapi.json`, `/tokenize`,
`/detokenize` (llama-server's shapes)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from edgelm import __version__
from edgelm.server.openapi import openapi_spec
from edgelm.server.params import ApiError, Body, int_list
from edgelm.server.state import SERVER, Server


async def health(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    pool = srv.pool
    body: dict[str, Any] = {
        "status": "ok" if srv.state == "ready" else srv.state,
        "model": pool.default_id,
        "version": __version__,
    }
    lm = pool.loaded.get(pool.default_id) or next(iter(pool.loaded.values()), None)
    if lm is not None:
        body.update(
            kernel_level=lm.model.kernel_level,
            threads=lm.model.n_threads,
            device=lm.device,
            architecture=lm.model.architecture,
            context=lm.max_context,
        )
        s = lm.engine.stats()
        body.update(
            running=s.running,
            waiting=s.waiting,
            kv_blocks_total=s.kv_blocks_total,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_cached=s.kv_blocks_cached,
        )
    models = []
    for m in list(pool.loaded.values()):
        s = m.engine.stats()
        models.append(
            {
                "model": m.id,
                "device": m.device,
                "context": m.max_context,
                "memory_mib": round(m.cost_bytes / 2**20),
                "running": s.running,
                "waiting": s.waiting,
            }
        )
    body["models"] = models
    body["memory_budget_mib"] = pool.budget_bytes >> 20
    if srv.error:
        body["error"] = srv.error
    return web.json_response(body, status=200 if srv.state == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    srv.pool.update_gauges()
    if srv.connections is not None:
        srv.metrics.connections_open.set(len(srv.connections.live))
        for reason, n in srv.connections.dropped.items():
            srv.metrics.connections_dropped.labels(reason).set(n)
    return web.Response(body=srv.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def tokenize(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    content = b.get("content", str)
    if content is None:
        raise ApiError("'content' is required", "content")
    add_special = b.get("add_special", bool, False)
    parse_special = b.get("parse_special", bool, True)
    with_pieces = b.get("with_pieces", bool, False)
    async with srv.use(b.get("model", str)) as lm:
        ids = lm.model.native.tokenize(content, add_special, parse_special)
        if with_pieces:
            return web.json_response({"tokens": [{"id": t, "piece": lm.token_str(t)} for t in ids]})
        return web.json_response({"tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    toks = int_list(b.data.get("tokens"), "tokens")
    async with srv.use(b.get("model", str)) as lm:
        native = lm.model.native
        bad = next((i for i, t in enumerate(toks) if not 0 <= t < native.n_vocab), None)
        if bad is not None:
            raise ApiError(
                f"'tokens[{bad}]' = {toks[bad]} is not a token id (the vocabulary has {native.n_vocab} tokens)",
                "tokens",
            )
        return web.json_response({"content": native.detokenize(toks, True)})


async def openapi(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    return web.json_response(openapi_spec(sorted(srv.pool.available())))
