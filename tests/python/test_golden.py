"""edgelm against llama.cpp (b11434) on the same files: greedy continuations and
perplexity. Fixtures come from tests/fixtures/make_golden.py; tokenization is
compared token for token in rust/core/tests/tokenize_golden.rs and again here."""

from __future__ import annotations

import pytest

import edgelm

from conftest import FIXTURES, GEMMA3, SMOLLM2, load_fixture, model_path

NEAR_TIE = 0.05  # llama.cpp top-1 vs top-2 logprob gap under which a parting is a tie


def greedy_cases() -> list[tuple[str, int]]:
    g = load_fixture("greedy_golden.json")
    return [(m, i) for m in (SMOLLM2, GEMMA3) for i in range(len(g[m]["cases"]))]


@pytest.fixture(scope="module")
def models() -> dict[str, edgelm.Model]:
    return {name: edgelm.Model(model_path(name)) for name in (SMOLLM2, GEMMA3)}


@pytest.mark.parametrize(("model_name", "idx"), greedy_cases())
def test_greedy_matches_llama_cpp(models: dict[str, edgelm.Model], model_name: str, idx: int) -> None:
    case = load_fixture("greedy_golden.json")[model_name]["cases"][idx]
    m = models[model_name]
    # Same prompt ids as the peer, so this checks the forward pass alone.
    assert m.tokenize(case["prompt"], add_special=True, parse_special=True) == case["prompt_ids"]
    want: list[int] = case["ids"]
    got = [t.id for t in m.generate(case["prompt_ids"], max_tokens=len(want), temperature=0)]
    for i, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        top2 = case["top2"][i]
        gap = top2[0][1] - top2[1][1]
        # A parting is accepted only at a near-tie of llama.cpp's own top two, and
        # only onto its second choice; the test says so explicitly.
        assert a == top2[1][0] and gap < NEAR_TIE, (
            f"{model_name} prompt {case['prompt']!r}: token {i} is {a}, llama.cpp chose {b} "
            f"(its top-2 {top2}, gap {gap:.4f}); not a near-tie"
        )
        print(f"near-tie parting at token {i} (gap {gap:.4f}) for {case['prompt']!r}")
        return
    assert got == want, f"{model_name}: edgelm {got} vs llama.cpp {want}"


@pytest.mark.parametrize("model_name", [SMOLLM2, GEMMA3])
def test_perplexity_within_1pct_of_llama_perplexity(models: dict[str, edgelm.Model], model_name: str) -> None:
    golden = load_fixture("ppl_golden.json")[model_name]
    m = models[model_name]
    text = (FIXTURES / "ppl_text.txt").read_text()
    ids = m.tokenize(text, add_special=True)[: golden["n_ctx"] * golden["chunks"]]
    ppl = m.perplexity(ids, n_ctx=golden["n_ctx"])
    rel = abs(ppl - golden["ppl"]) / golden["ppl"]
    print(f"{model_name}: edgelm ppl {ppl:.4f}, llama-perplexity {golden['ppl']:.4f} ({rel:.3%})")
    assert rel < 0.01, f"perplexity {ppl:.4f} differs from llama-perplexity's {golden['ppl']:.4f} by {rel:.2%}"


@pytest.mark.parametrize("model_name", [SMOLLM2, GEMMA3])
def test_tokenization_matches_llama_cpp(models: dict[str, edgelm.Model], model_name: str) -> None:
    golden = load_fixture("tokenize_golden.json")[model_name]["cases"]
    m = models[model_name]
    bad = []
    for c in golden:
        got = m.tokenize(c["text"], add_special=c["add_special"], parse_special=c["parse_special"])
        if got != c["ids"]:
            bad.append(f"{c['text']!r}: edgelm {got} vs llama.cpp {c['ids']}")
    assert not bad, "\n".join(bad)
