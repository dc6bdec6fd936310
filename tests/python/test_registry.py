"""Pulls by name from loopback servers that speak the registries' protocols
(registry_util.py) and serve the real SmolLM2 file: Ollama's registry (manifest, blobs
redirected to a blob host, Range resume after a dropped connection, a wrong digest) and
Hugging Face (a paged listing, the quantization pick, a split GGUF joined). Then the end
to end: a daemon pulls `qwen3:0.6b` and `hf.co/...` names through the real `ollama`
client, both APIs chat by those names, and list, copy and remove work, down to the blob
going when its last name does."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
from conftest import SMOLLM2, model_path
from registry_util import Registry, registry_servers, sha256_file, split_gguf
from serve_util import daemon, http

from edgelm.store import Store

TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}..."
PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.6, "top_k": 20, "repeat_penalty": 1.0}
LICENSE = "Apache License\nVersion 2.0, January 2004"
HF_REPO = "edgelm-test/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    smol = model_path(SMOLLM2)
    parts = split_gguf(smol, tmp_path_factory.mktemp("split"), 40 << 20)
    with registry_servers(page_size=2) as r:
        r.add_ollama("qwen3:0.6b", smol, template=TEMPLATE, params=PARAMS, license=LICENSE, system="You are terse.")
        r.add_ollama("edgelm/smol:q4_1", smol)
        r.add_ollama(
            "vision:latest",
            smol,
            extra=[{"mediaType": "application/vnd.ollama.image.projector", "digest": "sha256:" + "7" * 64, "size": 10}],
        )
        r.add_ollama("lies:latest", smol, digest="sha256:" + "0" * 64)  # the manifest names other bytes
        r.add_ollama("huge:latest", smol, digest="sha256:" + "1" * 64, size=10**14)  # 100 TB: no disk holds it
        r.add_hf(
            HF_REPO,
            {p.name.replace(".Q4_1", "-Q4_1"): p for p in parts} | {"SmolLM2-135M-Instruct-Q8_0.gguf": smol},
            ["README.md", ".gitattributes", "mmproj-SmolLM2-F16.gguf"],
        )
        yield r


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        input=stdin,
    )


def reg_env(r: Registry) -> dict[str, str]:
    return {"EDGELM_REGISTRY_URL": r.ollama, "EDGELM_HF_URL": r.hf}


# -- Ollama's registry ----------------------------------------------------------------------


def test_pull_from_the_ollama_registry(reg: Registry, tmp_path: Path) -> None:
    """A dropped connection part way through the model blob: retried, resumed with a
    Range request at the byte it broke off, and the digest still checked; the text
    layers kept; progress as plain lines (stderr is not a terminal)."""
    model_digest = reg.manifests[("library", "qwen3", "0.6b")]["layers"][0]["digest"]
    reg.blobs.drops[model_digest] = 1
    n_before = len(reg.blobs.requests)
    r = cli("pull", "qwen3:0.6b", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 0, r.stderr
    st = Store(tmp_path)
    e = st.lookup("qwen3:0.6b")
    assert e is not None and e.digest == model_digest == sha256_file(model_path(SMOLLM2))
    assert Path(r.stdout.strip()) == e.model == st.blob(model_digest)
    asked = [rng for d, rng in reg.blobs.requests[n_before:] if d == model_digest]
    assert asked[0] is None and asked[1] is not None and asked[1].startswith("bytes=") and int(asked[1][6:-1]) > 0
    assert "retrying" in r.stderr and "resuming at" in r.stderr and "verifying sha256 digest" in r.stderr
    assert "checking that the model loads" in r.stderr and "success" in r.stderr and "\r" not in r.stderr
    assert json.loads(st.text_layer(e, "application/vnd.ollama.image.params") or "") == PARAMS
    assert st.text_layer(e, "application/vnd.ollama.image.license") == LICENSE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "manifests"]
    assert not list((tmp_path / "blobs").glob("*partial*")) and not list(tmp_path.rglob(".*lock"))
    # Pulled again: every blob is there, nothing is downloaded.
    n_before = len(reg.blobs.requests)
    r = cli("pull", "qwen3:0.6b", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 0 and len(reg.blobs.requests) == n_before
    # Offline, `edgelm show` reads the layers.
    r = cli("show", "qwen3:0.6b", env={"EDGELM_MODELS_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "Q4_1" in r.stdout and "temperature" in r.stdout and "Apache License" in r.stdout
    assert cli("show", "qwen3:0.6b", "--license", env={"EDGELM_MODELS_DIR": str(tmp_path)}).stdout.strip() == LICENSE


def test_pull_errors_install_nothing(reg: Registry, tmp_path: Path) -> None:
    # The blob is not what the manifest names.
    r = cli("pull", "lies", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 1 and "does not match its digest" in r.stderr and r.stderr.count("edgelm:") == 1
    assert not list((tmp_path / "manifests").rglob("*")) and not list((tmp_path / "blobs").glob("sha256-0*"))
    assert not list((tmp_path / "blobs").glob("*partial*"))
    # A name the registry does not have; a registry that does not answer.
    r = cli("pull", "nope:1b", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 1 and "'nope:1b' not found in the registry" in r.stderr
    r = cli("pull", "qwen3:0.6b", "--models-dir", str(tmp_path), env={"EDGELM_REGISTRY_URL": "http://127.0.0.1:9"})
    assert r.returncode == 1 and "could not reach 127.0.0.1:9" in r.stderr
    for res in (r,):
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()[-1]) < 400
    # A disk that would fill: refused before a byte is written.
    r = cli("pull", "huge", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 1 and "not enough disk space" in r.stderr and "remove a model" in r.stderr, r.stderr
    assert not list((tmp_path / "blobs").glob("sha256-1*"))
    # A vision model: its projector is left out, the text model is pulled.
    r = cli("pull", "vision", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 0 and "skipping the vision projector" in r.stderr, r.stderr


# -- Hugging Face -------------------------------------------------------------------------


def test_pull_from_hugging_face(reg: Registry, tmp_path: Path) -> None:
    # The quant asked for is split in parts: each part checked, then joined (into the
    # very bytes of the original file), then proven and named.
    r = cli("pull", f"hf.co/{HF_REPO}:q4_1", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 0, r.stderr
    assert "joining 3 parts into one GGUF" in r.stderr
    e = Store(tmp_path).lookup(f"hf.co/{HF_REPO}:Q4_1")
    assert e is not None and e.digest == sha256_file(model_path(SMOLLM2))
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [e.model.name]  # the parts are gone
    # No tag: Q4_K_M is not there, so the first of the preferred ones that is (Q8_0).
    r = cli("pull", f"huggingface.co/{HF_REPO}", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 0, r.stderr
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" in r.stderr
    r = cli("pull", f"hf.co/{HF_REPO}:Q2_K", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 1 and "has no Q2_K GGUF (it has: Q4_1, Q8_0)" in r.stderr
    r = cli("pull", "hf.co/nobody/nothing", "--models-dir", str(tmp_path), env=reg_env(reg))
    assert r.returncode == 1 and "not found on Hugging Face" in r.stderr


# -- the daemon, end to end -----------------------------------------------------------------


def test_end_to_end_pull_chat_list_copy_remove(reg: Registry, tmp_path: Path) -> None:
    models = tmp_path / "models"
    hf_name = f"hf.co/{HF_REPO}:Q4_1"
    with daemon(model_path(SMOLLM2), "--models-dir", str(models), env=reg_env(reg)) as d:
        c = ollama.Client(host=d.url)
        lines = list(c.pull("qwen3:0.6b", stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        model_digest = reg.manifests[("library", "qwen3", "0.6b")]["layers"][0]["digest"]
        assert any(x.digest == model_digest and x.total and x.completed == x.total for x in lines)
        assert c.pull(hf_name, stream=False).status == "success"
        listed = {m.model: m for m in c.list().models}
        assert {"qwen3:0.6b", hf_name, "SmolLM2-135M-Instruct.Q4_1:latest"} <= set(listed)
        assert listed["qwen3:0.6b"].digest == model_digest.split(":")[1]
        assert listed["qwen3:0.6b"].details.quantization_level == "Q4_1"
        # Chat by those names, in both APIs; the pulled parameters apply (stop strings,
        # temperature), the system prompt too.
        shown = c.show("qwen3:0.6b")
        assert shown.template == TEMPLATE and shown.license == LICENSE and "temperature" in (shown.parameters or "")
        r = c.chat(
            model="qwen3:0.6b",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            options={"temperature": 0, "num_predict": 16},
        )
        assert "Paris" in r.message.content
        oai = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)
        assert {"qwen3:0.6b", hf_name} <= {m.id for m in oai.models.list().data}
        o = oai.chat.completions.create(
            model=hf_name,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
        assert "Paris" in (o.choices[0].message.content or "")
        assert {m.model for m in c.ps().models} >= {"qwen3:0.6b"}
        # Copy: a name, no bytes; remove: the blob goes with its last name.
        blobs = models / "blobs"
        before = sorted(p.name for p in blobs.iterdir())
        c.copy("qwen3:0.6b", "kitchen:assistant")
        assert sorted(p.name for p in blobs.iterdir()) == before
        r2 = c.chat(
            model="kitchen:assistant",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            options={"temperature": 0, "num_predict": 16},
        )
        assert r2.message.content == r.message.content
        c.delete("qwen3:0.6b")
        assert "qwen3:0.6b" not in {m.model for m in c.list().models}
        assert sorted(p.name for p in blobs.iterdir()) == before  # the copy still uses every blob
        c.delete("kitchen:assistant")
        after = sorted(p.name for p in blobs.iterdir())
        assert after == [f"sha256-{model_digest.split(':')[1]}"]  # the HF name keeps the model blob alone
        c.delete(hf_name)
        assert list(blobs.iterdir()) == []
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model="qwen3:0.6b", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 404
        log = d.log()
    assert "Traceback" not in log and " ERROR " not in log
    assert "pull qwen3:0.6b: pulling" in log and "% of " in log  # plain progress lines in the log


def test_a_pull_does_not_replace_a_model_in_use(reg: Registry, tmp_path: Path) -> None:
    models = tmp_path / "models"
    with daemon(model_path(SMOLLM2), "--models-dir", str(models), env=reg_env(reg)) as d:
        c = ollama.Client(host=d.url)
        assert c.pull("edgelm/smol:q4_1", stream=False).status == "success"
        c.chat(
            model="edgelm/smol:q4_1",
            messages=[{"role": "user", "content": "hi"}],
            options={"num_predict": 1},
            keep_alive=-1,
        )
        # The registry now has other bytes under that name: refused before downloading.
        gemma = model_path("gemma-3-270m-q4_k_m.gguf")
        reg.add_ollama("edgelm/smol:q4_1", gemma)
        status, body = http("POST", d.url + "/api/pull", {"model": "edgelm/smol:q4_1", "stream": False})
        assert status == 409 and "in use" in body["error"]
        reg.add_ollama("edgelm/smol:q4_1", model_path(SMOLLM2))


def test_unreachable_registry_is_one_line(tmp_path: Path) -> None:
    with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path)) as d:  # the registry: a closed port
        lines = [json.loads(x) for x in http("POST", d.url + "/api/pull", {"model": "qwen3:0.6b"})[1].splitlines()]
        assert "could not reach 127.0.0.1:9" in lines[-1]["error"] and "registry_url" in lines[-1]["error"]


def test_pull_progress_bar_on_a_terminal(reg: Registry, tmp_path: Path) -> None:
    """On a terminal the progress is a bar redrawn in place (one line a layer)."""
    import os

    import pexpect

    c = pexpect.spawn(
        sys.executable,
        ["-m", "edgelm.cli", "pull", "qwen3:0.6b", "--models-dir", str(tmp_path)],
        env={**os.environ, **reg_env(reg), "TERM": "dumb"},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    c.expect("pulling manifest")
    digest = reg.manifests[("library", "qwen3", "0.6b")]["layers"][0]["digest"]
    c.expect(f"pulling {digest[7:19]}: +[0-9]+% ▕")
    c.expect("100% ▕█+▏")
    c.expect("success")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
