"""The micro-batcher shared by the scoring services (reward, reference).

Many callers each `await batcher.submit(items)`; a background task on the event loop coalesces
the waiting items of every caller into batches and one worker thread runs each batch with the
service's `run_batch(items) -> outcomes`. Results go back to their callers in order.

A batch closes when it holds `max_size` items, when one more item would push its padded size
(rows × longest item cost) over `max_tokens`, or `max_wait` after its oldest item arrived. An item
whose cost alone is over `max_tokens` runs by itself. Items only share a batch when their `key`
is equal (the scorers key by the loaded model, so a batch never mixes model versions).

Failure isolation:
- `run_batch` returns one outcome per item: a result, or an exception for that item alone. An
  item's exception fails its own request; the other requests of the batch get their results.
- If `run_batch` raises for a whole batch, its items are run again one at a time, so an input
  that breaks a batch fails only the request that sent it.
- A caller that is cancelled (client gone, deadline passed) has its waiting items dropped before
  they reach a batch; results of items already running are discarded. Nobody else notices.

Metrics (labelled by service): `rlhf_batch_size` per batch, `rlhf_batch_queue_wait_seconds` per
item (enqueue → its batch starts), and the settings in force as `rlhf_batch_setting`.

Two helpers for the compute side: `length_groups` splits a batch into forward passes of similar
lengths (least padded tokens plus a fixed cost per pass), and `calibrate_forward_cost` measures
that fixed cost on the loaded model (large on a GPU, where a batch is best run whole; small on
a CPU, where padding is paid in full).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

from rlhf.errors import Unavailable
from rlhf.serving.metrics import BATCH_QUEUE_WAIT, BATCH_SETTINGS, BATCH_SIZE

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Runs in the worker thread: one outcome per item, in order — a result or an exception.
RunBatch = Callable[[list[T]], Sequence[Any]]


@dataclass(frozen=True)
class BatchLimits:
    """When a batch closes: `max_size` items, `max_tokens` padded tokens, `max_wait_s` seconds."""

    max_size: int
    max_tokens: int
    max_wait_s: float

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.max_tokens < 1 or self.max_wait_s < 0:
            raise ValueError(f"invalid batch limits: {self}")

    @classmethod
    def from_settings(cls, settings) -> "BatchLimits":
        """`batch_max_size`, `batch_max_tokens`, `batch_max_wait_ms` of a `Settings`."""
        return cls(settings.batch_max_size, settings.batch_max_tokens, settings.batch_max_wait_ms / 1000.0)


class _Request:
    """One `submit()` call: its future, and its results as they arrive."""

    __slots__ = ("future", "results", "remaining")

    def __init__(self, future: asyncio.Future, n: int):
        self.future = future
        self.results: list[Any] = [None] * n
        self.remaining = n

    @property
    def done(self) -> bool:
        """Finished, failed or cancelled: its waiting items no longer need to run."""
        return self.future.done()

    def deliver(self, index: int, outcome: Any) -> None:
        """On the loop: record one item's outcome; an exception fails the whole request."""
        if self.future.done():  # cancelled by its caller, or already failed: drop quietly
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
            return
        self.results[index] = outcome
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.results)


@dataclass(eq=False)
class _Entry:
    """One item waiting for a batch."""

    request: _Request
    index: int
    item: Any
    cost: int
    key: Hashable
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[T, R]):
    """Coalesces concurrent `submit()` calls into batches run by one worker thread.

    `run_batch(items) -> outcomes` runs in the worker thread (one outcome per item: a result or
    an exception); `cost(item)` is the item's length in tokens (its padded size is rows ×
    longest); `key(item)` says which items may share a batch (default: all).

    Lifecycle: `await start()` on the serving loop, `await submit(items)` from any coroutine on
    that loop, `await close()` (waiting callers get UNAVAILABLE).
    """

    def __init__(
        self,
        service: str,
        run_batch: RunBatch,
        limits: BatchLimits,
        *,
        cost: Callable[[T], int] = lambda item: 1,
        key: Callable[[T], Hashable] = lambda item: None,
    ):
        self.service = service
        self.limits = limits
        self._run_batch = run_batch
        self._cost = cost
        self._key = key
        self._waiting: deque[_Entry] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = False
        self._inflight: list[_Entry] = []  # the batch in the worker thread now
        self._idle = False  # the batch loop waits for work (not for company)
        self._cost_max = 0  # an upper bound of the waiting items' largest cost
        self.batches_run = 0  # batches handed to run_batch (tests, benchmarks)
        self.batches_split = 0  # batches whose run_batch raised and were rerun item by item

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.service}-batch")
        self._task = self._loop.create_task(self._batch_loop(), name=f"{self.service}-batcher")
        self._running = True
        BATCH_SETTINGS.labels(self.service, "max_size").set(self.limits.max_size)
        BATCH_SETTINGS.labels(self.service, "max_tokens").set(self.limits.max_tokens)
        BATCH_SETTINGS.labels(self.service, "max_wait_seconds").set(self.limits.max_wait_s)

    async def close(self) -> None:
        """Stop batching; callers still waiting get UNAVAILABLE. A batch already in the worker
        thread is allowed to finish (its results are dropped)."""
        if not self._running:
            return
        self._running = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        gone = Unavailable(f"the {self.service} service is shutting down")
        for entry in [*self._inflight, *self._waiting]:
            entry.request.deliver(entry.index, gone)
        self._inflight = []
        self._waiting.clear()

    @property
    def running(self) -> bool:
        return self._running

    def waiting(self) -> int:
        """Items waiting for a batch (callers cancelled but not yet swept included)."""
        return len(self._waiting)

    # ------------------------------------------------------------------ callers
    async def submit(self, items: Sequence[T]) -> list[R]:
        """Run `items` (in as many batches as the limits need); their results, in order.

        Raises the exception of the first of its items to fail (the rest are then dropped).
        Cancelling the awaiting task withdraws the items that have not started.
        """
        if not self._running:
            raise Unavailable(f"the {self.service} service is not serving")
        if not items:
            return []
        future = self._loop.create_future()
        request = _Request(future, len(items))
        now = time.monotonic()
        for i, item in enumerate(items):
            entry = _Entry(request, i, item, max(1, int(self._cost(item))), self._key(item), now)
            self._waiting.append(entry)
            self._cost_max = max(self._cost_max, entry.cost)
        # Wake the batch loop only when it idles or a batch may be full; otherwise its deadline
        # wakes it (no re-planning on every arrival).
        n = len(self._waiting)
        if self._idle or n >= self.limits.max_size or n * self._cost_max > self.limits.max_tokens:
            self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # Withdraw what has not started; items already in the worker finish unseen.
            self._waiting = deque(e for e in self._waiting if e.request is not request)
            raise

    # ------------------------------------------------------------------ batching (loop)
    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            started = time.monotonic()
            wait_hist = BATCH_QUEUE_WAIT.labels(self.service)
            for entry in batch:
                wait_hist.observe(started - entry.enqueued)
            BATCH_SIZE.labels(self.service).observe(len(batch))
            self.batches_run += 1
            self._inflight = batch
            try:
                outcomes = await self._loop.run_in_executor(
                    self._executor, self._run_isolated, [e.item for e in batch]
                )
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - the executor itself failed: fail the batch
                log.exception("%s batch could not run", self.service)
                outcomes = [exc] * len(batch)
            self._inflight = []
            for entry, outcome in zip(batch, outcomes):
                entry.request.deliver(entry.index, outcome)

    async def _next_batch(self) -> list[_Entry]:
        """Wait for work, then for company (until full or the oldest waited max_wait); take it."""
        while True:
            self._sweep()
            while not self._waiting:
                self._idle = True
                self._wake.clear()
                try:
                    await self._wake.wait()
                finally:
                    self._idle = False
                self._sweep()
            deadline = self._waiting[0].enqueued + self.limits.max_wait_s
            while True:
                batch, full = self._plan()
                if full or not batch:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
                self._sweep()
            if batch:
                taken = set(map(id, batch))
                self._waiting = deque(e for e in self._waiting if id(e) not in taken)
                self._cost_max = max((e.cost for e in self._waiting), default=0)
                return batch

    def _sweep(self) -> None:
        """Drop items whose request is already done (cancelled or failed)."""
        if any(e.request.done for e in self._waiting):
            self._waiting = deque(e for e in self._waiting if not e.request.done)

    def _plan(self) -> tuple[list[_Entry], bool]:
        """The next batch in arrival order (items keyed like the oldest), and whether it is full."""
        lim = self.limits
        batch: list[_Entry] = []
        width = 0
        for entry in self._waiting:
            if entry.request.done:
                continue
            if batch and entry.key != batch[0].key:
                continue
            w = max(width, entry.cost)
            if batch and (len(batch) + 1) * w > lim.max_tokens:
                return batch, True
            batch.append(entry)
            width = w
            if len(batch) >= lim.max_size:
                return batch, True
        return batch, False

    # ------------------------------------------------------------------ compute (worker thread)
    def _run_isolated(self, items: list[T]) -> list[Any]:
        """`run_batch(items)`; if it raises, each item again by itself (isolates a bad input)."""
        try:
            outcomes = list(self._run_batch(items))
            if len(outcomes) != len(items):
                raise RuntimeError(f"run_batch returned {len(outcomes)} outcomes for {len(items)} items")
            return outcomes
        except Exception as exc:  # noqa: BLE001 - isolate below
            if len(items) == 1:
                return [exc]
            self.batches_split += 1
            log.warning("%s batch of %d failed (%s); running its items one by one", self.service,
                        len(items), exc)
        return [self._run_one(item) for item in items]

    def _run_one(self, item: T) -> Any:
        try:
            (outcome,) = self._run_batch([item])
            return outcome
        except Exception as exc:  # noqa: BLE001 - this item's own failure
            return exc


def length_groups(lengths: Sequence[int], *, forward_cost_tokens: int) -> list[list[int]]:
    """Split one batch into forward passes that waste little on padding.

    Returns groups of indices into `lengths` (each group sorted by length, the groups together
    covering every index once) minimising Σ over groups of (rows × longest + forward_cost_tokens):
    the padded tokens computed plus a fixed cost per forward pass, in tokens. For items sorted by
    length the best split is contiguous, so a small dynamic programme finds it exactly.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):  # group = sorted items i..j-1, padded to the longest (the last)
            c = best[i] + (j - i) * longest + forward_cost_tokens
            if c < best[j]:
                best[j], cut[j] = c, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def calibrate_forward_cost(run: Callable[[int, int], Any], *, small: tuple[int, int] = (1, 8),
                           large: tuple[int, int] = (8, 64), repeats: int = 3,
                           bounds: tuple[int, int] = (1, 8192)) -> int:
    """The fixed cost of one forward pass in tokens, for `length_groups`, measured.

    `run(rows, width)` runs one forward pass of that shape. Timing a small and a large shape
    (best of `repeats`) and fitting time = a + b·tokens gives a / b, clamped to `bounds` (a
    device where more tokens cost nothing measurable gets the upper bound: never split).
    """
    def best(shape: tuple[int, int]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(*shape)
            times.append(time.perf_counter() - t0)
        return min(times)

    run(*small)  # first calls pay one-off costs
    run(*large)
    n1, n2 = small[0] * small[1], large[0] * large[1]
    t1, t2 = best(small), best(large)
    per_token = (t2 - t1) / (n2 - n1)
    if per_token <= 0 or not math.isfinite(per_token):
        return bounds[1]
    fixed = t1 - n1 * per_token
    return int(min(bounds[1], max(bounds[0], fixed / per_token)))

