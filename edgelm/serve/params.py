"""Request-body validation shared by the API front ends: every check names the
parameter it refuses, and becomes a 4xx with an OpenAI-style error body."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from edgelm.serve.app import Server

SERVER: web.AppKey[Server] = web.AppKey("server")
"""Where the aiohttp application keeps its `Server`."""


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _name(t: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


class Body:
    """Typed access to a JSON object; records which keys were read."""

    def __init__(self, data: Any, what: str = "request body") -> None:
        if not isinstance(data, dict):
            raise ApiError(f"the {what} must be a JSON object")
        self.data: dict[str, Any] = data

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, t: type | tuple[type, ...], default: Any = None, *, lo: float | None = None,
            hi: float | None = None, lo_open: bool = False) -> Any:
        v = self.data.get(key)
        if v is None:
            return default
        ts = t if isinstance(t, tuple) else (t,)
        ok = isinstance(v, ts) and not (isinstance(v, bool) and bool not in ts)
        if not ok and float in ts and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ApiError(f"'{key}' must be {_name(t)}, got {type(v).__name__}", key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ApiError(f"'{key}' must be a finite number", key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise ApiError(f"'{key}' must be {'greater than' if lo_open else 'at least'} {lo}, got {v}", key)
            if hi is not None and v > hi:
                raise ApiError(f"'{key}' must be at most {hi}, got {v}", key)
        return v

    def stop(self, key: str = "stop", max_n: int = 16) -> list[str]:
        v = self.data.get(key)
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ApiError(f"'{key}' must be a string or an array of strings", key)
        if len(v) > max_n:
            raise ApiError(f"'{key}' has {len(v)} entries; at most {max_n}", key)
        return [s for s in v if s]


def sampling_from(b: Body, *, temperature_default: float = 1.0) -> dict[str, Any]:
    """The sampling parameters the OpenAI and llama.cpp-style APIs share."""
    seed = b.get("seed", int)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError("'seed' must fit in 64 bits", "seed")
    return {
        "temperature": float(b.get("temperature", float, temperature_default, lo=0.0, hi=2.0)),
        # Open-ended lower bounds: a positive value too small for f32 means "as small as can be".
        "top_p": max(float(b.get("top_p", float, 1.0, lo=0.0, hi=1.0, lo_open=True)), 1e-6),
        "top_k": int(b.get("top_k", int, 40, lo=0, hi=1 << 20)),
        "min_p": float(b.get("min_p", float, 0.05, lo=0.0, hi=1.0)),
        "repeat_penalty": max(float(b.get("repeat_penalty", float, 1.0, lo=0.0, hi=10.0, lo_open=True)), 1e-6),
        "repeat_last_n": int(b.get("repeat_last_n", int, 64, lo=-1, hi=1 << 20)),
        "presence_penalty": float(b.get("presence_penalty", float, 0.0, lo=-2.0, hi=2.0)),
        "frequency_penalty": float(b.get("frequency_penalty", float, 0.0, lo=-2.0, hi=2.0)),
        "seed": None if seed is None else seed % (2**64),
    }
