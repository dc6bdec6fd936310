"""Thinking models: the thought comes back apart from the answer (Ollama's
`message.thinking`, the OpenAI API's `reasoning_content`), streamed and not, with tools
and structured output, switched by Ollama's `think` and the template's `enable_thinking`.

The end-to-end tests run the daemon on SmolLM2 with a Qwen3-style chat template
(think_util.py) through the real `ollama` and `openai` clients; `thinking_budget` makes
the thought end (the grammar closes it), so the answers take the same path every run.
The splitter, the grammar and the request fields are tested without a daemon first."""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import ollama
import openai
import pytest
from conftest import SMOLLM2, model_path
from serve_util import Daemon, daemon
from think_util import QWEN3_OPENED, QWEN3_STYLE, with_template

import edgelm
from edgelm.prompt.chat import ChatTemplate
from edgelm.prompt.grammar import Grammars
from edgelm.server import thinking, tools
from edgelm.server.params import ApiError

STYLE = thinking.ThinkingStyle("<think>", "</think>", True)


# -- the splitter ------------------------------------------------------------------------


def split_all(text: str, pieces: list[str], opened: bool = False) -> tuple[str, str]:
    s = thinking.ThinkSplitter(STYLE, opened)
    thought, answer = "", ""
    for p in pieces:
        t, a = s.feed(p)
        thought, answer = thought + t, answer + a
    t, a = s.finish()
    return thought + t, answer + a


def splits(text: str, rng: random.Random) -> Iterator[list[str]]:
    """The text cut at every single position and at every pair of positions, the
    characters one by one, and random cuts (as tokens cut a stream)."""
    n = len(text)
    yield [text]
    yield list(text)
    for i in range(1, n):
        yield [text[:i], text[i:]]
    for i, j in itertools.combinations(range(1, n), 2):
        if n < 40:
            yield [text[:i], text[i:j], text[j:]]
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 8)))) if n > 1 else []
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, n])]


CASES = [
    # (streamed text, opened by the prompt, thought, answer)
    ("<think>\nThe user greets.\n</think>\n\nHello!", False, "The user greets.", "Hello!"),
    ("  \n<think>a < b, and </thin is no tag</think>Hi", False, "a < b, and </thin is no tag", "Hi"),
    ("Hello, <think> is just text here", False, "", "Hello, <think> is just text here"),
    ("\n\nNo thought.", False, "", "\n\nNo thought."),
    ("<think>\nstill thinking when max_tokens came", False, "still thinking when max_tokens came", ""),
    ("<thi", False, "", "<thi"),
    ("<think>\n\n</think>\n\nAnswer after an empty thought", False, "", "Answer after an empty thought"),
    ("<think>x</think>\n\n<tool_call>\n{}\n</tool_call>", False, "x", "<tool_call>\n{}\n</tool_call>"),
    ("The prompt opened it.\n</think>\n\nAnd the answer.", True, "The prompt opened it.", "And the answer."),
    ("\nunfinished, opened", True, "unfinished, opened", ""),
    ("</think>at once", True, "", "at once"),
    ("a\n\n  b </ think> c </th", True, "a\n\n  b </ think> c </th", ""),
]


@pytest.mark.parametrize("text, opened, thought, answer", CASES)
def test_splitter_over_every_cut(text: str, opened: bool, thought: str, answer: str) -> None:
    rng = random.Random(text)
    for pieces in splits(text, rng):
        assert split_all(text, pieces, opened) == (thought, answer), pieces


def test_splitter_streams_the_thought_as_it_comes() -> None:
    """Thought text goes out at once, except what may be the start of the closing tag
    (and whitespace that may be the last before it)."""
    s = thinking.ThinkSplitter(STYLE)
    assert s.feed("<think>\n") == ("", "")
    assert s.feed("Lights") == ("Lights", "")
    assert s.feed(" are on.\n</") == (" are on.", "")
    assert s.feed("think>\n\nDone") == ("", "Done")
    assert s.feed(" now.") == ("", " now.")
    assert s.finish() == ("", "")


def test_reply_splits_thought_content_and_calls() -> None:
    plan = tools.parse_tools([{"type": "function", "function": {"name": "HassTurnOn", "parameters": {}}}])
    text = '<think>\nTurn it on.\n</think>\n\n<tool_call>\n{"name": "HassTurnOn", "arguments": {}}\n</tool_call>'
    thought, content, calls = tools.Reply(plan, STYLE, True).whole(text)
    assert (thought, content, [c.name for c in calls]) == ("Turn it on.", "", ["HassTurnOn"])
    # Thinking off: the text is the answer, tags and all (as Ollama gives it).
    assert tools.Reply(None, STYLE, False).whole("<think>x</think>y") == ("", "<think>x</think>y", [])
    # Opened by the prompt: split whatever was asked.
    assert tools.Reply(None, STYLE, False, opened=True).whole("x</think>y") == ("x", "y", [])


# -- what a request asks for -------------------------------------------------------------


def test_template_style() -> None:
    assert thinking.template_style(QWEN3_STYLE) == STYLE
    assert thinking.template_style("{{ '<think>' }}...{{ '</think>' }}") == thinking.ThinkingStyle(
        "<think>", "</think>", False
    )
    source = ChatTemplate.for_model(None, "llama").source
    assert thinking.template_style(source) is None and thinking.template_style(None) is None


def test_ollama_think_values() -> None:
    on = thinking.from_ollama
    assert on(None, None, STYLE, "m") == thinking.Thinking(True)  # Ollama's default for a thinking model
    assert on(True, None, STYLE, "m") == thinking.Thinking(True)
    assert on(False, 64, STYLE, "m") == thinking.OFF
    assert on("high", None, STYLE, "m") == thinking.Thinking(True, "high")
    assert on("max", None, STYLE, "m") == thinking.Thinking(True, "high")
    assert on("low", 64.0, STYLE, "m") == thinking.Thinking(True, "low", 64)
    # A model without thinking: true is refused as Ollama refuses it; false and null work.
    assert on(False, None, None, "m") == thinking.OFF and on(None, None, None, "m") == thinking.OFF
    for raw in (True, "high", "true"):
        with pytest.raises(ApiError, match="'m' does not support thinking"):
            on(raw, None, None, "m")
    for raw, budget in (("banana", None), (1, None), ({}, None), (True, 0), (True, 2.5), (True, "8"), (True, True)):
        with pytest.raises(ApiError) as e:
            on(raw, budget, STYLE, "m")
        assert e.value.status == 400 and e.value.param in ("think", "options.thinking_budget")


def test_openai_thinking_fields() -> None:
    f = thinking.from_openai
    assert f({}, STYLE) == thinking.Thinking(True)
    assert f({"chat_template_kwargs": {"enable_thinking": False}}, STYLE) == thinking.OFF
    assert f({"enable_thinking": False}, STYLE) == thinking.OFF
    assert f({"reasoning_effort": "none"}, STYLE) == thinking.OFF
    assert f({"reasoning_effort": "medium", "thinking_budget": 32}, STYLE) == thinking.Thinking(True, "medium", 32)
    assert f({"reasoning_format": "none"}, STYLE) == thinking.Thinking(True, split=False)
    # vLLM and llama-server ignore template switches a template does not read.
    assert f({"chat_template_kwargs": {"enable_thinking": True}}, None) == thinking.OFF
    for body in (
        {"chat_template_kwargs": []},
        {"enable_thinking": "yes"},
        {"reasoning_effort": "max"},
        {"reasoning_format": "xml"},
        {"thinking_budget": -1},
    ):
        with pytest.raises(ApiError):
            f(body, STYLE)


def test_qwen3_style_template_renders_the_switch_and_the_history() -> None:
    t = ChatTemplate(QWEN3_STYLE)
    user = [{"role": "user", "content": "Hi"}]
    on = t.render(user, **thinking.Thinking(True).template_vars(t.thinking))
    off = t.render(user, **thinking.OFF.template_vars(t.thinking))
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert not thinking.forced_open(on, t.thinking) and not thinking.forced_open(off, t.thinking)
    assert thinking.forced_open(ChatTemplate(QWEN3_OPENED).render(user), t.thinking)
    # Earlier thoughts: kept after the last user turn (a tool round), dropped before it.
    history = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "T1"},
        {"role": "user", "content": "Q2"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "T2",
            "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "ok"},
    ]
    text = t.render(history)
    assert "T1" not in text and '<think>\nT2\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}' in text


# -- the grammar -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    native = edgelm.Model(model_path(SMOLLM2)).native
    eog = frozenset(t for t in range(native.n_vocab) if native.is_eog(t))
    return Grammars(native, eog)


PLAN = tools.parse_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "HassTurnOn",
                "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
            },
        }
    ]
)
CALL = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "light"}}\n</tool_call>'


def accepts(g: Grammars, grammar: str, text: str) -> bool:
    m = g.matcher(g.lark(grammar))
    native = g._native
    for t in native.tokenize(text, False, False):
        if not m.consume_token(t):
            return False
    return bool(m.is_accepting())


@pytest.mark.parametrize("opened", [False, True])
def test_tool_grammar_takes_a_thought_first(grammars: Grammars, opened: bool) -> None:
    assert PLAN is not None
    rule = thinking.ThoughtRule(STYLE, opened, False, None)
    g = tools.grammar(PLAN, None, rule)
    assert g is not None
    head = "" if opened else "<think>\n"
    for text in (
        f"{head}I should call it.\n</think>\n\n{CALL}",
        f"{head}Plain.</think>\n\nThe light is on.",
        f"{head}x</think>{CALL}",
    ):
        assert accepts(grammars, g, text), text
    # A call that does not match its schema is refused after a thought too, and text
    # after the thought cannot start a call-looking "<" (it would have to be a call).
    for text in (
        f'{head}x</think>\n\n<tool_call>\n{{"name": "Nope", "arguments": {{}}}}\n</tool_call>',
        f"{head}x</think>\n\n<b>bold</b>",
    ):
        assert not accepts(grammars, g, text), text
    if not opened:  # without the prompt's opening, the thought may be skipped
        assert accepts(grammars, g, CALL) and accepts(grammars, g, "Just text.")
    required = tools.grammar(tools.ToolPlan(PLAN.tools, "required"), None, rule)
    assert required is not None and not accepts(grammars, required, f"{head}x</think>\n\nText instead.")
    schema = tools.grammar(
        None,
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
        rule,
    )
    assert schema is not None and accepts(grammars, schema, f'{head}x</think>\n\n{{"a": 1}}')
    assert not accepts(grammars, schema, f"{head}x</think>\n\nnot json")


def allowed(g: Grammars, mask: bytes) -> set[bytes]:
    words = np.frombuffer(mask, dtype="<u4")
    n = g._native.n_vocab
    return {g._native.token_bytes(t, True) for t in range(n) if words[t >> 5] >> (t & 31) & 1}


@pytest.mark.parametrize("opened", [False, True])
def test_thinking_budget_closes_the_thought(grammars: Grammars, opened: bool) -> None:
    """After `budget` tokens of thought only what goes on with the closing tag is
    allowed (also when the thought already ends in a part of it), then the answer."""
    rule = thinking.ThoughtRule(STYLE, opened, True, 4)
    source = tools.grammar(None, None, rule)
    assert source is not None
    native = grammars._native
    close = grammars.prefix_masks(b"</think>")

    def budgeted() -> thinking.ThoughtBudget:
        return thinking.ThoughtBudget(
            grammars.matcher(grammars.lark(source)), 4, STYLE, opened, lambda t: native.token_bytes(t, True), close
        )

    head = "" if opened else "<think>"
    m = budgeted()
    if not opened:
        assert allowed(grammars, m.compute_bitmask()) == {b"<"}  # a budget means a thought
    for t in native.tokenize(head, False, False):
        assert m.consume_token(t)
    ids = native.tokenize("one two three four", False, False)
    assert len(ids) == 4
    for t in ids[:-1]:
        assert m.consume_token(t)
        assert len(allowed(grammars, m.compute_bitmask())) > 1000  # free while within the budget
    assert m.consume_token(ids[-1])
    out = allowed(grammars, m.compute_bitmask())
    assert out and all(b"</think>".startswith(b) for b in out), out
    # The thought ended in "</" at the budget: only "think>"'s beginnings may follow.
    m = budgeted()
    for t in native.tokenize(head + "one two three</", False, False):
        assert m.consume_token(t)
    out = allowed(grammars, m.compute_bitmask())
    assert out and all(b"think>".startswith(b) for b in out), out
    for t in native.tokenize("think>\n\nAnswer.", False, False):
        assert m.consume_token(t)
    assert m.state == "after" and len(allowed(grammars, m.compute_bitmask())) > 1000
    assert m.is_stopped() is False and not m.is_error()


# -- the daemon --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = tmp_path_factory.mktemp("thinking-models")
    with_template(model_path(SMOLLM2), d / "smol-think.gguf", QWEN3_STYLE, "smol-think")
    with_template(model_path(SMOLLM2), d / "smol-opened.gguf", QWEN3_OPENED, "smol-opened")
    os.symlink(model_path(SMOLLM2), d / SMOLLM2)
    with daemon(d / "smol-think.gguf", "--models-dir", str(d), "--max-context", "2048", "--kv-cache-mib", "64") as s:
        yield s


ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 120}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on a device",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 32}},
                "required": ["name"],
            },
        },
    }
]


def no_tags(*texts: str | None) -> bool:
    return not any("<think>" in (t or "") or "</think>" in (t or "") for t in texts)


def test_ollama_thought_apart_streamed_and_not(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    assert "thinking" in (c.show("smol-think").capabilities or [])
    assert "thinking" not in (c.show(SMOLLM2.removesuffix(".gguf")).capabilities or [])
    opts = {**GREEDY, "thinking_budget": 12}
    r = c.chat(model="smol-think", messages=QUESTION, think=True, format=ANSWER, options=opts)
    assert r.message.thinking and no_tags(r.message.thinking, r.message.content)
    assert "city" in json.loads(r.message.content) and r.done_reason == "stop"
    parts = list(c.chat(model="smol-think", messages=QUESTION, think=True, format=ANSWER, options=opts, stream=True))
    thought = "".join(p.message.thinking or "" for p in parts)
    content = "".join(p.message.content or "" for p in parts)
    assert (thought, content) == (r.message.thinking, r.message.content)
    first_content = next(i for i, p in enumerate(parts) if p.message.content)
    assert all(not p.message.thinking for p in parts[first_content:])  # thought, then answer
    assert sum(1 for p in parts if p.message.thinking) > 1  # streamed as it came, not at the end
    # /api/generate: `thinking` beside `response`.
    g = c.generate(model="smol-think", prompt="What is the capital of France?", think=True, format=ANSWER, options=opts)
    assert g.thinking and no_tags(g.thinking, g.response) and "city" in json.loads(g.response)
    # A level means on (a template with effort levels hears it; this one does not).
    h = c.chat(model="smol-think", messages=QUESTION, think="high", format=ANSWER, options=opts)
    assert (h.message.thinking, h.message.content) == (r.message.thinking, r.message.content)


def test_ollama_think_off_and_default(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    off = c.chat(model="smol-think", messages=QUESTION, think=False, options={**GREEDY, "thinking_budget": 12})
    assert off.message.thinking is None and off.message.content
    # false closes the thought in the prompt (the template's empty <think></think>);
    # /api/generate's `context` holds the prompt it ran.
    for think, closed in ((False, True), (True, False)):
        g = c.generate(model="smol-think", prompt="Hi", think=think, options={"num_predict": 1})
        status, body = srv.post("/detokenize", {"model": "smol-think", "tokens": g.context})
        assert status == 200 and ("assistant\n<think>\n\n</think>\n\n" in body["content"]) == closed
    # Unset: on, as Ollama has it for a thinking model; this model answers without
    # opening a thought, which is then all answer.
    d = c.chat(model="smol-think", messages=QUESTION, options={"temperature": 0, "num_predict": 30})
    assert d.message.content and d.message.thinking is None and no_tags(d.message.content)


def test_ollama_thought_opened_by_the_template(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    # No budget: the model ends without closing the thought; all of it is thought.
    r = c.chat(model="smol-opened", messages=QUESTION, think=True, options={"temperature": 0, "num_predict": 20})
    assert r.message.thinking and not r.message.content
    r = c.chat(
        model="smol-opened", messages=QUESTION, think=True, format=ANSWER, options={**GREEDY, "thinking_budget": 8}
    )
    assert r.message.thinking and no_tags(r.message.thinking, r.message.content)
    assert "city" in json.loads(r.message.content)
    r = c.chat(model="smol-opened", messages=QUESTION, think=False, options={"temperature": 0, "num_predict": 20})
    assert r.message.thinking is None and r.message.content


def test_ollama_tools_with_thinking_on_and_off(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    ask = [
        {"role": "system", "content": "Call HassTurnOn to turn devices on."},
        {"role": "user", "content": "Turn on the kitchen light"},
    ]
    for think in (True, False):
        for stream in (False, True):
            kw: dict[str, Any] = dict(
                model="smol-think", messages=ask, tools=TOOLS, think=think, options={**GREEDY, "thinking_budget": 10}
            )
            if stream:
                parts = list(c.chat(**kw, stream=True))
                thought = "".join(p.message.thinking or "" for p in parts)
                content = "".join(p.message.content or "" for p in parts)
                calls = [tc for p in parts for tc in (p.message.tool_calls or [])]
            else:
                r = c.chat(**kw)
                thought, content, calls = r.message.thinking or "", r.message.content, r.message.tool_calls or []
            assert bool(thought) == think and no_tags(thought, content)
            assert content or calls
            for call in calls:
                assert call.function.name == "HassTurnOn" and isinstance(call.function.arguments, dict)
                assert set(call.function.arguments) <= {"name"}
            assert not (content or "").lstrip().startswith("<tool_call>")


def test_a_model_without_thinking(srv: Daemon) -> None:
    c = ollama.Client(host=srv.url)
    plain = SMOLLM2.removesuffix(".gguf")
    for think in (True, "high"):
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model=plain, messages=QUESTION, think=think)
        assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    for think in (False, None):  # what Home Assistant sends
        r = c.chat(model=plain, messages=QUESTION, think=think, options={"temperature": 0, "num_predict": 8})
        assert r.message.content and r.message.thinking is None
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="smol-think", messages=QUESTION, think="banana")  # type: ignore[arg-type]
    assert e.value.status_code == 400
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    r2 = oai.chat.completions.create(
        model=plain,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    assert r2.choices[0].message.content and not (r2.choices[0].message.model_extra or {}).get("reasoning_content")


def test_openai_reasoning_content(srv: Daemon) -> None:
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    kw: dict[str, Any] = dict(
        model="smol-think",
        messages=QUESTION,
        temperature=0,
        max_tokens=120,
        response_format=fmt,
        extra_body={"thinking_budget": 12},
    )
    r = oai.chat.completions.create(**kw)
    m = r.choices[0].message
    thought = (m.model_extra or {}).get("reasoning_content")
    assert thought and no_tags(thought, m.content) and "city" in json.loads(m.content or "")
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    s_thought = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    s_content = "".join(d.content or "" for d in deltas)
    assert (s_thought, s_content) == (thought, m.content)
    # Off through the template switch (vLLM's and llama-server's chat_template_kwargs).
    off = oai.chat.completions.create(**{**kw, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}})
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")
    assert "city" in json.loads(off.choices[0].message.content or "")
    # llama-server's reasoning_format "none": the thought stays in the content.
    raw = oai.chat.completions.create(**{**kw, "extra_body": {"thinking_budget": 12, "reasoning_format": "none"}})
    assert (raw.choices[0].message.content or "").startswith("<think>")


def test_openai_tool_calls_after_a_thought(srv: Daemon) -> None:
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    kw: dict[str, Any] = dict(
        model="smol-think",
        messages=[{"role": "user", "content": "Turn on the kitchen light"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
        extra_body={"thinking_budget": 10},
    )
    r = oai.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
    assert (ch.message.model_extra or {}).get("reasoning_content")
    call = ch.message.tool_calls[0]
    assert call.function.name == "HassTurnOn" and set(json.loads(call.function.arguments)) == {"name"}  # type: ignore[union-attr]
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    thought = "".join((d.delta.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert thought == ch.message.model_extra["reasoning_content"]  # type: ignore[index]
    assert [c.function.arguments for c in calls] == [call.function.arguments]  # type: ignore[union-attr]
    assert deltas[-1].finish_reason == "tool_calls"
    # The round trip: the call, its result and the earlier thought go back to the template.
    follow = oai.chat.completions.create(
        model="smol-think",
        temperature=0,
        max_tokens=30,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        messages=[
            kw["messages"][0],
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": thought,  # type: ignore[misc]
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "HassTurnOn", "arguments": call.function.arguments},
                    }
                ],
            },  # type: ignore[union-attr]
            {"role": "tool", "tool_call_id": call.id, "content": "done"},
        ],
        tools=TOOLS,
    )
    assert follow.choices[0].message.content
