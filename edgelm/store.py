"""Model names in a models directory.

Every `*.gguf` file in `models_dir` is a model, named by its file name without
`.gguf` (its id). Beside those ids, a name can point at a file:

- the names a model was pulled by (`edgelm pull smollm2`, Ollama's `/api/pull` with
  `smollm2:latest`) and the names `/api/copy` made, kept in `.edgelm-names.json` in the
  directory: `{"names": {"smollm2:latest": "SmolLM2-135M-Instruct.Q4_1.gguf"}}`;
- the catalogue's aliases of a file that is present (edgelm/catalogue.json).

Names are compared in Ollama's form: lower case, with `:latest` when no tag is given
(`smollm2` and `smollm2:latest` are one name). Changes to the names file happen under
a lock file and are written to a temporary file and renamed, so two processes never
lose each other's names.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

NAMES_FILE = ".edgelm-names.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,150}(:[a-z0-9][a-z0-9._-]{0,80})?$")


class ModelNameError(ValueError):
    pass


def normalize(name: str) -> str:
    """A model name in Ollama's form: lower case, ":latest" when it has no tag."""
    n = name.strip().lower()
    return n if ":" in n.rsplit("/", 1)[-1] else f"{n}:latest"


def check_name(name: str) -> str:
    """A name a user may give a model (letters, digits, . _ - /, an optional :tag)."""
    n = normalize(name)
    if not _NAME.match(n) or ".." in n or n.startswith("/"):
        raise ModelNameError(f"{name!r} is not a model name (letters, digits, '.', '_', '-', '/', and an optional "
                         ":tag, e.g. \"kitchen:latest\")")
    return n


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
def _locked(path: Path) -> Iterator[None]:
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


def read_names(models_dir: Path) -> dict[str, str]:
    """Name → file name, for the names whose file is present."""
    try:
        data = json.loads((models_dir / NAMES_FILE).read_text())
        names = data.get("names", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    return {n: f for n, f in names.items() if isinstance(n, str) and isinstance(f, str) and (models_dir / f).is_file()}


def _write_names(models_dir: Path, names: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".names-", dir=models_dir)
    with os.fdopen(fd, "w") as f:
        json.dump({"names": dict(sorted(names.items()))}, f, indent=1)
    os.replace(tmp, models_dir / NAMES_FILE)


def _edit(models_dir: Path, change: Callable[[dict[str, str]], None]) -> None:
    with _locked(models_dir / (NAMES_FILE + ".lock")):
        names = read_names(models_dir)
        change(names)
        _write_names(models_dir, names)


def add_name(models_dir: Path, name: str, file: str) -> None:
    n = check_name(name)
    _edit(models_dir, lambda names: names.__setitem__(n, file))


def remove_name(models_dir: Path, name: str) -> bool:
    n = normalize(name)
    found: list[bool] = []

    def change(names: dict[str, str]) -> None:
        found.append(names.pop(n, None) is not None)

    _edit(models_dir, change)
    return found[0]


def forget_file(models_dir: Path, file: str) -> None:
    """Drop every name that points at `file` (it is being deleted)."""
    def change(names: dict[str, str]) -> None:
        for n in [n for n, f in names.items() if f == file]:
            del names[n]

    _edit(models_dir, change)


def lookup(models_dir: Path, name: str) -> str | None:
    """The file a name points at in `models_dir` (pulled/copied names, then the
    catalogue's aliases of present files), or None."""
    n = normalize(name)
    hit = read_names(models_dir).get(n)
    if hit is not None:
        return hit
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
