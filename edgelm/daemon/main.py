"""`edgelm serve`: the process. Binds HTTP first and loads the model on a worker
thread, so `/health` answers 503 ("loading") until the model is ready, then 200; READY=1
to systemd and the mDNS record follow. SIGTERM/SIGINT: stop accepting new generation
requests (503), unregister from mDNS, let in-flight requests finish for
`shutdown_grace_s`, abort the rest, stop the engines, exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from edgelm import EdgelmError
from edgelm.config import Config
from edgelm.daemon.mdns import Advertiser, default_state_dir
from edgelm.daemon.sdnotify import Notifier
from edgelm.server.app import make_app
from edgelm.server.connections import (
    ConnectionGuard,
    GuardedSite,
    MalformedHttpFilter,
    default_max_connections,
    raise_nofile_limit,
)
from edgelm.server.state import Server

log = logging.getLogger("edgelm.serve")


async def serve(cfg: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    notify = Notifier()
    notify.status(f"starting: binding {cfg.host}:{cfg.port}")
    srv = Server(cfg)
    app = make_app(srv)
    runner = web.AppRunner(
        app, handle_signals=False, handler_cancellation=True, access_log=None, keepalive_timeout=cfg.idle_timeout_s
    )
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
        why = {
            errno.EADDRINUSE: "the address is in use (another edgelm, or Ollama? `edgelm ps` asks it); stop it or "
            "choose another port with --port",
            errno.EACCES: "this user may not listen on that port (below 1024); choose another with --port",
            errno.EADDRNOTAVAIL: "that address is not one of this machine's; check --host",
        }
        raise EdgelmError(f"cannot listen on {cfg.host}:{cfg.port}: {why.get(e.errno or 0, e.strerror)}") from None
    addrs = runner.addresses
    port = int(addrs[0][1]) if addrs else cfg.port
    log.info("listening on http://%s:%d (loading %s)", cfg.host, port, cfg.model_path())
    notify.status(f"loading {cfg.model_path().name}")
    notify.start_watchdog()
    mdns: Advertiser | None = None
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
    load = srv.background(srv.load(mark_ready=False), "load the configured model")
    stopped = srv.background(stop.wait(), "wait for a signal")
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
            srv.background(_track_busy(srv, mdns), "mDNS busy state")
            srv.announce = _announcer(mdns)
        # Ready everywhere at once: /health, the mDNS record, systemd.
        srv.state = "ready"
        srv.background(srv.pool.reap(), "unload idle models")
        await _prune(srv)
        notify.ready(f"serving {lm.id} on {cfg.host}:{port} ({lm.model.kernel_level} kernels)")
        await stopped
    log.info("stopping: no new requests; %.0fs grace for %d in flight", cfg.shutdown_grace_s, srv.pool.n_active)
    srv.state = "stopping"
    srv.announce = None
    if mdns is not None:
        await mdns.stop()  # goodbye packets: clients forget us before we go
    notify.stopping(f"stopping: {srv.pool.n_active} requests in flight")
    n_aborted = await srv.close(cfg.shutdown_grace_s)  # the server's tasks (pulls included), then the models
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
        busy = any(m.engine.stats().busy for m in list(srv.pool.loaded.values()))
        await mdns.update(state="busy" if busy else "ready")


def _announcer(mdns: Advertiser) -> Callable[[str], Coroutine[Any, Any, None]]:
    async def announce(models: str) -> None:
        await mdns.update(model=models)

    return announce


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
