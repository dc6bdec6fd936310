"""edgelm against llama.cpp (b11434) on tiny synthetic models of the architectures the
real test models do not cover: qwen2 (q/k/v biases, NEOX RoPE), a llama with an untied
output matrix and llama3-style rope_freqs.weight, qwen3 (per-head q/k norms), qwen3moe
(router, top-k experts, 3-D expert tensors), phi3 (fused tensors, partial rotary,
LongRoPE by context, a sliding window llama.cpp switches off) and granite (embedding,
residual, attention and logit multipliers).

Fixtures (models and llama.cpp's greedy output) come from
tests/fixtures/make_tiny_models.py; nothing here needs the network or llama.cpp. Each
golden entry is one file llama.cpp ran: the committed F32 files (tight bounds: both
engines agree to ~1e-3 in logprob), an F16 copy (tight too: both round activations to
f16 the same way), and Q6_K / Q4_K_M (and Q8_0 where the peer build could run it)
copies of 256-wide variants, whose rows are whole K-quant blocks. The copies are made
here again: the 256-wide F32 files by the fixture script's own function, the quantized
files by `edgelm quantize`, each checked by sha256 against the file llama.cpp ran."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, load_fixture

import edgelm
from edgelm import _native

sys.path.insert(0, str(FIXTURES))
import make_tiny_models  # noqa: E402  (the writer the fixtures came from)

ARCH = {
    "tiny-qwen2.gguf": "qwen2",
    "tiny-llama3.gguf": "llama",
    "tiny-qwen3.gguf": "qwen3",
    "tiny-qwen3moe.gguf": "qwen3moe",
    "tiny-phi3.gguf": "phi3",
    "tiny-granite.gguf": "granite",
}
# Tensors whose presence makes the file exercise the path under test.
MUST_HAVE = {
    "tiny-qwen2.gguf": ["output.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"],
    "tiny-llama3.gguf": ["output.weight", "rope_freqs.weight"],
    "tiny-qwen3.gguf": ["blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"],
    "tiny-qwen3moe.gguf": [
        "blk.0.ffn_gate_inp.weight",
        "blk.0.ffn_gate_exps.weight",
        "blk.0.ffn_up_exps.weight",
        "blk.0.ffn_down_exps.weight",
        "blk.0.attn_q_norm.weight",
    ],
    "tiny-phi3.gguf": ["blk.0.attn_qkv.weight", "rope_factors_long.weight", "rope_factors_short.weight"],
    "tiny-granite.gguf": ["blk.0.attn_output.bias", "blk.0.ffn_up.bias", "blk.0.ffn_down.bias"],
}
MUST_NOT_HAVE = {
    "tiny-qwen3.gguf": ["output.weight", "blk.0.attn_q.bias"],
    "tiny-phi3.gguf": ["blk.0.attn_q.weight", "blk.0.ffn_gate.weight"],
}
# F32/F16: llama.cpp top-1 vs top-2 gap under which a greedy parting is a tie, and the
# largest logprob difference allowed (as for the real models' F32 conversions).
NEAR_TIE = 0.01
LOGPROB_TOL = 0.02
# Quantized: the real models' near-tie bound (test_golden.py) for greedy partings.
NEAR_TIE_Q = 0.05

GOLDEN = load_fixture("tiny_golden.json")
ENTRIES = sorted(GOLDEN)
PEERS = ("top", "top_forced", "top_forced_norepack")


def peer_spread(entry: str) -> float:
    """How far llama.cpp's own answers part on a quantized entry: at each step, the
    logprob of each top-3 token from its one-token path ("top"), its prompt path
    ("top_forced") and its prompt path without weight repacking; the largest range."""
    worst = 0.0
    for case in GOLDEN[entry]["cases"]:
        for i, top in enumerate(case["top"]):
            peers = [dict(map(tuple, case[k][i])) for k in PEERS]
            for tid, _ in top:
                vals = [d[tid] for d in peers if tid in d]
                worst = max(worst, max(vals) - min(vals))
    return worst


# On quantized weights both engines round activations to 8 bits, and a last-bit
# difference upstream flips a rounding (DEVELOPERS.md, "Numerics against the peer"):
# llama.cpp parts from itself by PEER_NOISE (up to ~0.17 on these files, recorded by
# make_tiny_models.py). edgelm is held to no further from llama.cpp's nearest answer
# than that, plus LOGPROB_TOL.
PEER_NOISE = max((peer_spread(e) for e in ENTRIES if ":" in e and not e.endswith(":F16")), default=0.0)


def base_name(entry: str) -> str:
    """The committed file an entry comes from ("tiny-phi3-wide.gguf:Q4_K_M" → "tiny-phi3.gguf")."""
    return entry.split(":")[0].split("@")[0].replace("-wide.gguf", ".gguf")


def quantized(entry: str) -> bool:
    return ":" in entry and not entry.endswith(":F16")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cache of the files made here: entry → path."""
    return {}


def entry_file(entry: str, copies: dict[str, Path], tmp: Path) -> Path:
    """The file llama.cpp ran for `entry`, made again and checked byte for byte."""
    if entry in copies:
        return copies[entry]
    g = GOLDEN[entry]
    name = base_name(entry)
    if ":" not in entry:
        path = FIXTURES / name
        if not path.exists():
            pytest.fail(f"{path} is missing: run `python tests/fixtures/make_tiny_models.py`")
    else:
        src_entry, ftype = entry.split(":")
        if src_entry.endswith("-wide.gguf"):
            src = tmp / src_entry
            if not src.exists():
                make_tiny_models.write_wide(name, src)
            assert sha256(src) == g["source_sha256"], (
                f"{src.name} written again differs from the file the golden was made from "
                "(numpy or gguf changed?): regenerate with make_tiny_models.py"
            )
        else:
            src = FIXTURES / src_entry
        path = tmp / g["file"]
        _native.quantize_file(src, path, ftype, threads=2)
    # (The first two fixtures' goldens predate the recorded digests.)
    assert sha256(path) == g.get("sha256", sha256(path)), (
        f"{entry}: edgelm's {path.name} differs from the file llama.cpp ran "
        "(edgelm quantize must equal llama-quantize byte for byte)"
    )
    copies[entry] = path
    return path


@pytest.fixture(scope="module", params=ENTRIES)
def tiny(
    request: pytest.FixtureRequest, copies: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, edgelm.Model]:
    entry = request.param
    tmp = tmp_path_factory.getbasetemp() / "tiny-archs"
    tmp.mkdir(exist_ok=True)
    path = entry_file(entry, copies, tmp)
    return entry, edgelm.Model(path, n_ctx=GOLDEN[entry].get("n_ctx"))


def test_loads_with_right_architecture(tiny: tuple[str, edgelm.Model]) -> None:
    entry, m = tiny
    name = base_name(entry)
    assert m.architecture == ARCH[name]
    assert m.n_vocab == 294
    names = {t[0] for t in m.tensors()}
    missing = [t for t in MUST_HAVE[name] if t not in names]
    assert not missing, f"{entry} lacks {missing}: regenerate it with make_tiny_models.py"
    extra = [t for t in MUST_NOT_HAVE.get(name, []) if t in names]
    assert not extra, f"{entry} has {extra}: regenerate it with make_tiny_models.py"


def test_tokenizer_matches_llama_cpp(tiny: tuple[str, edgelm.Model]) -> None:
    entry, m = tiny
    for case in GOLDEN[entry]["tokenize"]:
        assert m.tokenize(case["text"], add_special=False, parse_special=True) == case["ids"], case["text"]


def test_greedy_matches_llama_cpp(tiny: tuple[str, edgelm.Model]) -> None:
    """16 greedy tokens per prompt equal llama.cpp's; a parting is accepted only where
    llama.cpp's own top-1/top-2 gap is under the near-tie bound (and then the rest of
    that continuation is not compared, since it follows a different prefix)."""
    entry, m = tiny
    golden = GOLDEN[entry]
    near_tie = NEAR_TIE_Q if quantized(entry) else NEAR_TIE
    cases = golden["cases"]
    assert len(cases) == 4
    for case in cases:
        want: list[int] = case["ids"]
        assert len(want) == golden["n_predict"], f"llama.cpp stopped early ({case['stop_type']})"
        got = [t.id for t in m.generate(case["prompt_ids"], max_tokens=len(want), temperature=0)]
        assert len(got) == len(want), f"{entry} {case['prompt_ids']}: edgelm stopped after {len(got)} tokens"
        for i, (a, b) in enumerate(zip(got, want)):
            if a == b:
                continue
            top = case["top"][i]
            lp = dict((tid, v) for tid, v in top)
            gap = top[0][1] - lp.get(a, top[-1][1])
            assert a in lp and gap < near_tie, (
                f"{entry} prompt {case['prompt_ids']}: token {i} is {a}, llama.cpp chose {b} "
                f"(top-3 {top}, gap {gap:.4f}); edgelm {got} vs llama.cpp {want}"
            )
            print(f"{entry} prompt {case['prompt_ids']}: parting at token {i} at a near-tie (gap {gap:.4f})")
            break


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_logprobs_match_llama_cpp(tiny: tuple[str, edgelm.Model]) -> None:
    """Along llama.cpp's own continuation (teacher-forced), edgelm's logprob of each of
    llama.cpp's top-3 tokens is within LOGPROB_TOL of llama.cpp's at every step. On
    quantized files each step is computed as llama.cpp's "top_forced" was (the prompt
    plus the continuation so far as one batch, its last row), compared with the nearest
    of llama.cpp's answers under its valid configurations, within PEER_NOISE too."""
    entry, m = tiny
    tol = LOGPROB_TOL + (PEER_NOISE if quantized(entry) else 0.0)
    worst = 0.0
    for case in GOLDEN[entry]["cases"]:
        p, want = case["prompt_ids"], case["ids"]
        if quantized(entry):
            lps = np.stack([log_softmax(m.logits(p + want[:i]))[-1] for i in range(len(want))])
        else:
            lps = log_softmax(m.logits(p + want[:-1]))[len(p) - 1 :]
        for i, top in enumerate(case["top"]):
            peers = [dict(map(tuple, case[k][i])) for k in PEERS if k in case]
            for rank, (tid, _ref) in enumerate(top):
                vals = [d[tid] for d in peers if tid in d]
                got = lps[i, tid]
                d = min(abs(got - v) for v in vals)
                worst = max(worst, d)
                assert d <= tol, (
                    f"{entry} prompt {p}: step {i}, llama.cpp's top-{rank + 1} token {tid}: "
                    f"edgelm logprob {got:.4f} vs llama.cpp {vals} (bound {tol:.3f})"
                )
    spread = f", llama.cpp's own spread {peer_spread(entry):.2e}" if quantized(entry) else ""
    print(f"{entry}: largest logprob difference {worst:.2e}{spread}")


def test_longrope_factors_follow_the_context() -> None:
    """phi3's LongRoPE pair is chosen as llama.cpp chooses it: the long factors when the
    context per sequence exceeds rope.scaling.original_context_length (256 here), the
    short ones otherwise; the default context is the model's (1024)."""
    path = FIXTURES / "tiny-phi3.gguf"
    assert edgelm.Model(path).native.rope_factors == "rope_factors_long"
    assert edgelm.Model(path, n_ctx=257).native.rope_factors == "rope_factors_long"
    assert edgelm.Model(path, n_ctx=256).native.rope_factors == "rope_factors_short"
    # And they matter: the two goldens differ.
    assert GOLDEN["tiny-phi3.gguf"]["cases"] != GOLDEN["tiny-phi3.gguf@256"]["cases"]
    assert edgelm.Model(FIXTURES / "tiny-llama3.gguf").native.rope_factors == "rope_freqs"
    assert edgelm.Model(FIXTURES / "tiny-qwen3.gguf").native.rope_factors is None


def _agrees(entry: str, case: dict, got: list[int]) -> None:  # type: ignore[type-arg]
    """`got` equals llama.cpp's greedy continuation, or parts from it at a near-tie."""
    want = case["ids"]
    assert len(got) == len(want), f"{entry}: {got} vs {want}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            lp = dict((tid, v) for tid, v in case["top"][i])
            assert a in lp and case["top"][0][1] - lp[a] < NEAR_TIE, f"{entry} token {i}: {got} vs llama.cpp {want}"
            break


@pytest.mark.parametrize(
    "max_context, entry", [(None, "tiny-phi3.gguf"), (256, "tiny-phi3.gguf@256"), (512, "tiny-phi3.gguf")]
)
def test_served_context_picks_the_longrope_factors(max_context: int | None, entry: str) -> None:
    """The daemon loads phi3 for the context it serves (`max_context`, else the model's
    1024): 256 takes the short factors and answers as llama.cpp does at -c 256, above
    the original 256 the long ones, as llama.cpp at -c 1024 (factors depend only on
    which side of 256 the context is)."""
    from serve_util import daemon, http

    args = ["--max-context", str(max_context)] if max_context else []
    with daemon(FIXTURES / "tiny-phi3.gguf", *args) as d:
        for case in GOLDEN[entry]["cases"]:
            status, body = http(
                "POST",
                d.url + "/api/generate",
                {
                    "model": "tiny-phi3",
                    "prompt": "",
                    "raw": True,
                    "context": case["prompt_ids"],
                    "stream": False,
                    "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": len(case["ids"])},
                },
            )
            assert status == 200, body
            assert body["context"][: len(case["prompt_ids"])] == case["prompt_ids"]
            _agrees(entry, case, body["context"][len(case["prompt_ids"]) :])
        want = "rope_factors_short" if max_context == 256 else "rope_factors_long"
        assert f"RoPE factors {want}" in d.log()


@pytest.mark.parametrize("entry", ["tiny-qwen3moe.gguf", "tiny-qwen3moe-wide.gguf:Q4_K_M"])
def test_moe_routing_matches_float64_reference(
    entry: str, copies: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The experts each token is sent to, and their weights, equal a float64 numpy router
    (softmax over all experts, top-k, renormalised) on the same input, layer by layer."""
    import gguf

    tmp = tmp_path_factory.getbasetemp() / "tiny-archs"
    tmp.mkdir(exist_ok=True)
    path = entry_file(entry, copies, tmp)
    m = edgelm.Model(path)
    meta = m.metadata
    n_expert, k = meta["qwen3moe.expert_count"], meta["qwen3moe.expert_used_count"]
    reader = gguf.GGUFReader(path)
    routers = {
        t.name: np.array(t.data, dtype=np.float64).reshape(n_expert, -1)
        for t in reader.tensors
        if t.name.endswith("ffn_gate_inp.weight")
    }
    assert len(routers) == m.native.n_layer
    ids = [p for case in GOLDEN[entry]["cases"] for p in case["prompt_ids"]]
    trace = m.native.moe_trace(ids)
    assert [layer for layer, *_ in trace] == list(range(m.native.n_layer))
    n_ties = 0
    for layer, inp, experts, weights in trace:
        x = np.frombuffer(inp, dtype=np.float32).reshape(len(ids), -1).astype(np.float64)
        logits = x @ routers[f"blk.{layer}.ffn_gate_inp.weight"].T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        got_e = np.array(experts).reshape(len(ids), k)
        got_w = np.array(weights).reshape(len(ids), k)
        for t in range(len(ids)):
            order = np.argsort(-p[t], kind="stable")
            if p[t, order[k - 1]] - p[t, order[k]] < 1e-6:
                n_ties += 1  # a tie at the cut: either choice is right
                continue
            assert list(got_e[t]) == list(order[:k]), f"{entry} layer {layer} token {t}: {got_e[t]} vs {order[:k]}"
            want_w = p[t, order[:k]] / p[t, order[:k]].sum()
            np.testing.assert_allclose(got_w[t], want_w, rtol=1e-5, atol=1e-6)
    assert n_ties <= 1, f"{n_ties} near-ties at the top-k cut: the fixture's router is degenerate"
    # Every expert is used by some token (the fixture exercises the grouping).
    used = {e for _, _, experts, _ in trace for e in experts}
    assert used == set(range(n_expert)), f"experts used: {sorted(used)}"
