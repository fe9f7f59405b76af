"""Data-parallel training (issue 20): real `torchrun` groups of two CPU ranks (gloo).

- two ranks give the same weights after k optimizer steps as one process with the same global
  batch (gradient accumulation, token-mean losses over micro-batches the ranks split unevenly),
  for DPO (through the whole job: read, controller, ranks, publish), for PPO with a critic, for
  SFT (the job: token mean over the global step) and for a reward model (the job: pair mean, a
  short last micro-batch that leaves one rank an empty shard; published as a reward version);
- a LoRA DPO job on two ranks trains the adapter alone (the base frozen; the reference is the
  base, computed once by the controller) to the one-process adapter, and publishes an adapter
  version naming its base;
- a rank SIGKILLed mid-job fails the attempt cleanly (a retry, nothing published, the stream /
  record untouched) and the retry publishes exactly one version.
"""

from __future__ import annotations

import json
import random

import pytest
from trainer_helpers import (  # noqa: F401 - r, settings: fixtures
    names_fixture, publish_active, r, settings, write_jsonl)

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from rlhf.models.store import ModelStore  # noqa: E402
from rlhf.trainer.distributed import FAULT_KILL_ENV, train_ppo_distributed  # noqa: E402
from rlhf.trainer.dpo import run_dpo_job, train_dpo  # noqa: E402
from rlhf.trainer.jobs import JobStore, execute, parse_spec  # noqa: E402
from rlhf.trainer.pipeline import PREFERENCES  # noqa: E402
from rlhf.trainer.ppo import SampleRecord, train_ppo  # noqa: E402

names = names_fixture("ddp", "test:ddp-prefs")

#: fp32 on both sides; the ranks' gradient sums differ from one process's only in the order of
#: float additions. The updates themselves are ~1e-3 (lr 2e-3 with Adam).
WEIGHT_TOL = 5e-5
#: Adam's ε for the parity runs. Adam moves every weight by about lr·g/(|g| + ε): a weight whose
#: gradient nearly cancels (|g| ~ 1e-8, where the order of additions changes the last bits)
#: moves by a float-noise-dependent share of lr with the default ε = 1e-8 — up to ~1e-4 apart
#: between one process and two ranks (PPO's v_proj on this machine) while the gradients agree
#: to 1e-6. ε = 1e-6 keeps those near-zero gradients from deciding the comparison.
PARITY_ADAM_EPS = 1e-6


def max_weight_diff(a_dir, b_dir, weights: str = "model.safetensors") -> float:
    """The largest |a − b| over two checkpoints' weights (`weights`: the file)."""
    a, b = load_file(a_dir / weights), load_file(b_dir / weights)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def pairs(n: int) -> list[dict]:
    g = random.Random(7)
    fruit = "apple cherry lemon grape mango".split()
    return [{"id": f"p{i}", "prompt": f"Q{i} about the {g.choice(['cat', 'dog', 'song'])}:",
             "chosen": " banana " + " ".join(g.choice(fruit) for _ in range(g.randint(1, 4))),
             "rejected": " " + g.choice(fruit) + " no" * g.randint(1, 3)} for i in range(n)]


def test_a_two_rank_dpo_job_survives_a_killed_rank_and_matches_one_process(
        r, names, settings, tiny_policy_dir, tmp_path, monkeypatch):
    base = publish_active(r, settings.store_dir, names["model"], tiny_policy_dir).version
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(24))
    fields = {"type": "dpo", "model_name": names["model"], "source": {"type": "jsonl",
              "path": str(data)}, "learning_rate": 2e-3, "beta": 0.05, "batch_size": 3,
              "grad_accum_steps": 2, "max_steps": 2, "max_length": 64, "eval_fraction": 0.25}
    job = parse_spec({**fields, "distributed": {"nproc_per_node": 2}})
    names["jobs"].append(job.job_id)
    once = tmp_path / "killed-once"
    monkeypatch.setenv(FAULT_KILL_ENV, f"1:1:{once}")  # rank 1 SIGKILLs itself after step 1

    first = execute(job, run_dpo_job, settings=settings, worker="test")
    assert once.exists(), "the fault hook did not fire"
    assert first.status == "retry" and first.retry_in_s is not None, first
    assert "torchrun exited" in first.error and "first failure: rank 1" in first.error, first.error
    store = ModelStore(settings.store_dir)
    assert store.versions(names["model"]) == [base]  # nothing published by the failed attempt
    rec = JobStore(r).get(job.job_id)
    assert (rec.status, rec.attempts) == ("queued", 1)

    second = execute(job, run_dpo_job, settings=settings, worker="test")
    assert second.status == "succeeded", second
    assert store.versions(names["model"]) == [base, second.version]  # exactly one version
    m = JobStore(r).get(job.job_id).metrics
    assert (m["world_size"], m["distributed_backend"], m["steps"]) == (2, "gloo", 2)

    # one process, the same global batches (the job's own split of the same file)
    single = parse_spec(fields)
    train, evals = PREFERENCES.split(PREFERENCES.read_jsonl(str(data)), single)
    one = train_dpo(single, train, eval_pairs=evals, base_dir=store.path(names["model"], base),
                    out_dir=tmp_path / "one", threads=1)
    version_dir = store.path(names["model"], second.version)
    diff = max_weight_diff(tmp_path / "one", version_dir)
    moved = max_weight_diff(tmp_path / "one", store.path(names["model"], base))
    assert moved > 20 * WEIGHT_TOL, moved  # the steps did move the weights
    assert diff < WEIGHT_TOL, (diff, moved)
    for k in ("train_loss", "train_accuracy", "eval_loss", "train_loss_first_step"):
        assert abs(one.metrics[k] - m[k]) < 1e-4, (k, one.metrics[k], m[k])
    assert store.manifest(names["model"], second.version).job_id == job.job_id


def ppo_samples(model_dir, n: int) -> list[SampleRecord]:
    """`n` trajectories of random lengths (behaviour log-probs: the policy's own, so the first
    ratio is 1), two per prompt, scored by their share of even token ids."""
    from rlhf.models.loading import load_causal_lm
    from rlhf.trainer.logprobs import completion_logprobs

    model = load_causal_lm(model_dir)
    g = random.Random(3)
    vocab = model.config.vocab_size
    rows = []
    for i in range(n):
        prompt = tuple(g.randrange(3, vocab) for _ in range(g.randint(2, 5)))
        rows.append((prompt, tuple(g.randrange(3, vocab) for _ in range(g.randint(1, 9)))))
    with torch.inference_mode():
        lps = completion_logprobs(model, rows, pad_id=0).per_row()
    return [SampleRecord(id=f"s{i}", group_id=f"g{i // 2}", prompt_ids=p, completion_ids=c,
                         behaviour_logprobs=tuple(lp), reference_logprobs=tuple(x - 0.01 for x in lp),
                         score=sum(1 for t in c if t % 2 == 0) / len(c))
            for i, ((p, c), lp) in enumerate(zip(rows, lps))]


def test_two_ppo_ranks_with_a_critic_give_one_process_weights(tiny_policy_dir, tmp_path):
    samples = ppo_samples(tiny_policy_dir, 11)
    fields = dict(model_name="x", source={"type": "jsonl", "path": "unused"}, minibatch_size=6,
                  grad_accum_steps=2, ppo_epochs=1, learning_rate=2e-3, value_learning_rate=2e-3,
                  seed=5, adam_eps=PARITY_ADAM_EPS)
    # 11 samples: minibatches of 6 and 5, micro-batches split unevenly
    single = parse_spec({"type": "ppo", **fields})
    one = train_ppo(single, samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "one", threads=1)
    steps = []
    two = train_ppo_distributed(parse_spec({"type": "ppo", **fields,
                                            "distributed": {"nproc_per_node": 2}}),
                                samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "two",
                                threads=2, progress=lambda s, t, m: steps.append((s, t)))
    assert steps == [(1, 2), (2, 2)]
    assert two.metrics["world_size"] == 2 and two.critic == one.critic
    for a, b in zip(one.curves, two.curves):
        for k in ("policy_loss", "value_loss", "entropy", "kl_ref", "approx_kl", "grad_norm",
                  "value_grad_norm", "explained_variance"):
            assert abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(a[k])), (k, a[k], b[k])
    moved = max_weight_diff(tmp_path / "one", tiny_policy_dir)
    assert moved > 20 * WEIGHT_TOL, moved
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < WEIGHT_TOL
    assert max_weight_diff(tmp_path / "one" / "value", tmp_path / "two" / "value") < WEIGHT_TOL
    assert json.loads((tmp_path / "two" / "ppo_state.json").read_text()) == one.state


def sft_records(n: int) -> list[dict]:
    """Examples with completions of 1 to 8 words: the ranks' shards hold unequal token counts."""
    g = random.Random(11)
    fruit = "apple cherry lemon grape mango banana".split()
    return [{"id": f"e{i}", "prompt": f"Q{i}: name some {g.choice(['fruit', 'food'])}:",
             "completion": " " + " ".join(g.choice(fruit) for _ in range(g.randint(1, 8)))}
            for i in range(n)]


def test_a_two_rank_sft_job_matches_one_process(r, names, settings, tiny_policy_dir, tmp_path):
    from rlhf.trainer.sft import SFT_EXAMPLES, run_sft_job, train_sft

    base = publish_active(r, settings.store_dir, names["model"], tiny_policy_dir).version
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(20))
    fields = {"type": "sft", "model_name": names["model"], "source": {"type": "jsonl",
              "path": str(data)}, "learning_rate": 2e-3, "batch_size": 3, "grad_accum_steps": 2,
              "max_steps": 2, "max_length": 64, "eval_fraction": 0.2,
              "adam_eps": PARITY_ADAM_EPS}
    job = parse_spec({**fields, "distributed": {"nproc_per_node": 2}})
    names["jobs"].append(job.job_id)
    out = execute(job, run_sft_job, settings=settings, worker="test")
    assert out.status == "succeeded", out
    store = ModelStore(settings.store_dir)
    manifest = store.verify(names["model"], out.version)
    assert (manifest.kind, manifest.parent, manifest.job_id) == ("policy", base, job.job_id)
    m = JobStore(r).get(job.job_id).metrics
    assert (m["world_size"], m["distributed_backend"], m["steps"]) == (2, "gloo", 2)

    single = parse_spec(fields)
    train, evals = SFT_EXAMPLES.split(SFT_EXAMPLES.read_jsonl(str(data)), single)
    one = train_sft(single, train, eval_records=evals, base_dir=store.path(names["model"], base),
                    out_dir=tmp_path / "one", threads=1)
    moved = max_weight_diff(tmp_path / "one", store.path(names["model"], base))
    assert moved > 20 * WEIGHT_TOL, moved
    assert max_weight_diff(tmp_path / "one", store.path(names["model"], out.version)) < WEIGHT_TOL
    assert m["train_tokens"] == one.metrics["train_tokens"]  # the global steps' tokens
    for k in ("train_loss", "train_loss_first_step", "eval_loss", "train_grad_norm"):
        assert abs(one.metrics[k] - m[k]) < 1e-4, (k, one.metrics[k], m[k])
    assert manifest.extra["applied_ids"] == one.applied_ids


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8.0}], ids=["full", "lora"])
def test_a_two_rank_reward_model_job_matches_one_process_and_publishes_a_reward_version(
        r, names, settings, tiny_reward_dir, tmp_path, lora):
    """Full weights: a reward version (the classifier with its scalar `score` head). LoRA: an
    adapter version of a reward base holding the adapter and the trained head (peft
    `modules_to_save`: the head's trainable copy is in the summed gradients)."""
    from rlhf.trainer.reward_model import run_reward_model_job, train_reward_model

    if lora is not None:
        pytest.importorskip("peft")
    base = publish_active(r, settings.store_dir, names["model"], tiny_reward_dir, kind="reward")
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(14))
    fields = {"type": "reward_model", "model_name": names["model"], "base_version": base.version,
              "source": {"type": "jsonl", "path": str(data)}, "learning_rate": 2e-3,
              "batch_size": 3, "grad_accum_steps": 2, "max_length": 64, "eval_fraction": 0.25,
              "lora": lora}
    single = parse_spec(fields)
    train, evals = PREFERENCES.split(PREFERENCES.read_jsonl(str(data)), single)
    # micro-batches of 3, 3, 3, 1: the last step's second micro-batch leaves rank 1 nothing
    assert len(train) % 3 == 1 and evals, (len(train), len(evals))
    job = parse_spec({**fields, "distributed": {"nproc_per_node": 2}})
    names["jobs"].append(job.job_id)
    out = execute(job, run_reward_model_job, settings=settings, worker="test")
    assert out.status == "succeeded", out
    store = ModelStore(settings.store_dir)
    manifest = store.verify(names["model"], out.version)  # rank 0's files, checksummed
    assert manifest.job_id == job.job_id and manifest.parent == base.version
    assert manifest.probes["kind"] == "reward" and manifest.probes["scores"]
    version_dir = store.path(names["model"], out.version)
    m = JobStore(r).get(job.job_id).metrics
    assert (m["world_size"], m["distributed_backend"], m["steps"]) == (2, "gloo", 2)

    base_dir = store.path(names["model"], base.version)
    one = train_reward_model(base_dir, train, evals, single, out_dir=tmp_path / "one", threads=1)
    if lora is None:
        assert manifest.kind == "reward"
        config = json.loads((version_dir / "config.json").read_text())
        assert [a.endswith("ForSequenceClassification") for a in config["architectures"]] == [True]
        weights = "model.safetensors"
        moved = max_weight_diff(tmp_path / "one", base_dir)
    else:
        from rlhf.models.adapters import ADAPTER_WEIGHTS, is_adapter

        assert is_adapter(manifest) and manifest.kind == "adapter"
        assert manifest.extra["adapter_of_kind"] == "reward"
        assert manifest.extra["base"]["version"] == base.version
        weights = ADAPTER_WEIGHTS
        moved = max(float(v.abs().max()) for k, v in
                    load_file(tmp_path / "one" / weights).items() if ".lora_B." in k)
    assert moved > 20 * WEIGHT_TOL, moved
    assert any(".score." in k or k.startswith("score.")
               for k in load_file(version_dir / weights)), "the scalar head is published"
    assert max_weight_diff(tmp_path / "one", version_dir, weights) < WEIGHT_TOL  # head included
    for k in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
        assert abs(one[k] - m[k]) < 1e-4, (k, one[k], m[k])


def test_a_two_rank_lora_dpo_job_trains_the_adapter_and_publishes_an_adapter_version(
        r, names, settings, tiny_policy_dir, tmp_path):
    pytest.importorskip("peft")
    from rlhf.models.adapters import ADAPTER_WEIGHTS, is_adapter

    base = publish_active(r, settings.store_dir, names["model"], tiny_policy_dir).version
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    fields = {"type": "dpo", "model_name": names["model"], "source": {"type": "jsonl",
              "path": str(data)}, "learning_rate": 2e-3, "beta": 0.05, "batch_size": 3,
              "grad_accum_steps": 2, "max_steps": 2, "max_length": 64, "eval_fraction": 0.25,
              "lora": {"r": 4, "alpha": 8.0}}
    job = parse_spec({**fields, "distributed": {"nproc_per_node": 2}})
    names["jobs"].append(job.job_id)
    out = execute(job, run_dpo_job, settings=settings, worker="test")
    assert out.status == "succeeded", out
    store = ModelStore(settings.store_dir)
    m = store.verify(names["model"], out.version)
    assert is_adapter(m) and m.kind == "adapter" and m.parent == base
    assert m.extra["base"]["version"] == base and m.extra["lora"]["r"] == 4
    assert m.extra["reference"]["adapter"] == "off"  # the base, as in one process
    assert m.metrics["world_size"] == 2 and m.metrics["lora"]["r"] == 4
    version_dir = store.path(names["model"], out.version)
    assert not (version_dir / "config.json").exists()
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(version_dir / ADAPTER_WEIGHTS))
    assert abs(m.metrics["train_loss_first_step"] - 0.6931471805599453) < 1e-6  # log 2

    single = parse_spec(fields)  # one process: the reference is its own policy, adapter off
    train, evals = PREFERENCES.split(PREFERENCES.read_jsonl(str(data)), single)
    one = train_dpo(single, train, eval_pairs=evals, base_dir=store.path(names["model"], base),
                    out_dir=tmp_path / "one", threads=1)
    adapter = load_file(tmp_path / "one" / ADAPTER_WEIGHTS)
    moved = max(float(v.abs().max()) for k, v in adapter.items() if ".lora_B." in k)
    assert moved > 20 * WEIGHT_TOL, moved  # B starts at 0
    assert max_weight_diff(tmp_path / "one", version_dir, ADAPTER_WEIGHTS) < WEIGHT_TOL
    for k in ("train_loss", "train_accuracy", "eval_loss"):
        assert abs(one.metrics[k] - m.metrics[k]) < 1e-4, (k, one.metrics[k], m.metrics[k])


def test_the_distributed_field_is_checked_at_submit_naming_the_field():
    from rlhf_client.jobspecs import JobRejected, example_spec

    ok = parse_spec({**example_spec("dpo"), "distributed": {"nproc_per_node": 2}})
    assert (ok.distributed.nproc_per_node, ok.distributed.nnodes, ok.distributed.backend,
            ok.distributed.strategy) == (2, 1, None, "ddp")
    assert parse_spec(example_spec("dpo")).distributed is None  # absent: one process
    for fields, where in (({"nproc_per_node": 0}, "distributed.nproc_per_node"),
                          ({"nproc_per_node": 2, "backend": "mpi"}, "distributed.backend"),
                          ({"nproc_per_node": 2, "strategy": "zero3"}, "distributed.strategy"),
                          ({"nproc_per_node": 2, "nnodes": 2}, "distributed.nnodes"),
                          ({"nproc_per_node": 9}, "distributed.nproc_per_node")):  # > batch_size 8
        with pytest.raises(JobRejected, match=where):
            parse_spec({**example_spec("dpo"), "distributed": fields})
    ppo = parse_spec({**example_spec("ppo"), "distributed": {"nproc_per_node": 4,
                                                            "backend": "nccl"}})
    assert ppo.distributed.backend == "nccl"
    for job_type in ("sft", "reward_model"):  # every job type that trains weights takes it
        spec = parse_spec({**example_spec(job_type), "batch_size": 4,
                           "distributed": {"nproc_per_node": 4}})
        assert spec.distributed.nproc_per_node == 4
        assert parse_spec(example_spec(job_type)).distributed is None
        with pytest.raises(JobRejected, match=r"distributed\.nproc_per_node: 5 ranks need at "
                                              r"least as many items per micro-batch \(batch_size "
                                              r"= 4\)"):
            parse_spec({**example_spec(job_type), "batch_size": 4,
                        "distributed": {"nproc_per_node": 5}})
        with pytest.raises(JobRejected, match="distributed.backend"):
            parse_spec({**example_spec(job_type), "distributed": {"nproc_per_node": 2,
                                                                  "backend": "mpi"}})
    lora = parse_spec({**example_spec("dpo"), "lora": {"r": 4},  # LoRA and data parallel: fine
                       "distributed": {"nproc_per_node": 2}})
    assert lora.lora.r == 4 and lora.distributed.nproc_per_node == 2
