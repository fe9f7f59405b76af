"""Redis unreachable for a while under a policy service that follows the registry: generation
goes on from the version loaded, and once Redis is back the follower catches up with a version
activated then.

The service (in-process, on 127.0.0.1) follows `--model-name` through its own `redis-server`
(append-only, fsync always), which is SIGKILLed and later started again on the same port and
directory. A client thread generates without pause the whole time.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from chaos_procs import Load
from helpers import ThreadedApp, make_settings
from trainer_helpers import publish_active, unique, wait_for

from rlhf_client import SamplingParams
from rlhf_client.registry import Registry
from rlhf.models.store import ModelStore

DURING = 20  # requests that must be answered while Redis is down


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_policy_keeps_serving_through_a_redis_outage_and_catches_up(
        own_redis, tmp_path, tiny_policy_dir, tiny_policy_dir_b, caplog):
    from rlhf.policy.app import make_policy_app

    name, store_dir = unique("chaos-policy"), tmp_path / "store"
    text = own_redis.client()
    publish_active(text, store_dir, name, tiny_policy_dir)  # v0001, active
    settings = make_settings(model_name=name, store_dir=store_dir, redis_url=own_redis.url,
                             swap_poll_s=0.5, torch_threads=1)
    down = threading.Event()
    versions: Counter[str] = Counter()  # version -> replies
    during = [0]

    def on_reply(k, i, prompt, params, res) -> None:
        versions[res.model.version] += 1
        if down.is_set():
            during[0] += 1

    with ThreadedApp(make_policy_app(settings)) as served:
        load = Load(served.target, lambda k, i: ("the cat sat on the",
                                                 SamplingParams(max_new_tokens=4, seed=i)),
                    on_reply).start()
        try:
            wait_for(lambda: versions["v0001"] >= 5, timeout=60, what="v0001 to serve")
            own_redis.kill()
            down.set()
            wait_for(lambda: "registry events lost" in caplog.text
                     or "registry unreachable" in caplog.text, timeout=60,
                     what="the follower to notice the outage")
            wait_for(lambda: during[0] >= DURING, timeout=120,
                     what=f"{DURING} replies while Redis is down")
            # the next version reaches the store meanwhile (a file system, not Redis)
            v2 = ModelStore(store_dir).publish(name, tiny_policy_dir_b, kind="policy")
            own_redis.start()  # same port and directory: the registry comes back from the AOF
            down.clear()
            registry = Registry(text)
            assert registry.active(name) == "v0001"
            registry.register(name, v2.version, v2.created)
            registry.activate(name, v2.version)
            wait_for(lambda: versions[v2.version] >= 5, timeout=120,
                     what=f"{v2.version} to be served after Redis returned")
        finally:
            load.stop()
    text.close()
    total = sum(versions.values())
    failures = load.failures
    assert not failures, f"{len(failures)} of {load.sent} requests failed: {failures[:5]}"
    assert load.sent == total
    assert set(versions) == {"v0001", "v0002"}
    print(f"\nchaos registry-outage: replies {total}, failed {len(failures)}, during the outage "
          f"{during[0]}, by version {dict(versions)}")
