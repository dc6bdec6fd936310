"""The daemon on a GPU (`--device cuda`): it says so in /health, and 16 concurrent
streams equal their solo runs. Runs where `EDGELM_TEST_GPU=1` (the GPU machine; see
DEVELOPERS.md, CUDA); elsewhere it is skipped — CI has no GPU. The models: the llama3
fixture (tests/fixtures), and the real models where $EDGELM_REAL_MODELS_DIR holds them."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from serve_util import Daemon, daemon

pytestmark = pytest.mark.skipif(os.environ.get("EDGELM_TEST_GPU") != "1", reason="needs a GPU (EDGELM_TEST_GPU=1)")

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama3.gguf"
# The real models too, where the GPU machine has them (they travel in parts: see
# DEVELOPERS.md, CUDA).
REAL = Path(os.environ.get("EDGELM_REAL_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
MODELS = [MODEL] + [
    p for p in (REAL / "SmolLM2-135M-Instruct.Q4_1.gguf", REAL / "gemma-3-270m-q4_k_m.gguf") if p.is_file()
]
PROMPTS = [[(i * 37 + j * 11 + 5) % 250 for j in range(4 + 3 * i)] for i in range(16)]


@pytest.fixture(scope="module", params=MODELS, ids=lambda p: p.name)
def srv(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    with daemon(request.param, "--device", "cuda", "--max-context", "256", "--kv-cache-mib", "64") as d:
        yield d


async def _texts(url: str, prompts: list[list[int]], n: int) -> list[str]:
    async with aiohttp.ClientSession() as s:

        async def one(p: list[int]) -> str:
            body = {"prompt": p, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
            out = []
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        out.append(json.loads(line[6:])["choices"][0]["text"])
            return "".join(out)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_health_says_cuda(srv: Daemon) -> None:
    status, h = srv.get("/health")
    assert status == 200 and h["device"].startswith("cuda:0"), h
    assert "running on the CPU" not in srv.log()


def test_sixteen_concurrent_streams_equal_alone_on_the_gpu(srv: Daemon) -> None:
    n = 32
    alone = [asyncio.run(_texts(srv.url, [p], n))[0] for p in PROMPTS]
    steps0 = srv.metric("edgelm_steps_total")
    together = asyncio.run(_texts(srv.url, PROMPTS, n))
    steps = srv.metric("edgelm_steps_total") - steps0
    assert steps < 16 * n / 4, steps  # they really were batched
    for p, a, b in zip(PROMPTS, alone, together):
        assert a == b, f"{p}: alone {a!r} vs batched {b!r}"
