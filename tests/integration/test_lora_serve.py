"""Serving LoRA adapter versions (issue 20): base + adapter on both policy backends.

A store holds a base version and adapter versions of it (peft adapters published with
`rlhf.models.adapters.publish_adapter`: checksums, the base's weight checksums, golden probes on
base + adapter). The policy service follows the model name in the registry (Redis DB 5, a
unique name) and serves whichever is active: an adapter's greedy output equals the merged
checkpoint's (`merge_to_dir`, loaded fresh); swaps between adapters (only the adapter loads; the
base stays), to the base and back fail no request under concurrent clients, and every response
names the version (and base) that produced it; a bad adapter (its base missing or not its own,
a file missing, a file tampered) is refused and the old version keeps serving.

One vLLM engine start in the file (`@pytest.mark.vllm`), as the adapters arrive on it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from helpers import TEST_REDIS, VLLM_SETTINGS, ThreadedApp, make_settings
from trainer_helpers import swap_under_clients, wait_for

from rlhf_client import PolicyClient, SamplingParams
from rlhf_client.registry import Registry

REDIS_URL = f"{TEST_REDIS}/5"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
PROMPTS = ["the cat sat on the", "a good dog", "please pass the red"]


def fresh_greedy(model_dir: Path) -> list[list[int]]:
    """Greedy ids of PROMPTS from a fresh, naive load of a full checkpoint (no service)."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.models.probes import _naive_greedy

    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    with torch.inference_mode():
        return [_naive_greedy(model, tok.encode(p, add_special_tokens=False), GREEDY.max_new_tokens,
                              {tok.eos_token_id}) for p in PROMPTS]


def _adapter(base_dir: Path, seed: int, rank: int = 8):
    """A peft LoRA adapter on the base with random (non-zero) B: it changes the greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf.models.loading import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_dir), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def registry():
    return Registry.from_url(REDIS_URL)


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory, registry):
    """Base v1, adapters a1 and a2 of it, their expected greedy output, and bad adapters."""
    from rlhf.models.adapters import merge_to_dir, publish_adapter
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("lora-serve")
    name = f"lora-serve-{uuid.uuid4().hex[:8]}"
    store = ModelStore(root / "store")
    base_src = make_tiny_model("policy", root / "base", seed=0, tie_embeddings=False)
    probes = compute_probes("policy", base_src)
    v1 = store.publish(name, base_src, kind="policy", probes=probes).version
    registry.register(name, v1)
    adapters = []
    for seed in (1, 2):
        version = publish_adapter(store, name, _adapter(base_src, seed), base_version=v1).version
        registry.register(name, version)
        adapters.append(version)
    a1, a2 = adapters
    expected = {v1: fresh_greedy(base_src)}
    for a in adapters:
        merged = merge_to_dir(store.path(name, v1), store.path(name, a), root / f"merged-{a}")
        expected[a] = fresh_greedy(merged)
    assert len({json.dumps(e) for e in expected.values()}) == 3, "adapters must change the output"

    def clone(src: str, tag: str) -> Path:
        d = store.root / name / f"{tag}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(store.path(name, src), d)
        registry.register(name, d.name)
        return d

    def edit_manifest(d: Path, fn) -> None:
        data = json.loads((d / "manifest.json").read_text())
        fn(data)
        (d / "manifest.json").write_text(json.dumps(data))

    bad = {}
    d = clone(a2, "wrongbase")  # names v1, but with weights other than v1's (trained on another)
    edit_manifest(d, lambda m: m["extra"]["base"]["files"].update(
        {k: "0" * 64 for k in m["extra"]["base"]["files"]}))
    bad["wrong base"] = d.name
    d = clone(a2, "nobase")
    edit_manifest(d, lambda m: m["extra"]["base"].update(version="v9999"))
    bad["missing base"] = d.name
    d = clone(a2, "missing")
    (d / "adapter_model.safetensors").unlink()
    bad["missing file"] = d.name
    d = clone(a2, "tampered")
    blob = bytearray((d / "adapter_model.safetensors").read_bytes())
    blob[-8:] = bytes(8)  # the tensors' last bytes: still loads, other numbers
    (d / "adapter_model.safetensors").write_bytes(bytes(blob))
    bad["tampered file"] = d.name
    registry.activate(name, a1)
    yield dict(name=name, store=store.root, v1=v1, a1=a1, a2=a2, expected=expected, bad=bad)
    keys = list(registry.r.scan_iter(f"rlhf:model:{name}:*"))
    if keys:
        registry.r.delete(*keys)
    registry.r.srem("rlhf:models", name)


def _served(served) -> tuple[str, list[list[int]], str]:
    with PolicyClient(served.target, timeout=120) as c:
        res = c.generate(PROMPTS, GREEDY)
    return res.model.version, [list(x.token_ids) for x in res.completions]


def _swap_and_check(served, ls, registry, backend: str) -> None:
    """a1 → a2 → a1 → v1 (the base) → a2 under concurrent clients; then bad adapters."""
    name, expected = ls["name"], ls["expected"]
    engine = served.app.model
    host = getattr(engine, "_host", None)

    def on_swapped(version: str) -> None:
        with PolicyClient(served.target, timeout=120) as c:
            base = c.get_model().base  # GetModel names an adapter's base
        got = (base.name, base.version) if base else None
        assert got == (None if version == ls["v1"] else (name, ls["v1"])), (version, got)
        if backend == "hf" and version == ls["a1"]:
            assert engine._host is host, "an adapter swap on the same base reloaded the base"
            assert len(host.adapters()) <= 3  # unused adapters are dropped

    swap_under_clients(served, registry, name, (ls["a2"], ls["a1"], ls["v1"], ls["a2"]), _served,
                       lambda version, got: got == expected.get(version), on_swapped=on_swapped,
                       timeout=120)

    # a bad adapter is refused; the old version keeps serving, unchanged
    a2 = ls["a2"]
    for damage, version in ls["bad"].items():
        registry.activate(name, version)
        wait_for(lambda: served.app.follower.refused == version, timeout=120,
                 what=f"refusal of {damage}")
        assert _served(served) == (a2, expected[a2]), damage
    registry.activate(name, ls["a1"])
    wait_for(lambda: _served(served)[0] == ls["a1"], timeout=120, what="a1 after the refusals")


def _follow(ls, registry, **extra):
    from rlhf.policy.app import make_policy_app

    registry.activate(ls["name"], ls["a1"])
    settings = make_settings(model_name=ls["name"], store_dir=ls["store"], redis_url=REDIS_URL,
                             swap_poll_s=0.5, batch_max_wait_ms=2, **extra)
    return ThreadedApp(make_policy_app(settings))


def test_hf_serves_adapters_and_swaps_them_without_reloading_the_base(lora_store, registry):
    ls = lora_store
    with _follow(ls, registry) as served:
        with PolicyClient(served.target, timeout=120) as c:
            info = c.get_model()
            assert (info.model.name, info.model.version) == (ls["name"], ls["a1"])
            assert (info.base.name, info.base.version) == (ls["name"], ls["v1"])
        assert served.app.model.info.base.version == ls["v1"]
        assert _served(served) == (ls["a1"], ls["expected"][ls["a1"]])  # = the merged checkpoint's
        _swap_and_check(served, ls, registry, "hf")


@pytest.mark.vllm
def test_vllm_serves_adapters_and_swaps_them_on_one_engine(lora_store, registry):
    ls = lora_store
    with _follow(ls, registry, **VLLM_SETTINGS) as served:
        engine = served.app.model
        llm = engine.llm
        assert engine.info.base.version == ls["v1"]
        assert _served(served) == (ls["a1"], ls["expected"][ls["a1"]])  # = the merged checkpoint's
        _swap_and_check(served, ls, registry, "vllm")
        assert engine.llm is llm, "an adapter swap started a new engine"
