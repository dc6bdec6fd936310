"""The systemd notify protocol (sd_notify(3)), spoken directly: datagrams of
`KEY=value` lines to the unix socket named by $NOTIFY_SOCKET (a leading "@" means
the abstract namespace). Without $NOTIFY_SOCKET every call is a no-op, so the daemon
runs the same outside systemd.

    READY=1       after the model is loaded, HTTP is bound (and mDNS registered)
    STATUS=...    what the daemon is doing, shown by `systemctl status`
    WATCHDOG=1    from the event loop, every half $WATCHDOG_USEC (a stuck loop misses it)
    STOPPING=1    when shutdown starts
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("edgelm.serve")


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a slow listener: a full queue drops
                # the datagram (a watchdog ping is resent soon anyway).
                self._sock.setblocking(False)
            except OSError as e:
                log.warning("cannot open the systemd notify socket: %s", e)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and ours else None
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None or self._addr is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError as e:
            if not self._warned:
                log.warning("systemd notify to %s failed: %s", self._addr, e)
                self._warned = True

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def ready(self, text: str) -> None:
        self.send("READY=1", f"STATUS={text}", f"MAINPID={os.getpid()}")

    def stopping(self, text: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={text}")

    def start_watchdog(self) -> None:
        """Ping the watchdog from the event loop itself: if the loop hangs, the pings
        stop and systemd restarts the daemon."""
        if self.watchdog_s is None or self._sock is None or self._task is not None:
            return

        async def ping() -> None:
            while True:
                self.send("WATCHDOG=1")
                await asyncio.sleep(self.watchdog_s / 2)  # type: ignore[operator]

        self._task = asyncio.get_running_loop().create_task(ping(), name="edgelm-watchdog")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
