"""`edgelm run`: the chat session in a pseudo-terminal (pexpect), with the model loaded in
the process and through a running daemon — history, a message over several lines, /clear,
/bye and Ctrl-D, Ctrl-C that stops the answer and not the session — and the one-shot
forms (a prompt argument, piped stdin), which pull a missing model first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import SMOLLM2, model_path
from registry_util import registry_servers
from serve_util import Daemon, daemon, http

CLOSED = "http://127.0.0.1:9"
REPO = str(Path(__file__).resolve().parents[2])
LONG = "Write a very long story about a cat who travels the world, with many chapters."


def spawn(*args: str, url: str = CLOSED, env: dict[str, str] | None = None) -> pexpect.spawn:
    e = {**os.environ, "EDGELM_URL": url, "TERM": "dumb", **(env or {})}
    return pexpect.spawn(
        sys.executable,
        ["-m", "edgelm.cli", "run", *args],
        cwd=REPO,
        env=e,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )


def ask(c: pexpect.spawn, text: str) -> str:
    c.sendline(text)
    c.expect(">>> ")
    return str(c.before)


def prompt_tokens(text: str) -> int:
    m = re.search(r"\[prompt tokens: (\d+), answer tokens: (\d+)", text)
    assert m, text
    return int(m.group(1)) + int(m.group(2))


def test_session_in_a_terminal() -> None:
    c = spawn(str(model_path(SMOLLM2)), "--temperature", "0", "--verbose")
    c.expect("Chatting with SmolLM2-135M-Instruct.Q4_1")
    c.expect(">>> ")
    out = ask(c, "What is the capital of France?")
    assert "Paris" in out
    first = prompt_tokens(out)
    # History: the next answer is generated for the whole conversation.
    c.sendline('"""And what about')
    c.expect(r"\.\.\. ")
    c.sendline('Germany?"""')
    c.expect(">>> ")
    second = str(c.before)
    assert prompt_tokens(second) > first + 10  # the first question and answer are in the prompt
    # Ctrl-C stops the answer; the session goes on.
    c.sendline(LONG)
    c.expect("cat")  # the answer has begun
    c.sendintr()
    c.expect(r"\[answer stopped\]")
    c.expect(">>> ")
    # The next question is answered with the conversation so far (how much of the
    # stopped answer it holds depends on when Ctrl-C landed, so not what it says).
    after = ask(c, "What is the capital of France? Answer in one word.")
    assert prompt_tokens(after) > prompt_tokens(second) + 10
    assert re.search(r"answer tokens: [1-9]", after), after
    # Ctrl-C at the prompt says how to leave; /clear forgets; /bye leaves.
    c.sendintr()
    c.expect("Use Ctrl \\+ d or /bye to exit.")
    c.expect(">>> ")
    assert "Cleared the conversation." in ask(c, "/clear")
    out = ask(c, "What is the capital of France?")
    assert prompt_tokens(out) < prompt_tokens(second)  # the history is gone
    assert "Unknown command" in ask(c, "/nope")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    # Ctrl-D ends a session too.
    c = spawn(str(model_path(SMOLLM2)))
    c.expect(">>> ")
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(model_path(SMOLLM2), "--models-dir", str(tmp_path_factory.mktemp("models"))) as d:
        yield d


def test_session_through_the_daemon(served: Daemon) -> None:
    name = "SmolLM2-135M-Instruct.Q4_1"
    c = spawn(name, "--temperature", "0", "-n", "300", url=served.url)
    c.expect(">>> ")
    assert "Paris" in ask(c, "What is the capital of France?")
    c.sendline(LONG)
    c.expect("cat")
    c.sendintr()  # the connection closes: the daemon aborts the request
    c.expect(r"\[answer stopped\]")
    c.expect(">>> ")
    deadline = time.monotonic() + 30
    while http("GET", served.url + "/health")[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http("GET", served.url + "/health")[1]["running"] == 0
    assert "Paris" in ask(c, "What is the capital of France?")
    c.sendline("/bye")
    c.expect(pexpect.EOF)


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "run", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
        env={**os.environ, "EDGELM_URL": CLOSED, **(env or {})},
    )


def test_one_shot_and_pull_first(tmp_path: Path, served: Daemon) -> None:
    smol = str(model_path(SMOLLM2))
    r = run(smol, "What is the capital of France?", "--temperature", "0")
    assert r.returncode == 0 and "Paris" in r.stdout and ">>>" not in r.stdout, r.stderr
    r = run(smol, "--temperature", "0", stdin="What is the capital of France?\n")
    assert r.returncode == 0 and "Paris" in r.stdout and ">>>" not in r.stdout, r.stderr
    # A name not there yet is pulled first, locally and through a daemon.
    models = tmp_path / "models"
    with registry_servers() as reg:
        reg.add_ollama("tiny-chat:latest", model_path(SMOLLM2))
        env = {"EDGELM_MODELS_DIR": str(models), "EDGELM_REGISTRY_URL": reg.ollama}
        r = run("tiny-chat", "What is the capital of France?", "--temperature", "0", env=env)
        assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
        assert "pulling manifest" in r.stderr and "success" in r.stderr
        r = run("nobody-has-this:1b", "hi", env=env)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
            "edgelm: pull failed: model 'nobody-has-this:1b' not found"
        )
        with daemon(
            model_path(SMOLLM2),
            "--models-dir",
            str(tmp_path / "daemon-models"),
            env={"EDGELM_REGISTRY_URL": reg.ollama},
        ) as d:
            r = run("tiny-chat", "What is the capital of France?", "--temperature", "0", env={"EDGELM_URL": d.url})
            assert r.returncode == 0 and "Paris" in r.stdout and "success" in r.stderr, r.stderr
            assert (tmp_path / "daemon-models" / "manifests").is_dir()  # the daemon pulled it, into its directory
    # --think for a model that cannot think: one line.
    r = run(smol, "hi", "--think")
    assert (
        r.returncode == 2
        and r.stderr.strip()
        == "edgelm: error: 'SmolLM2-135M-Instruct.Q4_1' does not support "
        "thinking (its chat template has no thinking section); leave 'think' out or set it to false"
    )
