"""Models onto a device: `edgelm pull` and `/api/pull` from another edgelm daemon
(over loopback), resumable and sha256-checked; model names cannot escape the models
directory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import ollama
import pytest
from serve_util import daemon, http

from conftest import SMOLLM2, model_path


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_pull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", "pull", *args], capture_output=True, text=True, timeout=300)


def test_pull_from_a_daemon_with_resume_and_sha(tmp_path: Path) -> None:
    src = model_path(SMOLLM2)
    digest = sha256(src)
    with daemon(src, "--models-dir", str(src.parent)) as a:
        port = a.url.rsplit(":", 1)[1]
        status, files = a.get("/api/edgelm/models")
        assert status == 200 and any(f["file"] == SMOLLM2 for f in files["models"])
        # A whole pull, progress on stderr, path on stdout.
        dest = tmp_path / "one"
        r = run_pull(f"edgelm://127.0.0.1:{port}/{SMOLLM2}", "--models-dir", str(dest), "--sha256", digest)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()) == dest / SMOLLM2 and sha256(dest / SMOLLM2) == digest
        assert "downloading" in r.stderr and "verifying sha256" in r.stderr and "success" in r.stderr
        # Resume: a partial file from an interrupted pull is continued, not restarted.
        dest2 = tmp_path / "two"
        dest2.mkdir()
        (dest2 / (SMOLLM2 + ".partial")).write_bytes(src.read_bytes()[: 5 << 20])
        r = run_pull(f"edgelm://127.0.0.1:{port}/{SMOLLM2}", "--models-dir", str(dest2))
        assert r.returncode == 0, r.stderr
        assert f"resuming at {5 << 20} bytes" in r.stderr and sha256(dest2 / SMOLLM2) == digest
        assert not (dest2 / (SMOLLM2 + ".partial")).exists()
        # A wrong digest: refused, nothing left behind.
        dest3 = tmp_path / "three"
        r = run_pull(f"edgelm://127.0.0.1:{port}/{SMOLLM2}", "--models-dir", str(dest3), "--sha256", "0" * 64)
        assert r.returncode == 1 and "sha256 mismatch" in r.stderr
        assert not list(dest3.glob("*"))
        # Names cannot leave the models directory.
        for bad in ("..%2F..%2Fetc%2Fpasswd", "x.txt", "..gguf"):
            status, body = a.get(f"/api/edgelm/models/{bad}")
            assert status in (400, 404), (bad, status, body)
        status, body = a.get("/api/edgelm/models/missing.gguf")
        assert status == 404


def test_api_pull_and_lan_lookup(tmp_path: Path) -> None:
    src = model_path(SMOLLM2)
    name = f"edgelm pull source {uuid.uuid4().hex[:6]}"
    with daemon(src, "--models-dir", str(src.parent), "--mdns-name", name, "--state-dir", str(tmp_path / "sa"), mdns=True) as a:
        port = a.url.rsplit(":", 1)[1]
        target = tmp_path / "target"
        with daemon(src, "--models-dir", str(target)) as b:
            # /api/pull on daemon B, through the ollama client, streaming progress.
            parts = list(ollama.Client(host=b.url).pull(f"edgelm://127.0.0.1:{port}/{SMOLLM2}", stream=True))
            assert parts[-1].status == "success"
            assert any(p.total and p.completed for p in parts)
            assert sha256(target / SMOLLM2) == sha256(src)
            status, body = http("POST", b.url + "/api/pull", {"model": "../../etc/passwd"})
            assert status == 400 and "not a model file name" in body["error"]
            with pytest.raises(ollama.ResponseError):
                ollama.Client(host=b.url).pull("ftp://x/y.gguf", stream=False)
        # By file name alone: the daemons on the LAN (loopback here) are asked.
        r = run_pull(SMOLLM2, "--models-dir", str(tmp_path / "lan"), "--interfaces", "127.0.0.1")
        assert r.returncode == 0, r.stderr
        assert sha256(tmp_path / "lan" / SMOLLM2) == sha256(src)
        r = run_pull("nobody-has-this.gguf", "--models-dir", str(tmp_path / "lan"), "--interfaces", "127.0.0.1")
        assert r.returncode == 1 and "no edgelm daemon on the LAN has" in r.stderr
