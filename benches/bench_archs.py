#!/usr/bin/env python3
"""edgelm beside llama-bench on synthetic files of real model shapes: Qwen3-1.7B (qwen3),
Phi-4-mini (phi3: fused tensors, partial rotary, LongRoPE) and Qwen3-30B-A3B with 8 of
its 48 layers (qwen3moe: 128 experts, 8 used), Q4_K_M, same files, same threads, same run.

    .venv/bin/python benches/bench_archs.py [--threads 1 2] [--reps 5] [--models qwen3-1.7b ...]
    .venv/bin/python benches/bench_archs.py --tiny      # the same on tiny shapes: checks the script

No weights of these models can be downloaded here, so the files hold random weights
(σ 0.02) in each family's exact tensor layout and metadata, with the tiny fixtures'
byte-level BPE padded to the real vocabulary size (the output matrix is a large share
of a small model's reads). They are made once under $EDGELM_BENCH_DIR (default
~/.cache/edgelm/bench-archs): an F16 file written tensor by tensor, then
`edgelm quantize` → Q4_K_M (byte-identical to llama-quantize's), the F16 deleted.

Measures pp{N} (one N-token prompt step, tokens/s) and tg{M} (M single-token steps
from an empty cache) as llama-bench defines them. llama.cpp's speed on this VM moves by
up to 40% between runs, so the two are interleaved: each repetition runs, for every
file and thread count, edgelm once and `llama-bench -r 1` once (which goes first
alternates), and the table gives each side's mean and min–max over the repetitions.
Writes benches/results/archs.{json,md,png} (with --tiny: benches/results/tmp/archs-tiny.*).

llama.cpp comes from $LLAMA_CPP_BIN (default ~/.cache/edgelm/llama-build/bin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
from bench_cpu import _cpu_name, _llc, edgelm_once, llama_once  # noqa: E402
from synthetic import SHAPES as ALL_SHAPES  # noqa: E402
from synthetic import TINY, write_f16  # noqa: E402

SHAPES = {k: v for k, v in ALL_SHAPES.items() if v["arch"] != "llama"}

BENCH_DIR = Path(os.environ.get("EDGELM_BENCH_DIR", Path.home() / ".cache/edgelm/bench-archs"))


def make(name: str, s: dict, threads: int) -> Path:  # type: ignore[type-arg]
    from edgelm import _native

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    q = BENCH_DIR / f"{name}.Q4_K_M.gguf"
    if q.exists():
        return q
    f16 = BENCH_DIR / f"{name}.F16.gguf"
    print(f"writing {f16} ...", file=sys.stderr, flush=True)
    write_f16(f16, s)
    print(f"quantizing to {q.name} ...", file=sys.stderr, flush=True)
    _native.quantize_file(f16, q, "Q4_K_M", threads=threads)
    f16.unlink()
    return q


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, 2 repetitions: a check of this script")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chart-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args()
    shapes = TINY if args.tiny else SHAPES
    out_dir, stem = (ROOT / "benches/results/tmp", "archs-tiny") if args.tiny else (ROOT / "benches/results", "archs")
    if args.chart_only:
        saved = json.loads((out_dir / f"{stem}.json").read_text())
        _chart(saved["rows"], out_dir / f"{stem}.png", saved["meta"])
        return 0
    reps = 2 if args.tiny and args.reps == 5 else args.reps
    names = args.models or list(shapes)

    import edgelm

    files = {n: make(n, shapes[n], max(args.threads)) for n in names}
    runs: dict[tuple[str, int], dict[str, list[float]]] = {}
    models = {}
    for n in names:
        for t in args.threads:
            models[(n, t)] = edgelm.Model(files[n], n_threads=t).native
            models[(n, t)].bench(16, 4)  # page the weights in
            runs[(n, t)] = {"edgelm_pp": [], "edgelm_tg": [], "llama_pp": [], "llama_tg": []}
    for rep in range(reps):
        for n in names:
            for t in args.threads:
                print(f"rep {rep + 1}/{reps}: {n} t={t}", file=sys.stderr, flush=True)
                r = runs[(n, t)]
                order = ["edgelm", "llama"] if (rep + t) % 2 == 0 else ["llama", "edgelm"]
                for who in order:
                    got = (
                        edgelm_once(models[(n, t)], args.n_prompt, args.n_gen)
                        if who == "edgelm"
                        else llama_once(files[n], t, args.n_prompt, args.n_gen)
                    )
                    r[f"{who}_pp"].append(got["pp"])
                    r[f"{who}_tg"].append(got["tg"])

    rows = []
    for (n, t), r in runs.items():
        row: dict = {
            "model": n,
            "arch": shapes[n]["arch"],
            "file": files[n].name,
            "threads": t,  # type: ignore[type-arg]
            "file_bytes": files[n].stat().st_size,
            "weight_bytes_per_token": models[(n, t)].weight_bytes_per_token,
        }
        for k, v in r.items():
            row[k] = {"mean": statistics.mean(v), "min": min(v), "max": max(v), "runs": v}
        for m in ("pp", "tg"):
            row[f"{m}_ratio"] = row[f"edgelm_{m}"]["mean"] / row[f"llama_{m}"]["mean"]
        rows.append(row)

    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    lines = [
        f"| model | threads | edgelm {pp} | llama.cpp {pp} | ratio | edgelm {tg} | llama.cpp {tg} | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(d: dict) -> str:  # type: ignore[type-arg]
        return f"{d['mean']:.2f} ({d['min']:.2f}–{d['max']:.2f})"

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {cell(r['edgelm_pp'])} | {cell(r['llama_pp'])} | "
            f"{r['pp_ratio']:.2f}x | {cell(r['edgelm_tg'])} | {cell(r['llama_tg'])} | {r['tg_ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": _cpu_name(),
        "llc": _llc(),
        "kernel_level": edgelm._native.kernel_level(),
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "reps": reps,
        "pp": pp,
        "tg": tg,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    archs = ", ".join(f"{n} = {shapes[n]['arch']}" for n in names)
    (out_dir / f"{stem}.md").write_text(
        f"# New architectures on the CPU: edgelm vs llama-bench ({meta['date']}, {meta['cpu']})\n\n"
        f"Synthetic Q4_K_M files of real shapes (random weights, each family's layout: "
        f"{archs}), made by benches/bench_archs.py. Kernel level "
        f"{meta['kernel_level']}; last-level cache {meta['llc']}. Tokens/s, mean (min–max) of {reps} interleaved "
        f"repetitions, edgelm and llama-bench -r 1 alternating within each.\n\n{table}\n"
    )
    _chart(rows, out_dir / f"{stem}.png", meta)
    return 0


def _chart(rows: list[dict], out: Path, meta: dict) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['model']}\n{r['threads']}t" for r in rows]
    x = np.arange(len(rows))
    for ax, m in zip(axes, ("pp", "tg")):
        for i, (who, color) in enumerate((("edgelm", "tab:blue"), ("llama", "tab:gray"))):
            d = [r[f"{who}_{m}"] for r in rows]
            mean = np.array([v["mean"] for v in d])
            err = np.array([[v["mean"] - v["min"] for v in d], [v["max"] - v["mean"] for v in d]])
            ax.bar(
                x + (i - 0.5) * 0.38,
                mean,
                0.38,
                yerr=err,
                capsize=3,
                color=color,
                label="edgelm" if who == "edgelm" else "llama.cpp b11434",
            )
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{meta[m]} (tokens/s, mean and min–max)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Synthetic Q4_K_M files of real shapes, {meta['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
