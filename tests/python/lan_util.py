"""A LAN of this test's own: a network namespace joined to this one by a veth pair
(`ip netns`, iproute2), so a daemon can listen on a non-loopback address and be
reached from another host, without touching the machine's real interfaces.

    with lan() as net:         # net.host_ip (this side), net.ns_ip (the daemon's side)
        with daemon(model, host=net.ns_ip, prefix=net.exec_prefix) as d: ...

Needs root (CAP_NET_ADMIN), as the test command has; without it the test fails with
a message saying so (tests do not skip).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass
class Lan:
    ns: str
    host_ip: str
    ns_ip: str

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextmanager
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.fail("the LAN tests make a network namespace and need root (CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:6]
    ns, veth_h, veth_n = f"edgelm-{tag}", f"veh{tag}", f"ven{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    host_ip, ns_ip = f"10.{subnet}.77.1", f"10.{subnet}.77.2"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", veth_h, "type", "veth", "peer", "name", veth_n)
        _ip("link", "set", veth_n, "netns", ns)
        _ip("addr", "add", f"{host_ip}/24", "dev", veth_h)
        _ip("link", "set", veth_h, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/24", "dev", veth_n)
        _ip("netns", "exec", ns, "ip", "link", "set", veth_n, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield Lan(ns, host_ip, ns_ip)
    finally:
        subprocess.run(["ip", "link", "del", veth_h], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
