"""DPO training jobs on real parts: a tiny policy made on the spot, real Redis, a real
ReferenceService on loopback, run in-process (no Celery).

- learning: on a synthetic preference task (chosen responses open with "banana", rejected ones
  with another fruit) a DPO job raises held-out implicit-reward accuracy from ~0.5 to ≥ 0.9 and
  makes the published policy's own samples say "banana" far more often;
- reference log-probs from the ReferenceService and from a local checkpoint give the same loss;
  with the base as reference the first step's loss is log 2 and its margin 0, and a reference
  computed in another dtype than the policy is recorded and warned about;
- a job whose loss goes non-finite fails naming the step and publishes nothing;
- online: pairs pushed to a stream are trained on once, committed after the publish;
- bad specs (β ≤ 0, unknown loss type, missing model, empty dataset ...) are rejected at submit.
"""

from __future__ import annotations

import logging
import math
import random
import shutil

import pytest
import redis
from rlhf_client.redis_conn import connect
from trainer_helpers import (  # noqa: F401 - r, settings: fixtures
    REDIS_URL, names_fixture, publish_active, r, settings, unique, write_jsonl)

torch = pytest.importorskip("torch")

from rlhf_client import QueueProducer, Registry, TrainingClient  # noqa: E402

from rlhf.models.store import ModelStore  # noqa: E402
from rlhf.trainer.dpo import (  # noqa: E402
    LocalReference,
    ServiceReference,
    encode_pairs,
    run_dpo_job,
    train_dpo,
)
from rlhf.trainer.jobs import DPOJob, JobRejected, JobStore, execute, parse_spec  # noqa: E402
from rlhf.trainer.queues import applied_ids  # noqa: E402

TARGET = "banana"
OTHERS = "apple cherry lemon grape mango melon peach plum pear lime".split()
FILLER = ("the a my your red blue green big small old new on in with today really very yes please "
          "thanks cat dog book song cake park game house").split()
NAMES = "Alice Bob Carol Dave Eve Frank Grace Henry Ivy Jack".split()
NOUNS = "cat dog book song cake park game story house train".split()
# tiny policy, synthetic task: tuned to learn in a few seconds on one thread
FAST = dict(learning_rate=2e-3, beta=0.05, batch_size=16, max_length=64)


def task_pairs(n: int, *, seed: int, prefix: str) -> list[dict]:
    """Minimal pairs: the same response opening with "banana" (chosen) or another fruit."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        words = [r.choice(FILLER) for _ in range(r.randint(2, 5))]
        out.append({
            "id": f"{prefix}-{i}",
            "prompt": f"{r.choice(NAMES)} asked about the {r.choice(NOUNS)}:",
            "chosen": " " + " ".join([TARGET] + words) + ".",
            "rejected": " " + " ".join([r.choice(OTHERS)] + words) + ".",
        })
    return out


names = names_fixture("dpo", "test:dpo-prefs")


@pytest.fixture
def base(r, names, settings, tiny_policy_dir):
    """The tiny policy published as the model's first, active version."""
    return publish_active(r, settings.store_dir, names["model"], tiny_policy_dir).version


def run(names, settings, **spec):
    job = parse_spec({"type": "dpo", "model_name": names["model"], **FAST, **spec})
    names["jobs"].append(job.job_id)
    return job, execute(job, run_dpo_job, settings=settings, worker="test")


def banana_rate(model_dir, prompts, *, samples: int = 5, new_tokens: int = 8) -> float:
    """Share of the policy's own samples (temperature 1, nothing filtered) that say " banana"."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)  # pads on the left
    (target,) = tok.encode(" " + TARGET, add_special_tokens=False)
    batch = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=new_tokens, num_return_sequences=samples,
                             pad_token_id=tok.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]  # (prompts × samples, new_tokens)
    return float((new == target).any(dim=1).double().mean())


def test_a_dpo_job_learns_the_preference_and_publishes_a_version(
        r, names, settings, base, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", task_pairs(300, seed=1, prefix="t"))
    progress = []
    real_progress = JobStore.progress

    def record(self, job_id, p, m=None):
        progress.append((p, m))
        real_progress(self, job_id, p, m)

    monkeypatch.setattr(JobStore, "progress", record)
    job, out = run(names, settings, source={"type": "jsonl", "path": str(data)}, epochs=4,
                   eval_fraction=0.2, activate=True, min_eval_accuracy=0.9)
    assert out.status == "succeeded" and out.version == "v0002", out

    rec = JobStore(r).get(job.job_id)
    m = rec.metrics
    assert (rec.status, rec.version, rec.progress) == ("succeeded", "v0002", 1.0)
    assert (m["train_pairs"], m["eval_pairs"], m["steps"]) == (240, 60, 4 * 15)
    assert 0.3 <= m["eval_accuracy_initial"] <= 0.7  # policy = reference: a coin toss
    # the reference is the base, computed like the policy: the first step starts at log 2, margin 0
    assert abs(m["train_loss_first_step"] - math.log(2)) < 1e-6
    assert abs(m["train_margin_first_step"]) < 1e-6
    assert m["policy_dtype"] == m["reference_dtype"] == "float32"
    assert m["eval_accuracy"] >= 0.9 and m["eval_loss"] < m["eval_loss_initial"]
    assert m["eval_margin"] > 0 and m["eval_chosen_reward"] > m["eval_rejected_reward"]
    assert m["activated"] is True
    steps = [pm for _, pm in progress if pm and pm.get("stage") == "training"]
    assert steps and {"train_loss", "train_accuracy", "train_margin", "train_chosen_reward",
                      "train_rejected_reward", "lr", "step", "steps"} <= set(steps[-1])

    store = ModelStore(settings.store_dir)
    manifest = store.verify(names["model"], "v0002")
    assert (manifest.parent, manifest.kind, manifest.job_id) == (base, "policy", job.job_id)
    assert manifest.metrics["eval_accuracy"] == m["eval_accuracy"]
    assert len(manifest.extra["applied_ids"]) == 240 and len(manifest.extra["eval_ids"]) == 60
    assert not set(manifest.extra["applied_ids"]) & set(manifest.extra["eval_ids"])
    assert manifest.extra["reference"]["source"] == "local"
    assert manifest.extra["reference"]["dtype"] == "float32"
    assert manifest.extra["reference"]["dtype_matches_policy"] is True
    assert manifest.metrics["reference_dtype"] == "float32"
    assert manifest.probes["kind"] == "policy"
    assert Registry(r).active(names["model"]) == "v0002"

    # The published policy's own samples now show the preferred behaviour.
    prompts = [p["prompt"] for p in task_pairs(60, seed=101, prefix="e")]
    before = banana_rate(store.path(names["model"], base), prompts)
    after = banana_rate(store.path(names["model"], "v0002"), prompts)
    assert before < 0.05 and after >= 0.15 and after >= before + 0.1, (before, after)


def test_reference_logprobs_from_the_service_and_a_local_checkpoint_give_the_same_loss(
        tiny_policy_dir, tiny_policy_dir_b):
    """Policy = seed 0, reference = another checkpoint (seed 1) served by a ReferenceService:
    the reference values, and the first step's loss of a job, equal those from the same
    checkpoint loaded locally."""
    from helpers import ThreadedApp, make_settings
    from rlhf_client import ReferenceClient

    from rlhf.models.loading import load_tokenizer
    from rlhf.reference.app import make_reference_app

    pairs = task_pairs(24, seed=5, prefix="ref")
    spec = DPOJob(model_name="x", source={"type": "jsonl", "path": "unused"}, max_steps=1,
                  batch_size=24, learning_rate=1e-3, beta=0.1, max_length=64)
    app = make_reference_app(make_settings(model_dir=tiny_policy_dir_b, batch_max_size=16))
    with ThreadedApp(app) as served, ReferenceClient(served.target, timeout=60) as client:
        service = ServiceReference(client, batch_items=16)  # several calls
        tok = load_tokenizer(tiny_policy_dir, padding_side="right")
        a, _ = encode_pairs(tok, pairs, max_length=64)
        b, _ = encode_pairs(tok, pairs, max_length=64)
        from rlhf.trainer.dpo import attach_reference_logps

        attach_reference_logps(a, service)
        attach_reference_logps(b, LocalReference(tiny_policy_dir_b))
        for x, y in zip(a, b):
            assert abs(x.ref_chosen - y.ref_chosen) < 1e-4
            assert abs(x.ref_rejected - y.ref_rejected) < 1e-4
        assert service.describe()["model"]["name"]  # the version that produced them is known

        losses = {}
        for name, source in (("service", ServiceReference(client)),
                             ("local", LocalReference(tiny_policy_dir_b))):
            seen = []
            train_dpo(spec, pairs, base_dir=tiny_policy_dir, reference=source,
                      progress=lambda step, total, m: seen.append(m["train_loss"]), threads=1)
            losses[name] = seen[0]
    assert abs(losses["service"] - losses["local"]) < 1e-5
    assert abs(losses["local"] - 0.6931) > 1e-3  # a different reference: not the trivial log 2


def test_with_the_base_as_reference_the_first_step_is_log_2_and_another_dtype_is_flagged(
        tiny_policy_dir, caplog):
    """Reference = the policy's own checkpoint: the first step's loss is log 2 and its margin 0,
    whether the log-probs come from a local copy or from a ReferenceService in float32. A service
    in bfloat16 computes other numbers than the float32 policy: the job trains on but records
    both dtypes and warns."""
    from helpers import ThreadedApp, make_settings
    from rlhf_client import ReferenceClient

    from rlhf.reference.app import make_reference_app

    pairs = task_pairs(24, seed=5, prefix="base")
    spec = DPOJob(model_name="x", source={"type": "jsonl", "path": "unused"}, max_steps=1,
                  batch_size=8, learning_rate=1e-3, beta=0.1, max_length=64)
    results = {"local": train_dpo(spec, pairs, base_dir=tiny_policy_dir, threads=1)}
    for dtype in ("float32", "bfloat16"):
        app = make_reference_app(make_settings(model_dir=tiny_policy_dir, dtype=dtype,
                                               batch_max_size=16))
        with ThreadedApp(app) as served, ReferenceClient(served.target, timeout=60) as client:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="rlhf.trainer.dpo"):
                results[dtype] = train_dpo(spec, pairs, base_dir=tiny_policy_dir, threads=1,
                                           reference=ServiceReference(client, batch_items=16))
            warned = [m for m in (r.getMessage() for r in caplog.records)
                      if "reference log-probs" in m]
            assert bool(warned) == (dtype != "float32"), warned
    for name in ("local", "float32"):
        m, ref = results[name].metrics, results[name].reference
        assert abs(m["train_loss_first_step"] - math.log(2)) < 1e-6, (name, m)
        assert abs(m["train_margin_first_step"]) < 1e-6, (name, m)
        assert (m["policy_dtype"], m["reference_dtype"]) == ("float32", "float32")
        assert ref["dtype"] == "float32" and ref["dtype_matches_policy"] is True
    m, ref = results["bfloat16"].metrics, results["bfloat16"].reference
    assert (m["policy_dtype"], m["reference_dtype"]) == ("float32", "bfloat16")
    assert ref["dtype_matches_policy"] is False and ref["source"] == "service"
    assert abs(m["train_loss_first_step"] - math.log(2)) > 1e-6  # not like for like


def poisoned_copy(src, dst, *, token: int):
    """`src` with the input embedding of `token` set to +inf (any sequence holding it goes NaN)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("inf")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_job_whose_loss_goes_non_finite_fails_naming_the_step_and_publishes_nothing(
        r, names, settings, tmp_path):
    """An untied policy whose embedding of <|reset|> (id 1) is infinite, and one pair that holds
    it: the steps before its batch train, the step with it fails the job with an error naming
    that step, before the optimizer applies it; no version is published."""
    from rlhf.models.tiny import RESET_TOKEN, make_tiny_model
    from rlhf.trainer.finite import TrainingDiverged

    untied = make_tiny_model("policy", tmp_path / "untied", tie_embeddings=False)
    base = poisoned_copy(untied, tmp_path / "poisoned", token=1)
    pairs = task_pairs(24, seed=5, prefix=unique("nan"))
    pairs[1]["chosen"] += RESET_TOKEN
    spec = dict(loss_type="reference_free", max_steps=6, batch_size=8, learning_rate=1e-3)

    steps = []
    with pytest.raises(TrainingDiverged) as err:
        train_dpo(DPOJob(model_name="x", source={"type": "jsonl", "path": "unused"}, **spec),
                  pairs, base_dir=base, threads=1, progress=lambda s, t, m: steps.append(s))
    assert steps == [1, 2]  # these trained; the third held the poisoned pair
    assert "training diverged at step 3 of 6: loss = nan" in str(err.value)
    assert "nothing was published" in str(err.value)

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    job, out = run(names, settings, base_dir=str(base), source={"type": "jsonl", "path": str(data)},
                   eval_fraction=0, **spec)
    assert out.status == "failed"
    assert "TrainingDiverged: training diverged at step 3 of 6" in out.error
    assert JobStore(r).get(job.job_id).status == "failed"
    assert ModelStore(settings.store_dir).versions(names["model"]) == []  # nothing published


@pytest.mark.parametrize("loss", [
    dict(loss_type="sigmoid"), dict(loss_type="sigmoid", label_smoothing=0.2),
    dict(loss_type="hinge"), dict(loss_type="ipo", beta=0.5), dict(loss_type="reference_free"),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5), dict(loss_type="sigmoid", rpo_alpha=1.0),
])
def test_every_loss_type_trains_the_policy_towards_the_chosen_responses(tiny_policy_dir, loss):
    spec = DPOJob(model_name="x", source={"type": "jsonl", "path": "unused"}, max_steps=6,
                  **{**FAST, "learning_rate": 1e-3, "batch_size": 8, **loss})
    held = task_pairs(16, seed=12, prefix="h")
    res = train_dpo(spec, task_pairs(48, seed=11, prefix="t"), base_dir=tiny_policy_dir,
                    eval_pairs=held, threads=1)
    m = res.metrics
    assert m["steps"] == 6 and m["eval_pairs"] == 16
    assert m["eval_loss"] < m["eval_loss_initial"] and m["eval_margin"] > m["eval_margin_initial"]
    assert (res.reference["source"] == "none") == (loss["loss_type"] in ("reference_free", "simpo"))


def test_an_online_job_trains_on_pushed_pairs_once_and_commits_them(r, names, tmp_path, base,
                                                                    settings):
    """Pairs pushed to a stream: each applied exactly once, acked only after the publish; pairs
    that a short job (max_steps) never reached stay pending and the next job trains on them."""
    import time

    # a short lease so that the first job's leftover entries go idle (reclaimable) quickly
    settings = settings.model_copy(update={"job_lease_s": 1.0, "queue_claim_idle_ms": 1000})
    rb = connect(REDIS_URL)
    producer, stream = QueueProducer(rb), names["stream"]
    pushed = [producer.push_pair(stream=stream, id=p["id"], prompt=p["prompt"], chosen=p["chosen"],
                                 rejected=p["rejected"])
              for p in task_pairs(24, seed=7, prefix=unique("on"))]
    source = {"type": "stream", "stream": stream}
    job, out = run(names, settings, source=source, max_steps=1, batch_size=8, eval_fraction=0.25)
    assert out.status == "succeeded" and out.version == "v0002", out
    m1 = ModelStore(settings.store_dir).manifest(names["model"], "v0002")
    applied, held, left = (m1.extra[k] for k in ("applied_ids", "eval_ids", "unapplied_ids"))
    assert (len(applied), len(held), len(left)) == (8, 6, 10)  # one step of 8 of the 18
    assert sorted(applied + held + left) == sorted(pushed)
    assert rb.xpending(stream, "dpo")["pending"] == 10  # acked: only what the version used
    assert applied_ids(r, stream, "dpo") == set(applied + held)
    assert Registry(r).active(names["model"]) == base  # not asked to activate

    # A producer retrying pushes an applied id again: it is never trained on twice.
    for p in task_pairs(3, seed=8, prefix="dup"):
        producer.push_pair(stream=stream, id=applied[0], prompt=p["prompt"], chosen=p["chosen"],
                           rejected=p["rejected"])
    time.sleep(settings.queue_claim_idle_ms / 1000 + 0.2)  # the leftovers must be idle to be reclaimed
    job2, out2 = run(names, settings, source=source, max_steps=2, batch_size=8, eval_fraction=0)
    assert out2.status == "succeeded" and out2.version == "v0003", out2
    m2 = ModelStore(settings.store_dir).manifest(names["model"], "v0003")
    assert sorted(m2.extra["applied_ids"]) == sorted(left) and m2.parent == base
    assert rb.xpending(stream, "dpo")["pending"] == 0
    assert applied_ids(r, stream, "dpo") == set(pushed)

    job3, out3 = run(names, settings, source=source, max_steps=1)
    assert out3.status == "failed" and "gave 0 usable pairs" in out3.error
    rb.close()


def test_a_waiting_job_reads_until_it_has_its_minimum_not_just_a_first_batch(r, names, base,
                                                                            settings):
    """Producers push in batches (rollout workers, labellers): with `block_ms` the job waits for
    `min_pairs`, so a first batch smaller than that does not fail it."""
    import threading

    from trainer_helpers import wait_for

    rb = connect(REDIS_URL)
    producer, stream = QueueProducer(rb), names["stream"]
    batches = [task_pairs(3, seed=s, prefix=unique(f"b{s}")) for s in (21, 22)]
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(out=run(
        names, settings, source={"type": "stream", "stream": stream, "block_ms": 120_000},
        min_pairs=6, max_steps=1, eval_fraction=0)[1]))
    for p in batches[0]:
        producer.push_pair(stream=stream, **p)
    job.start()
    def pending() -> int:
        try:
            return rb.xpending(stream, "dpo")["pending"]
        except redis.ResponseError:  # NOGROUP: the job has not created its group yet
            return 0

    wait_for(lambda: pending() == 3, timeout=60, what="the job to read the first batch")
    for p in batches[1]:
        producer.push_pair(stream=stream, **p)
    job.join(timeout=120)
    out = outcome["out"]
    assert out.status == "succeeded", out
    manifest = ModelStore(settings.store_dir).manifest(names["model"], out.version)
    assert sorted(manifest.extra["applied_ids"]) == sorted(p["id"] for b in batches for p in b)
    assert rb.xpending(stream, "dpo")["pending"] == 0
    rb.close()


@pytest.mark.parametrize("spec,message", [
    (dict(beta=0), "beta: Input should be greater than 0"),
    (dict(beta=-0.1), "beta: Input should be greater than 0"),
    (dict(loss_type="kto"),
     "loss_type: Input should be 'sigmoid', 'hinge', 'ipo', 'reference_free' or 'simpo'"),
    (dict(label_smoothing=0.1, loss_type="hinge"), "label_smoothing applies to loss_type"),
    (dict(label_smoothing=0.5), "label_smoothing: Input should be less than 0.5"),
    (dict(reference={"source": "service"}), "target is required when source is 'service'"),
    (dict(learning_rate=0), "learning_rate: Input should be greater than 0"),
    (dict(model_name=None), "model_name"),
])
def test_a_bad_spec_is_rejected_at_submit(r, names, base, tmp_path, spec, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", task_pairs(4, seed=0, prefix="s"))
    good = dict(model_name=names["model"], source={"type": "jsonl", "path": str(data)})
    tc = TrainingClient(REDIS_URL, client=r)
    before = r.zcard("rlhf:jobs")
    with pytest.raises(JobRejected) as err:
        tc.submit_dpo(**{**good, **spec})
    assert message in str(err.value)
    assert r.zcard("rlhf:jobs") == before and r.llen("train.dpo") == 0  # nothing recorded or queued


def test_a_missing_model_or_an_empty_dataset_is_rejected_at_submit(r, names, base, tmp_path):
    from rlhf.trainer.jobs import check_against_registry, check_dpo_submit

    tc = TrainingClient(REDIS_URL, client=r)
    data = write_jsonl(tmp_path / "pairs.jsonl", task_pairs(4, seed=0, prefix="s"))
    jsonl = {"type": "jsonl", "path": str(data)}
    empty, missing = tmp_path / "empty.jsonl", tmp_path / "missing.jsonl"
    empty.write_text("")
    cases = [
        (dict(model_name=unique("nobody"), source=jsonl), "has no active version to start from"),
        (dict(model_name=names["model"], base_version="v0042", source=jsonl),
         "has no version 'v0042'"),
        (dict(model_name=names["model"], base_dir=str(tmp_path / "nowhere"), source=jsonl),
         "base_dir: checkpoint directory not found"),
        (dict(model_name=names["model"], source={"type": "jsonl", "path": str(empty)}),
         "holds 0 preference pairs"),
        (dict(model_name=names["model"], source={"type": "jsonl", "path": str(missing)}),
         "no such file"),
        (dict(model_name=names["model"], source=jsonl, min_pairs=5), "the job needs at least 5"),
        (dict(model_name=names["model"], source={"type": "stream", "stream": names["stream"]}),
         "is empty"),
    ]
    before = r.zcard("rlhf:jobs")
    for spec, message in cases:
        with pytest.raises(JobRejected, match=message):
            tc.submit_dpo(**spec)
    assert r.zcard("rlhf:jobs") == before and r.llen("train.dpo") == 0
    # The same checks pass a good spec (not submitted: it would queue a Celery message).
    for source in (jsonl, {"type": "stream", "stream": names["stream"], "block_ms": 1000}):
        spec = parse_spec({"type": "dpo", "model_name": names["model"], "source": source})
        check_against_registry(spec, Registry(r))
        check_dpo_submit(spec, r)
