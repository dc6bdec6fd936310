"""The exact alternative to prompt reuse (edgelm.engine.reuse): move a system
message's volatile time line to its end, so the prefix cache covers everything before
it. Opt-in (`move_time_line` in the configuration): it changes the prompt the model
sees, which changes its answers a little too (benches/results/reuse_quality.md).

Home Assistant writes "Current time is 10:36:44. Today's date is 2026-12-06." as the
first line of its system prompt; any line that states the current time or date that
way is moved.
"""

from __future__ import annotations

import re
from typing import Any

_TIME_LINE = re.compile(
    r"^(?:Current time is [^\n]*|Today's date is [^\n]*|The current (?:time|date) is [^\n]*)$", re.MULTILINE
)


def move_time_line(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the time lines of the first system message moved to its end
    (a new list; the others are untouched)."""
    out = list(messages)
    for i, m in enumerate(out):
        if m.get("role") != "system":
            continue
        content = m.get("content")
        if not isinstance(content, str):
            break
        lines = _TIME_LINE.findall(content)
        if lines:
            rest = _TIME_LINE.sub("", content)
            rest = re.sub(r"\n{2,}", "\n", rest).strip("\n")
            out[i] = {**m, "content": rest + "\n" + "\n".join(lines)}
        break
    return out
