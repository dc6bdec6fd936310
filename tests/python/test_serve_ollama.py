"""The Ollama-compatible API with the real `ollama` client (sync and AsyncClient,
streaming and not) against the real daemon on SmolLM2. Greedy chat output is
cross-checked against the OpenAI endpoint on the same messages (same template, same
tokens, same executor)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import ollama
import openai
import pytest
from conftest import SMOLLM2, model_path
from serve_util import Daemon, daemon

NAME = "SmolLM2-135M-Instruct.Q4_1:latest"
GREEDY = {"temperature": 0, "num_predict": 24, "repeat_penalty": 1.0}  # Ollama defaults to 1.1


@pytest.fixture(scope="module")
def srv() -> Iterator[Daemon]:
    with daemon(model_path(SMOLLM2), "--max-context", "2048", "--kv-cache-mib", "128") as d:
        yield d


def test_root_version_tags_ps_show(srv: Daemon) -> None:
    with urllib.request.urlopen(srv.url + "/", timeout=10) as r:
        assert r.read() == b"Ollama is running"
    c = ollama.Client(host=srv.url)
    tags = c.list()
    assert [m.model for m in tags.models][0] == NAME  # the configured model first, then models_dir
    m = tags.models[0]
    assert m.size == model_path(SMOLLM2).stat().st_size and m.details is not None and m.details.format == "gguf"
    assert m.details.family == "llama"
    ps = c.ps()
    assert [p.model for p in ps.models] == [NAME] and ps.models[0].context_length == 2048
    info = c.show(NAME)
    assert info.modelinfo is not None and info.modelinfo["general.architecture"] == "llama"
    assert info.template is not None and "<|im_start|>" in info.template
    assert info.capabilities is not None and "completion" in info.capabilities
    status, v = srv.get("/api/version")
    assert status == 200 and v["version"].count(".") == 2


def test_chat_matches_openai_endpoint(srv: Daemon) -> None:
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    c = ollama.Client(host=srv.url)
    r = c.chat(model=NAME, messages=msgs, options=GREEDY, stream=False)
    assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant"
    assert "Paris" in (r.message.content or "")
    o = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused").chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=msgs, max_tokens=24, temperature=0
    )  # type: ignore[arg-type]
    assert r.message.content == o.choices[0].message.content
    assert r.prompt_eval_count == o.usage.prompt_tokens  # type: ignore[union-attr]
    assert r.eval_count is not None and r.eval_count >= 1 and r.total_duration and r.eval_duration is not None


def test_chat_stream_ndjson(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    msgs = [{"role": "user", "content": "Count from one to five."}]
    whole = c.chat(model=NAME, messages=msgs, options=GREEDY, stream=False)
    parts = list(c.chat(model=NAME, messages=msgs, options=GREEDY, stream=True))
    assert all(p.message is not None for p in parts)  # a message on every line, the final one too
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason
    # Raw NDJSON: one JSON object per line.
    req = urllib.request.Request(
        srv.url + "/api/chat", data=json.dumps({"model": NAME, "messages": msgs, "options": GREEDY}).encode()
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = r.read().decode().splitlines()
    objs = [json.loads(ln) for ln in lines]
    assert objs[-1]["done"] is True and all("message" in o for o in objs)


def test_generate_options_and_context(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    r = c.generate(
        model=NAME,
        prompt="Once upon a time, in a land far away,",
        raw=True,
        options={"temperature": 0, "num_predict": 5},
        stream=False,
    )
    assert r.done and r.eval_count == 5 and r.done_reason == "length"
    assert r.context is not None and len(r.context) == r.prompt_eval_count + 5  # type: ignore[operator]
    more = c.generate(
        model=NAME, prompt=" Then", raw=True, context=r.context, options={"temperature": 0, "num_predict": 3}
    )
    assert more.done and more.context is not None and list(more.context[: len(r.context)]) == list(r.context)
    raw = c.generate(
        model=NAME, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 6}
    )
    assert "Paris" in (raw.response or "")
    stops = c.generate(
        model=NAME, prompt="1, 2, 3, 4,", raw=True, options={"temperature": 0, "num_predict": 40, "stop": [" 7"]}
    )
    assert stops.done_reason == "stop" and " 7" not in (stops.response or "")
    seeded = [
        c.generate(
            model=NAME, prompt="Tell me a joke.", options={"temperature": 1.0, "seed": 7, "num_predict": 12}
        ).response
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    load = c.generate(model=NAME, prompt="", keep_alive="5m")
    assert load.done and load.done_reason == "load"


def test_async_client_stream(srv: Daemon) -> None:
    async def go() -> tuple[str, str]:
        c = ollama.AsyncClient(host=srv.url)
        text = ""
        async for part in await c.generate(model=NAME, prompt="Name a color.", options=GREEDY, stream=True):
            text += part.response or ""
        whole = await c.generate(model=NAME, prompt="Name a color.", options=GREEDY)
        return text, whole.response or ""

    a, b = asyncio.run(go())
    assert a == b and a


def test_bad_input_is_4xx_with_ollama_error(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "not found" in e.value.error
    cases = [
        ("/api/chat", {"model": NAME, "messages": "hi"}, 400),
        ("/api/chat", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        (
            "/api/chat",
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}},
            400,
        ),
        ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "options": []}, 400),
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, 400),
        ("/api/generate", {"model": NAME, "prompt": 5}, 400),
        ("/api/generate", {"model": NAME, "prompt": "x", "context": ["a"]}, 400),
        ("/api/generate", {"model": NAME, "prompt": "x", "format": 5}, 400),
        ("/api/generate", {"model": NAME, "prompt": "x", "options": {"num_ctx": 4}}, 400),
        ("/api/show", {"model": "nope"}, 404),
        ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "think": True}, 400),
        ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "keep_alive": [1]}, 400),
        ("/api/embed", {"model": NAME, "input": "x"}, 400),
        ("/api/show", [], 400),
    ]
    for path, body, want in cases:
        status, resp = srv.post(path, body)
        assert status == want, (path, body, status, resp)
        assert isinstance(resp, dict) and isinstance(resp["error"], str) and resp["error"], resp
    status, resp = srv.post("/api/chat", None, b"{broken")
    assert status == 400 and isinstance(resp["error"], str)
    status, _ = srv.get("/health")
    assert status == 200
