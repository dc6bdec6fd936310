"""The `edgelm` command, and the memory promise of the loader: weights are used in
place from the memory map, never copied."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import GEMMA3, SMOLLM2, model_path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True, timeout=600)


def test_info_describes_the_model() -> None:
    r = run_cli("info", str(model_path(GEMMA3)))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "architecture:  gemma3" in out
    assert "layers:        18" in out
    assert "262144 tokens, tokenizer 'llama'" in out
    for ty in ("Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"):
        assert f"  {ty} " in out
    from edgelm import _native

    assert f"CPU kernels:   {_native.kernel_level()} " in out


def test_kernel_level_can_be_forced() -> None:
    import os

    from edgelm import _native

    levels = _native.available_kernel_levels()
    assert levels[0] == "scalar"
    for level in levels:
        env = dict(os.environ, EDGELM_KERNEL_LEVEL=level)
        r = subprocess.run(
            [sys.executable, "-m", "edgelm.cli", "info", str(model_path(SMOLLM2))],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert f"CPU kernels:   {level} " in r.stdout


def test_run_streams_a_greedy_continuation() -> None:
    r = run_cli("run", str(model_path(SMOLLM2)), "The capital of France is", "-n", "6", "--temperature", "0", "--raw")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")


def test_run_answers_with_the_chat_template() -> None:
    """An instruct model asked a question answers it (the template makes it a chat)."""
    r = run_cli("run", str(model_path(SMOLLM2)), "What is the capital of France?", "-n", "20", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_cli_errors_are_one_clear_line() -> None:
    r = run_cli("info", "/nonexistent/model.gguf")
    assert r.returncode == 2
    assert r.stderr.startswith("edgelm: error: cannot read /nonexistent/model.gguf")
    assert "Traceback" not in r.stderr


def test_weights_are_held_once() -> None:
    """The weights are resident once after load + one generation: tensors the CPU
    kernels read in place stay in the page cache (file-backed RSS), tensors repacked
    for the kernels (anonymous memory) let their file pages go. Never both."""
    for name in (SMOLLM2, GEMMA3):
        code = textwrap.dedent(f"""
            import json, os, edgelm
            def status():
                d = {{}}
                for line in open('/proc/self/status'):
                    k, _, v = line.partition(':')
                    if k in ('RssAnon', 'RssFile'):
                        d[k] = int(v.split()[0]) * 1024
                return d
            before = status()
            m = edgelm.Model({str(model_path(name))!r}, n_threads=1)
            list(m.generate(m.tokenize('Hello'), max_tokens=2, temperature=0))
            after = status()
            print(json.dumps(dict(before=before, after=after, size=os.path.getsize({str(model_path(name))!r}))))
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        size = d["size"]
        anon_growth = d["after"]["RssAnon"] - d["before"]["RssAnon"]
        file_growth = d["after"]["RssFile"] - d["before"]["RssFile"]
        print(
            f"{name}: file {size >> 20} MiB, anon growth {anon_growth >> 20} MiB, "
            f"file-backed growth {file_growth >> 20} MiB"
        )
        # Tokenizer tables, KV cache and scratch are allowed; a second copy of the weights is not.
        assert anon_growth + file_growth < 1.3 * size, (
            f"{name}: {anon_growth} anonymous + {file_growth} file-backed bytes for a {size}-byte file"
        )
