"""The micro-batcher on its own: coalescing, limits, exact routing, failure isolation, cancels.

`run_batch` here is a plain function that records each batch; a "gate" item blocks the worker
thread until the test releases it, so the items submitted meanwhile are all waiting when the
next batch is planned and the batches that follow are deterministic.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rlhf.errors import InvalidArgument, Unavailable
from rlhf.serving.batcher import BatchLimits, MicroBatcher, calibrate_forward_cost, length_groups
from rlhf.serving.metrics import BATCH_QUEUE_WAIT, BATCH_SETTINGS, BATCH_SIZE


class Recorder:
    """run_batch: item → ("r", item); "gate" waits for `release`; "bad" fails alone; "boom"
    makes the whole batch raise (so the batcher must isolate it)."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        if "gate" in items:
            self.entered.set()
            assert self.release.wait(10)
        if "boom" in items:
            raise RuntimeError("boom in batch")
        return [InvalidArgument("items[0]", "bad item") if x == "bad" else ("r", x) for x in items]

    def seen(self) -> list:
        return [x for b in self.batches for x in b if x != "gate"]


def cost(item) -> int:
    return item[1] if isinstance(item, tuple) else 1


async def started(limits: BatchLimits, rec: Recorder, service: str = "unit", **kw) -> MicroBatcher:
    b = MicroBatcher(service, rec, limits, cost=kw.pop("cost", cost), **kw)
    await b.start()
    return b


async def hold_worker(b: MicroBatcher, rec: Recorder) -> asyncio.Task:
    """Occupy the worker thread with the gate item; returns the gate's task."""
    task = asyncio.ensure_future(b.submit(["gate"]))
    assert await asyncio.to_thread(rec.entered.wait, 5)
    return task


async def test_concurrent_callers_coalesce_and_get_their_own_results():
    rec = Recorder()
    b = await started(BatchLimits(max_size=8, max_tokens=10_000, max_wait_s=0.05), rec)
    try:
        gate = await hold_worker(b, rec)
        calls = [asyncio.ensure_future(b.submit([f"c{i}-0", f"c{i}-1"])) for i in range(10)]
        await asyncio.sleep(0.02)
        rec.release.set()
        results = await asyncio.gather(*calls)
        await gate
        for i, res in enumerate(results):
            assert res == [("r", f"c{i}-0"), ("r", f"c{i}-1")]
        sizes = [len(x) for x in rec.batches[1:]]
        assert sizes == [8, 8, 4]  # 20 items, max 8 per batch, in arrival order
        assert rec.seen() == [f"c{i}-{j}" for i in range(10) for j in range(2)]
    finally:
        await b.close()


async def test_padded_token_budget_and_oversized_item_alone():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=100, max_wait_s=0.05), rec)
    try:
        gate = await hold_worker(b, rec)
        # (name, length): rows × longest must stay ≤ 100; the 150-token item runs by itself
        items = [("a", 30), ("b", 20), ("c", 30), ("d", 40), ("e", 150), ("f", 10), ("g", 10)]
        calls = [asyncio.ensure_future(b.submit([x])) for x in items]
        await asyncio.sleep(0.02)
        rec.release.set()
        assert [r[0][1] for r in await asyncio.gather(*calls)] == items
        await gate
        batches = [[x[0] for x in batch] for batch in rec.batches[1:]]
        assert batches == [["a", "b", "c"], ["d"], ["e"], ["f", "g"]]
        for batch in rec.batches[1:]:
            assert len(batch) == 1 or len(batch) * max(x[1] for x in batch) <= 100
    finally:
        await b.close()


# The two waits below are told apart by orders of magnitude (a batcher that waited would take an
# hour), so a loaded machine cannot change their outcome.
PATIENCE_S = 60.0


async def test_lone_request_waits_at_least_max_wait_then_runs():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.03), rec)
    try:
        t0 = time.perf_counter()
        assert await asyncio.wait_for(b.submit(["x"]), PATIENCE_S) == [("r", "x")]
        assert time.perf_counter() - t0 >= 0.025  # it waited for batch-mates first
    finally:
        await b.close()


async def test_full_batch_does_not_wait():
    rec = Recorder()
    b = await started(BatchLimits(max_size=4, max_tokens=10_000, max_wait_s=3600.0), rec)
    try:
        # full at once: runs now, not after max_wait_s (an hour)
        assert len(await asyncio.wait_for(b.submit(["a", "b", "c", "d"]), PATIENCE_S)) == 4
    finally:
        await b.close()


async def test_one_bad_item_fails_its_own_request_only():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.05), rec)
    try:
        gate = await hold_worker(b, rec)
        good1 = asyncio.ensure_future(b.submit(["g1", "g2"]))
        bad = asyncio.ensure_future(b.submit(["ok", "bad", "ok2"]))
        good2 = asyncio.ensure_future(b.submit(["g3"]))
        await asyncio.sleep(0.02)
        rec.release.set()
        assert await good1 == [("r", "g1"), ("r", "g2")]
        assert await good2 == [("r", "g3")]
        with pytest.raises(InvalidArgument, match="bad item"):
            await bad
        await gate
        assert len(rec.batches) == 2  # all in one batch
    finally:
        await b.close()


async def test_a_batch_that_raises_is_rerun_item_by_item():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.05), rec)
    try:
        gate = await hold_worker(b, rec)
        good = [asyncio.ensure_future(b.submit([f"g{i}"])) for i in range(3)]
        poison = asyncio.ensure_future(b.submit(["boom"]))
        await asyncio.sleep(0.02)
        rec.release.set()
        assert [await g for g in good] == [[("r", f"g{i}")] for i in range(3)]
        with pytest.raises(RuntimeError, match="boom"):
            await poison
        await gate
        assert [len(x) for x in rec.batches[1:]] == [4, 1, 1, 1, 1]  # the batch, then each alone
        assert b.batches_split == 1
        # the service keeps serving
        assert await b.submit(["after"]) == [("r", "after")]
    finally:
        await b.close()


async def test_cancelled_waiting_caller_is_skipped():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.05), rec)
    try:
        gate = await hold_worker(b, rec)
        keep = asyncio.ensure_future(b.submit(["k1", "k2"]))
        gone = asyncio.ensure_future(b.submit(["x1", "x2", "x3"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        rec.release.set()
        assert await keep == [("r", "k1"), ("r", "k2")]
        with pytest.raises(asyncio.CancelledError):
            await gone
        await gate
        assert rec.seen() == ["k1", "k2"]  # the cancelled items never ran
        assert b.waiting() == 0
    finally:
        await b.close()


async def test_cancel_while_running_does_not_poison_the_batch():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.0), rec)
    try:
        # the gate's own request is cancelled while its batch runs; its batch-mates finish
        mates = asyncio.ensure_future(b.submit(["gate", "m1"]))
        other = asyncio.ensure_future(b.submit(["m2"]))
        assert await asyncio.to_thread(rec.entered.wait, 5)
        mates.cancel()
        await asyncio.sleep(0.01)
        rec.release.set()
        assert await other == [("r", "m2")]
        with pytest.raises(asyncio.CancelledError):
            await mates
        assert await b.submit(["next"]) == [("r", "next")]
    finally:
        await b.close()


async def test_items_with_different_keys_never_share_a_batch():
    rec = Recorder()
    b = await started(
        BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.05), rec,
        key=lambda x: x[0] if isinstance(x, str) else None,
    )
    try:
        gate = await hold_worker(b, rec)
        calls = [asyncio.ensure_future(b.submit([k + str(i)])) for i in range(3) for k in "ab"]
        await asyncio.sleep(0.02)
        rec.release.set()
        await asyncio.gather(*calls)
        await gate
        for batch in rec.batches[1:]:
            assert len({x[0] for x in batch}) == 1
        assert sorted(len(x) for x in rec.batches[1:]) == [3, 3]
    finally:
        await b.close()


async def test_metrics_and_settings_are_exported():
    rec = Recorder()
    b = await started(BatchLimits(max_size=7, max_tokens=333, max_wait_s=0.002), rec, service="unit-metrics")
    try:
        await b.submit(["a", "b", "c"])
        assert BATCH_SETTINGS.labels("unit-metrics", "max_size")._value.get() == 7
        assert BATCH_SETTINGS.labels("unit-metrics", "max_tokens")._value.get() == 333
        assert BATCH_SETTINGS.labels("unit-metrics", "max_wait_seconds")._value.get() == pytest.approx(0.002)
        size = {s.name: s.value for s in BATCH_SIZE.collect()[0].samples if s.labels.get("service") == "unit-metrics"}
        assert size["rlhf_batch_size_count"] == 1 and size["rlhf_batch_size_sum"] == 3
        wait = {s.name: s.value for s in BATCH_QUEUE_WAIT.collect()[0].samples
                if s.labels.get("service") == "unit-metrics"}
        assert wait["rlhf_batch_queue_wait_seconds_count"] == 3
    finally:
        await b.close()


async def test_close_fails_waiting_callers_and_refuses_new_ones():
    rec = Recorder()
    b = await started(BatchLimits(max_size=64, max_tokens=10_000, max_wait_s=0.05), rec)
    gate = await hold_worker(b, rec)
    waiting = asyncio.ensure_future(b.submit(["w"]))
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(b.close())
    await asyncio.sleep(0.01)
    rec.release.set()
    await closing
    for call in (gate, waiting):
        with pytest.raises(Unavailable):
            await call
    with pytest.raises(Unavailable):
        await b.submit(["late"])


def test_limits_from_settings():
    from rlhf.config import Settings

    lim = BatchLimits.from_settings(Settings(batch_max_size=3, batch_max_tokens=99, batch_max_wait_ms=7))
    assert lim == BatchLimits(3, 99, 0.007)
    with pytest.raises(ValueError):
        BatchLimits(0, 1, 0.0)


def naive_best_split(lengths, fixed):
    """Minimum of Σ (rows × longest + fixed) over every partition into groups (brute force)."""
    def partitions(xs):
        if not xs:
            yield []
            return
        first, rest = xs[0], xs[1:]
        for p in partitions(rest):
            yield [[first], *p]
            for k in range(len(p)):
                yield [*p[:k], [first, *p[k]], *p[k + 1:]]

    return min(sum(len(g) * max(g) + fixed for g in p) for p in partitions(list(lengths)))


@pytest.mark.parametrize("fixed", [0, 5, 40, 1000])
def test_length_groups_is_an_optimal_cover(fixed):
    import random

    rng = random.Random(fixed)
    for _ in range(20):
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 7))]
        groups = length_groups(lengths, forward_cost_tokens=fixed)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        cost = sum(len(g) * max(lengths[i] for i in g) + fixed for g in groups)
        assert cost == naive_best_split(lengths, fixed)
    assert length_groups([], forward_cost_tokens=3) == []
    assert length_groups([5, 90, 6], forward_cost_tokens=10**6) == [[0, 2, 1]]  # never split


def test_calibrate_forward_cost_fits_fixed_plus_per_token():
    def fake(fixed_s, per_token_s):
        return lambda rows, width: time.sleep(fixed_s + rows * width * per_token_s)

    assert 15 <= calibrate_forward_cost(fake(0.004, 0.0001), repeats=1) <= 80  # ≈ 40 tokens
    assert calibrate_forward_cost(lambda r, w: None, repeats=1) >= 1  # no signal: within bounds
