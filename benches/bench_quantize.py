#!/usr/bin/env python3
"""`edgelm quantize` beside `llama-quantize` on the same F16 file, same threads, same run.

    .venv/bin/python benches/bench_quantize.py [--types Q4_0 Q4_K_M ...] [--threads 2] [--reps 3]

The input is SmolLM2-135M dequantized to F16 by edgelm (the test suite's input). For
each type it times both tools (best of --reps, wall clock, page cache warm), reports
MB/s of input tensor bytes, whether the two files are byte-identical, and perplexity:
llama-perplexity on both files and edgelm's own on its file (ppl_text.txt, -c 256,
8 chunks). Writes benches/results/quantize.json, quantize.md and quantize.png.

llama.cpp comes from $LLAMA_CPP_BIN (default ~/.cache/edgelm/llama-build/bin).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cpu import _cpu_name  # benches/ is on sys.path when run as a script

from edgelm.pull import file_sha256 as sha256

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"
MODELS = Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", Path.home() / ".cache/edgelm/llama-build/bin"))
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]
PPL_TEXT = ROOT / "tests" / "fixtures" / "ppl_text.txt"
N_CTX, CHUNKS = 256, 8


def timed(cmd: list[str], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def llama_ppl(model: Path) -> float:
    out = subprocess.run(
        [
            str(LLAMA_BIN / "llama-perplexity"),
            "-m",
            str(model),
            "-f",
            str(PPL_TEXT),
            "-c",
            str(N_CTX),
            "--chunks",
            str(CHUNKS),
            "-t",
            "2",
            "-b",
            str(N_CTX),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    assert m, out.stderr[-1000:]
    return float(m.group(1))


def edgelm_ppl(model: Path) -> float:
    import edgelm

    m = edgelm.Model(model)
    ids = m.tokenize(PPL_TEXT.read_text(), add_special=True)[: N_CTX * CHUNKS]
    return m.perplexity(ids, n_ctx=N_CTX)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not (LLAMA_BIN / "llama-quantize").exists():
        print(f"llama-quantize not found in {LLAMA_BIN}: set LLAMA_CPP_BIN", file=sys.stderr)
        return 2
    edgelm_cli = [sys.executable, "-m", "edgelm.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        f16 = tmp / "SmolLM2-135M-Instruct.F16.gguf"
        subprocess.run(
            edgelm_cli + ["quantize", str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"), str(f16), "F16"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import edgelm._native as native

        in_bytes = sum(t[3] for t in native.inspect_gguf(str(f16))[3])
        for ty in args.types:
            ours, peer = tmp / f"edgelm.{ty}.gguf", tmp / f"peer.{ty}.gguf"
            t_e = timed(edgelm_cli + ["quantize", "-t", str(args.threads), str(f16), str(ours), ty], args.reps)
            t_l = timed([str(LLAMA_BIN / "llama-quantize"), str(f16), str(peer), ty, str(args.threads)], args.reps)
            row = {
                "type": ty,
                "file_mib": ours.stat().st_size / 2**20,
                "edgelm_s": t_e,
                "llama_s": t_l,
                "edgelm_mb_s": in_bytes / t_e / 1e6,
                "llama_mb_s": in_bytes / t_l / 1e6,
                "identical": sha256(ours) == sha256(peer),
                "ppl_llama_on_peer": llama_ppl(peer),
                "ppl_llama_on_edgelm": llama_ppl(ours),
                "ppl_edgelm_on_edgelm": edgelm_ppl(ours),
            }
            rows.append(row)
            print(
                f"{ty:7s} edgelm {row['edgelm_mb_s']:6.0f} MB/s  llama-quantize {row['llama_mb_s']:6.0f} MB/s  "
                f"({row['llama_s'] / row['edgelm_s']:.2f}x)  identical={row['identical']}  ppl peer "
                f"{row['ppl_llama_on_peer']:.3f}, llama-ppl on ours {row['ppl_llama_on_edgelm']:.3f}, "
                f"edgelm {row['ppl_edgelm_on_edgelm']:.3f}",
                flush=True,
            )
            ours.unlink()
            peer.unlink()
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": args.threads,
        "reps": args.reps,
        "input": "SmolLM2-135M F16 (made by edgelm)",
        "input_tensor_bytes": in_bytes,
        "llama_cpp": "b11434",
        "ppl": f"ppl_text.txt, -c {N_CTX}, {CHUNKS} chunks",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# edgelm quantize vs llama-quantize ({meta['date']}, {meta['cpu']}, {args.threads} threads)",
        "",
        f"Input: {meta['input']}, {in_bytes / 1e6:.0f} MB of tensors. Speed = input MB / wall seconds "
        f"(best of {args.reps}). Perplexity: {meta['ppl']}.",
        "",
        "| type | file MiB | edgelm MB/s | llama-quantize MB/s | speed ratio | identical bytes | "
        "ppl (llama-perplexity, llama-quantize's file) | ppl (llama-perplexity, edgelm's file) | "
        "ppl (edgelm, edgelm's file) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['file_mib']:.1f} | {r['edgelm_mb_s']:.0f} | {r['llama_mb_s']:.0f} | "
            f"{r['llama_s'] / r['edgelm_s']:.2f}x | {'yes' if r['identical'] else 'no'} | "
            f"{r['ppl_llama_on_peer']:.4f} | {r['ppl_llama_on_edgelm']:.4f} | "
            f"{r['ppl_edgelm_on_edgelm']:.4f} |"
        )
    (RESULTS / "quantize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _chart(rows, RESULTS / "quantize.png")
    return 0


def _chart(rows: list[dict], out: Path) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    xs = range(len(rows))
    w = 0.4
    a.bar([x - w / 2 for x in xs], [r["edgelm_mb_s"] for r in rows], w, label="edgelm quantize")
    a.bar([x + w / 2 for x in xs], [r["llama_mb_s"] for r in rows], w, label="llama-quantize")
    a.set_xticks(list(xs), [r["type"] for r in rows], rotation=45)
    a.set_ylabel("MB/s of F16 input")
    a.legend()
    b.bar([x - w / 2 for x in xs], [r["ppl_edgelm_on_edgelm"] for r in rows], w, label="edgelm ppl (its file)")
    b.bar([x + w / 2 for x in xs], [r["ppl_llama_on_peer"] for r in rows], w, label="llama-perplexity (peer's file)")
    b.set_xticks(list(xs), [r["type"] for r in rows], rotation=45)
    b.set_ylabel("perplexity")
    b.legend()
    fig.suptitle("SmolLM2-135M: quantization speed and perplexity")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
