"""HTTP connections as a bounded resource: a cap, a deadline for request headers, and
one warning line (no traceback) for malformed HTTP.

A LAN is shared with devices that misbehave, and a Pi has a few hundred file
descriptors to spare: 260 half-open connections once took every descriptor and every
normal client failed. So each connection goes through `GuardedProtocol`, a thin shell
around aiohttp's own protocol that only watches the bytes go by:

- Headers deadline: a connection must send a whole request head (up to the blank line)
  within `header_timeout_s` of connecting, or it gets 408 and is closed. Later requests
  on a keep-alive connection fall under aiohttp's `keepalive_timeout`
  (`idle_timeout_s`), which closes a connection that does not complete its next request
  in time.
- Cap: at `max_connections`, a new connection closes the oldest one that has not yet
  sent a whole request head (a slow or half-open client), so real clients keep being
  served; if every connection is busy with a real request, the new one gets a 503 with
  Retry-After instead.

The open-file limit is raised to its hard limit at start (`raise_nofile_limit`), and
the default cap stays well under it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("edgelm.serve")

_HEAD_END = b"\r\n\r\n"


def raise_nofile_limit(want: int = 65536) -> int:
    """Raise the soft open-file limit towards the hard one; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d: %s", soft, e)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(nofile: int) -> int:
    return max(16, min(1024, nofile - 64))


def _response(status: str, body: str, extra: str = "") -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode() + data


_BUSY = _response(
    "503 Service Unavailable", '{"error": "too many open connections; retry shortly"}', "Retry-After: 1\r\n"
)
_SLOW = _response("408 Request Timeout", '{"error": "the request headers did not arrive in time"}')


class ConnectionGuard:
    """The live connections of one listening socket, and the counts for /metrics."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.live: dict[GuardedProtocol, None] = {}  # insertion order = connect order
        self.dropped = {"header_timeout": 0, "evicted": 0, "refused": 0}
        self._last_warning = 0.0

    def protocol_factory(self, make_inner: Any) -> Any:
        return lambda: GuardedProtocol(self, make_inner())

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10.0:  # one line per 10 s under a flood
            self._last_warning = now
            log.warning(
                "%s (%d connections open, limit %d; so far %s)",
                what,
                len(self.live),
                self.max_connections,
                ", ".join(f"{k} {v}" for k, v in self.dropped.items()),
            )

    def admit(self, conn: GuardedProtocol) -> bool:
        if len(self.live) >= self.max_connections:
            victim = next((c for c in self.live if c.awaiting_head), None)
            if victim is None:
                self.dropped["refused"] += 1
                self._warn("connection limit reached: refused a new connection with 503")
                return False
            self.dropped["evicted"] += 1
            self._warn("connection limit reached: closed the oldest connection that had not sent a request")
            victim.close()
        self.live[conn] = None
        return True


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's request handler, watched: see the module doc."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.awaiting_head = True
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._forwarding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self.guard.admit(self):
            transport.write(_BUSY)
            transport.close()
            return
        self._forwarding = True
        self._timer = asyncio.get_running_loop().call_later(self.guard.header_timeout_s, self._head_timeout)
        self.inner.connection_made(transport)

    def _head_timeout(self) -> None:
        self._timer = None
        if self.awaiting_head and self.transport is not None and not self.transport.is_closing():
            self.guard.dropped["header_timeout"] += 1
            self.transport.write(_SLOW)
            self.transport.close()  # after the 408 is out (a few bytes: the socket buffer takes them)

    def close(self) -> None:
        """Drop the connection now (its descriptor is what the cap protects)."""
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self._forwarding:
            return
        if self.awaiting_head:
            if _HEAD_END in self._tail + data:
                self.awaiting_head = False
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            else:
                self._tail = (self._tail + data)[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._forwarding else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.live.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        if self._forwarding:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._forwarding:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._forwarding:
            self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ConnectionGuard."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, backlog: int = 512
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self.guard = host, port, guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.protocol_factory(server), self._host, self._port, backlog=self._backlog, reuse_address=True
        )


class MalformedHttpFilter(logging.Filter):
    """aiohttp logs a malformed request (a bad request line, an oversized header, a
    port scanner) as an ERROR with a traceback; it is the client's fault and the client
    got its 400, so one warning line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "malformed HTTP request from %s: %s",
                (remote, exc.message or exc.__class__.__name__),
            )
            record.exc_info, record.exc_text = None, None
        return True
