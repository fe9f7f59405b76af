"""A policy replica SIGKILLed under load: clients of a `dns:///` round-robin target lose nothing.

Two policy replicas serve copies of the same tiny policy on one port of the loopback: one
in-process on 127.0.0.1, the other an `rlhf serve policy` process on [::1] (the one killed). `dns:///localhost:PORT` resolves (gRPC's c-ares
resolver) to both, and the platform's channel (rlhf_client.channel) round-robins across them and
retries a call that failed UNAVAILABLE. The copies live in directories of different names, so a
reply's model name says which replica answered; the weights are the same, so a seeded request
gets the same completion from either. Client threads send seeded requests without pause; once
both replicas have answered, the [::1] one is SIGKILLed; the threads go on until the survivor
has answered a set number of requests after the kill. Not one request may fail.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter

import pytest
from helpers import ThreadedApp, make_settings
from trainer_helpers import wait_for

from rlhf_client import SamplingParams
from rlhf.procs import free_port

from chaos_procs import Load, Served

THREADS = 4
AFTER_KILL = 20  # requests the survivor must answer after the kill
PROMPTS = ["the cat sat on the", "a good dog", "once upon a time", "we went to the"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_of_a_replica_fails_no_request(tiny_policy_dir, tmp_path):
    from rlhf.policy.app import make_policy_app

    dirs = {}
    for name in ("replica-v4", "replica-v6"):
        dirs[name] = tmp_path / name
        shutil.copytree(tiny_policy_dir, dirs[name])
    port = free_port()
    v6 = Served("policy", ["--model", str(dirs["replica-v6"])], tmp_path / "v6.log",
                host="[::1]", port=port)
    served: Counter[str] = Counter()  # replica name -> replies
    after_kill: Counter[str] = Counter()
    killed = threading.Event()
    texts: dict[tuple[int, str], set[str]] = {}

    def request(k: int, i: int):
        seed = (k * 1000 + i) % 50  # seeds repeat: the same seed, the same completion
        return PROMPTS[i % len(PROMPTS)], SamplingParams(temperature=1.0, max_new_tokens=4,
                                                         seed=seed)

    def on_reply(k, i, prompt, params, res) -> None:
        served[res.model.name] += 1
        if killed.is_set():
            after_kill[res.model.name] += 1
        texts.setdefault((params.seed, prompt), set()).add(res.completions[0].text)

    load = Load(f"dns:///localhost:{port}", request, on_reply, threads=THREADS)
    try:
        with ThreadedApp(make_policy_app(make_settings(model_dir=dirs["replica-v4"], port=port))):
            v6.wait_serving()
            try:
                load.start()
                wait_for(lambda: served["replica-v4"] >= 5 and served["replica-v6"] >= 5,
                         timeout=120, what="both replicas to answer 5 requests")
                v6.kill()
                killed.set()
                wait_for(lambda: after_kill["replica-v4"] >= AFTER_KILL or load.failures, timeout=120,
                         what=f"the survivor to answer {AFTER_KILL} requests after the kill")
            finally:
                load.stop()
    finally:
        v6.stop()
    failures, sent = load.failures, load.sent
    assert not failures, f"{len(failures)} of {sent} requests failed: {failures[:5]}"
    assert sent == sum(served.values())
    assert after_kill["replica-v4"] >= AFTER_KILL
    # a seeded request gave the same completion whichever replica answered it
    assert all(len(v) == 1 for v in texts.values()), {k: v for k, v in texts.items() if len(v) > 1}
    print(f"\nchaos replica-kill: sent {sent}, failed {len(failures)}, "
          f"served {dict(served)}, after kill {dict(after_kill)}")
