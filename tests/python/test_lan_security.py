"""A daemon on a shared LAN: who may call each route (every route × every key × every
key configuration), Host and Origin checks against DNS rebinding and cross-site
requests, CORS for allowed browser apps, URL pulls off for a keyless daemon on the
LAN, and connections as a bounded resource (1,000 slow clients, a normal one still
served)."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import SMOLLM2, model_path
from lan_util import lan
from serve_util import daemon, http
from test_pull import _wheels, sha256, static_server

from edgelm.config import Config
from edgelm.server.app import Server, make_app
from edgelm.server.security import ADMIN, OPEN, READ, ROUTE_SCOPES

USER, ADMIN_KEY, WRONG = "user-secret-1", "admin-secret-1", "wrong-secret-1"
MODEL = "SmolLM2-135M-Instruct.Q4_1"

# One request per route, cheap: it passes the key check and then succeeds, or fails on
# its (deliberately thin) body — anything but 401/403 means "let in".
REQUESTS: dict[str, tuple[str, str, Any]] = {
    "GET /health": ("GET", "/health", None),
    "GET /": ("GET", "/", None),
    "GET /api/version": ("GET", "/api/version", None),
    "GET /openapi.json": ("GET", "/openapi.json", None),
    "GET /v1/models": ("GET", "/v1/models", None),
    "GET /v1/models/{model}": ("GET", f"/v1/models/{MODEL}", None),
    "POST /v1/completions": ("POST", "/v1/completions", {}),
    "POST /v1/chat/completions": ("POST", "/v1/chat/completions", {}),
    "POST /tokenize": ("POST", "/tokenize", {}),
    "POST /detokenize": ("POST", "/detokenize", {}),
    "GET /api/tags": ("GET", "/api/tags", None),
    "GET /api/ps": ("GET", "/api/ps", None),
    "POST /api/show": ("POST", "/api/show", {"model": "no-such-model"}),
    "POST /api/generate": ("POST", "/api/generate", {}),
    "POST /api/chat": ("POST", "/api/chat", {}),
    "POST /api/embed": ("POST", "/api/embed", {}),
    "POST /api/embeddings": ("POST", "/api/embeddings", {}),
    "POST /v1/embeddings": ("POST", "/v1/embeddings", {}),
    "GET /api/edgelm/models": ("GET", "/api/edgelm/models", None),
    "GET /api/edgelm/models/{file}": ("GET", "/api/edgelm/models/missing.gguf", None),
    "GET /metrics": ("GET", "/metrics", None),
    "POST /api/pull": ("POST", "/api/pull", {"model": "no-such-model"}),
    "DELETE /api/delete": ("DELETE", "/api/delete", {"model": "no-such-model"}),
    "POST /api/copy": ("POST", "/api/copy", {}),
}
# Forms of a route that are admin actions though the route is not: unloading.
UNLOAD = ("POST", "/api/generate", {"model": MODEL, "keep_alive": 0})


def test_every_route_has_a_scope() -> None:
    """The application's routes are exactly the table's: a new route cannot slip in
    without a scope (and a test request here)."""
    app = make_app(Server(Config()))
    routes = {
        f"{r.method} {r.resource.canonical}"
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert routes == set(ROUTE_SCOPES), routes ^ set(ROUTE_SCOPES)
    assert set(REQUESTS) == set(ROUTE_SCOPES)


def expected(scope: str, api_key: str | None, admin_key: str | None, sent: str | None) -> str | int:
    """The rules, written out: "ok", 401 or 403."""
    if scope == OPEN or (api_key is None and admin_key is None):
        return "ok"
    if scope == READ:
        if api_key is None:
            return "ok"  # only an admin key: reading stays open
        return "ok" if sent is not None and sent in (api_key, admin_key) else 401
    needed = admin_key if admin_key is not None else api_key  # admin scope
    if sent == needed:
        return "ok"
    if sent is not None and sent == api_key:
        return 403  # a valid key without the admin scope
    return 401


CONFIGS = [(None, None), (USER, None), (None, ADMIN_KEY), (USER, ADMIN_KEY)]


@pytest.mark.parametrize("api_key,admin_key", CONFIGS, ids=["no-keys", "api-key", "admin-key", "both-keys"])
def test_permission_table(api_key: str | None, admin_key: str | None, tmp_path: Path) -> None:
    env = {k: v for k, v in (("EDGELM_API_KEY", api_key), ("EDGELM_ADMIN_KEY", admin_key)) if v}
    rows = []
    with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path), env=env) as d:
        for sent in (None, USER, ADMIN_KEY, WRONG):
            headers = {"Authorization": f"Bearer {sent}"} if sent else {}
            for route, (method, path, body) in [*REQUESTS.items(), ("unload", UNLOAD)]:
                scope = ADMIN if route == "unload" else ROUTE_SCOPES[route]
                status, resp = http(method, d.url + path, body, headers=headers, timeout=30)
                want = expected(scope, api_key, admin_key, sent)
                got: str | int = status if status in (401, 403) else "ok"
                rows.append((route, sent, want, got, status))
                assert got == want, (route, scope, "key:", sent, "configured:", api_key, admin_key, status, resp)
                assert status < 500, (route, status, resp)
                if status == 401:
                    assert isinstance(resp, dict) and "error" in resp
    # Every cell of the table was tried.
    assert len(rows) == 4 * (len(REQUESTS) + 1)


def test_host_origin_and_cors(tmp_path: Path) -> None:
    config = 'allowed_origins: ["http://homeassistant.local:8123"]\nallowed_hosts: ["edgelm.example.lan"]\n'
    with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path), config=config) as d:
        port = d.url.rsplit(":", 1)[1]
        # Host: this daemon's names pass, others (DNS rebinding) do not.
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "edgelm.example.lan",
            f"[::1]:{port}",
            f"{socket.gethostname()}:{port}",
        ):
            assert http("GET", d.url + "/api/tags", headers={"Host": host})[0] == 200, host
        status, body = http("GET", d.url + "/api/tags", headers={"Host": f"attacker.example:{port}"})
        assert status == 403 and "allowed_hosts" in body["error"]
        # A web page on another site POSTs text/plain (no preflight) to pull a file: refused,
        # nothing downloaded, and the refusal does not depend on the body.
        status, body = http(
            "POST",
            d.url + "/api/pull",
            raw=b'{"model": "http://127.0.0.1:9/x.gguf"}',
            headers={"Origin": "https://attacker.example", "Content-Type": "text/plain"},
        )
        assert status == 403 and "allowed_origins" in body["error"]
        assert not list(tmp_path.glob("*.gguf*"))
        # An allowed browser app: preflight answered without a key, CORS on the answer.
        req = urllib.request.Request(
            d.url + "/v1/chat/completions",
            method="OPTIONS",
            headers={
                "Origin": "http://homeassistant.local:8123",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "http://homeassistant.local:8123"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
        req = urllib.request.Request(
            d.url + "/v1/completions",
            data=json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(),
            headers={"Origin": "http://homeassistant.local:8123", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://homeassistant.local:8123"
        # Streams carry the header too (it is set before the first byte).
        body_s = json.dumps({"prompt": "Hi", "max_tokens": 2, "stream": True}).encode()
        req = urllib.request.Request(
            d.url + "/v1/completions",
            data=body_s,
            headers={"Origin": "http://homeassistant.local:8123", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "http://homeassistant.local:8123"
            assert b"[DONE]" in r.read()
        # Pages on this machine may; the sandboxed "null" origin and other sites may not.
        assert http("GET", d.url + "/api/tags", headers={"Origin": "http://localhost:3000"})[0] == 200
        assert http("GET", d.url + "/api/tags", headers={"Origin": "null"})[0] == 403
        assert http("GET", d.url + "/api/tags", headers={"Origin": "http://homeassistant.local:9999"})[0] == 403


def test_keyless_daemon_on_the_lan(tmp_path: Path) -> None:
    """Bound to a LAN address without keys: pulling an arbitrary URL is off, catalogue
    names still work; the LAN's clients reach it by its address."""
    root, parts = _wheels(tmp_path)
    models = tmp_path / "models"
    with lan() as net, static_server(root, host=net.host_ip) as url:
        cat = tmp_path / "catalogue.json"
        entry = {
            "aliases": ["smol:tiny"],
            "file": SMOLLM2,
            "sha256": sha256(model_path(SMOLLM2)),
            "size": model_path(SMOLLM2).stat().st_size,
            "parts": [{"url": f"{url}/{p['name']}", "sha256": p["sha256"], "member": p["member"]} for p in parts],
        }
        cat.write_text(json.dumps({"models": {"smol-test": entry}}))
        with daemon(
            model_path(SMOLLM2),
            "--models-dir",
            str(models),
            host=net.ns_ip,
            prefix=net.exec_prefix,
            env={"EDGELM_CATALOGUE": str(cat)},
        ) as d:
            assert http("GET", d.url + "/api/tags")[0] == 200  # Host: its LAN address
            status, body = http(
                "POST", d.url + "/api/pull", {"model": f"{url}/{parts[0]['name']}".replace(".whl", ".gguf")}
            )
            assert status == 403 and "allow_url_pull" in body["error"], body
            status, body = http("POST", d.url + "/api/pull", {"model": "smol:tiny", "stream": False}, timeout=300)
            assert status == 200 and body == {"status": "success"}, body
            assert sha256(models / SMOLLM2) == entry["sha256"]
            # A rebinding page, reaching the LAN address by its own name, is refused.
            port = d.url.rsplit(":", 1)[1]
            assert http("GET", d.url + "/api/tags", headers={"Host": f"rebind.attacker.example:{port}"})[0] == 403


def test_slow_connections_do_not_stop_a_normal_client(tmp_path: Path) -> None:
    """1,000 connections that never finish their headers, against a daemon whose
    open-file limit is 512 (a Pi's service with a small LimitNOFILE): the cap closes the
    oldest of them to make room, the header deadline closes the rest, and a normal
    client is served throughout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path), "--header-timeout-s", "3", nofile=512) as d:
        port = int(d.url.rsplit(":", 1)[1])
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        slow = []
        try:
            for i in range(1000):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and nothing more
                slow.append(s)
                if i % 250 == 249:
                    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                    assert r.usage is not None and r.usage.completion_tokens == 2
            deadline = time.monotonic() + 15
            while (timeouts := d.metric('edgelm_http_connections_dropped_total{reason="header_timeout"}')) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            assert r.usage is not None and r.usage.completion_tokens == 2
            evicted = d.metric('edgelm_http_connections_dropped_total{reason="evicted"}')
            assert evicted >= 1000 - 448 and timeouts > 0, (evicted, timeouts)
            assert d.metric("edgelm_http_connections_open") < 448
        finally:
            for s in slow:
                s.close()
        log = d.log()
    assert "Traceback" not in log and "Too many open files" not in log


def test_malformed_http_is_one_warning_line(tmp_path: Path) -> None:
    with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path)) as d:
        port = int(d.url.rsplit(":", 1)[1])
        for raw in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(raw)
                status_line = s.recv(100).split(b"\r\n")[0]
                assert status_line.startswith(b"HTTP/1.") and status_line.split()[1].startswith(b"4"), status_line
        assert http("GET", d.url + "/health")[0] == 200
        log = d.log()
    assert "Traceback" not in log and " ERROR " not in log
    assert log.count("malformed HTTP request from") >= 2


def test_print_config_redacts_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "EDGELM_API_KEY": "very-secret-api", "EDGELM_ADMIN_KEY": "very-secret-admin"}
    r = subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "serve", "--config", "/dev/null", "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "very-secret" not in r.stdout and "api_key: <set, redacted>" in r.stdout
