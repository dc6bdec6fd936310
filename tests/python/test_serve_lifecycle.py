"""Daemon lifecycle and configuration: queue limits (429 + Retry-After), SIGTERM
with a grace period, a hostile chat template in the model file, config precedence
and validation, and schemathesis against the daemon's own OpenAPI description."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import gguf
import pytest
from conftest import FIXTURES, SMOLLM2, model_path
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
from serve_util import daemon, http

from edgelm.config import ConfigError, load_config

LONG = {"prompt": "Write a long story about a robot.", "max_tokens": 2000, "ignore_eos": True}


def test_queue_full_is_429_with_retry_after() -> None:
    with daemon(model_path(SMOLLM2), "--max-running", "1", "--max-queue", "1", "--max-step-tokens", "64") as d:

        async def go() -> list[tuple[int, str | None, dict[str, object]]]:
            async with aiohttp.ClientSession() as s:

                async def one(delay: float) -> tuple[int, str | None, dict[str, object]]:
                    await asyncio.sleep(delay)
                    body = dict(LONG, timeout=3.0)
                    async with s.post(d.url + "/v1/completions", json=body) as r:
                        return r.status, r.headers.get("Retry-After"), await r.json()

                return await asyncio.gather(one(0), one(0.3), one(0.6))

        results = asyncio.run(go())
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 200, 429], results
        rejected = next(r for r in results if r[0] == 429)
        assert rejected[1] == "1" and rejected[2]["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert all(r[2]["choices"][0]["finish_reason"] == "timeout" for r in results if r[0] == 200)  # type: ignore[index]


def test_sigterm_finishes_in_flight_and_exits_zero() -> None:
    with daemon(model_path(SMOLLM2), "--shutdown-grace-s", "2") as d:

        async def go() -> tuple[dict[str, object], int]:
            async with aiohttp.ClientSession() as s:
                short = asyncio.ensure_future(
                    s.post(d.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 20, "temperature": 0})
                )
                long = asyncio.ensure_future(s.post(d.url + "/v1/completions", json=LONG))
                await asyncio.sleep(0.5)
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                try:
                    async with s.post(d.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}) as r:
                        late = r.status
                except aiohttp.ClientConnectionError:
                    late = -1  # already closed: refused, as good as 503
                rs = await short
                rl = await long
                assert rs.status == 200 and (await rs.json())["choices"][0]["finish_reason"] == "length"
                return await rl.json(), late

        body, late = asyncio.run(go())
        assert late in (503, -1)
        # Not finishable in the 2 s grace: aborted, and the client still got a whole answer.
        assert body["choices"][0]["finish_reason"] == "abort"  # type: ignore[index]
        assert d.proc.wait(timeout=15) == 0
        assert "stopped" in d.log()


def test_missing_model_exits_nonzero(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm.cli",
            "serve",
            "--config",
            "/dev/null",
            "--port",
            "0",
            "--model",
            str(tmp_path / "nope.gguf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "does not exist" in r.stderr


def _with_template(src: Path, dst: Path, template: str) -> None:
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(dst, arch, endianess=reader.endianess)
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [])


def test_hostile_chat_template_in_model_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    )
    model = tmp_path / "hostile.gguf"
    _with_template(FIXTURES / "tiny-llama3.gguf", model, payload)
    with daemon(model) as d:
        status, body = d.post(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert status == 400 and "chat template" in body["error"]["message"]
        assert not marker.exists()
        status, _ = d.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200  # the daemon is fine


def test_config_precedence_and_validation(tmp_path: Path) -> None:
    cfg = tmp_path / "edgelm.yaml"
    cfg.write_text("port: 9001\nmax_running: 4\nthreads: 1\nmodel: a.gguf\n")
    c, path = load_config(str(cfg), {"threads": 2}, {"EDGELM_PORT": "9002", "EDGELM_MAX_RUNNING": "8"})
    assert path == cfg and (c.port, c.max_running, c.threads, c.model) == (9002, 8, 2, "a.gguf")
    c, _ = load_config(str(cfg), {}, {})
    assert (c.port, c.max_running) == (9001, 4)
    cfg.write_text("port: 9001\nmax_runing: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_runing'"):
        load_config(str(cfg), {}, {})
    cfg.write_text("port: eighty\n")
    with pytest.raises(ConfigError, match="'port'.*not an integer"):
        load_config(str(cfg), {}, {})
    cfg.write_text("port: 80\n")
    with pytest.raises(ConfigError, match="'max_queue'"):
        load_config(str(cfg), {}, {"EDGELM_MAX_QUEUE": "0"})
    with pytest.raises(ConfigError, match="'prefix_cache'.*boolean"):
        load_config(str(cfg), {}, {"EDGELM_PREFIX_CACHE": "maybe"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"), {}, {})
    # The default search path: ./edgelm.yaml is found without --config.
    (tmp_path / "edgelm.yaml").write_text("port: 9100\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        c, path = load_config(None, {}, {})
        assert c.port == 9100 and path is not None and path.name == "edgelm.yaml"
    finally:
        os.chdir(cwd)
    # The command line reports errors naming the key, and exits 2.
    cfg.write_text("bogus: 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "unknown config key 'bogus'" in r.stderr
    cfg.write_text("port: 9001\n")
    r = subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "serve", "--config", str(cfg), "--print-config", "--max-running", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "port: 9001" in r.stdout and "max_running: 3" in r.stdout


def test_step_limits_follow_the_device() -> None:
    """Unset, the batch budgets are the device's: 16 sequences / 512 tokens a step on
    the CPU, 64 / 2048 on a GPU; set ones are kept on either, and checked."""
    c, _ = load_config("/dev/null", {}, {})
    assert c.step_limits("cpu") == (16, 512) and c.step_limits("cuda:0") == (64, 2048)
    c, _ = load_config("/dev/null", {"max_running": 8}, {})
    assert c.step_limits("cpu") == (8, 512) and c.step_limits("cuda:1") == (8, 2048)
    c, _ = load_config("/dev/null", {"max_running": 4096}, {})
    assert c.step_limits("cuda:0") == (4096, 4096)
    c, _ = load_config("/dev/null", {"max_step_tokens": 32}, {})
    assert c.step_limits("cpu") == (16, 32)
    with pytest.raises(ConfigError, match="'max_step_tokens': 32 .*max_running \\(64, the default on a GPU\\); raise"):
        c.step_limits("cuda:0")
    with pytest.raises(ConfigError, match="'max_running'"):
        load_config("/dev/null", {}, {"EDGELM_MAX_RUNNING": "0"})


def test_defaults_serve_smollm2_on_8080() -> None:
    c, _ = load_config("/dev/null", {}, {})
    assert c.port == 8080 and c.model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_schemathesis_no_server_errors() -> None:
    with daemon(model_path(SMOLLM2), "--max-context", "48", "--kv-cache-mib", "64") as d:
        status, spec = http("GET", d.url + "/openapi.json")
        assert status == 200 and spec["openapi"].startswith("3.")
        r = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                d.url + "/openapi.json",
                "--url",
                d.url,
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--request-timeout",
                "60",
                "--workers",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = r.stdout + r.stderr
        print(out[-3000:])
        assert r.returncode == 0, out[-6000:]
        _, metrics = d.get("/metrics")
        assert 'status="500"' not in metrics
        # (aiohttp logs the malformed-HTTP probes it rejects with 400 itself; those are fine.)
        assert "ERROR edgelm" not in d.log(), d.log()[-4000:]
        assert "passed" in out and " 0 passed" not in out


def test_preemption_under_memory_pressure_keeps_results() -> None:
    """A KV cache too small for four long streams at once: the youngest are preempted
    and recomputed later, and every stream still gets exactly its greedy text."""
    prompts = [f"Write a numbered list of {k} facts about the moon:" for k in ("ten", "twelve", "fifteen", "twenty")]
    body = {"max_tokens": 120, "temperature": 0, "ignore_eos": True}
    # SmolLM2: 23 KiB of KV per token, so 4 MiB holds ~176 tokens; each stream needs ~135.
    with daemon(model_path(SMOLLM2), "--kv-cache-mib", "4", "--max-context", "160") as d:
        alone = []
        for p in prompts:
            status, r = d.post("/v1/completions", dict(body, prompt=p))
            assert status == 200, r
            alone.append(r["choices"][0]["text"])

        async def together() -> list[str]:
            async with aiohttp.ClientSession() as s:

                async def one(p: str) -> str:
                    async with s.post(d.url + "/v1/completions", json=dict(body, prompt=p)) as r:
                        assert r.status == 200
                        return str((await r.json())["choices"][0]["text"])

                return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(together()) == alone
        assert d.metric("edgelm_preemptions") > 0
        _, h = d.get("/health")
        assert h["kv_blocks_used"] == 0


def test_health_is_503_until_the_model_is_loaded() -> None:
    """The daemon answers before its model is loaded: /health says "loading" with a
    503 and generation endpoints refuse with 503 + Retry-After, then both turn ready."""
    from aiohttp.test_utils import TestClient, TestServer

    from edgelm.config import Config
    from edgelm.server.app import Server, make_app

    async def go() -> None:
        srv = Server(Config(model=str(model_path(SMOLLM2)), threads=2, kv_cache_mib=64))
        async with TestClient(TestServer(make_app(srv))) as c:
            r = await c.get("/health")
            assert r.status == 503 and (await r.json())["status"] == "loading"
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "unavailable"
            await srv.load()
            r = await c.get("/health")
            body = await r.json()
            assert r.status == 200 and body["status"] == "ok" and body["kernel_level"]
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
            await srv.pool.close(0.0)

    asyncio.run(go())


def test_short_request_is_not_starved_by_a_long_prompt() -> None:
    """Fair admission on the real daemon: a short chat sent while a 4,000-token prompt
    prefills is answered before that prompt's first token (it used to wait for the whole
    prefill). The times are printed, not asserted."""
    import threading
    import time

    with daemon(model_path(SMOLLM2)) as d:
        body_short = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
        t0 = time.perf_counter()
        assert d.post("/v1/completions", body_short)[0] == 200
        idle = time.perf_counter() - t0
        done: dict[str, float] = {}

        def long() -> None:
            status, r = d.post(
                "/v1/completions",
                {"prompt": [(i * 37) % 40000 + 100 for i in range(4000)], "max_tokens": 1, "temperature": 0},
            )
            assert status == 200, r
            done["long"] = time.perf_counter()

        t = threading.Thread(target=long)
        t_long = time.perf_counter()
        t.start()
        time.sleep(0.5)  # the long prompt is being prefilled
        t1 = time.perf_counter()
        status, r = d.post("/v1/completions", body_short)
        done["short"] = time.perf_counter()
        assert status == 200, r
        t.join(120)
        print(
            f"short request alone {idle * 1000:.0f} ms; behind the 4,000-token prompt {(done['short'] - t1) * 1000:.0f} ms;"
            f" the long prompt took {done['long'] - t_long:.1f} s"
        )
        assert done["short"] < done["long"]
