"""Hot-swap under load on real servers, a real store and the real registry in Redis.

Services follow a model name in the registry; a version is trusted only after its checksums and
golden probes check out; a bad version is refused while the old one keeps serving, unchanged.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ADMIN_TOKEN, TEST_REDIS, VLLM_SETTINGS, ThreadedApp, make_settings

from rlhf_client import PolicyClient, RewardClient, RpcError, SamplingParams
from rlhf_client.registry import Registry

REDIS_URL = f"{TEST_REDIS}/0"
POLL_S = 0.02
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
PROMPTS = ["the cat sat on the", "a good dog", "please pass the red"]


def publish(store_root: Path, registry: Registry, name: str, src: Path, kind: str) -> str:
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore

    manifest = ModelStore(store_root).publish(name, src, kind=kind, probes=compute_probes(kind, src))
    registry.register(name, manifest.version)
    return manifest.version


def fresh_greedy(model_dir: Path) -> list[list[int]]:
    """Greedy ids of PROMPTS from a fresh, naive load of a checkpoint (no service involved)."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.encode(p, add_special_tokens=False)
            n = len(ids)
            for _ in range(GREEDY.max_new_tokens):
                t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(t)
                if t == tok.eos_token_id:
                    break
            out.append(ids[n:])
    return out


def wait_for(cond, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def registry():
    return Registry.from_url(REDIS_URL)


@pytest.fixture(scope="module")
def policy_versions(tmp_path_factory, registry):
    """A store with two policy versions (different seeds, untied) of a fresh model name."""
    from rlhf.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("swap")
    name = f"swap-policy-{uuid.uuid4().hex[:8]}"
    dirs = [make_tiny_model("policy", root / f"src{s}", seed=s, tie_embeddings=False) for s in (0, 1)]
    store = root / "store"
    versions = [publish(store, registry, name, d, "policy") for d in dirs]
    registry.activate(name, versions[0])
    expected = {v: fresh_greedy(d) for v, d in zip(versions, dirs)}
    assert expected[versions[0]] != expected[versions[1]]
    return dict(name=name, store=store, versions=versions, dirs=dirs, expected=expected)


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def following_policy(request, policy_versions, registry):
    """The policy service on each backend, following the model name (in-place vLLM reloads)."""
    from rlhf.policy.app import make_policy_app

    pv = policy_versions
    registry.activate(pv["name"], pv["versions"][0])
    extra = VLLM_SETTINGS if request.param == "vllm" else {}
    settings = make_settings(model_name=pv["name"], store_dir=pv["store"], redis_url=REDIS_URL, swap_poll_s=0.5,
                             batch_max_wait_ms=2, **extra)
    with ThreadedApp(make_policy_app(settings)) as served:
        yield served


def _greedy_now(client) -> tuple[str, list[list[int]]]:
    res = client.generate(PROMPTS, GREEDY)
    return res.model.version, [c.token_ids for c in res.completions]


def test_follows_registry_under_load_with_zero_failures(following_policy, policy_versions, registry):
    pv = policy_versions
    name, (v1, v2) = pv["name"], pv["versions"]
    target = following_policy.target
    with PolicyClient(target, timeout=60) as c:
        assert c.get_model().follows_registry  # what rollout workers check before following it
    stop = threading.Event()
    failures: list[BaseException] = []
    seen_versions: set[str] = set()
    wrong: list[tuple] = []
    health_bad: list[int] = []
    done = [0]

    def load_client():
        with PolicyClient(target, timeout=60) as c:
            while not stop.is_set():
                try:
                    res = c.generate(PROMPTS[:1], GREEDY)
                except RpcError as exc:
                    failures.append(exc)
                    continue
                v = res.model.version
                seen_versions.add(v)
                if res.completions[0].token_ids != pv["expected"][v][0]:
                    wrong.append((v, res.completions[0].token_ids))  # a completion mixing versions
                done[0] += 1

    def health_watch():
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not stop.is_set():
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    health_bad.append(status)

    threads = [threading.Thread(target=load_client) for _ in range(16)] + [threading.Thread(target=health_watch)]
    for t in threads:
        t.start()
    try:
        with PolicyClient(target) as probe:
            for k in range(10):
                version = v2 if k % 2 == 0 else v1
                registry.activate(name, version)
                wait_for(lambda: probe.get_model().model.version == version, what=f"swap to {version}")
                got_version, ids = _greedy_now(probe)
                assert got_version == version
                assert ids == pv["expected"][version]  # equals a fresh load of that version
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:3]
    assert not wrong, wrong[:3]
    assert seen_versions <= {v1, v2} and seen_versions == {v1, v2}
    assert not health_bad
    assert done[0] > 16


def _bad_versions(store: Path, name: str, good_src: Path, registry: Registry) -> dict[str, str]:
    """Publish one version per way a checkpoint can be broken; returns {kind of damage: version}."""
    from rlhf.models.store import MANIFEST, Manifest, sha256_file

    def clone(tag: str) -> Path:
        v = publish(store, registry, name, good_src, "policy")
        return store / name / v

    def rewrite_manifest(d: Path) -> None:  # damage that checksums cannot see
        m = Manifest.read(d)
        m.files = {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*"))
                   if p.is_file() and p.name != MANIFEST}
        (d / MANIFEST).write_text(m.to_json())

    bad = {}
    d = clone("checksum")
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad["checksum mismatch"] = d.name

    d = clone("truncated")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rewrite_manifest(d)
    bad["truncated safetensors"] = d.name

    d = clone("shard")
    weights = d / "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                        "model.norm.weight": "model.safetensors"}}))
    rewrite_manifest(d)
    bad["missing shard"] = d.name

    d = clone("bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not-a-real-archive")
    rewrite_manifest(d)
    bad["pickle .bin instead of safetensors"] = d.name

    half = store / name / f"half-{uuid.uuid4().hex[:6]}"
    shutil.copytree(good_src, half)  # no manifest: a half-written directory
    registry.register(name, half.name)
    bad["half-written directory"] = half.name
    return bad


def test_bad_versions_are_refused_and_the_old_one_keeps_serving(following_policy, policy_versions, registry):
    pv = policy_versions
    name, v1 = pv["name"], pv["versions"][0]
    with PolicyClient(following_policy.target, admin_token=ADMIN_TOKEN) as c:
        registry.activate(name, v1)
        wait_for(lambda: c.get_model().model.version == v1, what="v1")
        before = c.generate(PROMPTS, GREEDY)
        for damage, version in _bad_versions(pv["store"], name, pv["dirs"][1], registry).items():
            with pytest.raises(RpcError) as err:
                c.load_version(version)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, damage
            # the registry path refuses it too, and the old version keeps serving byte-identically
            registry.activate(name, version)
            wait_for(lambda: following_policy.app.follower.refused == version, what=f"refusal of {damage}")
            after = c.generate(PROMPTS, GREEDY)
            assert after.model.version == v1, damage
            assert [x.token_ids for x in after.completions] == [x.token_ids for x in before.completions], damage
            assert [x.text for x in after.completions] == [x.text for x in before.completions], damage
        registry.activate(name, v1)


def test_rollback_restores_the_earlier_output(following_policy, policy_versions, registry):
    pv = policy_versions
    name, (v1, v2) = pv["name"], pv["versions"]
    with PolicyClient(following_policy.target) as c:
        registry.activate(name, v1)
        wait_for(lambda: c.get_model().model.version == v1, what="v1")
        registry.activate(name, v2)
        wait_for(lambda: c.get_model().model.version == v2, what="v2")
        assert _greedy_now(c) == (v2, pv["expected"][v2])
        registry.rollback(name)
        wait_for(lambda: c.get_model().model.version == v1, what="rollback to v1")
        assert _greedy_now(c) == (v1, pv["expected"][v1])


def test_reward_service_follows_and_swaps_under_load(tmp_path_factory, registry):
    from rlhf.models.tiny import make_tiny_model
    from rlhf.reward.app import make_reward_app

    root = tmp_path_factory.mktemp("swap-reward")
    name = f"swap-reward-{uuid.uuid4().hex[:8]}"
    dirs = [make_tiny_model("reward", root / f"r{s}", seed=s) for s in (0, 1)]
    store = root / "store"
    versions = [publish(store, registry, name, d, "reward") for d in dirs]
    registry.activate(name, versions[0])
    settings = make_settings(model_name=name, store_dir=store, redis_url=REDIS_URL, swap_poll_s=0.5)
    items = [("is this good?", " yes, great"), ("the cat", " sat on the mat")]
    with ThreadedApp(make_reward_app(settings)) as served, RewardClient(served.target) as c:
        scores = {}
        for v in versions:
            registry.activate(name, v)
            wait_for(lambda: c.get_model().model.version == v, what=f"reward {v}")
            scores[v] = c.score(items).rewards
        assert scores[versions[0]] != scores[versions[1]]
        stop = threading.Event()
        failures, wrong = [], []

        def load():
            with RewardClient(served.target) as lc:
                while not stop.is_set():
                    try:
                        res = lc.score(items)
                    except RpcError as exc:
                        failures.append(exc)
                        continue
                    if res.rewards != pytest.approx(scores[res.model.version], abs=1e-5):
                        wrong.append(res)

        threads = [threading.Thread(target=load) for _ in range(16)]
        for t in threads:
            t.start()
        try:
            for k in range(10):
                v = versions[(k + 1) % 2]
                registry.activate(name, v)
                wait_for(lambda: c.get_model().model.version == v, what=f"reward swap {k}")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not failures and not wrong
