"""Chat templates: the Jinja2 template a GGUF file carries (`tokenizer.chat_template`,
Hugging Face's format), rendered into the prompt text for a list of chat messages.

    t = ChatTemplate(model.metadata.get("tokenizer.chat_template"), "<s>", "</s>")
    prompt = t.render([{"role": "user", "content": "Hi"}])

Why a sandbox: the template is code, and it comes from the model file, which is
untrusted input (anyone can publish a GGUF). Plain Jinja2 lets a template walk from
any object to Python's internals (`''.__class__.__mro__[1].__subclasses__()`, a
function's `__globals__`, ...) and from there to `os`. So templates run in Jinja2's
`ImmutableSandboxedEnvironment`, as Hugging Face's `apply_chat_template` does:
underscore and internal attributes are refused (here with an error, not a silent
empty value), known mutable containers cannot be modified, `range` is capped, and
no Python builtin (`open`, `__import__`, ...) is reachable. On top of that, rendering
is bounded so that a hostile template cannot exhaust the daemon: the output is capped
at `MAX_OUTPUT_CHARS`, no intermediate string or list may grow past that either
(checked on operators, calls, filters and lookups; `*` and `**` are checked before
they compute, which also keeps them from being constant-folded at compile time), and a
render that runs past `RENDER_TIMEOUT_S` stops at its next lookup, call, operator or
`range` step. (A loop with none of those in its body, over a long string, is the one
shape the deadline cannot interrupt.)

Every failure, whether a syntax error, a refused access, an undefined value, a type
error or the template's own `raise_exception(...)`, is a `ChatTemplateError`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

MAX_OUTPUT_CHARS = 4 * 1024 * 1024
"""Longest rendered prompt, and longest string or list a template may build."""
RENDER_TIMEOUT_S = 2.0
"""Longest a render may run (a real template takes milliseconds)."""

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, for models that carry no template of their own."""

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ((m['content'] or '') | trim) + '\n\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{%- if m['role'] != 'assistant' and ns.system -%}{{ ns.system }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ (m['content'] or '') | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma's turn format (system text opens the next user turn), for Gemma GGUFs
converted without a template."""

FALLBACK_TEMPLATES = {"gemma3": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma": GEMMA_TEMPLATE}
"""Templates by architecture, for model files that carry none."""

TAGS = (("<think>", "</think>"),)
"""The tag pairs a template may write around a thought (the first found is used)."""


@dataclass(frozen=True)
class ThinkingStyle:
    """What a chat template says about thinking."""

    open: str
    close: str
    switchable: bool  # the template reads `enable_thinking`


def template_style(source: str | None) -> ThinkingStyle | None:
    """The thinking style of a chat template's source, or None (not a thinking model)."""
    if not source:
        return None
    for open_tag, close_tag in TAGS:
        if open_tag in source and close_tag in source:
            return ThinkingStyle(open_tag, close_tag, "enable_thinking" in source)
    return None


class ChatTemplateError(ValueError):
    """The chat template is invalid, or rendering it failed; the message says why."""


_deadline: ContextVar[float] = ContextVar("edgelm_chat_deadline", default=math.inf)
_BIG_NUMBER = re.compile(r"\d{8,}")  # a width or precision past the output cap, in a format string


def _tick() -> None:
    if time.monotonic() > _deadline.get():
        raise SecurityError(f"the template ran longer than {RENDER_TIMEOUT_S} s")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_OUTPUT_CHARS:
        raise SecurityError(f"the template built a {type(value).__name__} longer than {MAX_OUTPUT_CHARS}")
    return value


def _small_ints(values: Any) -> None:
    for v in values:
        if isinstance(v, int) and abs(v) > MAX_OUTPUT_CHARS:
            raise SecurityError(f"the template passed an integer argument too large ({v})")


def _format_string(s: str) -> None:
    if _BIG_NUMBER.search(s):
        raise SecurityError("the template used a format string with a width or precision too large")


def _guard_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Size limits on a filter: its arguments after the value, and its result."""
    first = 1 if hasattr(f, "jinja_pass_arg") else 0  # index of the value (after context/environment)

    @functools.wraps(f)  # copies `jinja_pass_arg` too
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _small_ints(args[first + 1 :])
        _small_ints(kwargs.values())
        if name == "format" and len(args) > first and isinstance(args[first], str):
            _format_string(args[first])
        return _sized(f(*args, **kwargs))

    return guarded


class _Range:
    """What `range` gives templates: the sandbox's capped range, iterated under the deadline."""

    def __init__(self, *args: int) -> None:
        self._r = safe_range(*args)

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return self._r[i]

    def __iter__(self) -> Iterator[int]:
        for k, v in enumerate(self._r):
            if not k & 1023:
                _tick()
            yield v


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (Hugging Face marks the assistant's part
    for training with it): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return _sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return _sized(super().getitem(obj, argument))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _tick()
        _small_ints(args)
        _small_ints(kwargs.values())
        return _sized(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise SecurityError(f"the template built a {type(seq).__name__} longer than {MAX_OUTPUT_CHARS}")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right * abs(left).bit_length() > 65536:
                raise SecurityError(f"the template computed a number too large ({left} ** {right})")
        elif operator == "%" and isinstance(left, str):
            _format_string(left)
            _small_ints(right if isinstance(right, tuple) else (right,))
        return _sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:  # `value` is a str's format or format_map
            _format_string(value.__self__)
        return wrapped


def _range(*args: int) -> _Range:
    return _Range(*args)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        undefined=jinja2.Undefined,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.globals.pop("lipsum", None)  # unbounded work from one call, and no template uses it
    env.globals.update(range=_range, raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    return env


def _normalise(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shallow copies of the messages, with OpenAI content parts joined into one string
    (the form Hugging Face templates expect)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] is not an object")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ChatTemplateError(f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        out.append(m)
    return out


class ChatTemplate:
    """A chat template, compiled once; `None` means the model has none (ChatML is used)."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.is_default = source is None
        self.source: str = DEFAULT_TEMPLATE if source is None else source
        if not isinstance(self.source, str):
            raise ChatTemplateError(f"the chat template is a {type(self.source).__name__}, not a string")
        self.bos_token, self.eos_token = bos_token, eos_token
        self._thinking = template_style(self.source)
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"invalid chat template: {e.message} (line {e.lineno})") from None
        except Exception as e:
            raise ChatTemplateError(f"invalid chat template: {type(e).__name__}: {e}") from None

    @property
    def thinking(self) -> ThinkingStyle | None:
        """How the template writes a thought (None: the model does not think)."""
        return self._thinking

    @property
    def renders_tools(self) -> bool:
        """Whether the template writes the request's tools into the prompt itself."""
        return "tools" in self.source

    @classmethod
    def for_model(cls, source: str | None, architecture: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """The model's own template, else its architecture's turn format, else ChatML."""
        if source is None:
            source = FALLBACK_TEMPLATES.get(architecture)
        return cls(source, bos_token, eos_token)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`; `extra` become template variables too."""
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": _normalise(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        out: list[str] = []
        size = 0
        token = _deadline.set(time.monotonic() + RENDER_TIMEOUT_S)
        try:
            for piece in self._template.generate(context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(f"the chat template's output is longer than {MAX_OUTPUT_CHARS} characters")
                out.append(piece)
        except ChatTemplateError:
            raise
        except Exception as e:  # SecurityError, UndefinedError, TypeError, RecursionError, MemoryError, ...
            raise ChatTemplateError(f"rendering the chat template failed: {type(e).__name__}: {e}") from e
        finally:
            _deadline.reset(token)
        return "".join(out)
