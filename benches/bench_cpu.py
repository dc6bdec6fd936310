#!/usr/bin/env python3
"""edgelm beside llama-bench on the same GGUF files, same thread counts, same run.

    .venv/bin/python benches/bench_cpu.py [--models A.gguf B.gguf] [--threads 1 2] [--reps 3]

Measures pp128 (one 128-token prompt step, tokens/s) and tg64 (64 single-token
steps from an empty cache, tokens/s), as llama-bench defines them, and this
machine's memory read bandwidth, to print generation as a fraction of its bound
(bandwidth / weight bytes read per token). Prints a table and writes
benches/results/cpu.json, cpu.md and cpu.png. `--all` adds the SmolLM2 Q4_0, Q8_0,
Q4_K_M and Q6_K copies made by benches/make_quants.py.

llama.cpp comes from $LLAMA_CPP_BIN (default ~/.cache/edgelm/llama-build/bin); see
DEVELOPERS.md for how it is built. Without it, only edgelm's figures are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"
MODELS = Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", Path.home() / ".cache/edgelm/llama-build/bin"))
DEFAULT_MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
QUANT_DIR = Path(os.environ.get("EDGELM_QUANT_DIR", Path.home() / ".cache/edgelm/quant"))
ALL_MODELS = [
    str(QUANT_DIR / "SmolLM2-135M-Instruct.Q4_0.gguf"),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    str(QUANT_DIR / "SmolLM2-135M-Instruct.Q8_0.gguf"),
    str(QUANT_DIR / "SmolLM2-135M-Instruct.Q4_K_M.gguf"),
    str(QUANT_DIR / "SmolLM2-135M-Instruct.Q6_K.gguf"),
    "gemma-3-270m-q4_k_m.gguf",
]


def llama_bench(model: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict[str, float] | None:
    exe = LLAMA_BIN / "llama-bench"
    if not exe.exists():
        return None
    out = subprocess.run(
        [
            str(exe),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(n_prompt),
            "-n",
            str(n_gen),
            "-r",
            str(reps),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    res = {}
    for row in json.loads(out.stdout):
        key = "pp" if row["n_prompt"] > 0 else "tg"
        res[key] = float(row["avg_ts"])
    return res


def llama_once(model: Path, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    out = subprocess.run(
        [
            str(LLAMA_BIN / "llama-bench"),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(n_prompt),
            "-n",
            str(n_gen),
            "-r",
            "1",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {("pp" if r["n_prompt"] > 0 else "tg"): float(r["avg_ts"]) for r in json.loads(out.stdout)}


def edgelm_once(m: object, n_prompt: int, n_gen: int) -> dict[str, float]:
    pp_s, _ = m.bench(n_prompt, 0)  # type: ignore[attr-defined]
    _, tg_s = m.bench(0, n_gen)  # type: ignore[attr-defined]
    return {"pp": n_prompt / pp_s, "tg": n_gen / tg_s}


def edgelm_bench(model: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict[str, float]:
    import edgelm

    m = edgelm.Model(model, n_threads=threads).native
    m.bench(16, 4)  # warm-up: page in the weights
    pp, tg = [], []
    for _ in range(reps):
        pp_s, tg_s = m.bench(n_prompt, n_gen)
        pp.append(n_prompt / pp_s)
        tg.append(n_gen / tg_s)
    res = {"pp": statistics.mean(pp), "tg": statistics.mean(tg), "bytes_per_token": m.weight_bytes_per_token}
    # Where the time goes: one more profiled run of each measure.
    os.environ["EDGELM_PROFILE"] = "1"
    try:
        mp = edgelm.Model(model, n_threads=threads).native
        mp.bench(16, 4)
        mp.profile()
        for key, (n_p, n_g) in (("pp", (n_prompt, 0)), ("tg", (0, n_gen))):
            total = sum(mp.bench(n_p, n_g))
            parts = dict(mp.profile())
            parts["other"] = max(0.0, total - sum(parts.values()))
            res[f"{key}_profile"] = {k: v / total for k, v in parts.items() if v > 0}
    finally:
        del os.environ["EDGELM_PROFILE"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--all", action="store_true", help="the six files of the CPU issue (run make_quants.py first)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="cpu", help="results file stem")
    ap.add_argument("--chart-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args()
    if args.chart_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        m = saved["meta"]
        _chart(saved["rows"], RESULTS / f"{args.name}.png", f"pp{m['n_prompt']}", f"tg{m['n_gen']}")
        return 0

    import edgelm

    models = args.models or (ALL_MODELS if args.all else DEFAULT_MODELS)
    bw = {t: edgelm._native.read_bandwidth(1 << 30, t, 5) for t in args.threads}
    for t, b in bw.items():
        print(f"memory read bandwidth, {t} thread(s): {b / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    for name in models:
        path = Path(name) if Path(name).exists() else MODELS / name
        for t in args.threads:
            print(f"{path.name} t={t} ...", file=sys.stderr, flush=True)
            ours = edgelm_bench(path, t, args.n_prompt, args.n_gen, args.reps)
            peer = llama_bench(path, t, args.n_prompt, args.n_gen, args.reps)
            bound = bw[t] / ours["bytes_per_token"]
            # The same read measure over a buffer as large as the weights: where the
            # weights fit in a cache level (this VM's L3 is hundreds of MiB), that level,
            # not DRAM, is what generation streams from.
            bw_same = edgelm._native.read_bandwidth(int(ours["bytes_per_token"]), t, 5)
            bound_same = bw_same / ours["bytes_per_token"]
            rows.append(
                {
                    "model": path.name,
                    "threads": t,
                    "edgelm": ours,
                    "llama.cpp": peer,
                    "bandwidth_Bps": bw[t],
                    "tg_bound": bound,
                    "tg_fraction_of_bound": ours["tg"] / bound,
                    "bandwidth_same_size_Bps": bw_same,
                    "tg_bound_same_size": bound_same,
                    "tg_fraction_of_same_size_bound": ours["tg"] / bound_same,
                }
            )

    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    lines = [
        f"| model | threads | edgelm {pp} | llama.cpp {pp} | ratio | edgelm {tg} | llama.cpp {tg} | ratio | tg bound | edgelm/bound "
        f"| same-size bound | edgelm/same-size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, p = r["edgelm"], r["llama.cpp"]

        def cell(k: str) -> tuple[str, str, str]:
            if p is None:
                return f"{e[k]:.1f}", "n/a", "n/a"
            return f"{e[k]:.1f}", f"{p[k]:.1f}", f"{e[k] / p[k]:.2f}x"

        a, b = cell("pp"), cell("tg")
        lines.append(
            f"| {r['model']} | {r['threads']} | {a[0]} | {a[1]} | {a[2]} | {b[0]} | {b[1]} | {b[2]} "
            f"| {r['tg_bound']:.0f} | {r['tg_fraction_of_bound']:.0%} | {r['tg_bound_same_size']:.0f} "
            f"| {r['tg_fraction_of_same_size_bound']:.0%} |"
        )
    table = "\n".join(lines)
    prof = [
        "",
        "Where edgelm's time goes (share of wall time):",
        "",
        "| model | threads | measure | matmul | attention | norm | rope | activation | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key in ("pp", "tg"):
            p = r["edgelm"].get(f"{key}_profile", {})
            cells = " | ".join(
                f"{p.get(k, 0):.0%}" for k in ("matmul", "attention", "norm", "rope", "activation", "other")
            )
            prof.append(f"| {r['model']} | {r['threads']} | {key} | {cells} |")
    table += "\n" + "\n".join(prof)
    print(table)

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "reps": args.reps,
        "read_bandwidth_Bps": bw,
        "kernel_level": edgelm._native.kernel_level(),
        "llc": _llc(),
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    bw_line = ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s" for t, b in bw.items())
    (RESULTS / f"{args.name}.md").write_text(
        f"# CPU: edgelm vs llama-bench ({meta['date']}, {meta['cpu']})\n\n"
        f"Kernel level {meta['kernel_level']}; memory read bandwidth {bw_line} (1 GiB buffer: DRAM); "
        f"last-level cache {meta['llc']}. tg bound = bandwidth / weight bytes read per token. The same-size bound "
        f"measures the read bandwidth over a buffer as large as the model's weights: when the weights fit in the "
        f"last-level cache, generation streams from it, and the DRAM bound is exceeded.\n\n{table}\n"
    )
    _chart(rows, RESULTS / f"{args.name}.png", pp, tg)
    return 0


def _llc() -> str:
    """The last-level cache size as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("L3 cache:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _chart(rows: list[dict], out: Path, pp: str, tg: str) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))

    def short(name: str) -> str:
        name = name.replace(".gguf", "").replace("SmolLM2-135M-Instruct.", "SmolLM2 ")
        return name.replace("gemma-3-270m-q4_k_m", "Gemma3 Q4_K_M")

    labels = [f"{short(r['model'])} {r['threads']}t" for r in rows]
    x = range(len(rows))
    for ax, key, title in ((axes[0], "pp", pp), (axes[1], "tg", tg)):
        ours = [r["edgelm"][key] for r in rows]
        peer = [r["llama.cpp"][key] if r["llama.cpp"] else 0 for r in rows]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="edgelm")
        ax.bar([i + 0.2 for i in x], peer, 0.4, label="llama.cpp")
        ax.set_xticks(list(x), labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(f"{title} (tokens/s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
