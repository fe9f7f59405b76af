"""Training precision and memory (issue 20): every training job type takes `dtype` (float32,
bf16-mixed, bfloat16) and `gradient_checkpointing`, on real parts (a tiny policy made on the
spot, real Redis, the model store; DPO jobs run through `jobs.execute`, the worker's path).

- a spec with a bad `dtype` / `gradient_checkpointing` is refused at submit naming the field;
- a bf16-mixed DPO job's loss curve tracks the float32 job's step by step within
  `TOL_MIXED`, starts at log 2 (its local reference is computed in its own precision), and the
  job record and the published version's manifest name the dtype used (fp32 weights published);
- pure bf16 DPO training (with gradient checkpointing) saves bf16 weights, its local reference
  in bf16 too (step 1 at log 2 within bf16 rounding);
- SFT, reward-model and GRPO training take the same options (bf16-mixed curves within
  `TOL_MIXED` of fp32; what was used is in the metrics);
- gradient checkpointing recomputes activations (the checkpointed layers run again in
  backward) and changes neither the loss nor the gradients (fp32: `TOL_CKPT`; also under bf16
  autocast, and in train mode for the reward model).

Tolerances: `TOL_MIXED` bounds the largest |Δ| of a per-step training loss (and of the final
eval / policy loss) against the float32 run with the same seed, data and thread count. bf16
keeps 8 bits of mantissa; the rounding of step 1 (~1e-6 here) compounds through the updates
(lr 2e-3), so the gap grows with the steps. Measured on the tiny policy, 1 thread (2026-12-07):
DPO job 8 steps 0.016 nats (loss 0.69 → ~0.5), SFT 5 steps 6e-4 (loss ~6), reward model 2 steps
3e-4; the bound leaves 2.5× room over the largest. A bf16 path that diverged (or a head that
rounded its logits to bf16) leaves it within a few steps.
"""

from __future__ import annotations

import math

import pytest
from trainer_helpers import (  # noqa: F401 - r, settings: fixtures
    REDIS_URL, names_fixture, r, settings, write_jsonl)

torch = pytest.importorskip("torch")

from rlhf_client import TrainingClient  # noqa: E402
from rlhf_client.history import read_metrics  # noqa: E402
from rlhf_client.jobspecs import TRAINING_DTYPES, example_spec, job_schema  # noqa: E402

from rlhf.models.store import ModelStore  # noqa: E402
from rlhf.trainer.jobs import JobRejected, JobStore, parse_spec  # noqa: E402

# the DPO tests' tiny-policy settings, synthetic "banana" task, base version and job runner
# (`jobs.execute`, the worker's path)
from test_dpo import FAST, base, run as run_dpo_job  # noqa: E402, F401 - base: a fixture
from test_dpo import task_pairs as dpo_task_pairs  # noqa: E402

#: Largest per-step |Δ train loss| against float32 (nats).
TOL_MIXED = 4e-2
#: Smallest gap that shows a bf16 mode really computed in bf16 (fp32 reruns agree exactly).
NOT_FP32 = 1e-7
#: Gradient checkpointing: largest |Δ| of the loss and of any gradient element (fp32).
TOL_CKPT = 1e-6
names = names_fixture("precision", "test:precision")


def task_pairs(n: int, *, seed: int = 1) -> list[dict]:
    return dpo_task_pairs(n, seed=seed, prefix="prec")


def curve(r, job_id: str, key: str = "train_loss") -> list[float]:
    """The job's per-step `key`, from its history rows (what `rlhf jobs metrics` reads)."""
    rows = [row for row in read_metrics(r, job_id) if row.get("stage") == "training"]
    return [float(row[key]) for row in sorted(rows, key=lambda row: row["step"])]


def weights_dtypes(model_dir) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    return out


def largest_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# the spec
# ------------------------------------------------------------------------------------------------


def test_a_bad_dtype_or_checkpointing_flag_is_refused_at_submit_naming_the_field(r):
    from rlhf.trainer.precision import DTYPES

    assert DTYPES == TRAINING_DTYPES
    client = TrainingClient(REDIS_URL, client=r)
    for job_type in ("dpo", "ppo", "sft", "reward_model"):
        props = job_schema(job_type)["properties"]
        assert props["dtype"]["default"] == "float32" and props["dtype"]["enum"] == list(DTYPES)
        assert props["gradient_checkpointing"]["default"] is False
        for dtype in DTYPES:
            assert parse_spec({**example_spec(job_type), "dtype": dtype}).dtype == dtype
        with pytest.raises(JobRejected, match=r"(?m)^  dtype: Input should be 'float32', "
                                              r"'bf16-mixed' or 'bfloat16'"):
            client.submit({**example_spec(job_type), "dtype": "fp16"})
        with pytest.raises(JobRejected, match=r"(?m)^  gradient_checkpointing: "):
            client.submit({**example_spec(job_type), "gradient_checkpointing": "sometimes"})
    # a loop passes them to its rounds' jobs, checked as theirs
    loop = example_spec("iterate")
    with pytest.raises(JobRejected, match=r"train\.dtype: Input should be"):
        client.submit({**loop, "train": {"dtype": "float64"}})
    assert parse_spec({**loop, "train": {"dtype": "bf16-mixed"}}).child_spec(
        1, "v1", "v1").dtype == "bf16-mixed"


# ------------------------------------------------------------------------------------------------
# DPO jobs, the worker's path
# ------------------------------------------------------------------------------------------------


def test_a_bf16_mixed_dpo_job_tracks_fp32_and_records_its_dtype(r, names, settings, base,
                                                               tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", task_pairs(60))
    common = dict(source={"type": "jsonl", "path": str(data)}, max_steps=8, eval_fraction=0.2,
                  seed=3)
    runs = {}
    for dtype in ("float32", "bf16-mixed"):
        job, out = run_dpo_job(names, settings, dtype=dtype, **common)
        assert out.status == "succeeded", out
        runs[dtype] = (job, out)
    want = curve(r, runs["float32"][0].job_id)
    got = curve(r, runs["bf16-mixed"][0].job_id)
    assert len(want) == 8 and want[-1] < want[0] - 0.1, want  # fp32 learns
    assert NOT_FP32 < largest_gap(want, got) <= TOL_MIXED, (want, got)  # bf16 ran, and tracks

    store = ModelStore(settings.store_dir)
    for dtype, (job, out) in runs.items():
        rec = JobStore(r).get(job.job_id)
        manifest = store.manifest(names["model"], out.version)
        for m in (rec.metrics, manifest.metrics):
            assert (m["dtype"], m["weights_dtype"], m["gradient_checkpointing"]) == (
                dtype, "float32", False), m
            # the local reference is computed as the policy is: step 1 is log 2
            assert m["compute_dtype"] == m["policy_dtype"] == m["reference_dtype"]
            assert abs(m["train_loss_first_step"] - math.log(2)) < 1e-4, m
        assert manifest.extra["spec"]["dtype"] == dtype
        assert manifest.extra["reference"].get("precision") == (
            "bf16-mixed" if dtype == "bf16-mixed" else None)
        assert manifest.extra["reference"]["dtype_matches_policy"] is True
        assert weights_dtypes(store.path(names["model"], out.version)) == {"F32"}  # fp32 master
    m32, mixed = (JobStore(r).get(runs[d][0].job_id).metrics for d in ("float32", "bf16-mixed"))
    assert (m32["compute_dtype"], mixed["compute_dtype"]) == ("float32", "bfloat16")
    assert abs(m32["eval_loss"] - mixed["eval_loss"]) <= TOL_MIXED, (m32, mixed)


def test_pure_bf16_dpo_with_checkpointing_saves_bf16_weights(tiny_policy_dir, tmp_path):
    from rlhf.trainer.dpo import train_dpo
    from rlhf.trainer.jobs import DPOJob

    spec = DPOJob(model_name="x", source={"type": "jsonl", "path": "unused"}, max_steps=2,
                  **{**FAST, "batch_size": 8}, dtype="bfloat16", gradient_checkpointing=True)
    res = train_dpo(spec, task_pairs(16), base_dir=tiny_policy_dir, out_dir=tmp_path / "out",
                    threads=1)  # 16 pairs: bf16 is slow on CPUs without bf16 instructions
    m = res.metrics
    assert (m["dtype"], m["weights_dtype"], m["compute_dtype"], m["reference_dtype"],
            m["gradient_checkpointing"]) == ("bfloat16",) * 4 + (True,), m
    assert res.reference["dtype_matches_policy"] is True
    # the local reference is bf16 too: step 1 is log 2 within bf16 rounding
    assert abs(m["train_loss_first_step"] - math.log(2)) < 1e-2, m
    assert math.isfinite(m["train_loss"])
    assert weights_dtypes(tmp_path / "out") == {"BF16"}  # what it trained is what it saves


# ------------------------------------------------------------------------------------------------
# SFT, reward model, GRPO: the same options
# ------------------------------------------------------------------------------------------------


def test_a_bf16_mixed_sft_run_tracks_fp32(tiny_policy_dir):
    from rlhf.trainer.jobs import SFTJob
    from rlhf.trainer.sft import train_sft

    records = [{"id": p["id"], "prompt": p["prompt"], "completion": p["chosen"]}
               for p in task_pairs(40, seed=2)]
    curves, metrics = {}, {}
    for dtype in ("float32", "bf16-mixed"):
        spec = SFTJob(model_name="x", source={"type": "jsonl", "path": "unused"}, max_steps=5,
                      learning_rate=2e-3, batch_size=8, max_length=64, dtype=dtype)
        steps: list[float] = []
        res = train_sft(spec, records, base_dir=tiny_policy_dir, threads=1,
                        progress=lambda s, n, m: steps.append(m["train_loss"]))
        curves[dtype], metrics[dtype] = steps, res.metrics
    assert curves["float32"][-1] < curves["float32"][0], curves  # it learns
    assert NOT_FP32 < largest_gap(curves["float32"], curves["bf16-mixed"]) <= TOL_MIXED, curves
    assert (metrics["bf16-mixed"]["dtype"], metrics["bf16-mixed"]["weights_dtype"],
            metrics["bf16-mixed"]["policy_dtype"]) == ("bf16-mixed", "float32", "bfloat16")


def grpo_samples(policy_dir) -> list:
    """8 fixed samples in groups of 4 for GRPO: behaviour = reference = the base's own fp32
    log-probs (also tests/integration/test_lora_train.py)."""
    from rlhf_client.datafiles import SampleRecord

    from rlhf.models.loading import load_causal_lm
    from rlhf.trainer.logprobs import completion_logprobs

    policy = load_causal_lm(policy_dir)
    rows = [([5, 6, 7], [8 + (i * 7 + j) % 50 for j in range(6)]) for i in range(8)]
    with torch.inference_mode():
        lps = completion_logprobs(policy, rows, pad_id=0).per_row()
    return [SampleRecord(id=f"s{i}", group_id=f"g{i // 4}", prompt_ids=tuple(p),
                         completion_ids=tuple(c), behaviour_logprobs=tuple(lp),
                         reference_logprobs=tuple(lp), score=float(i % 4), policy_version="v1")
            for i, ((p, c), lp) in enumerate(zip(rows, lps))]


def test_reward_model_and_grpo_training_take_the_dtype(tiny_policy_dir, tiny_reward_dir, tmp_path):
    from rlhf_client.datafiles import Pair

    from rlhf.trainer.jobs import PPOJob, RewardModelJob
    from rlhf.trainer.ppo import train_ppo
    from rlhf.trainer.reward_model import train_reward_model

    pairs = [Pair(p["id"], p["prompt"], p["chosen"], p["rejected"]) for p in task_pairs(16)]
    rm = {}
    for dtype in ("float32", "bf16-mixed"):
        spec = RewardModelJob(model_name="rm", source={"type": "jsonl", "path": "unused"},
                              batch_size=8, learning_rate=1e-3, dtype=dtype,
                              gradient_checkpointing=dtype != "float32")
        rm[dtype] = train_reward_model(tiny_reward_dir, pairs, pairs[:4], spec,
                                       out_dir=tmp_path / f"rm-{dtype}", threads=1)
    assert (rm["bf16-mixed"]["dtype"], rm["bf16-mixed"]["gradient_checkpointing"]) == (
        "bf16-mixed", True)
    for k in ("train_loss", "eval_loss"):
        assert abs(rm["float32"][k] - rm["bf16-mixed"][k]) <= TOL_MIXED, (k, rm)

    samples = grpo_samples(tiny_policy_dir)
    ppo = {}
    for dtype in ("float32", "bf16-mixed"):
        spec = PPOJob(model_name="x", source={"type": "jsonl", "path": "unused"},
                      advantage_estimator="grpo", group_size=4, minibatch_size=8, ppo_epochs=2,
                      learning_rate=1e-3, dtype=dtype, gradient_checkpointing=dtype != "float32")
        ppo[dtype] = train_ppo(spec, samples, base_dir=tiny_policy_dir, threads=1).metrics
    m32, mixed = ppo["float32"], ppo["bf16-mixed"]
    assert (mixed["dtype"], mixed["policy_dtype"], mixed["gradient_checkpointing"]) == (
        "bf16-mixed", "bfloat16", True)
    assert abs(m32["ratio_mean_first_step"] - 1) < 1e-5  # fp32 recomputes its behaviour
    assert abs(mixed["ratio_mean_first_step"] - 1) < 1e-2  # bf16 matmuls: within rounding
    assert abs(m32["policy_loss"] - mixed["policy_loss"]) <= TOL_MIXED, (m32, mixed)


def test_log_probs_come_from_fp32_logits_under_autocast(tiny_policy_dir):
    """The fused head leaves autocast off: under a bf16-mixed job's autocast its log-probs (and
    their gradients) are exactly the fp32 ones for the same hidden states."""
    from rlhf.models.loading import load_causal_lm
    from rlhf.trainer.logprobs import fused_token_logprobs_entropy
    from rlhf.trainer.precision import Precision

    head = load_causal_lm(tiny_policy_dir).get_output_embeddings()
    torch.manual_seed(0)
    hidden = torch.randn(6, head.in_features)
    targets = torch.randint(0, head.out_features, (6,))
    out = {}
    for dtype in ("float32", "bf16-mixed"):
        h = hidden.clone().requires_grad_(True)
        with Precision(dtype).autocast():
            lp, ent = fused_token_logprobs_entropy(h, head, targets)
        (lp.sum() + ent.sum()).backward()
        out[dtype] = (lp.detach(), ent.detach(), h.grad)
    assert out["bf16-mixed"][0].dtype == torch.float32
    for a, b in zip(out["float32"], out["bf16-mixed"]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# gradient checkpointing
# ------------------------------------------------------------------------------------------------


def _loss_and_grads(model, fn, precision):
    with precision.autocast():
        loss = fn(model)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return float(loss.detach()), grads


def _count_recomputes(model) -> list[int]:
    """Calls of the checkpointed layers' first MLP projection (forward pre-hooks): once per
    forward, once more per recompute in backward."""
    calls = [0]
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_gradient_checkpointing_changes_neither_the_loss_nor_the_gradients(
        tiny_policy_dir, tiny_reward_dir, dtype):
    from rlhf_client.datafiles import Pair

    from rlhf.models.loading import load_tokenizer
    from rlhf.trainer.dpo import DPOLossConfig, batch_loss, encode_pairs
    from rlhf.trainer.precision import Precision
    from rlhf.trainer.reward_model import _encode, accumulate_gradients

    torch.set_num_threads(1)
    tok = load_tokenizer(tiny_policy_dir, padding_side="right")
    pairs, _ = encode_pairs(tok, task_pairs(8), max_length=64)
    for p in pairs:  # any reference numbers do: both runs see the same
        p.ref_chosen, p.ref_rejected = -20.0, -21.0
    cfg = DPOLossConfig(beta=0.1)
    tol = TOL_CKPT if dtype == "float32" else 1e-5

    def dpo(model):
        return batch_loss(model, pairs, cfg, pad_id=tok.pad_token_id)[0]

    out = {}
    for ckpt in (False, True):
        precision = Precision(dtype, ckpt)
        model = precision.load_causal_lm(tiny_policy_dir)
        assert not model.training  # eval mode: no dropout
        calls = _count_recomputes(model)
        out[ckpt] = _loss_and_grads(model, dpo, precision)
        assert calls[0] == (2 if ckpt else 1), calls  # the layer ran again in backward
        assert model.config.use_cache is not ckpt
    (l0, g0), (l1, g1) = out[False], out[True]
    assert abs(l0 - l1) <= tol and g0.keys() == g1.keys()
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) <= tol

    # the reward model trains in train mode: the same there
    rm_pairs = _encode(tok, [Pair(x["id"], x["prompt"], x["chosen"], x["rejected"])
                             for x in task_pairs(4)], 64)
    grads = {}
    for ckpt in (False, True):
        precision = Precision(dtype, ckpt)
        model = precision.load_reward_model(tiny_reward_dir).train()
        loss, _ = accumulate_gradients(model, [rm_pairs], int(model.config.pad_token_id),
                                       torch.device("cpu"), precision)
        grads[ckpt] = (loss, {n: p.grad.float() for n, p in model.named_parameters()
                              if p.grad is not None})
    (l0, g0), (l1, g1) = grads[False], grads[True]
    assert abs(l0 - l1) <= tol
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) <= tol
