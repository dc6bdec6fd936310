"""Prompt reuse past an early change (edgelm.engine.reuse), against the scheduler tests'
fake executor with copies: the fake's KV store holds token ids, so every step checks
that each position a sequence attends to holds that sequence's token — a copy to the
wrong place, from a block that was evicted or reused, or across sequences fails here.
The real model's side (quality, the daemon) is in test_reuse_daemon.py."""

from __future__ import annotations

from test_scheduler import EOS, FakeExecutor, run

from edgelm.engine.reuse import ReuseConfig, find_runs
from edgelm.engine.scheduler import Scheduler, SchedulerLimits, Sequence
from edgelm.engine.types import StepPlan, StepResult


class CopyingFake(FakeExecutor):
    """The fake executor, carrying out `plan.copies` first (as the CPU executor does)."""

    supports_kv_copies = True

    def __init__(self, n_blocks: int, block_size: int = 16) -> None:
        super().__init__(n_blocks, block_size)
        self.copies: list[tuple[list[int], int, list[int], int, int]] = []

    def step(self, plan: StepPlan) -> StepResult:
        bs = self.block_size
        for st, ss, dt, ds, n in plan.copies:
            self.copies.append((st, ss, dt, ds, n))
            src_blocks = {st[p // bs] for p in range(ss, ss + n)}
            for i in range(n):
                s, d = ss + i, ds + i
                assert dt[d // bs] not in src_blocks, "a copy writes a block it reads"
                self.kv[(dt[d // bs], d % bs)] = self.kv[(st[s // bs], s % bs)]
        return super().step(plan)


def ha_prompt(time: int, entities: int = 40, user: int = 0) -> list[int]:
    """Token ids shaped like Home Assistant's prompt: a few header tokens, a time line
    that changes, a long unchanged body (instructions, entities), a user command."""
    head = [5, 6, 7]
    clock = [100 + (time * 7 + k) % 50 for k in range(6)]
    body = [200 + (i * 13) % 97 for i in range(entities * 10)]
    return head + clock + body + [300 + user, 301 + user, 302, 303, 304]


def sched(ex: FakeExecutor, **reuse: int | bool) -> Scheduler:
    return Scheduler(ex, SchedulerLimits(max_context=4096), [EOS], reuse=ReuseConfig(**reuse))  # type: ignore[arg-type]


def one(s: Scheduler, ex: FakeExecutor, p: list[int], max_tokens: int = 4, reuse: bool | None = None) -> Sequence:
    q = Sequence(p, max_tokens, reuse=reuse)
    s.add(q)
    got = run(s, ex)
    q.generated = got.get(q.id, [])  # type: ignore[attr-defined]
    return q


def test_a_changed_time_line_reuses_the_rest_and_answers_as_a_full_recompute() -> None:
    ex = CopyingFake(256)
    s = sched(ex)
    first = one(s, ex, ha_prompt(1))
    assert first.n_reused_prompt == 0
    second = one(s, ex, ha_prompt(2, user=1))
    n = len(second.prompt)
    # Everything but the header, the changed time line, the new command (and the
    # block-aligned prefix) came from the cache.
    assert second.n_reused_prompt >= n - 16 - 2 - 16
    assert s.n_prompt_tokens_reused == second.n_reused_prompt
    computed = s.n_prompt_tokens_computed - len(first.prompt)
    assert computed + second.n_reused_prompt + second.n_cached_prompt == n
    # The fake's next token hashes the tokens it finds in the cache: the same answer.
    fresh = CopyingFake(256)
    assert second.generated == one(sched(fresh), fresh, ha_prompt(2, user=1)).generated  # type: ignore[attr-defined]
    # The copies moved nothing here (same lengths): positions are kept.
    assert all(ss == ds for _, ss, _, ds, _ in ex.copies)


def test_runs_that_moved_are_copied_to_their_new_positions() -> None:
    ex = CopyingFake(256)
    s = sched(ex)
    one(s, ex, ha_prompt(1))
    longer = ha_prompt(2)[:9] + [111, 112, 113] + ha_prompt(2)[9:]  # the time line grew by 3
    q = one(s, ex, longer)
    assert q.n_reused_prompt > 300
    assert any(ds - ss == 3 for _, ss, _, ds, _ in ex.copies)


def test_a_changed_entity_list_is_not_reused_past_the_change() -> None:
    ex = CopyingFake(256)
    s = sched(ex, max_changed=16)
    base = ha_prompt(1, entities=40)
    one(s, ex, base)
    changed = base[:100] + [400 + i for i in range(60)] + base[160:]
    q = one(s, ex, changed)
    # The first 100 tokens come from the prefix cache and reuse; after 60 changed
    # tokens (more than max_changed), nothing more is taken over.
    assert all(d < 100 for _, _, _, d, _ in ex.copies)
    assert q.n_reused_prompt + q.n_cached_prompt <= 100


def test_a_left_out_part_of_the_source_ends_the_reuse() -> None:
    """A system message left out (the source had 200 tokens more at its head): the
    rest was computed in another context, so it is not taken over."""
    ex = CopyingFake(256)
    s = sched(ex)
    one(s, ex, [5, 6, 7] + [500 + i % 90 for i in range(200)] + ha_prompt(1)[3:])
    q = one(s, ex, ha_prompt(2))
    assert q.n_reused_prompt == 0
    # A few tokens left out (a shorter time line) is a small change: reused.
    one(s, ex, ha_prompt(1))
    shorter = ha_prompt(3)[:6] + ha_prompt(3)[9:]
    assert one(s, ex, shorter).n_reused_prompt > 300


def test_reuse_off_per_request_and_per_model() -> None:
    ex = CopyingFake(256)
    s = sched(ex)
    one(s, ex, ha_prompt(1))
    assert one(s, ex, ha_prompt(2), reuse=False).n_reused_prompt == 0
    ex2 = CopyingFake(256)
    s2 = sched(ex2, enabled=False)
    one(s2, ex2, ha_prompt(1))
    assert one(s2, ex2, ha_prompt(2)).n_reused_prompt == 0
    assert one(s2, ex2, ha_prompt(3), reuse=True).n_reused_prompt > 300


def test_reused_blocks_never_serve_an_exact_request_from_the_prefix_cache() -> None:
    ex = CopyingFake(256)
    s = sched(ex)
    one(s, ex, ha_prompt(1))
    one(s, ex, ha_prompt(2))  # its blocks hold taken-over entries
    exact = one(s, ex, ha_prompt(2), reuse=False)
    # Only the blocks before the first taken-over position could be shared.
    assert exact.n_cached_prompt <= 16
    assert exact.n_reused_prompt == 0


def test_no_reuse_after_the_cache_is_cleared_or_its_blocks_evicted() -> None:
    ex = CopyingFake(256)
    s = sched(ex)
    one(s, ex, ha_prompt(1))
    s.blocks.clear_cache()
    assert one(s, ex, ha_prompt(2)).n_reused_prompt == 0
    # A cache so small that the first prompt's blocks are evicted by the second's.
    n_blocks = len(ha_prompt(1)) // 16 + 3
    small = CopyingFake(n_blocks)
    s3 = Scheduler(small, SchedulerLimits(max_context=1024), [EOS], reuse=ReuseConfig())
    one(s3, small, ha_prompt(1))
    one(s3, small, [900 + i % 50 for i in range(len(ha_prompt(1)))])  # evicts it all
    assert one(s3, small, ha_prompt(2)).n_reused_prompt == 0


def test_no_copies_for_an_executor_without_them() -> None:
    ex = FakeExecutor(256)  # supports_kv_copies absent: the GPU executor today
    s = sched(ex)
    one(s, ex, ha_prompt(1))
    assert one(s, ex, ha_prompt(2)).n_reused_prompt == 0


def test_concurrent_sequences_reusing_one_source_stay_apart() -> None:
    ex = CopyingFake(512)
    s = sched(ex)
    one(s, ex, ha_prompt(1))
    qs = [Sequence(ha_prompt(2 + i, user=i), 6) for i in range(4)]
    for q in qs:
        s.add(q)
    got = run(s, ex)
    for i, q in enumerate(qs):
        assert q.n_reused_prompt > 300
        fresh = CopyingFake(256)
        assert got[q.id] == one(sched(fresh), fresh, ha_prompt(2 + i, user=i), 6).generated  # type: ignore[attr-defined]


def test_find_runs_keeps_order_and_gaps() -> None:
    cfg = ReuseConfig(min_run=8, max_changed=4)
    src = list(range(100))
    idx: dict[tuple[int, ...], list[int]] = {}
    for j in range(len(src) - 7):
        idx.setdefault(tuple(src[j : j + 8]), []).append(j)
    # One changed token between two runs: the gap is widened to two computed tokens.
    p = list(range(50)) + [999] + list(range(51, 100))
    runs = find_runs(p, 0, len(p) - 2, src, idx, len(src), cfg)
    assert runs[0] == (0, 0, 50)
    assert runs[1][0] - 50 >= 2
    # Too many changes before anything matches: nothing.
    p2 = [999] * 10 + list(range(100))
    assert find_runs(p2, 0, len(p2) - 2, src, idx, len(src), cfg) == []
