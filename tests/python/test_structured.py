"""Structured output by constrained decoding (llguidance): JSON schemas through the
OpenAI `response_format` and the Ollama `format`, on the real 135M model. Every
answer must parse and validate."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import ollama
import openai
import pytest
from conftest import SMOLLM2, model_path
from serve_util import Daemon, daemon

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
LIGHT = {
    "type": "object",
    "properties": {
        "entity_id": {"type": "string", "pattern": "^light\\.[a-z_]{1,30}$"},
        "state": {"enum": ["on", "off"]},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 255},
    },
    "required": ["entity_id", "state"],
    "additionalProperties": False,
}
SUBJECTS = [
    "a baker",
    "a pilot",
    "a student",
    "a doctor",
    "a farmer",
    "a painter",
    "a sailor",
    "a teacher",
    "a chef",
    "a poet",
]


@pytest.fixture(scope="module")
def srv() -> Iterator[Daemon]:
    with daemon(model_path(SMOLLM2), "--max-context", "1024", "--kv-cache-mib", "128") as d:
        yield d


def test_twenty_schema_requests_parse_and_validate(srv: Daemon) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    answers = []
    for i, who in enumerate(SUBJECTS):  # 10 through the OpenAI API
        r = client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1",
            max_tokens=120,
            temperature=0.7,
            seed=i,
            messages=[{"role": "user", "content": f"Invent {who}: name, age and city, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        )
        answers.append((PERSON, r.choices[0].message.content or ""))
    oc = ollama.Client(host=srv.url)
    for i, room in enumerate(
        ["kitchen", "bedroom", "garage", "office", "hall", "porch", "attic", "cellar", "garden", "bathroom"]
    ):
        r = oc.chat(
            model="SmolLM2-135M-Instruct.Q4_1",
            format=LIGHT,
            options={"temperature": 0.7, "seed": i, "num_predict": 120},
            messages=[{"role": "user", "content": f"Turn on the {room} light. Answer with the command as JSON."}],
        )
        answers.append((LIGHT, r.message.content or ""))
    for schema, text in answers:
        jsonschema.validate(json.loads(text), schema)  # raises if it does not parse or validate
    masks = srv.metric("edgelm_grammar_masks")
    seconds = srv.metric("edgelm_grammar_mask_seconds")
    assert masks >= 20
    print(f"constrained decoding: {seconds / masks * 1e3:.3f} ms per token mask over {int(masks)} tokens")


def test_json_object_mode_and_bad_schemas(srv: Daemon) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        max_tokens=80,
        temperature=0,
        messages=[{"role": "user", "content": "Describe a cat."}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    g = ollama.Client(host=srv.url).generate(
        model="SmolLM2-135M-Instruct.Q4_1",
        prompt="A dog as JSON:",
        format="json",
        options={"temperature": 0, "num_predict": 80},
    )
    assert isinstance(json.loads(g.response or ""), dict)
    for body in (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema", "json_schema": "nope"}},
    ):
        status, resp = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **body})
        assert status == 400, (body, resp)
    status, resp = srv.post(
        "/api/chat",
        {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "x"}], "format": "yaml"},
    )
    assert status == 400 and isinstance(resp["error"], str)
