"""GPU throughput of edgelm's CUDA backend on the measure model of the CUDA issue
(Llama 3.2 1B shapes, SmolLM2's vocabulary size, random weights) for each format:
pp512 and tg128 of one sequence, and aggregate generation with 16 and 64 concurrent
sequences through the serving executor. Prints a table and writes
benches/results/cuda_edgelm.{json,md,png} (benches/cuda_report.py
writes cuda.* from a side-by-side run).

The work is in the Rust example `cuda_bench` (rust/core/examples/cuda_bench.rs). A GPU
machine without Rust runs a binary built elsewhere:

    cargo build --release -p edgelm-core --example cuda_bench          # here
    python benches/bench_cuda.py --bin target/release/examples/cuda_bench q4_0 q4_k q8_0   # there

`--from-log FILE` rebuilds the results from a saved run's output (the JSON lines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", default=["q4_0", "q4_k", "q8_0"])
    ap.add_argument("--bin", help="a built cuda_bench (default: cargo run --release --example cuda_bench)")
    ap.add_argument("--from-log", help="parse a saved run's output instead of running")
    ap.add_argument("--note", default="", help="a line to keep with the results (e.g. the command and machine)")
    args = ap.parse_args()
    if args.from_log:
        out = Path(args.from_log).read_text()
    else:
        cmd = (
            [args.bin]
            if args.bin
            else ["cargo", "run", "-q", "--release", "-p", "edgelm-core", "--example", "cuda_bench", "--"]
        )
        r = subprocess.run([*cmd, *args.types], capture_output=True, text=True)
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            print(f"cuda_bench failed ({r.returncode})", file=sys.stderr)
            return 1
        out = r.stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not rows:
        print("no results in the output", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "note": args.note, "gpu": rows[0]["gpu"]}
    (RESULTS / "cuda_edgelm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = [
        "| model | pp512 tok/s | tg128 tok/s | tg / bandwidth bound | 16 streams tok/s | 64 streams tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| 1B {r['type'].upper()} | {r['pp512']:.0f} | {r['tg128']:.0f} | {100 * r['tg_fraction_of_bandwidth']:.1f}% "
            f"| {r['agg16']:.0f} | {r['agg64']:.0f} |"
        )
    md = (
        f"# CUDA: edgelm on {meta['gpu']} ({meta['when']})\n\n{args.note}\n\n"
        "Measure model: Llama 3.2 1B shapes (dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, RoPE base "
        "500000), vocabulary 49152, random weights. The bound is the card's bandwidth (4.8 TB/s) over the weight "
        "bytes read per token.\n\n" + "\n".join(table) + "\n"
    )
    (RESULTS / "cuda_edgelm.md").write_text(md)
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        labels = ["pp512", "tg128", "16 streams", "64 streams"]
        keys = ["pp512", "tg128", "agg16", "agg64"]
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            ax.bar([k + i * width for k in range(len(keys))], [r[k] for k in keys], width, label=r["type"].upper())
        ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(keys))], labels)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"edgelm CUDA, 1B measure model, {meta['gpu']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "cuda_edgelm.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
