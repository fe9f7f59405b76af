"""Rollout workers on real parts: real policy / reward / reference services on 127.0.0.1 with
tiny models made on the spot, real Redis (db 13, names of their own), real `rlhf rollout`
processes where a process is what is tested (SIGKILL, SIGTERM, the CLI).

The policy serves a copy of the tiny policy whose generation config makes about one token in
twelve an eos id, so a run ends some samples with EOS and others at the length limit; the
reference serves the same weights, so reference log-probs must equal the behaviour ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
from helpers import TEST_REDIS, ThreadedApp, make_settings
from trainer_helpers import delete_matching, forget_model, unique, until, wait_for

from rlhf_client import (
    AsyncPolicyClient,
    AsyncReferenceClient,
    AsyncRewardClient,
    FinishReason,
    PolicyClient,
    QueueProducer,
    ReferenceClient,
    RewardClient,
)
from rlhf_client.queues import dead_letter_stream, decode_entry, encode_entry
from rlhf_client.redis_conn import connect
from rlhf_client.registry import Registry
from rlhfpb.v1 import samples_pb2

from rlhf.procs import free_port, start_service
from rlhf.trainer.queues import applied_ids, applied_key
from rlhf.trainer.rollout import (
    BadReply,
    ListSource,
    PromptItem,
    RolloutOptions,
    RolloutWorker,
    batch_seed,
    build_samples,
    cli_prompt_id,
    cli_prompts,
    load_prompts_file,
    score_item,
    stream_source,
)

REDIS_URL = f"{TEST_REDIS}/13"
N = 3
MAX_NEW = 8
GROUP = "rollout"
TOL = 1e-5
PROMPTS = [
    "the cat sat on the", "a good dog", "please pass the red", "my friend said that",
    "the weather today is", "once upon a time", "she opened the door and", "we went to the",
]
OPTIONS = RolloutOptions(n=N, batch_prompts=2, concurrency=2, max_new_tokens=MAX_NEW,
                         stale_backoff_s=0.05, log_interval_s=0.5)


# ------------------------------------------------------------------------------------------------
# Fixtures: services, Redis names
# ------------------------------------------------------------------------------------------------


@dataclass
class Services:
    policy: str
    reward: str
    reference: str
    eos_ids: frozenset[int]


@pytest.fixture(scope="module")
def eos_policy(tiny_policy_dir, tmp_path_factory) -> tuple[Path, frozenset[int]]:
    """The tiny policy with every 12th ordinary token an eos id too (generation_config.json)."""
    d = tmp_path_factory.mktemp("rollout-policy") / "policy"
    shutil.copytree(tiny_policy_dir, d)
    gen_path = d / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    eos = [0, *range(300, vocab, 12)]
    gen["eos_token_id"] = eos
    gen_path.write_text(json.dumps(gen))
    return d, frozenset(eos)


@pytest.fixture(scope="module")
def services(eos_policy, tiny_policy_dir, tiny_reward_dir):
    from rlhf.policy.app import make_policy_app
    from rlhf.reference.app import make_reference_app
    from rlhf.reward.app import make_reward_app

    fast = dict(batch_max_wait_ms=2)
    with ThreadedApp(make_policy_app(make_settings(model_dir=eos_policy[0], **fast))) as policy, \
            ThreadedApp(make_reward_app(make_settings(model_dir=tiny_reward_dir, **fast))) as reward, \
            ThreadedApp(make_reference_app(make_settings(model_dir=tiny_policy_dir, **fast))) as reference:
        yield Services(policy.target, reward.target, reference.target, eos_policy[1])


@pytest.fixture(scope="module")
def r():
    client = connect(REDIS_URL)
    yield client
    client.close()


@dataclass
class Keys:
    prompts: str
    samples: str


@pytest.fixture
def keys(r):
    base = unique("test:rollout")
    yield Keys(f"{base}:prompts", f"{base}:samples")
    delete_matching(r, f"{base}*")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def samples_in(r, stream: str) -> list[samples_pb2.ScoredSample]:
    return [decode_entry(fields) for _, fields in r.xrange(stream)]


def counts(r, stream: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in samples_in(r, stream):
        out[s.prompt_id] += 1
    return dict(out)


def pending(r, stream: str, consumer: str | None = None) -> int:
    """Entries pending in the rollout group (of one consumer); 0 before the group exists."""
    try:
        if consumer is None:
            return int(r.xpending(stream, GROUP)["pending"])
        return len(r.xpending_range(stream, GROUP, "-", "+", 1000, consumername=consumer))
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return 0


def push_prompts(r, stream: str, texts, prefix: str) -> dict[str, str]:
    producer = QueueProducer(r)
    out = {}
    for i, text in enumerate(texts):
        pid = producer.push_prompt(id=f"{prefix}-{i}", prompt=text, source="test", stream=stream)
        out[pid] = text
    return out


def check_groups(samples, prompts: dict[str, str], eos_ids, *, n: int = N) -> dict[str, list]:
    """Exactly n samples per prompt, every field filled and consistent."""
    by: dict[str, list] = defaultdict(list)
    for s in samples:
        by[s.prompt_id].append(s)
    assert set(by) == set(prompts)
    ids = [s.id for s in samples]
    assert len(ids) == len(set(ids)), "a sample id twice"
    assert len({s.group_id for s in samples}) == len(prompts)
    for pid, group in by.items():
        assert sorted(s.sample_index for s in group) == list(range(n))
        version = group[0].policy.version
        assert {s.group_id for s in group} == {f"{pid}:{version}"}
        for s in group:
            assert s.id == f"{pid}:{version}:{s.sample_index}"
            assert s.prompt == prompts[pid] and s.prompt_ids
            for ref in (s.policy, s.reward_model, s.reference):
                assert ref.name and ref.version
            assert s.created.seconds > 0
            length = len(s.completion_ids)
            assert 1 <= length <= MAX_NEW
            assert len(s.behaviour_logprobs) == length == len(s.reference_logprobs)
            assert all(lp <= 0 for lp in s.behaviour_logprobs)
            inner = [t for t in s.completion_ids[:-1] if t in eos_ids]
            assert not inner, "generation went on after an eos"
            if s.finish_reason == FinishReason.EOS:
                assert s.completion_ids[-1] in eos_ids  # the eos is inside the trajectory
            else:
                assert s.finish_reason == FinishReason.LENGTH and length == MAX_NEW
                assert s.completion_ids[-1] not in eos_ids
    return by


def check_against_services(samples, svc: Services) -> None:
    """Rewards equal a direct Score call, reference log-probs a direct LogProbs call, and (same
    weights) the behaviour log-probs equal the reference ones."""
    def item(s):
        return (s.prompt, s.completion) if s.completion else (list(s.prompt_ids), list(s.completion_ids))

    with RewardClient(svc.reward) as rc, ReferenceClient(svc.reference) as fc:
        scored = rc.score([item(s) for s in samples])
        ref = fc.logprobs([(list(s.prompt_ids), list(s.completion_ids)) for s in samples])
    for s, reward, lps in zip(samples, scored.rewards, ref.results):
        assert abs(s.reward - reward) < TOL
        assert (s.reward_model.name, s.reward_model.version) == (scored.model.name, scored.model.version)
        assert (s.reference.name, s.reference.version) == (ref.model.name, ref.model.version)
        assert max(abs(a - b) for a, b in zip(s.reference_logprobs, lps.logprobs)) < TOL
        assert max(abs(a - b) for a, b in zip(s.behaviour_logprobs, s.reference_logprobs)) < 1e-4


@contextlib.asynccontextmanager
async def stream_worker(svc: Services, r, stream: str, options: RolloutOptions, *, reward: str | None = None,
                        max_deliveries: int = 5, claim_idle_ms: int = 1000, name: str | None = None):
    """An in-process RolloutWorker on `stream`, running until the block ends (then stopped)."""
    name = name or unique("w")
    async with AsyncPolicyClient(svc.policy, timeout=30) as pc, \
            AsyncRewardClient(reward or svc.reward, timeout=30) as rc, \
            AsyncReferenceClient(svc.reference, timeout=30) as fc:
        source = stream_source(r, stream=stream, group=GROUP, consumer=name,
                               max_deliveries=max_deliveries, claim_idle_ms=claim_idle_ms)
        worker = RolloutWorker(pc, rc, fc, r, source, options, name=name)
        await worker.start()
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)


def rollout_cmd(svc: Services, *args: str, reward: str | None = None) -> list[str]:
    return [sys.executable, "-m", "rlhf", "rollout", "--policy", svc.policy, "--reward", reward or svc.reward,
            "--reference", svc.reference, "--n", str(N), "--max-new-tokens", str(MAX_NEW),
            "--redis-url", REDIS_URL, "--metrics-port", "0", *args]


# ------------------------------------------------------------------------------------------------
# (a) the sources: every field, consistent with the services
# ------------------------------------------------------------------------------------------------


def test_jsonl_file_through_the_cli_gives_n_consistent_samples_per_prompt(services, r, keys, tmp_path):
    rows = [{"id": f"row-{i}", "prompt": p} for i, p in enumerate(PROMPTS[:5])]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    proc = subprocess.run(rollout_cmd(services, "--prompts-file", str(path), "--samples-stream", keys.samples,
                                      "--batch-prompts", "2", "--concurrency", "2"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["prompts_done"] == 5 and stats["samples_pushed"] == 5 * N and stats["failures"] == 0

    samples = samples_in(r, keys.samples)
    by = check_groups(samples, {row["id"]: row["prompt"] for row in rows}, services.eos_ids)
    check_against_services(samples, services)
    # the behaviour log-probs are the Generate call's: the file's batches (2 prompts each, in
    # file order, sent in id order) with their request seeds reproduce every sample
    opts = RolloutOptions(n=N, max_new_tokens=MAX_NEW)
    with PolicyClient(services.policy) as pc:
        for start in range(0, len(rows), 2):
            batch = sorted(rows[start:start + 2], key=lambda row: row["id"])
            ids = [row["id"] for row in batch]
            res = pc.generate([row["prompt"] for row in batch], opts.sampling(batch_seed(0, ids)), n=N)
            for c in res.completions:
                s = next(s for s in by[ids[c.prompt_index]] if s.sample_index == c.sample_index)
                assert s.policy.version == res.model.version
                assert list(s.completion_ids) == c.trajectory_token_ids
                assert list(s.prompt_ids) == c.prompt_token_ids
                assert s.finish_reason == c.finish_reason and s.completion == c.text
                assert max(abs(a - b) for a, b in zip(s.behaviour_logprobs, c.trajectory_logprobs)) < TOL


async def test_stream_source_answers_each_prompt_once_with_n_samples(services, r, keys):
    prompts = push_prompts(r, keys.prompts, PROMPTS[:6], unique("s"))
    options = replace(OPTIONS, samples_stream=keys.samples)
    async with stream_worker(services, r, keys.prompts, options) as worker:
        await until(lambda: len(r.xrange(keys.samples)) >= 6 * N, timeout=120, what="6 groups")
        await until(lambda: pending(r, keys.prompts) == 0, timeout=30, what="every prompt acked")
        # the same prompt id pushed again is answered once: acked, nothing pushed
        again = next(iter(prompts))
        QueueProducer(r).push_prompt(id=again, prompt=prompts[again], stream=keys.prompts)
        await until(lambda: worker.stats.duplicates == 1 and pending(r, keys.prompts) == 0, timeout=30,
                    what="the re-pushed prompt acked as a duplicate")
    samples = samples_in(r, keys.samples)
    assert len(samples) == 6 * N
    check_groups(samples, prompts, services.eos_ids)
    check_against_services(samples, services)
    assert worker.stats.prompts_done == 6 and worker.stats.samples_pushed == 6 * N
    assert worker.stats.failures == 0 and worker.stats.stale_discards == 0
    assert applied_ids(r, keys.prompts, GROUP) == set(prompts)
    finishes = {s.finish_reason for s in samples}
    assert finishes == {FinishReason.EOS, FinishReason.LENGTH}, finishes  # both kinds were checked


# ------------------------------------------------------------------------------------------------
# (b) a worker SIGKILLed mid-batch, a second one after it
# ------------------------------------------------------------------------------------------------


def test_sigkilled_worker_loses_nothing_and_the_next_one_finishes_exactly_once(
        services, r, keys, tiny_reward_dir, tmp_path):
    # a reward service in its own process, so it can be frozen inside the worker's Score calls
    reward = start_service("reward", ["--model", str(tiny_reward_dir), "--metrics-port", "0"],
                           tmp_path / "reward.log", env={**os.environ, "RLHF_TORCH_THREADS": "1"})
    args = ("--prompts-stream", keys.prompts, "--group", GROUP, "--samples-stream", keys.samples,
            "--batch-prompts", "1", "--concurrency", "2", "--claim-idle-ms", "1500")
    procs: list[subprocess.Popen] = []

    def start_worker(name: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        p = subprocess.Popen(rollout_cmd(services, *args, "--consumer", name, reward=reward.target),
                             stdout=subprocess.PIPE, stderr=log, text=True)
        procs.append(p)
        return p

    try:
        prefix = unique("k")
        prompts = push_prompts(r, keys.prompts, PROMPTS[:2], prefix)
        w1 = start_worker("w1")
        wait_for(lambda: len(r.xrange(keys.samples)) == 2 * N, timeout=120, what="w1's first groups")
        os.kill(reward.proc.pid, signal.SIGSTOP)  # every Score call from now on hangs
        more = PROMPTS[2:8]
        producer = QueueProducer(r)
        for i, text in enumerate(more, start=2):
            prompts[producer.push_prompt(id=f"{prefix}-{i}", prompt=text, stream=keys.prompts)] = text
        # w1 takes two prompts (its concurrency) and hangs inside Score with them
        wait_for(lambda: pending(r, keys.prompts, "w1") == 2, timeout=60, what="w1 holding 2 prompts")
        w1.kill()
        assert w1.wait(timeout=30) == -signal.SIGKILL
        got = counts(r, keys.samples)
        assert sum(got.values()) == 2 * N and set(got.values()) == {N}  # no half-filled group
        assert pending(r, keys.prompts, "w1") == 2  # its batches in flight were not acked
        os.kill(reward.proc.pid, signal.SIGCONT)

        w2 = start_worker("w2")  # reclaims w1's prompts once idle 1.5 s, reads the rest
        wait_for(lambda: len(r.xrange(keys.samples)) >= len(prompts) * N and pending(r, keys.prompts) == 0,
                 timeout=180, what="every prompt answered")
        w2.send_signal(signal.SIGTERM)
        out, _ = w2.communicate(timeout=60)
        assert w2.returncode == 0, (tmp_path / "w2.log").read_text()[-3000:]
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["prompts_done"] == len(prompts) - 2 and stats["failures"] == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(reward.proc.pid, signal.SIGCONT)
        reward.stop()

    samples = samples_in(r, keys.samples)
    check_groups(samples, prompts, services.eos_ids)  # n each, no sample id twice
    assert len(samples) == len(prompts) * N
    assert pending(r, keys.prompts) == 0 and r.xlen(dead_letter_stream(keys.prompts)) == 0
    assert applied_ids(r, keys.prompts, GROUP) == set(prompts)


async def test_sigterm_finishes_the_batches_in_flight_then_exits(services, r, keys, tmp_path):
    prompts = push_prompts(r, keys.prompts, PROMPTS * 3, unique("t"))
    log = (tmp_path / "worker.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        *rollout_cmd(services, "--prompts-stream", keys.prompts, "--group", GROUP, "--consumer", "t1",
                     "--samples-stream", keys.samples, "--batch-prompts", "1", "--concurrency", "2"),
        stdout=asyncio.subprocess.PIPE, stderr=log)
    await until(lambda: pending(r, keys.prompts, "t1") > 0, timeout=60, what="batches in flight")
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    stats = json.loads(out.decode().strip().splitlines()[-1])
    got = counts(r, keys.samples)
    assert set(got.values()) <= {N} and len(got) == stats["prompts_done"] >= 1
    assert pending(r, keys.prompts) == 0  # what it had read, it finished and acked
    assert len(got) < len(prompts)  # it stopped reading: the rest waits for another worker


# ------------------------------------------------------------------------------------------------
# (c) a reward service that is down: nothing half-pushed, nothing acked, retried, dead-lettered
# ------------------------------------------------------------------------------------------------


async def test_reward_down_pushes_and_acks_nothing_then_retries_when_it_is_back(
        services, r, keys, tiny_reward_dir):
    from rlhf.reward.app import make_reward_app

    port = free_port()  # nothing listens there yet: the reward service is stopped
    prompts = push_prompts(r, keys.prompts, PROMPTS[:3], unique("c"))
    options = replace(OPTIONS, samples_stream=keys.samples, rpc_timeout_s=10)
    async with stream_worker(services, r, keys.prompts, options, reward=f"127.0.0.1:{port}",
                             max_deliveries=100, claim_idle_ms=300) as worker:
        await until(lambda: worker.stats.failures >= 6, timeout=120, what="failed attempts")
        assert not r.exists(keys.samples)  # nothing pushed
        assert pending(r, keys.prompts) == 3  # nothing acked
        assert not r.exists(applied_key(keys.prompts, GROUP))
        deliveries = [row["times_delivered"] for row in r.xpending_range(keys.prompts, GROUP, "-", "+", 10)]
        assert max(deliveries) > 1  # retried: claimed again after the idle time
        settings = make_settings(model_dir=tiny_reward_dir, port=port, batch_max_wait_ms=2)
        with ThreadedApp(make_reward_app(settings)):
            await until(lambda: pending(r, keys.prompts) == 0 and len(r.xrange(keys.samples)) == 3 * N,
                        timeout=120, what="every prompt answered once the reward service is back")
    samples = samples_in(r, keys.samples)
    check_groups(samples, prompts, services.eos_ids)
    assert worker.stats.prompts_done == 3 and r.xlen(dead_letter_stream(keys.prompts)) == 0


async def test_prompts_failing_every_delivery_go_to_the_dead_letter_stream(services, r, keys):
    prompts = push_prompts(r, keys.prompts, PROMPTS[:3], unique("d"))
    options = replace(OPTIONS, samples_stream=keys.samples, rpc_timeout_s=10)
    dead = dead_letter_stream(keys.prompts)
    async with stream_worker(services, r, keys.prompts, options, reward=f"127.0.0.1:{free_port()}",
                             max_deliveries=2, claim_idle_ms=200) as worker:
        await until(lambda: r.xlen(dead) == 3, timeout=120, what="3 dead letters")
        await until(lambda: pending(r, keys.prompts) == 0, timeout=30, what="nothing pending")
    assert not r.exists(keys.samples) or r.xlen(keys.samples) == 0
    rows = r.xrange(dead)
    assert {f[b"id"].decode() for _, f in rows} == set(prompts)
    assert all(f[b"reason"].decode().startswith("delivered 3 times (limit 2)") for _, f in rows)
    assert worker.stats.failures == 6 and worker.stats.dead_lettered == 3


# ------------------------------------------------------------------------------------------------
# (d) bad prompt payloads
# ------------------------------------------------------------------------------------------------


async def test_bad_prompt_payloads_go_to_the_dead_letter_stream(services, r, keys):
    empty = samples_pb2.RolloutPrompt(id="empty", prompt="")
    pair = samples_pb2.PreferencePair(id="pair", prompt="q", chosen="a", rejected="b")
    r.xadd(keys.prompts, {b"type": b"rlhfpb.v1.RolloutPrompt", b"id": b"empty", b"data": empty.SerializeToString()})
    r.xadd(keys.prompts, encode_entry(pair))  # a queue payload, but not a prompt
    r.xadd(keys.prompts, {b"type": b"rlhfpb.v1.RolloutPrompt", b"id": b"junk", b"data": b"\xff\xfe junk"})
    r.xadd(keys.prompts, {b"whatever": b"1"})
    long_id = samples_pb2.RolloutPrompt(id="x" * 200, prompt="hello")
    r.xadd(keys.prompts, {b"type": b"rlhfpb.v1.RolloutPrompt", b"id": long_id.id.encode(),
                          b"data": long_id.SerializeToString()})
    good = push_prompts(r, keys.prompts, PROMPTS[:1], unique("g"))
    options = replace(OPTIONS, samples_stream=keys.samples)
    dead = dead_letter_stream(keys.prompts)
    async with stream_worker(services, r, keys.prompts, options) as worker:
        await until(lambda: r.exists(keys.samples) and r.xlen(keys.samples) == N and r.xlen(dead) == 5,
                    timeout=120, what="the good prompt answered, the bad ones dead-lettered")
        await until(lambda: pending(r, keys.prompts) == 0, timeout=30, what="nothing pending")
    reasons = {f.get(b"id", b"?").decode(): f[b"reason"].decode() for _, f in r.xrange(dead)}
    assert "RolloutPrompt.prompt: must be non-empty" in reasons["empty"]
    assert "not a RolloutPrompt" in reasons["pair"]
    assert "does not parse" in reasons["junk"]
    assert "lacks field" in reasons["?"]
    assert "RolloutPrompt.id: longer than 192" in reasons["x" * 200]
    check_groups(samples_in(r, keys.samples), good, services.eos_ids)
    assert worker.stats.dead_lettered == 5 and worker.stats.failures == 0


# ------------------------------------------------------------------------------------------------
# following the registry
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def following_policy(tiny_policy_dir, tiny_policy_dir_b, tmp_path_factory, r):
    """A policy service following a model name with two versions in a store (registry in db 13);
    it polls rarely (300 s), so it swaps only on a registry event."""
    from test_hot_swap import publish

    from rlhf.policy.app import make_policy_app

    registry = Registry.from_url(REDIS_URL)
    name = unique("rollout-policy")
    store = tmp_path_factory.mktemp("rollout-store")
    v1, v2 = (publish(store, registry, name, d, "policy") for d in (tiny_policy_dir, tiny_policy_dir_b))
    registry.activate(name, v1)
    settings = make_settings(model_name=name, store_dir=store, redis_url=REDIS_URL, swap_poll_s=300,
                             batch_max_wait_ms=2)
    with ThreadedApp(make_policy_app(settings)) as served:
        yield served, registry, name, (v1, v2)
    forget_model(r, name)


async def test_results_of_a_superseded_version_are_discarded_and_regenerated(
        services, following_policy, r, keys):
    served, registry, name, (v1, v2) = following_policy
    svc = replace(services, policy=served.target)
    options = replace(OPTIONS, samples_stream=keys.samples, model_name=name)
    first = push_prompts(r, keys.prompts, PROMPTS[:1], unique("f1"))
    async with stream_worker(svc, r, keys.prompts, options) as worker:
        await until(lambda: len(r.xrange(keys.samples)) == N, timeout=60, what="the first group")
        # v2 becomes active without an event: the service keeps serving v1 (it polls every 300 s)
        r.set(f"rlhf:model:{name}:active", v2)
        second = push_prompts(r, keys.prompts, PROMPTS[1:2], unique("f2"))
        await until(lambda: worker.stats.stale_discards >= N, timeout=60, what="a stale result discarded")
        assert len(r.xrange(keys.samples)) == N  # nothing of v1 pushed after v2 became active
        registry.activate(name, v2)  # the event: the service swaps, the worker's retry is fresh
        await until(lambda: len(r.xrange(keys.samples)) == 2 * N, timeout=60, what="the second group")
    by = defaultdict(set)
    for s in samples_in(r, keys.samples):
        by[s.prompt_id].add(s.policy.version)
    assert [by[p] for p in first] == [{v1}] and [by[p] for p in second] == [{v2}]
    assert worker.stats.prompts_done == 2 and worker.stats.failures == 0


# ------------------------------------------------------------------------------------------------
# options, files, retries of list prompts (no services)
# ------------------------------------------------------------------------------------------------


def test_bad_flags_give_one_line_errors(capsys):
    from rlhf.cli import main

    base = ["rollout", "--policy", "a:1", "--reward", "b:1", "--reference", "c:1"]
    cases = [
        (["--n", "0"], "rlhf rollout: --n: must be ≥ 1, got 0"),
        (["--top-p", "0"], "rlhf rollout: --top-p: must be in (0, 1]"),
        (["--batch-prompts", "40"], "rlhf rollout: --batch-prompts: 40 prompts × n=4 = 160 items"),
        (["--prompt", "x", "--group", "g"], "rlhf rollout: --group: applies to a prompts stream"),
        (["--prompts-file", "/no/such.jsonl"], "rlhf rollout: --prompts-file /no/such.jsonl: no such file"),
        (["--claim-idle-ms", "5"], "set --claim-idle-ms / RLHF_ROLLOUT_CLAIM_IDLE_MS"),
    ]
    for extra, want in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err


def test_prompt_files_and_cli_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n\n{"id": 7, "prompt": "y"}\n')
    assert [(p.id, p.text, p.source) for p in load_prompts_file(path)] == [
        ("a", "x", "file:p.jsonl"), ("7", "y", "file:p.jsonl")]
    for text, why in [('{"id": "a"}', 'expected an object with "id" and "prompt"'),
                      ('{"id": "a", "prompt": ""}', "prompt must be a non-empty string"),
                      ('[1]', 'expected an object'), ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}',
                                                      "id 'a' repeats line 1"),
                      ("{", "not JSON"), ('{"id": "' + "i" * 193 + '", "prompt": "x"}', "longer than 192")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(why)):
            load_prompts_file(path)
    items = cli_prompts(["hello", "world"])
    assert [p.id for p in items] == [cli_prompt_id("hello"), cli_prompt_id("world")]
    assert cli_prompt_id("hello") == cli_prompt_id("hello") != cli_prompt_id("hello ")
    with pytest.raises(ValueError, match="twice"):
        cli_prompts(["a", "a"])


def test_batch_seed_is_a_function_of_the_seed_and_the_ids():
    assert batch_seed(0, ["a", "b"]) == batch_seed(0, ["a", "b"])
    assert len({batch_seed(0, ["a", "b"]), batch_seed(1, ["a", "b"]), batch_seed(0, ["b", "a"]),
                batch_seed(0, ["ab"]), batch_seed(0, ["a"])}) == 5
    assert all(0 <= batch_seed(s, ["x"]) < 2**63 for s in range(50))


async def test_list_prompts_are_retried_with_backoff_then_given_up():
    items = [PromptItem(f"p{i}", "t") for i in range(3)]
    src = ListSource(items, max_attempts=2, backoff_s=0.05)
    assert await src.next_batches(2) == [items[:2]]
    assert await src.next_batches(2) == [items[2:]]
    src.failed(items[:2], RuntimeError("down"))
    src.done(items[2:])
    t0 = time.monotonic()
    got = []
    while not got:
        got = await src.next_batches(2)
    assert time.monotonic() - t0 >= 0.04  # after the backoff, each retried prompt alone
    assert [[(p.id, p.attempt) for p in b] for b in got] == [[("p0", 2)], [("p1", 2)]]
    assert src.failed(got[0], RuntimeError("down")) == ["p0"]  # attempts used up
    src.done(got[1])
    assert await src.next_batches(2) is None and src.left == 0


def test_build_samples_refuses_replies_that_do_not_fit_the_request():
    from rlhf_client.types import Completion, GenerateResult, LogProbsResult, ModelRef, ScoreResult
    from rlhf_client.types import SequenceLogProbs

    item = PromptItem("p", "hi")
    comp = Completion(0, 0, "x", [5, 6], [-1.0, -2.0], FinishReason.LENGTH, [1, 2], [5, 6], [-1.0, -2.0])
    gen = GenerateResult([comp], ModelRef("pol", "v1"))
    score = ScoreResult([0.5], ModelRef("rm", "v3"))
    ref = LogProbsResult([SequenceLogProbs([-1.5, -2.5], -4.0)], ModelRef("ref", "v0"))
    ((got_item, (s,)),) = build_samples([item], 1, gen, score, ref, 1_000_000_000)
    assert got_item is item and s.id == "p:v1:0" and s.group_id == "p:v1" and s.reward == 0.5
    assert list(s.completion_ids) == [5, 6] and list(s.reference_logprobs) == [-1.5, -2.5]
    assert (s.policy.version, s.reward_model.version, s.reference.name) == ("v1", "v3", "ref")
    with pytest.raises(BadReply, match="completions"):
        build_samples([item], 2, gen, score, ref, 0)
    # the reward model scores the prompt text and the kept text; an empty kept text (an eos
    # alone decodes to "") is scored as token ids, so the eos still reaches the reward model
    assert score_item(item, comp) == ("hi", "x")
    eos_only = Completion(0, 0, "", [0], [-3.0], FinishReason.EOS, [1, 2], [0], [-3.0])
    assert score_item(item, eos_only) == ([1, 2], [0])
    with pytest.raises(BadReply, match="reference"):
        build_samples([item], 1, gen, score, LogProbsResult([SequenceLogProbs([-1.0], -1.0)], ref.model), 0)
