"""The model store: names → manifests → blobs, laid out as Ollama keeps them, beside
plain GGUF files.

    models_dir/
      *.gguf                                 plain model files: each a model, named by
                                             its file name without .gguf (its id)
      blobs/sha256-<hex>                     contents by digest: model GGUFs, templates,
                                             parameters, licenses, system prompts, configs
      manifests/<host>/<namespace>/<model>/<tag>
                                             a name: an OCI image manifest (JSON) whose
                                             layers are blobs

Names are Ollama's: `model[:tag]` (the tag is "latest" when left out), `namespace/model:tag`,
`host/namespace/model:tag`; the host defaults to the Ollama registry and the namespace
to "library", and a name is shown without them (`qwen3:0.6b`, `hf.co/user/repo:Q4_K_M`).
Names compare case-insensitively (the manifest path is lower case; the manifest keeps
the name as first written, for display). Each part is letters, digits, '.', '_', '-'
(a host may add ':port'), so a name never leaves `manifests/`.

A manifest is the registry's (Ollama's registry, or one written here for a Hugging Face
pull), with two edgelm annotations: `org.edgelm.name` on the manifest (the name as
written), and `org.edgelm.file` on a model layer that stands for a plain file of the
directory instead of a blob — the names given to plain files (`/api/copy` of a file,
a catalogue pull, and the `.edgelm-names.json` of earlier versions, migrated on first use).

Two names can share a blob, so a copy costs one small file; removing a name deletes its
manifest and then every blob that no manifest refers to (`gc`), except those the caller
says are in use (a loaded model). Plain files are removed only by their own id. Manifest
writes and the collection run under one lock file (flock), so two processes (a daemon
and the CLI) never lose each other's names; a manifest is written to a temporary file
and renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
HF_HOSTS = ("hf.co", "huggingface.co")

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
PARAMS = "application/vnd.ollama.image.params"
SYSTEM = "application/vnd.ollama.image.system"
LICENSE = "application/vnd.ollama.image.license"
MESSAGES = "application/vnd.ollama.image.messages"
PROJECTOR = "application/vnd.ollama.image.projector"
ADAPTER = "application/vnd.ollama.image.adapter"
TEXT_LAYERS = (TEMPLATE, PARAMS, SYSTEM, LICENSE, MESSAGES)
"""Small layers read as text (each at most MAX_TEXT_LAYER bytes)."""

FILE_KEY = "org.edgelm.file"
NAME_KEY = "org.edgelm.name"
NAMES_FILE = ".edgelm-names.json"
LOCK_FILE = ".store.lock"

MAX_MANIFEST = 1 << 20
MAX_TEXT_LAYER = 1 << 20
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,79}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ModelNameError(ValueError):
    pass


class StoreError(Exception):
    """A store operation that cannot be done; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """A name as Ollama reads it, or ModelNameError saying what a name looks like."""
        s = text.strip()
        bad = ModelNameError(
            f"{text[:200]!r} is not a model name (name[:tag], namespace/name:tag or "
            "hf.co/user/repo[:quant]; letters, digits, '.', '_', '-')"
        )
        if not s or "://" in s or len(s) > 350 or ".." in s:
            raise bad
        tag = DEFAULT_TAG
        slash, colon = s.rfind("/"), s.rfind(":")
        if colon > slash:
            s, tag = s[:colon], s[colon + 1 :]
        parts = s.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            host, (namespace, model) = DEFAULT_HOST, parts
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise bad
        if not (_HOST.match(host) and _PART.match(namespace) and _PART.match(model) and _TAG.match(tag)):
            raise bad
        if host.lower() == "huggingface.co":
            host = "hf.co"
        return cls(host, namespace, model, tag)

    @property
    def is_hf(self) -> bool:
        return self.host.lower() in HF_HOSTS

    @property
    def registry_default(self) -> bool:
        return self.host.lower() == DEFAULT_HOST

    def __str__(self) -> str:
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def key(self) -> str:
        return str(self).lower()

    def relpath(self) -> Path:
        return Path(self.host.lower().replace(":", "_"), self.namespace.lower(), self.model.lower(), self.tag.lower())


def check_name(name: str) -> str:
    """A name a user may give a model, in the form it is shown (tag included)."""
    return str(ModelName.parse(name))


def normalize(name: str) -> str:
    """A name's comparison key (lower case, tag included); the text itself, lower-cased,
    when it is not a name (a file name or path)."""
    try:
        return ModelName.parse(name).key
    except ModelNameError:
        return name.strip().lower()


def blob_name(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise StoreError(f"{digest[:80]!r} is not a sha256 digest (sha256:<64 hex digits>)", 502)
    return digest.replace(":", "-")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- locks -----------------------------------------------------------------------------


def _try_lock(path: Path, block: bool) -> Any:
    """The open, flock-ed lock file at `path`, or None (not `block`ing and held).
    The holder unlinks the file when done, so a waiter may have locked a file no longer
    at `path`: it checks the inode and tries again."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()


def _unlock(path: Path, f: Any) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    f.close()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, blocking (for short critical sections)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = _try_lock(path, block=True)
    try:
        yield
    finally:
        _unlock(path, f)


@contextlib.asynccontextmanager
async def file_lock(path: Path, on_wait: Callable[[], None] | None = None, poll_s: float = 0.2) -> AsyncIterator[None]:
    """An exclusive lock on `path` (flock: held per open file, so it also excludes other
    tasks of this process and other processes) without blocking the event loop; a
    cancelled waiter leaves nothing behind, and so does the holder (the lock file goes
    with the lock). `on_wait` is called once if it must wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while (f := _try_lock(path, block=False)) is None:
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        await asyncio.sleep(poll_s)
    try:
        yield
    finally:
        _unlock(path, f)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A name in the store: its manifest and where its model's bytes are."""

    name: str  # as shown
    manifest: dict[str, Any]
    manifest_digest: str
    model: Path
    digest: str | None  # the model layer's (None for a plain file named without one)
    size: int
    modified: float

    def layers(self, media_type: str) -> list[dict[str, Any]]:
        return [x for x in self.manifest.get("layers", []) if isinstance(x, dict) and x.get("mediaType") == media_type]

    @property
    def file(self) -> str | None:
        """The plain file this name stands for, or None (a blob)."""
        layer = self.layers(MODEL)[0]
        return (layer.get("annotations") or {}).get(FILE_KEY)


def _model_layer(manifest: dict[str, Any]) -> dict[str, Any]:
    models = [x for x in manifest.get("layers", []) if isinstance(x, dict) and x.get("mediaType") == MODEL]
    if len(models) != 1:
        raise StoreError(f"the manifest has {len(models)} model layers; edgelm runs a single GGUF", 422)
    return models[0]


def check_manifest(manifest: Any) -> dict[str, Any]:
    """A manifest's shape, checked (it comes from a registry, or from disk): layers with
    media types, sha256 digests and sizes; exactly one model layer."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise StoreError("the manifest is not an image manifest (no layers)", 502)
    for layer in manifest["layers"] + ([manifest["config"]] if isinstance(manifest.get("config"), dict) else []):
        if not isinstance(layer, dict) or not isinstance(layer.get("mediaType"), str):
            raise StoreError("a manifest layer has no media type", 502)
        file = (layer.get("annotations") or {}).get(FILE_KEY) if isinstance(layer.get("annotations"), dict) else None
        if file is None:
            blob_name(str(layer.get("digest", "")))
        elif not isinstance(file, str) or "/" in file or file.startswith(".") or not file.endswith(".gguf"):
            raise StoreError(f"a manifest layer names the file {str(file)[:80]!r}, which is not a model file name", 502)
        size = layer.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StoreError("a manifest layer has no valid size", 502)
    _model_layer(manifest)
    return manifest


class Store:
    """The store in one models directory (see the module doc)."""

    def __init__(self, models_dir: Path) -> None:
        self.dir = Path(models_dir)
        self.blobs = self.dir / "blobs"
        self.manifests = self.dir / "manifests"
        self._migrated = False

    # -- reading ------------------------------------------------------------------------
    def blob(self, digest: str) -> Path:
        return self.blobs / blob_name(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        p = self.blob(digest)
        try:
            return p.is_file() and (size is None or p.stat().st_size == size)
        except OSError:
            return False

    def lookup(self, name: str) -> Entry | None:
        """The entry a name refers to, or None (no such name, or its model is gone)."""
        self._migrate()
        try:
            n = ModelName.parse(name)
        except ModelNameError:
            return None
        return self._entry(self.manifests / n.relpath(), str(n))

    def entries(self) -> list[Entry]:
        """Every name whose model is present, sorted by name."""
        self._migrate()
        out = []
        if self.manifests.is_dir():
            for path in sorted(self.manifests.glob("*/*/*/*")):
                if path.is_file() and not path.name.startswith("."):
                    rel = path.relative_to(self.manifests).parts
                    e = self._entry(path, str(ModelName(rel[0], rel[1], rel[2], rel[3])))
                    if e is not None:
                        out.append(e)
        return sorted(out, key=lambda e: e.name.lower())

    def _entry(self, path: Path, fallback: str) -> Entry | None:
        try:
            st = path.stat()
            if st.st_size > MAX_MANIFEST:
                return None
            raw = path.read_bytes()
            manifest = check_manifest(json.loads(raw))
        except (OSError, ValueError, StoreError):
            return None
        layer = _model_layer(manifest)
        file = (layer.get("annotations") or {}).get(FILE_KEY)
        model = self.dir / file if file else self.blob(str(layer["digest"]))
        if not model.is_file():
            return None
        name = (manifest.get("annotations") or {}).get(NAME_KEY)
        if not isinstance(name, str) or normalize(name) != normalize(fallback):
            name = fallback
        digest = layer.get("digest") if isinstance(layer.get("digest"), str) else None
        size = int(layer.get("size") or 0) or model.stat().st_size
        return Entry(name, manifest, digest_of(raw), model, digest, size, st.st_mtime)

    def text_layer(self, entry: Entry, media_type: str) -> str | None:
        """A small layer's text (template, params, system, license), or None."""
        for layer in entry.layers(media_type):
            try:
                p = self.blob(str(layer.get("digest")))
                if p.stat().st_size <= MAX_TEXT_LAYER:
                    return p.read_text(errors="replace")
            except (OSError, StoreError):
                continue
        return None

    def names_of(self, model: Path) -> list[str]:
        """The names whose model is `model`."""
        return [e.name for e in self.entries() if e.model == model]

    # -- writing ------------------------------------------------------------------------
    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.dir / LOCK_FILE)

    def put(self, name: str, manifest: dict[str, Any], in_use: Callable[[Path], bool] = lambda _: False) -> Entry:
        """Write `name`'s manifest (its blobs must be in place); the blobs only the
        manifest it replaces referred to are deleted, unless in use."""
        n = ModelName.parse(name)
        manifest = dict(check_manifest(manifest))
        manifest["annotations"] = {**(manifest.get("annotations") or {}), NAME_KEY: str(n)}
        with self._lock():
            missing = sorted(d for d in _digests(manifest) if not self.blob(d).is_file())
            if missing:
                raise StoreError(
                    f"the blobs {', '.join(missing)} of {n} are not in the store (removed while it was "
                    "pulled?); pull again",
                    409,
                )
            path = self.manifests / n.relpath()
            old = _read_manifest(path)
            _write_atomic(path, json.dumps(manifest, indent=1).encode())
            if old is not None:
                self._collect(_digests(old) - _digests(manifest), in_use)
        e = self.lookup(str(n))
        if e is None:
            raise StoreError(f"the model of {n} is not in the store", 500)
        return e

    def name_file(self, name: str, file: str, digest: str | None = None) -> Entry:
        """A name for the plain file `file` of the directory."""
        size = (self.dir / file).stat().st_size
        layer: dict[str, Any] = {"mediaType": MODEL, "size": size, "annotations": {FILE_KEY: file}}
        if digest:
            layer["digest"] = digest if digest.startswith("sha256:") else "sha256:" + digest
        return self.put(name, {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": [layer]})

    def copy(self, src: Entry, dst: str) -> Entry:
        """Another name for `src`'s manifest: no bytes are copied."""
        manifest = {k: v for k, v in src.manifest.items() if k != "annotations"}
        return self.put(dst, manifest)

    def remove(self, name: str, in_use: Callable[[Path], bool] = lambda _: False) -> list[str]:
        """Delete a name; returns the digests of the blobs that went with it (those no
        other name refers to, and not in use)."""
        n = ModelName.parse(name)
        path = self.manifests / n.relpath()
        with self._lock():
            old = _read_manifest(path)
            if old is None:
                raise StoreError(f"model '{name}' not found", 404)
            path.unlink()
            for d in (path.parent, path.parent.parent, path.parent.parent.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
            return self._collect(_digests(old), in_use)

    def forget_file(self, file: str) -> list[str]:
        """Delete every name of the plain file `file` (it is being deleted); returns them."""
        gone = []
        with self._lock():
            for e in self.entries():
                if e.file == file:
                    with contextlib.suppress(FileNotFoundError):
                        (self.manifests / ModelName.parse(e.name).relpath()).unlink()
                        gone.append(e.name)
        return gone

    def prune(self, in_use: Callable[[Path], bool] = lambda _: False, min_age_s: float = 3600.0) -> list[str]:
        """Delete every blob no manifest refers to and older than `min_age_s` (a pull
        in flight has blobs no manifest names yet); the daemon does this at start."""
        import time

        cutoff = time.time() - min_age_s
        with self._lock():
            cands = set()
            for p in self.blobs.glob("sha256-*") if self.blobs.is_dir() else []:
                try:
                    if re.fullmatch(r"sha256-[0-9a-f]{64}", p.name) and p.stat().st_mtime < cutoff:
                        cands.add(p.name.replace("-", ":", 1))
                except OSError:
                    continue
            return self._collect(cands, in_use)

    def _collect(self, candidates: set[str], in_use: Callable[[Path], bool]) -> list[str]:
        """Delete the candidate blobs no manifest refers to, unless in use; the caller
        holds the lock."""
        if not candidates:
            return []
        keep: set[str] = set()
        for path in self.manifests.glob("*/*/*/*") if self.manifests.is_dir() else []:
            m = _read_manifest(path)
            if m is not None:
                keep |= _digests(m)
        freed = []
        for d in sorted(candidates - keep):
            try:
                p = self.blob(d)
            except StoreError:
                continue
            if p.is_file() and not in_use(p):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    freed.append(d)
        return freed

    # -- the names file of earlier versions ------------------------------------------------
    def _migrate(self) -> None:
        """`.edgelm-names.json` ({"names": {name: file}}) becomes manifests that name
        the plain files (once; the file is renamed to `.edgelm-names.json.migrated`)."""
        if self._migrated:
            return
        self._migrated = True
        old = self.dir / NAMES_FILE
        if not old.is_file():
            return
        with self._lock():
            if not old.is_file():
                return
            try:
                names = json.loads(old.read_text()).get("names", {})
            except (OSError, ValueError, AttributeError):
                names = {}
            for name, file in names.items() if isinstance(names, dict) else []:
                if not (isinstance(name, str) and isinstance(file, str) and (self.dir / file).is_file()):
                    continue
                try:
                    n = ModelName.parse(name)
                except ModelNameError:
                    continue
                if (self.manifests / n.relpath()).exists():
                    continue
                layer = {"mediaType": MODEL, "size": (self.dir / file).stat().st_size, "annotations": {FILE_KEY: file}}
                _write_atomic(
                    self.manifests / n.relpath(),
                    json.dumps(
                        {
                            "schemaVersion": 2,
                            "mediaType": MANIFEST_TYPE,
                            "layers": [layer],
                            "annotations": {NAME_KEY: str(n)},
                        },
                        indent=1,
                    ).encode(),
                )
            os.replace(old, self.dir / (NAMES_FILE + ".migrated"))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_MANIFEST:
            return None
        m = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _digests(manifest: dict[str, Any]) -> set[str]:
    """The blob digests a manifest refers to (layers standing for plain files have none
    in the blob store)."""
    out = set()
    for layer in list(manifest.get("layers") or []) + [manifest.get("config") or {}]:
        if (
            isinstance(layer, dict)
            and isinstance(layer.get("digest"), str)
            and _DIGEST.match(layer["digest"])
            and not (isinstance(layer.get("annotations"), dict) and FILE_KEY in layer["annotations"])
        ):
            out.add(layer["digest"])
    return out


def lookup_catalogue_file(models_dir: Path, name: str) -> str | None:
    """The catalogue's file for an alias, when that file is in `models_dir`."""
    from edgelm.pull import PullError, catalogue_entry

    try:
        entry = catalogue_entry(name)
    except PullError:
        return None
    if entry is not None:
        file = str(entry[1].get("file", ""))
        if file and (models_dir / file).is_file():
            return file
    return None
