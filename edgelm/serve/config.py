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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_keep_alive(v: Any, what: str = "keep_alive") -> float | None:
    """Seconds from an Ollama keep_alive ("5m", "1h30m", "300ms", 300, "0", -1);
    None = forever. Raises ValueError with a message naming `what`."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"'{what}' must be a duration such as \"5m\" or a number of seconds")
    if isinstance(v, (int, float)):
        return None if v < 0 else float(v)
    s = str(v).strip()
    try:
        x = float(s)
        return None if x < 0 else x
    except ValueError:
        pass
    if s.startswith("-"):
        return None
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"'{what}' must be a duration such as \"5m\", \"1h30m\" or a number of seconds, got {v!r}")
    return total


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
        if self.kernel_level is not None and self.kernel_level not in ("scalar", "avx2", "avx512", "neon", "dotprod", "i8mm"):
            raise bad("kernel_level", "must be scalar, avx2, avx512, neon, dotprod or i8mm")
        if not self.model:
            raise bad("model", "must not be empty")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise bad("device", f"{self.device!r}: expected auto, cpu, cuda or cuda:N")
        for key in ("api_key", "admin_key"):
            v = getattr(self, key)
            if v is not None and (len(v) < 8 or any(c.isspace() for c in v)):
                raise bad(key, "must be at least 8 characters without spaces")

    def step_limits(self, device: str) -> tuple[int, int]:
        """(max_running, max_step_tokens) for models on `device` ("cpu", "cuda:N"): the
        configured values, else the device's defaults. A GPU step costs about the same
        for 1 or 64 sequences, so it takes bigger batches; the scheduler is the same."""
        gpu = device.startswith("cuda")
        running = self.max_running or (64 if gpu else 16)
        step = self.max_step_tokens or max(2048 if gpu else 512, running)
        if step < running:
            where = "set" if self.max_running else f"the default on {'a GPU' if gpu else 'the CPU'}"
            raise ConfigError(f"config key 'max_step_tokens': {step} must be at least max_running ({running}, {where}); "
                              "raise max_step_tokens or lower max_running")
        return running, step

    def model_path(self) -> Path:
        p = Path(self.model).expanduser()
        if p.is_absolute() or p.parent != Path("."):
            return p
        return Path(self.models_dir).expanduser() / p

    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
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
