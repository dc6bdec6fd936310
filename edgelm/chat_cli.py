"""`edgelm run NAME`: a chat in the terminal, with the model's chat template.

With no prompt and a terminal on stdin it is a session:

    >>> Send a message (/? for help)
    >>> What is the capital of France?
    The capital of France is Paris.

    >>> \"\"\"A message
    ... over several lines\"\"\"

The session keeps the conversation (each answer is generated for the whole history),
and readline keeps the lines typed (arrows, editing). `/bye` or Ctrl-D ends it; Ctrl-C
stops the answer being written and the session goes on (the part written stays in the
history); Ctrl-C at the prompt says how to leave. `/clear` forgets the conversation.
A thinking model's thought is shown dimmed before the answer (`--nothink` turns
thinking off; `--hidethinking` keeps it from the screen).

With a prompt argument, or text piped to stdin (both: the piped text, then the prompt),
it answers once and exits; the answer alone goes to stdout, a thought to stderr.

The answer comes from the running daemon when one answers (`edgelm.client`: the model
is loaded there, once, and shared with other clients), else from the model loaded in
this process. Either way a name that is not there yet is pulled first, as `ollama run`
does. `--raw` writes a plain continuation of the prompt, without the template.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TextIO

from edgelm import EdgelmError, modelinfo, store
from edgelm.client import ClientError, Daemon
from edgelm.prompt.chat import ChatTemplate
from edgelm.prompt.gotemplate import GoTemplate, GoTemplateError

HELP = """Available commands:
  /clear          forget the conversation so far
  /bye            end the session (or Ctrl-D)
  /?, /help       this help

Use \"\"\" to begin a message of several lines, and \"\"\" again to end it.
Ctrl-C stops an answer; the session goes on."""


class Backend(Protocol):
    name: str

    def chat(self, messages: list[dict[str, Any]], think: bool | None) -> Iterator[tuple[str, str]]:
        """("thinking" | "content", text) pieces of the answer, as they come."""
        ...

    def complete(self, prompt: str) -> Iterator[str]:
        """A plain continuation of `prompt`."""
        ...


class DaemonBackend:
    def __init__(self, daemon: Daemon, name: str, options: dict[str, Any]) -> None:
        self.daemon, self.name, self.options = daemon, name, options

    def chat(self, messages: list[dict[str, Any]], think: bool | None) -> Iterator[tuple[str, str]]:
        body: dict[str, Any] = {"model": self.name, "messages": messages, "stream": True, "options": self.options}
        if think is not None:
            body["think"] = think
        for line in self.daemon.stream("/api/chat", body):
            msg = line.get("message") or {}
            if msg.get("thinking"):
                yield "thinking", str(msg["thinking"])
            if msg.get("content"):
                yield "content", str(msg["content"])
            if line.get("done"):
                n, ns = int(line.get("eval_count") or 0), int(line.get("eval_duration") or 0)
                yield (
                    "stats",
                    (
                        f"prompt tokens evaluated: {line.get('prompt_eval_count', 0)} (the rest cached), "
                        f"answer tokens: {n}" + (f", {n / (ns / 1e9):.1f} tokens/s" if ns else "")
                    ),
                )

    def complete(self, prompt: str) -> Iterator[str]:
        for line in self.daemon.stream(
            "/api/generate",
            {"model": self.name, "prompt": prompt, "raw": True, "stream": True, "options": self.options},
        ):
            if line.get("response"):
                yield str(line["response"])


class LocalBackend:
    """The model loaded in this process."""

    def __init__(
        self,
        path: Path,
        name: str,
        entry: store.Entry | None,
        st: store.Store | None,
        options: dict[str, Any],
        threads: int | None = None,
    ) -> None:
        from edgelm import Model

        self.name = name
        self.model = Model(path, n_threads=threads)
        native = self.model.native
        md = self.model.metadata
        src = md.get("tokenizer.chat_template")
        bos = native.detokenize([native.bos], True) if native.bos is not None else ""
        eos = native.detokenize([native.eos], True) if native.eos is not None else ""
        self.template: ChatTemplate | GoTemplate = ChatTemplate.for_model(
            src if isinstance(src, str) else None, self.model.architecture, bos, eos
        )
        go = st.text_layer(entry, store.TEMPLATE) if entry is not None and st is not None else None
        if go and not isinstance(src, str):  # no chat template in the file: the registry's
            try:
                self.template = GoTemplate(go)
            except GoTemplateError:
                pass
        params = modelinfo.params_of(entry, st)
        self.stop = (
            [str(s) for s in params.get("stop", []) if isinstance(s, str)]
            if isinstance(params.get("stop"), list)
            else []
        )
        # As the daemon reads an Ollama request: Ollama's defaults, then the model's
        # parameters, then the flags (as options).
        self.params = params
        self.options = {**{k: v for k, v in params.items() if k in ("seed", "num_predict")}, **options}
        self.stats = ""

    def _generate(self, ids: list[int]) -> Iterator[str]:
        import time

        o = self.options
        room = self.model.n_ctx_train - len(ids)
        if room <= 0:
            raise EdgelmError(
                f"the conversation has {len(ids)} tokens; the model's context holds "
                f"{self.model.n_ctx_train}. /clear starts again"
            )
        n = o.get("num_predict")
        max_tokens = room if n is None or n < 0 else min(int(n), room)
        from edgelm.server.ollama import from_ollama
        from edgelm.server.params import ApiError, Body

        try:
            sampling = from_ollama(Body(o, "options", "options."), self.params)
        except ApiError as e:
            raise EdgelmError(e.message) from None
        t0, count = time.perf_counter(), 0
        for tok in self.model.generate(ids, max_tokens=max_tokens, sampling=sampling, stop=self.stop):
            count += 1
            if tok.text:
                yield tok.text
        dt = time.perf_counter() - t0
        self.stats = f"prompt tokens: {len(ids)}, answer tokens: {count}" + (
            f", {count / dt:.1f} tokens/s" if dt > 0 else ""
        )

    def chat(self, messages: list[dict[str, Any]], think: bool | None) -> Iterator[tuple[str, str]]:
        from edgelm.server import thinking
        from edgelm.server.params import ApiError

        style = self.template.thinking
        try:
            t = thinking.from_ollama(think, None, style, self.name)
        except ApiError as e:
            raise EdgelmError(e.message) from None
        text = self.template.render(messages, add_generation_prompt=True, **t.template_vars(style))
        native = self.model.native
        ids = native.tokenize(text, True, True)
        if native.bos is not None and len(ids) >= 2 and ids[0] == ids[1] == native.bos:
            ids = ids[1:]  # a template that writes BOS itself
        opened = thinking.forced_open(text, style)
        split = thinking.ThinkSplitter(style, opened) if style is not None and (t.on or opened) else None
        for piece in self._generate(ids):
            if split is None:
                yield "content", piece
                continue
            th, content = split.feed(piece)
            if th:
                yield "thinking", th
            if content:
                yield "content", content
        if split is not None:
            th, content = split.finish()
            if th:
                yield "thinking", th
            if content:
                yield "content", content
        yield "stats", self.stats

    def complete(self, prompt: str) -> Iterator[str]:
        yield from self._generate(self.model.tokenize(prompt, add_special=True))


class Screen:
    """Where an answer goes: content to `out`; a thought dimmed on a terminal (or to
    `err`, when answering once)."""

    def __init__(self, out: TextIO, err: TextIO, once: bool, hide_thinking: bool, verbose: bool = False) -> None:
        self.out, self.err, self.once, self.hide, self.verbose = out, err, once, hide_thinking, verbose
        self.stats = ""
        self.tty = out.isatty()
        self.state = "none"  # "thinking", "content"

    def write(self, kind: str, text: str) -> None:
        if kind == "stats":
            self.stats = text
            return
        if kind == "thinking":
            if self.hide:
                return
            dest = self.err if self.once else self.out
            if self.state != "thinking":
                dest.write("\x1b[2mThinking...\n" if self.tty else "Thinking...\n")
                self.state = "thinking"
            dest.write(text)
            dest.flush()
            return
        if self.state == "thinking":
            dest = self.err if self.once else self.out
            dest.write("\n...done thinking.\x1b[0m\n\n" if self.tty else "\n...done thinking.\n\n")
            dest.flush()
        self.state = "content"
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.state == "thinking" and not self.hide:
            (self.err if self.once else self.out).write("\x1b[0m\n" if self.tty else "\n")
        self.state = "none"
        if self.verbose and self.stats:
            self.out.flush()
            self.err.write(("\n" if not self.once else "") + f"[{self.stats}]\n")
            self.err.flush()
        self.stats = ""


def answer_once(
    backend: Backend,
    prompt: str,
    system: str | None,
    think: bool | None,
    raw: bool,
    out: TextIO,
    err: TextIO,
    hide_thinking: bool,
    verbose: bool = False,
) -> int:
    screen = Screen(out, err, once=True, hide_thinking=hide_thinking, verbose=verbose)
    if raw:
        for piece in backend.complete(prompt):
            screen.write("content", piece)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        for kind, piece in backend.chat(msgs, think):
            screen.write(kind, piece)
    out.write("\n")
    out.flush()
    screen.end()
    return 0


def _read_message(inp: Any) -> str:
    """One message: a line, or a block between \"\"\" marks."""
    line = inp(">>> ")
    head = line.lstrip()
    if not head.startswith('"""'):
        return str(line)
    body = head[3:]
    if body.rstrip().endswith('"""'):
        return str(body.rstrip()[:-3])
    lines = [body] if body else []
    while True:
        more = inp("... ")
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines)
        lines.append(more)


def session(
    backend: Backend,
    system: str | None,
    think: bool | None,
    out: TextIO,
    err: TextIO,
    hide_thinking: bool,
    verbose: bool = False,
) -> int:
    """The interactive chat (see the module doc)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    history: list[dict[str, Any]] = []
    out.write(f"Chatting with {backend.name}. Send a message (/? for help)\n")
    out.flush()
    screen = Screen(out, err, once=False, hide_thinking=hide_thinking, verbose=verbose)
    while True:
        try:
            text = _read_message(input)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\nUse Ctrl + d or /bye to exit.\n")
            continue
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/bye", "/exit"):
            return 0
        if cmd == "/clear":
            history.clear()
            out.write("Cleared the conversation.\n")
            continue
        if cmd in ("/?", "/help"):
            out.write(HELP + "\n")
            continue
        if cmd.startswith("/") and " " not in cmd:
            out.write(f"Unknown command '{cmd}'. Type /? for help\n")
            continue
        history.append({"role": "user", "content": text})
        answer = ""
        try:
            msgs = ([{"role": "system", "content": system}] if system else []) + history
            for kind, piece in backend.chat(msgs, think):
                screen.write(kind, piece)
                if kind == "content":
                    answer += piece
            screen.end()
        except KeyboardInterrupt:
            screen.end()
            out.write("\n[answer stopped]")
        except (EdgelmError, OSError, ClientError) as e:
            screen.end()
            err.write(f"edgelm: {e}\n")
        history.append({"role": "assistant", "content": answer})
        out.write("\n\n")
        out.flush()


def is_interactive() -> bool:
    return sys.stdin.isatty()
