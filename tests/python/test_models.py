"""Several models on one daemon: every GGUF in models_dir is servable by name, loaded
on first use, unloaded after keep_alive, and kept under the memory budget (idle
models make room; busy ones are never dropped, and a model that cannot fit gets a
clear 503). Real daemon, both real models, the real ollama and openai clients."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ollama
import openai
import pytest
from conftest import GEMMA3, SMOLLM2, model_path
from serve_util import Daemon, daemon

SMOL = "SmolLM2-135M-Instruct.Q4_1"
GEMMA = "gemma-3-270m-q4_k_m"
# Each model's cost: file + KV (--kv-cache-mib 16) + 64 MiB scratch allowance.
SMOL_MIB = 94 + 16 + 64
GEMMA_MIB = 242 + 16 + 64


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for name in (SMOLLM2, GEMMA3):
        src = model_path(name).resolve()
        try:
            os.link(src, d / src.name)
        except OSError:
            shutil.copy(src, d / src.name)
    (d / "notes.txt").write_text("not a model")
    return d


@contextmanager
def _serve(models_dir: Path, *args: str) -> Iterator[Daemon]:
    with daemon(
        models_dir / f"{SMOL}.gguf",
        "--models-dir",
        str(models_dir),
        "--kv-cache-mib",
        "16",
        "--max-context",
        "512",
        *args,
    ) as d:
        yield d


def _loaded(d: Daemon) -> list[str]:
    return [m.model for m in ollama.Client(host=d.url).ps().models]


def test_models_load_on_demand_and_unload_after_keep_alive(models_dir: Path) -> None:
    with _serve(models_dir, "--keep-alive", "2s") as d:
        c = ollama.Client(host=d.url)
        names = [m.model for m in c.list().models]
        assert names == [f"{SMOL}:latest", f"{GEMMA}:latest"]  # notes.txt is not a model
        assert _loaded(d) == [f"{SMOL}:latest"]  # listing loaded nothing
        assert [m.id for m in openai.OpenAI(base_url=d.url + "/v1", api_key="x").models.list().data] == [SMOL, GEMMA]

        r = c.chat(
            model=GEMMA, messages=[{"role": "user", "content": "Say hi"}], options={"num_predict": 4, "temperature": 0}
        )
        assert r.done and r.eval_count == 4 and r.load_duration and r.load_duration > 0
        ps = c.ps().models
        assert [m.model for m in ps] == [f"{SMOL}:latest", f"{GEMMA}:latest"]
        smol_ps, gemma_ps = ps
        assert gemma_ps.expires_at is not None and smol_ps.expires_at is not None
        assert (
            gemma_ps.expires_at.year < 2100 < smol_ps.expires_at.year
        )  # on-demand expires; the configured model stays
        assert d.metric("edgelm_models_loaded") == 2
        # The OpenAI API reaches it by the same name.
        o = openai.OpenAI(base_url=d.url + "/v1", api_key="x").chat.completions.create(
            model=GEMMA, messages=[{"role": "user", "content": "Say hi"}], max_tokens=3, temperature=0
        )
        assert o.model == GEMMA and o.usage is not None and o.usage.completion_tokens == 3

        deadline = time.monotonic() + 15
        while _loaded(d) != [f"{SMOL}:latest"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _loaded(d) == [f"{SMOL}:latest"]
        assert "unloaded gemma-3-270m-q4_k_m" in d.log()
        _, h = d.get("/health")
        assert [m["model"] for m in h["models"]] == [SMOL]

        # keep_alive on a request: 0 unloads as soon as it is done; an empty request
        # with keep_alive 0 unloads at once (Ollama's "unload" call).
        c.generate(model=GEMMA, prompt="Hi", options={"num_predict": 2}, keep_alive=0)
        assert _loaded(d) == [f"{SMOL}:latest"]
        r2 = c.generate(model=SMOL, prompt="", keep_alive=0)
        assert r2.done_reason == "unload" and _loaded(d) == []
        # A request's keep_alive sets an on-demand model's stay, never the configured
        # model's: that one, loaded again, stays for good.
        r2 = c.generate(model=SMOL, prompt="", keep_alive="1h")
        assert r2.done_reason == "load" and _loaded(d) == [f"{SMOL}:latest"]
        exp = c.ps().models[0].expires_at
        assert exp is not None and exp.year == 2318
        r2 = c.generate(model=GEMMA, prompt="", keep_alive="1h")  # load, and keep for an hour
        exp = {m.model: m.expires_at for m in c.ps().models}[f"{GEMMA}:latest"]
        assert exp is not None and 3500 < exp.timestamp() - time.time() < 3700


def test_memory_budget(models_dir: Path) -> None:
    # Room for either model, not both.
    budget = max(SMOL_MIB, GEMMA_MIB) + 20
    with _serve(models_dir, "--memory-budget-mib", str(budget)) as d:
        c = ollama.Client(host=d.url)
        c.generate(model=GEMMA, prompt="Hi", options={"num_predict": 2})
        assert _loaded(d) == [f"{GEMMA}:latest"]  # the idle SmolLM2 made room
        assert "unloading SmolLM2-135M-Instruct.Q4_1 to make room for gemma-3-270m-q4_k_m" in d.log()
        # While Gemma is busy, SmolLM2 cannot load: a 503 that says why.
        busy = threading.Thread(
            target=lambda: c.generate(
                model=GEMMA, prompt="Count to one hundred.", options={"num_predict": 200, "temperature": 0}
            )
        )
        busy.start()
        try:
            deadline = time.monotonic() + 10
            while d.metric("edgelm_running_sequences") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, body = d.post(
                "/v1/chat/completions", {"model": SMOL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            )
        finally:
            busy.join()
        assert status == 503 and body["error"]["code"] == "insufficient_memory", body
        msg = body["error"]["message"]
        assert SMOL in msg and f"{budget} MiB budget" in msg and "busy" in msg
        # Once Gemma is idle again, SmolLM2 loads (and Gemma makes room).
        status, body = d.post(
            "/v1/chat/completions", {"model": SMOL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        )
        assert status == 200 and _loaded(d) == [f"{SMOL}:latest"]


def test_max_loaded_models_and_names(models_dir: Path) -> None:
    with _serve(models_dir, "--max-loaded-models", "1") as d:
        c = ollama.Client(host=d.url)
        c.generate(model=GEMMA, prompt="Hi", options={"num_predict": 2})
        assert _loaded(d) == [f"{GEMMA}:latest"]
        # Names are looked up among the models, never joined to a path.
        for bad in ("../" + SMOL, "/etc/passwd", "..", f"{SMOL}/x", "notes.txt", "missing"):
            status, body = d.post("/api/chat", {"model": bad, "messages": [{"role": "user", "content": "x"}]})
            assert status == 404 and "not found" in body["error"], (bad, body)
            status, body = d.post("/v1/completions", {"model": bad, "prompt": "x"})
            assert status == 404 and body["error"]["code"] == "model_not_found"
        for bad_ka in ("soon", [1], True):
            status, body = d.post("/api/generate", {"model": SMOL, "prompt": "x", "keep_alive": bad_ka})
            assert status == 400 and "keep_alive" in body["error"]


def test_mdns_record_follows_loaded_models(models_dir: Path, tmp_path: Path) -> None:
    import uuid

    from test_mdns import browse

    name = f"edgelm models {uuid.uuid4().hex[:8]}"
    with daemon(
        models_dir / f"{SMOL}.gguf",
        "--models-dir",
        str(models_dir),
        "--kv-cache-mib",
        "16",
        "--mdns-name",
        name,
        "--state-dir",
        str(tmp_path / "state"),
        mdns=True,
    ) as d:

        def record() -> dict[str, str]:
            found = [x for x in browse(1.5) if x["name"] == name]
            assert len(found) == 1, found
            return found[0]

        assert record()["model"] == SMOL
        c = ollama.Client(host=d.url)
        c.generate(model=GEMMA, prompt="", keep_alive="1m")  # load
        assert record()["model"] == f"{SMOL},{GEMMA}"
        c.generate(model=GEMMA, prompt="", keep_alive=0)  # unload
        assert record()["model"] == SMOL
