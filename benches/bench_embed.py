#!/usr/bin/env python3
"""Embeddings: `edgelm serve` beside `llama-server --embedding`, same file, same threads.

    flock /tmp/edgelm-cpu.lock .venv/bin/python benches/bench_embed.py [--reps 3] [--duration 15] [--threads 2]

The model is a BERT-base-shaped synthetic file (bert: 12 layers, 768 wide, 12 heads,
n_ff 3072, context 512, a 30522-token WordPiece vocabulary, mean pooling, F16 like the
embedding models Ollama ships), written once to $EDGELM_BENCH_DIR (default
~/.cache/edgelm/bench-embed) with tests/fixtures/make_embed_models.py's vocabulary
padded to BERT's size.

Each client loops on POST /v1/embeddings with one text (40–110 words, ~50–120 tokens,
distinct per request) for --duration seconds after a warm-up; embeddings/s = vectors
returned / wall time. Measured for 1 and 32 concurrent clients. Servers run one at a
time and alternate (llama, edgelm, llama, edgelm, ...: interleaved repetitions, so drift
of the shared machine hits both); the table gives the median of --reps repetitions and
their range. llama-server runs with -np 32 (a slot per client, so it batches them),
-c 16384 (512 a slot), -b/-ub 2048 (whole sequences of many slots in one pass).

A first request to each server checks that both give the same vector (cosine).
Writes benches/results/embed.json and embed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_embed_models  # noqa: E402
from bench_serve import EDGELM_BIN, LLAMA_BIN, Server, _free_port  # noqa: E402

BENCH_DIR = Path(os.environ.get("EDGELM_BENCH_DIR", Path.home() / ".cache/edgelm/bench-embed"))
SHAPE = dict(n_embd=768, n_layer=12, n_head=12, n_ff=3072, n_ctx=512, n_vocab=30522)
CLIENTS = (1, 32)


def write_bert_base(path: Path) -> None:
    """BERT-base's layout (module docstring); random weights (σ 0.02, norms 1)."""
    import gguf

    s = SHAPE
    e, f = s["n_embd"], s["n_ff"]
    words = make_embed_models.wordpiece_vocab()
    tokens = words + [f"\u2581w{i}" for i in range(s["n_vocab"] - len(words))]
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("bench-bert-base-synthetic")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(e)
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(f)
    w.add_head_count(s["n_head"])
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    n_special = len(make_embed_models.SPECIALS)
    w.add_token_types([gguf.TokenType.CONTROL] * n_special + [gguf.TokenType.NORMAL] * (len(tokens) - n_special))
    for key, tok in (("pad", "[PAD]"), ("unk", "[UNK]"), ("bos", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]")):
        getattr(w, f"add_{key}_token_id")(make_embed_models.SPECIALS.index(tok))
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22) * 0.02).astype(np.float16)

    def mat(rows: int, cols: int) -> np.ndarray:
        return np.resize(block, (rows, cols))

    def ones(n: int) -> np.ndarray:
        return np.ones(n, np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, np.float32)

    w.add_tensor("token_embd.weight", mat(s["n_vocab"], e))
    w.add_tensor("token_types.weight", mat(2, e).astype(np.float32))  # F32 in converted F16 files
    w.add_tensor("position_embd.weight", mat(s["n_ctx"], e).astype(np.float32))
    w.add_tensor("token_embd_norm.weight", ones(e))
    w.add_tensor("token_embd_norm.bias", zeros(e))
    for il in range(s["n_layer"]):
        p = f"blk.{il}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + t + ".weight", mat(e, e))
            w.add_tensor(p + t + ".bias", zeros(e))
        w.add_tensor(p + "attn_output_norm.weight", ones(e))
        w.add_tensor(p + "attn_output_norm.bias", zeros(e))
        w.add_tensor(p + "ffn_up.weight", mat(f, e))
        w.add_tensor(p + "ffn_up.bias", zeros(f))
        w.add_tensor(p + "ffn_down.weight", mat(e, f))
        w.add_tensor(p + "ffn_down.bias", zeros(e))
        w.add_tensor(p + "layer_output_norm.weight", ones(e))
        w.add_tensor(p + "layer_output_norm.bias", zeros(e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def texts(n: int, seed: int) -> list[str]:
    """Distinct texts of whole vocabulary words (about one token a word)."""
    words = [
        t[1:] for t in make_embed_models.wordpiece_vocab() if t.startswith("\u2581") and len(t) > 2 and t[1:].isalpha()
    ]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 110))) + "." for _ in range(n)]


# ---------------------------------------------------------------- load


async def run_clients(base: str, model: str, n_clients: int, duration: float, pool: list[str]) -> dict[str, float]:
    import aiohttp

    counter = iter(range(1 << 30))
    done = 0
    stop_at = 0.0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            text = pool[next(counter) % len(pool)]
            async with session.post(f"{base}/v1/embeddings", json={"model": model, "input": text}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"{r.status}: {body}")
            done += 1

    conn = aiohttp.TCPConnector(limit=n_clients + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        stop_at = time.perf_counter() + 2.0  # warm-up
        await asyncio.gather(*(client(session) for _ in range(n_clients)))
        done = 0
        t0 = time.perf_counter()
        stop_at = t0 + duration
        await asyncio.gather(*(client(session) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    return {"embeddings": done, "wall_s": wall, "per_s": done / wall}


def first_vector(base: str, model: str, text: str) -> np.ndarray:
    import urllib.request

    req = urllib.request.Request(
        f"{base}/v1/embeddings",
        json.dumps({"model": model, "input": text}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return np.array(json.loads(r.read())["data"][0]["embedding"], dtype=np.float64)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    model = BENCH_DIR / "bert-base-synthetic.F16.gguf"
    if not model.exists():
        print(f"writing {model}", file=sys.stderr)
        write_bert_base(model)
    name = model.name.removesuffix(".gguf")
    pool = texts(4000, 1)
    argv = {
        "llama": lambda port: [
            str(LLAMA_BIN / "llama-server"),
            "-m",
            str(model),
            "--embedding",
            "-t",
            str(args.threads),
            "-np",
            "32",
            "-c",
            str(32 * SHAPE["n_ctx"]),
            "-b",
            "2048",
            "-ub",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-webui",
        ],
        "edgelm": lambda port: [
            str(EDGELM_BIN),
            "serve",
            "--model",
            str(model),
            "--threads",
            str(args.threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-mdns",
        ],
    }
    runs: dict[str, dict[int, list[float]]] = {s: {c: [] for c in CLIENTS} for s in argv}
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        for rep in range(args.reps):
            for srv_name, make in argv.items():
                port = _free_port()
                srv = Server(srv_name, make(port), port, Path(tmp))
                srv.start()
                try:
                    if srv_name not in vectors:
                        vectors[srv_name] = first_vector(srv.base, name, pool[0])
                    for c in CLIENTS:
                        r = asyncio.run(run_clients(srv.base, name, c, args.duration, pool))
                        runs[srv_name][c].append(r["per_s"])
                        print(
                            f"rep {rep + 1} {srv_name:6} {c:2} clients: {r['per_s']:7.2f} embeddings/s "
                            f"({r['embeddings']} in {r['wall_s']:.1f} s)",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    srv.stop()
    a, b = vectors["edgelm"], vectors["llama"]
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu,
        "threads": args.threads,
        "model": model.name,
        "shape": SHAPE,
        "duration_s": args.duration,
        "reps": args.reps,
        "runs": {s: {str(c): v for c, v in d.items()} for s, d in runs.items()},
        "same_vector_cosine": cos,
        "llama_server_argv": argv["llama"](0)[1:],
    }
    med = {s: {c: statistics.median(v) for c, v in d.items()} for s, d in runs.items()}
    lines = [
        f"# Embeddings: edgelm serve vs llama-server --embedding ({result['date']}, {cpu})",
        "",
        f"{model.name} (BERT-base shape: 12 layers × 768, n_ff 3072, 30522-token WordPiece, mean pooling, F16), "
        f"{args.threads} threads per server, one server at a time, interleaved ({args.reps} repetitions of "
        f"{args.duration:.0f} s per client count). Closed loop: each client sends POST /v1/embeddings with one "
        "distinct 40–110-word text (~50–120 tokens) back to back. llama-server: "
        f"`llama-server --embedding -np 32 -c {32 * SHAPE['n_ctx']} -b 2048 -ub 2048 -t {args.threads}`. "
        f"Both servers return the same vector (cosine {cos:.6f} on the first text).",
        "",
        "| clients | edgelm embeddings/s (median, range) | llama-server embeddings/s (median, range) | ratio |",
        "|---|---|---|---|",
    ]
    for c in CLIENTS:
        e, l_ = runs["edgelm"][c], runs["llama"][c]
        lines.append(
            f"| {c} | {med['edgelm'][c]:.2f} ({min(e):.2f}–{max(e):.2f}) | {med['llama'][c]:.2f} "
            f"({min(l_):.2f}–{max(l_):.2f}) | {med['edgelm'][c] / med['llama'][c]:.2f}x |"
        )
    result["ratio"] = {str(c): med["edgelm"][c] / med["llama"][c] for c in CLIENTS}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embed.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "embed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
