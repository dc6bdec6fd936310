"""The sampling settings are one type (Rust's `SamplingParams`, seen from Python), built
from a request by one function per API. Model-free."""

from __future__ import annotations

from typing import Any

import pytest

import edgelm
from edgelm import InvalidRequestError, SamplingParams
from edgelm.server.ollama import from_ollama
from edgelm.server.openai import from_openai
from edgelm.server.params import ApiError, Body


def test_one_type_with_the_engine_defaults() -> None:
    assert edgelm.SamplingParams is edgelm._native.SamplingParams
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (
        pytest.approx(0.8),
        40,
        pytest.approx(0.95),
        pytest.approx(0.05),
    )
    assert (p.repeat_penalty, p.repeat_last_n, p.seed, p.n_logprobs, p.penalize_prompt) == (1.0, 64, None, 0, True)
    assert SamplingParams(repeat_last_n=-1).repeat_last_n == -1  # the whole history


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"n_logprobs": (1 << 18) + 1}, "logprobs"),  # the APIs allow 20, and check that themselves
    ],
)
def test_validated_once_when_built(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kw)
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams().replace(**kw)


def test_replace_changes_only_what_it_is_given() -> None:
    p = SamplingParams(temperature=0.0, seed=7)
    q = p.replace(n_logprobs=3)
    assert (q.temperature, q.seed, q.n_logprobs) == (0.0, 7, 3)
    assert p.n_logprobs == 0 and p == SamplingParams(temperature=0.0, seed=7) and p != q


def test_from_openai() -> None:
    p = from_openai(Body({}))
    assert (p.temperature, p.top_p) == (1.0, 1.0)  # OpenAI's defaults
    assert (p.top_k, p.min_p, p.repeat_penalty) == (40, pytest.approx(0.05), 1.0)  # the engine's
    p = from_openai(Body({"temperature": 0, "top_k": 5, "seed": -1, "presence_penalty": 0.5}))
    assert (p.temperature, p.top_k, p.seed, p.presence_penalty) == (0.0, 5, 2**64 - 1, 0.5)
    with pytest.raises(ApiError) as e:
        from_openai(Body({"temperature": 3}))
    assert e.value.param == "temperature"


def test_from_ollama() -> None:
    p = from_ollama(Body({}, "options", "options."), {})
    assert (p.temperature, p.top_p, p.min_p, p.repeat_penalty) == (
        pytest.approx(0.8),
        pytest.approx(0.9),
        0.0,
        pytest.approx(1.1),
    )  # Ollama's defaults
    # A pulled model's parameters come before Ollama's defaults; the request before both.
    p = from_ollama(Body({"top_k": 20.0, "seed": -1}, "options", "options."), {"temperature": 0.2, "top_k": 3})
    assert (p.temperature, p.top_k, p.seed) == (pytest.approx(0.2), 20, None)
    assert from_ollama(Body({}, "options", "options."), {}, penalize_prompt=False).penalize_prompt is False
    with pytest.raises(ApiError) as e:
        from_ollama(Body({"top_p": 2}, "options", "options."), {})
    assert e.value.param == "options.top_p"
