"""`edgelm list / ps / show / rm / cp / stop`: through the running daemon when one answers
(`EDGELM_URL`), else on the models directory; errors as one line that says what to do."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOLLM2, model_path
from registry_util import registry_servers
from serve_util import daemon

from edgelm.store import Store

CLOSED = "http://127.0.0.1:9"  # nothing listens: the CLI works on the models directory


def cli(
    *args: str,
    url: str = CLOSED,
    models: Path | None = None,
    key: str | None = None,
    extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGELM_URL": url, **(extra or {})}
    if models is not None:
        env["EDGELM_MODELS_DIR"] = str(models)
    if key is not None:
        env["EDGELM_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelm:"), r.stderr
    for n in needles:
        assert n in lines[0], r.stderr


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A models directory with a plain file and a pulled name (from a loopback registry)."""
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(model_path(SMOLLM2), d / "plain.gguf")
    with registry_servers() as reg:
        reg.add_ollama("qwen3:0.6b", model_path(SMOLLM2), license="MIT License", params={"temperature": 0.6})
        r = cli("pull", "qwen3:0.6b", models=d, extra={"EDGELM_REGISTRY_URL": reg.ollama})
        assert r.returncode == 0, r.stderr
    return d


def rows(out: str) -> dict[str, list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["NAME", "ID"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_model_commands_on_the_models_directory(models: Path) -> None:
    listed = rows(cli("list", models=models).stdout)
    assert set(listed) == {"plain:latest", "qwen3:0.6b"}
    digest = Store(models).lookup("qwen3:0.6b").digest  # type: ignore[union-attr]
    assert listed["qwen3:0.6b"][0] == digest[7:19]  # type: ignore[index]
    r = cli("show", "qwen3:0.6b", models=models)
    assert r.returncode == 0 and "architecture        llama" in r.stdout and "MIT License" in r.stdout
    assert "temperature" in r.stdout and "completion" in r.stdout
    assert cli("show", "plain", "--template", models=models).stdout.startswith("{% for message in messages %}")
    # cp: a name, no bytes; rm: names, then the blob with its last name; a plain file by its id.
    blobs = sorted((models / "blobs").iterdir())
    assert cli("cp", "qwen3:0.6b", "kitchen", models=models).stdout.strip() == "copied 'qwen3:0.6b' to 'kitchen'"
    assert cli("cp", "plain", "plain-alias:v1", models=models).returncode == 0
    assert sorted((models / "blobs").iterdir()) == blobs
    assert set(rows(cli("ls", models=models).stdout)) == {
        "plain:latest",
        "qwen3:0.6b",
        "kitchen:latest",
        "plain-alias:v1",
    }
    assert cli("rm", "qwen3:0.6b", models=models).returncode == 0
    assert sorted((models / "blobs").iterdir()) == blobs
    assert cli("rm", "kitchen", "plain-alias:v1", models=models).stdout.split("\n")[:2] == [
        "deleted 'kitchen'",
        "deleted 'plain-alias:v1'",
    ]
    assert list((models / "blobs").iterdir()) == [] and (models / "plain.gguf").exists()
    assert cli("rm", "plain", models=models).returncode == 0 and not (models / "plain.gguf").exists()
    # What users meet, one line each.
    one_line_error(cli("show", "nope", models=models), "'nope' not found", "edgelm pull nope")
    one_line_error(cli("rm", "nope", models=models), "'nope' not found")
    one_line_error(cli("cp", "nope", "x", models=models), "not found")
    one_line_error(cli("ps", models=models), f"no daemon answers at {CLOSED}", "edgelm serve")
    one_line_error(cli("stop", "x", models=models), "nothing to stop")
    one_line_error(cli("cp", "x", "a/b/c/d", models=models))


def test_model_commands_through_the_daemon(models: Path) -> None:
    with daemon(models / "plain.gguf", "--models-dir", str(models), config="admin_key: open-sesame-42\n") as d:
        listed = rows(cli("list", url=d.url, key="open-sesame-42").stdout)
        assert set(listed) == {"plain:latest", "qwen3:0.6b"}
        assert cli("run", "qwen3:0.6b", "Say hi", "-n", "4", url=d.url, key="open-sesame-42").returncode == 0
        ps = rows(cli("ps", url=d.url, key="open-sesame-42").stdout)
        assert set(ps) == {"plain:latest", "qwen3:0.6b"} and ps["plain:latest"][-1] == "forever"
        assert cli("stop", "qwen3:0.6b", url=d.url, key="open-sesame-42").returncode == 0
        assert set(rows(cli("ps", url=d.url, key="open-sesame-42").stdout)) == {"plain:latest"}
        assert cli("cp", "qwen3:0.6b", "kitchen", url=d.url, key="open-sesame-42").returncode == 0
        # The daemon's scopes apply: without the admin key a removal is refused.
        one_line_error(cli("rm", "kitchen", url=d.url, key="wrong"), "EDGELM_API_KEY")
        assert cli("rm", "kitchen", "qwen3:0.6b", url=d.url, key="open-sesame-42").returncode == 0
        assert set(rows(cli("list", url=d.url, key="open-sesame-42").stdout)) == {"plain:latest"}
        assert list((models / "blobs").iterdir()) == []
        one_line_error(cli("stop", "qwen3:0.6b", url=d.url, key="open-sesame-42"), "is not loaded")
        one_line_error(cli("show", "nope", url=d.url, key="open-sesame-42"), "'nope' not found")


def test_serve_on_a_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgelm.cli",
                "serve",
                "--port",
                str(port),
                "--no-mdns",
                "--model",
                str(model_path(SMOLLM2)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    one_line_error(r, f"cannot listen on 127.0.0.1:{port}", "address is in use", "--port")


def test_serve_a_pulled_name(models: Path) -> None:
    """`edgelm serve -m NAME` serves a pulled name: listed under it, chatted with by it;
    the configured model's name cannot be removed, another name of its blob can."""
    import ollama

    with daemon(Path("qwen3:0.6b"), "--models-dir", str(models)) as d:
        c = ollama.Client(host=d.url)
        assert c.ps().models[0].model == "qwen3:0.6b"
        assert c.chat(
            model="qwen3:0.6b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}
        ).message.content
        c.copy("qwen3:0.6b", "kitchen")
        c.delete("kitchen")
        with pytest.raises(ollama.ResponseError) as e:
            c.delete("qwen3:0.6b")
        assert e.value.status_code == 409 and "configured model" in e.value.error
        assert (models / "blobs").is_dir() and len(list((models / "blobs").iterdir())) == 4
