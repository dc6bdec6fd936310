"""Getting models onto a device: `edgelm pull SOURCE` and the daemon's `/api/pull`.

SOURCE is an http(s) URL of a GGUF file, `edgelm://HOST:PORT/FILE.gguf` (another
edgelm daemon, which serves its model files at `/api/edgelm/models/FILE`), or just
`FILE.gguf`: the daemons found on the LAN over mDNS are asked for it, first come
first served.

Downloads go to `<models_dir>/<file>.partial` and resume from there (HTTP Range); the
sha256 is checked when the source gives one (catalogue entries, `--sha256`, or the
`X-Edgelm-Sha256` header of a daemon), the file must parse as GGUF, and only then is
it renamed into place. Model file names are plain names: nothing can read or write
outside the models directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

CHUNK = 1 << 20

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.gguf$")


class PullError(Exception):
    pass


def safe_model_name(name: str) -> str:
    """A model file name that stays inside the models directory, or PullError."""
    if not _NAME.match(name) or ".." in name:
        raise PullError(f"{name!r} is not a model file name (letters, digits, . _ + -, ending in .gguf)")
    return name


@dataclass
class Source:
    url: str
    file: str
    sha256: str | None


async def resolve(source: str, sha256: str | None = None, interfaces: list[str] | None = None) -> Source:
    u = urlparse(source)
    if u.scheme == "edgelm":
        file = safe_model_name(Path(u.path).name)
        if not u.hostname or not u.port:
            raise PullError("an edgelm source is edgelm://HOST:PORT/FILE.gguf")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        return Source(f"http://{host}:{u.port}/api/edgelm/models/{quote(file)}", file, sha256)
    if u.scheme in ("http", "https") and u.path:
        return Source(source, safe_model_name(Path(u.path).name), sha256)
    if not u.scheme:
        return await _from_lan(safe_model_name(source), sha256, interfaces)
    raise PullError(f"unknown source {source!r}: give FILE.gguf (from a daemon on the LAN), an http(s) URL or edgelm://HOST:PORT/FILE")


async def _from_lan(file: str, sha256: str | None, interfaces: list[str] | None) -> Source:
    """Ask the edgelm daemons found over mDNS for `file`."""
    import aiohttp

    from edgelm.serve.mdns import discover_async

    daemons = await discover_async(2.0, interfaces)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for d in daemons:
            try:
                async with s.get(f"{d['url']}/api/edgelm/models") as r:
                    if r.status == 200 and any(m["file"] == file for m in (await r.json())["models"]):
                        return Source(f"{d['url']}/api/edgelm/models/{quote(file)}", file, sha256)
            except (aiohttp.ClientError, KeyError, ValueError):
                continue
    raise PullError(f"no edgelm daemon on the LAN has {file} ({len(daemons)} answered)")


Progress = Callable[[dict[str, Any]], None]


async def pull(source: str, models_dir: Path, sha256: str | None = None, progress: Progress | None = None,
               headers: dict[str, str] | None = None, interfaces: list[str] | None = None) -> Path:
    """Download `source` into `models_dir`; returns the final path."""
    import aiohttp

    src = await resolve(source, sha256, interfaces)
    report = progress or (lambda _: None)
    models_dir.mkdir(parents=True, exist_ok=True)
    dest = models_dir / src.file
    part = models_dir / (src.file + ".partial")
    have = part.stat().st_size if part.exists() else 0
    report({"status": "pulling manifest", "source": src.url})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        hdrs = dict(headers or {})
        if have:
            hdrs["Range"] = f"bytes={have}-"
        async with s.get(src.url, headers=hdrs) as r:
            if r.status == 416 and have:  # already complete
                total = have
            elif r.status not in (200, 206):
                raise PullError(f"{src.url}: HTTP {r.status} {r.reason}")
            else:
                if r.status == 200:
                    have = 0  # no range support: start over
                total = have + int(r.headers.get("Content-Length", "0") or 0)
                src.sha256 = src.sha256 or r.headers.get("X-Edgelm-Sha256")
                if have:
                    report({"status": f"resuming at {have} bytes", "total": total, "completed": have})
                t0 = time.monotonic()
                last = 0.0
                with open(part, "ab" if have else "wb") as f:
                    done = have
                    async for chunk in r.content.iter_chunked(CHUNK):
                        f.write(chunk)
                        done += len(chunk)
                        now = time.monotonic()
                        if now - last > 0.25 or done == total:
                            last = now
                            rate = (done - have) / max(now - t0, 1e-6)
                            report({"status": f"downloading {src.file}", "digest": f"sha256:{src.sha256 or ''}",
                                    "total": total, "completed": done, "rate": rate})
    report({"status": "verifying sha256 digest"})
    digest = file_sha256(part)
    if src.sha256 and digest != src.sha256.lower():
        part.unlink(missing_ok=True)
        raise PullError(f"sha256 mismatch for {src.file}: got {digest}, expected {src.sha256}")
    with open(part, "rb") as f:
        if f.read(4) != b"GGUF":
            part.unlink(missing_ok=True)
            raise PullError(f"{src.url} is not a GGUF file")
    os.replace(part, dest)
    report({"status": "success", "path": str(dest), "digest": f"sha256:{digest}"})
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()
