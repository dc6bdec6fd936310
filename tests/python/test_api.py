"""The Python API on the real models: shapes, errors, sampling, streaming, the GIL."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOLLM2, model_path

import edgelm
from edgelm.stops import StopMatcher


def test_facts(smollm2: edgelm.Model, gemma3: edgelm.Model) -> None:
    assert (smollm2.architecture, smollm2.n_vocab, smollm2.n_ctx_train) == ("llama", 49152, 8192)
    assert (gemma3.architecture, gemma3.n_vocab, gemma3.n_ctx_train) == ("gemma3", 262144, 32768)
    assert smollm2.metadata["general.architecture"] == "llama"
    assert smollm2.metadata["llama.block_count"] == 30
    assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "tokenizer.chat_template" in smollm2.metadata
    types = {t for _, _, t, _ in smollm2.tensors()}
    assert types == {"F32", "Q4_1", "Q8_0"}
    types = {t for _, _, t, _ in gemma3.tensors()}
    assert types == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}


def test_tokenize_roundtrip(any_model: edgelm.Model) -> None:
    text = "Hello, world! Ünïcödé ✓ 日本語 🙂 code:\n\tx = 1"
    ids = any_model.tokenize(text, add_special=False)
    assert all(0 <= i < any_model.n_vocab for i in ids)
    assert any_model.detokenize(ids) == text


def test_special_tokens(smollm2: edgelm.Model, gemma3: edgelm.Model) -> None:
    assert smollm2.tokenize("<|im_start|>", add_special=False, parse_special=True) == [1]
    assert len(smollm2.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1
    ids = gemma3.tokenize("hi", add_special=True)
    assert ids[0] == 2  # gemma adds BOS
    assert gemma3.tokenize("hi", add_special=False)[0] != 2


def test_logits_shape_and_consistency(smollm2: edgelm.Model) -> None:
    ids = smollm2.tokenize("The quick brown fox jumps over the lazy dog")
    lg = smollm2.logits(ids)
    assert lg.shape == (len(ids), smollm2.n_vocab) and lg.dtype == np.float32
    assert np.isfinite(lg).all()
    # The last row equals the logits of the prefix run on its own (causality, KV cache).
    lg_prefix = smollm2.logits(ids[:5])
    np.testing.assert_allclose(lg[:5], lg_prefix, rtol=1e-4, atol=1e-4)
    # Greedy generation's first token is the argmax of the last row.
    first = next(iter(smollm2.generate(ids, max_tokens=1, temperature=0)))
    assert first.id == int(np.argmax(lg[-1]))
    row = lg[-1].astype(np.float64)
    log_z = row.max() + np.log(np.exp(row - row.max()).sum())
    assert first.logprob == pytest.approx(row.max() - log_z, abs=1e-3)


def test_greedy_is_deterministic_and_seed_reproducible(smollm2: edgelm.Model) -> None:
    ids = smollm2.tokenize("Once upon a time")
    a = [t.id for t in smollm2.generate(ids, max_tokens=12, temperature=0)]
    b = [t.id for t in smollm2.generate(ids, max_tokens=12, temperature=0)]
    assert a == b
    s1 = [t.id for t in smollm2.generate(ids, max_tokens=12, temperature=1.0, seed=42, top_k=0, top_p=1.0, min_p=0.0)]
    s2 = [t.id for t in smollm2.generate(ids, max_tokens=12, temperature=1.0, seed=42, top_k=0, top_p=1.0, min_p=0.0)]
    s3 = [t.id for t in smollm2.generate(ids, max_tokens=12, temperature=1.0, seed=7, top_k=0, top_p=1.0, min_p=0.0)]
    assert s1 == s2
    assert s1 != s3


def test_sampling_filters(smollm2: edgelm.Model) -> None:
    ids = smollm2.tokenize("My favourite food is")
    lg = smollm2.logits(ids)[-1]
    top5 = set(np.argsort(-lg)[:5].tolist())
    for seed in range(6):
        toks = [
            t.id for t in smollm2.generate(ids, max_tokens=1, temperature=1.5, top_k=5, top_p=1.0, min_p=0.0, seed=seed)
        ]
        assert toks[0] in top5
    # top_p tiny keeps only the most likely token: same as greedy.
    t = next(iter(smollm2.generate(ids, max_tokens=1, temperature=1.0, top_k=0, top_p=1e-6, min_p=0.0, seed=1)))
    assert t.id == int(np.argmax(lg))
    # min_p = 1 keeps only the max.
    t = next(iter(smollm2.generate(ids, max_tokens=1, temperature=1.0, top_k=0, top_p=1.0, min_p=1.0, seed=3)))
    assert t.id == int(np.argmax(lg))


def test_penalties_change_greedy_choice(smollm2: edgelm.Model) -> None:
    ids = smollm2.tokenize("one one one one one one one one")
    plain = next(iter(smollm2.generate(ids, max_tokens=1, temperature=0))).id
    history = ids + [plain] * 4  # the greedy choice now repeats in the context
    pen = next(
        iter(
            smollm2.generate(
                history, max_tokens=1, temperature=0, presence_penalty=2.0, frequency_penalty=2.0, repeat_penalty=1.5
            )
        )
    ).id
    assert pen != plain
    # Penalties only look back repeat_last_n tokens: with a window of 0 nothing changes.
    off = next(
        iter(
            smollm2.generate(
                history,
                max_tokens=1,
                temperature=0,
                presence_penalty=2.0,
                frequency_penalty=2.0,
                repeat_penalty=1.5,
                repeat_last_n=0,
            )
        )
    ).id
    assert off == next(iter(smollm2.generate(history, max_tokens=1, temperature=0))).id


def test_logprobs(smollm2: edgelm.Model) -> None:
    ids = smollm2.tokenize("The capital of France is")
    toks = list(smollm2.generate(ids, max_tokens=3, temperature=0, logprobs=3))
    for t in toks:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0][0] == t.id
        assert t.top_logprobs[0][1] == pytest.approx(t.logprob)
        lps = [lp for _, lp in t.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)


def test_max_tokens_and_finish_reason(smollm2: edgelm.Model) -> None:
    toks = list(smollm2.generate("Count: 1, 2, 3,", max_tokens=5, temperature=0))
    assert len(toks) == 5
    assert [t.finish_reason for t in toks] == [None] * 4 + ["length"]
    # Runs until EOS with a chat prompt: the final token is end-of-generation.
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    toks = list(smollm2.generate(smollm2.tokenize(chat, parse_special=True), max_tokens=200, temperature=0))
    assert toks[-1].finish_reason == "stop"
    assert smollm2.native.is_eog(toks[-1].id)


def test_stop_strings(smollm2: edgelm.Model) -> None:
    full = smollm2.generate_text("Count: 1, 2, 3,", max_tokens=16, temperature=0)
    assert " 5" in full
    cut = smollm2.generate_text("Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[" 5"])
    assert cut == full[: full.index(" 5")]


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["</end>"])
    out = m.push("abc</") + m.push("en")
    assert out == "abc"
    assert m.push("d> tail") == "" and m.stopped
    m2 = StopMatcher(["</end>"])
    assert m2.push("a</") == "a" and m2.push("x") == "</x" and m2.flush() == ""


def test_streaming_never_splits_characters(gemma3: edgelm.Model) -> None:
    # Gemma's byte-fallback pieces split rare characters into several tokens.
    text = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 🙂🙃"
    ids = gemma3.tokenize(text, add_special=False)
    assert len(ids) > 4
    assert gemma3.detokenize(ids) == text
    # Each streamed piece is whole UTF-8 and the pieces add up to the full decode
    # (the Rust tokenizer tests feed split characters one token at a time).
    toks = list(gemma3.generate(gemma3.tokenize("Write three emoji:"), max_tokens=12, temperature=0))
    pieces = [t.text for t in toks]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == gemma3.detokenize([t.id for t in toks if not gemma3.native.is_eog(t.id)])


def test_compute_releases_the_gil(smollm2: edgelm.Model) -> None:
    ids = smollm2.tokenize("Tell me a long story about a dragon.")
    ticks = 0
    done = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    th = threading.Thread(target=ticker)
    th.start()
    t0 = time.perf_counter()
    smollm2.logits(ids * 8)
    elapsed = time.perf_counter() - t0
    done.set()
    th.join()
    # With the GIL held the ticker could not run at all during the call.
    assert ticks > 0.2 * elapsed * 1000 * 0.5, f"only {ticks} ticks in {elapsed:.2f}s"


def test_errors(tmp_path: Path, smollm2: edgelm.Model) -> None:
    with pytest.raises(edgelm.ModelLoadError, match="cannot read .*nope.gguf"):
        edgelm.Model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(edgelm.GGUFFormatError, match="wrong magic"):
        edgelm.Model(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(model_path(SMOLLM2).read_bytes()[:1_000_000])
    with pytest.raises(edgelm.GGUFFormatError, match="truncated|past the end"):
        edgelm.Model(trunc)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(edgelm.GGUFFormatError, match="empty"):
        edgelm.Model(empty)
    assert issubclass(edgelm.GGUFFormatError, edgelm.ModelLoadError)
    assert issubclass(edgelm.ModelLoadError, edgelm.EdgelmError)
    with pytest.raises(edgelm.InvalidRequestError, match="out of range"):
        smollm2.logits([10**6])
    with pytest.raises(edgelm.InvalidRequestError, match="out of range"):
        smollm2.detokenize([49152])
    with pytest.raises(edgelm.InvalidRequestError, match="temperature"):
        list(smollm2.generate([1, 2], temperature=-1))
    with pytest.raises(edgelm.InvalidRequestError, match="top_p"):
        list(smollm2.generate([1, 2], top_p=0))
    with pytest.raises(edgelm.InvalidRequestError, match="empty"):
        list(smollm2.generate([]))
    with pytest.raises(edgelm.InvalidRequestError, match="context length"):
        smollm2.logits([1] * 9000)
    with pytest.raises(OverflowError):
        smollm2.logits([-1])


def test_dequantize_matches_gguf_package() -> None:
    """Every format, through the Python binding, bit for bit against gguf-py."""
    import gguf.quants as gq
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGML_QUANT_SIZES

    from edgelm import _native

    rng = np.random.default_rng(0)
    for t in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        block, size = GGML_QUANT_SIZES[t]
        n_blocks = 64
        raw = bytearray(rng.integers(0, 256, size=n_blocks * size, dtype=np.uint8).tobytes())
        if t not in (T.F32, T.F16, T.BF16):
            # Keep f16 scale fields finite so the comparison is about the format.
            for b in range(n_blocks):
                off = b * size
                scale_at = (
                    [0, 2]
                    if t in (T.Q4_1, T.Q5_1)
                    else (
                        [size - 2]
                        if t == T.Q6_K
                        else (
                            [size - 4, size - 2]
                            if t == T.Q2_K
                            else ([size - 2] if t == T.Q3_K else [0, 2] if t in (T.Q4_K, T.Q5_K) else [0])
                        )
                    )
                )
                for s in scale_at:
                    struct.pack_into("<e", raw, off + s, float(rng.uniform(-2, 2)))
        ref = gq.dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), t).astype(np.float32).ravel()
        got = np.frombuffer(_native.dequantize(int(t), bytes(raw), n_blocks * block), dtype=np.float32)
        same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
        assert same.all(), f"{t.name}: {(~same).sum()} of {len(got)} values differ"
