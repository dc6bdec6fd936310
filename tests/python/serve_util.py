"""Start the real daemon (`python -m edgelm.cli serve`) as a subprocess on a free
loopback port, for the HTTP tests."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return http("GET", self.url + path)

    def post(self, path: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
        return http("POST", self.url + path, body, raw)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def http(
    method: str,
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    timeout: float = 120,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        payload = e.read()
        status = e.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


@contextmanager
def daemon(
    model: Path,
    *args: str,
    env: dict[str, str] | None = None,
    config: str = "",
    mdns: bool = False,
    host: str = "127.0.0.1",
    prefix: list[str] | None = None,
    nofile: int | None = None,
) -> Iterator[Daemon]:
    """The daemon on a free port of `host` (loopback by default; `prefix` runs it in a
    network namespace, see lan_util); mDNS (loopback only) when `mdns`; `nofile` sets
    its open-file limit (soft and hard)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="edgelm-test-") as tmp:
        cfg = Path(tmp) / "edgelm.yaml"
        cfg.write_text(config)
        log_path = Path(tmp) / "daemon.log"
        e = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("EDGELM_") or k in ("EDGELM_MODELS_DIR", "EDGELM_REGISTRY_URL", "EDGELM_HF_URL")
        }
        e.update(env or {})
        cmd = [
            *(prefix or []),
            sys.executable,
            "-m",
            "edgelm.cli",
            "serve",
            "--config",
            str(cfg),
            "--host",
            host,
            "--port",
            str(port),
            "--model",
            str(model),
            "--threads",
            "2",
            *([] if mdns else ["--no-mdns"]),
            *args,
        ]

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=tmp, env=e, preexec_fn=limit)
        d = Daemon(proc, f"http://{host}:{port}", log_path)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {proc.returncode}:\n{d.log()}")
                try:
                    status, _ = d.get("/health")
                    if status == 200:
                        break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not get ready:\n{d.log()}")
                time.sleep(0.05)
            yield d
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
