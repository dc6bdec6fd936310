"""Home Assistant's real request shapes, replayed through the real `ollama` client
(`AsyncClient`, as HA uses it) against the daemon: the model picker (list, pull by the
name HA offers, list again), /api/show, and conversations with the Assist tools and
tool results, with the settings HA sends after its options are saved (num_ctx 8192.0,
keep_alive "-1.0s"), with `tools: []`, with `think: false`; and what keep_alive does
and does not do to the configured model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import ollama
import openai
from conftest import GEMMA3, SMOLLM2, model_path
from ha_util import SAVED_KEEP_ALIVE, SAVED_OPTIONS, TOOLS, system_prompt, tool_result
from serve_util import daemon
from test_pull import http_server, sha256, upstream

PICKED = "smollm2:latest"  # HA's model picker offers Ollama library names with ":latest"


async def chat_turn(client: ollama.AsyncClient, messages: list[dict[str, Any]], **kw: Any) -> tuple[str, list[Any]]:
    """One HA turn: stream the answer, collect text and tool calls as HA's
    _transform_stream does."""
    text, calls = "", []
    stream = await client.chat(
        model=PICKED, messages=messages, stream=True, keep_alive=SAVED_KEEP_ALIVE, options=dict(SAVED_OPTIONS), **kw
    )
    async for part in stream:
        msg = part["message"]
        if msg.get("tool_calls"):
            calls += msg["tool_calls"]
        text += msg.get("content") or ""
    return text, calls


def test_home_assistant_request_shapes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    catalogue = tmp_path / "catalogue.json"
    smol = model_path(SMOLLM2)
    # The configured model is Gemma 3 (it stays loaded); SmolLM2 is what HA picks and pulls.
    with http_server(upstream({SMOLLM2: smol})) as up:
        catalogue.write_text(
            json.dumps(
                {
                    "models": {
                        "SmolLM2-135M-Instruct.Q4_1": {
                            "aliases": ["smollm2", "smollm2:135m"],
                            "file": SMOLLM2,
                            "size": smol.stat().st_size,
                            "sha256": sha256(smol),
                            "capabilities": ["completion", "tools"],
                            "parts": [{"url": f"{up}/good/{SMOLLM2}", "sha256": sha256(smol)}],
                        }
                    }
                }
            )
        )
        with daemon(model_path(GEMMA3), "--models-dir", str(models), env={"EDGELM_CATALOGUE": str(catalogue)}) as d:
            asyncio.run(_conversation(d.url))
            log = d.log()
    assert "Traceback" not in log and " ERROR " not in log


async def _conversation(url: str) -> None:
    client = ollama.AsyncClient(host=url)
    # The model picker: what is there, then the download of a library name.
    listed = {m["model"] for m in (await client.list())["models"]}
    assert PICKED not in listed
    assert (await client.pull(PICKED))["status"] == "success"
    listed = {m["model"] for m in (await client.list())["models"]}
    assert PICKED in listed  # HA's "is it downloaded?" check now passes
    shown = await client.show(PICKED)
    assert "tools" in (shown.capabilities or []) and "im_start" in (shown.template or "")
    # The name works in the OpenAI API too.
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert PICKED in [m.id for m in (await oai.models.list()).data]
    assert not any(
        m["model"] == PICKED or "SmolLM2" in m["model"] for m in (await client.ps())["models"]
    )  # show did not load it

    system = {"role": "system", "content": system_prompt()}
    user = {"role": "user", "content": "Turn on the kitchen light"}
    # A conversation turn with the Assist tools.
    text, calls = await chat_turn(client, [system, user], tools=TOOLS)
    assert text or calls
    for c in calls:
        assert c["function"]["name"] in {t["function"]["name"] for t in TOOLS}
        assert isinstance(c["function"]["arguments"], dict)
    # The tool result goes back (HA's next request); the answer must be text now.
    call = calls[0]["function"] if calls else {"name": "HassTurnOn", "arguments": {"name": "Kitchen Light"}}
    history = [
        system,
        user,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": call["name"], "arguments": dict(call["arguments"])}}],
        },
        {"role": "tool", "content": tool_result(call["name"], dict(call["arguments"]))},
    ]
    text, calls = await chat_turn(client, history, tools=TOOLS)
    assert text.strip() and not calls
    # No exposed tools (HA without an LLM API): `tools: []`; newer HA also sends `think`.
    text, calls = await chat_turn(
        client, [system, {"role": "user", "content": "What is the capital of France?"}], tools=[], think=False
    )
    assert text.strip() and not calls
    # Non-streaming, with options as floats throughout.
    r = await client.chat(
        model=PICKED,
        messages=[user],
        stream=False,
        keep_alive=SAVED_KEEP_ALIVE,
        options={"num_ctx": 8192.0, "num_predict": 8.0, "top_k": 40.0, "seed": 3.0},
    )
    assert r["done"] and r["eval_count"] <= 8
    c = await oai.chat.completions.create(model="smollm2", messages=[user], max_tokens=8.0)  # type: ignore[arg-type]
    assert c.choices[0].message.content

    # keep_alive "-1.0s": loaded for good. The configured model stays loaded whatever a
    # request's keep_alive says; only the admin's explicit unload takes a model out.
    ps = {m["model"]: m for m in (await client.ps())["models"]}
    assert ps["SmolLM2-135M-Instruct.Q4_1:latest"]["expires_at"].year == 2318
    gemma = "gemma-3-270m-q4_k_m:latest"
    assert gemma in ps
    await client.generate(model=gemma, prompt="The sky is", keep_alive=0, options={"num_predict": 2.0})
    assert gemma in {m["model"] for m in (await client.ps())["models"]}
    await client.generate(model=PICKED, keep_alive=0)  # the explicit unload (no keys set: anyone is admin)
    assert "SmolLM2-135M-Instruct.Q4_1:latest" not in {m["model"] for m in (await client.ps())["models"]}
    # The Gemma 3 file is a base model: not offered for chat or tools.
    shown = await client.show(gemma)
    assert shown.capabilities == ["completion"]
