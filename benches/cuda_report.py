#!/usr/bin/env python3
"""Figures and chart of a CUDA side-by-side run (benches/cuda_side_by_side.sh's OUT_DIR):
edgelm's cuda_bench lines (edgelm.jsonl), llama-bench's JSON for the same files
(llama-bench-TYPE.json) and the multi-client servers (serve_gpu.json).

    .venv/bin/python benches/cuda_report.py benches/results/cuda_side_by_side [--note TEXT]

Writes benches/results/cuda.json, cuda.md and cuda.png. llama-bench's prompt figure
swings widely between its repetitions (the first is cold), so the table gives both its
mean (what llama-bench prints) and its best repetition; edgelm's pp512 is its best of 3.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BANDWIDTH = 4.8e12  # H200 HBM3e, bytes/s (the vendor's figure)


def llama(dir_: Path, t: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in json.loads((dir_ / f"llama-bench-{t}.json").read_text()):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        s = r["samples_ts"]
        out[test] = {"mean": statistics.mean(s), "best": max(s), "samples": s}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.dir / "edgelm.jsonl").read_text().splitlines() if line.strip()]
    gpu = (args.dir / "gpu.txt").read_text().strip() if (args.dir / "gpu.txt").exists() else rows[0]["gpu"]
    table = []
    for r in rows:
        ll = llama(args.dir, r["type"])
        table.append(
            {
                "type": r["type"],
                "edgelm": {k: r[k] for k in ("pp512", "tg128", "agg16", "agg64")},
                "llama_cpp": ll,
                "pp512_vs_mean": r["pp512"] / ll["pp512"]["mean"],
                "pp512_vs_best": r["pp512"] / ll["pp512"]["best"],
                "tg128_vs_mean": r["tg128"] / ll["tg128"]["mean"],
                "tg_fraction_of_bandwidth": r["tg128"] * r["weight_bytes_per_token"] / BANDWIDTH,
                "llama_tg_fraction_of_bandwidth": ll["tg128"]["mean"] * r["weight_bytes_per_token"] / BANDWIDTH,
                "weight_bytes_per_token": r["weight_bytes_per_token"],
            }
        )
    serve = json.loads((args.dir / "serve_gpu.json").read_text()) if (args.dir / "serve_gpu.json").exists() else None
    (RESULTS / "cuda.json").write_text(
        json.dumps({"gpu": gpu, "note": args.note, "rows": table, "serve": serve}, indent=1) + "\n"
    )

    md = [f"# CUDA: edgelm beside llama.cpp b11434 (CUDA) on {gpu}", ""]
    if args.note:
        md += [args.note, ""]
    md += [
        "Measure model: Llama 3.2 1B shapes (dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, RoPE base "
        "500000), vocabulary 49152, random weights; the same file for both (cuda_bench writes it, llama-bench "
        "reads it). Q4_K_M is llama-quantize's mix, made by edgelm's quantizer (byte-identical to llama-quantize). "
        "tok/s. llama-bench: `-p 512 -n 128 -fa 1 -ngl 99 -r 3`, mean of its 3 repetitions and the best one. "
        "edgelm: pp512 best of 3, tg128 one sequence, greedy; 16 / 64 streams through the serving executor.",
        "",
        "| model | edgelm pp512 | llama.cpp pp512 mean / best | ratio (mean / best) | edgelm tg128 | llama.cpp tg128 "
        "| ratio | edgelm tg / bandwidth bound | llama.cpp tg / bound | edgelm 16 streams | edgelm 64 streams |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        e, ll = r["edgelm"], r["llama_cpp"]
        md.append(
            f"| 1B {r['type'].upper()} | {e['pp512']:,.0f} | {ll['pp512']['mean']:,.0f} / {ll['pp512']['best']:,.0f} "
            f"| {r['pp512_vs_mean']:.2f}× / {r['pp512_vs_best']:.2f}× | {e['tg128']:,.0f} | {ll['tg128']['mean']:,.0f} "
            f"| {r['tg128_vs_mean']:.2f}× | {100 * r['tg_fraction_of_bandwidth']:.1f}% "
            f"| {100 * r['llama_tg_fraction_of_bandwidth']:.1f}% | {e['agg16']:,.0f} | {e['agg64']:,.0f} |"
        )
    if serve:
        by = {k: {p["clients"]: p for p in v.get("throughput", [])} for k, v in serve["servers"].items()}
        md += [
            "",
            f"Servers, {serve['model']}, {serve['max_tokens']} tokens a request, closed loop for "
            f"{serve['duration_s']:g} s a point (benches/bench_serve_gpu.py; llama-server `-ngl 99 -np 64 -c 65536 "
            "-fa on`, `edgelm serve --device cuda`), aggregate generated tok/s:",
            "",
            "| clients | llama-server | edgelm | edgelm / llama-server | edgelm TTFT ms | llama-server TTFT ms |",
            "|---|---|---|---|---|---|",
        ]
        for c in serve["clients"]:
            a, b = by["llama"].get(c), by["edgelm"].get(c)
            if a and b:
                md.append(
                    f"| {c} | {a['tok_s']:,.0f} | {b['tok_s']:,.0f} | {b['tok_s'] / a['tok_s']:.2f}× "
                    f"| {b['ttft_ms']:.1f} | {a['ttft_ms']:.1f} |"
                )
    (RESULTS / "cuda.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [r["type"].upper() for r in table]
    x = range(len(names))
    for ax, key, title in ((axes[0], "pp512", "prompt, pp512 tok/s"), (axes[1], "tg128", "generation, tg128 tok/s")):
        ax.bar([i - 0.2 for i in x], [r["edgelm"][key] for r in table], 0.4, label="edgelm")
        ax.bar(
            [i + 0.2 for i in x],
            [r["llama_cpp"][key]["mean"] for r in table],
            0.4,
            label="llama.cpp (mean)",
            yerr=[
                [r["llama_cpp"][key]["mean"] - min(r["llama_cpp"][key]["samples"]) for r in table],
                [r["llama_cpp"][key]["best"] - r["llama_cpp"][key]["mean"] for r in table],
            ],
            capsize=3,
        )
        ax.set_xticks(list(x), names)
        ax.set_title(title)
        ax.legend()
    if serve:
        for k, label in (("edgelm", "edgelm serve"), ("llama", "llama-server")):
            pts = serve["servers"][k].get("throughput", [])
            axes[2].plot([p["clients"] for p in pts], [p["tok_s"] for p in pts], marker="o", label=label)
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("concurrent clients")
        axes[2].set_title(f"serving {serve['model']}, tok/s")
        axes[2].legend()
    fig.suptitle(f"edgelm vs llama.cpp b11434, CUDA, {gpu}")
    fig.tight_layout()
    fig.savefig(RESULTS / "cuda.png", dpi=110)


if __name__ == "__main__":
    main()
