"""Chat templates: real templates render the exact prompt text, and hostile ones are
refused by the sandbox without running anything."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import pytest
from conftest import GEMMA3, SMOLLM2, model_path

from edgelm.prompt import chat
from edgelm.prompt.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]


def gguf_chat_template(path: Path) -> str | None:
    field = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    source = gguf_chat_template(model_path(SMOLLM2))
    assert source is not None
    return ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")


# --- real templates ---------------------------------------------------------------------


def test_smollm2_renders_chatml(smollm2_template: ChatTemplate) -> None:
    assert not smollm2_template.is_default
    assert smollm2_template.render(SYSTEM_USER) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2_template.render(SYSTEM_USER, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    )


def test_smollm2_adds_its_own_system_prompt(smollm2_template: ChatTemplate) -> None:
    msgs = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    assert smollm2_template.render(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_content_none_is_a_template_error(smollm2_template: ChatTemplate) -> None:
    with pytest.raises(ChatTemplateError, match="TypeError"):  # the template does `+ message['content']`
        smollm2_template.render([{"role": "user", "content": None}])


def test_gemma3_gguf_has_no_template() -> None:
    # The daemon therefore falls back to the architecture's turn format for this file.
    assert gguf_chat_template(model_path(GEMMA3)) is None


def test_gemma3_fallback_folds_system_into_first_user_turn() -> None:
    t = ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>")
    assert not t.is_default
    msgs = [*SYSTEM_USER, {"role": "assistant", "content": "Hello. "}, {"role": "user", "content": " Bye.\n"}]
    assert t.render(msgs) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert t.render(msgs[1:2], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n"
    assert ChatTemplate.for_model(None, "llama").is_default
    assert ChatTemplate.for_model("{{ 'own' }}", "gemma3").render([]) == "own"


def test_default_template_is_chatml() -> None:
    t = ChatTemplate(None)
    assert t.is_default and t.source == DEFAULT_TEMPLATE
    assert t.render(SYSTEM_USER) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.render([{"role": "assistant", "content": None}], add_generation_prompt=False) == (
        "<|im_start|>assistant\n<|im_end|>\n"
    )


def test_variables_tools_and_tojson() -> None:
    t = ChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ tools|tojson }}|{{ flag }}|{{ add_generation_prompt }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}}]
    assert t.render([], tools=tools, flag="yes") == f"<s>|</s>|{json.dumps(tools, ensure_ascii=False)}|yes|True"
    assert "météo" in t.render([], tools=tools)  # ensure_ascii=False, as Hugging Face's tojson
    assert t.render([], add_generation_prompt=False) == "<s>|</s>|null||False"  # tools None, undefined is empty
    indented = ChatTemplate("{{ tools|tojson(indent=2, sort_keys=True) }}").render([], tools=tools)
    assert indented == json.dumps(tools, ensure_ascii=False, indent=2, sort_keys=True)
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) == time.strftime("%Y")


def test_content_parts_are_joined() -> None:
    t = ChatTemplate(None)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert t.render([{"role": "user", "content": parts}], add_generation_prompt=False) == (
        "<|im_start|>user\nHello\nworld<|im_end|>\n"
    )
    with pytest.raises(ChatTemplateError, match="only text parts"):
        t.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_syntax_error_at_construction() -> None:
    with pytest.raises(ChatTemplateError, match=r"invalid chat template: .*line 1"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        ChatTemplate("{{ messages[0 }}")


# --- hostile templates ------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''['__class__'] }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.__builtins__.open('MARKER', 'w').write('x') }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ self._TemplateReference__context }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ '{0.__class__.__base__}'.format('') }}",
    "{{ dict.mro() }}",
    "{{ open('MARKER', 'w').write('x') }}",
    "{{ __import__('os').system('touch MARKER') }}",
    "{% set x = messages.append(1) %}",
    "{% set x = messages[0].update({'role': 'x'}) %}",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_escapes_are_refused(payload: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    t = ChatTemplate(payload.replace("MARKER", str(marker)))
    with pytest.raises(ChatTemplateError, match="rendering the chat template failed: (SecurityError|UndefinedError)"):
        t.render([{"role": "user", "content": "hi"}])
    assert not marker.exists()


def test_raise_exception_gives_its_message() -> None:
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate("{{ raise_exception('boom') }}").render([])
    assert str(e.value) == "boom"


EXHAUSTION = [
    ("{% for x in range(10**9) %}{{ x }}{% endfor %}", "integer argument too large"),
    ("{% for x in range(100001) %}{{ x }}{% endfor %}", "Range too big"),  # the sandbox's own cap
    ("{{ 'ab' * 10**9 }}", "longer than"),
    ("{{ 2 ** (10**6) }}", "number too large"),
    ("{{ 'a'|center(999999999) }}", "integer argument too large"),
    ("{{ 'a'.ljust(10**8) }}", "integer argument too large"),
    ("{{ '%999999999d' % 1 }}", "format string"),
    ("{{ '{:999999999}'.format(1) }}", "format string"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "longer than"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output is longer than"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
]


@pytest.mark.parametrize(("payload", "message"), EXHAUSTION)
def test_resource_exhaustion_is_refused(payload: str, message: str) -> None:
    start = time.monotonic()
    t = ChatTemplate(payload)  # `'ab' * 10**9` must not be constant-folded at compile time
    with pytest.raises(ChatTemplateError, match=message):
        t.render([])
    assert time.monotonic() - start < 1.5


def test_slow_render_hits_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "RENDER_TIMEOUT_S", 0.2)
    t = ChatTemplate("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="ran longer than 0.2 s"):
        t.render([])
    assert time.monotonic() - start < 1.0
    assert ChatTemplate(None).render([{"role": "user", "content": "x"}])  # the deadline was reset
