"""Home Assistant's turn pattern: time to first token per turn, edgelm beside
llama-server with and without `--cache-reuse`.

Each turn sends HA's prompt (tests/python/ha_util.py: time line to the second, the
instructions, N exposed entities, the Assist tools written into the system message)
with a new time, the conversation so far (the commands, the answers, a tool call's
result) and a new short command — through /v1/chat/completions, `max_tokens` 1,
temperature 0, so the request's latency is its time to first token. Per turn:

  - edgelm, prompt reuse on (its default): the turn as HA sends it;
  - edgelm, ideal (sent after it): the same turn with the time of the previous turn's 'full' request
    (computed exactly, so the prefix cache holds everything but the new messages): what
    computing only the new tokens costs;
  - edgelm, full: the same turn with yet another time and reuse off (a full recompute
    past the time line, what every turn cost before);
  - llama-server (one slot), `--cache-reuse 256` and without: the turn as HA sends it.

Writes benches/results/ha_turns.{md,json}. 2 threads each; the servers run one at a time.

    python benches/bench_ha_turns.py [--models a.gguf,b.gguf] [--turns 5] [--entities 50,15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
sys.path.insert(0, str(ROOT / "benches"))

import ha_util  # noqa: E402
from bench_serve import EDGELM_BIN, LLAMA_BIN, Server, _free_port  # noqa: E402

COMMANDS = [
    "Turn on the kitchen light",
    "Is the door lock locked?",
    "Set the living room light to 40 percent",
    "Turn off the office plug",
    "What is the temperature in the bedroom?",
    "Open the garage blind",
]


def system(t: str, n_ent: int) -> str:
    tools = json.dumps([t["function"] for t in ha_util.TOOLS])
    return ha_util.system_prompt(t, n_entities=n_ent) + "\nTools you can call (answer with a JSON call):\n" + tools


def clock(turn: int, variant: int) -> str:
    s = 7 + turn * 23 + variant * 11
    return f"10:{36 + s // 60:02d}:{s % 60:02d}"


def messages(turn: int, t: str, n_ent: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system(t, n_ent)}]
    for k in range(turn):
        msgs.append({"role": "user", "content": COMMANDS[k % len(COMMANDS)]})
        if k % 2 == 0:  # a tool call and its result, as HA sends them back
            call = {"name": "HassTurnOn", "arguments": {"name": "Kitchen Light"}}
            msgs.append({"role": "assistant", "content": json.dumps(call)})
            msgs.append(
                {"role": "user", "content": "Tool result: " + ha_util.tool_result("HassTurnOn", call["arguments"])}
            )
        msgs.append({"role": "assistant", "content": "Done."})
    msgs.append({"role": "user", "content": COMMANDS[turn % len(COMMANDS)]})
    return msgs


def ask(base: str, model: str, msgs: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> tuple[float, int]:
    body = {"model": model, "messages": msgs, "max_tokens": 1, "temperature": 0, **(extra or {})}
    req = urllib.request.Request(
        f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t0, int(out.get("usage", {}).get("prompt_tokens", 0))


def run_edgelm(model: Path, turns: int, n_ent: int, log: Path) -> list[dict[str, Any]]:
    port = _free_port()
    argv = [str(EDGELM_BIN), "serve", "--model", str(model), "--threads", "2", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--no-mdns"]
    srv = Server("edgelm", argv, port, log)
    srv.start()
    rows = []
    try:
        for turn in range(turns):
            row: dict[str, Any] = {"turn": turn}
            # The turn as HA sends it first: its sources are the previous turn's requests.
            row["reuse_s"], row["prompt_tokens"] = ask(srv.base, model.stem, messages(turn, clock(turn, 0), n_ent))
            if turn > 0:
                row["ideal_s"], _ = ask(
                    srv.base, model.stem, messages(turn, clock(turn - 1, 1), n_ent), {"prompt_reuse": False}
                )
            row["full_s"], _ = ask(srv.base, model.stem, messages(turn, clock(turn, 1), n_ent), {"prompt_reuse": False})
            rows.append(row)
            print(f"[edgelm] {model.name} turn {turn}: {row}", file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return rows


def run_llama(model: Path, turns: int, n_ent: int, log: Path, reuse: bool) -> list[dict[str, Any]]:
    port = _free_port()
    argv = [str(LLAMA_BIN / "llama-server"), "-m", str(model), "-t", "2", "-np", "1", "-c", "8192"]
    argv += ["--host", "127.0.0.1", "--port", str(port)] + (["--cache-reuse", "256"] if reuse else [])
    name = "llama-reuse" if reuse else "llama"
    srv = Server(name, argv, port, log)
    srv.start()
    rows = []
    try:
        for turn in range(turns):
            s, n = ask(srv.base, model.stem, messages(turn, clock(turn, 0), n_ent))
            rows.append({"turn": turn, "ttft_s": s, "prompt_tokens": n})
            print(f"[{name}] {model.name} turn {turn}: {s:.2f}s ({n} tokens)", file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    home = Path.home() / ".cache" / "edgelm"
    ap.add_argument(
        "--models",
        default=f"{home / 'models' / 'SmolLM2-135M-Instruct.Q4_1.gguf'},{home / 'bench-cpu' / 'llama-3.2-1b.Q4_K_M.gguf'}",
    )
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument(
        "--entities",
        default="50,15",
        help="exposed entities per model (the synthetic 1B vocabulary spends ~3x SmolLM2's tokens on the same text)",
    )
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "ha_turns"))
    ap.add_argument(
        "--llama-from",
        help="take llama-server's rows from an earlier run's JSON (edgelm changed, llama-server did not)",
    )
    a = ap.parse_args()
    earlier = json.loads(Path(a.llama_from).read_text()) if a.llama_from else {"models": {}}
    saved: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    log = Path(tempfile.mkdtemp(prefix="ha-turns-"))
    for m, n_ent in zip(a.models.split(","), [int(x) for x in a.entities.split(",")]):
        path = Path(m)
        e = run_edgelm(path, a.turns, n_ent, log)
        old = earlier["models"].get(path.name)
        if old is not None and old.get("entities") == n_ent:
            saved["llama_when"] = earlier["when"]
            lr, ln = old["llama_cache_reuse"], old["llama"]
        else:
            lr, ln = run_llama(path, a.turns, n_ent, log, True), run_llama(path, a.turns, n_ent, log, False)
        saved["models"][path.name] = {"entities": n_ent, "edgelm": e, "llama_cache_reuse": lr, "llama": ln}
    Path(a.out + ".json").write_text(json.dumps(saved, indent=1))
    lines = [
        "# Home Assistant's turns: time to first token (s)",
        "",
        f"Made by benches/bench_ha_turns.py ({saved['when']}), 2 threads, {a.entities} exposed entities (per model), the Assist "
        "tools in the system message; each turn has a new time line and the conversation so far (commands, a tool "
        "call and its result, answers). 'ideal' = the same turn with the time of the previous turn's 'full' request "
        "(only the new messages are computed); 'full' = reuse off with a new time (everything past the time line "
        "computed)."
        + (
            f" llama-server's columns come from the run of {saved['llama_when']} (llama-server has not changed since)."
            if "llama_when" in saved
            else ""
        ),
        "",
        "| model | turn | prompt tokens | edgelm reuse | edgelm ideal | edgelm full | reuse / ideal | reuse / full "
        "| llama-server --cache-reuse 256 | llama-server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in saved["models"].items():
        for e, lr, ln in zip(d["edgelm"], d["llama_cache_reuse"], d["llama"]):
            ideal = e.get("ideal_s")
            ideal_s = "" if ideal is None else f"{ideal:.2f}"
            vs_ideal = "" if ideal is None else f"{e['reuse_s'] / ideal:.2f}×"
            lines.append(
                f"| {name} | {e['turn'] + 1} | {e['prompt_tokens']} | {e['reuse_s']:.2f} | "
                f"{ideal_s} | {e['full_s']:.2f} | {vs_ideal} | {e['reuse_s'] / e['full_s']:.1%} | "
                f"{lr['ttft_s']:.2f} | {ln['ttft_s']:.2f} |"
            )
        later = d["edgelm"][1:]
        if later:
            lines.append(
                f"| {name} | turns 2+ median | | {statistics.median(x['reuse_s'] for x in later):.2f} | "
                f"{statistics.median(x['ideal_s'] for x in later):.2f} | "
                f"{statistics.median(x['full_s'] for x in later):.2f} | "
                f"{statistics.median(x['reuse_s'] / x['ideal_s'] for x in later):.2f}× | "
                f"{statistics.median(x['reuse_s'] / x['full_s'] for x in later):.1%} | "
                f"{statistics.median(x['ttft_s'] for x in d['llama_cache_reuse'][1:]):.2f} | "
                f"{statistics.median(x['ttft_s'] for x in d['llama'][1:]):.2f} |"
            )
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
