"""Prompt reuse on the real daemon and model (SmolLM2), driven by the real clients as
Home Assistant drives it: turns with a new time line reuse the cached prompt past it
(the metrics count reused and computed tokens), a request or a model configured
without reuse gets exactly what a fresh daemon computes, and `move_time_line` makes
the prefix cache cover the prompt instead."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ollama
import openai
from conftest import GEMMA3, SMOLLM2, model_path
from ha_util import SAVED_KEEP_ALIVE, SAVED_OPTIONS, TOOLS, system_prompt
from serve_util import Daemon, daemon


def model_id(d: Daemon) -> str:
    _, body = d.get("/v1/models")
    return str(body["data"][0]["id"])


def turn(time: str, history: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": system_prompt(time, n_entities=30)},
        *history,
        {"role": "user", "content": command},
    ]


def counters(d: Daemon) -> tuple[float, float, float]:
    return (
        d.metric("edgelm_prompt_tokens_reused_total"),
        d.metric("edgelm_prompt_tokens_computed_total"),
        d.metric("edgelm_prompt_tokens_cached_total"),
    )


def greedy(d: Daemon, msgs: list[dict[str, Any]], **extra: Any) -> tuple[str, int]:
    c = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
    r = c.chat.completions.create(
        model=model_id(d), messages=msgs, max_tokens=24, temperature=0, extra_body=extra or None
    )
    assert r.usage is not None
    return r.choices[0].message.content or "", r.usage.prompt_tokens


def test_home_assistant_turns_reuse_the_prompt_past_the_time_line() -> None:
    with daemon(model_path(SMOLLM2)) as d:
        client = ollama.Client(host=d.url)
        name = model_id(d)
        first = turn("10:36:44", [], "Turn on the kitchen light")
        r1 = client.chat(
            model=name, messages=first, tools=TOOLS, options=dict(SAVED_OPTIONS), keep_alive=SAVED_KEEP_ALIVE
        )
        reused1, computed1, _ = counters(d)
        assert reused1 == 0 and computed1 == r1["prompt_eval_count"]
        history = [{"role": "user", "content": "Turn on the kitchen light"}, dict(r1["message"])]
        second = turn("10:37:02", history, "And the office plug too")
        r2 = client.chat(
            model=name, messages=second, tools=TOOLS, options=dict(SAVED_OPTIONS), keep_alive=SAVED_KEEP_ALIVE
        )
        assert r2["done"] and (r2["message"].get("content") or r2["message"].get("tool_calls"))
        reused2, computed2, cached2 = counters(d)
        # The previous turn's prompt past the time line was taken over; what was
        # computed is the changed line, the answer and the new command.
        assert r2["prompt_eval_count"] == computed2 - computed1 + reused2  # eval = what was not prefix-cached
        assert reused2 > 0.8 * r2["prompt_eval_count"]
        assert computed2 - computed1 < 200
        # Ollama's options carry edgelm's switch; off, nothing is reused.
        third = turn("10:37:30", history, "And the office plug too")
        client.chat(model=name, messages=third, options={**SAVED_OPTIONS, "prompt_reuse": False})
        assert counters(d)[0] == reused2
        assert counters(d)[2] >= cached2


def test_without_reuse_a_request_gets_what_a_fresh_daemon_computes() -> None:
    msgs_a = turn("10:36:44", [], "Is the door lock locked?")
    msgs_b = turn("10:41:09", [], "Is the door lock locked?")
    with daemon(model_path(SMOLLM2)) as fresh:
        want, _ = greedy(fresh, msgs_b)
    with daemon(model_path(SMOLLM2)) as d:
        greedy(d, msgs_a)
        got_reuse, n = greedy(d, msgs_b)  # reuses msgs_a's prompt
        assert d.metric("edgelm_prompt_tokens_reused_total") > 0.8 * n
        exact, _ = greedy(d, msgs_b, prompt_reuse=False)  # never served the reused blocks
        assert exact == want
    # The model's setting: reuse off for it (prompt_reuse_except names it).
    with daemon(model_path(SMOLLM2), config=f"prompt_reuse_except: [{SMOLLM2.removesuffix('.gguf')}]\n") as d:
        greedy(d, msgs_a)
        assert greedy(d, msgs_b)[0] == want
        assert d.metric("edgelm_prompt_tokens_reused_total") == 0
        greedy(d, turn("10:52:13", [], "Is the door lock locked?"), prompt_reuse=True)  # a request may ask for it
        assert d.metric("edgelm_prompt_tokens_reused_total") > 0
    assert got_reuse  # an answer, approximately the same (benches/results/reuse_quality.md)


def test_move_time_line_lets_the_prefix_cache_cover_the_prompt() -> None:
    with daemon(model_path(SMOLLM2), config="move_time_line: true\nprompt_reuse: false\n") as d:
        greedy(d, turn("10:36:44", [], "Turn on the kitchen light"))
        c = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(
            model=model_id(d), messages=turn("10:37:02", [], "Turn on the kitchen light"), max_tokens=4, temperature=0
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        assert cached > 0.9 * r.usage.prompt_tokens
        assert d.metric("edgelm_prompt_tokens_reused_total") == 0


def test_reuse_never_crosses_models() -> None:
    """Each model's scheduler keeps its own sources: a prompt one model has cached is
    not taken over by another, which computes it, then reuses only what it cached."""

    def complete(d: Daemon, model: str, time: str) -> None:
        c = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
        c.completions.create(model=model, prompt=system_prompt(time, n_entities=20) + "\nUser: hi\n", max_tokens=2)

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        for name in (SMOLLM2, GEMMA3):
            (models / name).symlink_to(model_path(name))
        with daemon(model_path(SMOLLM2), config=f"models_dir: {models}\n") as d:
            smol, gemma = SMOLLM2.removesuffix(".gguf"), GEMMA3.removesuffix(".gguf")
            complete(d, smol, "10:36:44")
            complete(d, smol, "10:37:02")
            assert d.metric(f'edgelm_prompt_tokens_reused_total{{model="{smol}"}}') > 0
            complete(d, gemma, "10:37:30")
            assert d.metric(f'edgelm_prompt_tokens_reused_total{{model="{gemma}"}}') == 0
            complete(d, gemma, "10:38:11")
            assert d.metric(f'edgelm_prompt_tokens_reused_total{{model="{gemma}"}}') > 0
