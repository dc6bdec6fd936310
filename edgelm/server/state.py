"""What every handler reaches through `request.app[SERVER]`: the configuration, the
model pool, the metrics, and the tasks the server owns. Route modules import this
module, never the application (`app.py` imports them)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from edgelm import __version__
from edgelm.config import Config
from edgelm.engine.metrics import Metrics
from edgelm.engine.pool import LoadedModel, ModelPool
from edgelm.server.connections import ConnectionGuard
from edgelm.server.params import ApiError, parse_json

BODY_TIMEOUT_S = 60.0


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
        self.connections: ConnectionGuard | None = None
        self.file_digests: dict[tuple[str, int, float], str] = {}  # model files served to other daemons
        self.tasks: set[asyncio.Task[Any]] = set()
        self.announce: Callable[[str], Coroutine[Any, Any, None]] | None = None
        """Set by the daemon: tells the LAN which models are loaded (mDNS)."""

    def background(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task the server owns (a pull, the reaper, an mDNS update): kept until it
        ends, cancelled by `close`."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def load(self, mark_ready: bool = True) -> None:
        """Load the configured model (it stays loaded: see edgelm.engine.pool)."""
        try:
            await self.pool.get(None)
        except Exception as e:
            self.state = "failed"
            self.error = str(e)
            raise
        if mark_ready:
            self.state = "ready"

    async def close(self, grace_s: float) -> int:
        """Cancel the server's tasks, then drain the models (`grace_s` for requests in
        flight) and stop their engines; returns how many requests were aborted."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return await self.pool.close(grace_s)

    def ready_or_503(self) -> None:
        if self.state != "ready":
            raise ApiError(
                f"the server is {self.state}", None, 503, "unavailable", "server_error", {"Retry-After": "1"}
            )

    def use(
        self, name: str | None, keep_alive: float | None | str = "default"
    ) -> contextlib.AbstractAsyncContextManager[LoadedModel]:
        """`async with srv.use(name) as lm:` the named model (None: the configured
        one), loaded if needed and held while the block runs."""
        self.ready_or_503()
        return self.pool.use(name, keep_alive)

    def loaded_names(self) -> str:
        return ",".join(self.pool.loaded) or "-"

    def _models_changed(self) -> None:
        if self.announce is not None and self.state == "ready":
            self.background(self.announce(self.loaded_names()[:200]), "announce the loaded models")

    async def json_body(self, request: web.Request) -> Any:
        """The request's JSON body, parsed within edgelm.server.params' limits."""
        try:
            raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s", None, 408) from None
        return parse_json(raw)


SERVER: web.AppKey[Server] = web.AppKey("server", Server)
"""Where the aiohttp application keeps its `Server`."""
