"""Prompt reuse past an early change: take over the cached KV of a prompt's unchanged
part when its first tokens differ.

Home Assistant's system prompt starts with the time to the second ("Current time is
10:36:44. ..."), then 1,000-4,000 tokens of instructions, entities and tools that do
not change between turns. The prefix cache (edgelm.engine.blocks) stops at the first
changed token, so every turn would recompute the whole prompt. Here the scheduler
finds, in a recently finished sequence whose blocks are still cached (a `Source`),
runs of at least `min_run` tokens equal to the new prompt's, and has the executor
copy their KV entries to the new sequence's positions (K turned by RoPE for the
distance moved, `Plan::copies` in Rust). Only the changed tokens and what is really
new are computed.

The entries taken over were computed with the old tokens in their context, so the
result is an approximation of a full recompute; benches/bench_reuse_quality.py
measures what it costs (KL divergence of next-token distributions, greedy answers and
tool calls). It is bounded: at most `max_changed` tokens may differ before a run that
is taken over (computed afresh, or left out of the source), so a changed entity list or
a left-out system message (many tokens) ends the reuse and everything after it is
computed. A sequence's blocks that hold taken-over entries are cached
under a salted hash, never under the exact prefix hash, so a request that asked for
exact computation (reuse off) never gets them from the prefix cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

GRAM = 8
"""Tokens of the key a source is indexed by."""


@dataclass(frozen=True)
class ReuseConfig:
    enabled: bool = True
    min_run: int = 32
    """Fewest equal tokens in a row worth taking over."""
    max_changed: int = 64
    """Most tokens changed (computed afresh, or left out of the source) before a run
    that is taken over."""
    max_sources: int = 8
    """Finished sequences remembered as sources (newest first)."""

    def __post_init__(self) -> None:
        if self.min_run < GRAM:
            raise ValueError(f"reuse min_run must be at least {GRAM}")
        if self.max_changed < 0 or self.max_sources < 1:
            raise ValueError("reuse max_changed must be >= 0 and max_sources >= 1")


@dataclass(eq=False)
class Source:
    """A finished sequence's cached KV: `tokens[i]` lives at position i of `blocks`
    (full blocks only), each block registered under `hashes[i]` when recorded. A block
    whose registration changed since (evicted, the cache cleared) ends the source."""

    tokens: list[int]
    blocks: list[int]
    hashes: list[int]
    _index: dict[tuple[int, ...], list[int]] | None = field(default=None, repr=False)

    def index(self) -> dict[tuple[int, ...], list[int]]:
        if self._index is None:
            idx: dict[tuple[int, ...], list[int]] = {}
            t = self.tokens
            for j in range(len(t) - GRAM + 1):
                idx.setdefault(tuple(t[j : j + GRAM]), []).append(j)
            self._index = idx
        return self._index


Run = tuple[int, int, int]
"""(destination position, source position, length) of one run taken over."""


def find_runs(
    prompt: Sequence[int],
    start: int,
    end: int,
    src: Sequence[int],
    index: dict[tuple[int, ...], list[int]],
    n_src: int,
    cfg: ReuseConfig,
) -> list[Run]:
    """Runs of `prompt[start:end]` equal to `src[:n_src]`, in order in both (so the
    context keeps its order), each at least `cfg.min_run` long, and the gaps between
    them (computed) at least two tokens (a prompt token is never fed alone).

    Positions before `start` are the same in both (the prefix cache). The context a run
    was computed in differs from the new one by what changed before it: the tokens
    computed afresh or the source's tokens left out, whichever is more, summed over the
    gaps. A run is taken only while that stays within `cfg.max_changed`: a changed
    time line is a few tokens; a changed entity list, or a system message left out, is
    far more, and ends the reuse."""
    runs: list[Run] = []
    i, ip, jp, changed = start, start, start, 0  # ip, jp: the end of the last run, in prompt and source
    while i + cfg.min_run <= end and changed + (i - ip) <= cfg.max_changed:
        best: tuple[int, int, int] | None = None
        for tries, j in enumerate(index.get(tuple(prompt[i : i + GRAM]), ())):
            cost = max(i - ip, j - jp)
            if j < jp or j + cfg.min_run > n_src or changed + cost > cfg.max_changed:
                continue
            n = 0
            while i + n < end and j + n < n_src and prompt[i + n] == src[j + n]:
                n += 1
            if n >= cfg.min_run and (best is None or n > best[1]):
                best = (j, n, cost)
            if tries >= 8:
                break
        if best is None:
            i += 1
            continue
        j, n, cost = best
        if i - ip == 1:  # one token between runs: compute two
            i, j, n = i + 1, j + 1, n - 1
            if n < cfg.min_run:
                i += n
                continue
        changed += cost
        runs.append((i, j, n))
        i += n
        ip, jp = i, j + n
    return runs
