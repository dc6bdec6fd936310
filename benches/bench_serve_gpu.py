#!/usr/bin/env python3
"""`edgelm serve --device cuda` beside llama-server built with CUDA: the issue's
multi-client measure, same file, same client, same run, on the GPU machine.

    python3 benches/bench_serve_gpu.py --model measure-q4_k_m.gguf --llama-bin DIR \
        [--clients 1,16,64] [--duration 10] [--max-tokens 256] [--out DIR]

llama-server runs as the issue gives it: `-ngl 99 -np 64 -c 65536 -fa on`. edgelm runs
with its GPU defaults (64 sequences, 2048 tokens a step). Each point is bench_serve.py's
closed loop: N clients, each sending streamed POST /v1/completions (max_tokens 256,
temperature 0, ignore_eos, a distinct short prompt each time) for --duration seconds;
tok/s = all completion tokens / wall time. The servers run one after the other, never
together. Writes serve_gpu.json and serve_gpu.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402  (the same client and server harness as the CPU bench)

ROOT = Path(__file__).resolve().parents[1]


def llama_argv(bin_dir: Path, model: Path, port: int) -> list[str]:
    exe = bin_dir / "llama-server"
    argv = [
        str(exe),
        "-m",
        str(model),
        "-ngl",
        "99",
        "-np",
        "64",
        "-c",
        "65536",
        "-fa",
        "on",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60).stdout
    if "--no-webui" in help_text:
        argv.append("--no-webui")
    return argv


def edgelm_argv(model: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgelm.cli",
        "serve",
        "--model",
        str(model),
        "--device",
        "cuda",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-mdns",
        "--max-context",
        "2048",
    ]


def run(kind: str, argv: list[str], port: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    srv = bs.Server(bs.SERVERS[kind], argv, port, log_dir)
    res: dict[str, Any] = {"argv": argv, "throughput": []}
    try:
        srv.start(timeout=600)
        for c in args.clients:
            pt = asyncio.run(bs.throughput_point(kind, srv.base, c, args.duration, args.max_tokens, srv.name))
            res["throughput"].append(pt)
            print(
                f"[{srv.name}] clients {c:>3}: {pt['tok_s']:8.1f} tok/s  TTFT {pt['ttft_ms']:7.1f} ms  "
                f"{bs._fmt(pt['tpot_ms'], '.2f')} ms/token  {pt['requests']} requests, {pt['errors']} errors",
                file=sys.stderr,
                flush=True,
            )
    except Exception as e:  # noqa: BLE001 - recorded; the other server still runs
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"[{srv.name}] FAILED: {res['error']}\n{srv.log_tail()}", file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--llama-bin", type=Path, required=True, help="llama.cpp CUDA build's bin/")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    out: dict[str, Any] = {
        "model": args.model.name,
        "gpu": gpu,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "servers": {},
    }
    with tempfile.TemporaryDirectory() as logs:
        for kind in ("llama", "edgelm"):
            port = bs._free_port()
            argv = llama_argv(args.llama_bin, args.model, port) if kind == "llama" else edgelm_argv(args.model, port)
            out["servers"][kind] = run(kind, argv, port, args, Path(logs))
            for f in Path(logs).glob("*.log"):
                (args.out / f"serve_gpu_{f.name}").write_text(f.read_text(errors="replace")[-20000:])
    (args.out / "serve_gpu.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = ["| clients | llama-server tok/s | edgelm tok/s | edgelm / llama-server |", "|---|---|---|---|"]
    by = {k: {p["clients"]: p for p in v.get("throughput", [])} for k, v in out["servers"].items()}
    for c in args.clients:
        a, b = by.get("llama", {}).get(c), by.get("edgelm", {}).get(c)
        ra = f"{a['tok_s']:.0f}" if a else "n/a"
        rb = f"{b['tok_s']:.0f}" if b else "n/a"
        ratio = f"{b['tok_s'] / a['tok_s']:.2f}x" if a and b else "n/a"
        rows.append(f"| {c} | {ra} | {rb} | {ratio} |")
    table = "\n".join(rows)
    (args.out / "serve_gpu.md").write_text(
        f"# edgelm vs llama-server on {gpu}: {args.model.name}, {args.max_tokens} tokens a request\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
