"""LAN discovery over mDNS/DNS-SD (python-zeroconf, asyncio API).

The daemon advertises `_edgelm._tcp.local.` (and, if configured, `_ollama._tcp.local.`
on the same port) as "edgelm on <host>", with a host name of its own
(`edgelm-<host>.local.`) and a TXT record:

    txtvers=1  id=<stable id, kept in the state directory>  ver=<edgelm version>
    api=openai,ollama  path=/v1  model=<served model>  state=loading|ready|busy
    auth=0|1  accel=cpu-<kernel level>

It advertises only on the interfaces that carry its bind address (127.0.0.1 → the
loopback only; 0.0.0.0/:: → every interface, IPv4 and IPv6), keeps the record current
(state, model, addresses), lets zeroconf resolve name conflicts by renaming, and sends
goodbye packets when it stops. `discover()` browses for daemons (`edgelm discover`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgelm import __version__

log = logging.getLogger("edgelm.serve")

SERVICE = "_edgelm._tcp.local."
OLLAMA_SERVICE = "_ollama._tcp.local."


def stable_id(state_dir: Path) -> str:
    """This daemon's id: made once, kept in `state_dir/id`."""
    p = state_dir / "id"
    try:
        v = p.read_text().strip()
        if v:
            return v
    except OSError:
        pass
    v = uuid.uuid4().hex[:16]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        p.write_text(v + "\n")
    except OSError as e:
        log.warning("cannot keep the daemon id in %s: %s", state_dir, e)
    return v


def _host_addresses(bind: str) -> tuple[list[str], list[bytes]]:
    """(interfaces to advertise on, packed addresses to announce) for a bind address."""
    if bind in ("0.0.0.0", "::", ""):
        import ifaddr

        addrs: list[str] = []
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                a = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                try:
                    parsed = ipaddress.ip_address(a.split("%")[0])
                except ValueError:
                    continue
                if parsed.is_loopback or (parsed.version == 6 and parsed.is_link_local):
                    continue
                addrs.append(str(parsed))
        return [], [ipaddress.ip_address(a).packed for a in sorted(set(addrs))]
    return [bind], [ipaddress.ip_address(bind).packed]


class Advertiser:
    def __init__(self, bind: str, port: int, state_dir: Path, name: str | None, ollama: bool) -> None:
        self.bind = "127.0.0.1" if bind == "localhost" else bind
        self.port = port
        self.id = stable_id(state_dir)
        host = socket.gethostname().split(".")[0] or "edgelm"
        self.instance = name or f"edgelm on {host}"
        self.server = f"edgelm-{host}.local."
        self.types = [SERVICE] + ([OLLAMA_SERVICE] if ollama else [])
        self.txt: dict[str, str] = {}
        self._azc: Any = None
        self._infos: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    def _properties(self, **fields: str) -> dict[str, str]:
        txt = {"txtvers": "1", "id": self.id, "ver": __version__, "api": "openai,ollama", "path": "/v1"}
        txt.update(self.txt)
        txt.update(fields)
        return txt

    def _info(self, type_: str, addresses: list[bytes]) -> Any:
        from zeroconf.asyncio import AsyncServiceInfo

        return AsyncServiceInfo(
            type_,
            f"{self.instance}.{type_}",
            addresses=addresses,
            port=self.port,
            properties=self.txt,
            server=self.server,
        )

    async def start(self, **txt: str) -> None:
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        interfaces, addresses = _host_addresses(self.bind)
        self.txt = self._properties(**txt)
        if interfaces:
            v6 = ":" in interfaces[0]
            self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V6Only if v6 else IPVersion.V4Only)
        else:
            self._azc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.All)
        self._addresses = addresses
        for t in self.types:
            info = self._info(t, addresses)
            # Returns after probing (name conflicts resolved); the task ends when the
            # announcements are out, so a later update cannot be overtaken by them.
            announced = await self._azc.async_register_service(info, allow_name_change=True)
            await announced
            self._infos.append(info)
        names = ", ".join(i.name for i in self._infos)
        log.info("mDNS: advertising %s on %s", names, interfaces or "all interfaces")
        self._task = asyncio.get_running_loop().create_task(self._watch_addresses(), name="edgelm-mdns")

    async def update(self, **txt: str) -> None:
        """Change TXT fields (state, model, ...); re-announces only on a change."""
        new = self._properties(**txt)
        if new == self.txt or self._azc is None:
            return
        self.txt = new
        await self._reannounce()

    async def _reannounce(self) -> None:
        for i, old in enumerate(self._infos):
            info = self._info(old.type, self._addresses)
            info.name = old.name  # keep a name zeroconf may have changed after a conflict
            await (await self._azc.async_update_service(info))
            self._infos[i] = info

    async def _watch_addresses(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                _, addresses = _host_addresses(self.bind)
                if addresses != self._addresses:
                    log.info("mDNS: host addresses changed; updating the record")
                    self._addresses = addresses
                    await self._reannounce()
            except Exception:  # keep advertising what we have
                log.exception("mDNS address check failed")

    async def stop(self) -> None:
        """Unregister (goodbye packets) and close."""
        if self._task is not None:
            self._task.cancel()
        if self._azc is not None:
            for info in self._infos:
                await self._azc.async_unregister_service(info)
            await self._azc.async_close()
            self._azc = None


def discover(timeout: float = 3.0, interfaces: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """edgelm daemons on the LAN: one dict per daemon with name, host, addresses, port,
    url and the TXT fields (id, ver, api, path, model, state, auth, accel)."""
    return asyncio.run(discover_async(timeout, interfaces))


async def discover_async(timeout: float = 3.0, interfaces: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    if interfaces:
        v6 = any(":" in i for i in interfaces)
        azc = AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.All if v6 else IPVersion.V4Only)
    else:
        azc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.All)
    names: list[str] = []

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added and name not in names:
            names.append(name)
        elif state_change is ServiceStateChange.Removed and name in names:
            names.remove(name)

    browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE], handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
        out = []
        for name in list(names):
            info = AsyncServiceInfo(SERVICE, name)
            if not await info.async_request(azc.zeroconf, 1500):
                continue
            txt = {k.decode(): (v.decode() if v is not None else "") for k, v in info.properties.items()}
            addrs = info.parsed_scoped_addresses()
            host = addrs[0] if addrs else (info.server or "").rstrip(".")
            url_host = f"[{host}]" if ":" in host else host
            out.append(
                {
                    "name": name.removesuffix("." + SERVICE),
                    "host": (info.server or "").rstrip("."),
                    "addresses": addrs,
                    "port": info.port,
                    "url": f"http://{url_host}:{info.port}",
                    **txt,
                }
            )
        return sorted(out, key=lambda d: d["name"])
    finally:
        await browser.async_cancel()
        await azc.async_close()


def default_state_dir() -> Path:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else ~/.local/state/edgelm."""
    sd = os.environ.get("STATE_DIRECTORY")
    if sd:
        return Path(sd.split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "edgelm"
