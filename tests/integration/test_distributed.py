"""Data-parallel training (issue 20): real `torchrun` groups of two CPU ranks (gloo).

- two ranks give the same weights after k optimizer steps as one process with the same global
  batch (gradient accumulation, token-mean losses over micro-batches the ranks split unevenly),
  for DPO (through the whole job: read, controller, ranks, publish) and for PPO with a critic;
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


def max_weight_diff(a_dir, b_dir) -> float:
    """The largest |a − b| over two checkpoints' weights."""
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
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
                  seed=5)  # 11 samples: minibatches of 6 and 5, micro-batches split unevenly
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
