"""Thinking models (Qwen3, DeepSeek-R1 distills, SmolLM3): the thought comes back apart
from the answer.

Such a model writes its reasoning first, between tags, then the answer:

    <think>
    The user wants the kitchen light on; HassTurnOn takes a name.
    </think>

    <tool_call>
    {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}
    </tool_call>

What a model can do is read from its chat template: one that writes `<think>` and
`</think>` is a thinking model, and if it reads `enable_thinking` (Hugging Face's
switch, as Qwen3's template does: false adds an empty `<think>\n\n</think>\n\n` to the
generation prompt, so the model answers at once) thinking can be turned off. A template
whose generation prompt ends with `<think>` (Qwen3-Thinking-2507, DeepSeek-R1) opens
the thought itself: the output starts inside it.

What a request asks for (`Thinking`):
- Ollama: `think` true/false, or a level "high"/"medium"/"low" (Ollama's gpt-oss
  levels; a level means on, and is handed to the template as `reasoning_effort`, which
  templates with effort levels read and Qwen3's ignores). Unset means on for a thinking
  model, as in Ollama and in Hugging Face's templates. `think: true` for a model that
  cannot think is a 400 (Ollama's answer); false and null always work.
- OpenAI: `chat_template_kwargs: {"enable_thinking": ...}` (vLLM, llama-server),
  top-level `enable_thinking` (Qwen's own API) or `reasoning_effort` ("none" = off);
  `reasoning_format: "none"` leaves the thought in the content (llama-server).
  Asking a model that cannot think is not an error there (vLLM and llama-server ignore
  template switches a template does not read).
- Both: `thinking_budget` (Qwen's API name; Ollama: in `options`), the most tokens the
  thought may take: after that many, only the closing tag may come (`ThoughtBudget`
  narrows the grammar's masks), and the model answers. On a board generating 5 tokens
  a second, an unbounded Qwen3 thought is minutes.

The split (`ThinkSplitter`) is a small state machine over the streamed text, as
Ollama's `thinking.Parser` and llama.cpp's reasoning parser do it: whitespace before the
opening tag and around the thought is dropped, a tag cut across tokens is held until it
is whole, an answer that does not open with the tag has no thought, and a stream that
ends inside the thought (max_tokens) leaves it all thought.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelm.prompt.chat import ThinkingStyle
from edgelm.prompt.chat import template_style as template_style  # re-exported: where thinking is told apart
from edgelm.server.params import ApiError

LEVELS = ("low", "medium", "high")
MAX_BUDGET = 1 << 20


@dataclass(frozen=True)
class Thinking:
    """What one request gets: thinking on or off, the level asked for (None: none),
    the thought's token budget (None: unbounded) and whether the thought is split
    out of the answer."""

    on: bool
    level: str | None = None
    budget: int | None = None
    split: bool = True

    def template_vars(self, style: ThinkingStyle | None) -> dict[str, Any]:
        """What the chat template is told (only a thinking template hears anything)."""
        if style is None:
            return {}
        out: dict[str, Any] = {"enable_thinking": self.on}
        if self.on and self.level is not None:
            out["reasoning_effort"] = self.level
        return out


OFF = Thinking(False)


def _budget(raw: Any, field: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != int(raw) or not 1 <= raw <= MAX_BUDGET:
        raise ApiError(f"'{field}' must be a whole number of tokens from 1 to {MAX_BUDGET}", field)
    return int(raw)


def _no_thinking(model: str) -> ApiError:
    return ApiError(
        f"'{model}' does not support thinking (its chat template has no thinking section); "
        "leave 'think' out or set it to false",
        "think",
        400,
    )


def from_ollama(raw: Any, budget_raw: Any, style: ThinkingStyle | None, model: str) -> Thinking:
    """Ollama's `think` (bool, level, or null) and `options.thinking_budget`."""
    if raw is None:
        want: bool | None = None
        level = None
    elif isinstance(raw, bool):
        want, level = raw, None
    elif isinstance(raw, str) and raw.lower() in ("false", "none", "true"):
        want, level = raw.lower() == "true", None
    elif isinstance(raw, str) and raw.lower() in (*LEVELS, "max"):
        want, level = True, "high" if raw.lower() == "max" else raw.lower()
    else:
        raise ApiError('\'think\' must be true, false, "high", "medium" or "low"', "think")
    budget = _budget(budget_raw, "options.thinking_budget")
    if style is None:
        if want:
            raise _no_thinking(model)
        return OFF
    if want is False:
        return OFF
    return Thinking(True, level, budget)


def from_openai(body: dict[str, Any], style: ThinkingStyle | None) -> Thinking:
    """The OpenAI API's ways of asking (see the module doc)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ApiError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    want: bool | None = None
    for where, value in (
        ("chat_template_kwargs.enable_thinking", (kwargs or {}).get("enable_thinking")),
        ("enable_thinking", body.get("enable_thinking")),
    ):
        if value is not None:
            if not isinstance(value, bool):
                raise ApiError(f"'{where}' must be a boolean", where)
            want = value
    level = None
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", *LEVELS):
            raise ApiError(
                '\'reasoning_effort\' must be "none", "minimal", "low", "medium" or "high"', "reasoning_effort"
            )
        if effort == "none":
            want = False if want is None else want
        else:
            level = "low" if effort == "minimal" else effort
            want = True if want is None else want
    fmt = body.get("reasoning_format")
    if fmt is not None and fmt not in ("none", "auto", "deepseek", "deepseek-legacy"):
        raise ApiError('\'reasoning_format\' must be "none", "auto" or "deepseek"', "reasoning_format")
    budget = _budget(body.get("thinking_budget"), "thinking_budget")
    if style is None or want is False:
        return OFF
    return Thinking(True, level, budget, split=fmt != "none")


def forced_open(prompt: str, style: ThinkingStyle | None) -> bool:
    """Whether the rendered prompt opened the thought itself (the output starts in it)."""
    return style is not None and prompt.rstrip().endswith(style.open)


@dataclass(frozen=True)
class ThoughtRule:
    """The thought in an answer's grammar: what comes before the answer proper."""

    style: ThinkingStyle
    opened: bool  # the prompt opened it
    required: bool  # the answer must begin with a thought (a budget was asked for)
    budget: int | None

    def lark(self) -> tuple[str, list[str]]:
        """The expression that goes before the answer in `start`, and its rules. The
        thought is lazy: it ends at the first closing tag (a greedy lexeme would run on
        into the tag and fail there; llguidance does not back off). The budget is not in
        the grammar: `ThoughtBudget` applies it to the grammar's masks."""
        rules = [f"thought[lazy]: /(?s:.*){_regex_escape(self.style.close)}/"]
        if self.opened:
            rules.append("think: thought")
            return "think", rules
        rules.append(f"think: {_lark_string(self.style.open)} thought")
        return ("think" if self.required else "think?"), rules


def thought_rule(thinking: Thinking, style: ThinkingStyle | None, opened: bool) -> ThoughtRule | None:
    """The grammar's thought for a request, or None when the answer has none."""
    if style is None or not (thinking.on or opened):
        return None
    return ThoughtRule(style, opened, thinking.budget is not None, thinking.budget if thinking.on else None)


class ThoughtBudget:
    """A grammar matcher (llguidance's `LLMatcher`, as the scheduler drives it) with a
    token budget on the thought: once the thought has taken `budget` tokens, only tokens
    that go on with the closing tag are allowed, and the answer follows. The grammar's
    lazy thought takes the tag at any point, so the two masks always agree.

    `close_masks[k]`: the tokens whose bytes begin the rest of the closing tag after
    its first k bytes (as little-endian u32 bitmasks, see `Grammars.prefix_masks`)."""

    def __init__(
        self,
        inner: Any,
        budget: int,
        style: ThinkingStyle,
        opened: bool,
        token_bytes: Callable[[int], bytes],
        close_masks: list[np.ndarray],
    ) -> None:
        self.inner = inner
        self.budget = budget
        self.open, self.close = style.open.encode(), style.close.encode()
        self.token_bytes = token_bytes
        self.close_masks = close_masks
        self.state = "thought" if opened else "before"  # then "after"
        self.seen = b""  # before: the output so far; in the thought: its last bytes
        self.n_thought = 0

    def compute_bitmask(self) -> bytes:
        mask: bytes = self.inner.compute_bitmask()
        if self.state != "thought" or self.n_thought < self.budget:
            return mask
        k = _overlap(self.seen, self.close)
        allowed = self.close_masks[k]
        words = np.frombuffer(mask, dtype="<u4").copy()
        n = min(len(words), len(allowed))
        words[:n] &= allowed[:n]
        words[n:] = 0
        return words.tobytes()

    def consume_token(self, tok: int) -> bool:
        ok = bool(self.inner.consume_token(tok))
        b = self.token_bytes(tok)
        if self.state == "before":
            self.seen += b
            lead = self.seen.lstrip()
            if lead.startswith(self.open):
                self.state, self.seen = "thought", lead[len(self.open) :]
                self._closed()
            elif not self.open.startswith(lead):
                self.state = "after"  # no thought (the grammar allowed none)
        elif self.state == "thought":
            self.n_thought += 1
            self.seen = (self.seen + b)[-(len(self.close) + len(b)) :]
            self._closed()
        return ok

    def _closed(self) -> None:
        if self.close in self.seen:
            self.state = "after"

    def is_stopped(self) -> bool:
        return bool(self.inner.is_stopped())

    def is_error(self) -> bool:
        return bool(self.inner.is_error())


def _overlap(s: bytes, tag: bytes) -> int:
    """The length of the longest end of `s` that begins `tag` (short of all of it)."""
    for n in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0


def _lark_string(s: str) -> str:
    import json

    return json.dumps(s)


def _regex_escape(s: str) -> str:
    return "".join("\\" + c if c in "\\/.^$*+?()[]{}|-" else c for c in s)


class ThinkSplitter:
    """Splits streamed text into (thought, answer) pieces; see the module doc."""

    def __init__(self, style: ThinkingStyle, opened: bool = False) -> None:
        self.open, self.close = style.open, style.close
        # "before": looking for the opening tag; "lead": in the thought, eating its leading
        # whitespace; "thought"; "gap": after the closing tag, eating whitespace; "answer".
        self.state = "lead" if opened else "before"
        self.held = ""
        self.thought = ""  # the whole thought so far (for non-streamed answers)

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        thought, answer = [], []
        while True:
            step = self._step()
            if step is None:
                break
            t, a = step
            thought.append(t)
            answer.append(a)
        t, a = "".join(thought), "".join(answer)
        self.thought += t
        return t, a

    def _step(self) -> tuple[str, str] | None:
        """One transition over the held text: (thought, answer) given out, or None
        when more text is needed (or all is given)."""
        h = self.held
        if self.state == "before":
            lead = h.lstrip()
            if lead.startswith(self.open):
                self.held = lead[len(self.open) :]
                self.state = "lead"
                return "", ""
            if not lead or self.open.startswith(lead):
                return None  # whitespace, or a part of the tag: wait
            self.held, self.state = "", "answer"
            return "", h
        if self.state == "lead":
            lead = h.lstrip()
            if not lead:
                self.held = ""
                return None
            self.held, self.state = lead, "thought"
            return "", ""
        if self.state == "thought":
            at = h.find(self.close)
            if at >= 0:
                self.held, self.state = h[at + len(self.close) :], "gap"
                return h[:at].rstrip(), ""
            keep = _partial_suffix(h, self.close)
            # Trailing whitespace may be the last before the closing tag: held too.
            body = h[: len(h) - keep]
            cut = len(body.rstrip())
            if cut == 0:
                return None
            self.held = h[cut:]
            return h[:cut], ""
        if self.state == "gap":
            lead = h.lstrip()
            if not lead:
                self.held = ""
                return None
            self.held, self.state = "", "answer"
            return "", lead
        if not h:
            return None
        self.held = ""
        return "", h

    def finish(self) -> tuple[str, str]:
        """What is still held, at the end of the stream."""
        h, self.held = self.held, ""
        if self.state in ("lead", "thought"):
            t = h.rstrip()
            self.thought += t
            return t, ""
        if self.state == "before":
            return "", h
        return "", h if self.state == "answer" else ""


def _partial_suffix(s: str, tag: str) -> int:
    """The length of the longest end of `s` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0
