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
import functools
import hmac
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from edgelm import EdgelmError, Model, __version__
from edgelm._native import Executor
from edgelm.serve import ollama_api, openai_api
from edgelm.serve.chat import ChatTemplate
from edgelm.serve.config import Config
from edgelm.serve.engine import AsyncEngine, EngineError
from edgelm.serve.grammar import GrammarError, Grammars
from edgelm.serve.mdns import Advertiser, default_state_dir
from edgelm.serve.metrics import Metrics
from edgelm.serve.openapi import openapi_spec
from edgelm.serve.params import ApiError, Body
from edgelm.serve.scheduler import SchedulerLimits
from edgelm.serve.sdnotify import Notifier
from edgelm.serve import tools
from edgelm.serve.tools import ToolPlan

log = logging.getLogger("edgelm.serve")


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.state = "loading"
        self.error: str | None = None
        self.model: Model | None = None
        self.engine: AsyncEngine | None = None
        self.template = ChatTemplate(None)
        self.model_id = cfg.model_id()
        self.created = int(time.time())
        self.max_context = cfg.max_context or 0
        self.fingerprint = f"edgelm-{__version__}"
        self.started = time.time()
        self._bos_id: int | None = None
        self.grammars: Grammars | None = None

    # -- loading -----------------------------------------------------------------
    def _load_blocking(self) -> None:
        path = self.cfg.model_path()
        if not path.is_file():
            raise EdgelmError(
                f"model file {path} does not exist (set `model:` in the config, or fetch the default with "
                f"`python scripts/fetch_models.py`)"
            )
        t0 = time.perf_counter()
        model = Model(path, n_threads=self.cfg.threads, kernel_level=self.cfg.kernel_level)
        native = model.native
        per_token = native.kv_bytes_per_token
        block_size = 16
        if self.cfg.kv_cache_mib is not None:
            budget = self.cfg.kv_cache_mib << 20
        else:
            avail = mem_available() or (4 << 30)
            budget = min(avail // 4, 2 << 30)
        n_blocks = max(budget // (per_token * block_size), 1)
        max_ctx = min(self.cfg.max_context or model.n_ctx_train, model.n_ctx_train, n_blocks * block_size)
        if max_ctx < 2:
            raise EdgelmError(f"the KV cache budget ({budget >> 20} MiB) holds fewer than 2 tokens")
        executor = Executor(native, int(n_blocks))
        md = model.metadata
        tmpl = md.get("tokenizer.chat_template")
        bos = native.bos
        eos = native.eos
        bos_s = native.detokenize([bos], True) if bos is not None else ""
        eos_s = native.detokenize([eos], True) if eos is not None else ""
        template = ChatTemplate.for_model(tmpl if isinstance(tmpl, str) else None, model.architecture, bos_s, eos_s)
        eog = frozenset(t for t in range(model.n_vocab) if native.is_eog(t))
        self._bos_id = bos
        self.grammars = Grammars(native, eog)
        self.model, self.max_context, self.template = model, max_ctx, template
        self._pending = (executor, eog)
        log.info(
            "loaded %s (%s, %s kernels, %d threads) in %.2fs; KV cache %d blocks × %d tokens = %.0f MiB, context %d",
            path.name, model.architecture, model.kernel_level, model.n_threads, time.perf_counter() - t0,
            n_blocks, block_size, n_blocks * block_size * per_token / 2**20, max_ctx,
        )

    async def load(self, mark_ready: bool = True) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._load_blocking)
        except Exception as e:
            self.state = "failed"
            self.error = str(e)
            raise
        executor, eog = self._pending
        c = self.cfg
        limits = SchedulerLimits(c.max_running, c.max_step_tokens, c.max_queue, self.max_context)
        self.engine = AsyncEngine(executor, limits, self.metrics, eog, c.prefix_cache)
        self.engine.start()
        # Warm the grammar engine's vocabulary in the background (a few seconds on a
        # small CPU), so the first structured-output request does not pay for it.
        if self.grammars is not None:
            asyncio.get_running_loop().run_in_executor(None, self.grammars.tokenizer)
        if mark_ready:
            self.state = "ready"

    # -- helpers for handlers -----------------------------------------------------
    def model_ready(self) -> Model:
        if self.state != "ready" or self.model is None:
            raise ApiError(f"the server is {self.state}", None, 503, "unavailable", "server_error", {"Retry-After": "1"})
        return self.model

    def engine_ready(self) -> AsyncEngine:
        self.model_ready()
        assert self.engine is not None
        return self.engine

    def grammars_ready(self) -> Grammars:
        self.model_ready()
        assert self.grammars is not None
        return self.grammars

    async def grammar_for(self, schema: dict[str, Any] | None) -> str | None:
        """Compile a JSON schema for constrained decoding (off the event loop: the
        first call also builds the grammar engine's view of the vocabulary)."""
        if schema is None:
            return None
        g = self.grammars_ready()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, g.json_schema, schema)
        except GrammarError as e:
            raise ApiError(str(e), "response_format", 400) from None

    async def tool_grammar(self, plan: ToolPlan, schema: dict[str, Any] | None) -> str:
        """The grammar for an answer that may call tools (see edgelm.serve.tools)."""
        g = self.grammars_ready()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, g.lark, tools.grammar(plan, schema))
        except GrammarError as e:
            raise ApiError(str(e), "tools", 400) from None

    def model_aliases(self) -> set[str]:
        return {self.model_id, Path(self.cfg.model).name}

    async def json_body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}") from None

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Server per process
    def token_bytes(self, tid: int) -> bytes:
        assert self.model is not None
        return self.model.native.token_bytes(tid, True)

    def token_str(self, tid: int) -> str:
        return self.token_bytes(tid).decode("utf-8", errors="replace")

    def chat_tokens(self, text: str) -> list[int]:
        native = self.model_ready().native
        ids = native.tokenize(text, True, True)
        # Templates that write the BOS text themselves get it twice from add_special.
        if self._bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self._bos_id:
            ids = ids[1:]
        return ids


# -- handlers ------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    body: dict[str, Any] = {"status": "ok" if srv.state == "ready" else srv.state, "model": srv.model_id,
                            "version": __version__}
    if srv.model is not None:
        body.update(kernel_level=srv.model.kernel_level, threads=srv.model.n_threads,
                    architecture=srv.model.architecture, context=srv.max_context)
    if srv.engine is not None:
        s = srv.engine.sched
        body.update(running=len(s.running), waiting=len(s.waiting), kv_blocks_total=s.blocks.n_blocks,
                    kv_blocks_used=s.blocks.n_used, kv_blocks_cached=s.blocks.n_cached)
    if srv.error:
        body["error"] = srv.error
    return web.json_response(body, status=200 if srv.state == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    if srv.engine is not None:
        srv.engine._update_gauges()
    return web.Response(body=srv.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def tokenize(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    native = srv.model_ready().native
    content = b.get("content", str)
    if content is None:
        raise ApiError("'content' is required", "content")
    add_special = b.get("add_special", bool, False)
    parse_special = b.get("parse_special", bool, True)
    ids = native.tokenize(content, add_special, parse_special)
    if b.get("with_pieces", bool, False):
        return web.json_response({"tokens": [{"id": t, "piece": srv.token_str(t)} for t in ids]})
    return web.json_response({"tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    b = Body(await srv.json_body(request))
    native = srv.model_ready().native
    toks = b.data.get("tokens")
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise ApiError("'tokens' must be an array of token ids", "tokens")
    bad = next((t for t in toks if not 0 <= t < native.n_vocab), None)
    if bad is not None:
        raise ApiError(f"token id {bad} is out of range (vocabulary has {native.n_vocab} tokens)", "tokens")
    return web.json_response({"content": native.detokenize(toks, True)})


async def openapi(request: web.Request) -> web.Response:
    srv: Server = request.app["server"]
    return web.json_response(openapi_spec(sorted(srv.model_aliases())))


# -- errors --------------------------------------------------------------------------


OPEN_PATHS = frozenset({"/health", "/", "/api/version", "/openapi.json"})
ADMIN_PATHS = frozenset({"/metrics", "/api/pull"})


def _check_auth(srv: Server, request: web.Request) -> None:
    """Bearer keys with two scopes: inference (`api_key`) and admin (`admin_key`,
    which also grants inference). Health and version stay open for probes."""
    cfg = srv.cfg
    if request.path in OPEN_PATHS or (cfg.api_key is None and cfg.admin_key is None):
        return
    admin = request.path in ADMIN_PATHS
    if admin and cfg.admin_key is None:
        return  # no admin key configured: admin endpoints are as open as the rest
    if not admin and cfg.api_key is None:
        return
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    challenge = {"WWW-Authenticate": 'Bearer realm="edgelm"'}
    if not token:
        raise ApiError("an API key is required: send 'Authorization: Bearer <key>'", None, 401, "invalid_api_key",
                       "authentication_error", challenge)
    ok_admin = cfg.admin_key is not None and hmac.compare_digest(token.encode(), cfg.admin_key.encode())
    ok_user = cfg.api_key is not None and hmac.compare_digest(token.encode(), cfg.api_key.encode())
    if admin and not ok_admin:
        if ok_user:
            raise ApiError("this endpoint needs the admin key", None, 403, "insufficient_scope", "permission_error")
        raise ApiError("invalid API key", None, 401, "invalid_api_key", "authentication_error", challenge)
    if not admin and not (ok_user or ok_admin):
        raise ApiError("invalid API key", None, 401, "invalid_api_key", "authentication_error", challenge)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    srv: Server = request.app["server"]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    try:
        _check_auth(srv, request)
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
    app = web.Application(middlewares=[errors], client_max_size=srv.cfg.max_body_kib * 1024)
    app["server"] = srv
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
    r.add_post("/api/embed", ollama_api.embed)
    r.add_post("/api/pull", ollama_api.pull)
    r.add_get("/api/edgelm/models", ollama_api.list_files)
    r.add_get("/api/edgelm/models/{file}", ollama_api.get_file)
    return app


# -- running -------------------------------------------------------------------------


async def serve(cfg: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    notify = Notifier()
    notify.status(f"starting: binding {cfg.host}:{cfg.port}")
    srv = Server(cfg)
    app = make_app(srv)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    await site.start()
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
            await mdns.start(model=srv.model_id, state="loading", auth=auth, accel="cpu")
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
        log.info("ready: %s on http://%s:%d", srv.model_id, cfg.host, port)
        if mdns is not None:
            accel = f"cpu-{srv.model.kernel_level}" if srv.model else "cpu"
            await mdns.update(state="ready", model=srv.model_id, accel=accel)
            busy_task = asyncio.ensure_future(_track_busy(srv, mdns))
        # Ready everywhere at once: /health, the mDNS record, systemd.
        srv.state = "ready"
        notify.ready(f"serving {srv.model_id} on {cfg.host}:{port} ({srv.model.kernel_level if srv.model else '?'} kernels)")
        await stopped
    else:
        load.cancel()
    log.info("stopping: no new requests; %.0fs grace for %d in flight", cfg.shutdown_grace_s,
             srv.engine.n_active if srv.engine else 0)
    srv.state = "stopping"
    if mdns is not None:
        if busy_task is not None:
            busy_task.cancel()
        await mdns.stop()  # goodbye packets: clients forget us before we go
    notify.stopping(f"stopping: {srv.engine.n_active if srv.engine else 0} requests in flight")
    if srv.engine is not None:
        n_aborted = await srv.engine.drain(cfg.shutdown_grace_s)
        if n_aborted:
            log.info("aborted %d requests at the end of the grace period", n_aborted)
        await srv.engine.close()
    await runner.cleanup()
    notify.close()
    log.info("stopped")
    return status


async def _track_busy(srv: Server, mdns: Advertiser) -> None:
    """Keep the TXT `state` current: busy while the batch is full or requests wait."""
    while True:
        await asyncio.sleep(1.0)
        e = srv.engine
        if e is None:
            continue
        busy = len(e.sched.waiting) > 0 or len(e.sched.running) >= e.sched.limits.max_running
        await mdns.update(state="busy" if busy else "ready")


def run(cfg: Config) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:  # uvloop: a cheaper event loop, where it is installed
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(cfg))
