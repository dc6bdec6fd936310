#!/usr/bin/env python3
"""Fair admission on the real daemon: a short chat behind a long prompt.

    flock /tmp/edgelm-cpu.lock .venv/bin/python benches/bench_starvation.py [--long 8000] [--reps 3] [--threads 2]

Starts `edgelm serve` on SmolLM2-135M (loopback, free port, mDNS off) and measures, on
the same daemon, in this order:

1. idle: the time to first token of a short chat (`/v1/chat/completions`, streamed, 8
   tokens, greedy; the first token is the first event after the role event), the
   median of --idle runs;
2. per repetition, with fresh token ids each time (so the prefix cache never serves):
   the long prompt alone (`/v1/completions`, --long token ids, 1 token): its total
   time, and the step count from /metrics (one step = total / steps); then the long
   prompt again with a short chat sent every --every seconds while it runs: each
   chat's time to first token, and the long prompt's total time.

The issue's goal: every short chat's TTFT within 2 × its idle value + one step, and the
long prompt's time grown by at most 15%. Prints a table; writes
benches/results/starvation.{json,md,png} (--out to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
CHAT = {
    "messages": [{"role": "user", "content": "Hi! How are you?"}],
    "max_tokens": 8,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    # Every sample of `name`, with labels (the per-model ones) or without.
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


async def short_chat(s: aiohttp.ClientSession, url: str) -> float:
    """Seconds to the first token of a short streamed chat."""
    t0 = time.perf_counter()
    events, ttft = 0, None
    async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            if raw.startswith(b"data:") and not raw.startswith(b"data: [DONE]"):
                events += 1
                if events == 2:  # the role event comes at once; the second is the first token
                    ttft = time.perf_counter() - t0
    assert ttft is not None, "no token"
    return ttft


async def long_prompt(s: aiohttp.ClientSession, url: str, n: int, salt: int) -> float:
    ids = [(i * 37 + salt * 7919) % 40000 + 100 for i in range(n)]
    t0 = time.perf_counter()
    async with s.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0}) as r:
        assert r.status == 200, await r.text()
        await r.json()
    return time.perf_counter() - t0


async def measure(url: str, n_long: int, reps: int, n_idle: int, every_s: float) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await short_chat(s, url)  # warm-up
        await long_prompt(s, url, 600, salt=999)
        idle = [await short_chat(s, url) for _ in range(n_idle)]
        print(f"idle short chat TTFT: {[round(x * 1000) for x in idle]} ms", file=sys.stderr, flush=True)
        runs = []
        for rep in range(reps):
            steps0 = _metric(url, "edgelm_steps_total")
            alone = await long_prompt(s, url, n_long, salt=2 * rep)
            n_steps = _metric(url, "edgelm_steps_total") - steps0
            task = asyncio.ensure_future(long_prompt(s, url, n_long, salt=2 * rep + 1))
            ttfts = []
            await asyncio.sleep(every_s / 2)
            while not task.done():
                ttfts.append(await short_chat(s, url))
                if not task.done():
                    await asyncio.sleep(every_s)
            contended = await task
            run = {
                "long_alone_s": alone,
                "steps_alone": n_steps,
                "step_s": alone / max(n_steps, 1),
                "long_with_chats_s": contended,
                "chat_ttft_s": ttfts,
            }
            print(
                f"rep {rep}: long alone {alone:.1f} s ({n_steps:.0f} steps), with {len(ttfts)} chats "
                f"{contended:.1f} s; chat TTFT {[round(x * 1000) for x in ttfts]} ms",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run)
    return {"idle_ttft_s": idle, "runs": runs}


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    idle = statistics.median(res["idle_ttft_s"])
    step = statistics.median(r["step_s"] for r in res["runs"])
    ttfts = [t for r in res["runs"] for t in r["chat_ttft_s"]]
    alone = statistics.median(r["long_alone_s"] for r in res["runs"])
    contended = statistics.median(r["long_with_chats_s"] for r in res["runs"])
    bound = 2 * idle + step
    return {
        "idle_ttft_ms": idle * 1000,
        "step_ms": step * 1000,
        "bound_ms": bound * 1000,
        "chat_ttft_median_ms": statistics.median(ttfts) * 1000 if ttfts else None,
        "chat_ttft_max_ms": max(ttfts) * 1000 if ttfts else None,
        "n_chats": len(ttfts),
        "long_alone_s": alone,
        "long_with_chats_s": contended,
        "long_growth": contended / alone - 1,
        "ttft_goal_met": bool(ttfts) and max(ttfts) <= bound,
        "growth_goal_met": contended / alone - 1 <= 0.15,
    }


def chart(out: dict[str, Any], path: Path) -> None:
    """Two panels: the short chat's TTFT (idle, the goal, each chat behind the long
    prompt) and the long prompt's total time (alone, with chats), per repetition."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    sm, runs = out["summary"], out["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    ttfts = [t * 1000 for r in runs for t in r["chat_ttft_s"]]
    a.scatter(range(len(ttfts)), ttfts, label="behind the long prompt", color="tab:orange")
    a.axhline(sm["idle_ttft_ms"], label=f"idle (median) {sm['idle_ttft_ms']:.0f} ms", color="tab:blue")
    a.axhline(
        sm["bound_ms"], label=f"goal: 2 × idle + one step = {sm['bound_ms']:.0f} ms", color="tab:red", linestyle="--"
    )
    a.set_xlabel("short chat (in order sent)")
    a.set_ylabel("time to first token, ms")
    a.set_ylim(bottom=0)
    a.set_title("short chat: time to first token")
    a.legend(fontsize=8)
    x = list(range(len(runs)))
    b.bar([i - 0.2 for i in x], [r["long_alone_s"] for r in runs], 0.4, label="alone")
    b.bar(
        [i + 0.2 for i in x],
        [r["long_with_chats_s"] for r in runs],
        0.4,
        label=f"with a chat every {out['every_s']:g} s",
    )
    b.set_xticks(x, [f"rep {i + 1}" for i in x])
    b.set_ylabel("seconds")
    b.set_title(f"{out['long_tokens']:,}-token prompt: total time ({sm['long_growth'] * 100:+.1f}%; goal ≤ +15%)")
    b.legend(fontsize=8)
    fig.suptitle(f"{out['model']}, {out['threads']} thread(s), {out['machine']}, commit {out['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--long", type=int, default=8000, help="tokens of the long prompt")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=int, default=5, help="idle short chats")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between short chats behind the long prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "starvation")
    args = ap.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "daemon.log"
        argv = [
            sys.executable,
            "-m",
            "edgelm.cli",
            "serve",
            "--model",
            str(args.model),
            "--threads",
            str(args.threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-mdns",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_") or k == "EDGELM_MODELS_DIR"}
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
        try:
            t0 = time.monotonic()
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() - t0 > 120:
                    raise RuntimeError(f"the daemon did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
            res = asyncio.run(measure(url, args.long, args.reps, args.idle, args.every))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    summary = summarize(res)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    out = {
        "model": args.model.name,
        "long_tokens": args.long,
        "threads": args.threads,
        "every_s": args.every,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "summary": summary,
        **res,
    }
    md = (
        f"# A short chat behind a {args.long:,}-token prompt ({args.model.name}, {args.threads} threads, "
        f"commit {out['commit']})\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| short chat TTFT, idle (median of {args.idle}) | {summary['idle_ttft_ms']:.0f} ms |\n"
        f"| one step of the long prefill | {summary['step_ms']:.0f} ms |\n"
        f"| goal: 2 × idle + one step | {summary['bound_ms']:.0f} ms |\n"
        f"| short chat TTFT behind the long prompt, median / max of {summary['n_chats']} | "
        f"{summary['chat_ttft_median_ms']:.0f} / {summary['chat_ttft_max_ms']:.0f} ms |\n"
        f"| long prompt alone (median of {args.reps}) | {summary['long_alone_s']:.2f} s |\n"
        f"| long prompt with a chat every {args.every:g} s | {summary['long_with_chats_s']:.2f} s "
        f"({summary['long_growth'] * 100:+.1f}%; goal ≤ +15%) |\n"
    )
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    chart(out, args.out.with_suffix(".png"))
    return 0 if summary["ttft_goal_met"] and summary["growth_goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
