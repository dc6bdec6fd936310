"""Tool calling: the tools a request offers go into the prompt, the model's answer is
constrained to "plain text or well-formed calls", and the calls are parsed out of the
text into the APIs' `tool_calls`.

The wire format is the Hermes/Qwen one, which SmolLM-style models were trained on:

    <tool_call>
    {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}
    </tool_call>

Prompt. A model whose chat template renders `tools` itself (its source mentions them)
gets the tools and the messages unchanged. Otherwise — SmolLM2's template, Gemma's turn
format, ChatML — a tool-use system prompt lists the tools as JSON inside `<tools>`, an
assistant turn's earlier `tool_calls` are written back as `<tool_call>` text, and a
`role: tool` result becomes a user turn inside `<tool_response>` tags.

Constraint (llguidance, Lark syntax). With `tool_choice` "auto" the answer is either
text that does not start with "<", or one or more calls; each call's JSON must name
one of the offered tools and match that tool's parameter schema, so even a 135M model
emits calls that parse and validate. "required" or a named function leaves only the
call branch; "none" drops the tools altogether.

Streaming. The first character decides: "<" starts the call branch, whose text is held
back and handed out as whole calls at the end (Ollama: arguments as an object, each
call in one chunk; OpenAI: arguments as a JSON string with an id); anything else is
content and streams as it comes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgelm.prompt.chat import ThinkingStyle
from edgelm.prompt.grammar import GrammarError
from edgelm.server.params import ApiError
from edgelm.server.thinking import ThinkSplitter, ThoughtBudget, ThoughtRule

if TYPE_CHECKING:
    from edgelm.engine.pool import LoadedModel

OPEN, CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions.\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)
"""The tool-use system prompt for templates that do not render tools (Hermes's)."""

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is spelled: json.dumps's separators, as the models were shown."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """The OpenAI/Ollama form: what templates that render tools expect."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    """What a request asked for: the tools, "auto" | "required" | a function name, and
    whether several calls may come in one answer."""

    tools: list[Tool]
    choice: str = "auto"  # "auto" | "required" | "text" (tools listed, but the answer must be text)
    parallel: bool = True

    def limit_rounds(self, messages: list[dict[str, Any]], max_rounds: int) -> ToolPlan:
        """After `max_rounds` rounds of calls since the user last spoke, the answer must
        be text. Small models, handed a tool result, call the same tool again rather than
        answer; this ends the loop where the user is waiting (Home Assistant would go on
        for ten rounds). The tools stay in the prompt so its cached prefix still serves."""
        rounds = 0
        for m in reversed(messages):
            if m.get("role") == "user":
                break
            if m.get("role") == "assistant" and m.get("tool_calls"):
                rounds += 1
        if rounds >= max_rounds:
            return ToolPlan(self.tools, "text", self.parallel)
        return self


def parse_tools(raw: Any, choice_raw: Any = None, parallel_raw: Any = None) -> ToolPlan | None:
    """Validate `tools`, `tool_choice` and `parallel_tool_calls`; None when no tool
    may be called (none offered, or tool_choice "none")."""
    if raw is None or raw == []:
        if choice_raw not in (None, "none", "auto"):
            raise ApiError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw, list):
        raise ApiError("'tools' must be an array of objects", "tools")
    tools: list[Tool] = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise ApiError(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-." for c in name):
            raise ApiError(
                f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'", f"{where}.function.name"
            )
        if any(x.name == name for x in tools):
            raise ApiError(f"{where}: the tool name '{name}' is used twice", f"{where}.function.name")
        desc = f.get("description") or ""
        if not isinstance(desc, str):
            raise ApiError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ApiError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        tools.append(Tool(name, desc, params))
    if parallel_raw is not None and not isinstance(parallel_raw, bool):
        raise ApiError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    parallel = True if parallel_raw is None else parallel_raw
    if choice_raw is None or choice_raw == "auto":
        return ToolPlan(tools, "auto", parallel)
    if choice_raw == "none":
        return None
    if choice_raw == "required":
        return ToolPlan(tools, "required", parallel)
    if isinstance(choice_raw, dict) and isinstance(choice_raw.get("function"), dict):
        name = choice_raw["function"].get("name")
        if not any(t.name == name for t in tools):
            raise ApiError(f"'tool_choice' names '{name}', which is not among the tools", "tool_choice")
        return ToolPlan([t for t in tools if t.name == name], "required", False)
    raise ApiError(
        '\'tool_choice\' must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def _arguments_object(args: Any, where: str) -> dict[str, Any]:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ApiError(f"{where}.function.arguments is not valid JSON", where) from None
    if not isinstance(args, dict):
        raise ApiError(f"{where}.function.arguments must be a JSON object", where)
    return args


def history_calls(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """An assistant message's earlier `tool_calls`, as {"name", "arguments": object}."""
    raw = m.get("tool_calls")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(f"messages[{i}].tool_calls must be an array", f"messages[{i}].tool_calls")
    out = []
    for k, c in enumerate(raw):
        where = f"messages[{i}].tool_calls[{k}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ApiError(f"{where} must have a function with a name", where)
        out.append({"name": f["name"], "arguments": _arguments_object(f.get("arguments", {}), where)})
    return out


def _call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def prompt_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None, template_renders_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and `tools` to hand the chat template."""
    if template_renders_tools:
        out = []
        for i, m in enumerate(messages):
            calls = history_calls(m, i) if m.get("role") == "assistant" else []
            if calls:  # HF templates expect arguments as objects
                m = {**m, "tool_calls": [{"type": "function", "function": c} for c in calls]}
            out.append(m)
        return out, ([t.wire() for t in plan.tools] if plan else None)
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = history_calls(m, i)
            text = "\n".join(_call_text(c["name"], c["arguments"]) for c in calls)
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + text})
        elif role == "tool":
            body = m.get("content") or ""
            # Consecutive results share one user turn, as Qwen's template writes them.
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += f"\n<tool_response>\n{body}\n</tool_response>"
            else:
                out.append(
                    {"role": "user", "content": f"<tool_response>\n{body}\n</tool_response>", "_tool_turn": True}
                )
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_turn", None)
    if plan is not None:
        # One function per line, without the {"type": "function"} wrapper: SmolLM2-135M
        # calls tools from this listing, and answers in prose from the wrapped one.
        listing = "\n".join(
            json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
            for t in plan.tools
        )
        prompt = SYSTEM_PROMPT.format(tools=listing)
        # After the caller's system text, right before the conversation: placed first,
        # a small model forgets it by the time the user speaks.
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + prompt).strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _closed(schema: Any) -> Any:
    """A copy of a parameters schema whose objects take only the properties they list
    (unless they say otherwise): a tool's declared parameters are its contract, and
    without this a small model pads its calls with made-up keys."""
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _hoisted(tools: list[Tool]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each tool's (closed) parameters as a reference into one shared `$defs`, with the
    definitions of each tool (`$defs`/`definitions`, as Pydantic writes them) moved
    there under the tool's own prefix and every `$ref` of the tool rewritten to match:
    a tool's schema may refer to its own root ("#") and its own definitions, and those
    references must still hold once the tools are put side by side in one schema."""
    defs: dict[str, Any] = {}
    refs: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        prefix = f"t{i}_"
        params = dict(t.parameters)
        own = {**(params.pop("definitions", None) or {}), **(params.pop("$defs", None) or {})}

        def rewrite(node: Any) -> Any:
            if isinstance(node, list):
                return [rewrite(x) for x in node]
            if not isinstance(node, dict):
                return node
            out = {k: rewrite(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                for head in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(head):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(head) :]}"
                        break
                else:  # the tool's root, or a path under it
                    out["$ref"] = f"#/$defs/{prefix}args" + ref[1:]
            return out

        defs[f"{prefix}args"] = _closed(rewrite(params))
        for name, d in own.items():
            defs[f"{prefix}{name}"] = _closed(rewrite(d))
        refs.append({"$ref": f"#/$defs/{prefix}args"})
    return refs, defs


def grammar(
    plan: ToolPlan | None, text_schema: dict[str, Any] | None = None, thought: ThoughtRule | None = None
) -> str | None:
    """The Lark grammar (llguidance) for an answer under `plan` (None: no tools);
    `text_schema`, from a response_format, constrains the text branch to JSON too;
    `thought`, for a thinking model, puts the thought before the answer. None when
    nothing constrains the answer."""
    if thought is not None:
        return _thinking_grammar(plan, text_schema, thought)
    if plan is None:
        return (
            None
            if text_schema is None
            else "start: %json " + json.dumps({**text_schema, "x-guidance": JSON_STYLE}) + "\n"
        )
    if plan.choice == "text":
        if text_schema is not None:
            return "start: %json " + json.dumps({**text_schema, "x-guidance": JSON_STYLE}) + "\n"
        return "start: TEXT\nTEXT: /[^<](.|\\n)*/\n"
    lines = _call_rules(plan)
    if plan.choice == "required":
        lines.insert(0, "start: calls")
    elif text_schema is not None:
        lines.insert(0, "start: answer | calls")
        lines.append("answer: %json " + json.dumps({**text_schema, "x-guidance": JSON_STYLE}))
    else:
        lines.insert(0, "start: TEXT | calls")
        lines.append("TEXT: /[^<](.|\\n)*/")
    return "\n".join(lines) + "\n"


def _call_rules(plan: ToolPlan) -> list[str]:
    refs, defs = _hoisted(plan.tools)
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": ref},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t, ref in zip(plan.tools, refs)
    ]
    call_schema: dict[str, Any] = {"anyOf": one_of} if len(one_of) > 1 else one_of[0]
    call_schema = {**call_schema, "$defs": defs, "x-guidance": JSON_STYLE}
    return [
        "call: " + json.dumps(OPEN + "\n") + " %json " + json.dumps(call_schema) + " " + json.dumps("\n" + CLOSE),
        'calls: call ("\\n" call)*' if plan.parallel else "calls: call",
    ]


def _thinking_grammar(plan: ToolPlan | None, text_schema: dict[str, Any] | None, thought: ThoughtRule) -> str:
    """The thought first (see edgelm.server.thinking), whitespace, then the answer.
    Text may not begin with whitespace or "<" here, so that whitespace after the thought
    is WS's alone and "<" after it can only open a call: no tool call passes as text."""
    think, lines = thought.lark()
    lines.append("WS: /[ \\t\\r\\n]+/")
    calls = plan is not None and plan.choice != "text"
    if calls:
        assert plan is not None
        lines += _call_rules(plan)
    if text_schema is not None:
        lines.append("answer: %json " + json.dumps({**text_schema, "x-guidance": JSON_STYLE}))
        text, optional = "answer", False
    else:
        lines.append("TEXT: /[^<\\s](.|\\n)*/" if calls or plan is not None else "TEXT: /[^\\s](.|\\n)*/")
        text, optional = "TEXT", True
    if plan is not None and plan.choice == "required":
        body = "calls"
        optional = False
    elif calls:
        body = f"({text} | calls)"
    else:
        body = text
    lines.insert(0, f"start: {think} WS? {body}{'?' if optional else ''}")
    return "\n".join(lines) + "\n"


def parse_calls(text: str) -> list[ToolCall]:
    """The calls in an answer that took the call branch (the grammar made it well formed;
    a cut-off answer, at max_tokens, keeps only its complete calls)."""
    calls = []
    pos = 0
    while True:
        a = text.find(OPEN, pos)
        if a < 0:
            break
        b = text.find(CLOSE, a)
        if b < 0:
            break
        try:
            obj = json.loads(text[a + len(OPEN) : b])
        except json.JSONDecodeError:
            break
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments", {}), dict):
            calls.append(ToolCall(obj["name"], obj.get("arguments", {})))
        pos = b + len(CLOSE)
    return calls


class ToolStream:
    """Splits a streamed answer into content (passed on at once) and calls (held back
    until the end)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # None until the first character, then "text" or "calls"
        self.held = ""

    def feed(self, piece: str) -> str:
        if self.mode == "text":
            return piece
        self.held += piece
        if self.mode is None and self.held:
            self.mode = "calls" if self.held.startswith("<") else "text"
            if self.mode == "text":
                out, self.held = self.held, ""
                return out
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still held, the calls); content that only looked like a call start
        is given back as text."""
        if self.mode != "calls":
            return "", []
        calls = parse_calls(self.held)
        if not calls:
            return self.held, []
        return "", calls


class Reply:
    """One answer as it streams: the thought (thinking models), the content (passed on
    at once) and the tool calls (whole, at the end). `feed` gives (thought, content)
    pieces; `finish` the rest and the calls."""

    def __init__(
        self, plan: ToolPlan | None, style: ThinkingStyle | None = None, think: bool = False, opened: bool = False
    ) -> None:
        self.think = ThinkSplitter(style, opened) if style is not None and (think or opened) else None
        self.tools = ToolStream() if plan is not None and plan.choice != "text" else None

    def feed(self, piece: str) -> tuple[str, str]:
        thought, content = self.think.feed(piece) if self.think is not None else ("", piece)
        if self.tools is not None and content:
            content = self.tools.feed(content)
        return thought, content

    @property
    def holding_calls(self) -> bool:
        return self.tools is not None and self.tools.mode == "calls"

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        thought, content = self.think.finish() if self.think is not None else ("", "")
        if self.tools is None:
            return thought, content, []
        if content:
            content = self.tools.feed(content)
        rest, calls = self.tools.finish()
        return thought, content + rest, calls

    def whole(self, text: str) -> tuple[str, str, list[ToolCall]]:
        """A whole (not streamed) answer: its thought, content and calls."""
        t1, c1 = self.feed(text)
        t2, c2, calls = self.finish()
        return t1 + t2, c1 + c2, calls


# -- what an answer is generated under -----------------------------------------------------


async def answer_grammar(
    lm: LoadedModel, plan: ToolPlan | None, schema: dict[str, Any] | None, thought: ThoughtRule | None
) -> str | None:
    """The grammar for an answer: tools, a response schema and a thinking model's
    thought, in any combination (None: unconstrained). Compiled off the event loop (the
    first one also builds the grammar engine's view of the vocabulary)."""
    loop = asyncio.get_running_loop()
    try:
        if thought is None or (plan is None and schema is None and thought.budget is None):
            if not plan:
                return None if schema is None else await loop.run_in_executor(None, lm.grammars.json_schema, schema)
            source = grammar(plan, schema)
        else:
            source = grammar(plan, schema, thought)
        assert source is not None  # a plan or a thought always constrains
        return await loop.run_in_executor(None, lm.grammars.lark, source)
    except GrammarError as e:
        raise ApiError(str(e), "tools" if plan else "response_format", 400) from None


def answer_matcher(lm: LoadedModel, grammar: str | None, thought: ThoughtRule | None) -> Any:
    """A matcher for `grammar` (None: none), with the thought's token budget."""
    if grammar is None:
        return None
    m = lm.grammars.matcher(grammar)
    if thought is None or thought.budget is None:
        return m
    close = lm.grammars.prefix_masks(thought.style.close.encode())
    return ThoughtBudget(m, thought.budget, thought.style, thought.opened, lm.token_bytes, close)
