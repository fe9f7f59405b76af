"""Rollout workers: prompts → PolicyService (n samples) → RewardService → ReferenceService →
one `ScoredSample` per completion on the samples stream (what the PPO / GRPO jobs train on).

A worker takes prompts from the prompts stream (`PROMPTS_STREAM`, consumer group "rollout",
read through the trainer's `StreamConsumer`), from a JSONL file of {"id", "prompt"} rows, or
from a list, and works on several batches at once. For one batch of prompts it makes:

1. ONE `Generate` call: n samples per prompt, seeded, raw log-probs (`return_logprobs`);
2. ONE `Score` call: (prompt text, kept completion text) of every sample;
3. ONE `LogProbs` call to the reference: (prompt ids, trajectory ids) of every sample;

(the n samples of a prompt share its prompt tokens within the one `Score` and the one `LogProbs`
request, so both services compute each prompt once: `rlhf.serving.shared_prefix`)

then pushes the samples of each prompt (its group) and, for a stream prompt, acks the prompt
entry and records its id as applied, all in ONE MULTI/EXEC: a group is in the samples stream
whole or not at all, and exactly when its prompt is done.

What a sample carries (see ScoredSample in samples.proto): completion_ids = the trajectory the
policy sampled (a generated eos token included: the transformers engine appends the eos it
draws, and the finish reason says whether one was drawn), behaviour_logprobs = the trajectory's
raw log-probs as the policy reported them, reference_logprobs = the reference's log-probs of
the same tokens after the same prompt ids, reward = the reward model's score of the prompt text
and the kept completion text (a completion whose text is empty, e.g. an eos alone, is scored as
token ids: prompt ids + its tokens), the three model versions, the group id
"<prompt id>:<policy version>" and the sample id "<prompt id>:<policy version>:<index>", so a
prompt re-made after a redelivery carries the same ids and the trainer applies it once.

Failures: a batch whose calls fail (any RPC error, a reply of the wrong shape, Redis) pushes
nothing and acks nothing. Stream prompts stay pending with this worker, which stops touching
them; once idle past `claim_idle_ms` they are claimed again (by this or another worker; the
claim counts a delivery) and retried one prompt per batch, so one poison prompt cannot sink
others; past `max_deliveries` the `StreamConsumer` moves them to the dead-letter stream. File
and list prompts are retried in-process with exponential backoff, up to `max_attempts`.

Seeds: the policy derives each sample's seed from the request seed and the sample's position
(prompt index, sample index) in the request. A batch is sent in prompt-id order with the seed
`batch_seed(seed, ids)`, so the same batch of prompts reproduces its samples on the same policy
version; a prompt alone in its batch (`batch_prompts=1`, and every retried prompt) reproduces
them whatever else was in flight.

Following the registry: when `model_name` is given (or the policy's GetModel says it follows
its name), a result made by a version other than the registry's active one is discarded,
counted, and generated again after a short backoff (the service swaps shortly after an
activation). The check is repeated inside the push transaction (the active key is WATCHed), so
no sample of a superseded version is pushed after the registry moved on.

Long-running (stream) mode stops on `stop()` (the CLI wires SIGTERM / SIGINT to it): it reads
nothing more, finishes the batches in flight, pushes them, and returns. File and list modes
return when every prompt is done or has used its attempts.

Tracing (on with RLHF_OTEL, `rlhf_client.tracing`): each batch is a span `rlhf.rollout batch`;
its Generate, Score and LogProbs calls and its push (`<samples stream> publish`, whose context
every pushed entry carries) are its children.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import redis
from rlhf_client import tracing
from rlhf_client.errors import RpcError
from rlhf_client.queues import (
    PROMPTS_STREAM,
    SAMPLES_STREAM,
    encode_entry,
)
from rlhf_client.registry import Registry
from rlhf_client.types import Completion, GenerateResult, LogProbsResult, SamplingParams, ScoreResult
from rlhfpb.v1 import common_pb2, samples_pb2

from rlhf.serving.metrics import (
    ROLLOUT_BATCH_SECONDS,
    ROLLOUT_IN_FLIGHT,
    ROLLOUT_PROMPTS,
    ROLLOUT_SAMPLES,
    ROLLOUT_STALE,
)
from rlhf.trainer.queues import Entry, StreamConsumer, applied_key

log = logging.getLogger(__name__)

DEFAULT_GROUP = "rollout"
#: How long one stream read waits for new prompts (bounds how long a stop waits for the reader).
READ_BLOCK_MS = 1000


# ------------------------------------------------------------------------------------------------
# Options, prompts, counters
# ------------------------------------------------------------------------------------------------


class OptionError(ValueError):
    """A rollout option out of range; `option` is its field name (the CLI flag is --<field>)."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


@dataclass(frozen=True)
class RolloutOptions:
    """What a rollout worker asks for and how hard it works. `check()` validates."""

    n: int = 4  # samples per prompt (the group size)
    batch_prompts: int = 8  # prompts per Generate / Score / LogProbs call
    concurrency: int = 2  # batches in flight at once
    max_new_tokens: int | None = None  # None: the policy's default
    temperature: float = 1.0
    top_p: float | None = None  # None: off
    top_k: int | None = None  # None: off
    seed: int = 0  # base seed; each batch's request seed is batch_seed(seed, prompt ids)
    samples_stream: str = SAMPLES_STREAM
    model_name: str | None = None  # registry name the policy follows (None: ask the policy)
    rpc_timeout_s: float = 120.0  # deadline of each RPC
    max_attempts: int = 5  # file / list prompts: tries before giving up on one
    retry_backoff_s: float = 0.5  # file / list prompts: first retry delay (doubles, ≤ 30 s)
    stale_retries: int = 30  # regenerations after stale results before the batch fails
    stale_backoff_s: float = 0.2  # first wait before regenerating a stale batch (doubles, ≤ 5 s)
    log_interval_s: float = 30.0  # progress log period

    def check(self, max_items_per_call: int | None = None) -> "RolloutOptions":
        def need(ok: bool, option: str, problem: str) -> None:
            if not ok:
                raise OptionError(option, problem)

        need(self.n >= 1, "n", f"must be ≥ 1, got {self.n}")
        need(self.batch_prompts >= 1, "batch_prompts", f"must be ≥ 1, got {self.batch_prompts}")
        need(self.concurrency >= 1, "concurrency", f"must be ≥ 1, got {self.concurrency}")
        need(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens",
             f"must be ≥ 1, got {self.max_new_tokens}")
        need(0.0 <= self.temperature <= 2.0, "temperature", f"must be in [0, 2], got {self.temperature}")
        need(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.top_k is None or self.top_k >= 0, "top_k", f"must be ≥ 0 (0 = off), got {self.top_k}")
        need(self.seed >= 0, "seed", f"must be ≥ 0, got {self.seed}")
        need(bool(self.samples_stream), "samples_stream", "must be a stream name")
        need(self.rpc_timeout_s > 0, "rpc_timeout_s", f"must be > 0, got {self.rpc_timeout_s}")
        need(self.max_attempts >= 1, "max_attempts", f"must be ≥ 1, got {self.max_attempts}")
        need(self.stale_retries >= 0, "stale_retries", f"must be ≥ 0, got {self.stale_retries}")
        if max_items_per_call is not None:
            need(self.batch_prompts * self.n <= max_items_per_call, "batch_prompts",
                 f"{self.batch_prompts} prompts × n={self.n} = {self.batch_prompts * self.n} items per "
                 f"Score / LogProbs call; the services accept at most {max_items_per_call} "
                 "(max_prompts_per_request): lower --batch-prompts or --n")
        return self

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=seed, return_logprobs=True)


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer. `entry` is its stream entry (stream source only); `attempt` counts
    deliveries (stream) or tries (file / list), 1 for the first."""

    id: str
    text: str
    source: str = ""
    entry: Entry | None = None
    attempt: int = 1


@dataclass
class RolloutStats:
    """What one worker did (the same events feed the prometheus counters)."""

    prompts_done: int = 0  # prompts whose group was pushed
    samples_pushed: int = 0
    failures: int = 0  # prompt attempts that failed (RPC error, bad reply, Redis); retried
    stale_discards: int = 0  # samples discarded: made by a version that was no longer active
    duplicates: int = 0  # prompts already answered (a redelivery / a re-push): acked, not pushed
    dead_lettered: int = 0  # stream prompts moved to the dead-letter stream
    gave_up: list[str] = field(default_factory=list)  # file / list: ids that failed every attempt
    left: int = 0  # file / list: prompts neither done nor given up (the run was stopped first)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def batch_seed(seed: int, prompt_ids: Sequence[str]) -> int:
    """The request seed of a batch: a function of the base seed and the prompt ids (in request
    order), below 2**63 (the policy's per-sample seeds are taken mod 2**63 − 1)."""
    h = hashlib.sha256(f"{seed}".encode())
    for pid in prompt_ids:
        h.update(b"\x00" + pid.encode())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def sample_id(prompt_id: str, version: str, index: int) -> str:
    return f"{prompt_id}:{version}:{index}"


def group_id(prompt_id: str, version: str) -> str:
    return f"{prompt_id}:{version}"


def cli_prompt_id(text: str) -> str:
    """The id of a prompt given on the command line: a digest of its text (stable across runs)."""
    return "cli-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def load_prompts_file(path: Path) -> list[PromptItem]:
    """Rows {"id": ..., "prompt": "..."} of a JSONL file (blank lines skipped); a ValueError
    naming the file and line for an unusable row (see `rlhf_client.datafiles.read_prompt_rows`)."""
    from rlhf_client.datafiles import read_prompt_rows

    source = f"file:{Path(path).name}"
    return [PromptItem(pid, text, source) for pid, text in read_prompt_rows(path)]


def cli_prompts(texts: Sequence[str]) -> list[PromptItem]:
    """Prompts given as text: ids from `cli_prompt_id`; ValueError for an empty or repeated one."""
    out, seen = [], set()
    for text in texts:
        if not text:
            raise ValueError("--prompt: empty prompt")
        pid = cli_prompt_id(text)
        if pid in seen:
            raise ValueError(f"--prompt: the same prompt is given twice ({pid})")
        seen.add(pid)
        out.append(PromptItem(pid, text, "cli"))
    return out


def prompts_from_flags(prompts_file: Path | None,
                       prompts: Sequence[str] | None) -> list[PromptItem] | None:
    """The prompts of `--prompts-file` or `--prompt` (None: neither given); ValueError naming
    the flag (a missing or empty file, a bad row, an empty or repeated prompt)."""
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise ValueError(f"--prompts-file {prompts_file}: no such file")
        items = load_prompts_file(prompts_file)
        if not items:
            raise ValueError(f"--prompts-file {prompts_file}: no prompts in it")
        return items
    return None if prompts is None else cli_prompts(prompts)


# ------------------------------------------------------------------------------------------------
# Building samples (pure)
# ------------------------------------------------------------------------------------------------


class BadReply(RuntimeError):
    """A service answered with the wrong number or shape of results."""


def score_item(item: PromptItem, c: Completion):
    """What the reward model scores: (prompt text, kept text); as token ids when the kept text
    is empty (an eos alone decodes to ""), so the eos still reaches the reward model."""
    if c.text:
        return item.text, c.text
    return list(c.prompt_token_ids), list(c.token_ids or c.trajectory_token_ids)


def build_samples(
    items: Sequence[PromptItem], n: int, gen: GenerateResult, score: ScoreResult,
    ref: LogProbsResult, created_ns: int,
) -> list[tuple[PromptItem, list[samples_pb2.ScoredSample]]]:
    """One group of n ScoredSamples per prompt (request order). BadReply when the replies do not
    fit the request (counts, lengths)."""
    want = len(items) * n
    comps = gen.completions
    if len(comps) != want or [(c.prompt_index, c.sample_index) for c in comps] != [
        (i, j) for i in range(len(items)) for j in range(n)
    ]:
        raise BadReply(f"policy returned {len(comps)} completions for {len(items)} prompts × n={n}")
    if len(score.rewards) != want:
        raise BadReply(f"reward service returned {len(score.rewards)} rewards for {want} items")
    if len(ref.results) != want:
        raise BadReply(f"reference service returned {len(ref.results)} results for {want} items")
    version = gen.model.version
    policy = common_pb2.ModelRef(name=gen.model.name, version=version)
    reward_model = common_pb2.ModelRef(name=score.model.name, version=score.model.version)
    reference = common_pb2.ModelRef(name=ref.model.name, version=ref.model.version)
    out = []
    for i, item in enumerate(items):
        group = []
        for j in range(n):
            k = i * n + j
            c = comps[k]
            traj, lps, ref_lps = c.trajectory_token_ids, c.trajectory_logprobs, ref.results[k].logprobs
            if not traj or len(lps) != len(traj) or len(ref_lps) != len(traj):
                raise BadReply(f"sample {k}: {len(traj)} tokens, {len(lps)} behaviour and "
                               f"{len(ref_lps)} reference log-probs")
            s = samples_pb2.ScoredSample(
                id=sample_id(item.id, version, j),
                prompt_ids=c.prompt_token_ids,
                completion_ids=traj,
                behaviour_logprobs=lps,
                reference_logprobs=ref_lps,
                reward=score.rewards[k],
                policy=policy,
                group_id=group_id(item.id, version),
                finish_reason=int(c.finish_reason),
                reward_model=reward_model,
                reference=reference,
                prompt=item.text,
                completion=c.text,
                sample_index=j,
                prompt_id=item.id,
            )
            s.created.FromNanoseconds(created_ns)
            group.append(s)
        out.append((item, group))
    return out


# ------------------------------------------------------------------------------------------------
# Prompt sources
# ------------------------------------------------------------------------------------------------


class PromptSource:
    """Where prompts come from, and what finishing one means there."""

    #: Redis keys the push transaction WATCHes (the applied-id index).
    watch_keys: tuple[str, ...] = ()
    #: How often the worker calls `tick` (seconds).
    tick_every_s: float = 0.2

    async def next_batches(self, k: int) -> list[list[PromptItem]] | None:
        """Batches of at most k prompts each; [] when none is ready now; None when the source
        is exhausted. A retried prompt comes alone in its batch: a poison prompt cannot fail
        the others of a batch again."""
        raise NotImplementedError

    def applied(self, pipe, items: Sequence[PromptItem]) -> set[str]:
        """Ids among `items` already answered (read on the WATCHing pipeline)."""
        return set()

    def add_commit(self, pipe, items: Sequence[PromptItem]) -> None:
        """Queue what marks `items` done into the MULTI block (stream: applied index + XACK)."""

    def done(self, items: Sequence[PromptItem]) -> None:
        """After the commit: forget them."""

    def failed(self, items: Sequence[PromptItem], error: BaseException) -> list[str]:
        """After a failure: schedule the retry; returns ids given up on."""
        return []

    async def tick(self) -> None:
        """Periodic upkeep (stream: the heartbeat of in-flight entries)."""

    def close(self) -> None:
        pass


class ListSource(PromptSource):
    """Prompts from a file or the command line; retried in-process with exponential backoff."""

    def __init__(self, items: Sequence[PromptItem], *, max_attempts: int, backoff_s: float):
        self._ready: list[tuple[float, PromptItem]] = [(0.0, it) for it in items]
        self._outstanding = 0
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._changed = asyncio.Event()

    async def next_batches(self, k: int) -> list[list[PromptItem]] | None:
        now = time.monotonic()
        due = [p for p in self._ready if p[0] <= now]
        if due:
            retried = [p for p in due if p[1].attempt > 1][:k]
            fresh = [p for p in due if p[1].attempt == 1][:k - len(retried)]
            for p in retried + fresh:
                self._ready.remove(p)
            self._outstanding += len(retried) + len(fresh)
            return [[p[1]] for p in retried] + ([[p[1] for p in fresh]] if fresh else [])
        if not self._ready and self._outstanding == 0:
            return None
        wait = min((p[0] for p in self._ready), default=now + 1.0) - now
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, wait))
        except asyncio.TimeoutError:
            pass
        return []

    @property
    def left(self) -> int:
        """Prompts not yet done nor given up on."""
        return len(self._ready) + self._outstanding

    def done(self, items: Sequence[PromptItem]) -> None:
        self._outstanding -= len(items)
        self._changed.set()

    def failed(self, items: Sequence[PromptItem], error: BaseException) -> list[str]:
        self._outstanding -= len(items)
        gave_up = []
        for it in items:
            if it.attempt >= self.max_attempts:
                gave_up.append(it.id)
                continue
            delay = min(self.backoff_s * 2 ** (it.attempt - 1), 30.0)
            retry = PromptItem(it.id, it.text, it.source, None, it.attempt + 1)
            self._ready.append((time.monotonic() + delay, retry))
        self._ready.sort(key=lambda p: p[0])
        self._changed.set()
        return gave_up


class StreamSource(PromptSource):
    """Prompts from a Redis stream through a `StreamConsumer` (consumer group, applied-id set,
    reclaim, dead letters); its blocking calls run in threads. In-flight entries are touched
    every third of `claim_idle_ms`; every quarter of it (at most 30 s) the consumer rescans for
    entries idle past it (a dead worker's, and this worker's failed ones)."""

    def __init__(self, consumer: StreamConsumer):
        self.consumer = consumer
        self.watch_keys = (consumer.applied_key,)
        self._in_flight: dict[str, Entry] = {}  # entry id → entry, touched by the heartbeat
        self._last_touch = time.monotonic()
        self._last_rescan = time.monotonic()
        self._lock = asyncio.Lock()
        idle_s = consumer.claim_idle_ms / 1000.0
        self.touch_every_s = idle_s / 3
        self.tick_every_s = min(0.2, self.touch_every_s / 2)
        self.rescan_every_s = min(idle_s / 4, 30.0)

    async def next_batches(self, k: int) -> list[list[PromptItem]] | None:
        async with self._lock:
            if time.monotonic() - self._last_rescan >= self.rescan_every_s:
                self._last_rescan = time.monotonic()
                self.consumer.rescan()
            entries = await asyncio.to_thread(self.consumer.read, k, block_ms=READ_BLOCK_MS)
        fresh, retried = [], []
        for e in entries:
            if e.entry_id in self._in_flight:  # reclaimed from ourselves while still in flight
                continue
            self._in_flight[e.entry_id] = e
            item = PromptItem(e.payload.id, e.payload.prompt, e.payload.source, e, e.deliveries)
            (retried if e.deliveries > 1 else fresh).append(item)
        return [[it] for it in retried] + ([fresh] if fresh else [])

    def applied(self, pipe, items: Sequence[PromptItem]) -> set[str]:
        ids = [it.id for it in items]
        flags = self.consumer.applied_flags(pipe, ids)
        return {pid for pid, hit in zip(ids, flags) if hit}

    def add_commit(self, pipe, items: Sequence[PromptItem]) -> None:
        self.consumer.queue_commit(pipe, [it.id for it in items],
                                   [it.entry.entry_id for it in items])

    def done(self, items: Sequence[PromptItem]) -> None:
        for it in items:
            self._in_flight.pop(it.entry.entry_id, None)

    def failed(self, items: Sequence[PromptItem], error: BaseException) -> list[str]:
        # left pending and no longer touched: claimed again once idle past claim_idle_ms
        self.done(items)
        return []

    async def tick(self) -> None:
        if self._in_flight and time.monotonic() - self._last_touch >= self.touch_every_s:
            self._last_touch = time.monotonic()
            await asyncio.to_thread(self.consumer.touch, list(self._in_flight.values()))

    def close(self) -> None:
        self.consumer.close()


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------


class _Stale(Exception):
    pass


class RolloutWorker:
    """Answers prompts from `source` with ScoredSamples on `options.samples_stream`.

    `policy`, `reward`, `reference`: the async clients (AsyncPolicyClient, AsyncRewardClient,
    AsyncReferenceClient); `redis_client` returns bytes (the one the StreamConsumer uses, when
    the source is a stream). Use `start()` then `run()`, or `run()` alone.
    """

    def __init__(self, policy, reward, reference, redis_client: redis.Redis, source: PromptSource,
                 options: RolloutOptions, *, name: str | None = None):
        self.policy = policy
        self.reward = reward
        self.reference = reference
        self.r = redis_client
        self.source = source
        self.options = options
        self.name = name or default_consumer_name()
        self.stats = RolloutStats()
        self.model_name: str | None = options.model_name
        self._active_key: str | None = None
        self._stop = asyncio.Event()
        self._started = False
        self._seq = 0
        self._commit_duplicates = 0
        self._tasks: set[asyncio.Task] = set()

    def stop(self) -> None:
        """Read no more prompts; `run` returns once the batches in flight are pushed."""
        if not self._stop.is_set():
            log.info("rollout %s: stopping after %d batch(es) in flight", self.name, len(self._tasks))
        self._stop.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        """Learn which registry name the policy follows (unless given); StartupError when the
        policy does not answer or serves another model than the given name."""
        from rlhf.errors import StartupError

        if self._started:
            return
        try:
            info = await self.policy.get_model(timeout=min(self.options.rpc_timeout_s, 30.0))
        except RpcError as exc:
            raise StartupError(f"the policy service does not answer GetModel ({exc})") from exc
        # GetModel.follows_registry is how a policy says it follows its name; a pinned store
        # version reports the same name, so without that flag only --model-name turns it on
        if self.model_name is None:
            self.model_name = info.model.name if info.follows_registry else None
        elif info.model.name != self.model_name:
            raise StartupError(f"--model-name {self.model_name}: the policy service serves "
                               f"{info.model.name!r} ({info.model.version})")
        if self.model_name is not None:
            self._active_key = Registry(self.r)._k(self.model_name, "active")  # noqa: SLF001 - its key
            active = await asyncio.to_thread(self.r.get, self._active_key)
            if active is not None and active.decode() != info.model.version:
                log.warning("rollout %s: the policy serves %s, %s's active version is %s: its results "
                            "are discarded until it swaps", self.name, info.model.version,
                            self.model_name, active.decode())
        log.info("rollout %s: policy %s/%s (%s)%s", self.name, info.model.name, info.model.version,
                 info.backend, f", following {self.model_name}" if self.model_name else ", pinned")
        self._started = True

    # ------------------------------------------------------------------ main loop
    async def run(self) -> RolloutStats:
        """Work until the source is exhausted (file / list) or `stop()` (stream); the stats."""
        await self.start()
        upkeep = asyncio.create_task(self._upkeep())
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if len(self._tasks) >= self.options.concurrency:
                    await asyncio.wait({*self._tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batches = await self.source.next_batches(self.options.batch_prompts)
                if batches is None:
                    break
                for batch in batches:
                    task = asyncio.create_task(self._process(batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    ROLLOUT_IN_FLIGHT.set(len(self._tasks))
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            stop_wait.cancel()
            upkeep.cancel()
            try:
                await upkeep
            except asyncio.CancelledError:
                pass
            ROLLOUT_IN_FLIGHT.set(0)
            await asyncio.to_thread(self.source.close)
            self.stats.left = getattr(self.source, "left", 0)
            self._sync_consumer_stats()
            self._log_progress("done")
        return self.stats

    async def _upkeep(self) -> None:
        """Heartbeat of in-flight stream entries and the periodic progress line."""
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(self.source.tick_every_s)
            try:
                await self.source.tick()
            except redis.RedisError as exc:
                log.warning("rollout %s: heartbeat failed: %s", self.name, exc)
            if time.monotonic() - last_log >= self.options.log_interval_s:
                last_log = time.monotonic()
                self._sync_consumer_stats()
                self._log_progress("progress")

    def _sync_consumer_stats(self) -> None:
        """Fold in what the StreamConsumer counted (dead letters, duplicates skipped on read)."""
        consumer = getattr(self.source, "consumer", None)
        if consumer is not None:
            ROLLOUT_PROMPTS.labels("dead_lettered").inc(consumer.dead_lettered - self.stats.dead_lettered)
            self.stats.dead_lettered = consumer.dead_lettered
            self.stats.duplicates = self._commit_duplicates + consumer.duplicates

    def _log_progress(self, what: str) -> None:
        s = self.stats
        log.info("rollout %s %s: prompts done %d, samples pushed %d, failures %d, stale discards %d, "
                 "duplicates %d, dead-lettered %d, in flight %d", self.name, what, s.prompts_done,
                 s.samples_pushed, s.failures, s.stale_discards, s.duplicates, s.dead_lettered,
                 len(self._tasks))

    # ------------------------------------------------------------------ one batch
    async def _process(self, batch: list[PromptItem]) -> None:
        batch = sorted(batch, key=lambda it: it.id)
        started = time.monotonic()
        self._seq += 1
        rid = f"rollout-{self.name}-{self._seq}"
        try:
            with tracing.span("rlhf.rollout batch", attributes={"rlhf.request_id": rid,
                                                                "rlhf.rollout.prompts": len(batch)}):
                await self._answer(batch, rid)  # its RPCs and its push: children of the span
        except Exception as exc:  # noqa: BLE001 - any failure: nothing pushed, nothing acked, retried
            self._failed(batch, exc, rid)
            return
        ROLLOUT_BATCH_SECONDS.observe(time.monotonic() - started)
        self.source.done(batch)

    def _failed(self, batch: list[PromptItem], exc: BaseException, rid: str) -> None:
        self.stats.failures += len(batch)
        ROLLOUT_PROMPTS.labels("failed").inc(len(batch))
        known = isinstance(exc, (RpcError, BadReply, _Stale, redis.RedisError))
        log.warning("rollout %s: batch %s of %d prompt(s) failed (%s); not pushed, not acked",
                    self.name, rid, len(batch), f"{type(exc).__name__}: {exc}" if known else repr(exc),
                    exc_info=not known)
        gave_up = self.source.failed(batch, exc)
        if gave_up:
            self.stats.gave_up.extend(gave_up)
            log.error("rollout %s: gave up on %d prompt(s) after %d attempts: %s", self.name,
                      len(gave_up), self.options.max_attempts, ", ".join(gave_up[:10]))

    async def _answer(self, batch: list[PromptItem], rid: str) -> None:
        """Generate, score, reference, push; regenerate while the result is stale."""
        o = self.options
        ids = [it.id for it in batch]
        params = o.sampling(batch_seed(o.seed, ids))
        delay = o.stale_backoff_s
        for attempt in range(o.stale_retries + 1):
            if attempt:
                if self._stop.is_set():  # leave it to the next worker rather than hold the stop
                    raise _Stale("stopping before a fresh result; left for a retry")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            gen = await self.policy.generate([it.text for it in batch], params, n=o.n,
                                             timeout=o.rpc_timeout_s, request_id=f"{rid}-g{attempt}")
            version = gen.model.version
            if await self._stale(version):
                self._discard_stale(len(gen.completions), version, rid)
                continue
            comps = gen.completions
            if len(comps) != len(batch) * o.n:
                raise BadReply(f"policy returned {len(comps)} completions for {len(batch)} prompts × n={o.n}")
            score = await self.reward.score(
                [score_item(batch[c.prompt_index], c) for c in comps],
                timeout=o.rpc_timeout_s, request_id=f"{rid}-s{attempt}")
            ref = await self.reference.logprobs(
                [(c.prompt_token_ids, c.trajectory_token_ids) for c in comps],
                timeout=o.rpc_timeout_s, request_id=f"{rid}-r{attempt}")
            groups = build_samples(batch, o.n, gen, score, ref, time.time_ns())
            with tracing.producer_span(o.samples_stream, count=len(comps)):  # entries carry it
                outcome, pushed, dups = await asyncio.to_thread(self._commit, groups, version)
            if outcome == "stale":
                self._discard_stale(len(comps), version, rid)
                continue
            fresh = len(batch) - dups
            self.stats.prompts_done += fresh
            self.stats.samples_pushed += pushed
            self._commit_duplicates += dups
            self.stats.duplicates += dups
            ROLLOUT_PROMPTS.labels("done").inc(fresh)
            ROLLOUT_PROMPTS.labels("duplicate").inc(dups)
            ROLLOUT_SAMPLES.inc(pushed)
            return
        raise _Stale(f"still stale after {o.stale_retries} regenerations (the registry's active "
                     f"{self.model_name} is not what the policy serves)")

    def _discard_stale(self, samples: int, version: str, rid: str) -> None:
        self.stats.stale_discards += samples
        ROLLOUT_STALE.inc(samples)
        log.info("rollout %s: batch %s made by %s, no longer %s's active version: %d sample(s) "
                 "discarded, regenerating", self.name, rid, version, self.model_name, samples)

    async def _stale(self, version: str) -> bool:
        if self._active_key is None:
            return False
        active = await asyncio.to_thread(self.r.get, self._active_key)
        return active is not None and active.decode() != version

    def _commit(self, groups, version: str) -> tuple[str, int, int]:
        """Push the groups and mark their prompts done in ONE MULTI/EXEC, WATCHing the applied
        set (a prompt another worker answered meanwhile is acked, not pushed twice) and the
        registry's active version (a version superseded meanwhile is not pushed).
        Returns (outcome "pushed" | "stale", samples pushed, prompts already answered)."""
        items = [item for item, _ in groups]
        watch = ([self._active_key] if self._active_key else []) + list(self.source.watch_keys)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if watch:
                        pipe.watch(*watch)
                    if self._active_key:
                        active = pipe.get(self._active_key)
                        if active is not None and active.decode() != version:
                            return "stale", 0, 0
                    done = self.source.applied(pipe, items)
                    pipe.multi()
                    pushed = 0
                    for item, samples in groups:
                        if item.id in done:
                            continue
                        for s in samples:
                            pipe.xadd(self.options.samples_stream, encode_entry(s))
                            pushed += 1
                    self.source.add_commit(pipe, items)
                    pipe.execute()
                    return "pushed", pushed, len(done)
                except redis.WatchError:
                    continue


def default_consumer_name() -> str:
    """host-pid-random: unique per process, recognisable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def stream_source(client: redis.Redis, *, stream: str = PROMPTS_STREAM,
                  group: str = DEFAULT_GROUP, consumer: str, max_deliveries: int,
                  claim_idle_ms: int) -> StreamSource:
    """A StreamSource on `stream` / `group` (created when missing) whose entries must be
    RolloutPrompts; anything else is dead-lettered."""
    def is_prompt(payload) -> None:
        if not isinstance(payload, samples_pb2.RolloutPrompt):
            raise ValueError(f"{payload.DESCRIPTOR.full_name} is not a RolloutPrompt")

    sc = StreamConsumer(client, stream, group, consumer, max_deliveries=max_deliveries,
                        claim_idle_ms=claim_idle_ms, validate=is_prompt)
    return StreamSource(sc)


async def run_rollout(options: RolloutOptions, *, policy: str, reward: str, reference: str,
                      redis_url: str, token: str | None = None, items: Sequence[PromptItem] | None = None,
                      prompts_stream: str = PROMPTS_STREAM, group: str = DEFAULT_GROUP,
                      consumer: str | None = None, max_deliveries: int = 5,
                      claim_idle_ms: int = 30_000, handle_signals: bool = True) -> RolloutStats:
    """A whole worker run (what `rlhf rollout` does): the clients for the three targets, the
    source (`items` when given, else the stream), SIGTERM / SIGINT → `stop()`. Returns the stats."""
    import signal

    from rlhf_client import AsyncPolicyClient, AsyncReferenceClient, AsyncRewardClient
    from rlhf_client.redis_conn import connect

    name = consumer or default_consumer_name()
    r = connect(redis_url)
    kw = dict(token=token, timeout=options.rpc_timeout_s)
    try:
        async with AsyncPolicyClient(policy, **kw) as pc, AsyncRewardClient(reward, **kw) as rc, \
                AsyncReferenceClient(reference, **kw) as fc:
            if items is not None:
                source: PromptSource = ListSource(items, max_attempts=options.max_attempts,
                                                  backoff_s=options.retry_backoff_s)
            else:
                source = await asyncio.to_thread(
                    stream_source, r, stream=prompts_stream, group=group, consumer=name,
                    max_deliveries=max_deliveries, claim_idle_ms=claim_idle_ms)
            worker = RolloutWorker(pc, rc, fc, r, source, options, name=name)
            loop = asyncio.get_running_loop()
            signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
            for sig in signals:
                loop.add_signal_handler(sig, worker.stop)
            try:
                await worker.start()
                log.info("rollout %s: %s → %s (n=%d, %d prompt(s) per batch, %d batch(es) in "
                         "flight)", name, f"{len(items)} prompt(s)" if items is not None else
                         f"{prompts_stream} (group {group})", options.samples_stream, options.n,
                         options.batch_prompts, options.concurrency)
                return await worker.run()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)
    finally:
        r.close()


__all__ = [
    "DEFAULT_GROUP",
    "BadReply",
    "ListSource",
    "OptionError",
    "PromptItem",
    "PromptSource",
    "RolloutOptions",
    "RolloutStats",
    "RolloutWorker",
    "StreamSource",
    "applied_key",
    "batch_seed",
    "build_samples",
    "cli_prompt_id",
    "cli_prompts",
    "group_id",
    "load_prompts_file",
    "prompts_from_flags",
    "run_rollout",
    "sample_id",
    "score_item",
    "stream_source",
]
