"""LoRA adapters, the training half (issue 20): jobs train a peft adapter instead of full
weights and publish it as an adapter version of the same model that names its base
(`rlhf.models.adapters`); `rlhf models merge` writes a merged full version. Real parts: the tiny
policy of conftest.py, real Redis (DB 11, unique names, deleted after), the model store; the
DPO job runs through `jobs.execute` (the worker's path).

- a LoRA DPO job publishes an adapter version (kind "adapter"): adapter_config.json +
  adapter_model.safetensors (LoRA weights only) and the base's tokenizer files, no config.json;
  the manifest names its base (name, version, sha256 of its weight files) and the LoRA config,
  its golden probes are base + adapter's, the job's metrics record `lora`; the base version is
  untouched (bit-identical, verified);
- its reference is the base with the adapter off (the policy itself, no second model): the
  first step's loss is log 2, and the trained policy with its adapter off gives the base's
  log-probs (with it on, others);
- `rlhf models merge NAME VERSION --as NAME2 --activate` publishes base + adapter merged as a
  verified full version naming the adapter it came from, whose logits equal base + adapter's
  within `TOL_MERGE` (fp32) and whose probes' greedy ids are the adapter version's;
- refused: a bad `lora` spec at submit (naming the field; a loop's `train.lora` too), target
  modules the model lacks, a job starting from an adapter version (merge it first), a `.bin`
  adapter or one without its weights, and an adapter whose base is missing, tampered with, an
  adapter, or not the one it was trained on (`AdapterBaseMismatch` / `TamperedCheckpoint`);
- SFT (with gradient checkpointing), reward-model (score head trained: `modules_to_save`) and
  GRPO training save adapters holding only adapter weights (and the head).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
from trainer_helpers import (  # noqa: F401 - r: fixture
    REDIS_URL, forget_job, forget_model, publish_active, r, unique, write_jsonl)

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from rlhf_client import TrainingClient  # noqa: E402
from rlhf_client.jobspecs import example_spec  # noqa: E402
from rlhf_client.redis_conn import connect  # noqa: E402

from rlhf.models.adapters import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterBaseMismatch, adapter_base, check_safe_adapter_dir,
    is_adapter, load_base_and_adapter)
from rlhf.models.loading import UnsafeCheckpoint, load_causal_lm  # noqa: E402
from rlhf.models.store import ModelStore, TamperedCheckpoint, sha256_file  # noqa: E402
from rlhf.trainer.dpo import run_dpo_job  # noqa: E402
from rlhf.trainer.jobs import JobRejected, JobStore, execute, parse_spec  # noqa: E402
from test_dpo import FAST, task_pairs  # noqa: E402

#: merged weights vs base + adapter: largest |Δ logit| (fp32)
TOL_MERGE = 1e-5
LORA = {"r": 4, "alpha": 8.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_policy_dir):
    """One LoRA DPO job (2 steps of 8 pairs) on the tiny policy, published as the model's adapter version."""
    from rlhf.config import Settings

    tmp = tmp_path_factory.mktemp("lora")
    settings = Settings(redis_url=REDIS_URL, store_dir=tmp / "store", metrics_port=None,
                        torch_threads=1)
    client = connect(REDIS_URL, decode_responses=True)
    name, jobs = unique("lora"), []
    try:
        base = publish_active(client, settings.store_dir, name, tiny_policy_dir)
        data = write_jsonl(tmp / "pairs.jsonl", task_pairs(16, seed=1, prefix="lora"))

        def run(**spec):
            job = parse_spec({"type": "dpo", "model_name": name, **FAST,
                              "source": {"type": "jsonl", "path": str(data)}, "max_steps": 2,
                              "eval_fraction": 0.0, "seed": 3, "batch_size": 8, **spec})
            jobs.append(job.job_id)
            return job, execute(job, run_dpo_job, settings=settings, worker="test")

        job, out = run(lora=LORA)
        assert out.status == "succeeded", out
        store = ModelStore(settings.store_dir)
        yield dict(settings=settings, store=store, name=name, base=base, job=job, out=out,
                   manifest=store.manifest(name, out.version), run=run, client=client)
    finally:
        forget_model(client, name)
        for job_id in jobs:
            forget_job(client, job_id)
        client.close()


def test_a_lora_dpo_job_publishes_an_adapter_version_naming_its_base(trained):
    store, m, base = trained["store"], trained["manifest"], trained["base"]
    assert is_adapter(m) and m.kind == "adapter" and m.parent == base.version
    store.verify(m.name, m.version)
    d = store.path(m.name, m.version)
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"} <= set(m.files)
    assert not (d / "config.json").exists() and not list(d.glob("*.bin"))
    # the base's tokenizer files, byte for byte
    assert sha256_file(d / "tokenizer.json") == base.files["tokenizer.json"]
    weights = {k: v for k, v in base.files.items() if k.endswith(".safetensors")}
    assert m.extra["base"]["name"] == m.name and m.extra["base"]["version"] == base.version
    assert m.extra["base"]["files"] == weights and weights
    assert m.extra["lora"]["r"] == 4 and m.extra["lora"]["alpha"] == 8.0
    assert m.extra["lora"]["task_type"] == "CAUSAL_LM"
    assert m.metrics["lora"] == {**LORA, "dropout": 0.0}  # what the job used
    assert m.probes["kind"] == "policy" and m.probes["greedy"]
    # the reference was the policy with its adapter off: no second model, step 1 at log 2
    assert m.extra["reference"]["adapter"] == "off"
    assert m.metrics["train_loss_first_step"] == pytest.approx(math.log(2), abs=1e-6)
    assert m.metrics["steps"] == 2
    record = JobStore(trained["client"]).get(trained["job"].job_id)
    assert record.metrics["lora"] == m.metrics["lora"]
    # only adapter weights were written; the base version is untouched (bit-identical)
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as st:
        keys = list(st.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
        assert any(st.get_tensor(k).abs().sum() > 0 for k in keys if ".lora_B." in k)  # trained
    assert store.verify(m.name, base.version).files == base.files


def test_rlhf_models_merge_publishes_the_merged_checkpoint_naming_the_adapter(trained, capsys):
    """`rlhf models merge` (in process: the `rlhf` entry point's routing): a verified full
    version whose logits equal base + adapter's within `TOL_MERGE` (fp32)."""
    from rlhf_client.registry import Registry

    from rlhf.cli import main

    store, m, client = trained["store"], trained["manifest"], trained["client"]
    name2 = unique("lora-merged")
    try:
        code = main(["models", "merge", m.name, m.version, "--as", name2, "--activate",
                     "--store", str(store.root), "--redis-url", REDIS_URL, "--json"])
        assert code == 0
        out = json.loads(capsys.readouterr().out)
        merged = store.verify(name2, out["version"])
        assert merged.kind == "policy" and out["active"]
        assert merged.extra["merged_from"]["name"] == m.name
        assert merged.extra["merged_from"]["version"] == m.version
        assert merged.extra["merged_from"]["base"]["version"] == m.extra["base"]["version"]
        assert "model.safetensors" in merged.files and merged.probes["kind"] == "policy"
        assert not any(f.endswith(".bin") for f in merged.files)
        # the merged weights answer the probes as base + adapter did (greedy ids equal)
        assert merged.probes["greedy"] == m.probes["greedy"]
        assert Registry(client).active(name2) == out["version"]
        # its logits are base + adapter's
        base_dir = adapter_base(store, m)
        ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])
        peft_model = load_base_and_adapter(base_dir, store.path(m.name, m.version))
        with torch.inference_mode():
            want = peft_model(input_ids=ids).logits
            got = load_causal_lm(store.path(name2, out["version"]))(input_ids=ids).logits
            plain = load_causal_lm(base_dir)(input_ids=ids).logits
        assert float((got - want).abs().max()) <= TOL_MERGE
        assert float((plain - want).abs().max()) > 1e-4  # the adapter changes the outputs
        # the reference of an adapter job, the trained policy with its adapter off, is the base
        from rlhf.trainer.dpo import AdapterOffReference, LocalReference
        from rlhf.trainer.logprobs import completion_logprobs

        items = [((5, 17, 42), (7, 99, 3)), ((5, 17, 42), (250, 11)), ((8, 9), (10, 11, 12))]
        off = AdapterOffReference(base_dir)
        off.bind(peft_model)
        got_ref = off.sequence_logps(items)
        assert got_ref == pytest.approx(LocalReference(base_dir).sequence_logps(items), abs=1e-5)
        with torch.inference_mode():
            on = completion_logprobs(peft_model, items, pad_id=0).sums.tolist()
        assert max(abs(a - b) for a, b in zip(on, got_ref)) > 1e-4  # the adapter is back on
        # a full version is not an adapter: nothing to merge, one line, exit 1
        assert main(["models", "merge", name2, out["version"], "--store", str(store.root),
                     "--redis-url", REDIS_URL]) == 1
        assert "not an adapter version" in capsys.readouterr().err
    finally:
        forget_model(client, name2)


def test_bad_lora_specs_and_adapter_starts_are_refused(trained, r):
    client = TrainingClient(REDIS_URL, client=r)
    for job_type in ("dpo", "ppo", "sft", "reward_model"):
        spec = example_spec(job_type)
        assert parse_spec({**spec, "lora": LORA}).lora.r == 4
        for bad, field in (({"r": 0}, "lora.r"), ({"alpha": -1}, "lora.alpha"),
                           ({"dropout": 1.0}, "lora.dropout"),
                           ({"target_modules": []}, "lora.target_modules"),
                           ({"rank": 8}, "lora.rank")):
            with pytest.raises(JobRejected, match=rf"(?m)^  {field}"):
                client.submit({**spec, "lora": {**LORA, **bad}})
    # a loop's round k+1 would start from round k's adapter: refused, naming the field
    with pytest.raises(JobRejected, match=r"train\.lora: a loop's rounds start from"):
        client.submit({**example_spec("iterate"), "train": {"lora": LORA}})
    # target modules the model does not have: refused when the adapter is made, naming the field
    from rlhf.trainer.precision import Precision

    tiny = load_causal_lm(adapter_base(trained["store"], trained["manifest"]))
    with pytest.raises(ValueError, match="lora.target_modules"):
        Precision(lora={**LORA, "target_modules": ["no_such_proj"]}).prepare(tiny)
    # a job never starts from an adapter version: merge it first
    m = trained["manifest"]
    _, out = trained["run"](lora=LORA, base_version=m.version)
    assert out.status == "failed" and "merge it first" in out.error, out
    _, out = trained["run"](base_version=m.version)  # a full-weights job neither
    assert out.status == "failed" and "is a LoRA adapter" in out.error, out


def test_an_adapter_with_a_wrong_missing_or_tampered_base_is_refused(trained, tmp_path):
    m = trained["manifest"]
    src = trained["store"].path(m.name, m.version)
    store = ModelStore(tmp_path / "store")  # a store of its own: its base is broken below
    base = store.publish(m.name, adapter_base(trained["store"], m), kind="policy")
    assert base.version == m.extra["base"]["version"]
    shutil.copytree(src, store.path(m.name, "v0002"))  # the adapter version, manifest and all
    adapter = store.verify(m.name, "v0002")
    assert adapter_base(store, adapter) == store.path(m.name, base.version)
    # a base whose weights are not those the adapter was trained on (another version's)
    files = {k: "0" * 64 for k in adapter.extra["base"]["files"]}
    wrong = dataclasses.replace(adapter, extra={**adapter.extra, "base": {
        **adapter.extra["base"], "files": files}})
    with pytest.raises(AdapterBaseMismatch, match="differ from those the adapter was trained on"):
        adapter_base(store, wrong)
    with pytest.raises(AdapterBaseMismatch, match="not in the store"):
        adapter_base(store, dataclasses.replace(adapter, extra={**adapter.extra, "base": {
            **adapter.extra["base"], "version": "v0099"}}))
    with pytest.raises(AdapterBaseMismatch, match="is itself an adapter"):
        adapter_base(store, dataclasses.replace(adapter, extra={**adapter.extra, "base": {
            **adapter.extra["base"], "version": "v0002"}}))
    # the base's weights changed on disk: its own checksums refuse it
    weights = store.path(m.name, base.version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TamperedCheckpoint):
        adapter_base(store, adapter)
    # an adapter in a format that runs code on load is refused (checked, and by the store)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad, ignore=shutil.ignore_patterns("manifest.json"))
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsafeCheckpoint, match="adapter_model.bin"):
        check_safe_adapter_dir(bad)
    with pytest.raises(UnsafeCheckpoint):
        store.publish(m.name, bad, kind="adapter")
    (bad / "adapter_model.bin").unlink()
    (bad / ADAPTER_WEIGHTS).unlink()  # and one without its weights
    with pytest.raises(UnsafeCheckpoint, match=f"no {ADAPTER_WEIGHTS}"):
        check_safe_adapter_dir(bad)


def test_sft_reward_model_grpo_and_gae_train_adapters(tiny_policy_dir, tiny_reward_dir, tmp_path):
    """The other job types train an adapter too (SFT with gradient checkpointing; GAE with a
    critic started from the peft-wrapped policy): only adapter
    weights (and the reward model's score head, peft `modules_to_save`) are trainable and saved;
    the reward adapter's probes (base + adapter) are read at the head peft trained."""
    from rlhf_client.datafiles import Pair
    from test_precision import grpo_samples

    from rlhf.models.probes import compute_probes
    from rlhf.trainer.jobs import PPOJob, RewardModelJob, SFTJob
    from rlhf.trainer.ppo import train_ppo
    from rlhf.trainer.precision import Precision
    from rlhf.trainer.reward_model import train_reward_model
    from rlhf.trainer.sft import train_sft

    def saved_keys(d):
        from safetensors import safe_open

        check_safe_adapter_dir(d)
        assert not (d / "config.json").exists()
        with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as st:
            return list(st.keys())

    pairs = task_pairs(16, seed=2, prefix="lora-x")
    lora = {**LORA, "target_modules": ["q_proj", "v_proj"]}
    spec = SFTJob(model_name="x", source={"type": "jsonl", "path": "unused"}, max_steps=2,
                  learning_rate=2e-3, batch_size=8, max_length=64, lora=lora,
                  gradient_checkpointing=True)
    res = train_sft(spec, [{"id": p["id"], "prompt": p["prompt"], "completion": p["chosen"]}
                           for p in pairs], base_dir=tiny_policy_dir, out_dir=tmp_path / "sft",
                    threads=1)
    assert res.metrics["lora"]["target_modules"] == ["q_proj", "v_proj"]
    keys = saved_keys(tmp_path / "sft")
    assert keys and all(".lora_" in k and (".q_proj." in k or ".v_proj." in k) for k in keys)

    rm_spec = RewardModelJob(model_name="rm", source={"type": "jsonl", "path": "unused"},
                             batch_size=8, learning_rate=1e-3, lora=LORA)
    rm = Precision.of(rm_spec).load_reward_model(tiny_reward_dir)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any(".score." in n for n in trainable)  # the value head trains
    assert all(".lora_" in n or ".score." in n for n in trainable), trainable
    pairs_rm = [Pair(p["id"], p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    train_reward_model(tiny_reward_dir, pairs_rm, pairs_rm[:4], rm_spec,
                       out_dir=tmp_path / "rm", threads=1)
    keys = saved_keys(tmp_path / "rm")
    assert any(".score." in k for k in keys) and all(".lora_" in k or ".score." in k for k in keys)
    probes = compute_probes("reward", tiny_reward_dir, adapter_dir=tmp_path / "rm")
    assert probes["scores"] != compute_probes("reward", tiny_reward_dir)["scores"]

    samples = grpo_samples(tiny_policy_dir)  # behaviour = reference = the base's log-probs
    spec = PPOJob(model_name="x", source={"type": "jsonl", "path": "unused"},
                  advantage_estimator="grpo", group_size=4, minibatch_size=8, ppo_epochs=1,
                  learning_rate=1e-3, lora=LORA)
    m = train_ppo(spec, samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "ppo",
                  threads=1).metrics
    assert abs(m["ratio_mean_first_step"] - 1) < 1e-5 and m["lora"]["r"] == 4
    assert all(".lora_" in k for k in saved_keys(tmp_path / "ppo"))

    # GAE with the critic started from the policy: the critic copies the base backbone out of
    # the peft-wrapped policy (its `base_layer` names unwrapped, no adapter tensors)
    from rlhf.trainer.ppo import _critic_from_policy
    from rlhf.models.loading import load_causal_lm
    from peft import LoraConfig, get_peft_model

    plain = load_causal_lm(tiny_policy_dir)
    wrapped = get_peft_model(load_causal_lm(tiny_policy_dir),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    a = _critic_from_policy(plain, 0).base_model.state_dict()
    b = _critic_from_policy(wrapped, 0).base_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spec = PPOJob(model_name="x", source={"type": "jsonl", "path": "unused"},
                  advantage_estimator="gae", minibatch_size=8, ppo_epochs=1,
                  learning_rate=1e-3, lora=LORA)
    m = train_ppo(spec, samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "gae",
                  threads=1).metrics
    assert abs(m["ratio_mean_first_step"] - 1) < 1e-5
    assert all(".lora_" in k for k in saved_keys(tmp_path / "gae"))
