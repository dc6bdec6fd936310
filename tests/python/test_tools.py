"""Tool calling on the real daemon and the real 135M model: a Home-Assistant-like
conversation through the `ollama` AsyncClient (the library Home Assistant's Ollama
integration uses) and through the `openai` SDK, streaming and not; tool_choice; bad
input. The tool-call syntax itself (prompt, grammar, parsing, streaming split) is
tested without a model at the end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import llguidance
import ollama
import openai
import pytest
from conftest import GEMMA3, SMOLLM2, model_path
from serve_util import Daemon, daemon

from edgelm.server import tools
from edgelm.server.params import ApiError

NAME = "SmolLM2-135M-Instruct.Q4_1:latest"
OPENAI_NAME = "SmolLM2-135M-Instruct.Q4_1"


def _intent(name: str, description: str) -> dict[str, Any]:
    """A tool as Home Assistant's Ollama integration sends its intents (voluptuous
    schemas converted to JSON schema)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "area": {"type": "string"},
                    "floor": {"type": "string"},
                    "domain": {
                        "type": "array",
                        "items": {
                            "type": "string",
                            "enum": ["light", "fan", "switch", "cover", "media_player", "lock"],
                        },
                    },
                },
                "required": [],
            },
        },
    }


HA_TOOLS = [
    _intent("HassTurnOn", "Turns on/opens/presses a device or entity. For locks, this performs a 'lock' action."),
    _intent("HassTurnOff", "Turns off/closes a device or entity. For locks, this performs an 'unlock' action."),
    {
        "type": "function",
        "function": {
            "name": "HassLightSet",
            "description": "Sets the brightness percentage or color of a light",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "area": {"type": "string"},
                    "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "GetLiveContext",
            "description": "Provides real-time information about the "
            "CURRENT state, value, or mode of devices, sensors, entities, or areas.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
HA_SYSTEM = (
    "You are a voice assistant for Home Assistant.\nAnswer questions about the world truthfully.\n"
    "Answer in plain text. Keep it simple and to the point.\n"
    "When controlling Home Assistant always call the intent tools. When controlling a device, prefer passing just "
    "name and domain.\nStatic Context: An overview of the areas and the devices in this smart home:\n"
    "- names: Kitchen Light\n  domain: light\n  areas: Kitchen\n- names: Bedroom Fan\n  domain: fan\n  areas: Bedroom\n"
)
ACTION_DONE = json.dumps(
    {
        "speech": {},
        "response_type": "action_done",
        "data": {
            "targets": [],
            "success": [{"name": "Kitchen Light", "type": "entity", "id": "light.kitchen"}],
            "failed": [],
        },
    }
)
# Home Assistant sends num_ctx and leaves the sampling options to the server's
# defaults; a test needs greedy decoding to be repeatable, and a bound on length.
HA_OPTIONS = {"num_ctx": 8192, "temperature": 0, "num_predict": 100}


def _params(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in HA_TOOLS if t["function"]["name"] == name)


@pytest.fixture(scope="module")
def srv() -> Iterator[Daemon]:
    with daemon(model_path(SMOLLM2), "--max-context", "2048", "--kv-cache-mib", "128") as d:
        yield d


# -- Home Assistant through the ollama client ---------------------------------------------


async def _ha_turn(c: ollama.AsyncClient, messages: list[Any], stream: bool) -> tuple[ollama.Message, list[Any]]:
    """One request as Home Assistant makes it; streaming returns the chunks too."""
    if not stream:
        r = await c.chat(model=NAME, messages=messages, tools=HA_TOOLS, options=HA_OPTIONS, keep_alive="5m")
        assert r.done
        return r.message, [r]
    chunks = [
        ch
        async for ch in await c.chat(
            model=NAME, messages=messages, tools=HA_TOOLS, options=HA_OPTIONS, keep_alive="5m", stream=True
        )
    ]
    assert chunks[-1].done and all(ch.message is not None for ch in chunks)
    content = "".join(ch.message.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in (ch.message.tool_calls or [])]
    return ollama.Message(role="assistant", content=content, tool_calls=calls or None), chunks


@pytest.mark.parametrize("stream", [False, True])
def test_home_assistant_conversation(srv: Daemon, stream: bool) -> None:
    async def run() -> None:
        c = ollama.AsyncClient(host=srv.url)
        assert NAME in [m.model for m in (await c.list()).models]
        messages: list[Any] = [
            {"role": "system", "content": HA_SYSTEM},
            {"role": "user", "content": "Turn on the kitchen light."},
        ]
        msg, chunks = await _ha_turn(c, messages, stream)
        assert msg.tool_calls, f"no tool call: {msg.content!r}"
        assert msg.tool_calls[0].function.name == "HassTurnOn"
        for call in msg.tool_calls:  # which values a 135M model picks is its own business
            jsonschema.validate(dict(call.function.arguments), _params(call.function.name))
        if stream:  # the call comes whole, in one chunk, before the final line
            with_calls = [ch for ch in chunks if ch.message.tool_calls]
            assert len(with_calls) == 1 and not with_calls[0].done and chunks[-1].done_reason == "stop"
        messages.append(msg)
        for call in msg.tool_calls:
            messages.append({"role": "tool", "content": ACTION_DONE, "tool_name": call.function.name})
        final, chunks = await _ha_turn(c, messages, stream)
        assert not final.tool_calls and (final.content or "").strip()
        assert not final.content.lstrip().startswith("<")  # type: ignore[union-attr]

    asyncio.run(run())


def test_ollama_answers_questions_in_text(srv: Daemon) -> None:
    r = ollama.Client(host=srv.url).chat(
        model=NAME,
        tools=HA_TOOLS,
        options=HA_OPTIONS,
        messages=[
            {"role": "system", "content": HA_SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    )
    assert not r.message.tool_calls and "Paris" in (r.message.content or "")


# -- the same through the openai SDK --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_conversation(srv: Daemon, stream: bool) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    messages: list[Any] = [
        {"role": "system", "content": HA_SYSTEM},
        {"role": "user", "content": "Turn on the kitchen light."},
    ]

    def turn() -> tuple[str | None, list[dict[str, Any]], str | None]:
        if not stream:
            r = client.chat.completions.create(
                model=OPENAI_NAME,
                messages=messages,
                tools=HA_TOOLS,  # type: ignore[arg-type]
                temperature=0,
                max_tokens=256,
            )
            ch = r.choices[0]
            calls = [
                {
                    "id": tc.id,
                    "type": "function",
                    "function": {
                        "name": tc.function.name,  # type: ignore[union-attr]
                        "arguments": tc.function.arguments,
                    },
                }  # type: ignore[union-attr]
                for tc in ch.message.tool_calls or []
            ]
            return ch.message.content, calls, ch.finish_reason
        content, finish = "", None
        acc: dict[int, dict[str, Any]] = {}
        for ev in client.chat.completions.create(
            model=OPENAI_NAME,
            messages=messages,
            tools=HA_TOOLS,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=256,
            stream=True,
        ):
            ch = ev.choices[0]
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                a = acc.setdefault(tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                a["id"] += tc.id or ""
                a["function"]["name"] += tc.function.name or ""  # type: ignore[union-attr]
                a["function"]["arguments"] += tc.function.arguments or ""  # type: ignore[union-attr]
            finish = ch.finish_reason or finish
        return content or None, [acc[k] for k in sorted(acc)], finish

    content, calls, finish = turn()
    assert finish == "tool_calls" and calls and not content, (finish, calls, content)
    assert calls[0]["function"]["name"] == "HassTurnOn"
    for call in calls:
        assert call["id"].startswith("call_")
        args = json.loads(call["function"]["arguments"])  # a JSON string, as OpenAI sends it
        jsonschema.validate(args, _params(call["function"]["name"]))
    assert len({c["id"] for c in calls}) == len(calls)
    messages.append({"role": "assistant", "content": None, "tool_calls": calls})
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": ACTION_DONE})
    content, calls, finish = turn()
    assert finish in ("stop", "length") and not calls and content and content.strip()


def test_tool_choice(srv: Daemon) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    # "required": even a question gets a call, and the call validates.
    r = client.chat.completions.create(
        model=OPENAI_NAME,
        messages=question,
        tools=HA_TOOLS,
        tool_choice="required",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=64,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    for tc in r.choices[0].message.tool_calls or []:
        jsonschema.validate(json.loads(tc.function.arguments), _params(tc.function.name))  # type: ignore[union-attr]
    # A named function: exactly that one, once.
    r = client.chat.completions.create(
        model=OPENAI_NAME,
        messages=question,
        tools=HA_TOOLS,
        temperature=0,  # type: ignore[arg-type]
        max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "HassLightSet"}},
    )
    tcs = r.choices[0].message.tool_calls or []
    assert [tc.function.name for tc in tcs] == ["HassLightSet"]  # type: ignore[union-attr]
    jsonschema.validate(json.loads(tcs[0].function.arguments), _params("HassLightSet"))  # type: ignore[union-attr]
    # "none": text, even for a command.
    r = client.chat.completions.create(
        model=OPENAI_NAME,
        tools=HA_TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
        messages=[{"role": "system", "content": HA_SYSTEM}, {"role": "user", "content": "Turn on the kitchen light."}],
    )
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls


def test_tool_calls_on_gemma() -> None:
    """Gemma 3's turn format has no tool syntax: the tool prompt goes into its first
    user turn, and a forced call still comes back well formed."""
    with daemon(model_path(GEMMA3), "--max-context", "1024", "--kv-cache-mib", "64") as d:
        r = ollama.Client(host=d.url).chat(
            model="gemma-3-270m-q4_k_m",
            tools=HA_TOOLS[:2],
            options={"temperature": 0, "num_predict": 64},
            messages=[{"role": "user", "content": "Turn off the bedroom fan."}],
        )
        status, body = d.post(
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Turn off the bedroom fan."}],
                "tools": HA_TOOLS[:2],
                "tool_choice": "required",
                "temperature": 0,
                "max_tokens": 200,
            },
        )
    assert r.done
    for tc in r.message.tool_calls or []:
        jsonschema.validate(dict(tc.function.arguments), _params(tc.function.name))
    assert status == 200, body
    tcs = body["choices"][0]["message"]["tool_calls"]
    assert tcs and tcs[0]["function"]["name"] in ("HassTurnOn", "HassTurnOff")
    jsonschema.validate(json.loads(tcs[0]["function"]["arguments"]), _params(tcs[0]["function"]["name"]))


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}, "tools"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools[0]",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "bad name!"}}],
            },
            "name",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": HA_TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "Nope"}},
            },
            "Nope",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": HA_TOOLS, "tool_choice": "maybe"},
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": HA_TOOLS, "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}},
                        },
                    }
                ],
            },
            "response schema",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
                        ],
                    },
                ],
                "tools": HA_TOOLS,
            },
            "arguments",
        ),
        ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": "HassTurnOn"}, "tools"),
        (
            "/api/chat",
            {
                "model": NAME,
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
                ],
            },
            "tool_calls",
        ),
    ],
)
def test_bad_tool_input_is_a_clear_400(srv: Daemon, path: str, body: dict[str, Any], needle: str) -> None:
    status, resp = srv.post(path, body)
    assert status == 400, resp
    msg = resp["error"] if isinstance(resp["error"], str) else resp["error"]["message"]
    assert needle in msg


def test_tool_grammar_cost(srv: Daemon) -> None:
    """Not a timing assertion: prints what the tool grammar's token masks cost (run
    with -s), beside the masks being counted at all."""
    n, secs = srv.metric("edgelm_grammar_masks_total"), srv.metric("edgelm_grammar_mask_seconds_total")
    assert n > 0
    print(f"\ntool-call grammar: {n:.0f} constrained tokens, {1e3 * secs / n:.3f} ms per token for the mask")


# -- the syntax, without a model ------------------------------------------------------------


def test_prompt_for_templates_without_tools() -> None:
    plan = tools.parse_tools(HA_TOOLS)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Lights on"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "HassTurnOn", "arguments": '{"name": "Light"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "tool", "content": "also done"},
    ]
    out, tools_arg = tools.prompt_messages(msgs, plan, template_renders_tools=False)
    assert tools_arg is None
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "HassTurnOn"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Light"}}\n</tool_call>',
    }
    assert out[3] == {
        "role": "user",
        "content": "<tool_response>\ndone\n</tool_response>\n<tool_response>\nalso done\n</tool_response>",
    }
    # A template that renders tools gets them, and arguments as objects.
    out, tools_arg = tools.prompt_messages(msgs, plan, template_renders_tools=True)
    assert tools_arg == HA_TOOLS and out[2]["tool_calls"][0]["function"]["arguments"] == {"name": "Light"}


def test_rounds_limit() -> None:
    plan = tools.parse_tools(HA_TOOLS)
    assert plan is not None
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {}}}]}
    convo = [{"role": "user", "content": "on"}, call, {"role": "tool", "content": "ok"}]
    assert plan.limit_rounds(convo, 1).choice == "text"
    assert plan.limit_rounds(convo, 2).choice == "auto"
    assert plan.limit_rounds([*convo, {"role": "user", "content": "again"}], 1).choice == "auto"


def _accepts(grammar: str, text: str) -> bool:
    """Whether the grammar takes `text` as a whole answer (byte-level tokenizer)."""
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocab()))
    m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    return m.consume_tokens(list(text.encode())) and m.is_accepting() and not m.is_error()


class _ByteVocab:
    eos_token_id = 256
    bos_token_id = None
    special_token_ids = [256]
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, s: bytes) -> list[int]:
        return list(s)


def test_grammar() -> None:
    plan = tools.parse_tools(HA_TOOLS[:3])
    assert plan is not None
    g = tools.grammar(plan)
    ok = (
        '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen Light", "domain": ["light"]}}\n</tool_call>'
    )
    assert _accepts(g, ok)
    assert _accepts(g, ok + "\n" + ok.replace("HassTurnOn", "HassTurnOff"))
    assert _accepts(g, "The capital of France is Paris.")
    assert not _accepts(g, ok.replace("HassTurnOn", "HassUnlock"))  # not a tool
    assert not _accepts(g, ok.replace('"domain": ["light"]', '"colour": "red"'))  # a made-up argument
    assert not _accepts(g, ok.replace('["light"]', '["toaster"]'))  # outside the enum
    assert not _accepts(g, "<b>bold</b>")  # "<" starts a call
    one = tools.grammar(tools.ToolPlan(plan.tools, "required", parallel=False))
    assert _accepts(one, ok) and not _accepts(one, ok + "\n" + ok) and not _accepts(one, "Paris.")
    text_only = tools.grammar(tools.ToolPlan(plan.tools, "text"))
    assert _accepts(text_only, "It is on.") and not _accepts(text_only, ok)
    with_schema = tools.grammar(plan, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert _accepts(with_schema, '{"a": 1}') and _accepts(with_schema, ok) and not _accepts(with_schema, "Paris.")


def test_parse_and_stream_split() -> None:
    text = (
        '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "a"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "HassTurnOff", "arguments": {}}\n</tool_call>'
    )
    calls = tools.parse_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("HassTurnOn", {"name": "a"}), ("HassTurnOff", {})]
    assert json.loads(calls[0].openai(0)["function"]["arguments"]) == {"name": "a"}
    assert calls[0].ollama() == {"function": {"name": "HassTurnOn", "arguments": {"name": "a"}}}
    assert calls[0].id != calls[1].id
    # Cut off by max_tokens: complete calls only.
    assert len(tools.parse_calls(text[:-5])) == 1
    s = tools.ToolStream()
    assert [s.feed(p) for p in ("<tool", "_call>\n{", text[13:])] == ["", "", ""]
    rest, got = s.finish()
    assert rest == "" and [c.name for c in got] == ["HassTurnOn", "HassTurnOff"]
    s = tools.ToolStream()
    assert [s.feed(p) for p in ("", "Par", "is")] == ["", "Par", "is"] and s.finish() == ("", [])
    s = tools.ToolStream()
    s.feed("<tool_ca")  # cut off before a whole call: given back as text
    assert s.finish() == ("<tool_ca", [])


def test_parse_tools_validation() -> None:
    assert tools.parse_tools(None) is None and tools.parse_tools([]) is None
    assert tools.parse_tools(HA_TOOLS, "none") is None
    with pytest.raises(ApiError, match="used twice"):
        tools.parse_tools([HA_TOOLS[0], HA_TOOLS[0]])
    with pytest.raises(ApiError, match="parameters"):
        tools.parse_tools([{"type": "function", "function": {"name": "f", "parameters": [1]}}])
    plan = tools.parse_tools([{"type": "function", "function": {"name": "f"}}])
    assert plan is not None and plan.tools[0].parameters == {"type": "object", "properties": {}}
