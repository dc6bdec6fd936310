"""The daemon over HTTP with the real `openai` SDK (sync and async, streaming and
not) and raw SSE reads, on the real SmolLM2 model. Greedy outputs are checked
against the library's own single-sequence generation on the same tokens."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest
from conftest import SMOLLM2, model_path
from serve_util import Daemon, daemon

import edgelm

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite food is",
    "The quick brown fox",
    "In 1492, Columbus",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "A haiku about the sea:",
    "The square root of 144 is",
    "Dear Sir or Madam, I am writing to",
    "The Raspberry Pi is a",
    "Home automation lets you",
]


@pytest.fixture(scope="module")
def srv() -> Iterator[Daemon]:
    with daemon(model_path(SMOLLM2), "--max-context", "2048", "--kv-cache-mib", "256") as d:
        yield d


@pytest.fixture(scope="module")
def client(srv: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def lib_greedy(m: edgelm.Model, text: str, n: int) -> str:
    # The library decodes with llama.cpp-like kernels, the daemon with its
    # batch-invariant ones; they agree except at near-ties, which these prompts avoid.
    ids = m.tokenize(text, add_special=True, parse_special=True)
    return "".join(t.text for t in m.generate(ids, max_tokens=n, temperature=0))


def test_health_and_models(srv: Daemon, client: openai.OpenAI) -> None:
    status, body = srv.get("/health")
    assert status == 200 and body["status"] == "ok"
    assert body["kernel_level"] == edgelm._native.kernel_level()
    assert body["model"] == "SmolLM2-135M-Instruct.Q4_1"
    models = client.models.list()
    assert [m.id for m in models.data][0] == "SmolLM2-135M-Instruct.Q4_1"  # then the rest of models_dir
    assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1").owned_by == "edgelm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_matches_library_greedy(client: openai.OpenAI, smollm2: edgelm.Model) -> None:
    r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert r.choices[0].text == lib_greedy(smollm2, PROMPTS[0], 20)
    assert r.usage is not None and r.usage.prompt_tokens == len(smollm2.tokenize(PROMPTS[0]))
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw = dict(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_sync_and_stream(client: openai.OpenAI, smollm2: edgelm.Model) -> None:
    msgs = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=msgs, max_tokens=30, temperature=0)  # type: ignore[arg-type]
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and "Paris" in (text or "")
    assert r.choices[0].finish_reason == "stop"  # ended at <|im_end|>, which is not in the text
    assert "<|im_end|>" not in (text or "")
    # The prompt is the model's own chat template, rendered and tokenized.
    rendered = (
        "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n"
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(smollm2.tokenize(rendered, parse_special=True))
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=msgs,
        max_tokens=30,  # type: ignore[call-overload]
        temperature=0,
        stream=True,
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text
    assert parts[-1].choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == r.usage.completion_tokens  # type: ignore[union-attr]
    for t in lp.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    c = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=2
    )
    clp = c.choices[0].logprobs
    assert clp is not None and len(clp.tokens or []) == 5 and "".join(clp.tokens or []) == c.choices[0].text
    assert all(len(d) == 2 for d in clp.top_logprobs or [])


def test_stop_strings_seed_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", prompt="1, 2, 3, 4,", max_tokens=40, temperature=0, stop=[" 7"]
    )
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text and "6" in r.choices[0].text
    kw = dict(
        model="SmolLM2-135M-Instruct.Q4_1", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=1234, n=3
    )
    a = client.completions.create(**kw)  # type: ignore[call-overload]
    b = client.completions.create(**kw)  # type: ignore[call-overload]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # each choice draws with its own seed
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    extra = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0.7,
        extra_body={"top_k": 1, "min_p": 0.0, "repeat_penalty": 1.1},
    )
    assert extra.choices[0].text


async def _async_texts(url: str, prompts: list[str], n: int, stream: bool) -> list[str]:
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(p: str) -> str:
        if not stream:
            r = await c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=p, max_tokens=n, temperature=0)
            return r.choices[0].text
        out = []
        async for ch in await c.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1", prompt=p, max_tokens=n, temperature=0, stream=True
        ):
            out.append(ch.choices[0].text)
        return "".join(out)

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await c.close()


def test_async_non_stream(srv: Daemon, smollm2: edgelm.Model) -> None:
    texts = asyncio.run(_async_texts(srv.url, PROMPTS[:2], 12, stream=False))
    assert texts == [lib_greedy(smollm2, p, 12) for p in PROMPTS[:2]]


def test_sixteen_concurrent_streams_equal_alone(srv: Daemon) -> None:
    n = 32
    alone = [asyncio.run(_async_texts(srv.url, [p], n, stream=True))[0] for p in PROMPTS]
    steps0, toks0 = srv.metric("edgelm_steps_total"), srv.metric("edgelm_generated_tokens_total")
    together = asyncio.run(_async_texts(srv.url, PROMPTS, n, stream=True))
    steps = srv.metric("edgelm_steps_total") - steps0
    toks = srv.metric("edgelm_generated_tokens_total") - toks0
    assert 16 * 8 <= toks <= 16 * n
    assert steps < toks / 4, (steps, toks)  # they really were batched
    for p, a, b in zip(PROMPTS, alone, together):
        assert a == b, f"{p!r}: alone {a!r} vs batched {b!r}"


def test_raw_sse(srv: Daemon) -> None:
    async def go() -> list[bytes]:
        async with aiohttp.ClientSession() as s:
            body = {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 5,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with s.post(srv.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                return [line async for line in r.content]

    lines = asyncio.run(go())
    events = [ln for ln in lines if ln.strip()]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1].strip() == b"data: [DONE]"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" and o["id"] == objs[0]["id"] for o in objs)
    assert objs[-1]["usage"]["completion_tokens"] >= 1 and objs[-1]["choices"] == []


def test_tokenize_detokenize(srv: Daemon, smollm2: edgelm.Model) -> None:
    text = "Hello <|im_start|> wörld 🤖"
    status, body = srv.post("/tokenize", {"content": text})
    assert status == 200 and body["tokens"] == smollm2.tokenize(text, add_special=False, parse_special=True)
    status, back = srv.post("/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["content"] == text
    status, pieces = srv.post("/tokenize", {"content": "Hi there", "with_pieces": True})
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hi there"


def test_prefix_cache_hit_for_shared_system_prompt(srv: Daemon, client: openai.OpenAI) -> None:
    system = "You control a smart home. Devices: " + ", ".join(f"light.room_{i} (on, {i % 100}%)" for i in range(60))
    outs = []
    for cmd in ("Turn on the kitchen light.", "Turn off the bedroom light."):
        r = client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1",
            max_tokens=8,
            temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": cmd}],
        )
        outs.append(r)
    n_prompt = outs[1].usage.prompt_tokens  # type: ignore[union-attr]
    cached = outs[1].usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert n_prompt > 400 and cached >= n_prompt - 32, (n_prompt, cached)
    # The cached answer is the one a cold cache gives.
    again = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        max_tokens=8,
        temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Turn off the bedroom light."}],
    )
    assert again.choices[0].message.content == outs[1].choices[0].message.content
    assert srv.metric("edgelm_prompt_tokens_cached_total") >= cached


def test_bad_input_is_4xx_with_openai_error(srv: Daemon, client: openai.OpenAI) -> None:
    cases = [
        ("/v1/completions", None, b"{not json", 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, None, 400),
        ("/v1/completions", {"prompt": "x", "temperature": 5}, None, 400),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, None, 400),
        ("/v1/completions", {"prompt": []}, None, 400),
        ("/v1/completions", {"prompt": [10**9]}, None, 400),
        ("/v1/completions", {"prompt": "x", "n": 0}, None, 400),
        ("/v1/completions", {"prompt": "x", "stop": 5}, None, 400),
        ("/v1/completions", {"prompt": "x", "model": "nope"}, None, 404),
        ("/v1/completions", [1, 2], None, 400),
        ("/v1/chat/completions", {"messages": []}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "seed": 2**70}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}, None, 400),
        ("/tokenize", {"content": 5}, None, 400),
        ("/detokenize", {"tokens": [-1]}, None, 400),
        ("/detokenize", {"tokens": "abc"}, None, 400),
        ("/v1/nothing", {}, None, 404),
    ]
    for path, body, raw, want in cases:
        status, resp = srv.post(path, body, raw)
        assert status == want, (path, body, raw, status, resp)
        assert isinstance(resp, dict) and resp["error"]["message"], (path, resp)
    # Too long for the context (2048 here): 400 context_length_exceeded.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=[1] * 3000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    status, resp = srv.post("/v1/completions", None, b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
    assert status == 413 and "error" in resp
    status, _ = srv.get("/health")
    assert status == 200  # still alive


def test_disconnect_aborts_and_frees_blocks(srv: Daemon) -> None:
    body = json.dumps(
        {"prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    ).encode()
    s = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    got = b""
    while got.count(b"data: ") < 5:
        chunk = s.recv(65536)
        assert chunk, got  # the server closed the connection
        got += chunk
    _, h = srv.get("/health")
    assert h["running"] == 1 and h["kv_blocks_used"] > 0
    s.close()
    deadline = time.monotonic() + 10
    while True:
        _, h = srv.get("/health")
        if h["running"] == 0 and h["kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert srv.metric('edgelm_sequences_finished_total{reason="abort"}') >= 1


def test_request_timeout_finish_reason(client: openai.OpenAI) -> None:
    t0 = time.monotonic()
    r = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        prompt="Count to a million:",
        max_tokens=1500,
        extra_body={"ignore_eos": True, "timeout": 0.5},
    )
    assert r.choices[0].finish_reason == "timeout"
    assert time.monotonic() - t0 < 5
    assert 0 < r.usage.completion_tokens < 1500  # type: ignore[union-attr]


def test_metrics_exposition(srv: Daemon) -> None:
    status, text = srv.get("/metrics")
    assert status == 200
    for name in (
        "edgelm_requests_total",
        "edgelm_queue_length",
        "edgelm_running_sequences",
        "edgelm_prompt_tokens_total",
        "edgelm_generated_tokens_total",
        "edgelm_time_to_first_token_seconds_bucket",
        "edgelm_time_per_output_token_seconds_bucket",
        "edgelm_kv_blocks_used",
        "edgelm_kv_blocks_cached",
    ):
        assert name in text, name
