"""systemd: the unit file passes `systemd-analyze verify` without a warning, and the
daemon speaks the notify protocol in the right order (a test socket stands in for
systemd's)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import SMOLLM2, model_path
from serve_util import daemon

ROOT = Path(__file__).resolve().parents[2]


def test_unit_file_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd/edgelm.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "DynamicUser=yes" in unit
    assert "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit and "StateDirectory=edgelm" in unit
    # Enough descriptors for a LAN of clients; the daemon caps its connections below this.
    assert "LimitNOFILE=65536" in unit
    # verify checks that ExecStart exists: point it at this checkout's daemon.
    edgelm = Path(sys.executable).parent / "edgelm"
    (tmp_path / "edgelm.service").write_text(unit.replace("/opt/edgelm/.venv/bin/edgelm", str(edgelm)))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "edgelm.service")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    # The example configuration loads and names real keys only.
    from edgelm.config import load_config

    cfg, _ = load_config(str(ROOT / "systemd/edgelm.yaml"), {}, {})
    assert cfg.host == "0.0.0.0" and cfg.models_dir == "/var/lib/edgelm/models"


def test_notify_protocol_order(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    got: list[tuple[float, str]] = []
    stop = threading.Event()

    def listen() -> None:  # what systemd does: read every datagram as it comes
        while not stop.is_set():
            try:
                got.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                pass

    t = threading.Thread(target=listen)
    t.start()
    t0 = time.monotonic()
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"}
    try:
        with daemon(model_path(SMOLLM2), "--state-dir", str(tmp_path / "state"), env=env, mdns=True) as d:
            time.sleep(0.6)
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(timeout=30) == 0
            time.sleep(0.2)
    finally:
        stop.set()
        t.join()
        sock.close()
    msgs = [m for _, m in got]
    first = lambda key: next(i for i, m in enumerate(msgs) if key in m.split("\n"))  # noqa: E731
    i_start = next(i for i, m in enumerate(msgs) if m.startswith("STATUS=starting"))
    i_load = next(i for i, m in enumerate(msgs) if m.startswith("STATUS=loading"))
    i_ready = first("READY=1")
    i_stop = first("STOPPING=1")
    assert i_start < i_load < i_ready < i_stop, msgs
    assert any(ln.startswith("STATUS=serving") for ln in msgs[i_ready].split("\n"))
    assert f"MAINPID={d.proc.pid}" in msgs[i_ready]
    pings = [t for t, m in got if m == "WATCHDOG=1"]
    assert len(pings) >= 3, msgs  # every 150 ms while it ran
    print(f"edgelm serve → READY=1 in {got[i_ready][0] - t0:.2f} s")
