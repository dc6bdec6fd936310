"""`edgelm serve`: the aiohttp application and its lifecycle.

Start-up binds HTTP first and loads the model on a worker thread, so `/health`
answers 503 ("loading") until the model is ready, then 200. SIGTERM/SIGINT stop
accepting new generation requests (503), let in-flight ones finish for
`shutdown_grace_s`, abort the rest, and exit 0.

Every error is an OpenAI-style JSON body with a 4xx (bad input, unknown model, 429
when the queue is full) — nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from edgelm import EdgelmError, __version__
from edgelm.serve import embed_api, ollama_api, openai_api
from edgelm.serve.config import Config
from edgelm.serve.connections import (ConnectionGuard, GuardedSite, MalformedHttpFilter, default_max_connections,
                                      raise_nofile_limit)
from edgelm.serve.engine import EngineError
from edgelm.serve.mdns import Advertiser, default_state_dir
from edgelm.serve.metrics import Metrics
from edgelm.serve.models import ModelPool
from edgelm.serve.openapi import openapi_spec
from edgelm.serve.params import ApiError, Body, SERVER, int_list, parse_json
from edgelm.serve.sdnotify import Notifier
from edgelm.serve.security import add_cors_headers, make_guard

log = logging.getLogger("edgelm.serve")


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.state = "loading"
        self.error: str | None = None
        self.pool = ModelPool(cfg, self.metrics, on_change=self._models_changed)
        self.created = int(time.time())
        self.fingerprint = f"edgelm-{__version__}"
        self.started = time.time()
        self.mdns: Advertiser | None = None
        self.connections: ConnectionGuard | None = None
        self.file_digests: dict[tuple[str, int, float], str] = {}  # model files served to other daemons
        self.tasks: set[asyncio.Task[Any]] = set()

    def background(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task the server owns (a pull): kept until it ends, cancelled at shutdown."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def load(self, mark_ready: bool = True) -> None:
        """Load the configured model (it stays loaded: see edgelm.serve.models)."""
        try:
            await self.pool.get(None)
        except Exception as e:
            self.state = "failed"
            self.error = str(e)
            raise
        if mark_ready:
            self.state = "ready"

    def ready_or_503(self) -> None:
        if self.state != "ready":
            raise ApiError(f"the server is {self.state}", None, 503, "unavailable", "server_error", {"Retry-After": "1"})

    def use(self, name: str | None, keep_alive: float | None | str = "default") -> Any:
        """`async with srv.use(name) as lm:` the named model (None: the configured
        one), loaded if needed and held while the block runs."""
        self.ready_or_503()
        return self.pool.use(name, keep_alive)

    def loaded_names(self) -> str:
        return ",".join(self.pool.loaded) or "-"

    def _models_changed(self) -> None:
        if self.mdns is not None and self.state == "ready":
            asyncio.ensure_future(self.mdns.update(model=self.loaded_names()[:200]))

    async def json_body(self, request: web.Request) -> Any:
        """The request's JSON body, parsed within edgelm.serve.params' limits."""
        try:
            raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s", None, 408) from None
        return parse_json(raw)


BODY_TIMEOUT_S = 60.0


# -- handlers ------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    pool = srv.pool
    body: dict[str, Any] = {"status": "ok" if srv.state == "ready" else srv.state, "model": pool.default_id,
                            "version": __version__}
    lm = pool.loaded.get(pool.default_id) or next(iter(pool.loaded.values()), None)
    if lm is not None:
        body.update(kernel_level=lm.model.kernel_level, threads=lm.model.n_threads, device=lm.device,
                    architecture=lm.model.architecture, context=lm.max_context)
        s = lm.engine.sched
        body.update(running=len(s.running), waiting=len(s.waiting), kv_blocks_total=s.blocks.n_blocks,
                    kv_blocks_used=s.blocks.n_used, kv_blocks_cached=s.blocks.n_cached)
    body["models"] = [{"model": m.id, "device": m.device, "context": m.max_context, "memory_mib": round(m.cost_bytes / 2**20),
                       "running": len(m.engine.sched.running), "waiting": len(m.engine.sched.waiting)}
                      for m in pool.loaded.values()]
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
            raise ApiError(f"'tokens[{bad}]' = {toks[bad]} is not a token id (the vocabulary has {native.n_vocab} "
                           "tokens)", "tokens")
        return web.json_response({"content": native.detokenize(toks, True)})


async def openapi(request: web.Request) -> web.Response:
    srv: Server = request.app[SERVER]
    return web.json_response(openapi_spec(sorted(srv.pool.available())))


# -- errors --------------------------------------------------------------------------


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    srv: Server = request.app[SERVER]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    try:
        resp: web.StreamResponse = await handler(request)
        srv.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp
    except ApiError as e:
        srv.metrics.requests.labels(endpoint, str(e.status)).inc()
        return _error(request, e)
    except web.HTTPException as e:
        srv.metrics.requests.labels(endpoint, str(e.status)).inc()
        if e.status < 400:
            raise
        kind = "not_found" if e.status == 404 else None
        err = ApiError(e.reason if e.status != 413 else f"request body too large ({e.text})", None, e.status, kind,
                       headers={k: v for k, v in e.headers.items() if k == "Allow"})
        return _error(request, err)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except (EdgelmError, EngineError) as e:
        srv.metrics.requests.labels(endpoint, "400").inc()
        return _error(request, ApiError(str(e)))
    except Exception as e:  # a bug: say so, keep serving
        log.exception("unhandled error in %s", request.path)
        srv.metrics.requests.labels(endpoint, "500").inc()
        return _error(request, ApiError(f"internal error: {e}", None, 500, None, "server_error"))


def _error(request: web.Request, e: ApiError) -> web.Response:
    """OpenAI-style error bodies, except on the Ollama API, whose clients expect
    `{"error": "message"}`."""
    body: dict[str, Any] = {"error": e.message} if request.path.startswith("/api/") else e.body()
    return web.json_response(body, status=e.status, headers=e.headers)


def make_app(srv: Server) -> web.Application:
    app = web.Application(middlewares=[errors, make_guard(srv.cfg)], client_max_size=srv.cfg.max_body_kib * 1024)
    app[SERVER] = srv
    app.on_response_prepare.append(add_cors_headers)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_get("/v1/models", openai_api.list_models)
    r.add_get("/v1/models/{model}", openai_api.get_model)
    r.add_post("/v1/completions", openai_api.completions)
    r.add_post("/v1/chat/completions", openai_api.chat_completions)
    r.add_get("/", ollama_api.root)
    r.add_get("/api/version", ollama_api.version)
    r.add_get("/api/tags", ollama_api.tags)
    r.add_get("/api/ps", ollama_api.ps)
    r.add_post("/api/show", ollama_api.show)
    r.add_post("/api/generate", ollama_api.generate)
    r.add_post("/api/chat", ollama_api.chat)
    r.add_post("/api/pull", ollama_api.pull)
    r.add_delete("/api/delete", ollama_api.delete)
    r.add_post("/api/copy", ollama_api.copy)
    r.add_get("/api/edgelm/models", ollama_api.list_files)
    r.add_get("/api/edgelm/models/{file}", ollama_api.get_file)
    embed_api.add_routes(app)
    return app


# -- running -------------------------------------------------------------------------


async def serve(cfg: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    notify = Notifier()
    notify.status(f"starting: binding {cfg.host}:{cfg.port}")
    srv = Server(cfg)
    app = make_app(srv)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                           keepalive_timeout=cfg.idle_timeout_s)
    await runner.setup()
    nofile = raise_nofile_limit()
    guard = ConnectionGuard(cfg.max_connections or default_max_connections(nofile), cfg.header_timeout_s)
    srv.connections = guard
    site = GuardedSite(runner, cfg.host, cfg.port, guard)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        notify.close()
        why = {errno.EADDRINUSE: "the address is in use (another edgelm, or Ollama? `edgelm ps` asks it); stop it or "
                                 "choose another port with --port",
               errno.EACCES: "this user may not listen on that port (below 1024); choose another with --port",
               errno.EADDRNOTAVAIL: "that address is not one of this machine's; check --host"}
        raise EdgelmError(f"cannot listen on {cfg.host}:{cfg.port}: {why.get(e.errno or 0, e.strerror)}") from None
    addrs = runner.addresses
    port = int(addrs[0][1]) if addrs else cfg.port
    log.info("listening on http://%s:%d (loading %s)", cfg.host, port, cfg.model_path())
    notify.status(f"loading {cfg.model_path().name}")
    notify.start_watchdog()
    mdns: Advertiser | None = None
    busy_task: asyncio.Future[None] | None = None
    if cfg.mdns:
        state_dir = Path(cfg.state_dir).expanduser() if cfg.state_dir else default_state_dir()
        mdns = Advertiser(cfg.host, port, state_dir, cfg.mdns_name, cfg.mdns_ollama)
        try:
            auth = "1" if cfg.api_key or cfg.admin_key else "0"
            await mdns.start(model=srv.pool.default_id, state="loading", auth=auth, accel="cpu")
        except Exception as e:  # discovery is a convenience: serve without it
            log.warning("mDNS advertising failed: %s", e)
            mdns = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.ensure_future(srv.load(mark_ready=False))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if load.done() and load.exception() is not None:
        log.error("could not load the model: %s", load.exception())
        notify.status(f"failed: {load.exception()}")
        status = 1
    elif load.done():
        lm = srv.pool.loaded[srv.pool.default_id]
        log.info("ready: %s on http://%s:%d", lm.id, cfg.host, port)
        if mdns is not None:
            accel = f"cpu-{lm.model.kernel_level}" if lm.device == "cpu" else lm.device.split(" ")[0]
            await mdns.update(state="ready", model=srv.loaded_names()[:200], accel=accel)
            busy_task = asyncio.ensure_future(_track_busy(srv, mdns))
        # Ready everywhere at once: /health, the mDNS record, systemd.
        srv.state = "ready"
        srv.mdns = mdns
        reaper = asyncio.ensure_future(srv.pool.reap())
        await _prune(srv)
        notify.ready(f"serving {lm.id} on {cfg.host}:{port} ({lm.model.kernel_level} kernels)")
        await stopped
        reaper.cancel()
    else:
        load.cancel()
    log.info("stopping: no new requests; %.0fs grace for %d in flight", cfg.shutdown_grace_s, srv.pool.n_active)
    srv.state = "stopping"
    if mdns is not None:
        if busy_task is not None:
            busy_task.cancel()
        await mdns.stop()  # goodbye packets: clients forget us before we go
    notify.stopping(f"stopping: {srv.pool.n_active} requests in flight")
    for task in list(srv.tasks):
        task.cancel()
    n_aborted = await srv.pool.close(cfg.shutdown_grace_s)
    if n_aborted:
        log.info("aborted %d requests at the end of the grace period", n_aborted)
    await runner.cleanup()
    notify.close()
    log.info("stopped")
    return status


async def _prune(srv: Server) -> None:
    """Blobs no name refers to (a model removed while it was loaded, a pull cut short)
    go at start, as Ollama prunes them; a fresh one may belong to a pull in flight."""
    d = srv.pool.models_dir()
    if not (d / "blobs").is_dir():
        return
    try:
        freed = await asyncio.get_running_loop().run_in_executor(None, srv.pool.model_store().prune, srv.pool.in_use)
    except OSError as e:
        log.warning("could not clear unused blobs in %s: %s", d, e)
        return
    if freed:
        log.info("removed %d unused blobs from %s", len(freed), d)


async def _track_busy(srv: Server, mdns: Advertiser) -> None:
    """Keep the TXT `state` current: busy while the batch is full or requests wait."""
    while True:
        await asyncio.sleep(1.0)
        busy = any(len(m.engine.sched.waiting) > 0 or len(m.engine.sched.running) >= m.engine.sched.limits.max_running
                   for m in srv.pool.loaded.values())
        await mdns.update(state="busy" if busy else "ready")


def run(cfg: Config) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(MalformedHttpFilter())
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:  # uvloop: a cheaper event loop, where it is installed
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(cfg))
