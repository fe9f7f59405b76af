"""The online / iterative alignment loop: job type `iterate` (spec `jobs.LoopJob`, task
`rlhf.iterate`).

    round 0   evaluate the starting version (the baseline)
    round k   collect   n samples per prompt from the version round k starts from (seeded)
              label     the labeller scores each prompt's group (reward model or AI judge)
              pairs     best vs random / best vs worst (rlhf.trainer.pairs), + human pairs
              push      every pair, and the round's "collected" mark, in ONE MULTI/EXEC
              train     a child job run in this process (`jobs.execute`): DPO on the pairs, or
                        PPO / GRPO on the round's ScoredSamples (rollout.RolloutWorker)
              activate  the child's version (the loop's own stage: the child does not activate)
              swap      until the policy service serves it
              evaluate  held-out prompts: mean labeller score, KL to the original reference,
                        win rate of the new version against the previous one
    stop      after `rounds`, on a plateau of the held-out score, or past `stop.max_kl`

Every stage is idempotent and keyed by loop id and round, so a loop killed anywhere resumes
where it stopped:
- the round's record (`rlhf:loop:<id>:round:<k>`, a hash) holds its marks: the start version,
  `collected` (written in the same transaction as the pairs: they are pushed whole or not at all),
  the child job and its `new_version`, `activated`, `done` (with the evaluation);
- the child's job id is fixed (`<loop id>-r<k>-<trainer>`): a finished child is never trained
  again (`execute` answers "skipped" with its version), and one killed mid-training resumes as
  its next attempt from its own pending stream entries; one killed after publishing is found
  in the store by job id and finished, never trained or published again — so a loop killed
  between publish and activate ends with exactly one version for that round;
- PPO / GRPO rounds push their samples through the rollout worker (group by group): a round
  collected only in part is started over on an emptied stream (nothing read it yet).

Pairs and samples go to streams of the round's own (`jobs.loop_stream`); each pair carries the
policy version that wrote it, both scores, the builder, the labeller, the loop id and round.
Human pairs (`human`) are read from their stream through the loop's consumer group, copied
into the round's stream and acked there in that same transaction.

Overlap (`overlap: true`): round k+1's collection runs in a thread while round k trains — it
samples the version being trained from, so round k+1 trains one version off-policy (PPO's
`max_staleness` ≥ 1 admits those samples; a pair records the version that wrote it).

The evaluation samples the held-out prompts at temperature 1 with the same seed every round
(common random numbers: rounds differ by the policy, not by the draw). With a reward model the
held-out score is the mean reward; a judge's scores are relative to the group they were scored
in, so with a judge it is the mean P(sample of this version ≻ sample of the original) on the
same prompts (0.5 for the original itself). KL to the original: mean over samples of
Σ_t log π(y_t) − log π_ref(y_t) (k1; the policy's log-probs as sampled, the ReferenceService's
of the same tokens). Win rate: share of (prompt, sample) where the labeller prefers this
version's sample to the previous version's (ties half).

Reading a loop: `read_loop(r, loop_id)`; `plot_loop(rounds, path)`; the CLI is `rlhf loop`
(loop_cli.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_client.queues import encode_entry
from rlhf_client.registry import Registry
from rlhf_client.training import JobRecord, read_job

from rlhf.trainer.jobs import (
    JobResult,
    LoopJob,
    RedisGone,
    TransientError,
    loop_stream,
)

if TYPE_CHECKING:
    from rlhf.trainer.jobs import JobContext
    from rlhf.trainer.labellers import Labeller

log = logging.getLogger(__name__)

JOB_TYPE = "iterate"
LOOP_PREFIX = "rlhf:loop:"
POLL_S = 0.2
#: A child job another (dead) attempt still holds: wait at most this long per try.
_BUSY_WAIT_CAP_S = 5.0


class LoopError(RuntimeError):
    """The loop cannot go on (a child job failed, the policy service never served a version ...)."""


def state_key(loop_id: str) -> str:
    """The loop's own hash: original version, stop reason, final version."""
    return f"{LOOP_PREFIX}{loop_id}"


def round_key(loop_id: str, round_: int) -> str:
    return f"{LOOP_PREFIX}{loop_id}:round:{round_}"


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


def load_prompts(spec) -> list[tuple[str, str]]:
    """(id, text) of a `jobs.PromptsSpec`: a JSONL file's rows, or the texts as p0, p1, ..."""
    if spec.texts is not None:
        return [(f"p{i}", t) for i, t in enumerate(spec.texts)]
    from rlhf.trainer.rollout import load_prompts_file

    return [(it.id, it.text) for it in load_prompts_file(Path(spec.path))]


def round_prompts(prompts: Sequence[tuple[str, str]], k: int, per_round: int | None,
                  seed: int) -> list[tuple[str, str]]:
    """The prompts round k samples: all of them, or a draw of `per_round` fixed by (seed, k)."""
    if per_round is None or per_round >= len(prompts):
        return list(prompts)
    rng = random.Random(f"{seed}:{k}")
    return sorted(rng.sample(list(prompts), per_round))


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[s : s + size]) for s in range(0, len(items), size)]


# ------------------------------------------------------------------------------------------------
# Sampling and evaluation (plain functions over the clients)
# ------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """n completions per prompt, as sampled: texts, and per completion (prompt ids, trajectory
    ids, log-probs) when asked for log-probs; the versions that answered."""

    prompts: list[tuple[str, str]]
    texts: list[list[str]]
    versions: list[str]  # per prompt
    trajectories: list[list[tuple[list[int], list[int], list[float]]]] = field(default_factory=list)


def sample(policy, prompts: Sequence[tuple[str, str]], *, n: int, params, batch_prompts: int,
           seed: int, timeout: float, expect_version: str | None = None,
           deadline_s: float = 60.0, check: Callable[[], None] | None = None) -> Samples:
    """`n` samples per prompt from `policy` (a PolicyClient), `batch_prompts` prompts per call,
    each call seeded by (seed, its prompt ids) so the same prompts draw the same numbers.
    `expect_version`: a reply by another version is asked again (the service swaps shortly after
    an activation) until `deadline_s`, then `LoopError`."""
    from dataclasses import replace

    from rlhf.trainer.rollout import batch_seed

    out = Samples(list(prompts), [], [], [])
    for batch in _batches(list(prompts), batch_prompts):
        ids = [pid for pid, _ in batch]
        p = replace(params, seed=batch_seed(seed, ids))
        deadline = time.monotonic() + deadline_s
        while True:
            res = policy.generate([t for _, t in batch], p, n=n, timeout=timeout)
            if expect_version is None or res.model.version == expect_version:
                break
            if time.monotonic() >= deadline:
                raise LoopError(f"the policy service answers with {res.model.version}, not "
                                f"{expect_version}, after {deadline_s:.0f}s")
            if check is not None:
                check()
            time.sleep(POLL_S)
        if len(res.completions) != len(batch) * n:
            raise LoopError(f"the policy returned {len(res.completions)} completions for "
                            f"{len(batch)} prompts × n={n}")
        for i in range(len(batch)):
            comps = res.completions[i * n : (i + 1) * n]
            out.texts.append([c.text for c in comps])
            out.versions.append(res.model.version)
            if params.return_logprobs:
                out.trajectories.append([(list(c.prompt_token_ids), list(c.trajectory_token_ids),
                                          list(c.trajectory_logprobs)) for c in comps])
    return out


def kl_to_reference(reference, samples: Samples, *, timeout: float, batch_items: int = 64) -> float:
    """Mean over samples of Σ_t log π(y_t) − log π_ref(y_t) (k1), π's log-probs as sampled."""
    rows = [t for group in samples.trajectories for t in group if t[1]]
    if not rows:
        return 0.0
    total = 0.0
    for chunk in _batches(rows, batch_items):
        res = reference.logprobs([(p, c) for p, c, _ in chunk], timeout=timeout)
        for (_, _, lps), ref in zip(chunk, res.results):
            total += math.fsum(lps) - float(ref.sum)
    return total / len(rows)


def preferences(labeller: "Labeller", prompts: Sequence[tuple[str, str]],
                a: Sequence[Sequence[str]], b: Sequence[Sequence[str]]) -> list[float]:
    """P(a_ij ≻ b_ij) by the labeller for every prompt i and sample j."""
    from rlhf.trainer.labellers import compare_all

    return compare_all(labeller, [(text, x, y) for (_, text), xs, ys in zip(prompts, a, b)
                                  for x, y in zip(xs, ys)])


def win_rate(prefs: Sequence[float]) -> float:
    """Share of comparisons won (P > ½), ties (P = ½) counting half."""
    return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prefs) / max(1, len(prefs))


@dataclass
class Evaluation:
    version: str
    score: float  # mean reward, or mean P(≻ original) with a relative labeller
    metric: str  # "mean_reward" | "p_vs_original"
    kl: float | None
    win_rate: float | None  # against the previous version
    preference: float | None  # mean P(this ≻ previous)
    texts: list[list[str]]

    def fields(self) -> dict[str, str]:
        out = {"held_out_score": repr(self.score), "held_out_metric": self.metric,
               "eval_texts": json.dumps(self.texts)}
        for k in ("kl", "win_rate", "preference"):
            v = getattr(self, k)
            if v is not None:
                out[k] = repr(v)
        return out


def evaluate(policy, labeller: "Labeller", reference, prompts: Sequence[tuple[str, str]], *,
             n: int, max_new_tokens: int, seed: int, batch_prompts: int, timeout: float,
             version: str, previous: Sequence[Sequence[str]] | None,
             original: Sequence[Sequence[str]] | None) -> Evaluation:
    """The held-out evaluation of `version` (see the module docstring); `previous` / `original`:
    the held-out samples of the previous / the original version (None for the original)."""
    from rlhf_client import SamplingParams

    from rlhf.trainer.labellers import is_absolute

    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, return_logprobs=True)
    got = sample(policy, prompts, n=n, params=params, batch_prompts=batch_prompts, seed=seed,
                 timeout=timeout, expect_version=version)
    kl = kl_to_reference(reference, got, timeout=timeout) if reference is not None else None
    if is_absolute(labeller):
        scores = labeller.score_groups([t for _, t in prompts], got.texts)
        flat = [s for g in scores for s in g]
        score, metric = sum(flat) / len(flat), "mean_reward"
    elif original is None:  # the original against itself
        score, metric = 0.5, "p_vs_original"
    else:
        vs_original = preferences(labeller, prompts, got.texts, original)
        score, metric = sum(vs_original) / len(vs_original), "p_vs_original"
    prefs = preferences(labeller, prompts, got.texts, previous) if previous is not None else None
    return Evaluation(version, score, metric, kl, win_rate(prefs) if prefs else None,
                      sum(prefs) / len(prefs) if prefs else None, got.texts)


# ------------------------------------------------------------------------------------------------
# Reading a loop
# ------------------------------------------------------------------------------------------------

_NUMBERS = ("held_out_score", "kl", "win_rate", "preference", "started", "finished",
            "collect_started", "collected_at", "train_started", "trained_at")
_INTS = ("round", "pairs_machine", "pairs_human", "samples", "prompts")


def parse_round(h: dict[str, str]) -> dict[str, Any]:
    """A round record as typed values (numbers, the stage times, the child's metrics)."""
    out: dict[str, Any] = {k: v for k, v in h.items() if k != "eval_texts"}
    for k in _NUMBERS:
        if k in h:
            out[k] = float(h[k])
    for k in _INTS:
        if k in h:
            out[k] = int(h[k])
    for k in ("seconds", "train_metrics", "versions"):
        out[k] = json.loads(h[k]) if h.get(k) else ({} if k != "versions" else [])
    out["done"] = h.get("done") == "1"
    return out


@dataclass
class LoopStatus:
    record: JobRecord | None
    state: dict[str, str]
    rounds: list[dict[str, Any]]  # round 0 (the baseline) first

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record.to_dict() if self.record else None, "state": self.state,
                "rounds": self.rounds}


def read_rounds(r, loop_id: str) -> list[dict[str, Any]]:
    """Every round record of the loop (those that started), round 0 first."""
    out = []
    k = 0
    while True:
        h = r.hgetall(round_key(loop_id, k))
        if not h:
            break
        out.append(parse_round({_s(a): _s(b) for a, b in h.items()}))
        k += 1
    return out


def read_loop(r, loop_id: str) -> LoopStatus:
    """The loop's job record, its own state and its rounds (`r`: any Redis client)."""
    state = {_s(a): _s(b) for a, b in r.hgetall(state_key(loop_id)).items()}
    return LoopStatus(read_job(r, loop_id), state, read_rounds(r, loop_id))


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ------------------------------------------------------------------------------------------------
# The plot
# ------------------------------------------------------------------------------------------------

STAGES = ("collect", "label", "human", "push", "train", "activate", "swap", "evaluate")


def plot_loop(rounds: Sequence[dict[str, Any]], path: str | Path, *,
              title: str | None = None) -> Path:
    """One PNG of the loop's rounds (`read_rounds`): held-out score, KL to the original, win
    rate against the previous version, pairs used (machine / human), wall time per stage."""
    from matplotlib.ticker import MaxNLocator

    from rlhf.plots import pyplot, save_figure

    done = [r for r in rounds if r.get("done")]
    if not done:
        raise ValueError("no round is evaluated yet")
    ks = [r["round"] for r in done]
    fig, axes = pyplot().subplots(1, 5, figsize=(19, 3.8))
    a, b, c, d, e = axes
    metric = done[0].get("held_out_metric", "mean_reward")
    a.plot(ks, [r["held_out_score"] for r in done], marker="o", color="#2a7ab9")
    a.set_title("held-out " + ("mean reward" if metric == "mean_reward"
                               else "P(≻ original) by the judge"))
    kl = [(r["round"], r["kl"]) for r in done if "kl" in r]
    if kl:
        b.plot(*zip(*kl), marker="o", color="#edae49")
    b.set_title("KL to the original (nats / sample, k1)")
    wr = [(r["round"], r["win_rate"]) for r in done if "win_rate" in r]
    if wr:
        c.plot(*zip(*wr), marker="o", color="#66a182")
    c.axhline(0.5, color="#999999", linewidth=0.8)
    c.set_ylim(0, 1)
    c.set_title("win rate vs the previous version")
    trained = [r for r in done if r["round"] > 0]
    tk = [r["round"] for r in trained]
    machine = [r.get("pairs_machine", r.get("samples", 0)) for r in trained]
    human = [r.get("pairs_human", 0) for r in trained]
    d.bar(tk, machine, color="#2a7ab9", label="machine")
    d.bar(tk, human, bottom=machine, color="#d1495b", label="human")
    d.set_title("pairs (samples) used")
    d.legend(fontsize=8)
    bottom = [0.0] * len(trained)
    for stage in STAGES:
        vals = [r["seconds"].get(stage, 0.0) for r in trained]
        if any(vals):
            e.bar(tk, vals, bottom=bottom, label=stage)
            bottom = [x + y for x, y in zip(bottom, vals)]
    e.set_title("wall time per stage (s)")
    e.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title=title, dpi=100)


# ------------------------------------------------------------------------------------------------
# Stop rules
# ------------------------------------------------------------------------------------------------


def stop_reason(spec: LoopJob, done: Sequence[dict[str, Any]]) -> str | None:
    """Why the loop stops after the last of `done` (round 0 first), or None to go on."""
    last = done[-1]
    k = last["round"]
    if spec.stop.max_kl is not None and last.get("kl") is not None \
            and last["kl"] > spec.stop.max_kl:
        return "max_kl"
    p = spec.stop.patience
    if p is not None and k >= p:
        scores = [r["held_out_score"] for r in done]
        if max(scores[-p:]) < max(scores[:-p]) + spec.stop.min_improvement:
            return "plateau"
    if k >= spec.rounds:
        return "rounds"
    return None


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """An overlapped collection told to stop (the loop ended first)."""


class _Clients:
    """One thread's clients: the policy and the labeller (the overlapped collection has its own)."""

    def __init__(self, spec: LoopJob, token: str | None):
        from rlhf_client import PolicyClient

        from rlhf.trainer.labellers import make_labeller

        self.policy = PolicyClient(spec.policy, token=token, timeout=spec.rpc_timeout_s)
        try:
            self.labeller = make_labeller(spec.labeller, token=token)
        except Exception:
            self.policy.close()
            raise

    def close(self) -> None:
        self.labeller.close()
        self.policy.close()


class LoopRunner:
    """Runs one attempt of a loop job (see the module docstring)."""

    def __init__(self, spec: LoopJob, ctx: "JobContext"):
        from rlhf.models.store import ModelStore

        self.spec, self.ctx = spec, ctx
        self.settings = ctx.settings
        self.r = ctx.redis_text
        self.registry = Registry(self.r)
        self.store = ModelStore(self.settings.store_dir)
        self.token = (self.settings.auth_token.get_secret_value()
                      if self.settings.auth_token is not None else None)
        self.prompts = load_prompts(spec.prompts)
        self.held_out = load_prompts(spec.held_out.prompts)
        self.state = state_key(spec.job_id)
        self._stopping = threading.Event()
        self._thread = threading.current_thread()  # the overlapped collection runs in another
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loop-collect")
        self._human_entries: list = []  # human entries held until the round's push
        self._human_consumer = None
        self.rb = ctx.redis_bytes
        self.clients = _Clients(spec, self.token)
        self.reference = None
        if spec.reference is not None:
            from rlhf_client import ReferenceClient

            self.reference = ReferenceClient(spec.reference, token=self.token,
                                             timeout=spec.rpc_timeout_s)

    def close(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=True)
        if self._human_consumer is not None:
            self._human_consumer.close()
        self.clients.close()
        if self.reference is not None:
            self.reference.close()

    # ------------------------------------------------------------------ records
    def _round(self, k: int) -> dict[str, str]:
        return self.ctx.redis(lambda: self.r.hgetall(round_key(self.spec.job_id, k)),
                              f"read round {k}")

    def _mark(self, k: int, fields: dict[str, Any]) -> None:
        key = round_key(self.spec.job_id, k)
        self.ctx.redis(lambda: self.r.hset(key, mapping={f: str(v) for f, v in fields.items()}),
                       f"record round {k}")

    def _timed(self, k: int, stage: str, seconds: float) -> None:
        """Add `seconds` to the round's wall time for `stage`."""
        key = round_key(self.spec.job_id, k)

        def add() -> None:
            times = json.loads(self.r.hget(key, "seconds") or "{}")
            times[stage] = round(times.get(stage, 0.0) + seconds, 3)
            self.r.hset(key, "seconds", json.dumps(times))

        self.ctx.redis(add, f"record round {k}'s times")

    def _progress(self, k: int, stage: str, **more: Any) -> None:
        if not self._in_loop_thread():
            return  # an overlapped collection: the record follows the round being trained
        frac = (max(0, k - 1) + STAGES.index(stage) / len(STAGES)) / self.spec.rounds \
            if stage in STAGES else max(0, k) / self.spec.rounds
        self.ctx.progress(min(frac, 1.0), {"round": k, "rounds": self.spec.rounds, "stage": stage,
                                           **more}, force=True)

    # ------------------------------------------------------------------ the loop
    def run(self) -> JobResult:
        spec, ctx = self.spec, self.ctx
        original = self._start()
        done = [parse_round(self._round(0))]
        prefetch: concurrent.futures.Future | None = None
        reason = None
        for k in range(1, spec.rounds + 1):
            ctx.check()
            rec = self._round(k)
            if rec.get("done") != "1":
                prefetch = self._run_round(k, done[-1]["new_version"], original, prefetch)
                rec = self._round(k)
            done.append(parse_round(rec))
            reason = rec.get("stop_reason") or stop_reason(spec, done)
            if reason is not None:
                break
        self._stopping.set()
        if prefetch is not None:  # a collection for a round that will not run
            try:
                prefetch.result()
            except _Cancelled:
                pass
            except Exception:  # noqa: BLE001 - its round never runs: nothing depends on it
                log.warning("loop %s: the collection of an unrun round failed", spec.job_id,
                            exc_info=True)
        last = done[-1]
        final = last.get("new_version") or done[-2]["new_version"]
        self._mark(last["round"], {"stop_reason": reason})
        ctx.redis(lambda: self.r.hset(self.state, mapping={"stop_reason": reason,
                                                           "final_version": final}),
                  "record the loop's end")
        self._expire(last["round"])
        scores = [r["held_out_score"] for r in done if r.get("done")]
        metrics = {"rounds_done": sum(1 for r in done if r.get("done") and r["round"] > 0),
                   "stop_reason": reason, "original_version": original, "final_version": final,
                   "held_out_scores": scores,
                   "held_out_metric": done[0].get("held_out_metric"),
                   "kl": [r.get("kl") for r in done if r.get("done")],
                   "win_rates": [r.get("win_rate") for r in done[1:] if r.get("done")]}
        ctx.progress(1.0, metrics, force=True)
        log.info("loop %s: stopped after round %d (%s); %s active; held-out %s", spec.job_id,
                 last["round"], reason, final, [round(s, 3) for s in scores])
        return JobResult(final, metrics)

    def _expire(self, last: int) -> None:
        """Loop keys live as long as job records once the loop is over."""
        ttl = self.settings.job_record_ttl_s
        keys = [self.state] + [round_key(self.spec.job_id, k) for k in range(last + 2)]
        keys += [loop_stream(self.spec.job_id, k, kind) for k in range(1, last + 2)
                 for kind in ("pairs", "samples")]

        def expire() -> None:
            pipe = self.r.pipeline(transaction=False)
            for key in keys:
                pipe.expire(key, ttl)
            pipe.execute()

        self.ctx.redis(expire, "set the loop's keys to expire")

    def _start(self) -> str:
        """The original version (recorded once), the policy checked, round 0 evaluated."""
        spec, ctx = self.spec, self.ctx
        original = ctx.redis(lambda: self.r.hget(self.state, "original_version"),
                             "read the loop's state")
        if original is None:
            version = spec.base_version or self.registry.active(spec.model_name)
            if version is None:
                raise LoopError(f"model {spec.model_name!r} has no active version to start from")
            ctx.redis(lambda: self.r.hsetnx(self.state, "original_version", version),
                      "record the original version")
            original = self.r.hget(self.state, "original_version")
        info = self.clients.policy.get_model(timeout=spec.rpc_timeout_s)
        if info.model.name != spec.model_name or not info.follows_registry:
            how = "following the registry" if info.follows_registry else "pinned"
            raise LoopError(f"policy {spec.policy}: serves {info.model.name} "
                            f"{info.model.version} ({how}); the loop needs a PolicyService that "
                            f"follows {spec.model_name!r}")
        if self._round(0).get("done") == "1":
            return original
        self._mark(0, {"round": 0, "start_version": original, "new_version": original,
                       "started": f"{time.time():.3f}"})
        if self.registry.active(spec.model_name) != original:  # base_version: make it served
            self.registry.activate(spec.model_name, original)
        self._progress(0, "swap")
        self._wait_serving(original)
        self._progress(0, "evaluate")
        t0 = time.monotonic()
        ev = self._evaluate(original, previous=None, original=None)
        self._mark(0, {**ev.fields(), "done": 1, "finished": f"{time.time():.3f}"})
        self._timed(0, "evaluate", time.monotonic() - t0)
        log.info("loop %s: round 0 (%s): held-out %s %.4f%s", spec.job_id, original, ev.metric,
                 ev.score, f", KL {ev.kl:.3f}" if ev.kl is not None else "")
        return original

    def _run_round(self, k: int, start: str, original: str,
                   prefetch: concurrent.futures.Future | None) -> concurrent.futures.Future | None:
        """Round k from wherever its record says it got to; returns the overlapped collection
        of round k+1 (None without overlap)."""
        spec = self.spec
        key = round_key(spec.job_id, k)
        self.ctx.redis(lambda: self.r.hsetnx(key, "start_version", start), "start the round")
        self._mark(k, {"round": k})
        self.ctx.redis(lambda: self.r.hsetnx(key, "started", f"{time.time():.3f}"),
                       "start the round")
        start = self.r.hget(key, "start_version")
        if prefetch is not None:
            prefetch.result()  # round k's overlapped collection
        rec = self._round(k)
        if rec.get("collected") != "1":
            self._collect(k, self.clients, expect_version=start)
            rec = self._round(k)
        used = int(rec.get("pairs_machine", 0)) + int(rec.get("pairs_human", 0)) \
            if spec.trainer == "dpo" else int(rec.get("samples", 0))
        child = spec.child_spec(k, start, original)
        need = child.min_pairs if spec.trainer == "dpo" else child.min_samples
        if used < need and not rec.get("new_version"):
            why = f"round {k} made {used} {'pairs' if spec.trainer == 'dpo' else 'samples'}; " \
                  f"training needs {need}"
            log.warning("loop %s: %s: the loop stops", spec.job_id, why)
            self._mark(k, {"stop_reason": "too_few_pairs", "note": why})
            return None
        nxt = None
        if spec.overlap and k < spec.rounds and self._round(k + 1).get("collected") != "1":
            nxt = self._pool.submit(self._collect_overlapped, k + 1)
        try:
            version = rec.get("new_version") or self._train(k, child)
            if rec.get("activated") != "1":
                self._progress(k, "activate")
                t0 = time.monotonic()
                self.registry.activate(spec.model_name, version)
                self._mark(k, {"activated": 1})
                self._timed(k, "activate", time.monotonic() - t0)
            self._progress(k, "swap", version=version)
            t0 = time.monotonic()
            self._wait_serving(version)
            self._timed(k, "swap", time.monotonic() - t0)
            self._progress(k, "evaluate", version=version)
            t0 = time.monotonic()
            prev = json.loads(self._round(k - 1).get("eval_texts") or "null")
            base = json.loads(self._round(0).get("eval_texts") or "null")
            ev = self._evaluate(version, previous=prev, original=base)
            self._mark(k, {**ev.fields(), "done": 1, "finished": f"{time.time():.3f}"})
            self._timed(k, "evaluate", time.monotonic() - t0)
        except BaseException:
            if nxt is not None:
                self._stopping.set()
                with contextlib.suppress(BaseException):
                    nxt.result()
            raise
        log.info("loop %s: round %d: %s → %s: held-out %s %.4f%s%s", spec.job_id, k, start,
                 version, ev.metric, ev.score, f", KL {ev.kl:.3f}" if ev.kl is not None else "",
                 f", win rate {ev.win_rate:.2f}" if ev.win_rate is not None else "")
        return nxt

    # ------------------------------------------------------------------ stages
    def _wait_serving(self, version: str) -> None:
        deadline = time.monotonic() + self.spec.swap_timeout_s
        while True:
            served = self.clients.policy.get_model(timeout=self.spec.rpc_timeout_s).model.version
            if served == version:
                return
            if time.monotonic() >= deadline:
                raise LoopError(f"the policy service still serves {served}, not {version}, after "
                                f"{self.spec.swap_timeout_s:g}s (does it follow "
                                f"{self.spec.model_name!r} on this registry?)")
            self.ctx.check()
            time.sleep(POLL_S)

    def _evaluate(self, version: str, *, previous, original) -> Evaluation:
        h = self.spec.held_out
        n, batch = h.n, self._batch_prompts(h.n, for_scores=False)
        return evaluate(self.clients.policy, self.clients.labeller, self.reference, self.held_out,
                        n=n, max_new_tokens=h.max_new_tokens or self.spec.sampling.max_new_tokens,
                        seed=h.seed, batch_prompts=batch, timeout=self.spec.rpc_timeout_s,
                        version=version, previous=previous, original=original)

    def _batch_prompts(self, n: int, *, for_scores: bool) -> int:
        """Prompts per call within the services' limits (prompts, prompts × n, and scored or
        reference items per call)."""
        s = self.settings
        limit = min(s.max_prompts_per_request, s.max_samples_per_request // n)
        if for_scores:
            limit = min(limit, s.max_prompts_per_request // n)
        return max(1, min(self.spec.sampling.batch_prompts, limit))

    def _collect_overlapped(self, k: int) -> None:
        """Round k's collection in the background thread, with its own clients."""
        clients = _Clients(self.spec, self.token)
        try:
            self._collect(k, clients, expect_version=None)
        finally:
            clients.close()

    def _collect(self, k: int, clients: _Clients, *, expect_version: str | None) -> None:
        if self.spec.trainer == "dpo":
            self._collect_pairs(k, clients, expect_version)
        else:
            self._collect_samples(k, clients)

    def _collect_pairs(self, k: int, clients: _Clients, expect_version: str | None) -> None:
        """Sample → label → pairs (+ human pairs) → push all with the mark in ONE MULTI/EXEC."""
        from rlhf_client import SamplingParams

        from rlhf.trainer.pairs import build_pairs, group_rng

        spec, s = self.spec, self.spec.sampling
        prompts = round_prompts(self.prompts, k, spec.prompts_per_round, s.seed)
        self._progress(k, "collect")
        started = f"{time.time():.3f}"
        t0 = time.monotonic()
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_new_tokens=s.max_new_tokens)
        seed = _round_seed(s.seed, k)
        got = sample(clients.policy, prompts, n=s.n, params=params,
                     batch_prompts=self._batch_prompts(s.n, for_scores=False), seed=seed,
                     timeout=spec.rpc_timeout_s, expect_version=expect_version,
                     deadline_s=spec.swap_timeout_s, check=self._check_collecting)
        t_collect = time.monotonic() - t0
        self._check_collecting()
        self._progress(k, "label")
        t0 = time.monotonic()
        scores: list[list[float]] = []
        step = self._batch_prompts(s.n, for_scores=True)
        for i in range(0, len(prompts), step):
            scores += clients.labeller.score_groups([t for _, t in prompts[i : i + step]],
                                                    got.texts[i : i + step])
            self._check_collecting()
        sampling = json.dumps({"n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                               "top_k": s.top_k, "max_new_tokens": s.max_new_tokens,
                               "seed": seed}, sort_keys=True)
        pairs = []
        for (pid, text), texts, sc, version in zip(prompts, got.texts, scores, got.versions):
            ref = _Ref(spec.model_name, version)
            pairs += build_pairs(text, pid, texts, sc, builder=spec.pairs.builder,
                                 min_margin=spec.pairs.min_margin,
                                 rng=group_rng(seed, pid, version), labeller=clients.labeller.name,
                                 policy=ref, source=f"loop:{spec.job_id}",
                                 metadata={"loop": spec.job_id, "round": str(k),
                                           "sampling": sampling})
        t_label = time.monotonic() - t0
        human, consumer, t_human = [], None, 0.0
        if spec.human is not None:
            self._progress(k, "human")
            t0 = time.monotonic()
            consumer, human = self._human_pairs(k)
            t_human = time.monotonic() - t0
        t0 = time.monotonic()
        stream = loop_stream(spec.job_id, k, "pairs")
        key = round_key(spec.job_id, k)
        mark = {"collected": "1", "pairs_machine": str(len(pairs)), "prompts": str(len(prompts)),
                "pairs_human": str(sum(len(_pairs_of(e.payload)) for e in human)),
                "samples": str(len(prompts) * s.n),
                "versions": json.dumps(sorted(set(got.versions))),
                "collect_started": started, "collected_at": f"{time.time():.3f}"}

        def push() -> None:
            pipe = self.rb.pipeline(transaction=True)
            for p in pairs:
                pipe.xadd(stream, encode_entry(p))
            for e in human:
                pipe.xadd(stream, encode_entry(e.payload))
            if human:
                consumer.queue_commit(pipe, [e.id for e in human], [e.entry_id for e in human])
            pipe.hset(key, mapping=mark)
            pipe.execute()

        self.ctx.redis(push, f"push round {k}'s pairs")
        self._human_entries.clear()
        for stage, secs in (("collect", t_collect), ("label", t_label), ("human", t_human),
                            ("push", time.monotonic() - t0)):
            if secs:
                self._timed(k, stage, secs)
        log.info("loop %s: round %d: %d prompts × %d samples → %d pairs (+%d human) from %s",
                 spec.job_id, k, len(prompts), s.n, len(pairs), int(mark["pairs_human"]),
                 ", ".join(sorted(set(got.versions))))

    def _human_pairs(self, k: int):
        """(consumer, entries): human payloads from the human stream, waiting up to `wait_s`
        for `min_pairs` pairs; left pending with the loop's consumer until the round's push."""
        from rlhf.trainer.data import check_preference_payload
        from rlhf.trainer.queues import StreamConsumer

        h, spec = self.spec.human, self.spec
        if self._human_consumer is None:
            self._human_consumer = StreamConsumer(
                self.rb, h.stream, h.group or f"loop-{spec.job_id}", f"loop-{spec.job_id}",
                max_deliveries=self.settings.queue_max_deliveries,
                claim_idle_ms=self.settings.queue_claim_idle_ms, validate=check_preference_payload)
            consumer = self._human_consumer
            # the entries held while waiting are touched by the loop's heartbeat
            self.ctx.on_heartbeat(lambda: consumer.touch(list(self._human_entries)))
        consumer = self._human_consumer
        entries = self._human_entries
        deadline = time.monotonic() + h.wait_s
        n = 0
        while len(entries) < h.max_pairs:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                log.warning("loop %s: round %d: %d human pairs after %gs (wanted %d); training "
                            "on what came", spec.job_id, k, n, h.wait_s, h.min_pairs)
                break
            entries.extend(consumer.read(h.max_pairs - len(entries),
                                         block_ms=min(left_ms, 1000)))
            n = sum(len(_pairs_of(e.payload)) for e in entries)
            if n >= h.min_pairs:  # enough: take what else is there now, and go
                entries.extend(consumer.read(h.max_pairs - len(entries)))
                break
            self._check_collecting()
        return consumer, list(entries)

    def _collect_samples(self, k: int, clients: _Clients) -> None:
        """PPO / GRPO: the rollout worker answers the round's prompts with n ScoredSamples each
        (policy → labeller → ReferenceService) on the round's samples stream."""
        from rlhf_client import AsyncPolicyClient, AsyncReferenceClient, AsyncRewardClient

        from rlhf.trainer.rollout import ListSource, PromptItem, RolloutOptions, RolloutWorker

        spec, s = self.spec, self.spec.sampling
        stream = loop_stream(spec.job_id, k, "samples")
        self.ctx.redis(lambda: self.rb.delete(stream),
                       "empty a partly collected round")  # nothing read it: no mark yet
        prompts = round_prompts(self.prompts, k, spec.prompts_per_round, s.seed)
        options = RolloutOptions(
            n=s.n, batch_prompts=self._batch_prompts(s.n, for_scores=True), concurrency=2,
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, seed=_round_seed(s.seed, k), samples_stream=stream,
            model_name=spec.model_name, rpc_timeout_s=spec.rpc_timeout_s,
            max_attempts=self.settings.queue_max_deliveries, log_interval_s=3600.0)
        items = [PromptItem(pid, text, f"loop:{spec.job_id}") for pid, text in prompts]
        self._progress(k, "collect")
        started = f"{time.time():.3f}"
        t0 = time.monotonic()
        kw = dict(token=self.token, timeout=spec.rpc_timeout_s)

        async def go():
            async with AsyncPolicyClient(spec.policy, **kw) as pc, \
                    AsyncReferenceClient(spec.reference, **kw) as fc:
                if spec.labeller.type == "reward":
                    rc_cm = AsyncRewardClient(spec.labeller.target, **kw)
                else:
                    rc_cm = contextlib.nullcontext(_LabellerScorer(clients.labeller, s.n))
                async with rc_cm as rc:
                    worker = RolloutWorker(pc, rc, fc, self.rb, ListSource(
                        items, max_attempts=options.max_attempts, backoff_s=0.5), options,
                        name=f"loop-{spec.job_id}-r{k}")
                    return await worker.run()

        stats = asyncio.run(go())
        if stats.gave_up or stats.left:
            raise TransientError(f"round {k}: {len(stats.gave_up)} prompt(s) failed every "
                                 f"attempt, {stats.left} left unanswered")
        self._mark(k, {"collected": 1, "samples": stats.samples_pushed, "prompts": len(prompts),
                       "collect_started": started, "collected_at": f"{time.time():.3f}"})
        self._timed(k, "collect", time.monotonic() - t0)

    def _in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _check_collecting(self) -> None:
        if self._in_loop_thread():
            self.ctx.check()
        elif self._stopping.is_set():
            raise _Cancelled("the loop ended")

    def _train(self, k: int, child) -> str:
        """Run round k's child job here (`jobs.execute`) until it has a version."""
        from rlhf.trainer.jobs import execute

        spec = self.spec
        if spec.trainer == "dpo":
            from rlhf.trainer.dpo import run_dpo_job as work
        else:
            from rlhf.trainer.ppo import run_ppo_job as work
        self._mark(k, {"child_job": child.job_id, "train_started": f"{time.time():.3f}"})
        self._progress(k, "train", child_job=child.job_id)
        t0 = time.monotonic()
        # A cancelled loop cancels the round's job too (it stops at its next step check).
        self.ctx.on_heartbeat(lambda: self.ctx.cancel_seen.is_set()
                              and self.ctx.jobs.request_cancel(child.job_id))
        while True:
            self.ctx.check()
            out = execute(child, work, settings=self.settings, worker=f"loop-{spec.job_id}")
            if out.status in ("succeeded", "skipped", "cancelled"):
                rec = read_job(self.r, child.job_id)
                if rec is not None and rec.status == "failed":
                    raise LoopError(f"round {k}: training job {child.job_id} failed: {rec.error}")
                if rec is not None and rec.status == "cancelled":
                    self.ctx.check()  # the loop's own cancel: CancelRequested
                    raise LoopError(f"round {k}: training job {child.job_id} was cancelled")
                version = out.version or (rec.version if rec else None)
                if version is None:
                    raise LoopError(f"round {k}: training job {child.job_id} published nothing")
                break
            if out.status == "failed":
                raise LoopError(f"round {k}: training job {child.job_id} failed: {out.error}")
            if out.status == "interrupted":
                raise RedisGone(out.error or "Redis went away")
            # busy (a dead attempt's lease has not expired yet), abandoned, retry: again
            wait = min(out.retry_in_s or 1.0, _BUSY_WAIT_CAP_S if out.status != "retry" else 60)
            log.info("loop %s: round %d: training job %s %s; again in %.1fs", spec.job_id, k,
                     child.job_id, out.status, wait)
            time.sleep(wait)
        rec = read_job(self.r, child.job_id)
        metrics = rec.metrics if rec is not None else {}
        keep = {m: metrics[m] for m in ("eval_accuracy", "eval_loss", "train_loss", "steps",
                                        "score_mean", "kl_ref", "train_pairs", "dropped_stale")
                if m in metrics}
        self._mark(k, {"new_version": version, "train_metrics": json.dumps(keep),
                       "trained_at": f"{time.time():.3f}",
                       "child_attempts": rec.attempts if rec is not None else 0})
        self._timed(k, "train", time.monotonic() - t0)
        return version


@dataclass(frozen=True)
class _Ref:
    name: str
    version: str


def _round_seed(seed: int, k: int) -> int:
    return seed * 1000 + k


def _pairs_of(payload) -> list:
    from rlhf.trainer.data import pairs_from_payload

    return pairs_from_payload(payload)


class _LabellerScorer:
    """A labeller in the rollout worker's reward client's place (PPO / GRPO with a judge): each
    request's items are its prompts' groups of n, in order."""

    def __init__(self, labeller: "Labeller", n: int):
        self.labeller = labeller
        self.n = n

    async def score(self, items, *, timeout=None, request_id=None):
        from rlhf_client import ModelRef, ScoreResult

        prompts = [p if isinstance(p, str) else "" for p, _ in items[:: self.n]]
        groups = [[r if isinstance(r, str) else "" for _, r in items[i : i + self.n]]
                  for i in range(0, len(items), self.n)]
        scores = await asyncio.to_thread(self.labeller.score_groups, prompts, groups)
        kind, _, ref = self.labeller.name.partition(":")
        name, _, version = ref.rpartition("@")
        return ScoreResult([float(x) for g in scores for x in g], ModelRef(name or kind, version))


def run_loop_job(spec: LoopJob, ctx: "JobContext") -> JobResult:
    """The loop as a job function (`jobs.execute(spec, run_loop_job)`): resumes from its records.
    A failed call to a service is transient (the attempt is retried, going on from the marks)."""
    from rlhf_client import RpcError

    try:
        runner = LoopRunner(spec, ctx)
        try:
            return runner.run()
        finally:
            runner.close()
    except RpcError as exc:
        raise TransientError(f"a service call failed: {exc}") from exc


__all__ = ["Evaluation", "LoopError", "LoopRunner", "LoopStatus", "evaluate", "kl_to_reference",
           "load_prompts", "parse_round", "plot_loop", "preferences", "read_loop", "read_rounds",
           "round_key", "round_prompts", "run_loop_job", "sample", "state_key", "stop_reason",
           "win_rate"]
