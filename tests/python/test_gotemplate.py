"""Ollama's Go templates, for registry models whose GGUF carries no chat template: the
language as Ollama's templates use it, Ollama's two ways of rendering (with `.Messages`,
and the legacy `.System`/`.Prompt`/`.Response` per exchange, cut after the last
`.Response`), what is refused, and a pulled model chatting through its Go template.

(Checked during development against Ollama's own template/testdata: its 20 templates ×
3 conversations render byte for byte; those files are not copied here.)"""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
from conftest import SMOLLM2, model_path
from registry_util import registry_servers
from serve_util import daemon

from edgelm.prompt.chat import MAX_OUTPUT_CHARS
from edgelm.prompt.gotemplate import GoTemplate, GoTemplateError

HELLO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def test_messages_mode() -> None:
    t = GoTemplate(CHATML)
    assert t.render(HELLO) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Consecutive messages of one role are merged; system messages also make .System.
    two = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert t.render(two) == "<|im_start|>user\na\n\nb<|im_end|>\n<|im_start|>assistant\n"
    assert not t.renders_tools and t.thinking is None


TOOLS = """{{- if .Tools }}<tools>{{ range .Tools }}
{{ .Function }}{{ end }}
</tools>
{{ end }}
{{- range .Messages }}
{{- if .ToolCalls }}{{ range .ToolCalls }}<call>{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}</call>{{ end }}
{{ else if eq .Role "tool" }}<result>{{ .Content }}</result>
{{ else }}{{ .Role }}: {{ .Content }}
{{ end }}
{{- end }}"""


def test_tools_and_tool_calls_are_their_json() -> None:
    t = GoTemplate(TOOLS)
    assert t.renders_tools
    tools = [
        {
            "type": "function",
            "function": {
                "name": "HassTurnOn",
                "description": "On <now> & then",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    msgs = [
        {"role": "user", "content": "light"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen"}}}],
        },
        {"role": "tool", "content": "done"},
    ]
    assert t.render(msgs, tools=tools) == (
        '<tools>\n{"name":"HassTurnOn","description":"On \\u003cnow\\u003e \\u0026 then","parameters":'
        '{"type":"object","properties":{}}}\n</tools>\nuser: light\n'
        '<call>{"name": "HassTurnOn", "arguments": {"name":"kitchen"}}</call>\n<result>done</result>\n'
    )


LEGACY = "{{ if .System }}S: {{ .System }}\n{{ end }}{{ if .Prompt }}U: {{ .Prompt }}\n{{ end }}A: {{ .Response }}\n"


def test_legacy_mode_renders_each_exchange_and_cuts_the_last() -> None:
    t = GoTemplate(LEGACY)
    assert t.render(HELLO) == "S: Be brief.\nU: Hi\nA: Hello!\nU: Bye\nA: "
    assert t.render([{"role": "user", "content": "Hi"}]) == "U: Hi\nA: "
    # The cut happens inside blocks too: nothing after the first .Response is kept.
    t = GoTemplate("{{ if .Prompt }}[{{ .Prompt }}]{{ .Response }}<end>{{ end }}<tail>")
    assert (
        t.render(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}, {"role": "user", "content": "q2"}]
        )
        == "[q]r<end><tail>[q2]"
    )


def test_the_language() -> None:
    def r(src: str, msgs: list[dict] | None = None) -> str:  # type: ignore[type-arg]
        # Mentioning .Messages makes it a messages template (one rendering).
        return GoTemplate(src + "{{ if .Messages }}{{ end }}").render(msgs or [{"role": "user", "content": "x"}])

    assert r("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ end }}{{ $x }}") == "2"
    assert (
        r(
            "{{ range $i, $m := .Messages }}{{ if eq $i 1 }}{{ continue }}{{ end }}{{ if eq $i 3 }}{{ break }}"
            "{{ end }}{{ $i }}{{ end }}",
            [{"role": ("user", "assistant")[k % 2], "content": str(k)} for k in range(5)],
        )
        == "02"
    )
    assert r("{{ with .System }}has {{ . }}{{ else }}none{{ end }}") == "none"
    assert r('{{ if eq .System "a" "b" "" }}one of{{ end }}') == "one of"
    assert r('{{ and .Tools (index .Tools 5) }}|{{ or .System "dflt" }}') == "[]|dflt"  # lazy: no index error
    assert r('{{ printf "%s=%d %q" "n" 3 "s" }} {{ len .Messages }} {{ slice "abcdef" 1 3 }}') == 'n=3 "s" 1 bc'
    assert r('{{ .Messages | len }} {{ 3 | printf "%d" }}') == "1 3"
    assert r('a  {{- /* gone */ -}}  b\n{{- "c" -}}\n d') == "abcd"
    assert r("{{ if gt (len .Messages) 0 }}many{{ else if .System }}sys{{ else }}none{{ end }}") == "many"
    assert r("{{ .Think }} {{ .IsThinkSet }}") == "false false"
    assert (
        GoTemplate("{{ .Think }} {{ .IsThinkSet }}{{ if .Messages }}{{ end }} <think>").render([], enable_thinking=True)
        == "true true <think>"
    )


@pytest.mark.parametrize(
    "src, msg",
    [
        ('{{ define "x" }}{{ end }}', "define"),
        ('{{ template "x" }}', "template"),
        ("{{ if .X }}", "unclosed"),
        ("{{ end }}", "without"),
        ("{{ exec .X }}", "'exec'"),
        ("{{ .X | }}", "empty command"),
        ("{{ (.X }}", "unclosed '\\('"),
        ("{{ break }}", "outside a range"),
        ("{{ else }}", "outside"),
    ],
)
def test_what_is_refused(src: str, msg: str) -> None:
    with pytest.raises(GoTemplateError, match=msg):
        GoTemplate(src)


def test_rendering_is_bounded() -> None:
    t = GoTemplate("{{ range .Messages }}{{ range $.Messages }}{{ .Content }}{{ end }}{{ end }}")
    big = [{"role": "user" if k % 2 == 0 else "assistant", "content": "x" * 300_000} for k in range(8)]
    with pytest.raises(GoTemplateError, match="longer than"):
        t.render(big)
    assert MAX_OUTPUT_CHARS < 8 * 8 * 300_000
    with pytest.raises(GoTemplateError, match="out of range"):
        GoTemplate("{{ index .Messages 9 }}").render(HELLO)


def test_a_pulled_model_chats_through_its_go_template(tmp_path: Path) -> None:
    """A registry model whose GGUF has no chat template (SmolLM2 with it removed, as older
    Ollama library files are) chats through the registry's Go template."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    bare = tmp_path / "bare.gguf"
    reader = gguf.GGUFReader(model_path(SMOLLM2))
    copy_with_new_metadata(reader, gguf.GGUFWriter(bare, "llama"), {}, ["tokenizer.chat_template"])
    with registry_servers() as reg:
        reg.add_ollama("bare:latest", bare, template=CHATML, system="You answer questions about geography.")
        with daemon(
            model_path(SMOLLM2), "--models-dir", str(tmp_path / "models"), env={"EDGELM_REGISTRY_URL": reg.ollama}
        ) as d:
            c = ollama.Client(host=d.url)
            assert c.pull("bare", stream=False).status == "success"
            r = c.chat(
                model="bare",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                options={"temperature": 0, "num_predict": 12},
            )
            assert "Paris" in r.message.content
            g = c.generate(model="bare", prompt="Hi", options={"num_predict": 1})
            status, body = d.post("/detokenize", {"model": "bare", "tokens": g.context})
            assert status == 200 and body["content"].startswith(
                "<|im_start|>system\nYou answer questions about geography.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n"
            ), body
            assert "tools" in (c.show("bare").capabilities or [])
            assert json.loads(json.dumps(c.show("bare").template)) == CHATML
