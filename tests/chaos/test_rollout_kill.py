"""A rollout worker SIGKILLed mid-batch while another runs: the other takes its prompts over.

Two `rlhf rollout` processes read one prompt stream (one consumer group) on an own
`redis-server`. Worker w1 scores through a reward service of its own (the same tiny reward
model as w2's) whose event loop is frozen before any prompt is pushed (a call that blocks the
loop until released: every RPC of that server hangs, as with SIGSTOP of its process): w1 takes
prompts and hangs inside its Score calls with them, mid-batch. Worker w2 answers the rest; then
w1 is SIGKILLed. Its prompts, pending in its name, go idle past
`--claim-idle-ms` and w2 claims and answers them: every prompt answered once with n samples,
nothing pushed twice, nothing dead-lettered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest
import redis
from helpers import ThreadedApp, make_settings
from trainer_helpers import REPO, unique, wait_for

from rlhf_client import QueueProducer
from rlhf_client.queues import dead_letter_stream, decode_entry
from rlhf.trainer.queues import applied_ids

N = 2
GROUP = "rollout"
PROMPTS = ["the cat sat on the", "a good dog", "please pass the red", "my friend said that",
           "the weather today is", "once upon a time"]


def pending_of(r, stream: str, consumer: str) -> list[str]:
    try:
        return [p["message_id"] for p in
                r.xpending_range(stream, GROUP, "-", "+", 1000, consumername=consumer)]
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_rollout_worker_s_prompts_are_taken_over_once(
        own_redis, rclient, tmp_path, tiny_policy_dir, tiny_reward_dir):
    from rlhf.policy.app import make_policy_app
    from rlhf.reference.app import make_reference_app
    from rlhf.reward.app import make_reward_app

    env = {**os.environ, "RLHF_TORCH_THREADS": "1"}
    prompts_stream, samples_stream = unique("chaos:prompts"), unique("chaos:samples")
    procs: dict[str, subprocess.Popen] = {}
    fast = dict(batch_max_wait_ms=2)

    with ThreadedApp(make_policy_app(make_settings(model_dir=tiny_policy_dir, **fast))) as policy, \
            ThreadedApp(make_reward_app(make_settings(model_dir=tiny_reward_dir, **fast))) as reward, \
            ThreadedApp(make_reference_app(make_settings(model_dir=tiny_policy_dir, **fast))) as ref, \
            ThreadedApp(make_reward_app(make_settings(model_dir=tiny_reward_dir, **fast))) as frozen:

        def start(name: str, reward_target: str) -> subprocess.Popen:
            log = (tmp_path / f"{name}.log").open("w")
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "rlhf", "rollout", "--policy", policy.target,
                 "--reward", reward_target, "--reference", ref.target, "--n", str(N),
                 "--max-new-tokens", "6", "--redis-url", own_redis.url, "--metrics-port", "0",
                 "--prompts-stream", prompts_stream, "--group", GROUP, "--samples-stream",
                 samples_stream, "--batch-prompts", "1", "--concurrency", "2",
                 "--claim-idle-ms", "1000", "--consumer", name],
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
            return procs[name]

        blocked, release = threading.Event(), threading.Event()

        def freeze() -> None:  # runs on the frozen server's event loop, blocking it
            blocked.set()
            release.wait(timeout=240)

        try:
            frozen.loop.call_soon_threadsafe(freeze)  # every RPC of w1's reward service hangs
            assert blocked.wait(timeout=30)
            w1 = start("w1", frozen.target)
            producer = QueueProducer(rclient)
            prefix = unique("k")
            prompts = {producer.push_prompt(id=f"{prefix}-{i}", prompt=p, source="chaos",
                                            stream=prompts_stream): p
                       for i, p in enumerate(PROMPTS)}
            # w1 takes two prompts (its concurrency) and hangs inside Score with them
            held = wait_for(lambda: len(pending_of(rclient, prompts_stream, "w1")) == 2
                            and pending_of(rclient, prompts_stream, "w1"), timeout=120,
                            what="w1 to hold 2 prompts mid-batch")
            held_ids = {decode_entry(fields).id for _, fields in
                        (rclient.xrange(prompts_stream, m, m)[0] for m in held)}
            w2 = start("w2", reward.target)
            others = len(prompts) - len(held_ids)
            wait_for(lambda: rclient.xlen(samples_stream) >= others * N, timeout=120,
                     what="w2 to answer the prompts w1 does not hold")
            assert sorted(pending_of(rclient, prompts_stream, "w1")) == sorted(held), \
                "w1's prompts were taken while it was alive"
            w1.kill()
            assert w1.wait(timeout=30) == -signal.SIGKILL
            assert rclient.xlen(samples_stream) == others * N  # w1 pushed nothing
            wait_for(lambda: rclient.xlen(samples_stream) >= len(prompts) * N
                     and rclient.xpending(prompts_stream, GROUP)["pending"] == 0,
                     timeout=120, what="w2 to take over and answer w1's prompts")
            w2.send_signal(signal.SIGTERM)
            out, _ = w2.communicate(timeout=60)
            assert w2.returncode == 0, (tmp_path / "w2.log").read_text()[-3000:]
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            release.set()

    stats = json.loads(out.strip().splitlines()[-1])
    samples = [decode_entry(fields) for _, fields in rclient.xrange(samples_stream)]
    per_prompt = Counter(s.prompt_id for s in samples)
    assert per_prompt == {pid: N for pid in prompts}, per_prompt  # each once, n samples
    assert len({s.id for s in samples}) == len(samples), "a sample pushed twice"
    assert held_ids <= set(per_prompt)
    assert stats["prompts_done"] == len(prompts) and stats["failures"] == 0, stats
    assert rclient.xlen(dead_letter_stream(prompts_stream)) == 0
    assert applied_ids(rclient, prompts_stream, GROUP) == set(prompts)
    print(f"\nchaos rollout-kill: prompts {len(prompts)}, held by the killed worker "
          f"{len(held_ids)}, samples {len(samples)} (n={N}), w2 stats {stats}")
