"""Models onto a device: `edgelm pull` and `/api/pull` from another edgelm daemon
(over loopback), resumable and sha256-checked; model names cannot escape the models
directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ollama
import pytest
from conftest import SMOLLM2, model_path
from serve_util import daemon, http


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_pull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "pull", *args], capture_output=True, text=True, timeout=300
    )


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
    with daemon(
        src, "--models-dir", str(src.parent), "--mdns-name", name, "--state-dir", str(tmp_path / "sa"), mdns=True
    ) as a:
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
def http_server(setup: Callable[[Any], None], host: str = "127.0.0.1") -> Iterator[str]:
    """An aiohttp server on its own thread, on loopback (or `host`); `setup` adds the
    routes to its application. Yields its base URL."""
    import asyncio
    import threading

    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        app = web.Application()
        setup(app)
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


@contextmanager
def static_server(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """An HTTP server (with Range support) for the files in `root`."""
    with http_server(lambda app: app.router.add_static("/", root), host) as url:
        yield url


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
        entry = {
            "aliases": ["smol:tiny"],
            "file": SMOLLM2,
            "sha256": sha256(model_path(SMOLLM2)),
            "parts": [{"url": f"{url}/{p['name']}", "sha256": p["sha256"], "member": p["member"]} for p in parts],
        }
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        env = {**os.environ, "EDGELM_CATALOGUE": str(cat)}
        dest = tmp_path / "models"
        # An interrupted download of the first part is resumed, not restarted.
        dest.mkdir()
        (dest / f".{SMOLLM2}.part0.partial").write_bytes((root / parts[0]["name"]).read_bytes()[: 3 << 20])
        r = subprocess.run(
            [sys.executable, "-m", "edgelm.cli", "pull", "smol:tiny", "--models-dir", str(dest)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert "resuming at 3145728 bytes" in r.stderr and "assembling" in r.stderr
        assert sha256(dest / SMOLLM2) == entry["sha256"]
        # Parts cleaned up; the name it was pulled by is kept (edgelm.store: a manifest
        # whose model layer is the plain file).
        assert sorted(p.name for p in dest.iterdir()) == [SMOLLM2, "manifests"]
        from edgelm.store import Store

        e = Store(dest).lookup("smol:tiny")
        assert e is not None and e.file == SMOLLM2 and e.digest == "sha256:" + entry["sha256"]
        # A part whose digest is wrong: a clear error, nothing under the model's name.
        entry["parts"][1]["sha256"] = "0" * 64
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        r = subprocess.run(
            [sys.executable, "-m", "edgelm.cli", "pull", "smol-test", "--models-dir", str(tmp_path / "m2")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == 1 and "sha256 mismatch for part 2" in r.stderr
        assert not (tmp_path / "m2" / SMOLLM2).exists()
        # /api/pull takes catalogue names too (what Ollama clients send).
        entry["parts"][1]["sha256"] = parts[1]["sha256"]
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        with daemon(
            model_path(SMOLLM2),
            "--models-dir",
            str(tmp_path / "m3"),
            env={"EDGELM_CATALOGUE": str(cat), "EDGELM_REGISTRY_URL": url},
        ) as d:
            lines = list(ollama.Client(host=d.url).pull("smol:tiny", stream=True))
            assert lines[-1].status == "success"
            assert any((s.status or "").startswith("assembling") for s in lines)
            # Not in the catalogue: a registry name (the registry here is a static server
            # without it).
            status, body = http("POST", d.url + "/api/pull", {"model": "no-such-model", "stream": False})
            assert status == 404 and "'no-such-model:latest' not found in the registry" in body["error"], body
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


# -- a pull on a shared LAN: nothing bad gets installed, nothing in use is replaced ------


def upstream(files: dict[str, Path]) -> Callable[[Any], None]:
    """Routes of an upstream that misbehaves in every way a pull must survive; `files`
    maps a name to a real file served (with Range) under /good/NAME and, slowly, under
    /slow/NAME."""
    import asyncio

    from aiohttp import web

    async def good(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(files[request.match_info["name"]])

    async def slow(request: web.Request) -> web.StreamResponse:
        data = files[request.match_info["name"]].read_bytes()
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        for i in range(0, len(data), 4 << 20):  # about 2 s for SmolLM2
            await resp.write(data[i : i + (4 << 20)])
            await asyncio.sleep(0.08)
        return resp

    async def fake(request: web.Request) -> web.Response:
        return web.Response(body=b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(1 << 20))  # a GGUF-looking megabyte

    async def drop(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(8 << 20)})
        await resp.prepare(request)
        await resp.write(b"GGUF" + bytes(1 << 20))
        assert request.transport is not None
        request.transport.close()  # the upstream goes away mid-file
        return resp

    async def to_ftp(request: web.Request) -> web.Response:
        raise web.HTTPFound("ftp://127.0.0.1/x.gguf")

    async def to_good(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/good/{request.match_info['name']}")

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(10**14)})  # 100 TB
        await resp.prepare(request)
        await asyncio.sleep(2)
        return resp

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"GGUF" + bytes(130 << 20))

    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, text="redis-server 7.0 says hello")

    def setup(app: Any) -> None:
        for path, h in (
            ("/good/{name}", good),
            ("/slow/{name}", slow),
            ("/fake/{name}", fake),
            ("/drop/{name}", drop),
            ("/to-ftp/{name}", to_ftp),
            ("/to-good/{name}", to_good),
            ("/huge/{name}", huge),
            ("/big/{name}", big),
            ("/teapot/{name}", teapot),
        ):
            app.router.add_get(path, h)

    return setup


def pull_lines(url: str, model: str, **body: Any) -> list[dict[str, Any]]:
    status, raw = http("POST", url + "/api/pull", {"model": model, **body}, timeout=300)
    assert status == 200, raw
    return [json.loads(x) for x in raw.strip().splitlines()] if isinstance(raw, str) else [raw]


def test_a_pull_never_installs_a_bad_file_nor_replaces_one_in_use(tmp_path: Path) -> None:
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    served = models / SMOLLM2
    shutil.copy(model_path(SMOLLM2), served)
    spare = models / "spare.gguf"
    shutil.copy(model_path(SMOLLM2), spare)
    digest = sha256(served)
    with (
        http_server(upstream({"SmolLM2.gguf": model_path(SMOLLM2)})) as up,
        daemon(served, "--models-dir", str(models), config="max_pull_mib: 120\n") as d,
    ):
        # Over the served model's name: refused before a byte is fetched.
        status, body = http("POST", d.url + "/api/pull", {"model": f"{up}/fake/{SMOLLM2}", "stream": False})
        assert status == 409 and "in use" in body["error"], body
        # A GGUF-looking megabyte is not a model: never installed; the old file stays.
        for name in ("spare.gguf", "new.gguf"):
            lines = pull_lines(d.url, f"{up}/fake/{name}")
            assert "error" in lines[-1] and "not a model edgelm can run" in lines[-1]["error"], lines[-1]
        assert sha256(spare) == digest and not (models / "new.gguf").exists()
        # Upstreams that fail: each ends with an error line, never a silent end.
        for route, needle in (
            ("drop", "could not download"),
            ("to-ftp", "not http(s)"),
            ("teapot", "could not download"),
            ("big", "max_pull_mib"),
            ("huge", "not enough disk space"),
        ):
            lines = pull_lines(d.url, f"{up}/{route}/{route}.gguf")
            assert "error" in lines[-1] and needle in lines[-1]["error"], (route, lines[-1])
            assert "418" not in lines[-1]["error"] and "redis" not in lines[-1]["error"]  # nothing about what answered
            status, body = http("POST", d.url + "/api/pull", {"model": f"{up}/{route}/{route}.gguf", "stream": False})
            assert 400 <= status < 600 and needle in body["error"], (route, status, body)
        assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".partial")) == [SMOLLM2, "spare.gguf"]
        assert not (models / "huge.gguf.partial").exists()  # refused before writing
        # A redirect to http(s) is followed; then the file is proven and installed.
        lines = pull_lines(d.url, f"{up}/to-good/SmolLM2.gguf")
        assert lines[-1].get("status") == "success", lines[-1]
        assert any(x.get("status") == "checking that the model loads" for x in lines)
        assert sha256(models / "SmolLM2.gguf") == digest
        log = d.log()
    assert "Traceback" not in log and " ERROR " not in log
    assert "HTTP 418" in log  # the detail went to the log


def test_concurrent_pulls_of_one_file(tmp_path: Path) -> None:
    """Two /api/pull requests and an `edgelm pull` process for the same file at once:
    one downloads, the others wait and find it in place; never two writers."""
    import threading

    models = tmp_path / "models"
    digest = sha256(model_path(SMOLLM2))
    with (
        http_server(upstream({"smol.gguf": model_path(SMOLLM2)})) as up,
        daemon(model_path(SMOLLM2), "--models-dir", str(models)) as d,
    ):
        src = f"{up}/slow/smol.gguf"
        results: dict[str, Any] = {}

        def api(key: str) -> None:
            results[key] = pull_lines(d.url, src)

        def cli() -> None:
            results["cli"] = run_pull(src, "--models-dir", str(models), "--sha256", digest)

        threads = [
            threading.Thread(target=api, args=("a",)),
            threading.Thread(target=api, args=("b",)),
            threading.Thread(target=cli),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results["a"][-1]["status"] == "success" and results["b"][-1]["status"] == "success"
        assert results["cli"].returncode == 0, results["cli"].stderr
        waited = [k for k in ("a", "b") if any("waiting for another pull" in x.get("status", "") for x in results[k])]
        waited += ["cli"] if "waiting for another pull" in results["cli"].stderr else []
        assert len(waited) >= 1, results
        assert sha256(models / "smol.gguf") == digest
        assert sorted(p.name for p in models.iterdir()) == ["smol.gguf"]  # no partial, no lock left


def test_health_answers_during_a_large_pull(tmp_path: Path) -> None:
    """Download, hashing, writing and checking run off the event loop: /health (the
    systemd watchdog's view) keeps answering quickly during a 250 MB pull."""
    import threading

    models = tmp_path / "models"
    gemma = model_path("gemma-3-270m-q4_k_m.gguf")
    with http_server(upstream({"g.gguf": gemma})) as up, daemon(model_path(SMOLLM2), "--models-dir", str(models)) as d:
        done = threading.Event()
        out: dict[str, Any] = {}

        def go() -> None:
            out["lines"] = pull_lines(d.url, f"{up}/good/g.gguf")
            done.set()

        threading.Thread(target=go).start()
        worst, n = 0.0, 0
        while not done.is_set():
            t0 = time.perf_counter()
            assert http("GET", d.url + "/health", timeout=10)[0] == 200
            worst = max(worst, time.perf_counter() - t0)
            n += 1
            time.sleep(0.02)
        assert out["lines"][-1]["status"] == "success", out["lines"][-1]
        print(f"/health during the pull: {n} requests, slowest {worst * 1000:.0f} ms")
        assert n >= 5 and worst < 1.5, (n, worst)
        assert sha256(models / "g.gguf") == sha256(gemma)
