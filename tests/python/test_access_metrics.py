"""The daemon's access log and Prometheus metrics, on the real daemon and model: one
access-log line per request with method, route, status, duration, tokens and model
(never a key or a prompt), as JSON lines with `--log-format json`; /metrics parsed by
the Prometheus text parser: counters typed as counters, a `model` label on what an
engine counts, process metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SMOLLM2, model_path
from prometheus_client.parser import text_string_to_metric_families
from serve_util import Daemon, daemon, http

MODEL = "SmolLM2-135M-Instruct.Q4_1"
KEY, ADMIN = "user-key-7f3a", "admin-key-91c2"
SECRET_PROMPT = "the blue heron flies at dawn"


@pytest.fixture(scope="module")
def srv() -> Iterator[Daemon]:
    config = f"api_key: {KEY}\nadmin_key: {ADMIN}\n"
    with daemon(model_path(SMOLLM2), "--log-format", "json", config=config) as d:
        yield d


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def access_lines(d: Daemon) -> list[dict[str, Any]]:
    rows = []
    for line in d.log().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("logger") == "edgelm.access":
            rows.append(row)
    return rows


def test_one_access_line_per_request_without_keys_or_prompts(srv: Daemon) -> None:
    n0 = len(access_lines(srv))
    status, body = http(
        "POST",
        srv.url + "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 5},
        headers=auth(KEY),
    )
    assert status == 200, body
    usage = body["usage"]
    status, _ = http(
        "POST",
        srv.url + "/api/generate",
        {"model": MODEL, "prompt": SECRET_PROMPT, "stream": True, "options": {"num_predict": 3}},
        headers=auth(KEY),
    )
    assert status == 200
    assert http("GET", srv.url + "/api/tags")[0] == 401  # no key
    assert http("POST", srv.url + "/api/show", {"model": "no-such-model"}, headers=auth(KEY))[0] == 404
    deadline = time.monotonic() + 10
    while len(rows := access_lines(srv)[n0:]) < 4:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    chat, gen, tags, show = rows[:4]
    assert {k: chat[k] for k in ("method", "route", "status", "model", "tokens_in", "tokens_out")} == {
        "method": "POST",
        "route": "/v1/chat/completions",
        "status": 200,
        "model": MODEL,
        "tokens_in": usage["prompt_tokens"],
        "tokens_out": usage["completion_tokens"],
    }
    assert chat["duration_ms"] > 0 and chat["level"] == "info"
    assert (gen["route"], gen["status"], gen["tokens_out"]) == ("/api/generate", 200, 3) and gen["tokens_in"] > 0
    assert (tags["route"], tags["status"], tags["tokens_in"], tags["model"]) == ("/api/tags", 401, 0, "-")
    assert (show["route"], show["status"]) == ("/api/show", 404)
    log = srv.log()
    assert KEY not in log and ADMIN not in log and SECRET_PROMPT not in log
    # Every line of the daemon's output is one JSON object (collectors parse it whole).
    for line in log.splitlines():
        assert isinstance(json.loads(line), dict), line


def test_metrics_parse_with_types_and_model_labels(srv: Daemon) -> None:
    status, _ = http(
        "POST",
        srv.url + "/v1/completions",
        {"model": MODEL, "prompt": "Hello", "max_tokens": 4},
        headers=auth(KEY),
    )
    assert status == 200
    status, text = http("GET", srv.url + "/metrics", headers=auth(ADMIN))
    assert status == 200 and isinstance(text, str)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "edgelm_requests",
        "edgelm_prompt_tokens",
        "edgelm_generated_tokens",
        "edgelm_steps",
        "edgelm_preemptions",
        "edgelm_grammar_masks",
        "edgelm_sequences_finished",
        "edgelm_http_connections_dropped",
        "process_cpu_seconds",
    ):
        assert families[name].type == "counter", (name, families[name].type)
    for name in ("edgelm_queue_length", "edgelm_running_sequences", "edgelm_kv_blocks_used", "edgelm_models_loaded"):
        assert families[name].type == "gauge", name
    assert families["edgelm_time_to_first_token_seconds"].type == "histogram"

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("edgelm_generated_tokens", "edgelm_generated_tokens_total", model=MODEL) >= 4
    assert value("edgelm_prompt_tokens", "edgelm_prompt_tokens_total", model=MODEL) > 0
    assert value("edgelm_kv_blocks_total", "edgelm_kv_blocks_total", model=MODEL) > 0
    assert value("edgelm_sequences_finished", "edgelm_sequences_finished_total", model=MODEL, reason="length") >= 1
    assert value("edgelm_requests", "edgelm_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value("process_resident_memory_bytes", "process_resident_memory_bytes") > 50e6  # the model is mapped in
    assert value("process_open_fds", "process_open_fds") > 0
    assert value("process_cpu_seconds", "process_cpu_seconds_total") > 0
