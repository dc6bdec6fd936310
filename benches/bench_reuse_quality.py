"""What prompt reuse past an early change costs in quality (edgelm.engine.reuse).

Home Assistant's turn pattern on real models: a previous turn (time t0, a command,
its greedy answer) leaves its KV cached; the next turn has a new time line, and either
a new single command or the conversation so far plus a new command (multi-turn). For
each, against a full recompute of the same prompt:
  - the KL divergence of the first answer token's distribution (whole vocabulary),
  - whether the first token and the greedy answer (32 tokens) are the same,
  - whether a tool call in the answer (name and arguments) is the same;
and the same for the exact alternative, the time line moved to the end of the system
message (edgelm.prompt.volatile), against the original prompt's full recompute.

Runs in-process (the scheduler and the CPU executor the daemon uses), 2 threads.
Writes benches/results/reuse_quality.{md,json}.

    python benches/bench_reuse_quality.py [--trials 4] [--entities 25,50,100]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import ha_util  # noqa: E402

from edgelm._native import Executor, Model, SamplingParams  # noqa: E402
from edgelm.engine.reuse import ReuseConfig  # noqa: E402
from edgelm.engine.scheduler import Scheduler, SchedulerLimits, Sequence  # noqa: E402
from edgelm.modelinfo import read_metadata  # noqa: E402
from edgelm.prompt.chat import ChatTemplate  # noqa: E402
from edgelm.prompt.volatile import move_time_line  # noqa: E402
from edgelm.server import tools  # noqa: E402

MODELS = Path.home() / ".cache" / "edgelm" / "models"
COMMANDS = [
    "Turn on the kitchen light",
    "Is the door lock locked?",
    "Set the living room light to 40 percent",
    "Turn off the office plug",
    "What is the temperature in the bedroom?",
    "Open the garage blind",
]


class Runner:
    def __init__(self, path: Path) -> None:
        self.model = Model(path, 2)
        md = read_metadata(path)
        self.tmpl = ChatTemplate.for_model(md.get("tokenizer.chat_template"), self.model.architecture)
        self.ex = Executor(self.model, 2048)
        self.eog = [t for t in range(self.model.n_vocab) if self.model.is_eog(t)]

    def tokens(self, messages: list[dict[str, Any]], rewrite: bool = False) -> list[int]:
        """The prompt as the daemon renders it (the tool prompt in the system message;
        `rewrite`: then the time line moved to its end, as `move_time_line` does)."""
        plan = tools.parse_tools(ha_util.TOOLS, None, None)
        msgs, tools_arg = tools.prompt_messages(messages, plan, self.tmpl.renders_tools)
        if rewrite:
            msgs = move_time_line(msgs)
        text = self.tmpl.render(msgs, add_generation_prompt=True, tools=tools_arg)
        ids = self.model.tokenize(text, True, True)
        if len(ids) >= 2 and ids[0] == ids[1]:
            ids = ids[1:]
        return ids

    def run(self, s: Scheduler, ids: list[int], n: int, reuse: bool, full_dist: bool = False) -> tuple[Sequence, Any]:
        sp = SamplingParams(temperature=0.0, n_logprobs=self.model.n_vocab if full_dist else 0)
        q = Sequence(ids, n, sampling=sp, reuse=reuse)
        s.add(q)
        first = None
        while s.has_work():
            plan = s.schedule()
            for o in s.update(plan, self.ex.step(plan)):
                if o.seq is q and o.token is not None and first is None:
                    first = o
        return q, first

    def text(self, q: Sequence) -> str:
        return self.model.detokenize(q.tokens[len(q.prompt) :], False)


def kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) from log-probabilities over the whole vocabulary."""
    return sum(math.exp(lp) * (lp - q[t]) for t, lp in p.items() if lp > -30)


def tool_call(text: str) -> str | None:
    m = re.search(r"(Hass\w+|GetLiveContext)[^\n]*", text)
    return m.group(0).strip() if m else None


def trial(r: Runner, n_ent: int, k: int, multi: bool) -> dict[str, Any]:
    s = Scheduler(r.ex, SchedulerLimits(max_context=16384, max_step_tokens=512), r.eog, reuse=ReuseConfig())
    t0, t1 = f"10:{30 + k:02d}:{(17 * k) % 60:02d}", f"10:{31 + k:02d}:{(17 * k + 29) % 60:02d}"
    c0, c1 = COMMANDS[k % len(COMMANDS)], COMMANDS[(k + 1) % len(COMMANDS)]

    def conv(time_s: str, rewrite: bool, answer: str | None) -> list[dict[str, Any]]:
        sys_msg = {"role": "system", "content": ha_util.system_prompt(time_s, n_entities=n_ent, seed=0)}
        msgs = [sys_msg, {"role": "user", "content": c0}]
        if answer is not None:
            msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": c1}]
        return msgs

    out: dict[str, Any] = {"entities": n_ent, "trial": k, "multi_turn": multi}
    for label, rewrite in (("original", False), ("rewrite", True)):
        prev_ids = r.tokens(conv(t0, rewrite, None), rewrite)
        prev, _ = r.run(s, prev_ids, 24, reuse=not rewrite)  # the rewrite is the exact alternative
        answer = r.text(prev)
        if multi:
            ids = r.tokens(conv(t1, rewrite, answer), rewrite)
        else:
            m = conv(t1, rewrite, None)
            m[-1] = {"role": "user", "content": c1}
            ids = r.tokens(m, rewrite)
        out[f"{label}_prompt_tokens"] = len(ids)
        if label == "original":
            t = time.perf_counter()
            qr, fr = r.run(s, ids, 1, reuse=True, full_dist=True)
            out["reuse_first_s"] = time.perf_counter() - t
            out["reused_tokens"] = qr.n_reused_prompt
            out["cached_tokens"] = qr.n_cached_prompt
            qr2, _ = r.run(s, ids, 32, reuse=True)
            t = time.perf_counter()
            qf, ff = r.run(s, ids, 1, reuse=False, full_dist=True)
            out["full_first_s"] = time.perf_counter() - t
            qf2, _ = r.run(s, ids, 32, reuse=False)
            p_full = dict(ff.top)
            out["kl_reuse"] = kl(p_full, dict(fr.top))
            out["same_first_reuse"] = fr.token == ff.token
            out["text_full"], out["text_reuse"] = r.text(qf2), r.text(qr2)
            out["same_answer_reuse"] = out["text_full"] == out["text_reuse"]
            out["tool_full"], out["tool_reuse"] = tool_call(out["text_full"]), tool_call(out["text_reuse"])
            out["same_tool_reuse"] = out["tool_full"] == out["tool_reuse"]
            out["_p_full"] = p_full
            out["_first_full"] = ff.token
        else:
            t = time.perf_counter()
            qw, fw = r.run(s, ids, 1, reuse=False, full_dist=True)
            out["rewrite_first_s"] = time.perf_counter() - t
            out["rewrite_cached_tokens"] = qw.n_cached_prompt
            qw2, _ = r.run(s, ids, 32, reuse=False)
            out["kl_rewrite"] = kl(out.pop("_p_full"), dict(fw.top))
            out["same_first_rewrite"] = fw.token == out.pop("_first_full")
            out["text_rewrite"] = r.text(qw2)
            out["same_answer_rewrite"] = out["text_rewrite"] == out["text_full"]
            out["tool_rewrite"] = tool_call(out["text_rewrite"])
            out["same_tool_rewrite"] = out["tool_rewrite"] == out["tool_full"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--entities", default="25,50,100")
    ap.add_argument("--models", default="SmolLM2-135M-Instruct.Q4_1.gguf,gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "reuse_quality"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    a = ap.parse_args()
    if a.report_only:
        report(json.loads(Path(a.out + ".json").read_text()), a.out)
        return
    rows: list[dict[str, Any]] = []
    for name in a.models.split(","):
        r = Runner(MODELS / name)
        for n_ent in [int(x) for x in a.entities.split(",")]:
            for k in range(a.trials):
                row = trial(r, n_ent, k, multi=k % 2 == 1)
                row["model"] = name
                rows.append(row)
                print(
                    f"{name} ent={n_ent} k={k} multi={row['multi_turn']} n={row['original_prompt_tokens']} "
                    f"reused={row['reused_tokens']} KL reuse={row['kl_reuse']:.4f} rewrite={row['kl_rewrite']:.4f} "
                    f"same answer reuse={row['same_answer_reuse']} rewrite={row['same_answer_rewrite']} "
                    f"first {row['reuse_first_s']:.2f}s vs full {row['full_first_s']:.2f}s",
                    flush=True,
                )
    Path(a.out + ".json").write_text(json.dumps(rows, indent=1))
    report(rows, a.out)


def report(rows: list[dict[str, Any]], out: str) -> None:
    lines = [
        "# Prompt reuse past a changed time line: quality against a full recompute",
        "",
        f"Made by benches/bench_reuse_quality.py ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Home "
        "Assistant's prompt (tests/python/ha_util.py: time line, instructions, N exposed entities; the Assist tools "
        "as the daemon writes them into the system message) rendered by each model's chat template (Gemma 3 270M "
        "is the base model: the daemon's fallback turn format); the previous turn (another time, another command, "
        "its greedy answer) is cached; odd trials are multi-turn (the previous exchange plus a new command). "
        "KL = KL(full recompute ‖ variant) of the first answer token's distribution over the whole vocabulary; "
        "answers are 32 greedy tokens; a tool call is the first Hass*/GetLiveContext mention in the answer "
        "('calls' = trials whose full recompute called a tool). 'rewrite' = the time line moved to the end of the "
        "system message (`move_time_line`, exact prefix cache), compared with the original prompt's full "
        "recompute. Times: the first token, in-process, 2 threads.",
        "",
        "| model | entities | prompt tokens | reused | KL reuse (mean / max) | KL rewrite (mean / max) | "
        "same first token reuse / rewrite | same answer reuse / rewrite | calls | same tool call reuse / rewrite | "
        "first token s: reuse / full / rewrite |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(x["model"] for x in rows))
    for name in models:
        for n_ent in sorted({x["entities"] for x in rows if x["model"] == name}):
            g = [x for x in rows if x["model"] == name and x["entities"] == n_ent]

            def frac(key: str, g: list[dict[str, Any]] = g) -> str:
                return f"{sum(bool(x[key]) for x in g)}/{len(g)}"

            def stat(key: str, g: list[dict[str, Any]] = g) -> str:
                v = [x[key] for x in g]
                return f"{sum(v) / len(v):.4f} / {max(v):.4f}"

            def mean(key: str, g: list[dict[str, Any]] = g) -> float:
                return sum(x[key] for x in g) / len(g)

            calls = [x for x in g if x["tool_full"]]
            same_calls = (
                f"{sum(x['same_tool_reuse'] for x in calls)}/{len(calls)} / "
                f"{sum(x['same_tool_rewrite'] for x in calls)}/{len(calls)}"
                if calls
                else "–"
            )
            lines.append(
                f"| {name} | {n_ent} | {mean('original_prompt_tokens'):.0f} | {mean('reused_tokens'):.0f} | "
                f"{stat('kl_reuse')} | {stat('kl_rewrite')} | {frac('same_first_reuse')} / {frac('same_first_rewrite')}"
                f" | {frac('same_answer_reuse')} / {frac('same_answer_rewrite')} | {len(calls)} | {same_calls} | "
                f"{mean('reuse_first_s'):.2f} / {mean('full_first_s'):.2f} / {mean('rewrite_first_s'):.2f} |"
            )
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
