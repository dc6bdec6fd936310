#!/usr/bin/env python3
"""`edgelm serve` beside llama-server: the same closed-loop load, same model, same thread count, same run.

    .venv/bin/python benches/bench_serve.py [--clients 1,4,16] [--duration 20] [--threads 2] [--only edgelm|llama]

Starts each server in turn on a free loopback port (never both at once), waits for
GET /health, and measures:

1. Aggregate throughput with N concurrent clients: each client loops on streamed
   POST /v1/completions (max_tokens 128, temperature 0, ignore_eos, a distinct short
   prompt each time) for --duration seconds after a warm-up request. tok/s = all
   completion tokens / wall time (the last in-flight requests are let finish and
   their time counted). Also mean time to first token and mean per-token latency
   (time between the first and the last token / (tokens - 1)). Tokens are counted
   from the final chunk's `usage` (stream_options.include_usage), else by content chunk.
2. The home-automation pattern: a fixed ~3.4k-token system prompt (smart-home entity
   states, sized with the server's POST /tokenize) + a short user command, sent
   sequentially to streamed POST /v1/chat/completions (max_tokens 24): time to first
   token of the first request (cold) and the mean of the next four (warm: prefix cache).

Prints progress to stderr and a table to stdout, with the edgelm / llama-server ratios,
and writes benches/results/serve.json, serve.md and serve.png (--out, --name to change).

llama-server comes from $LLAMA_CPP_BIN (default ~/.cache/edgelm/llama-build/bin); it is
run with -np 16 -c 16384 and a unified KV cache (-kvu: without it, -np 16 splits the
16384 into 1024-token slots and the home prompt does not fit). edgelm comes from
$EDGELM_BIN (default .venv/bin/edgelm). The client (aiohttp) runs on the same machine,
so it takes a little of the CPU from both servers alike.
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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"
MODELS = Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", Path.home() / ".cache/edgelm/llama-build/bin"))
QUANT_DIR = Path(os.environ.get("EDGELM_QUANT_DIR", Path.home() / ".cache/edgelm/quant"))
EDGELM_BIN = Path(os.environ.get("EDGELM_BIN", ROOT / ".venv/bin/edgelm"))
DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_0.gguf"  # made by benches/make_quants.py
SERVERS = {"llama": "llama-server", "edgelm": "edgelm"}  # --only name -> display name; run in this order

HOME_COMMANDS = [
    "Turn on the kitchen ceiling light.",
    "Set the living room thermostat to 22 degrees.",
    "Is the front door locked?",
    "Close the bedroom blinds halfway.",
    "Play some jazz on the office speaker.",
]


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_argv(model: Path, threads: int, port: int) -> list[str]:
    exe = LLAMA_BIN / "llama-server"
    argv = [
        str(exe),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-np",
        "16",
        "-c",
        "16384",
        "-kvu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    try:
        help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        help_text = ""
    if "--no-webui" in help_text:
        argv.append("--no-webui")
    return argv


def edgelm_argv(model: Path, threads: int, port: int) -> list[str]:
    return [
        str(EDGELM_BIN),
        "serve",
        "--model",
        str(model),
        "--threads",
        str(threads),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


class Server:
    """One server subprocess in its own session; stop() is safe to call more than once."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        print(f"[{self.name}] {' '.join(self.argv)}", file=sys.stderr, flush=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2) as r:
                    if r.status == 200:
                        print(f"[{self.name}] healthy after {time.monotonic() - t0:.1f} s", file=sys.stderr)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name}: /health not 200 after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)  # its own session: the server and anything it spawned
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                print(f"[{self.name}] did not stop on {sig.name}", file=sys.stderr)


# ---------------------------------------------------------------- client

_SUBJECTS = [
    "an old lighthouse keeper",
    "a curious red fox",
    "a pair of rival bakers",
    "a retired astronaut",
    "a lost delivery drone",
    "the village librarian",
    "a stubborn mountain goat",
    "a young violinist",
    "a clockmaker's apprentice",
    "a sleepy harbour seal",
    "the night-shift nurse",
    "a travelling magician",
    "a robot gardener",
]
_EVENTS = [
    "finds a map",
    "hears a strange song",
    "loses a key",
    "meets a stranger",
    "builds a boat",
    "wins a contest",
    "opens a locked box",
    "follows a trail of lights",
    "receives a letter",
    "misses the last train",
    "plants a tree",
]
_PLACES = [
    "in a snowy town",
    "on a windy island",
    "under a bridge",
    "at the market",
    "in a quiet forest",
    "on the moon",
    "by the river",
    "in a crowded station",
    "at midnight",
    "during a storm",
]


def prompt_for(i: int) -> str:
    """A distinct short sentence for request i (the same sequence for both servers)."""
    s = _SUBJECTS[i % len(_SUBJECTS)]
    e = _EVENTS[(i * 7 + i // len(_SUBJECTS)) % len(_EVENTS)]
    p = _PLACES[(i * 3 + i // 5) % len(_PLACES)]
    return f"{s.capitalize()} {e} {p} (story {i}). Tell what happens next:"


async def stream_request(session: Any, url: str, payload: dict[str, Any], chat: bool) -> dict[str, Any]:
    """One streamed request; times to the first non-empty content chunk and to the last."""
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    async with session.post(url, json=payload) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ": ping" comments
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error in stream from {url}: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            if obj.get("timings"):
                timings = obj["timings"]
            for ch in obj.get("choices") or []:
                text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                if text:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    last = now
                    chunks += 1
    end = time.perf_counter()
    if first is None or last is None:
        raise RuntimeError(f"no content from {url}")
    n = usage.get("completion_tokens") if usage else None
    tokens = n if isinstance(n, int) and n > 0 else chunks
    return {
        "ttft": first - t0,
        "tpot": (last - first) / (tokens - 1) if tokens > 1 else None,
        "latency": end - t0,
        "tokens": tokens,
        "chunks": chunks,
        "usage_tokens": isinstance(n, int),
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "cached_tokens": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
        "timings": timings,
    }


def _session() -> Any:
    import aiohttp

    # One loopback connection per request, for both servers: llama-server closes the connection after a
    # streamed response although it answers "Keep-Alive", so a pooled connection fails on the next request.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
    )


def _completion_payload(kind: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "llama":
        body["cache_prompt"] = True
    return body


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


async def throughput_point(
    kind: str, base: str, clients: int, duration: float, max_tokens: int, label: str
) -> dict[str, Any]:
    url = f"{base}/v1/completions"
    async with _session() as session:
        await stream_request(
            session, url, _completion_payload(kind, "Once upon a time, in a small town,", max_tokens), chat=False
        )  # warm-up
        done: list[dict[str, Any]] = []
        errors: list[str] = []
        counter = 0
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def client() -> None:
            nonlocal counter
            failures = 0
            while time.perf_counter() < deadline:
                i, counter = counter, counter + 1
                try:
                    done.append(
                        await stream_request(
                            session, url, _completion_payload(kind, prompt_for(i), max_tokens), chat=False
                        )
                    )
                    failures = 0
                except Exception as e:  # noqa: BLE001 - recorded, and a run of them ends the client
                    errors.append(f"{type(e).__name__}: {e}")
                    failures += 1
                    if failures >= 5:
                        return
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    if not done:
        raise RuntimeError(f"{label}: no request completed at {clients} clients: {errors[:3]}")
    tokens = sum(r["tokens"] for r in done)
    ttft = sorted(r["ttft"] for r in done)
    tpot = [r["tpot"] for r in done if r["tpot"] is not None]
    return {
        "clients": clients,
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "requests": len(done),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttft_ms": 1e3 * statistics.mean(ttft),
        "ttft_p90_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "tpot_ms": 1e3 * m if (m := _mean(tpot)) is not None else None,
        "per_client_tok_s": statistics.mean(r["tokens"] / r["latency"] for r in done),
        "tokens_from_usage": all(r["usage_tokens"] for r in done),
    }


# ---------------------------------------------------------------- home-automation pattern

_ROOMS = [
    "kitchen",
    "living_room",
    "bedroom",
    "bathroom",
    "hallway",
    "office",
    "garage",
    "garden",
    "guest_room",
    "laundry",
    "nursery",
    "basement",
    "attic",
    "porch",
    "dining_room",
    "study",
]
_FIXTURES = ["ceiling", "lamp", "strip", "spot", "pendant", "wall"]


def _entity_line(i: int) -> str:
    room = _ROOMS[i % len(_ROOMS)]
    k = i // len(_ROOMS)
    v = (i * 37 + 11) % 100
    suffix = "" if k < 9 else f"_{k // 9 + 1}"
    on = "on" if (i * 7) % 3 else "off"
    match k % 9:
        case 0:
            return f"light.{room}_{_FIXTURES[i % len(_FIXTURES)]}{suffix}: {on}, brightness {v}%"
        case 1:
            return f"sensor.{room}_temperature{suffix}: {18 + v / 10:.1f} °C"
        case 2:
            return f"binary_sensor.{room}_motion{suffix}: {'detected' if on == 'on' else 'clear'}"
        case 3:
            return f"cover.{room}_blinds{suffix}: {'open' if v > 30 else 'closed'}, position {v}%"
        case 4:
            return f"climate.{room}_thermostat{suffix}: heat, target {19 + v % 5} °C, current {18 + v / 20:.1f} °C"
        case 5:
            return f"switch.{room}_fan{suffix}: {on}"
        case 6:
            return f"sensor.{room}_humidity{suffix}: {30 + v // 2}%"
        case 7:
            return f"media_player.{room}_speaker{suffix}: {'playing' if on == 'on' else 'idle'}, volume {v}%"
        case _:
            return f"lock.{room}_door{suffix}: {'locked' if on == 'on' else 'unlocked'}"


def home_system_prompt(n_lines: int) -> str:
    head = (
        "You are the voice assistant of a smart home. Answer in one short sentence, and when the user "
        "asks to change a device, name the service call, e.g. light.turn_on(light.kitchen_ceiling).\n"
        "Current state of every entity in the home:\n"
    )
    return head + "\n".join(f"- {_entity_line(i)}" for i in range(n_lines)) + "\nEnd of entity list."


def tokenize(base: str, text: str) -> int:
    req = urllib.request.Request(
        f"{base}/tokenize", data=json.dumps({"content": text}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return len(json.loads(r.read())["tokens"])


def size_home_prompt(base: str, target: int) -> tuple[str, int]:
    """The longest entity list whose system prompt is at most `target` tokens (the server's tokenizer)."""
    lo, hi = 1, 64
    while tokenize(base, home_system_prompt(hi)) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokenize(base, home_system_prompt(mid)) <= target:
            lo = mid
        else:
            hi = mid
    text = home_system_prompt(lo)
    return text, tokenize(base, text)


async def home_pattern(kind: str, base: str, system: str, max_tokens: int) -> dict[str, Any]:
    url = f"{base}/v1/chat/completions"
    runs = []
    async with _session() as session:
        for cmd in HOME_COMMANDS:
            body: dict[str, Any] = {
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": cmd}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if kind == "llama":
                body["cache_prompt"] = True
            runs.append(await stream_request(session, url, body, chat=True))
    return {
        "cold_ttft_ms": 1e3 * runs[0]["ttft"],
        "warm_ttft_ms": 1e3 * statistics.mean(r["ttft"] for r in runs[1:]),
        "warm_ttft_each_ms": [1e3 * r["ttft"] for r in runs[1:]],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "cold_prefill_tok_s": runs[0]["prompt_tokens"] / runs[0]["ttft"] if runs[0]["prompt_tokens"] else None,
        "cached_tokens": [r["cached_tokens"] for r in runs],
        "server_timings": [r["timings"] for r in runs],
    }


# ---------------------------------------------------------------- driver


def light_client_tok_s(port: int, prompts: list[str], max_tokens: int) -> float:
    """Generated tokens/s of streamed requests sent one after another by a minimal
    client (a raw socket that only looks for the end of the stream), so the client
    takes next to no CPU from the server's cores. The first request warms up."""
    toks, t0 = 0, 0.0
    for i, p in enumerate(prompts):
        body = json.dumps(
            {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            if i == 1:
                toks, t0 = 0, time.perf_counter()
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            buf = b""
            while b"data: [DONE]" not in buf[-64:]:
                d = s.recv(1 << 16)
                if not d:
                    break
                buf += d
        toks += max_tokens
    return toks / (time.perf_counter() - t0)


def bench_server(
    kind: str, model: Path, args: argparse.Namespace, log_dir: Path, home: dict[str, Any]
) -> dict[str, Any]:
    name = SERVERS[kind]
    port = _free_port()
    argv = (llama_argv if kind == "llama" else edgelm_argv)(model, args.threads, port)
    srv = Server(name, argv, port, log_dir)
    res: dict[str, Any] = {"argv": argv, "throughput": [], "home": None}
    try:
        srv.start()
        for c in args.clients:
            print(f"[{name}] {c} client(s), {args.duration:g} s ...", file=sys.stderr, flush=True)
            pt = asyncio.run(throughput_point(kind, srv.base, c, args.duration, args.max_tokens, name))
            res["throughput"].append(pt)
            print(
                f"[{name}] clients {c:>3}: {pt['tok_s']:8.1f} tok/s   TTFT {pt['ttft_ms']:7.1f} ms   "
                f"{_fmt(pt['tpot_ms'], '.2f')} ms/token   {pt['requests']} requests, {pt['errors']} errors"
                f"{'' if pt['tokens_from_usage'] else '  (tokens counted by chunk)'}",
                file=sys.stderr,
                flush=True,
            )
        if kind == "edgelm" and 1 in args.clients:
            prompts = [prompt_for(i) for i in range(6)]
            res["light_client_tok_s"] = light_client_tok_s(port, prompts, args.max_tokens)
            print(f"[{name}] 1 light client: {res['light_client_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        if not args.skip_home:
            if "system" not in home:  # built once with the first server's tokenizer, sent unchanged to both
                home["system"], _ = size_home_prompt(srv.base, args.home_tokens)
            n_tok = tokenize(srv.base, home["system"])
            print(f"[{name}] home pattern: {n_tok}-token system prompt ...", file=sys.stderr, flush=True)
            h = asyncio.run(home_pattern(kind, srv.base, home["system"], args.home_max_tokens))
            h["system_tokens"] = n_tok
            res["home"] = h
            print(
                f"[{name}] home: cold TTFT {h['cold_ttft_ms']:.0f} ms, warm TTFT {h['warm_ttft_ms']:.1f} ms "
                f"(prompt {h['prompt_tokens']} tokens, cached {h['cached_tokens']})",
                file=sys.stderr,
                flush=True,
            )
    except Exception as e:  # noqa: BLE001 - recorded; the other server still runs
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"[{name}] FAILED: {res['error']}\n--- log tail ---\n{srv.log_tail()}", file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return res


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


_BARE = r"""
import json, sys, time
import edgelm._native as n
model, threads, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
m = n.Model(model, n_threads=threads)
ex = n.Executor(m, 512)
table = list(range(512))
greedy = n.SamplingParams(temperature=0.0)
toks, t0 = 0, None
for i, p in enumerate(prompts):
    ids = m.tokenize(p, True, True)
    new = [n.NewSequence(i, ids, greedy, max_tokens, ignore_eos=True)]
    if i == 1:
        toks, t0 = 0, time.perf_counter()  # the first request warms up
    start, end = 0, len(ids)
    for _ in range(max_tokens):
        ex.step(n.StepPlan(new, [n.StepItem(i, start, end, table, True)]))
        new = []
        start, end = end, end + 1
        toks += 1
print(json.dumps({"tok_s": toks / (time.perf_counter() - t0), "requests": len(prompts) - 1}))
"""


def bare_engine(model: Path, threads: int, max_tokens: int, n_requests: int = 6) -> dict[str, Any]:
    """The engine alone, in-process, on the 1-client workload: the same batch-invariant
    executor the daemon steps, prompt then greedy tokens, requests back to back — no
    HTTP, no scheduler, no event loop. The 1-client server figure against this one is
    the cost of the serving layer."""
    prompts = [prompt_for(i) for i in range(n_requests)]
    r = subprocess.run(
        [sys.executable, "-c", _BARE, str(model), str(threads), str(max_tokens), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    print(
        f"[bare engine] {out['tok_s']:.1f} tok/s ({out['requests']} requests of {max_tokens} tokens)", file=sys.stderr
    )
    return out


def tables(saved: dict[str, Any]) -> str:
    servers = saved["servers"]
    e, p = servers.get("edgelm") or {}, servers.get("llama-server") or {}
    et = {r["clients"]: r for r in e.get("throughput", [])}
    pt = {r["clients"]: r for r in p.get("throughput", [])}
    lines = [
        "| clients | edgelm tok/s | llama-server tok/s | ratio | edgelm TTFT ms | llama-server TTFT ms | ratio "
        "| edgelm ms/token | llama-server ms/token | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in saved["meta"]["clients"]:
        a, b = et.get(c, {}), pt.get(c, {})
        cells = []
        for key, spec in (("tok_s", ".1f"), ("ttft_ms", ".1f"), ("tpot_ms", ".2f")):
            cells += [_fmt(a.get(key), spec), _fmt(b.get(key), spec), _ratio(a.get(key), b.get(key))]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    eh, ph = e.get("home") or {}, p.get("home") or {}
    if eh or ph:
        hl = [
            "",
            "Home-automation pattern (system prompt + short command, chat, max_tokens "
            f"{saved['meta']['home_max_tokens']}, sequential):",
            "",
            "| measure | edgelm | llama-server | ratio |",
            "|---|---|---|---|",
        ]
        for key, label, spec in (
            ("system_tokens", "system prompt tokens (/tokenize)", "d"),
            ("prompt_tokens", "prompt tokens (usage)", "d"),
            ("cold_ttft_ms", "cold TTFT ms (1st request)", ".0f"),
            ("warm_ttft_ms", "warm TTFT ms (mean of next 4)", ".1f"),
            ("cold_prefill_tok_s", "cold prefill tok/s", ".0f"),
        ):
            a, b = eh.get(key), ph.get(key)
            hl.append(
                f"| {label} | {_fmt(a, spec)} | {_fmt(b, spec)} | "
                f"{_ratio(a, b) if key.endswith(('_ms', '_s')) else ''} |"
            )
        out += "\n" + "\n".join(hl)
    bare = saved.get("bare_engine") or {}
    e1, light = et.get(1, {}).get("tok_s"), e.get("light_client_tok_s")
    if bare.get("tok_s") and light:
        out += (
            "\n\nServing-layer cost at 1 client (same prompts, 128 tokens each, requests back to back): "
            f"bare engine (in-process executor) {bare['tok_s']:.1f} tok/s; `edgelm serve` over HTTP with a "
            f"minimal raw-socket client {light:.1f} tok/s ({(1 - light / bare['tok_s']) * 100:+.1f}% slower)"
            + (
                f", with the aiohttp load generator above {e1:.1f} tok/s ({(1 - e1 / bare['tok_s']) * 100:+.1f}%: "
                "that client shares the machine's two cores)."
                if e1
                else "."
            )
        )
    errs = [f"- {n}: {r['error']}" for n, r in servers.items() if r and r.get("error")]
    if errs:
        out += "\n\nFailures:\n" + "\n".join(errs)
    return out


def summary(saved: dict[str, Any]) -> str:
    e, p = saved["servers"].get("edgelm") or {}, saved["servers"].get("llama-server") or {}
    if not e.get("throughput") or not p.get("throughput"):
        return "edgelm/llama-server ratios: n/a (only one server measured)"
    pt = {r["clients"]: r for r in p["throughput"]}
    parts = [
        f"{r['clients']} client(s) {_ratio(r['tok_s'], pt.get(r['clients'], {}).get('tok_s'))}" for r in e["throughput"]
    ]
    s = "edgelm/llama-server aggregate tok/s (higher is better for edgelm): " + ", ".join(parts)
    if e.get("home") and p.get("home"):
        s += (
            "\nedgelm/llama-server home TTFT (lower is better for edgelm): cold "
            f"{_ratio(e['home']['cold_ttft_ms'], p['home']['cold_ttft_ms'])}, warm "
            f"{_ratio(e['home']['warm_ttft_ms'], p['home']['warm_ttft_ms'])}"
        )
    return s


def _chart(saved: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    servers = [(n, saved["servers"].get(n) or {}) for n in ("edgelm", "llama-server")]
    clients = saved["meta"]["clients"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = list(range(len(clients)))
    for ax, key, title in ((axes[0], "tok_s", "aggregate tokens/s"), (axes[1], "tpot_ms", "mean ms per token")):
        for j, (n, r) in enumerate(servers):
            by = {t["clients"]: t for t in r.get("throughput", [])}
            ax.bar([i + (j - 0.5) * 0.4 for i in x], [by.get(c, {}).get(key) or 0 for c in clients], 0.4, label=n)
        ax.set_xticks(x, [f"{c} client{'s' if c > 1 else ''}" for c in clients])
        ax.set_title(f"{title} (max_tokens {saved['meta']['max_tokens']})")
        ax.legend()
    ax = axes[2]
    for j, (n, r) in enumerate(servers):
        h = r.get("home") or {}
        ax.bar(
            [i + (j - 0.5) * 0.4 for i in (0, 1)],
            [h.get("cold_ttft_ms") or 0, h.get("warm_ttft_ms") or 0],
            0.4,
            label=n,
        )
    ax.set_xticks([0, 1], ["cold", "warm (prefix cached)"])
    if any((r.get("home") or {}).get("cold_ttft_ms") for _, r in servers):
        ax.set_yscale("log")
    ax.set_title(f"home pattern: time to first token, ms (~{saved['meta']['home_tokens']}-token system prompt)")
    ax.title.set_fontsize(9)
    ax.legend()
    m = saved["meta"]
    fig.suptitle(f"{m['model']}, {m['threads']} thread(s), {m['duration_s']:g} s per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _llama_version() -> str | None:
    try:
        r = subprocess.run([str(LLAMA_BIN / "llama-server"), "--version"], capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _resolve_model(name: str) -> Path:
    for p in (Path(name), QUANT_DIR / name, MODELS / name):
        if p.exists():
            return p
    raise SystemExit(f"model not found: {name} (looked in ., {QUANT_DIR}, {MODELS}; run benches/make_quants.py)")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path, or a name in the quant or models dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--home-tokens", type=int, default=3400, help="target system prompt size, tokens")
    ap.add_argument("--home-max-tokens", type=int, default=24)
    ap.add_argument("--skip-home", action="store_true", help="throughput only")
    ap.add_argument("--only", choices=sorted(SERVERS), help="measure one server")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--name", default="serve", help="results file stem")
    ap.add_argument("--chart-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args()
    if args.chart_only:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        _chart(saved, args.out / f"{args.name}.png")
        return 0
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    model = _resolve_model(args.model)
    kinds = [args.only] if args.only else list(SERVERS)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "model": model.name,
        "threads": args.threads,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "home_tokens": args.home_tokens,
        "home_max_tokens": args.home_max_tokens,
        "home_commands": HOME_COMMANDS,
        "llama_server_version": _llama_version(),
    }
    signal.signal(signal.SIGTERM, _sigterm)
    servers: dict[str, Any] = {}
    home: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as logs:
        for kind in kinds:
            servers[SERVERS[kind]] = bench_server(kind, model, args, Path(logs), home)
    saved: dict[str, Any] = {"meta": meta, "servers": servers}
    if "edgelm" in kinds and 1 in args.clients:
        saved["bare_engine"] = bare_engine(model, args.threads, args.max_tokens)
    table = tables(saved)
    print(table)
    print()
    print(summary(saved))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(saved, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(
        f"# Serving: edgelm serve vs llama-server ({meta['date']}, {meta['cpu']})\n\n"
        f"{model.name}, {args.threads} thread(s) per server, one server at a time. Closed loop: each client sends "
        f"streamed /v1/completions (max_tokens {args.max_tokens}, temperature 0, ignore_eos, distinct prompts) "
        f"back to back for {args.duration:g} s; tok/s = completion tokens / wall time. TTFT = time to the first "
        f"content chunk; ms/token = (last - first token time) / (tokens - 1), mean over requests. "
        f"llama-server: `{' '.join(Path(a).name if i == 0 else a for i, a in enumerate((servers.get('llama-server') or {}).get('argv', ['llama-server'])))}`."
        f"\n\n{table}\n\n{summary(saved)}\n"
    )
    _chart(saved, args.out / f"{args.name}.png")
    return 1 if any(r.get("error") for r in servers.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
