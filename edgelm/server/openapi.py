"""The daemon's own OpenAPI description (served at /openapi.json; schemathesis tests
the daemon against it)."""

from __future__ import annotations

from typing import Any

from edgelm import __version__


def _num(
    lo: float | None = None, hi: float | None = None, integer: bool = False, excl_lo: bool = False
) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer" if integer else "number"}
    if lo is not None:
        s["exclusiveMinimum" if excl_lo else "minimum"] = lo
    if hi is not None:
        s["maximum"] = hi
    return s


_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}

_SAMPLING: dict[str, Any] = {
    "model": {"type": "string"},
    "n": _num(1, 16, True),
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "temperature": _num(0, 2),
    "top_p": _num(0, 1, excl_lo=True),
    "top_k": _num(0, 1 << 20, True),
    "min_p": _num(0, 1),
    "repeat_penalty": _num(0, 10, excl_lo=True),
    "repeat_last_n": _num(-1, 1 << 20, True),
    "presence_penalty": _num(-2, 2),
    "frequency_penalty": _num(-2, 2),
    "seed": _num(-(2**63), 2**64 - 1, True),
    "stop": _STOP,
    "ignore_eos": {"type": "boolean"},
    "prompt_reuse": {"type": "boolean"},
    "timeout": _num(0, None, excl_lo=True),
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _ok(schema: dict[str, Any], sse: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if sse:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"200": {"description": "ok", "content": content}}


def _post(summary: str, body: dict[str, Any], ok: dict[str, Any], sse: bool = False) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {**_ok(ok, sse), **_errors(400, 404, 413, 429, 503)},
        }
    }


def openapi_spec(model_ids: list[str] | None = None) -> dict[str, Any]:
    model = {"type": "string", "enum": model_ids} if model_ids else {"type": "string"}
    completion_body = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            **_SAMPLING,
            "model": model,
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 16},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 16,
                        "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                    },
                ]
            },
            "max_tokens": _num(0, None, True),
            "logprobs": _num(0, 20, True),
            "echo": {"type": "boolean"},
        },
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        },
                    },
                ]
            },
            "name": {"type": "string"},
        },
    }
    chat_body = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            **_SAMPLING,
            "model": model,
            "messages": {"type": "array", "items": message, "minItems": 1},
            "max_tokens": _num(1, None, True),
            "max_completion_tokens": _num(1, None, True),
            "logprobs": {"type": "boolean"},
            "top_logprobs": _num(0, 20, True),
            "response_format": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["text", "json_object", "json_schema"]},
                    "json_schema": {"type": "object"},
                },
            },
        },
    }
    choice = {"type": "object", "required": ["index", "finish_reason"]}
    completion = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"choices": {"type": "array", "items": choice}, "usage": _USAGE},
    }
    paths: dict[str, Any] = {
        "/v1/completions": _post("Text completion", completion_body, completion, sse=True),
        "/v1/chat/completions": _post("Chat completion", chat_body, completion, sse=True),
        "/tokenize": _post(
            "Text to token ids",
            {
                "type": "object",
                "required": ["content"],
                "properties": {
                    "content": {"type": "string"},
                    "add_special": {"type": "boolean"},
                    "parse_special": {"type": "boolean"},
                    "with_pieces": {"type": "boolean"},
                },
            },
            {"type": "object", "required": ["tokens"], "properties": {"tokens": {"type": "array"}}},
        ),
        "/detokenize": _post(
            "Token ids to text",
            {
                "type": "object",
                "required": ["tokens"],
                "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}},
            },
            {"type": "object", "required": ["content"], "properties": {"content": {"type": "string"}}},
        ),
        "/v1/embeddings": _post(
            "Embeddings (normalized; base64 is little-endian float32)",
            {
                "type": "object",
                "required": ["input"],
                "properties": {
                    "model": model,
                    "encoding_format": {"enum": ["float", "base64"]},
                    "dimensions": _num(1, None, True),
                    "truncate": {"type": "boolean"},
                    "input": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}, "minItems": 1},
                            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                            {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                            },
                        ]
                    },
                },
            },
            {
                "type": "object",
                "required": ["object", "data", "model", "usage"],
                "properties": {
                    "data": {"type": "array", "items": {"type": "object", "required": ["index", "embedding"]}}
                },
            },
        ),
        "/v1/models": {
            "get": {
                "summary": "Models served",
                "responses": _ok(
                    {"type": "object", "required": ["object", "data"], "properties": {"data": {"type": "array"}}}
                ),
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": model}],
                "responses": {**_ok({"type": "object", "required": ["id", "object"]}), **_errors(404)},
            }
        },
        "/health": {
            "get": {
                "summary": "Liveness and readiness",
                "responses": {
                    "200": {
                        "description": "ready",
                        "content": {"application/json": {"schema": {"type": "object", "required": ["status"]}}},
                    },
                    "503": {
                        "description": "loading or stopping",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgelm",
            "version": __version__,
            "description": "OpenAI-compatible API of the edgelm daemon",
        },
        "paths": paths,
    }
