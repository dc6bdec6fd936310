#!/usr/bin/env python3
"""edgelm beside llama-bench where users live: 1–4B models that do not fit in any cache,
in the K-quant mixes people download, same files, same threads, same run.

    .venv/bin/python benches/bench_cpu_sizes.py [--models llama-3.2-1b llama-3.2-3b]
        [--types Q4_K_M Q5_K_M Q6_K Q4_0 Q8_0] [--threads 1 2] [--reps 5] [--small]

Files: synthetic Llama-3.2-1B and -3B shapes (benches/synthetic.py: the real layout and
vocabulary size, random F16 weights), quantized by llama-quantize into each type, made
once under $EDGELM_BENCH_DIR (default ~/.cache/edgelm/bench-cpu); each file's bytes per
tensor type are printed, so a "Q4_K_M" file is seen to be one (`edgelm info --summary`).
`--small` adds the real SmolLM2-135M and Gemma-3-270M files (the earlier table, which
must not regress).

Measures, as llama-bench defines them: pp (one N-token prompt step, only the last
token's logits) and tg (M single-token steps from an empty cache), tokens/s. llama.cpp's
speed on this VM moves by up to 40% between runs, so the two are interleaved: each
repetition runs, for every file and thread count, edgelm once and `llama-bench -r 1`
once (which goes first alternates), and the table gives each side's median and min–max;
the ratio is of the medians. The DRAM read bandwidth (a buffer far larger than the
last-level cache) is measured before and after, and tg at each thread count is given
as a fraction of its bound, bandwidth ÷ weight bytes read per token.

Writes benches/results/cpu_sizes.{json,md,png}. llama.cpp comes from $LLAMA_CPP_BIN
(default ~/.cache/edgelm/llama-build/bin), built as DEVELOPERS.md says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
from bench_cpu import LLAMA_BIN, MODELS, _cpu_name, _llc, edgelm_once, llama_once  # noqa: E402
from synthetic import SHAPES, write_f16  # noqa: E402

BENCH_DIR = Path(os.environ.get("EDGELM_BENCH_DIR", Path.home() / ".cache/edgelm/bench-cpu"))
RESULTS = ROOT / "benches" / "results"
TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "Q8_0"]
SMALL = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def make(name: str, types: list[str]) -> dict[str, Path]:
    """The quantized files of one shape, made from one F16 file (deleted after)."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    out = {t: BENCH_DIR / f"{name}.{t}.gguf" for t in types}
    missing = [t for t, p in out.items() if not p.exists()]
    if missing:
        f16 = BENCH_DIR / f"{name}.F16.gguf"
        if not f16.exists():
            print(f"writing {f16} ...", file=sys.stderr, flush=True)
            write_f16(f16, SHAPES[name])
        for t in missing:
            print(f"llama-quantize {f16.name} -> {out[t].name} ...", file=sys.stderr, flush=True)
            subprocess.run(
                [str(LLAMA_BIN / "llama-quantize"), str(f16), str(out[t]), t, str(os.cpu_count() or 2)],
                check=True,
                capture_output=True,
            )
        f16.unlink()
    return out


def type_summary(path: Path) -> dict[str, float]:
    """Share of the tensor bytes per type (what `edgelm info --summary` prints)."""
    from edgelm import _native

    _, _, _, tensors = _native.inspect_gguf(str(path))
    total = sum(nb for *_, nb in tensors) or 1
    by: dict[str, int] = {}
    for _, _, ty, nb in tensors:
        by[ty] = by.get(ty, 0) + nb
    return {ty: nb / total for ty, nb in sorted(by.items(), key=lambda x: -x[1])}


def stats(v: list[float]) -> dict[str, object]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.2-3b"])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--n-prompt", type=int, default=64)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="also SmolLM2-135M and Gemma-3-270M (real files)")
    ap.add_argument("--name", default="cpu_sizes", help="results file stem")
    ap.add_argument("--chart-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args()
    if args.chart_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        _chart(saved["rows"], RESULTS / f"{args.name}.png", saved["meta"])
        return 0

    import edgelm

    files: list[tuple[str, Path]] = []
    for name in args.models:
        for t, p in make(name, args.types).items():
            files.append((f"{name} {t}", p))
    if args.small:
        files += [(f.removesuffix(".gguf"), MODELS / f) for f in SMALL]
    summaries = {label: type_summary(p) for label, p in files}
    for label, s in summaries.items():
        print(f"{label}: " + ", ".join(f"{ty} {100 * v:.0f}%" for ty, v in s.items()), file=sys.stderr)

    bw_before = {t: edgelm._native.read_bandwidth(2 << 30, t, 5) for t in args.threads}
    runs: dict[tuple[str, int], dict[str, list[float]]] = {}
    per_token: dict[str, int] = {}
    for rep in range(args.reps):
        for label, path in files:
            for t in args.threads:
                print(f"rep {rep + 1}/{args.reps}: {label} t={t}", file=sys.stderr, flush=True)
                m = edgelm.Model(path, n_threads=t).native
                m.bench(16, 4)  # page in and pack the weights
                per_token[label] = m.weight_bytes_per_token
                r = runs.setdefault((label, t), {"edgelm_pp": [], "edgelm_tg": [], "llama_pp": [], "llama_tg": []})
                order = ["edgelm", "llama"] if (rep + t) % 2 == 0 else ["llama", "edgelm"]
                for who in order:
                    got = (
                        edgelm_once(m, args.n_prompt, args.n_gen)
                        if who == "edgelm"
                        else llama_once(path, t, args.n_prompt, args.n_gen)
                    )
                    r[f"{who}_pp"].append(got["pp"])
                    r[f"{who}_tg"].append(got["tg"])
                del m
    bw_after = {t: edgelm._native.read_bandwidth(2 << 30, t, 5) for t in args.threads}

    rows = []
    for (label, t), r in runs.items():
        bw = min(bw_before[t], bw_after[t])
        row: dict = {
            "model": label,
            "threads": t,
            "types": summaries[label],  # type: ignore[type-arg]
            "weight_bytes_per_token": per_token[label],
            "bandwidth_Bps": bw,
        }
        for k, v in r.items():
            row[k] = stats(v)
        for m in ("pp", "tg"):
            row[f"{m}_ratio"] = row[f"edgelm_{m}"]["median"] / row[f"llama_{m}"]["median"]
        row["tg_bound"] = bw / per_token[label]
        row["tg_fraction_of_bound"] = row["edgelm_tg"]["median"] / row["tg_bound"]
        rows.append(row)

    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    lines = [
        f"| file | threads | edgelm {pp} | llama.cpp {pp} | ratio | edgelm {tg} | llama.cpp {tg} | ratio | "
        "tg / bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(d: dict) -> str:  # type: ignore[type-arg]
        return f"{d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f})"

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {cell(r['edgelm_pp'])} | {cell(r['llama_pp'])} | "
            f"{r['pp_ratio']:.2f}× | {cell(r['edgelm_tg'])} | {cell(r['llama_tg'])} | {r['tg_ratio']:.2f}× | "
            f"{100 * r['tg_fraction_of_bound']:.0f}% |"
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
        "reps": args.reps,
        "pp": pp,
        "tg": tg,
        "bandwidth_before_Bps": bw_before,
        "bandwidth_after_Bps": bw_after,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    types = "\n".join(
        f"- {label}: " + ", ".join(f"{ty} {100 * v:.0f}%" for ty, v in s.items()) for label, s in summaries.items()
    )
    bws = ", ".join(f"{t} thread(s) {min(bw_before[t], bw_after[t]) / 1e9:.1f} GB/s" for t in args.threads)
    (RESULTS / f"{args.name}.md").write_text(
        f"# CPU at real sizes: edgelm vs llama-bench ({meta['date']}, {meta['cpu']})\n\n"
        f"Synthetic Llama-3.2 shapes (benches/synthetic.py: real layout and vocabulary, random F16 weights "
        f"quantized by llama-quantize b11434), made by benches/bench_cpu_sizes.py. Kernel level "
        f"{meta['kernel_level']}; last-level cache {meta['llc']}; DRAM read bandwidth (2 GiB buffer, the lower of "
        f"before and after): {bws}. Tokens/s, median (min–max) of {args.reps} interleaved repetitions, edgelm and "
        f"`llama-bench -r 1` alternating within each; ratio of the medians; tg / bound = edgelm's tg ÷ "
        f"(bandwidth ÷ weight bytes read per token).\n\n{table}\n\nTensor bytes per type:\n\n{types}\n"
    )
    _chart(rows, RESULTS / f"{args.name}.png", meta)
    return 0


def _chart(rows: list[dict], out: Path, meta: dict) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(rows)), 8))
    labels = [f"{r['model']}\n{r['threads']}t" for r in rows]
    x = np.arange(len(rows))
    for ax, m in zip(axes, ("pp", "tg")):
        ratios = [r[f"{m}_ratio"] for r in rows]
        lo = [r[f"edgelm_{m}"]["min"] / r[f"llama_{m}"]["max"] for r in rows]
        hi = [r[f"edgelm_{m}"]["max"] / r[f"llama_{m}"]["min"] for r in rows]
        err = np.array([[rt - a for rt, a in zip(ratios, lo)], [b - rt for rt, b in zip(ratios, hi)]])
        ax.bar(x, ratios, 0.6, yerr=err, capsize=3, color="tab:blue")
        goal = 1.2 if m == "pp" else 1.15
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(goal, color="tab:green", lw=0.8, ls="--", label=f"goal {goal}×")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("edgelm / llama.cpp")
        ax.set_title(f"{meta[m]}: ratio of medians (bars: worst–best pairing)")
        ax.legend(fontsize=8)
    fig.suptitle(f"edgelm vs llama.cpp b11434 at real sizes, {meta['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
