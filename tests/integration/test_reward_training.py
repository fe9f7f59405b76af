"""Reward-model training jobs, run in-process (no Celery) on real Redis and a tiny model:
learning the synthetic task, the stream path end to end, crash-safe commits, gradient
accumulation, a trailing eos that counts, a non-finite loss that fails the job, and submit-time
validation."""

from __future__ import annotations

import json

import pytest
import redis
from rlhf_client.redis_conn import connect
from rlhf_client import QueueProducer, Registry, TrainingClient
from rlhfpb.v1 import samples_pb2
from trainer_helpers import (  # noqa: F401 - r, settings: shared fixtures
    REDIS_URL,
    delete_matching,
    forget_job,
    forget_model,
    names_fixture,
    r,
    settings,
    synthetic_messages,
    unique,
    wait_for,
)

from rlhf.models.store import ModelStore
from rlhf.trainer.data import synthetic_pairs
from rlhf.trainer.jobs import JobRejected, JobStore, execute, parse_spec
from rlhf.trainer.queues import applied_ids
from rlhf.trainer.reward_model import run_reward_model_job

FAST = dict(learning_rate=1e-3, batch_size=16, max_length=64)  # tiny model, synthetic task


names = names_fixture("rm", "test:prefs")


def run(names, settings, **spec):
    job = parse_spec({"type": "reward_model", "model_name": names["model"], **FAST, **spec})
    names["jobs"].append(job.job_id)
    return job, execute(job, run_reward_model_job, settings=settings, worker="test")


def write_jsonl(path, pairs):
    path.write_text("\n".join(json.dumps({"id": p.source_id, "prompt": p.prompt, "chosen": p.chosen,
                                          "rejected": p.rejected}) for p in pairs))
    return path


def held_out_accuracy(model_dir, pairs) -> float:
    """Pairwise accuracy of a saved reward model, scored the way the reward service scores."""
    import torch

    from rlhf.models.loading import load_reward_model, load_tokenizer

    model, tok = load_reward_model(model_dir), load_tokenizer(model_dir)

    def reward(prompt, response):
        ids = tok.encode(prompt, add_special_tokens=False) + tok.encode(response, add_special_tokens=False)
        with torch.inference_mode():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    return sum(reward(p.prompt, p.chosen) > reward(p.prompt, p.rejected) for p in pairs) / len(pairs)


def test_the_reward_model_learns_the_synthetic_task(r, names, settings, tiny_reward_dir, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_pairs(300, seed=1))
    job, out = run(names, settings, base_dir=str(tiny_reward_dir), epochs=2, eval_fraction=0.2,
                   source={"type": "jsonl", "path": str(data)}, activate=True, min_eval_accuracy=0.9)
    assert out.status == "succeeded", out
    rec = JobStore(r).get(job.job_id)
    assert (rec.status, rec.version, rec.progress, rec.attempts) == ("succeeded", "v0001", 1.0, 1)
    m = rec.metrics
    assert 0.2 <= m["eval_accuracy_initial"] <= 0.8  # a random-init model guesses
    assert m["eval_accuracy"] >= 0.9 and m["eval_loss"] < m["eval_loss_initial"]
    assert (m["train_pairs"], m["eval_pairs"]) == (240, 60) and m["activated"] is True

    store = ModelStore(settings.store_dir)
    manifest = store.verify(names["model"], "v0001")  # checksums of every file hold
    assert manifest.job_id == job.job_id and manifest.parent is None and manifest.kind == "reward"
    assert manifest.metrics["eval_accuracy"] == m["eval_accuracy"]
    assert manifest.probes["kind"] == "reward" and len(manifest.probes["scores"]) == 4
    assert len(manifest.extra["applied_ids"]) == 240 and len(manifest.extra["eval_ids"]) == 60
    assert Registry(r).active(names["model"]) == "v0001"
    # The saved version, loaded fresh, ranks pairs it never saw.
    assert held_out_accuracy(store.path(names["model"], "v0001"), synthetic_pairs(60, seed=99)) >= 0.9


def test_a_reward_service_following_the_model_serves_the_activated_version(
        r, names, settings, tiny_reward_dir, tmp_path):
    """The job activates its version; a reward service following the model name swaps to it
    (after checking the version's checksums and golden probes) and ranks as it was trained."""
    from helpers import ThreadedApp, make_settings
    from rlhf_client import RewardClient

    from rlhf.models.probes import compute_probes
    from rlhf.reward.app import make_reward_app

    store, reg = ModelStore(settings.store_dir), Registry(r)
    first = store.publish(names["model"], tiny_reward_dir, kind="reward",
                          probes=compute_probes("reward", tiny_reward_dir))
    reg.register(names["model"], first.version, first.created)
    reg.activate(names["model"], first.version)
    app = make_reward_app(make_settings(model_name=names["model"], store_dir=settings.store_dir,
                                        redis_url=REDIS_URL, swap_poll_s=0.5))
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_pairs(160, seed=6))
    with ThreadedApp(app) as served, RewardClient(served.target) as client:
        assert client.get_model().model.version == "v0001"
        job, out = run(names, settings, source={"type": "jsonl", "path": str(data)}, epochs=2,
                       activate=True)
        assert out.status == "succeeded" and out.version == "v0002", out
        assert store.manifest(names["model"], "v0002").parent == "v0001"  # started from the active one
        wait_for(lambda: client.get_model().model.version == "v0002", timeout=60,
                 what="the reward service to swap to the new version")
        res = client.compare("what do you think of the song?", "the song was great.",
                             "the song was awful.")
        assert res.model.version == "v0002" and res.probability_a > 0.9


def test_stream_job_commits_what_it_used_and_never_reapplies_it(r, names, settings, tiny_reward_dir):
    rb = connect(REDIS_URL)
    producer, stream = QueueProducer(rb), names["stream"]
    pushed = producer.push_many(synthetic_messages(60, seed=2, prefix=unique("a")), stream=stream)
    pushed.append(producer.push_ranking(prompt="what do you think of the cake?",
                                        responses=["it was great.", "it was fine.", "it was awful."],
                                        ranks=[0, 1, 2], stream=stream))
    rb.xadd(stream, {b"type": b"rlhfpb.v1.PreferencePair", b"id": b"junk", b"data": b"\xff\xfe"})
    source = {"type": "stream", "stream": stream, "group": "rm"}
    job, out = run(names, settings, base_dir=str(tiny_reward_dir), source=source, activate=True)
    assert out.status == "succeeded", out
    manifest = ModelStore(settings.store_dir).manifest(names["model"], "v0001")
    used = manifest.extra["applied_ids"] + manifest.extra["eval_ids"]
    assert sorted(used) == sorted(pushed)  # every payload once: none lost, none twice
    assert manifest.metrics["train_pairs"] + manifest.metrics["eval_pairs"] == 60 + 3  # ranking → 3
    assert rb.xpending(stream, "rm")["pending"] == 0  # all acked after the publish
    assert applied_ids(r, stream, "rm") == set(pushed)
    assert [d["reason"][:15] for d in producer.dead_letters(stream)] == ["invalid payload"]

    # Redelivered payloads (a producer retrying) are skipped; only the new ones train the next
    # version, which starts from the active one.
    dupes = [samples_pb2.PreferencePair(id=i, prompt="q", chosen="a", rejected="b") for i in pushed[:10]]
    fresh = producer.push_many(synthetic_messages(12, seed=3, prefix=unique("b")), stream=stream)
    producer.push_many(dupes, stream=stream)
    job2, out2 = run(names, settings, source=source)
    assert out2.status == "succeeded", out2
    m2 = ModelStore(settings.store_dir).manifest(names["model"], "v0002")
    assert m2.parent == "v0001" and sorted(m2.extra["applied_ids"] + m2.extra["eval_ids"]) == sorted(fresh)
    assert rb.xpending(stream, "rm")["pending"] == 0

    # Nothing new: the job fails plainly and publishes nothing.
    producer.push_many(dupes, stream=stream)
    job3, out3 = run(names, settings, source=source)
    assert out3.status == "failed" and "gave 0 usable pairs" in out3.error
    assert JobStore(r).get(job3.job_id).error == out3.error
    assert ModelStore(settings.store_dir).versions(names["model"]) == ["v0001", "v0002"]
    rb.close()


def test_a_retry_after_publish_finishes_that_version_instead_of_training_again(
        r, names, settings, tiny_reward_dir, monkeypatch):
    import rlhf.trainer.pipeline as pipeline
    import rlhf.trainer.reward_model as rm
    from rlhf.trainer.jobs import TransientError

    rb = connect(REDIS_URL)
    pushed = QueueProducer(rb).push_many(synthetic_messages(20, seed=4, prefix=unique("c")),
                                         stream=names["stream"])
    real_finish, calls = pipeline.finish, []

    def crash_once(*args, **kwargs):  # the worker dies between the store rename and the acks
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("simulated crash after publish")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(pipeline, "finish", crash_once)
    trained = []
    real_train = rm.train_reward_model
    monkeypatch.setattr(rm, "train_reward_model", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    spec = dict(base_dir=str(tiny_reward_dir), source={"type": "stream", "stream": names["stream"]})
    job, out = run(names, settings, **spec)
    assert out.status == "retry" and out.retry_in_s > 0
    assert JobStore(r).get(job.job_id).status == "queued"
    assert rb.xpending(names["stream"], "reward-model")["pending"] == 20  # not acked yet
    out = execute(job, run_reward_model_job, settings=settings, worker="test")  # the redelivery
    assert out.status == "succeeded" and out.version == "v0001"
    assert trained == [1]  # the second attempt found its version and did not train again
    assert ModelStore(settings.store_dir).versions(names["model"]) == ["v0001"]
    assert rb.xpending(names["stream"], "reward-model")["pending"] == 0
    assert len(applied_ids(r, names["stream"], "reward-model")) == len(pushed)
    assert JobStore(r).get(job.job_id).attempts == 2
    rb.close()


def test_one_job_id_runs_once_at_a_time_and_never_after_it_completed(r, names):
    """The guard every delivery passes (jobs.JobStore.begin) and the lease behind it."""
    from rlhf.trainer.jobs import Busy, Done, Run

    spec = parse_spec({"type": "reward_model", "model_name": names["model"], "base_dir": "/x",
                       "source": {"type": "stream"}})
    names["jobs"].append(spec.job_id)
    jobs = JobStore(r, lease_s=0.3)
    assert jobs.create(spec).status == "queued"
    with pytest.raises(JobRejected, match="already exists"):  # a job id is submitted once
        jobs.create(spec)
    first = jobs.begin(spec, "w1")
    assert isinstance(first, Run) and first.record.status == "running" and first.record.attempts == 1
    second = jobs.begin(spec, "w2")  # a redelivered copy while the first attempt lives
    assert isinstance(second, Busy) and 0 < second.retry_in_s <= 0.3
    assert jobs.renew(spec.job_id, first.token)
    # A heartbeat that starves past the lease retakes it when nobody else did ...
    wait_for(lambda: not r.exists(jobs.lease_key(spec.job_id)), timeout=5, what="the lease to lapse")
    assert jobs.renew(spec.job_id, first.token)
    # ... but once another attempt holds it, the first one has lost the job.
    wait_for(lambda: not r.exists(jobs.lease_key(spec.job_id)), timeout=5, what="the lease to lapse")
    third = jobs.begin(spec, "w3")
    assert isinstance(third, Run) and third.record.attempts == 2 and third.record.worker == "w3"
    assert not jobs.renew(spec.job_id, first.token)
    jobs.succeed(spec.job_id, third.token, version="v0001", metrics={"eval_accuracy": 1.0})
    assert not r.exists(jobs.lease_key(spec.job_id))  # released with the terminal status
    done = jobs.begin(spec, "w4")  # any later delivery: completed, never runs again
    assert isinstance(done, Done) and done.record.version == "v0001" and done.record.attempts == 2
    assert 0 < r.ttl(f"rlhf:job:{spec.job_id}") <= 30 * 86400  # finished records expire


def test_the_training_forward_sees_a_trailing_eos_and_ignores_padding(tiny_reward_dir):
    """pad == eos in the tiny models: a trailing eos changes the reward the trainer computes
    (transformers' own pooling would read the token before it), and a sequence's reward is the
    same alone and padded beside longer ones."""
    import torch

    from rlhf.models.loading import load_reward_model, load_tokenizer
    from rlhf.trainer.reward_model import _rewards

    model, tok = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos == model.config.pad_token_id
    ids = tok.encode("what do you think of the cake? the cake was great.", add_special_tokens=False)
    longer = ids + tok.encode(" the tea was nice too, really very nice.", add_special_tokens=False)
    seqs = [ids, ids + [eos], longer, longer + [eos, eos]]

    def naive(s):  # the score head on the last hidden state of the sequence alone
        hidden = model.base_model(input_ids=torch.tensor([s])).last_hidden_state
        return float(model.score(hidden[0, -1])[0])

    with torch.no_grad():
        batch = _rewards(model, seqs, eos, "cpu").tolist()
        alone = [float(_rewards(model, [s], eos, "cpu")[0]) for s in seqs]
        want = [naive(s) for s in seqs]
    assert abs(batch[0] - batch[1]) > 1e-4 and abs(batch[2] - batch[3]) > 1e-4
    for b, a, w in zip(batch, alone, want):
        assert abs(b - a) < 1e-5 and abs(b - w) < 1e-5


def test_a_job_whose_loss_goes_non_finite_fails_naming_the_step_and_publishes_nothing(
        r, names, settings, tiny_reward_dir, tmp_path):
    """A reward model whose embedding of <|reset|> (id 1) is infinite, and one pair that holds
    it: the step with that pair fails the job, naming the step, before the update; nothing is
    published."""
    import shutil
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from rlhf.models.tiny import RESET_TOKEN
    from rlhf.trainer.finite import TrainingDiverged
    from rlhf.trainer.jobs import RewardModelJob
    from rlhf.trainer.reward_model import train_reward_model

    base = tmp_path / "poisoned"
    shutil.copytree(tiny_reward_dir, base)
    weights = load_file(base / "model.safetensors")
    weights["model.embed_tokens.weight"][1] = float("inf")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    pairs = synthetic_pairs(24, seed=8, prefix=unique("nan"))
    pairs[1] = replace(pairs[1], chosen=pairs[1].chosen + RESET_TOKEN)  # in the third batch

    spec = RewardModelJob(model_name="x", base_dir=str(base), source={"type": "stream"},
                          **{**FAST, "batch_size": 8})
    steps = []
    with pytest.raises(TrainingDiverged) as err:
        train_reward_model(base, pairs, [], spec, out_dir=tmp_path / "out", threads=1,
                           on_step=lambda s, t, m: steps.append(s))
    assert steps == [1, 2]  # these trained; the third held the poisoned pair
    assert "training diverged at step 3 of 3: loss = nan" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing saved

    data = write_jsonl(tmp_path / "prefs.jsonl", pairs)
    job, out = run(names, settings, base_dir=str(base), source={"type": "jsonl", "path": str(data)},
                   batch_size=8, eval_fraction=0)
    assert out.status == "failed", out
    assert "TrainingDiverged: training diverged at step 3 of 3" in out.error
    assert ModelStore(settings.store_dir).versions(names["model"]) == []  # nothing published


def test_gradient_accumulation_equals_one_larger_batch(tiny_reward_dir):
    """Micro-batches of 4+4 or 2+2+2+2 give the gradients of one batch of 8 (float64 model)."""
    from rlhf.models.loading import load_reward_model, load_tokenizer
    from rlhf.trainer.reward_model import _encode, accumulate_gradients

    model = load_reward_model(tiny_reward_dir).double()
    enc = _encode(load_tokenizer(tiny_reward_dir), synthetic_pairs(8, seed=5), 64)
    grads, results = {}, {}
    for size in (8, 4, 2):
        model.zero_grad(set_to_none=True)
        results[size] = accumulate_gradients(model, [enc[i:i + size] for i in range(0, 8, size)],
                                             0, "cpu")
        grads[size] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads[8]) > 10 and any(g.abs().max() > 1e-4 for g in grads[8].values())
    for size in (4, 2):
        assert results[size] == pytest.approx(results[8], abs=1e-12)
        for name, g in grads[8].items():
            assert (grads[size][name] - g).abs().max() <= 1e-10 * (1 + g.abs().max()), (size, name)


@pytest.mark.parametrize("spec,message", [
    (dict(epochs=0), "epochs: Input should be greater than or equal to 1"),
    (dict(epoch=2), "epoch: Extra inputs are not permitted"),
    (dict(source={"type": "kafka"}), "source: Input tag 'kafka'"),
    (dict(source=None), "source"),
    (dict(model_name="../escape"), "model_name: String should match pattern"),
    (dict(base_version="v0001"), "set base_dir or base_version, not both"),
    (dict(min_eval_accuracy=0.9, eval_fraction=0), "needs a held-out split"),
])
def test_an_invalid_spec_is_rejected_at_submit_with_a_clear_message(r, names, spec, message):
    job_id = unique("job")
    base = dict(job_id=job_id, model_name=names["model"], base_dir="/models/base",
                source={"type": "stream"})
    tc = TrainingClient(REDIS_URL, client=r)
    with pytest.raises(JobRejected) as err:
        tc.submit_reward_model(**{**base, **spec})
    assert message in str(err.value)
    # Nothing recorded, nothing queued.
    assert not r.exists(f"rlhf:job:{job_id}") and r.zscore("rlhf:jobs", job_id) is None
    assert r.llen("train.reward_model") == 0


def test_submit_checks_the_base_version_in_the_registry(r, names, tmp_path, capsys):
    from rlhf.cli import main as rlhf_main

    tc = TrainingClient(REDIS_URL, client=r)
    with pytest.raises(JobRejected, match="no active version to start from"):
        tc.submit_reward_model(model_name=names["model"], source={"type": "stream"})
    Registry(r).register(names["model"], "v0001")
    with pytest.raises(JobRejected, match="has no version 'v0007'"):
        tc.submit_reward_model(model_name=names["model"], base_version="v0007", source={"type": "stream"})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"type": "reward_model", "model_name": names["model"], "epochs": -1,
                                "source": {"type": "stream"}}))
    assert rlhf_main(["jobs", "submit", str(spec), "--redis-url", REDIS_URL]) == 2
    assert "epochs: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert r.llen("train.reward_model") == 0
