"""Thinking models for the tests: no Qwen3 weights are at hand, so SmolLM2 (which has
Qwen's `<|im_start|>` turn tokens) gets a chat template written in the style of Qwen3's:
tools listed in the system turn, `reasoning_content` of the assistant turns after the
last user turn written back inside `<think>`, and Hugging Face's `enable_thinking`
switch (false: an empty `<think>\\n\\n</think>\\n\\n` closes the thought before the model
starts, as Qwen3's own template does). The "opened" variant opens the thought in the
generation prompt, as Qwen3-Thinking-2507 and DeepSeek-R1 templates do.

A 135M model never writes `</think>` of its own accord, so the tests that need a thought
and an answer bound the thought with `thinking_budget`: the grammar closes it after that
many tokens, which makes the split deterministic."""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

_BODY = r"""
{%- macro turn(role, text) -%}{{ '<|im_start|>' + role + '\n' + text + '<|im_end|>\n' }}{%- endmacro -%}
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else '' -%}
{%- if tools -%}
  {%- set listing = namespace(text='') -%}
  {%- for t in tools -%}{%- set listing.text = listing.text + '\n' + (t | tojson) -%}{%- endfor -%}
  {{- turn('system', (sys + '\n\n' if sys else '') + '# Tools\n\nYou may call the functions listed in <tools></tools>, '
     + 'each call a JSON object with its name and arguments in <tool_call></tool_call> tags.\n<tools>'
     + listing.text + '\n</tools>') -}}
{%- elif sys -%}
  {{- turn('system', sys) -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'system' and loop.first -%}
  {%- elif m.role == 'user' or m.role == 'system' -%}
    {{- turn(m.role, m.content) -}}
  {%- elif m.role == 'assistant' -%}
    {%- set out = namespace(text=m.content or '', thought='') -%}
    {%- if m.reasoning_content is string -%}
      {%- set out.thought = m.reasoning_content -%}
    {%- elif '</think>' in out.text -%}
      {%- set out.thought = out.text.split('</think>')[0].split('<think>')[-1].strip() -%}
      {%- set out.text = out.text.split('</think>')[-1].lstrip() -%}
    {%- endif -%}
    {%- for c in m.tool_calls or [] -%}
      {%- set f = c.function if c.function else c -%}
      {%- set args = f.arguments if f.arguments is string else f.arguments | tojson -%}
      {%- set out.text = out.text + ('\n' if out.text else '') + '<tool_call>\n{"name": "' + f.name + '", "arguments": '
                         + args + '}\n</tool_call>' -%}
    {%- endfor -%}
    {%- if loop.index0 > ns.last_user and out.thought -%}
      {{- turn('assistant', '<think>\n' + out.thought + '\n</think>\n\n' + out.text) -}}
    {%- else -%}
      {{- turn('assistant', out.text) -}}
    {%- endif -%}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
"""

QWEN3_STYLE = (
    _BODY
    + r"""
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""
)
"""Qwen3's hybrid style: the model opens its thought itself, unless told not to think."""

QWEN3_OPENED = (
    _BODY
    + r"""
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}
  {%- else -%}{{- '<think>\n' -}}{%- endif -%}
{%- endif -%}
"""
)
"""The thinking-only style: the generation prompt opens the thought."""


def with_template(src: Path, dst: Path, template: str, name: str) -> Path:
    """A copy of the GGUF `src` at `dst` with `template` as its chat template."""
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(dst, arch, endianess=reader.endianess)
    new = {
        "tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING, template),
        "general.name": MetadataDetails(gguf.GGUFValueType.STRING, name),
    }
    copy_with_new_metadata(reader, writer, new, [])
    return dst
