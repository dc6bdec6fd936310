"""Optional API keys on the LAN: Bearer keys with an inference scope (`api_key`) and
an admin scope (`admin_key`); the mDNS TXT record says auth is on."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import ollama
import openai
import pytest
from conftest import SMOLLM2, model_path
from serve_util import daemon, http
from test_mdns import browse

from edgelm.config import ConfigError, load_config

USER, ADMIN = "user-secret-1", "admin-secret-1"


def _get(url: str, key: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_keys_and_scopes(tmp_path: Path) -> None:
    env = {"EDGELM_API_KEY": USER, "EDGELM_ADMIN_KEY": ADMIN}
    name = "edgelm auth test"
    with daemon(model_path(SMOLLM2), "--mdns-name", name, "--state-dir", str(tmp_path), env=env, mdns=True) as d:
        # Open: probes and discovery.
        assert _get(d.url + "/health", None) == 200 and _get(d.url + "/", None) == 200
        # Inference needs a key; either key works.
        bad = openai.OpenAI(base_url=d.url + "/v1", api_key="wrong-key-123", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for key in (USER, ADMIN):
            good = openai.OpenAI(base_url=d.url + "/v1", api_key=key, max_retries=0)
            r = good.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Hi", max_tokens=2)
            assert r.usage is not None and r.usage.completion_tokens == 2
        status, body = http("POST", d.url + "/v1/completions", {"prompt": "x"})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        # Ollama clients send the header the same way.
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=d.url).list()
        assert e.value.status_code == 401
        tags = ollama.Client(host=d.url, headers={"Authorization": f"Bearer {USER}"}).list()
        assert "SmolLM2-135M-Instruct.Q4_1:latest" in [m.model for m in tags.models]
        # Admin scope: /metrics.
        assert _get(d.url + "/metrics", None) == 401
        assert _get(d.url + "/metrics", USER) == 403
        assert _get(d.url + "/metrics", ADMIN) == 200
        rec = [x for x in browse() if x["name"] == name]
        assert rec and rec[0]["auth"] == "1"


def test_key_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'api_key'"):
        load_config("/dev/null", {}, {"EDGELM_API_KEY": "short"})
    with pytest.raises(ConfigError, match="'admin_key'"):
        load_config("/dev/null", {}, {"EDGELM_ADMIN_KEY": "has a space"})
