"""What the CLI's model commands talk to: the running daemon when one answers, else the
models directory itself.

The daemon is found at `$EDGELM_URL` (a URL, or `host:port` as OLLAMA_HOST is written),
else at the host and port of the config file `edgelm serve` would read (0.0.0.0 means
this machine). It counts as up when `GET /api/version` answers with an "edgelm" field
within a second; a key comes from `$EDGELM_API_KEY`, else the config's admin_key or
api_key. Offline, names resolve as the daemon resolves them (plain files by id or file
name, the store's names, the catalogue's aliases of present files), against the config's
models_dir.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgelm import store


class ClientError(Exception):
    """A daemon answer that is an error; `status` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    models_dir: Path
    registry_url: str
    hf_url: str


def settings() -> Settings:
    """Where the daemon should be, its key, and the models directory (see the module doc)."""
    from edgelm.config import Config, ConfigError, load_config

    try:
        cfg, _ = load_config(None, {})
    except (ConfigError, OSError):
        cfg = Config()
    url = os.environ.get("EDGELM_URL", "").strip()
    if not url:
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "", "::") else cfg.host
        url = f"http://[{host}]:{cfg.port}" if ":" in host else f"http://{host}:{cfg.port}"
    elif "://" not in url:
        url = "http://" + url
    key = os.environ.get("EDGELM_API_KEY") or cfg.admin_key or cfg.api_key
    return Settings(url.rstrip("/"), key, Path(cfg.models_dir).expanduser(), cfg.registry_url, cfg.hf_url)


class Daemon:
    """A running edgelm daemon, over plain HTTP (http.client: a Ctrl-C while an answer
    streams closes the connection, and the daemon aborts the request)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url
        u = urlparse(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.api_key = api_key
        self.timeout = timeout

    @classmethod
    def find(cls, s: Settings | None = None) -> Daemon | None:
        """The daemon, if one answers at the configured place."""
        s = s or settings()
        d = cls(s.url, s.api_key, timeout=1.0)
        try:
            v = d.request("GET", "/api/version")
        except (ClientError, OSError, ValueError):
            return None
        if not isinstance(v, dict) or "edgelm" not in v:
            return None
        return cls(s.url, s.api_key)

    def _open(self, method: str, path: str, body: Any = None) -> tuple[http.client.HTTPConnection, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        if r.status >= 400:
            raw = r.read()
            conn.close()
            try:
                msg = json.loads(raw).get("error")
                msg = msg.get("message") if isinstance(msg, dict) else msg
            except (ValueError, AttributeError):
                msg = None
            msg = str(msg or f"the daemon answered HTTP {r.status}")
            if r.status in (401, 403):
                msg += "; set EDGELM_API_KEY to the daemon's key (its admin key for pull, rm, cp and stop)"
            raise ClientError(msg, r.status)
        return conn, r

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn, r = self._open(method, path, body)
        try:
            raw = r.read()
        finally:
            conn.close()
        return json.loads(raw) if raw else {}

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """NDJSON lines, as they come; an `{"error"}` line is raised."""
        conn, r = self._open("POST", path, body)
        try:
            while line := r.readline():
                if line.strip():
                    obj = json.loads(line)
                    if isinstance(obj, dict) and "error" in obj:
                        raise ClientError(str(obj["error"]), 500)
                    yield obj
        finally:
            conn.close()


# -- the models directory, offline -------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """A model found in the models directory: its name as shown, its file, and its store
    entry (None for a plain file)."""

    name: str
    path: Path
    entry: store.Entry | None


def model_files(models_dir: Path) -> list[Path]:
    return sorted(p for p in models_dir.glob("*.gguf") if p.is_file()) if models_dir.is_dir() else []


def find_local(models_dir: Path, name: str) -> Local | None:
    """A name as the daemon resolves it, against the models directory."""
    for p in model_files(models_dir):
        if name in (p.name, p.stem, f"{p.stem}:latest"):
            return Local(p.stem, p, None)
    st = store.Store(models_dir)
    e = st.lookup(name) if models_dir.is_dir() else None
    if e is not None:
        return Local(e.name, e.model, e)
    file = store.lookup_catalogue_file(models_dir, name) if models_dir.is_dir() else None
    if file is not None:
        return Local(Path(file).stem, models_dir / file, None)
    return None


def list_local(models_dir: Path) -> list[Local]:
    """Every model of the directory under every name: plain files, then the store's names."""
    out = [Local(p.stem, p, None) for p in model_files(models_dir)]
    if models_dir.is_dir():
        out += [Local(e.name, e.model, e) for e in store.Store(models_dir).entries()]
    return out
