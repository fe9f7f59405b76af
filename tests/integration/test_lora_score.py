"""Serving LoRA adapter versions on the reward and reference services (issue 20).

A store holds, for two model names, a base version and an adapter version of it (published with
`rlhf.models.adapters.publish_adapter`: checksums, the base's weight checksums, golden probes on
base + adapter): a reward model with a SEQ_CLS adapter (random non-zero lora_B, a changed score
head) and a policy with a CAUSAL_LM adapter. Each service follows its name in the registry
(Redis DB 5, unique names) and serves the adapter merged onto its verified base
(`load_for_serving`):

- reward: Score equals a fresh base + adapter model's reward (`sequence_rewards`, each item
  alone) within 1e-5 and differs from the base's; GetModel names the base; adapter → base →
  adapter under concurrent clients fails no request, every answer right for the version it names;
- reference: LogProbs equal a fresh load of the merged checkpoint (`merge_to_dir`), teacher-forced,
  within 1e-5 and differ from the base's; it follows the policy name adapter → base → adapter (a
  policy version's golden probes checked in one teacher-forced pass);
- a bad adapter (its base's checksums wrong, a file missing, a file tampered, an adapter of the
  wrong task type) is refused, through the registry and through LoadVersion, and the old version
  keeps serving, unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

import grpc
import pytest
from helpers import ADMIN_TOKEN, TEST_REDIS, ThreadedApp, make_settings, teacher_forced_logprobs
from trainer_helpers import swap_under_clients, wait_for

from rlhf_client import ReferenceClient, RewardClient, RpcError
from rlhf_client.registry import Registry

torch = pytest.importorskip("torch")

REDIS_URL = f"{TEST_REDIS}/5"
TOL = 1e-5
PAIRS = [  # text: the adapter version's own tokenizer files encode them
    ("the cat sat on the", " mat."),
    ("is this good?", " yes, it is great"),  # a shared prompt: the shared-prefix path too
    ("is this good?", " no, it is bad"),
    ("please pass the", " red apple"),
]
ITEMS = [([5, 6, 7], [8, 9, 10, 11]), ([42], [17]), (list(range(20, 50)), [3, 0, 12, 99, 100])]


def _reward_adapter(base_dir: Path, seed: int):
    """A SEQ_CLS LoRA adapter (score head in modules_to_save) that changes every reward."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models.loading import load_reward_model

    torch.manual_seed(seed)
    model = get_peft_model(load_reward_model(base_dir), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_CLS",
        target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
            elif "modules_to_save" in n and "score" in n:  # the trained copy of the head
                p.add_(torch.randn_like(p) * 0.5)
    return model


def _policy_adapter(base_dir: Path, seed: int):
    """A CAUSAL_LM LoRA adapter with random (non-zero) B (test_lora_serve's, rank 4)."""
    from test_lora_serve import _adapter

    return _adapter(base_dir, seed, rank=4)


def _rewards(model, tok) -> list[float]:
    """Each pair alone, no padding, read as the service reads it (`sequence_rewards`)."""
    from rlhf.models.reward_head import sequence_rewards

    out = []
    with torch.no_grad():
        for p, r in PAIRS:
            ids = tok.encode(p, add_special_tokens=False) + tok.encode(r, add_special_tokens=False)
            x = torch.tensor([ids])
            out.append(float(sequence_rewards(model, x, torch.ones_like(x))[0]))
    return out


def _logprobs(model) -> list[list[float]]:
    return [teacher_forced_logprobs(model, p, c) for p, c in ITEMS]


@pytest.fixture(scope="module")
def registry():
    return Registry.from_url(REDIS_URL)


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory, registry):
    """Reward name: base v1, SEQ_CLS adapter; policy name: base v1, CAUSAL_LM adapter; the
    expected answers of each version (fresh loads); and bad adapter versions of each name."""
    from rlhf.models.adapters import load_base_and_adapter, merge_to_dir, publish_adapter
    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("lora-score")
    tag = uuid.uuid4().hex[:8]
    rname, pname = f"lora-rm-{tag}", f"lora-ref-{tag}"
    store = ModelStore(root / "store")

    rbase_src = make_tiny_model("reward", root / "rbase", seed=0)
    rv1 = store.publish(rname, rbase_src, kind="reward",
                        probes=compute_probes("reward", rbase_src)).version
    ra = publish_adapter(store, rname, _reward_adapter(rbase_src, 1), base_version=rv1).version
    tok = load_tokenizer(rbase_src)
    fresh = load_base_and_adapter(store.path(rname, rv1), store.path(rname, ra))  # unmerged
    rewards = {rv1: _rewards(load_reward_model(rbase_src), tok), ra: _rewards(fresh, tok)}

    pbase_src = make_tiny_model("policy", root / "pbase", seed=0, tie_embeddings=False)
    pv1 = store.publish(pname, pbase_src, kind="policy",
                        probes=compute_probes("policy", pbase_src)).version
    pa = publish_adapter(store, pname, _policy_adapter(pbase_src, 2), base_version=pv1).version
    merged = merge_to_dir(store.path(pname, pv1), store.path(pname, pa), root / "merged")
    logprobs = {pv1: _logprobs(load_causal_lm(pbase_src)), pa: _logprobs(load_causal_lm(merged))}

    for name, versions in ((rname, (rv1, ra)), (pname, (pv1, pa))):
        for v in versions:
            registry.register(name, v)

    def clone(name: str, src: str, label: str) -> str:
        d = store.root / name / f"{label}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(store.path(name, src), d)
        registry.register(name, d.name)
        return d.name

    def edit_manifest(name: str, version: str, fn) -> None:
        path = store.path(name, version) / "manifest.json"
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    # (version, what the refusal says) per kind of damage
    bad_reward, bad_reference = {}, {}
    v = clone(rname, ra, "wrongbase")  # names v1, with checksums of other weights
    edit_manifest(rname, v, lambda m: m["extra"]["base"]["files"].update(
        {k: "0" * 64 for k in m["extra"]["base"]["files"]}))
    bad_reward["wrong base checksum"] = (v, "trained on")
    v = clone(rname, ra, "tampered")
    blob = bytearray((store.path(rname, v) / "adapter_model.safetensors").read_bytes())
    blob[-8:] = bytes(8)  # the tensors' last bytes: still loads, other numbers
    (store.path(rname, v) / "adapter_model.safetensors").write_bytes(bytes(blob))
    bad_reward["tampered file"] = (v, "adapter_model.safetensors")
    # a policy adapter (of the policy base) published under the reward name: the base checks
    # out, the task type does not
    v = publish_adapter(store, rname, _policy_adapter(pbase_src, 3), base_version=pv1,
                        base_name=pname).version
    registry.register(rname, v)
    bad_reward["CAUSAL_LM adapter on the reward service"] = (v, "task_type 'CAUSAL_LM'")
    v = clone(pname, pa, "missing")
    (store.path(pname, v) / "adapter_model.safetensors").unlink()
    bad_reference["missing file"] = (v, "adapter_model.safetensors")
    v = publish_adapter(store, pname, _reward_adapter(rbase_src, 4), base_version=rv1,
                        base_name=rname).version
    registry.register(pname, v)
    bad_reference["SEQ_CLS adapter on the reference service"] = (v, "task_type 'SEQ_CLS'")

    yield dict(store=store.root, rname=rname, rv1=rv1, ra=ra, rewards=rewards,
               bad_reward=bad_reward, pname=pname, pv1=pv1, pa=pa, logprobs=logprobs,
               bad_reference=bad_reference)
    for name in (rname, pname):
        keys = list(registry.r.scan_iter(f"rlhf:model:{name}:*"))
        if keys:
            registry.r.delete(*keys)
        registry.r.srem("rlhf:models", name)


def _settings(ls, name: str):
    return make_settings(model_name=name, store_dir=ls["store"], redis_url=REDIS_URL,
                         swap_poll_s=0.5, batch_max_wait_ms=2)


@pytest.fixture(scope="module")
def reward_served(lora_store, registry):
    from rlhf.reward.app import make_reward_app

    registry.activate(lora_store["rname"], lora_store["ra"])
    with ThreadedApp(make_reward_app(_settings(lora_store, lora_store["rname"]))) as served:
        yield served


@pytest.fixture(scope="module")
def reference_served(lora_store, registry):
    from rlhf.reference.app import make_reference_app

    registry.activate(lora_store["pname"], lora_store["pa"])
    with ThreadedApp(make_reference_app(_settings(lora_store, lora_store["pname"]))) as served:
        yield served


def _close(got, want, tol=TOL) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= tol for a, b in zip(got, want))


def _score(served) -> tuple[str, list[float]]:
    with RewardClient(served.target, timeout=60) as c:
        res = c.score(PAIRS)
    return res.model.version, list(res.rewards)


def _reference(served) -> tuple[str, list[list[float]]]:
    with ReferenceClient(served.target, timeout=60) as c:
        res = c.logprobs(ITEMS)
    return res.model.version, [list(r.logprobs) for r in res.results]


def _refusals(served, registry, name: str, bad: dict, client_cls, answer, serving: str,
              right) -> None:
    """Each bad version is refused (registry and LoadVersion); `serving` answers on, unchanged."""
    for damage, (version, says) in bad.items():
        registry.activate(name, version)
        wait_for(lambda: served.app.follower.refused == version, timeout=60,
                 what=f"refusal of {damage}")
        got_version, values = answer(served)
        assert got_version == serving and right(serving, values), damage
        with client_cls(served.target, admin_token=ADMIN_TOKEN, timeout=60) as c:
            with pytest.raises(RpcError) as err:
                c.load_version(version)
            assert c.get_model().model.version == serving, damage
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, (damage, err.value)
        assert says in err.value.details, (damage, err.value.details)
    registry.activate(name, serving)


# ------------------------------------------------------------------------------------------------
# reward
# ------------------------------------------------------------------------------------------------


def test_reward_service_serves_a_reward_adapter_merged_on_its_base(lora_store, reward_served):
    ls = lora_store
    rewards = ls["rewards"]
    with RewardClient(reward_served.target, timeout=60) as c:
        info = c.get_model()
    assert (info.model.name, info.model.version) == (ls["rname"], ls["ra"])
    assert info.base is not None and (info.base.name, info.base.version) == (ls["rname"], ls["rv1"])
    version, got = _score(reward_served)
    assert version == ls["ra"]
    assert _close(got, rewards[ls["ra"]]), (got, rewards[ls["ra"]])  # = base + adapter, unmerged
    assert min(abs(a - b) for a, b in zip(got, rewards[ls["rv1"]])) > 1e-3  # not the base's
    loaded = reward_served.app.model._loaded().model
    assert not hasattr(loaded, "peft_config") and loaded.training is False  # one plain model
    assert all(not p.requires_grad for p in loaded.parameters())


def test_reward_swaps_adapter_base_adapter_fail_no_request(lora_store, reward_served, registry):
    ls = lora_store
    rewards = ls["rewards"]
    swap_under_clients(reward_served, registry, ls["rname"], (ls["rv1"], ls["ra"]), _score,
                        lambda v, got: v in rewards and _close(got, rewards[v]))
    with RewardClient(reward_served.target, timeout=60) as c:
        info = c.get_model()
    assert info.model.version == ls["ra"] and info.base.version == ls["rv1"]


def test_reward_refuses_bad_adapters_and_keeps_serving(lora_store, reward_served, registry):
    ls = lora_store
    rewards = ls["rewards"]
    registry.activate(ls["rname"], ls["ra"])
    wait_for(lambda: reward_served.app.model.info.ref.version == ls["ra"], timeout=60, what="ra")
    _refusals(reward_served, registry, ls["rname"], ls["bad_reward"], RewardClient, _score,
              ls["ra"], lambda v, got: _close(got, rewards[v]))


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------


def test_reference_service_follows_an_adapter_policy(lora_store, reference_served, registry):
    ls = lora_store
    logprobs = ls["logprobs"]

    def right(version, got) -> bool:
        return version in logprobs and all(_close(a, b) for a, b in zip(got, logprobs[version]))

    with ReferenceClient(reference_served.target, timeout=60) as c:
        info = c.get_model()
        res = c.logprobs(ITEMS)
    assert (info.model.name, info.model.version) == (ls["pname"], ls["pa"])
    assert info.base is not None and (info.base.name, info.base.version) == (ls["pname"], ls["pv1"])
    got = [list(r.logprobs) for r in res.results]
    assert res.model.version == ls["pa"] and right(ls["pa"], got)  # = the merged checkpoint's
    for r in res.results:
        assert r.sum == pytest.approx(math.fsum(r.logprobs), abs=1e-9)
    base = logprobs[ls["pv1"]]
    assert max(abs(a - b) for g, w in zip(got, base) for a, b in zip(g, w)) > 1e-3  # not the base's
    # the policy name's versions carry policy probes: checked in one teacher-forced pass
    swap_under_clients(reference_served, registry, ls["pname"], (ls["pv1"], ls["pa"]),
                        _reference, right)
    assert reference_served.app.model.info.base.version == ls["pv1"]


def test_reference_refuses_bad_adapters_and_keeps_serving(lora_store, reference_served, registry):
    ls = lora_store
    logprobs = ls["logprobs"]
    registry.activate(ls["pname"], ls["pa"])
    wait_for(lambda: reference_served.app.model.info.ref.version == ls["pa"], timeout=60, what="pa")
    _refusals(reference_served, registry, ls["pname"], ls["bad_reference"], ReferenceClient,
              _reference, ls["pa"],
              lambda v, got: all(_close(a, b) for a, b in zip(got, logprobs[v])))
