"""Ollama's chat templates (Go's text/template), for a model pulled from the Ollama
registry whose GGUF carries no chat template of its own: the registry's template layer
is rendered here, with the data Ollama gives it.

    t = GoTemplate('{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}{{ end }}<|assistant|>')
    prompt = t.render([{"role": "user", "content": "Hi"}])

What a template sees (Ollama's template.Execute): when it mentions `.Messages`, one
rendering with `.System` (the system messages' text, joined by blank lines), `.Messages`
(consecutive messages of one role merged, tool results apart), `.Tools`, `.Think`,
`.ThinkLevel`, `.IsThinkSet` and an empty `.Response`. Otherwise the legacy form: one
rendering per exchange of `.System`, `.Prompt` and `.Response`, and for the last the
template cut after its first `.Response`, so it ends where the model's answer begins.
Messages and tools are the wire objects (`{"role", "content", "tool_calls": [{"function":
{"name", "arguments"}}]}`); a Go field name finds its JSON key (`.ToolCalls` →
`tool_calls`, `.Function.Name` → `name`), and an object printed is its JSON, as
Ollama's types print themselves.

The language, as far as these templates use it: text and `{{ pipeline }}` actions with
`{{-`/`-}}` trimming and `{{/* comments */}}`; `if`/`else if`/`else`, `range` (with
`$i, $v :=`, `else`, `break` and `continue`), `with`, `$x := ...` and `$x = ...`; pipelines with `|`; fields,
variables, `$`, string, raw-string and number literals, `true`/`false`/`nil`, and
parenthesised pipelines; the functions `and or not eq ne lt le gt ge len index slice
print printf println json` and Ollama's `currentDate`, `yesterdayDate`. `define`,
`template` and `block` are refused (GoTemplateError), as is anything else the parser
does not know, so a template either renders as Ollama would or is not used.

The template comes from the network: rendering is bounded like the Jinja sandbox
(edgelm.prompt.chat: output, and steps, capped); Go templates have no loops but `range`
over the data, and no access to anything but the values handed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from edgelm.prompt.chat import MAX_OUTPUT_CHARS, ChatTemplateError, ThinkingStyle, template_style

MAX_STEPS = 1_000_000
"""Most nodes a rendering may evaluate."""
MAX_SOURCE = 256 * 1024

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<str>"(?:\\.|[^"\\])*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?[0-9]+(?:\.[0-9]+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<comma>,)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
  | (?P<field>(?:\.[A-Za-z0-9_]+)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
)""",
    re.X,
)


class GoTemplateError(ChatTemplateError):
    """A Go template this renderer cannot run, or a failed rendering."""


# -- parsing -------------------------------------------------------------------------------
# Nodes: ("text", s) ("out", pipe) ("break",) ("continue",) ("if", [(pipe, body)], else) ("range", (k, v), pipe, body,
# else) ("with", pipe, body, else) ("set", name, pipe). A pipe is a list of commands, a
# command a list of arguments: ("lit", value) ("field", [names]) ("var", name, [names])
# ("fn", name) ("pipe", pipe).


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(src):
        if not src[pos:].strip():
            break
        m = _TOKEN.match(src, pos)
        if m is None or m.end() == pos:
            raise GoTemplateError(f"cannot read {src[pos : pos + 30]!r} in a template action")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _parse_pipe(toks: list[tuple[str, str]], i: int, stop: tuple[str, ...] = ()) -> tuple[list[Any], int]:
    cmds: list[list[Any]] = [[]]
    while i < len(toks) and toks[i][0] not in stop:
        kind, text = toks[i]
        if kind == "pipe":
            cmds.append([])
        elif kind == "lp":
            sub, i = _parse_pipe(toks, i + 1, ("rp",))
            if i >= len(toks):
                raise GoTemplateError("unclosed '(' in a template action")
            cmds[-1].append(("pipe", sub))
        elif kind == "str":
            cmds[-1].append(("lit", json.loads(text)))
        elif kind == "raw":
            cmds[-1].append(("lit", text[1:-1]))
        elif kind == "num":
            cmds[-1].append(("lit", float(text) if "." in text else int(text)))
        elif kind == "field":
            cmds[-1].append(("field", [] if text == "." else text[1:].split(".")))
        elif kind == "var":
            name, *rest = text.split(".")
            cmds[-1].append(("var", name, rest))
        elif kind == "ident":
            if text in ("true", "false"):
                cmds[-1].append(("lit", text == "true"))
            elif text == "nil":
                cmds[-1].append(("lit", None))
            elif text in _FUNCS:
                cmds[-1].append(("fn", text))
            else:
                raise GoTemplateError(f"the template calls {text!r}, which edgelm does not have")
        else:
            raise GoTemplateError(f"unexpected {text!r} in a template action")
        i += 1
    if any(not c for c in cmds):
        raise GoTemplateError("an empty command in a template pipeline")
    return cmds, i


def _pipe(text: str) -> list[Any]:
    toks = _tokens(text)
    cmds, i = _parse_pipe(toks, 0)
    if i != len(toks):
        raise GoTemplateError(f"unexpected {toks[i][1]!r} in a template action")
    return cmds


def _parse(src: str) -> list[Any]:
    # Pieces: text and actions, trimmed as the markers say.
    pieces: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if pieces and pieces[-1][0] == "trim":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            pieces.append(("act", body))
        if m.group(3):
            pieces.append(("trim", ""))
        pos = m.end()
    tail = src[pos:]
    if pieces and pieces[-1][0] == "trim":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))

    root: list[Any] = []
    stack: list[tuple[list[Any], list[Any]]] = []  # (node, the body being filled)
    body = root
    for kind, text in pieces:
        if kind == "text":
            if text:
                body.append(("text", text))
            continue
        word = text.split(None, 1)[0] if text else ""
        rest = text[len(word) :].strip()
        if word == "if":
            node: list[Any] = ["if", [[_pipe(rest), []]], None]
            body.append(node)
            stack.append((node, body))
            body = node[1][0][1]
        elif word == "range":
            names: tuple[str | None, str | None] = (None, None)
            rm = re.match(r"^(\$[A-Za-z0-9_]*)\s*(?:,\s*(\$[A-Za-z0-9_]*)\s*)?:=\s*(.*)$", rest, re.S)
            if rm:
                names = (rm.group(1), rm.group(2)) if rm.group(2) else (None, rm.group(1))
                rest = rm.group(3)
            node = ["range", names, _pipe(rest), [], None]
            body.append(node)
            stack.append((node, body))
            body = node[3]
        elif word == "with":
            node = ["with", _pipe(rest), [], None]
            body.append(node)
            stack.append((node, body))
            body = node[2]
        elif word == "else":
            if not stack:
                raise GoTemplateError("{{ else }} outside if, range or with")
            node, _ = stack[-1]
            if rest.startswith("if ") and node[0] == "if":
                node[1].append([_pipe(rest[3:]), []])
                body = node[1][-1][1]
            elif not rest:
                node[-1] = []
                body = node[-1]
            else:
                raise GoTemplateError(f"{{{{ else {rest[:30]} }}}} is not supported")
        elif word == "end":
            if not stack:
                raise GoTemplateError("{{ end }} without an if, range or with")
            _, body = stack.pop()
        elif word in ("break", "continue") and not rest:
            if not any(node[0] == "range" for node, _ in stack):
                raise GoTemplateError(f"{{{{ {word} }}}} outside a range")
            body.append((word,))
        elif word in ("define", "template", "block"):
            raise GoTemplateError(f"{{{{ {word} }}}} is not supported")
        else:
            am = re.match(r"^(\$[A-Za-z0-9_]*)\s*(:=|=)\s*(.*)$", text, re.S)
            if am:
                body.append(("set", am.group(1), _pipe(am.group(3)), am.group(2) == ":="))
            else:
                body.append(("out", _pipe(text)))
    if stack:
        raise GoTemplateError(f"unclosed {{{{ {stack[-1][0][0]} }}}} in the template")
    return root


def _mentions(nodes: list[Any], name: str) -> bool:
    """Whether a parsed template refers to the field `name` anywhere."""

    def walk(x: Any) -> bool:
        if isinstance(x, (list, tuple)):
            if len(x) >= 2 and x[0] == "field" and isinstance(x[1], list) and x[1][:1] == [name]:
                return True
            if len(x) >= 3 and x[0] == "var" and isinstance(x[2], list) and x[1] == "$" and x[2][:1] == [name]:
                return True
            return any(walk(y) for y in x)
        return False

    return walk(nodes)


def _cut_after(nodes: list[Any], name: str, state: dict[str, bool] | None = None) -> list[Any]:
    """The template up to its first mention of `name`, all else after it dropped, at
    every depth (Ollama's legacy rendering ends where the answer would begin: its
    deleteNode keeps the node with the field and deletes every node after it)."""
    state = {"cut": False} if state is None else state
    out: list[Any] = []
    for n in nodes:
        if state["cut"]:
            break
        kind = n[0]
        if kind == "if":
            branches = []
            for cond, body in n[1]:
                if state["cut"]:
                    break
                if _mentions([cond], name):
                    state["cut"] = True
                    branches.append([cond, []])
                    break
                branches.append([cond, _cut_after(body, name, state)])
            rest = None if n[2] is None or state["cut"] else _cut_after(n[2], name, state)
            out.append(["if", branches, rest])
        elif kind in ("range", "with"):
            head = n[2] if kind == "range" else n[1]
            if _mentions([head], name):
                state["cut"] = True
                out.append(list(n[:-2]) + [[], None])
                break
            body = _cut_after(n[-2], name, state)
            rest = None if n[-1] is None or state["cut"] else _cut_after(n[-1], name, state)
            out.append(list(n[:-2]) + [body, rest])
        else:
            out.append(n)
            if _mentions([n], name):
                state["cut"] = True
    return out


# -- evaluating ------------------------------------------------------------------------------


def _truth(v: Any) -> bool:
    return not (
        v is None
        or v is False
        or v == 0
        and not isinstance(v, bool)
        or v == ""
        or (isinstance(v, (list, dict, tuple)) and len(v) == 0)
    )


def _json(v: Any) -> str:
    # Go's json.Marshal: compact, and <, >, & escaped.
    s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return _json(v)
    return str(v)


def _field(v: Any, name: str) -> Any:
    """A Go field of a value: a key as it is, in snake_case, or with a lower-case first
    letter (`ToolCalls` → `tool_calls`, `Name` → `name`)."""
    if not isinstance(v, dict):
        return None
    for key in (name, re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower(), name[:1].lower() + name[1:]):
        if key in v:
            return v[key]
    return None


def _cmp(op: Callable[[Any, Any], bool]) -> Callable[..., bool]:
    def f(a: Any, b: Any) -> bool:
        try:
            return bool(op(a, b))
        except TypeError:
            raise GoTemplateError(f"cannot compare {type(a).__name__} with {type(b).__name__}") from None

    return f


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        try:
            v = v[k]
        except (KeyError, IndexError, TypeError):
            raise GoTemplateError(f"index {k!r} is out of range") from None
    return v


def _slice(v: Any, *ij: Any) -> Any:
    if not isinstance(v, (list, str)) or len(ij) > 2 or not all(isinstance(x, int) for x in ij):
        raise GoTemplateError("slice takes a list or string and up to two integers")
    i = ij[0] if ij else 0
    j = ij[1] if len(ij) > 1 else len(v)
    if not 0 <= i <= j <= len(v):
        raise GoTemplateError(f"slice bounds [{i}:{j}] out of range of {len(v)}")
    return v[i:j]


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        verb = m.group(1)
        if verb == "%":
            return "%"
        v = next(it, None)
        return json.dumps(v) if verb == "q" else _text(v)

    return re.sub(r"%(?:[-+# 0]*\d*(?:\.\d+)?)([svdqf%])", one, str(fmt))


_FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not _truth(v),
    "eq": lambda a, *bs: any(_cmp(lambda x, y: x == y)(a, b) for b in bs),
    "ne": _cmp(lambda a, b: a != b),
    "lt": _cmp(lambda a, b: a < b),
    "le": _cmp(lambda a, b: a <= b),
    "gt": _cmp(lambda a, b: a > b),
    "ge": _cmp(lambda a, b: a >= b),
    "len": lambda v: len(v) if isinstance(v, (list, dict, str)) else 0,
    "index": _index,
    "slice": _slice,
    "print": lambda *a: "".join(_text(x) for x in a),
    "println": lambda *a: " ".join(_text(x) for x in a) + "\n",
    "printf": _printf,
    "json": _json,
    "currentDate": lambda *a: date.today().isoformat(),
    "yesterdayDate": lambda *a: (date.today() - timedelta(days=1)).isoformat(),
    "and": lambda *a: a[-1],
    "or": lambda *a: a[-1],  # evaluated lazily in _command
}


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Run:
    def __init__(self, data: dict[str, Any]) -> None:
        self.root = data
        self.out: list[str] = []
        self.size = 0
        self.steps = 0

    def write(self, s: str) -> None:
        self.size += len(s)
        if self.size > MAX_OUTPUT_CHARS:
            raise GoTemplateError(f"the template's output is longer than {MAX_OUTPUT_CHARS} characters")
        self.out.append(s)

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise GoTemplateError(f"the template took more than {MAX_STEPS} steps")

    def arg(self, a: Any, dot: Any, scope: list[dict[str, Any]]) -> Any:
        kind = a[0]
        if kind == "lit":
            return a[1]
        if kind == "field":
            v = dot
            for name in a[1]:
                v = _field(v, name)
            return v
        if kind == "var":
            frame = next((f for f in reversed(scope) if a[1] in f), None)
            if frame is None:
                raise GoTemplateError(f"undefined variable {a[1]}")
            v = frame[a[1]]
            for name in a[2]:
                v = _field(v, name)
            return v
        if kind == "pipe":
            return self.pipe(a[1], dot, scope)
        raise GoTemplateError(f"function {a[1]} used as a value")

    def command(self, cmd: list[Any], dot: Any, scope: list[dict[str, Any]], piped: list[Any]) -> Any:
        self.tick()
        head = cmd[0]
        if head[0] != "fn":
            if len(cmd) > 1 or piped:
                raise GoTemplateError("only functions take arguments")
            return self.arg(head, dot, scope)
        name = head[1]
        if name in ("and", "or"):  # Go evaluates these lazily: the first that decides
            args = cmd[1:]
            v: Any = None
            for a in args:
                v = self.arg(a, dot, scope)
                if _truth(v) != (name == "and"):
                    return v
            for v in piped:
                if _truth(v) != (name == "and"):
                    return v
            return v
        return _FUNCS[name](*[self.arg(a, dot, scope) for a in cmd[1:]], *piped)

    def pipe(self, cmds: list[Any], dot: Any, scope: list[dict[str, Any]]) -> Any:
        v: list[Any] = []
        for cmd in cmds:
            v = [self.command(cmd, dot, scope, v)]
        return v[0]

    def nodes(self, nodes: list[Any], dot: Any, scope: list[dict[str, Any]]) -> None:
        for n in nodes:
            self.tick()
            kind = n[0]
            if kind == "text":
                self.write(n[1])
            elif kind == "break":
                raise _Break
            elif kind == "continue":
                raise _Continue
            elif kind == "out":
                self.write(_text(self.pipe(n[1], dot, scope)))
            elif kind == "set":  # `:=` declares in this block; `=` sets where it was declared
                v = self.pipe(n[2], dot, scope)
                frame = next((f for f in reversed(scope) if n[1] in f), None) if not n[3] else None
                if not n[3] and frame is None:
                    raise GoTemplateError(f"undefined variable {n[1]}")
                (frame if frame is not None else scope[-1])[n[1]] = v
            elif kind == "if":
                for cond, body in n[1]:
                    if _truth(self.pipe(cond, dot, scope)):
                        self.nodes(body, dot, [*scope, {}])
                        break
                else:
                    if n[2] is not None:
                        self.nodes(n[2], dot, [*scope, {}])
            elif kind == "with":
                v = self.pipe(n[1], dot, scope)
                if _truth(v):
                    self.nodes(n[2], v, [*scope, {}])
                elif n[3] is not None:
                    self.nodes(n[3], dot, [*scope, {}])
            elif kind == "range":
                v = self.pipe(n[2], dot, scope)
                items = list(v.items()) if isinstance(v, dict) else list(enumerate(v)) if isinstance(v, list) else []
                if not items and n[4] is not None:
                    self.nodes(n[4], dot, [*scope, {}])
                for k, item in items:
                    names: dict[str, Any] = {}
                    if n[1][0]:
                        names[n[1][0]] = k
                    if n[1][1]:
                        names[n[1][1]] = item
                    try:
                        self.nodes(n[3], item, [*scope, names])
                    except _Continue:
                        continue
                    except _Break:
                        break


class GoTemplate:
    """A parsed Ollama template, rendered as Ollama renders it (see the module doc).
    It answers to what edgelm.prompt.chat.ChatTemplate answers to."""

    def __init__(self, source: str) -> None:
        if len(source) > MAX_SOURCE:
            raise GoTemplateError(f"the template is longer than {MAX_SOURCE} characters")
        self.source = source
        self.is_default = False
        self._nodes = _parse(source)
        self._messages = _mentions(self._nodes, "Messages")
        self._legacy_last = _cut_after(self._nodes, "Response")

    @property
    def thinking(self) -> ThinkingStyle | None:
        return template_style(self.source)

    @property
    def renders_tools(self) -> bool:
        return _mentions(self._nodes, "Tools")

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        think = {
            "Think": bool(extra.get("enable_thinking")),
            "ThinkLevel": str(extra.get("reasoning_effort") or ""),
            "IsThinkSet": "enable_thinking" in extra,
        }
        system = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
        collated: list[dict[str, Any]] = []
        for m in messages:
            if collated and collated[-1].get("role") == m.get("role") and m.get("role") != "tool":
                collated[-1] = {
                    **collated[-1],
                    "content": f"{collated[-1].get('content') or ''}\n\n{m.get('content') or ''}",
                }
            else:
                collated.append(dict(m))
        try:
            if self._messages:
                run = _Run({})
                data = {"System": system, "Messages": collated, "Tools": tools or [], "Response": "", **think}
                run.nodes(self._nodes, data, [{"$": data}])
                return "".join(run.out)
            return self._legacy(collated, think)
        except GoTemplateError:
            raise
        except (RecursionError, MemoryError, TypeError, ValueError) as e:
            raise GoTemplateError(f"rendering the template failed: {type(e).__name__}: {e}") from None

    def _legacy(self, messages: list[dict[str, Any]], think: dict[str, Any]) -> str:
        run = _Run({})
        system = prompt = response = ""

        def execute(nodes: list[Any]) -> None:
            data = {"System": system, "Prompt": prompt, "Response": response, **think}
            run.nodes(nodes, data, [{"$": data}])

        for m in messages:
            role, content = m.get("role"), str(m.get("content") or "")
            if role == "system":
                if prompt or response:
                    execute(self._nodes)
                    system = prompt = response = ""
                system = content
            elif role == "user":
                if response:
                    execute(self._nodes)
                    system = prompt = response = ""
                prompt = content
            elif role == "assistant":
                response = content
        execute(self._legacy_last)
        return "".join(run.out)
