"""mDNS discovery on the loopback only (the daemon binds 127.0.0.1, so it advertises
there and nowhere else): a separate process browses with python-zeroconf
(`edgelm discover`) and finds the daemon, its port and TXT record; after shutdown the
record is gone (goodbye packets)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from conftest import SMOLLM2, model_path
from serve_util import daemon

import edgelm


def browse(timeout: float = 2.5) -> list[dict[str, Any]]:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm.cli",
            "discover",
            "--interfaces",
            "127.0.0.1",
            "--json",
            "--timeout",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def test_advertise_browse_and_goodbye(tmp_path: Path) -> None:
    name = f"edgelm test {uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    args = ("--mdns-name", name, "--state-dir", str(state))
    with daemon(model_path(SMOLLM2), *args, mdns=True) as d:
        port = int(d.url.rsplit(":", 1)[1])
        found = [x for x in browse() if x["name"] == name]
        assert len(found) == 1, found
        rec = found[0]
        assert rec["port"] == port and rec["addresses"] == ["127.0.0.1"]
        assert rec["url"] == f"http://127.0.0.1:{port}" and rec["host"].startswith("edgelm-")
        txt = [k for k in rec if k not in ("name", "host", "addresses", "port", "url")]
        assert txt[0] == "txtvers" and rec["txtvers"] == "1"
        assert rec["id"] == (state / "id").read_text().strip()
        assert rec["model"] == "SmolLM2-135M-Instruct.Q4_1" and rec["state"] == "ready", (rec, d.log())
        assert rec["auth"] == "0" and rec["accel"] == f"cpu-{edgelm._native.kernel_level()}"
        assert "openai" in rec["api"].split(",") and rec["path"] == "/v1" and rec["ver"] == edgelm.__version__
        # The Python API sees the same record.
        assert any(x["name"] == name and x["port"] == port for x in edgelm.discover(2.0, ["127.0.0.1"]))
        table = subprocess.run(
            [sys.executable, "-m", "edgelm.cli", "discover", "--interfaces", "127.0.0.1", "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0 and name in table.stdout and f"http://127.0.0.1:{port}" in table.stdout
        first_id = rec["id"]
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
    assert not [x for x in browse(1.5) if x["name"] == name]  # goodbye: gone at once
    # The id is stable across restarts.
    with daemon(model_path(SMOLLM2), *args, mdns=True):
        again = [x for x in browse() if x["name"] == name]
        assert again and again[0]["id"] == first_id


def test_no_mdns_flag_advertises_nothing(tmp_path: Path) -> None:
    name = f"edgelm quiet {uuid.uuid4().hex[:8]}"
    with daemon(model_path(SMOLLM2), "--mdns-name", name, "--state-dir", str(tmp_path), mdns=False):
        assert not [x for x in browse(1.5) if x["name"] == name]
