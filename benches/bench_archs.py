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
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from bench_cpu import LLAMA_BIN, _cpu_name, _llc  # noqa: E402
from make_tiny_models import vocab  # noqa: E402  (the fixtures' tokenizer)

BENCH_DIR = Path(os.environ.get("EDGELM_BENCH_DIR", Path.home() / ".cache/edgelm/bench-archs"))

# Hyper-parameters of the published models (their config.json), layers cut only for the MoE.
SHAPES: dict[str, dict] = {  # type: ignore[type-arg]
    "qwen3-1.7b": dict(arch="qwen3", n_embd=2048, n_layer=28, n_head=16, n_head_kv=8, head_dim=128, n_ff=6144,
                       n_vocab=151936, tied=True, ctx=40960, rope_base=1e6, eps=1e-6),
    "phi4-mini": dict(arch="phi3", n_embd=3072, n_layer=32, n_head=24, n_head_kv=8, head_dim=128, n_ff=8192,
                      n_vocab=200064, tied=True, ctx=131072, orig_ctx=4096, n_rot=96, rope_base=10000.0, eps=1e-5),
    "qwen3-30b-a3b-8l": dict(arch="qwen3moe", n_embd=2048, n_layer=8, n_head=32, n_head_kv=4, head_dim=128,
                             n_expert=128, n_used=8, n_ff_exp=768, n_ff=6144, n_vocab=151936, tied=False, ctx=40960,
                             rope_base=1e6, eps=1e-6),
}
# The same layouts on tiny shapes (rows whole 256-blocks, so Q4_K_M applies).
TINY: dict[str, dict] = {  # type: ignore[type-arg]
    "qwen3-tiny": dict(SHAPES["qwen3-1.7b"], n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512,
                       n_vocab=4096),
    "phi4-tiny": dict(SHAPES["phi4-mini"], n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512,
                      n_vocab=4096, n_rot=48),
    "qwen3moe-tiny": dict(SHAPES["qwen3-30b-a3b-8l"], n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64,
                          n_expert=16, n_used=4, n_ff_exp=256, n_vocab=4096),
}


def tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:  # type: ignore[type-arg]
    """(name, numpy shape) of every tensor of the layout, in the order converters write."""
    e, hd, L = s["n_embd"], s["head_dim"], s["n_layer"]
    qd, kvd = s["n_head"] * hd, s["n_head_kv"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s["n_vocab"], e)), ("output_norm.weight", (e,))]
    if not s["tied"]:
        out.append(("output.weight", (s["n_vocab"], e)))
    if s["arch"] == "phi3":
        out += [("rope_factors_long.weight", (s["n_rot"] // 2,)), ("rope_factors_short.weight", (s["n_rot"] // 2,))]
    for il in range(L):
        p = f"blk.{il}."
        out.append((p + "attn_norm.weight", (e,)))
        if s["arch"] == "phi3":
            out.append((p + "attn_qkv.weight", (qd + 2 * kvd, e)))
        else:
            out += [(p + "attn_q.weight", (qd, e)), (p + "attn_k.weight", (kvd, e)), (p + "attn_v.weight", (kvd, e))]
        if s["arch"].startswith("qwen3"):
            out += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        out += [(p + "attn_output.weight", (e, qd)), (p + "ffn_norm.weight", (e,))]
        if s["arch"] == "qwen3moe":
            x, f = s["n_expert"], s["n_ff_exp"]
            out += [(p + "ffn_gate_inp.weight", (x, e)), (p + "ffn_gate_exps.weight", (x, f, e)),
                    (p + "ffn_up_exps.weight", (x, f, e)), (p + "ffn_down_exps.weight", (x, e, f))]
        elif s["arch"] == "phi3":
            out += [(p + "ffn_up.weight", (2 * s["n_ff"], e)), (p + "ffn_down.weight", (e, s["n_ff"]))]
        else:
            out += [(p + "ffn_gate.weight", (s["n_ff"], e)), (p + "ffn_up.weight", (s["n_ff"], e)),
                    (p + "ffn_down.weight", (e, s["n_ff"]))]
    return out


def write_f16(path: Path, s: dict) -> None:  # type: ignore[type-arg]
    """The layout with random weights (σ 0.02; norms 1; router and RoPE factors F32),
    written tensor by tensor so that memory holds one tensor at a time."""
    import gguf

    a = s["arch"]
    w = gguf.GGUFWriter(str(path), a)
    # Not "phi3": llama.cpp's vocabulary loader then wants SentencePiece's "</s>".
    w.add_name(f"bench-{a}-synthetic".replace("phi3", "phi"))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_vocab_size(s["n_vocab"])
    if a.startswith("qwen3"):
        w.add_key_length(s["head_dim"])
        w.add_value_length(s["head_dim"])
        w.add_rope_dimension_count(s["head_dim"])
    if a == "qwen3moe":
        w.add_expert_count(s["n_expert"])
        w.add_expert_used_count(s["n_used"])
        w.add_expert_feed_forward_length(s["n_ff_exp"])
    if a == "phi3":
        w.add_rope_dimension_count(s["n_rot"])
        w.add_rope_scaling_orig_ctx_len(s["orig_ctx"])
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(s["ctx"] / s["orig_ctx"]) / math.log(s["orig_ctx"])))
        w.add_sliding_window(0)
    toks, types, merges = vocab()
    pad = s["n_vocab"] - len(toks)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if a.startswith("qwen3") else "llama-bpe")
    w.add_token_list(toks[:-2] + [f"extra{i}" for i in range(pad)] + toks[-2:])
    w.add_token_types(types[:-2] + [int(gguf.TokenType.NORMAL)] * pad + types[-2:])
    w.add_token_merges(merges)
    w.add_bos_token_id(s["n_vocab"] - 2)
    w.add_eos_token_id(s["n_vocab"] - 1)
    w.add_add_bos_token(False)

    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22) * 0.02).astype(np.float16)  # tiled: the values do not matter here
    layout = tensors(s)

    def data(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            if name.startswith("rope_factors"):
                return np.geomspace(1.0, 8.0 if "long" in name else 1.5, shape[0]).astype(np.float32)
            return np.ones(shape, np.float32)
        if name.endswith("ffn_gate_inp.weight"):
            return (rng.standard_normal(shape) * 0.02).astype(np.float32)
        return np.resize(block, shape)

    for name, shape in layout:
        dt = np.float32 if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in layout:
        w.write_tensor_data(data(name, shape))
    w.close()


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


def llama_once(model: Path, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    out = subprocess.run(
        [str(LLAMA_BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
         "-r", "1", "-o", "json"],
        capture_output=True, text=True, check=True,
    )
    return {("pp" if r["n_prompt"] > 0 else "tg"): float(r["avg_ts"]) for r in json.loads(out.stdout)}


def edgelm_once(m: object, n_prompt: int, n_gen: int) -> dict[str, float]:
    pp_s, _ = m.bench(n_prompt, 0)  # type: ignore[attr-defined]
    _, tg_s = m.bench(0, n_gen)  # type: ignore[attr-defined]
    return {"pp": n_prompt / pp_s, "tg": n_gen / tg_s}


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
                    got = edgelm_once(models[(n, t)], args.n_prompt, args.n_gen) if who == "edgelm" else \
                        llama_once(files[n], t, args.n_prompt, args.n_gen)
                    r[f"{who}_pp"].append(got["pp"])
                    r[f"{who}_tg"].append(got["tg"])

    rows = []
    for (n, t), r in runs.items():
        row: dict = {"model": n, "arch": shapes[n]["arch"], "file": files[n].name, "threads": t,  # type: ignore[type-arg]
                     "file_bytes": files[n].stat().st_size, "weight_bytes_per_token": models[(n, t)].weight_bytes_per_token}
        for k, v in r.items():
            row[k] = {"mean": statistics.mean(v), "min": min(v), "max": max(v), "runs": v}
        for m in ("pp", "tg"):
            row[f"{m}_ratio"] = row[f"edgelm_{m}"]["mean"] / row[f"llama_{m}"]["mean"]
        rows.append(row)

    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    lines = [f"| model | threads | edgelm {pp} | llama.cpp {pp} | ratio | edgelm {tg} | llama.cpp {tg} | ratio |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(d: dict) -> str:  # type: ignore[type-arg]
        return f"{d['mean']:.2f} ({d['min']:.2f}–{d['max']:.2f})"

    for r in rows:
        lines.append(f"| {r['model']} | {r['threads']} | {cell(r['edgelm_pp'])} | {cell(r['llama_pp'])} | "
                     f"{r['pp_ratio']:.2f}x | {cell(r['edgelm_tg'])} | {cell(r['llama_tg'])} | {r['tg_ratio']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": _cpu_name(), "llc": _llc(),
            "kernel_level": edgelm._native.kernel_level(), "n_prompt": args.n_prompt, "n_gen": args.n_gen,
            "reps": reps, "pp": pp, "tg": tg}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    archs = ", ".join(f"{n} = {shapes[n]['arch']}" for n in names)
    (out_dir / f"{stem}.md").write_text(
        f"# New architectures on the CPU: edgelm vs llama-bench ({meta['date']}, {meta['cpu']})\n\n"
        f"Synthetic Q4_K_M files of real shapes (random weights, each family's layout: "
        f"{archs}), made by benches/bench_archs.py. Kernel level "
        f"{meta['kernel_level']}; last-level cache {meta['llc']}. Tokens/s, mean (min–max) of {reps} interleaved "
        f"repetitions, edgelm and llama-bench -r 1 alternating within each.\n\n{table}\n")
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
            ax.bar(x + (i - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=3, color=color,
                   label="edgelm" if who == "edgelm" else "llama.cpp b11434")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{meta[m]} (tokens/s, mean and min–max)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Synthetic Q4_K_M files of real shapes, {meta['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
