"""The aiohttp application: the route table, the LAN guard (edgelm.server.security)
and one error middleware.

Every error is an OpenAI-style JSON body (`{"error": "..."}` on the Ollama API) with a
4xx: bad input, unknown model, 429 when the queue is full, 503 while loading or out of
memory. The engine's errors (edgelm.errors) get their status here; nothing a client
sends produces a 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from edgelm import EdgelmError
from edgelm.engine.loop import EngineError
from edgelm.errors import RequestError
from edgelm.server import embed, manage, ollama, openai, service
from edgelm.server.access import access_log
from edgelm.server.params import ApiError
from edgelm.server.security import add_cors_headers, make_guard
from edgelm.server.state import SERVER, Server

__all__ = ["Server", "make_app"]

log = logging.getLogger("edgelm.serve")


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    srv: Server = request.app[SERVER]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    try:
        resp: web.StreamResponse = await handler(request)
        srv.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp
    except web.HTTPException as e:
        srv.metrics.requests.labels(endpoint, str(e.status)).inc()
        if e.status < 400:
            raise
        kind = "not_found" if e.status == 404 else None
        http = ApiError(
            e.reason if e.status != 413 else f"request body too large ({e.text})",
            None,
            e.status,
            kind,
            headers={k: v for k, v in e.headers.items() if k == "Allow"},
        )
        return _error(request, http)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        err = _api_error(e)
        if err is None:  # a bug: say so, keep serving
            log.exception("unhandled error in %s", request.path)
            err = ApiError(f"internal error: {e}", None, 500, None, "server_error")
        srv.metrics.requests.labels(endpoint, str(err.status)).inc()
        return _error(request, err)


def _api_error(e: Exception) -> ApiError | None:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, RequestError):
        return ApiError.of(e)
    if isinstance(e, (EdgelmError, EngineError)):
        return ApiError(str(e))
    return None


def _error(request: web.Request, e: ApiError) -> web.Response:
    """OpenAI-style error bodies, except on the Ollama API, whose clients expect
    `{"error": "message"}`."""
    body: dict[str, Any] = {"error": e.message} if request.path.startswith("/api/") else e.body()
    return web.json_response(body, status=e.status, headers=e.headers)


def make_app(srv: Server) -> web.Application:
    app = web.Application(
        middlewares=[access_log, errors, make_guard(srv.cfg)], client_max_size=srv.cfg.max_body_kib * 1024
    )
    app[SERVER] = srv
    app.on_response_prepare.append(add_cors_headers)
    r = app.router
    r.add_get("/health", service.health)
    r.add_get("/metrics", service.metrics)
    r.add_get("/openapi.json", service.openapi)
    r.add_post("/tokenize", service.tokenize)
    r.add_post("/detokenize", service.detokenize)
    r.add_get("/v1/models", openai.list_models)
    r.add_get("/v1/models/{model}", openai.get_model)
    r.add_post("/v1/completions", openai.completions)
    r.add_post("/v1/chat/completions", openai.chat_completions)
    r.add_post("/v1/embeddings", embed.openai_embeddings)
    r.add_get("/", ollama.root)
    r.add_get("/api/version", ollama.version)
    r.add_get("/api/tags", ollama.tags)
    r.add_get("/api/ps", ollama.ps)
    r.add_post("/api/show", ollama.show)
    r.add_post("/api/generate", ollama.generate)
    r.add_post("/api/chat", ollama.chat)
    r.add_post("/api/embed", embed.ollama_embed)
    r.add_post("/api/embeddings", embed.ollama_embeddings)
    r.add_post("/api/pull", manage.pull)
    r.add_delete("/api/delete", manage.delete)
    r.add_post("/api/copy", manage.copy)
    r.add_get("/api/edgelm/models", manage.list_files)
    r.add_get("/api/edgelm/models/{file}", manage.get_file)
    return app
