"""The daemon's configuration: one typed object, validated at load.

Sources, lowest precedence first: defaults, a YAML file, environment variables
(`EDGELM_<KEY>`, e.g. `EDGELM_PORT=8081`), command-line flags. The YAML file is
`--config PATH`, else `$EDGELM_CONFIG`, else the first that exists of
`./edgelm.yaml`, `~/.config/edgelm/edgelm.yaml`, `/etc/edgelm/edgelm.yaml`.
Unknown keys and bad values are errors that name the key and where it came from.

    model: ~/models/SmolLM2-135M-Instruct.Q4_1.gguf   # path, or a file name in models_dir
    host: 127.0.0.1
    port: 8080
    threads: 2
    max_running: 16
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEARCH_PATH = (Path("edgelm.yaml"), Path("~/.config/edgelm/edgelm.yaml"), Path("/etc/edgelm/edgelm.yaml"))


class ConfigError(ValueError):
    pass


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_KEEP_ALIVE_S = (2**63 - 1) / 1e9
"""Go's longest time.Duration (about 292 years): Ollama refuses anything longer."""


def parse_keep_alive(v: Any, what: str = "keep_alive") -> float | None:
    """Seconds from an Ollama keep_alive, None = forever. As Ollama's api/types.go reads
    it: a number of seconds, or a Go duration string ("5m", "1h30m", "300ms", "-1.0s",
    which is what Home Assistant sends); negative means forever. A plain number in a
    string ("300") is seconds too. NaN, infinities and durations past Go's limit are
    errors. Raises ValueError with a message naming `what`."""
    usage = f'\'{what}\' must be a duration such as "5m", "1h30m", a number of seconds, or -1 (forever)'
    if isinstance(v, bool) or v is None:
        raise ValueError(usage)
    if isinstance(v, (int, float)):
        seconds = float(v)
    elif isinstance(v, str):
        s = v.strip()
        if _NUMBER.fullmatch(s):
            seconds = float(s)
        else:
            sign = -1.0 if s[:1] == "-" else 1.0
            body = s[1:] if s[:1] in "+-" else s
            pos, total = 0, 0.0
            for m in _DURATION.finditer(body):
                if m.start() != pos:
                    break
                total += float(m.group(1)) * _UNIT_S[m.group(2)]
                pos = m.end()
            if not body or pos != len(body):
                raise ValueError(f"{usage}, got {v!r}")
            seconds = sign * total
    else:
        raise ValueError(usage)
    if not math.isfinite(seconds):
        raise ValueError(f"{usage}, got {v!r}")
    if seconds < 0:
        return None
    if seconds > MAX_KEEP_ALIVE_S:
        raise ValueError(
            f"'{what}' is {v!r}: longer than the longest duration (about 292 years); use -1 to keep "
            "the model loaded for good"
        )
    return seconds


def default_models_dir() -> str:
    return os.environ.get("EDGELM_MODELS_DIR", str(Path.home() / ".cache/edgelm/models"))


@dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL
    """GGUF path, or a file name inside models_dir."""
    models_dir: str = dataclasses.field(default_factory=default_models_dir)
    served_model_name: str | None = None
    """The id clients use (default: the file name without .gguf)."""
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int | None = None
    """Compute threads (default: physical cores)."""
    kernel_level: str | None = None
    device: str = "auto"
    """Where models run: auto (GPU 0 if usable, else the CPU), cpu, cuda, cuda:N."""
    kv_cache_mib: int | None = None
    """KV cache per model (default: a quarter of memory_budget_mib, at most 2 GiB; on a
    discrete GPU, half of its free memory after the weights, at most 32 GiB)."""
    max_context: int | None = None
    """Tokens per sequence (default: the model's training context)."""
    max_running: int | None = None
    """Sequences decoded together (default 16 on the CPU, 64 on a GPU)."""
    max_step_tokens: int | None = None
    """Tokens per step, prompt chunks included (default 512 on the CPU, 2048 on a GPU)."""
    max_queue: int = 256
    prefix_cache: bool = True
    prompt_reuse: bool = True
    """Reuse a cached prompt past an early change (Home Assistant's time line): the
    unchanged runs after it are taken over from the KV cache, not computed; an
    approximation (see DEVELOPERS.md, Prompt reuse). Needs the prefix cache; CPU only.
    A request's `prompt_reuse` (OpenAI body, Ollama `options`) overrides it."""
    move_time_line: bool = False
    """Move a system message's time line ("Current time is 10:36:44. ...", Home
    Assistant's first line) to the end of that message, so the prefix cache covers the
    rest: exact, but the model sees a different prompt (opt-in)."""
    prompt_reuse_except: list[str] = dataclasses.field(default_factory=list)
    """Models (names as served, e.g. "gemma3-base:270m") for which `prompt_reuse` is
    the other way round."""
    memory_budget_mib: int | None = None
    """Memory for all loaded models: weights + KV caches (default: three quarters of
    MemAvailable at start; on a Pi or a Jetson that one pool is all there is)."""
    max_loaded_models: int = 3
    keep_alive: str = "5m"
    """How long a model loaded on demand stays after its last request ("5m", "1h",
    "0" = unload at once, "-1" = forever); the configured `model` stays loaded."""
    max_tool_rounds: int = 1
    """Rounds of tool calls per user turn; after them the model must answer in text
    (small models otherwise call the same tool again and again)."""
    request_timeout_s: float | None = None
    """Default per-request time limit (a request's `timeout` overrides it)."""
    shutdown_grace_s: float = 10.0
    max_body_kib: int = 4096
    log_level: str = "info"
    log_format: str = "text"
    """`text` (journald priority prefixes when stderr is the journal) or `json` (one object a line)."""
    api_key: str | None = None
    """When set, every API request needs `Authorization: Bearer <api_key>` (or the admin key)."""
    admin_key: str | None = None
    """When set, admin endpoints (/metrics, model management) need it; it also grants inference."""
    mdns: bool = True
    """Advertise on the LAN (only on the interfaces that carry `host`)."""
    mdns_name: str | None = None
    """Instance name (default "edgelm on <hostname>")."""
    mdns_ollama: bool = False
    """Also advertise `_ollama._tcp` on the same port."""
    state_dir: str | None = None
    """Where the daemon keeps its stable id (default $STATE_DIRECTORY or ~/.local/state/edgelm)."""
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    """Host names clients may use in the Host header, beside localhost, the bind address,
    this machine's addresses and names and its mDNS name (a defence against DNS
    rebinding); "*" turns the check off (behind a reverse proxy that checks it)."""
    allowed_origins: list[str] = dataclasses.field(default_factory=list)
    """Browser origins allowed to call the API (CORS), e.g. "http://homeassistant.local:8123";
    "*" allows any. Pages on this machine (http://localhost:*, 127.0.0.1, [::1]) always may."""
    allow_url_pull: bool | None = None
    """Whether /api/pull may fetch an arbitrary http(s) URL (catalogue names and edgelm
    daemons on the LAN always may). Default: yes when bound to loopback or when a key is
    set; no for a daemon on the LAN without keys."""
    max_pull_mib: int | None = None
    """Largest model file a pull may download (default: whatever the disk holds)."""
    registry_url: str = "https://registry.ollama.ai"
    """The Ollama registry names are pulled from (`qwen3:0.6b`, `user/model:tag`): a
    mirror, or a test server."""
    hf_url: str = "https://huggingface.co"
    """Hugging Face, for `hf.co/user/repo[:quant]` names (a mirror, or a test server)."""
    max_connections: int | None = None
    """Open HTTP connections (default 1024, or the open-file limit less 64 if lower).
    At the limit the oldest connection that has not sent a whole request is closed; if
    every connection is busy, a new one gets 503."""
    header_timeout_s: float = 10.0
    """Time a new connection has to send its request headers."""
    idle_timeout_s: float = 15.0
    """Time an idle keep-alive connection is kept open."""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key {key!r}: {why}")

        if not 0 <= self.port <= 65535:
            raise bad("port", f"{self.port} is not a TCP port (0-65535)")
        for key in ("max_queue", "max_body_kib", "max_tool_rounds", "max_loaded_models"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        try:
            parse_keep_alive(self.keep_alive)
        except ValueError as e:
            raise bad("keep_alive", str(e)) from None
        for key in ("threads", "kv_cache_mib", "max_context", "memory_budget_mib", "max_running", "max_step_tokens"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise bad(key, "must be at least 1")
        if self.max_step_tokens is not None and self.max_step_tokens < (self.max_running or 1):
            raise bad("max_step_tokens", f"must be at least max_running ({self.max_running})")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise bad("request_timeout_s", "must be positive")
        if self.shutdown_grace_s < 0:
            raise bad("shutdown_grace_s", "must not be negative")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise bad("log_level", "must be debug, info, warning or error")
        if self.log_format not in ("text", "json"):
            raise bad("log_format", "must be text or json")
        if self.kernel_level is not None and self.kernel_level not in (
            "scalar",
            "avx2",
            "avx512",
            "neon",
            "dotprod",
            "i8mm",
        ):
            raise bad("kernel_level", "must be scalar, avx2, avx512, neon, dotprod or i8mm")
        if not self.model:
            raise bad("model", "must not be empty")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise bad("device", f"{self.device!r}: expected auto, cpu, cuda or cuda:N")
        for key in ("api_key", "admin_key"):
            v = getattr(self, key)
            if v is not None and (len(v) < 8 or any(c.isspace() for c in v)):
                raise bad(key, "must be at least 8 characters without spaces")
        for key in ("header_timeout_s", "idle_timeout_s"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be positive")
        for key in ("max_connections", "max_pull_mib"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise bad(key, "must be at least 1")
        for key in ("registry_url", "hf_url"):
            if not re.fullmatch(r"https?://[^/\s]+(/[^\s]*)?", getattr(self, key)):
                raise bad(key, f"{getattr(self, key)!r} is not an http(s) URL")
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
                raise bad(
                    "allowed_origins",
                    f'{origin!r} is not an origin such as "http://homeassistant.local:8123" '
                    '(scheme://host[:port], no path) or "*"',
                )
        for host in self.allowed_hosts:
            if not host or any(c.isspace() or c in "/@" for c in host):
                raise bad("allowed_hosts", f"{host!r} is not a host name or address")

    def redacted(self) -> dict[str, Any]:
        """The configuration as a dict, secrets replaced (for --print-config and logs)."""
        out = dataclasses.asdict(self)
        for key in ("api_key", "admin_key"):
            if out[key] is not None:
                out[key] = "<set, redacted>"
        return out

    @property
    def loopback_only(self) -> bool:
        """Bound to a loopback address: only this machine can connect."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url_pull_allowed(self) -> bool:
        if self.allow_url_pull is not None:
            return self.allow_url_pull
        return self.loopback_only or self.api_key is not None or self.admin_key is not None

    def step_limits(self, device: str) -> tuple[int, int]:
        """(max_running, max_step_tokens) for models on `device` ("cpu", "cuda:N"): the
        configured values, else the device's defaults. A GPU step costs about the same
        for 1 or 64 sequences, so it takes bigger batches; the scheduler is the same."""
        gpu = device.startswith("cuda")
        running = self.max_running or (64 if gpu else 16)
        step = self.max_step_tokens or max(2048 if gpu else 512, running)
        if step < running:
            where = "set" if self.max_running else f"the default on {'a GPU' if gpu else 'the CPU'}"
            raise ConfigError(
                f"config key 'max_step_tokens': {step} must be at least max_running ({running}, {where}); "
                "raise max_step_tokens or lower max_running"
            )
        return running, step

    def _entry(self) -> Any:
        """The store's entry for `model` when it names a pulled model (and no file)."""
        from edgelm import store

        p = Path(self.model).expanduser()
        d = Path(self.models_dir).expanduser()
        if p.is_absolute() or p.is_file() or (p.parent == Path(".") and (d / p).is_file()) or not d.is_dir():
            return None
        e = store.Store(d).lookup(self.model)
        return e if e is not None and e.file is None else None

    def model_path(self) -> Path:
        """The configured model's file: a path, a file in models_dir, or a pulled name's blob."""
        p = Path(self.model).expanduser()
        e = self._entry()
        if e is not None:
            return Path(e.model)
        if p.is_absolute() or p.parent != Path("."):
            return p
        return Path(self.models_dir).expanduser() / p

    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        e = self._entry()
        if e is not None:
            return str(e.name)
        name = Path(self.model).name
        return name[: -len(".gguf")] if name.endswith(".gguf") else name


_FIELDS = {f.name: f for f in fields(Config)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check/convert one value to the field's type; strings (env, flags) are parsed."""
    ty = str(_FIELDS[key].type)
    optional = "None" in ty
    base = ty.replace(" | None", "")

    def fail(why: str) -> ConfigError:
        return ConfigError(f"config key {key!r} (from {source}): {why}")

    if value is None:
        if optional:
            return None
        raise fail("must not be null")
    if base == "list[str]":
        if isinstance(value, str):  # environment and flags: comma-separated
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise fail(f"{value!r} is not a list of strings")
        return value
    if isinstance(value, str) and base != "str":
        s = value.strip()
        if optional and s.lower() in ("", "none", "null"):
            return None
        if base == "bool":
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise fail(f"{value!r} is not a boolean")
        try:
            return int(s) if base == "int" else float(s)
        except ValueError:
            raise fail(f"{value!r} is not {'an integer' if base == 'int' else 'a number'}") from None
    if base == "bool":
        if not isinstance(value, bool):
            raise fail(f"{value!r} is not a boolean")
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{value!r} is not an integer")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"{value!r} is not a number")
        value = float(value)
    elif base == "str":
        if key == "keep_alive" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # YAML `keep_alive: 300` means seconds
        if not isinstance(value, str):
            raise fail(f"{value!r} is not a string")
    return value


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.exists() or p.is_dir():
            raise ConfigError(f"config file {p} does not exist")
        return p
    if env.get("EDGELM_CONFIG"):
        p = Path(env["EDGELM_CONFIG"]).expanduser()
        if not p.exists() or p.is_dir():
            raise ConfigError(f"config file {p} (from EDGELM_CONFIG) does not exist")
        return p
    for p in SEARCH_PATH:
        p = p.expanduser()
        if p.is_file():
            return p
    return None


def load_config(
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Config, Path | None]:
    """Merge defaults < YAML < environment < flags into a validated Config."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = find_config_file(config_file, env)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        for k, v in data.items():
            if k not in _FIELDS:
                raise ConfigError(f"unknown config key {k!r} in {path} (known: {', '.join(sorted(_FIELDS))})")
            values[k] = _coerce(k, v, str(path))
    for k in _FIELDS:
        ev = env.get(f"EDGELM_{k.upper()}")
        if ev is not None:
            values[k] = _coerce(k, ev, f"EDGELM_{k.upper()}")
    for k, v in (flags or {}).items():
        if v is None:
            continue
        if k not in _FIELDS:
            raise ConfigError(f"unknown config key {k!r}")
        values[k] = _coerce(k, v, f"--{k.replace('_', '-')}")
    return Config(**values), path
