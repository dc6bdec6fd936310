"""Request-body validation shared by the API front ends: every check names the
parameter it refuses, and becomes a 4xx with an OpenAI-style error body.

Bodies are untrusted: `parse_json` refuses, with a 400 that names the field, what the
rest of the server cannot take — nesting deeper than MAX_DEPTH (Python's parser would
raise RecursionError near 1,000; schemas that deep make grammar compilers recurse), text
that is not valid Unicode (a lone surrogate such as "\ud800" cannot be encoded to
UTF-8 for the tokenizer), integers outside 64 bits, NaN and infinities.

Integers: JSON has one number type, and clients that keep settings as floats (Home
Assistant saves `num_ctx` as 8192.0) send whole numbers with a fraction part. As
Ollama does, a whole-number float is taken wherever an integer is; a fractional one
stays an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from edgelm.errors import BadRequest, Busy, NoMemory, NotFound, RequestError


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @staticmethod
    def of(e: RequestError) -> ApiError:
        """The HTTP answer to an engine's error (see edgelm.errors): the one place its
        status is chosen."""
        headers = {"Retry-After": f"{e.retry_after_s:.0f}"} if e.retry_after_s is not None else {}
        if isinstance(e, NotFound):
            return ApiError(e.message, e.param, 404, e.code, headers=headers)
        if isinstance(e, Busy):
            return ApiError(f"server busy: {e.message}", e.param, 429, e.code, "rate_limit_error", headers)
        if isinstance(e, NoMemory):
            return ApiError(e.message, e.param, 503, e.code, "server_error", headers)
        assert isinstance(e, BadRequest), e
        return ApiError(e.message, e.param, 400, e.code, headers=headers)


MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (JSON schemas that
Pydantic writes for real tools stay under 20)."""

INT_MIN, INT_MAX = -(2**63), 2**64 - 1


def _path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "the request body"


class _NotANumber:
    """What json.loads gives for NaN/Infinity (which JSON does not have); check_value
    refuses it, naming the field."""

    def __init__(self, text: str) -> None:
        self.text = text


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, within the limits above, or ApiError (400)."""
    try:
        data = json.loads(raw, parse_constant=_NotANumber)
    except RecursionError:
        where = _find(raw, deep=True)
        raise ApiError(
            f"'{_short(where)}' nests arrays or objects more than {MAX_DEPTH} levels deep", _path(where[:1])
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    except ValueError:  # Python refuses integers of more than 4,300 digits
        where = _find(raw, deep=False)
        raise ApiError(f"'{_short(where)}' is an integer outside 64 bits", _short(where)) from None
    check_value(data)
    return data


def _find(raw: bytes, deep: bool) -> list[str | int]:
    """Where in a body that json.loads refused the trouble is (only on that error
    path): the first container nested past MAX_DEPTH (`deep`), else the first number of
    more than 20 digits. A small JSON scanner that follows keys and array indices."""
    text = raw.decode("utf-8", errors="replace")
    stack: list[list[Any]] = []  # per open container: [kind, current key or index]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if stack and stack[-1][0] == "{" and text[j + 1 : j + 64].lstrip().startswith(":"):
                stack[-1][1] = text[i + 1 : j]
            i = j + 1
            continue
        if c in "{[":
            stack.append([c, None if c == "{" else 0])
            if deep and len(stack) > MAX_DEPTH:
                return [f[1] for f in stack[:-1] if f[1] is not None]
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == "," and stack and stack[-1][0] == "[":
            stack[-1][1] += 1
        elif c.isdigit() or c == "-":
            j = i + 1
            while j < n and text[j].isdigit():
                j += 1
            if not deep and j - i > 20:
                return [f[1] for f in stack if f[1] is not None]
            i = j
            continue
        i += 1
    return []


def _short(path: list[str | int]) -> str:
    return _path(path[:4]) + ("…" if len(path) > 4 else "")


def check_value(data: Any, where: list[str | int] | None = None) -> None:
    """Walk a parsed JSON value (iteratively: depth is what is being checked) and
    refuse what parse_json's docstring lists, naming the field."""
    stack: list[tuple[Any, list[str | int]]] = [(data, list(where or []))]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                raise ApiError(f"'{_path(path)}' is an integer outside 64 bits", _path(path))
        elif isinstance(v, float):
            if not math.isfinite(v):  # 1e999 parses as infinity
                raise ApiError(f"'{_path(path)}' must be a finite number", _path(path))
        elif isinstance(v, _NotANumber):
            raise ApiError(f"'{_path(path)}' is {v.text}, which is not a JSON number", _path(path))
        elif isinstance(v, (dict, list)):
            if len(path) >= MAX_DEPTH:
                raise ApiError(
                    f"'{_short(path)}' nests arrays or objects more than {MAX_DEPTH} levels deep", _path(path[:1])
                )
            if isinstance(v, dict):
                for k, x in v.items():
                    _check_text(k, path)
                    stack.append((x, path + [k]))
            else:
                stack.extend((x, path + [i]) for i, x in enumerate(v))


def _check_text(s: str, path: list[str | int]) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            f"'{_path(path)}' holds a lone UTF-16 surrogate ({s[e.start]!r} at {e.start}), which is not "
            "text; send valid Unicode",
            _path(path),
        ) from None


def as_int(v: Any, key: str) -> int:
    """An integer from a JSON number: ints, and whole-number floats (8192.0)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"'{key}' must be an integer, got {type(v).__name__}", key)
    if isinstance(v, float):
        if not v.is_integer():
            raise ApiError(f"'{key}' must be a whole number, got {v}", key)
        return int(v)
    return int(v)


def int_list(v: Any, key: str) -> list[int]:
    """An array of integers (token ids), whole-number floats accepted."""
    if not isinstance(v, list):
        raise ApiError(f"'{key}' must be an array of integers", key)
    return [as_int(x, f"{key}[{i}]") for i, x in enumerate(v)]


def _name(t: type | tuple[type, ...]) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


class Body:
    """Typed access to a JSON object. `prefix` names where it sits in the request
    ("options."), so errors name the field as the client wrote it."""

    def __init__(self, data: Any, what: str = "request body", prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise ApiError(f"the {what} must be a JSON object", prefix.rstrip(".") or None)
        self.data: dict[str, Any] = data
        self.prefix = prefix

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(
        self,
        key: str,
        t: type | tuple[type, ...],
        default: Any = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> Any:
        v = self.data.get(key)
        if v is None:
            return default
        name = self.prefix + key
        ts = t if isinstance(t, tuple) else (t,)
        ok = isinstance(v, ts) and not (isinstance(v, bool) and bool not in ts)
        if not ok and float in ts and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok and int in ts and float not in ts and isinstance(v, float):
            v = as_int(v, name)  # 8192.0 is 8192; 8192.5 is an error
            ok = True
        if not ok:
            raise ApiError(f"'{name}' must be {_name(t)}, got {type(v).__name__}", name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ApiError(f"'{name}' must be a finite number", name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise ApiError(f"'{name}' must be {'greater than' if lo_open else 'at least'} {lo}, got {v}", name)
            if hi is not None and v > hi:
                raise ApiError(f"'{name}' must be at most {hi}, got {v}", name)
        return v

    def stop(self, key: str = "stop", max_n: int = 16) -> list[str]:
        v = self.data.get(key)
        name = self.prefix + key
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ApiError(f"'{name}' must be a string or an array of strings", name)
        if len(v) > max_n:
            raise ApiError(f"'{name}' has {len(v)} entries; at most {max_n}", name)
        return [s for s in v if s]
