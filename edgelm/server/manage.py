"""Models on disk: Ollama's `/api/pull` (NDJSON progress), `/api/delete` and
`/api/copy`, and edgelm's own file routes that other daemons on the LAN pull from
(`/api/edgelm/models`, with Range and the sha256). All admin routes
(edgelm.server.security), except the file listing and download.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from edgelm import store
from edgelm.server.ollama import model_name
from edgelm.server.params import ApiError, Body
from edgelm.server.state import SERVER, Server

log = logging.getLogger("edgelm.serve")


def _models_dir(srv: Server) -> Path:
    return Path(srv.cfg.models_dir).expanduser()


async def list_files(request: web.Request) -> web.Response:
    """The GGUF files in the models directory (what other daemons may pull)."""
    srv: Server = request.app[SERVER]
    d = _models_dir(srv)
    files = sorted(p for p in d.glob("*.gguf") if p.is_file()) if d.is_dir() else []
    return web.json_response({"models": [{"file": p.name, "size": p.stat().st_size} for p in files]})


async def get_file(request: web.Request) -> web.StreamResponse:
    """One model file, with Range support (resumable pulls) and its sha256."""
    from edgelm.pull import PullError, file_sha256, safe_model_name

    srv: Server = request.app[SERVER]
    try:
        name = safe_model_name(request.match_info["file"])
    except PullError as e:
        raise ApiError(str(e), "file", 400) from None
    path = _models_dir(srv) / name
    if not path.is_file():
        raise ApiError(f"model file '{name}' not found", "file", 404)
    st = path.stat()
    key = (name, st.st_size, st.st_mtime)
    digest = srv.file_digests.get(key)
    if digest is None:
        digest = srv.file_digests[key] = await asyncio.get_running_loop().run_in_executor(None, file_sha256, path)
    return web.FileResponse(path, headers={"X-Edgelm-Sha256": digest, "Content-Type": "application/octet-stream"})


async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's /api/pull: NDJSON progress lines, then {"status": "success"} — or an
    {"error": ...} line: a pull never ends in silence. The pull itself runs as a task
    the server owns, so a client that goes away does not leave a half-written file
    (the pull finishes, or fails and cleans up, on its own)."""
    from edgelm.pull import ProgressLog, PullError, pull_source, resolve
    from edgelm.registry import Registries

    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    source = b.get("model", str) or b.get("name", str)
    if not source:
        raise ApiError("'model' is required", "model")
    stream_mode = b.get("stream", bool, True)
    cfg = srv.cfg
    try:  # what can be refused at once gets its status before anything streams
        src = await resolve(source, allow_urls=cfg.url_pull_allowed)
    except PullError as e:
        raise ApiError(str(e), "model", e.status) from None
    lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def run() -> Path:
        logged = ProgressLog(log, source[:200])

        def report(p: dict[str, Any]) -> None:
            lines.put_nowait(p)
            logged(p)

        try:
            return await pull_source(
                src,
                _models_dir(srv),
                report,
                max_bytes=(cfg.max_pull_mib << 20) if cfg.max_pull_mib else None,
                in_use=srv.pool.in_use,
                registries=Registries.from_env(cfg.registry_url, cfg.hf_url),
            )
        finally:
            lines.put_nowait(None)

    task = srv.background(run(), f"pull {source[:200]}")

    def failure() -> tuple[str, int]:
        exc = task.exception()
        if isinstance(exc, PullError):
            if exc.detail:
                log.warning("pull of %s failed: %s (%s)", source[:200], exc, exc.detail)
            return f"pull failed: {exc}", exc.status
        log.error("pull of %s failed", source[:200], exc_info=exc)
        return "pull failed: internal error (the daemon log has the details)", 500

    if not stream_mode:
        await asyncio.wait([task])  # not cancelled with this handler: the pull ends on its own
        if task.exception() is not None:
            msg, status = failure()
            raise ApiError(msg, "model", status)
        return web.json_response({"status": "success"})
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    while (p := await lines.get()) is not None:
        await resp.write(json.dumps({k: v for k, v in p.items() if k != "rate"}).encode() + b"\n")
    await asyncio.wait([task])
    if task.exception() is not None:
        msg, _ = failure()
        await resp.write(json.dumps({"error": msg}).encode() + b"\n")
    return resp


async def delete(request: web.Request) -> web.Response:
    """Ollama's /api/delete. A name in the store (pulled or copied) is removed, and with
    it every blob no other name uses (a blob a loaded model reads stays until it is
    unloaded); a plain file's own id deletes the file and every name of it. The
    configured model and models with requests in flight are refused (409); an idle
    loaded model is unloaded first."""
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    name = model_name(b)
    d = _models_dir(srv)
    pool = srv.pool
    loop = asyncio.get_running_loop()
    mid, path = pool.resolve(name)
    st = pool.model_store()
    entry = st.lookup(name)
    if entry is not None and entry.file is not None:  # a name of a plain file: the name goes, the file stays
        await loop.run_in_executor(None, st.remove, name, pool.in_use)
        return web.json_response({})
    is_default = path == pool.default_path or path.resolve() == pool.default_path.resolve()
    if mid == pool.default_id or (entry is None and is_default):  # another name of its blob may go
        raise ApiError(
            f"'{mid}' is the configured model (`model:` in the config); it cannot be deleted while it is",
            "model",
            409,
            "model_in_use",
        )
    if entry is None and (path.parent.resolve() != d.resolve() or not path.name.endswith(".gguf")):
        raise ApiError(f"'{mid}' is not in the models directory", "model", 409)
    lm = pool.loaded.get(mid)
    if lm is not None:
        if lm.busy:
            raise ApiError(
                f"'{mid}' has requests in flight; delete it when they are done", "model", 409, "model_in_use"
            )
        await pool.unload(mid)
    if entry is not None:
        try:
            freed = await loop.run_in_executor(None, st.remove, name, pool.in_use)
        except store.StoreError as e:
            raise ApiError(str(e), "model", e.status) from None
        log.info("deleted %s (blobs freed: %s)", entry.name, ", ".join(f[7:19] for f in freed) or "none")
        return web.json_response({})
    await loop.run_in_executor(None, st.forget_file, path.name)
    path.unlink(missing_ok=True)
    log.info("deleted %s", path)
    return web.json_response({})


async def copy(request: web.Request) -> web.Response:
    """Ollama's /api/copy: a new name for a model (a manifest; no bytes are copied)."""
    srv: Server = request.app[SERVER]
    b = Body(await srv.json_body(request))
    src = b.get("source", str)
    dst = b.get("destination", str)
    if not src or not dst:
        raise ApiError("'source' and 'destination' are required", "source" if not src else "destination")
    pool = srv.pool
    mid, path = pool.resolve(src)
    d = _models_dir(srv)
    try:
        name = store.check_name(dst)
    except store.ModelNameError as e:
        raise ApiError(str(e), "destination") from None
    if any(store.normalize(name) == store.normalize(f"{p.stem}") for p in d.glob("*.gguf")):
        raise ApiError(f"'{dst}' is a model file's own name; choose another", "destination", 409)
    st = pool.model_store()
    entry = pool.entry(mid)
    loop = asyncio.get_running_loop()
    try:
        if entry is not None:
            await loop.run_in_executor(None, st.copy, entry, name)
        elif path.parent.resolve() == d.resolve() and path.name.endswith(".gguf"):
            await loop.run_in_executor(None, st.name_file, name, path.name, None)
        else:
            raise ApiError(f"'{mid}' is not in the models directory; copy a model that is", "source", 400)
    except store.StoreError as e:
        raise ApiError(str(e), "destination", e.status) from None
    return web.json_response({})
