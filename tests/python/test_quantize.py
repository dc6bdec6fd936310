"""`edgelm quantize` against llama.cpp on the same input (tests/fixtures/quantize_golden.json,
made by tests/fixtures/make_quantize_golden.py with llama-quantize and llama-perplexity
b11434).

SmolLM2 is first dequantized to F16 by edgelm itself; from that F16 file every type is
produced by edgelm and compared with llama-quantize's file for the same type: the bytes
(sha256 of the whole file), the tensor types, and the perplexity — edgelm's own on its
file against llama-perplexity's on edgelm's file and on llama-quantize's. Then the
failure cases: each ends with a clear error and nothing under the output name.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, GEMMA3, SMOLLM2, load_fixture, model_path

import edgelm
from edgelm import _native
from edgelm.pull import file_sha256 as sha256

GOLDEN = load_fixture("quantize_golden.json")
PPL_TEXT = (FIXTURES / "ppl_text.txt").read_text()


def cli(*args: str, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 dequantized to F16 by edgelm: the same bytes the fixture started from."""
    out = tmp_path_factory.mktemp("quant") / "SmolLM2-135M-Instruct.F16.gguf"
    r = cli("quantize", str(model_path(SMOLLM2)), str(out), "F16")
    assert r.returncode == 0, r.stderr
    assert sha256(out) == GOLDEN["smollm2_f16"]["sha256"]
    return out


def ppl(path: Path) -> float:
    """edgelm's perplexity, over the same tokens llama-perplexity scored."""
    m = edgelm.Model(path)
    ids = m.tokenize(PPL_TEXT, add_special=True)[: GOLDEN["n_ctx"] * GOLDEN["chunks"]]
    return m.perplexity(ids, n_ctx=GOLDEN["n_ctx"])


@pytest.mark.parametrize("ty", list(GOLDEN["smollm2_f16"]["types"]))
def test_each_type_equals_llama_quantize(f16: Path, tmp_path: Path, ty: str) -> None:
    want = GOLDEN["smollm2_f16"]["types"][ty]
    out = tmp_path / f"SmolLM2.{ty}.gguf"
    s = _native.quantize_file(str(f16), str(out), ty, threads=2)
    counts: dict[str, int] = {}
    for _, _, t, _ in _native.inspect_gguf(str(out))[3]:
        counts[t] = counts.get(t, 0) + 1
    assert counts == want["tensor_types"]
    assert s["out_file_bytes"] == out.stat().st_size == want["file_bytes"]
    # Same encoders, same mix rules, same metadata order: the same file, byte for byte.
    assert sha256(out) == want["llama_quantize_sha256"]
    assert want["edgelm_identical"]
    got = ppl(out)
    peer_on_ours = want["ppl_edgelm_file"]
    print(
        f"{ty}: edgelm ppl {got:.4f}; llama-perplexity on edgelm's file {peer_on_ours:.4f}, "
        f"on llama-quantize's {want['ppl_llama_quantize']:.4f}; {s['seconds']:.2f} s"
    )
    assert abs(got - peer_on_ours) / peer_on_ours < 0.01
    assert abs(got - want["ppl_llama_quantize"]) / want["ppl_llama_quantize"] < 0.01


@pytest.mark.parametrize("ty", list(GOLDEN["gemma3_requantize"]["types"]))
def test_gemma3_requantize_equals_llama_quantize(tmp_path: Path, ty: str) -> None:
    """Q4_K/Q5_0/Q6_K/Q8_0 input (SentencePiece model): llama-quantize --allow-requantize."""
    want = GOLDEN["gemma3_requantize"]["types"][ty]
    out = tmp_path / f"gemma.{ty}.gguf"
    _native.quantize_file(str(model_path(GEMMA3)), str(out), ty)
    assert sha256(out) == want["llama_quantize_sha256"]
    got = ppl(out)
    assert abs(got - want["ppl_edgelm_file"]) / want["ppl_edgelm_file"] < 0.01, got


def test_metadata_and_tokenizer_carry_over(f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    _native.quantize_file(str(f16), str(out), "Q4_K_M")
    src, dst = edgelm.Model(model_path(SMOLLM2)), edgelm.Model(out)
    a, b = dict(src.metadata), dict(dst.metadata)
    assert b.pop("general.file_type") == 15 and a.pop("general.file_type") == 3
    assert b.pop("general.quantization_version") == 2
    a.pop("general.quantization_version", None)
    assert a == b
    text = "<|im_start|>user\nHello, 2026 wörld!<|im_end|>"
    assert src.tokenize(text, parse_special=True) == dst.tokenize(text, parse_special=True)
    # A greedy continuation from the quantized file is text, not noise.
    toks = list(dst.generate(dst.tokenize("The capital of France is"), max_tokens=8, temperature=0))
    assert "Paris" in "".join(t.text for t in toks)


def test_progress_and_plan(f16: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []
    _native.quantize_file(
        str(f16),
        str(tmp_path / "q.gguf"),
        "Q8_0",
        progress=lambda i, n, name, a, b, done, total: seen.append((i, done, total)),
    )
    assert seen and seen[-1][1] == seen[-1][2] and seen[-1][0] == 272
    assert all(x[1] <= y[1] for x, y in zip(seen, seen[1:]))
    plan = _native.quantize_plan(str(f16), "Q4_K_M")
    assert len(plan) == 272
    types = {name: new for name, _, _, new, _ in plan}
    assert types["token_embd.weight"] == "Q8_0"  # tied output: Q6_K, rows of 576 fall back to Q8_0
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    pure = {name: new for name, _, _, new, _ in _native.quantize_plan(str(f16), "Q4_K_M", pure=True)}
    assert pure["blk.0.ffn_down.weight"] == "Q4_K" and pure["blk.0.attn_q.weight"] == "Q5_0"


def test_cli_summary_and_info(f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    r = cli("quantize", str(f16), str(out), "q4_k")  # the alias of Q4_K_M
    assert r.returncode == 0, r.stderr
    assert "Q4_K_M" in r.stdout and "MB/s" in r.stdout and "re-encoded" in r.stdout
    assert "quantizing" in r.stderr and "100.0%" in r.stderr  # progress lines when not a tty
    assert "already quantized" not in r.stderr
    r = cli("quantize", str(model_path(SMOLLM2)), str(tmp_path / "re.gguf"), "Q8_0")
    assert r.returncode == 0 and "210 tensors were already quantized" in r.stderr, r.stderr
    info = cli("info", str(out))
    assert info.returncode == 0, info.stderr
    assert "file type: Q4_K_M" in info.stdout and "bytes per type:" in info.stdout
    assert "blk.0.ffn_down.weight" in info.stdout and "Q6_K" in info.stdout
    dry = cli("quantize", "--dry-run", str(f16), str(tmp_path / "never.gguf"), "Q6_K")
    assert dry.returncode == 0 and "-> Q8_0" in dry.stdout and not (tmp_path / "never.gguf").exists()


def test_info_on_a_file_edgelm_cannot_run(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = cli("info", str(tmp_path / "bert.gguf"))
    assert r.returncode == 0, r.stderr
    assert "edgelm cannot run it" in r.stdout and "bert" in r.stdout
    assert "F16" in r.stdout and "blk.0.attn_q.weight" in r.stdout


# ---- failures: a clear error, and nothing under the output name ---------------------


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed run"
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary file was left behind"


def test_truncated_and_corrupt_input(tmp_path: Path) -> None:
    data = model_path(SMOLLM2).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.gguf").write_bytes(b"NOTGGUF!" + data[8:4096])
    for name, words in (("cut.gguf", "invalid GGUF"), ("junk.gguf", "magic")):
        out = tmp_path / f"{name}.q.gguf"
        r = cli("quantize", str(tmp_path / name), str(out), "Q4_0")
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert_nothing_left(out)


def test_bad_types_and_paths(f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    r = cli("quantize", str(f16), str(out), "IQ2_XXS")
    assert r.returncode == 2 and "importance matrix" in r.stderr and "Q4_K_M" in r.stderr
    r = cli("quantize", str(f16), str(out), "Q7")
    assert r.returncode == 2 and "unknown quantization type" in r.stderr
    r = cli("quantize", "-t", "0", str(f16), str(out), "Q4_0")
    assert r.returncode == 2 and "not at least 1" in r.stderr and "Traceback" not in r.stderr
    r = cli("quantize", str(f16), str(tmp_path / "no" / "such" / "dir.gguf"), "Q4_0")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = cli("quantize", str(tmp_path / "absent.gguf"), str(out), "Q4_0")
    assert r.returncode == 2 and "absent.gguf" in r.stderr
    assert_nothing_left(out)


def test_non_finite_weight_is_refused(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "nan.gguf"), "llama")
    bad = np.ones((4, 64), np.float16)
    bad[3, 5] = np.nan
    w.add_tensor("blk.0.attn_q.weight", bad)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    with pytest.raises(edgelm.InvalidRequestError, match=r"blk.0.attn_q.weight.*row 3"):
        _native.quantize_file(str(tmp_path / "nan.gguf"), str(out), "Q8_0")
    assert_nothing_left(out)


def test_file_size_limit_ends_cleanly(f16: Path, tmp_path: Path) -> None:
    """A write that fails half-way (RLIMIT_FSIZE: the kernel refuses bytes past 20 MB,
    as a full disk would) is an error naming the output, and the partial file is gone."""
    out = tmp_path / "big.gguf"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    r = cli("quantize", str(f16), str(out), "Q8_0", preexec_fn=limit)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "cannot write" in r.stderr and str(out) in r.stderr and "too large" in r.stderr.lower()
    assert_nothing_left(out)


def test_full_disk_ends_cleanly(f16: Path, tmp_path: Path) -> None:
    """A real full file system: a 16 MiB tmpfs in a private mount namespace (needs
    root and unshare; the same failure is covered by the size-limit test otherwise)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {mnt} && "
        f"{sys.executable} -m edgelm.cli quantize {f16} {mnt}/out.gguf Q8_0; rc=$?; "
        f"ls -A {mnt}; exit $rc"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if "mount:" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "No space left on device" in r.stderr and "out.gguf" in r.stderr
    assert r.stdout.strip() == "", f"left in the full file system: {r.stdout!r}"


def test_ctrl_c_leaves_nothing(f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "int.gguf"
    p = subprocess.Popen(
        [sys.executable, "-m", "edgelm.cli", "quantize", "-t", "1", str(f16), str(out), "Q3_K_M"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stderr is not None
    first = p.stderr.readline()  # the first progress line: the work has started
    assert "quantizing" in first, first
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=60)
    assert rc == 130, (rc, p.stderr.read())
    assert_nothing_left(out)
