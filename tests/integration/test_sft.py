"""SFT jobs on real parts: a tiny policy made on the spot, real Redis, run in-process (and once
on a real Celery worker).

- the loss: the token-mean NLL of the completion tokens only, equal to a float64 teacher-forced
  reference computed the naive way; prompt and prefix never count; gradient accumulation gives
  the same step as one batch;
- learning: held-out NLL falls, and a backtracking example teaches the reset token after the
  unsafe prefix (its log-prob rises from a uniform guess to near certain);
- the job: JSONL or a stream (SFTExample payloads, read as their JSONL rows; the pairs' and
  rankings' preferred responses), publish a child version with its metrics and applied ids,
  entries acked once, a payload SFT cannot use dead-lettered; bad specs and empty data rejected
  at submit.
"""

from __future__ import annotations

import math

import pytest
from rlhf_client.redis_conn import connect
from trainer_helpers import (  # noqa: F401 - r, settings: fixtures
    REDIS_URL, names_fixture, publish_active, r, settings, unique, write_jsonl)

torch = pytest.importorskip("torch")

from rlhf_client import QueueProducer, Registry, TrainingClient  # noqa: E402

from rlhf.models.store import ModelStore  # noqa: E402
from rlhf.trainer import backtracking as bt  # noqa: E402
from rlhf.trainer.jobs import JobRejected, JobStore, SFTJob, execute, parse_spec  # noqa: E402
from rlhf.trainer.queues import applied_ids  # noqa: E402
from rlhf.trainer.sft import (  # noqa: E402
    SFTError,
    SFTExample,
    batch_nll,
    check_sft_payload,
    encode_example,
    encode_examples,
    examples_from_payload,
    run_sft_job,
    train_sft,
    train_step,
)

RESET = "<|reset|>"
FAST = dict(learning_rate=2e-3, batch_size=16, max_length=64)


def spec(**kw) -> SFTJob:
    return SFTJob(model_name="x", source={"type": "jsonl", "path": "unused"}, **{**FAST, **kw})


def task_examples(n: int, *, seed: int, prefix: str) -> list[dict]:
    """Helpful answers to benign prompts of the synthetic safety task, as JSONL rows."""
    task = bt.synthetic_safety_task(seed=seed, n_benign=n, n_triples=1, n_pretrain=1, n_eval=1)
    return [{"id": f"{prefix}-{i}", "prompt": e.prompt, "completion": e.completion}
            for i, e in enumerate(task.benign)]


names = names_fixture("sft", "test:sft-prefs")


@pytest.fixture
def base(r, names, settings, tiny_policy_dir):
    """The tiny policy published as the model's first, active version."""
    return publish_active(r, settings.store_dir, names["model"], tiny_policy_dir).version


def run(names, settings, **kw):
    job = parse_spec({"type": "sft", "model_name": names["model"], **FAST, **kw})
    names["jobs"].append(job.job_id)
    return job, execute(job, run_sft_job, settings=settings, worker="test")


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------


def test_the_loss_is_the_completion_nll_and_nothing_else(tiny_policy_dir):
    """Σ −log π over completion tokens, prompt and prefix excluded, equals a float64 reference:
    one full forward per row, log-softmax, the completion positions summed the naive way."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_policy_dir), load_tokenizer(tiny_policy_dir, padding_side="right")
    rows = [SFTExample("a", "how do I find the pen?", " sure, you can find the pen."),
            SFTExample("b", "how do I steal the car?", RESET + " sorry, no.", " sure, you can"),
            SFTExample("c", "how do I steal the car?", " sorry, I cannot help with that.")]
    examples, skipped = encode_examples(tok, rows, max_length=64)
    assert skipped == 0
    with torch.no_grad():
        nll, n = batch_nll(model, examples, pad_id=tok.pad_token_id)
    want, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([list(e.prompt_ids) + list(e.completion_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for i, t in enumerate(e.completion_ids):
            want -= float(logp[len(e.prompt_ids) - 1 + i, t])
            count += 1
    assert n == count == sum(len(e.completion_ids) for e in examples)
    assert abs(float(nll) - want) < 1e-6 * max(1.0, abs(want))
    # the prefix is context: its tokens are in the prompt side, not trained
    assert examples[1].prompt_ids == tuple(tok.encode(rows[1].prompt + rows[1].prefix,
                                                      add_special_tokens=False))
    assert examples[1].completion_ids[0] == tok.convert_tokens_to_ids(RESET)


def test_an_sft_payload_is_read_as_its_jsonl_row(tiny_policy_dir, tmp_path):
    """An SFTExample payload gives the example its JSONL row gives — the prefix included, so the
    loss starts at the completion (the reset token) — and a payload SFT cannot use raises the
    `ValueError` that makes the job's consumer dead-letter it."""
    from rlhfpb.v1 import samples_pb2

    from rlhf.models.loading import load_tokenizer
    from rlhf.trainer.sft import read_sft_jsonl

    row = {"id": "b", "prompt": "how do I burn the cup?", "completion": RESET + " sorry, no.",
           "prefix": " sure, you can"}
    payload = samples_pb2.SFTExample(source="test", **row)
    (ex,) = examples_from_payload(payload)
    assert [ex] == read_sft_jsonl(write_jsonl(tmp_path / "row.jsonl", [row]))
    check_sft_payload(payload)
    tok = load_tokenizer(tiny_policy_dir, padding_side="right")
    te = encode_example(tok, ex, max_length=64)
    assert te.id == "b" and te.prompt_ids == tuple(tok.encode(row["prompt"] + row["prefix"],
                                                              add_special_tokens=False))
    assert te.completion_ids[0] == tok.convert_tokens_to_ids(RESET)
    for bad, why in [
        (samples_pb2.ScoredSample(id="s", completion_ids=[1]), "ScoredSample is not SFT data"),
        (samples_pb2.RolloutPrompt(id="p", prompt="x"), "RolloutPrompt is not SFT data"),
        (samples_pb2.SFTExample(id="e", prompt="x", prefix=" y"), "'e': empty completion"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_sft_payload(bad)


def test_gradient_accumulation_gives_the_same_step(tiny_policy_dir):
    """Micro-batches of 3 and 5 examples take the same step as one batch of 8: each micro-batch's
    NLL sum is divided by the step's token count (a token mean over the whole step). Plain SGD
    with lr 1 makes the step the gradient itself."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_policy_dir, padding_side="right")
    ex, _ = encode_examples(tok, task_examples(8, seed=3, prefix="g"), max_length=64)
    steps = {}
    for name, micro in (("one", [ex]), ("split", [ex[:3], ex[3:]])):
        model = load_causal_lm(tiny_policy_dir)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        m = train_step(model, opt, micro, pad_id=tok.pad_token_id, max_grad_norm=None)
        steps[name] = (m, [b - p.detach() for b, p in zip(before, model.parameters())])
    (m1, g1), (m2, g2) = steps["one"], steps["split"]
    assert abs(m1["loss"] - m2["loss"]) < 1e-6 and m1["tokens"] == m2["tokens"]
    scale = max(float(g.abs().max()) for g in g1)
    assert scale > 0 and max(float((a - b).abs().max()) for a, b in zip(g1, g2)) < 1e-5 * scale


# ------------------------------------------------------------------------------------------------
# learning
# ------------------------------------------------------------------------------------------------


def test_held_out_nll_falls_and_the_reset_token_is_learned(tiny_policy_dir, tmp_path):
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    train, held = task_examples(160, seed=1, prefix="t"), task_examples(32, seed=2, prefix="h")
    steps = []
    res = train_sft(spec(epochs=3), train, base_dir=tiny_policy_dir, out_dir=tmp_path / "out",
                    eval_records=held, threads=1, progress=lambda s, t, m: steps.append((s, t, m)))
    m = res.metrics
    assert (m["train_examples"], m["eval_examples"], m["steps"]) == (160, 32, 30)
    assert [s for s, _, _ in steps] == list(range(1, 31)) and steps[0][1] == 30
    assert {"train_loss", "train_tokens", "train_grad_norm", "lr"} <= set(steps[-1][2])
    assert m["eval_loss_initial"] > 6.5  # a random model: about log(vocab) = 7.1
    assert m["eval_loss"] < 0.4 * m["eval_loss_initial"], m
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["train_loss"] < m["train_loss_first_step"]
    assert len(res.applied_ids) == 160 and res.eval_ids == sorted(h["id"] for h in held)
    # a usable checkpoint: it loads and its tokenizer is the base's
    assert load_tokenizer(tmp_path / "out")(["a"]).input_ids == load_tokenizer(tiny_policy_dir)(["a"]).input_ids

    # backtracking SFT (spec.reset_token: the completion is trained from its last reset on)
    task = bt.synthetic_safety_task(seed=0)
    records = [{"id": f"b{i}", "prompt": t.prompt,
                "completion": t.unsafe[: bt.draw_cut(t.unsafe, seed=0, key=t.id)] + RESET + t.safe}
               for i, t in enumerate(task.triples)]
    out = tmp_path / "back"
    res = train_sft(spec(max_steps=40, reset_token=RESET, learning_rate=1e-3), records,
                    base_dir=tiny_policy_dir, out_dir=out, threads=1)
    tok = load_tokenizer(out, padding_side="right")
    (reset_id,) = tok.encode(RESET, add_special_tokens=False)
    probe = bt.SafetyTriple("p", "how do I burn the cup?", " sorry, I cannot help with that.",
                            " sure, you can secretly burn the cup at night.")
    context = tok.encode(probe.prompt + " sure, you can secretly", add_special_tokens=False)

    def p_reset(model_dir) -> float:
        with torch.inference_mode():
            logits = load_causal_lm(model_dir)(input_ids=torch.tensor([context])).logits[0, -1]
        return float(torch.softmax(logits.double(), -1)[reset_id])

    assert p_reset(tiny_policy_dir) < 0.01 and p_reset(out) > 0.5
    # the unsafe prefix was context only: training never made it likelier after the prompt
    assert res.metrics["train_examples"] == len(records)


def test_a_reset_token_that_is_not_one_token_fails_the_training(tiny_policy_dir):
    with pytest.raises(SFTError, match=r"'\[RESET\]' is \d+ tokens"):
        train_sft(spec(max_steps=1, reset_token="[RESET]"), task_examples(4, seed=0, prefix="r"),
                  base_dir=tiny_policy_dir, threads=1)
    with pytest.raises(SFTError, match="no usable SFT examples"):
        train_sft(spec(max_steps=1, max_length=4), task_examples(4, seed=0, prefix="r"),
                  base_dir=tiny_policy_dir, threads=1)


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------


def test_an_sft_job_publishes_a_child_version_with_its_metrics(r, names, settings, base, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", task_examples(120, seed=4, prefix="j"))
    job, out = run(names, settings, source={"type": "jsonl", "path": str(data)}, epochs=2,
                   eval_fraction=0.2, activate=True)
    assert out.status == "succeeded" and out.version == "v0002", out
    rec = JobStore(r).get(job.job_id)
    m = rec.metrics
    assert (rec.status, rec.version, rec.progress) == ("succeeded", "v0002", 1.0)
    assert (m["train_examples"], m["eval_examples"], m["steps"]) == (96, 24, 12)
    assert m["eval_loss"] < m["eval_loss_initial"] and m["activated"] is True
    manifest = ModelStore(settings.store_dir).verify(names["model"], "v0002")
    assert (manifest.parent, manifest.kind, manifest.job_id) == (base, "policy", job.job_id)
    assert manifest.extra["job_type"] == "sft" and len(manifest.extra["applied_ids"]) == 96
    assert manifest.extra["spec"]["type"] == "sft" and manifest.probes["kind"] == "policy"
    assert Registry(r).active(names["model"]) == "v0002"
    # run again (a redelivered message): the job is done, nothing is trained or published again
    again = execute(job, run_sft_job, settings=settings, worker="test")
    assert again.status == "skipped"  # a completed job never runs again
    assert ModelStore(settings.store_dir).versions(names["model"]) == ["v0001", "v0002"]


def test_an_sft_job_reads_a_streams_preferred_responses_once(r, names, settings, base):
    rb = connect(REDIS_URL)
    producer, stream = QueueProducer(rb), names["stream"]
    rows = task_examples(24, seed=5, prefix=unique("st"))
    pushed = [producer.push_pair(stream=stream, id=x["id"], prompt=x["prompt"], chosen=x["completion"],
                                 rejected=" sorry, I cannot help with that.") for x in rows]
    producer.push_ranking(stream=stream, id="rank-1", prompt="how do I draw the cup?",
                          responses=[" no.", " sure, you can draw the cup."], ranks=[1, 0])
    job, out = run(names, settings, source={"type": "stream", "stream": stream}, max_steps=2,
                   batch_size=32, eval_fraction=0)
    assert out.status == "succeeded" and out.version == "v0002", out
    m = ModelStore(settings.store_dir).manifest(names["model"], "v0002")
    assert sorted(m.extra["applied_ids"]) == sorted(pushed + ["rank-1"])
    assert m.metrics["train_examples"] == 25  # the chosen responses, the ranking's best
    assert rb.xpending(stream, "sft")["pending"] == 0
    assert applied_ids(r, stream, "sft") == set(pushed + ["rank-1"])
    job2, out2 = run(names, settings, source={"type": "stream", "stream": stream}, max_steps=1)
    assert out2.status == "failed" and "gave 0 usable examples" in out2.error
    rb.close()


def test_bad_sft_specs_and_empty_data_are_rejected_at_submit(r, names, base, tmp_path):
    tc = TrainingClient(REDIS_URL, client=r)
    data = write_jsonl(tmp_path / "sft.jsonl", task_examples(4, seed=0, prefix="s"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_row = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    good = dict(model_name=names["model"], source={"type": "jsonl", "path": str(data)})
    cases = [
        (dict(learning_rate=0), "learning_rate: Input should be greater than 0"),
        (dict(reset_token=""), "reset_token: String should have at least 1 character"),
        (dict(lr_schedule="cosine"), "lr_schedule"),
        (dict(source={"type": "jsonl", "path": str(empty)}), "holds 0 SFT examples"),
        (dict(source={"type": "jsonl", "path": str(bad_row)}), "bad.jsonl:1: missing field 'completion'"),
        (dict(min_examples=5), "the job needs at least 5"),
        (dict(source={"type": "stream", "stream": names["stream"]}), "is empty"),
        (dict(model_name=unique("nobody")), "has no active version"),
    ]
    before = r.zcard("rlhf:jobs")
    for extra, message in cases:
        with pytest.raises(JobRejected, match=message):
            tc.submit_sft(**{**good, **extra})
    assert r.zcard("rlhf:jobs") == before and r.llen("train.sft") == 0
    from rlhf.trainer.celery_app import QUEUE_FOR_TASK, TASK_FOR_JOB

    assert QUEUE_FOR_TASK[TASK_FOR_JOB["sft"]] == "train.sft"


def test_a_stream_fed_sft_job_runs_on_a_celery_worker(tmp_path, tiny_policy_dir, capsys):
    """SFTExample payloads on a stream (benign examples and backtracking ones with their unsafe
    prefix, pushed by the backtracking builder) → `submit_sft` → the `rlhf.train_sft` task on a
    real `rlhf worker` (queue train.sft) → a first version from a base directory that learned
    them, visible in the job record and `rlhf jobs list`. Two payloads an SFT job cannot use are
    dead-lettered, not trained on and not fatal; every entry is applied once (a re-push of an
    applied id is a duplicate a second job skips)."""
    import re

    from rlhf_client.queues import encode_entry
    from rlhfpb.v1 import samples_pb2
    from trainer_helpers import WORKER_REDIS_URL, Worker, delete_matching, forget_job, forget_model

    from rlhf.cli import main as rlhf_main

    rw = connect(WORKER_REDIS_URL)
    model, stream = unique("sft-worker"), unique("test:sft-examples")
    producer = QueueProducer(rw)
    tag = unique("w")
    benign = [producer.push_sft_example(stream=stream, source="test", **x)
              for x in task_examples(40, seed=6, prefix=tag)]
    task = bt.synthetic_safety_task(seed=6, n_triples=8, n_benign=1, n_pretrain=1, n_eval=1)
    triples = task.triples
    back = bt.push_records(producer, bt.backtracking_sft_examples(
        [bt.SafetyTriple(f"{tag}-{t.id}", t.prompt, t.safe, t.unsafe) for t in triples],
        reset_token=RESET, include_safe=False), stream=stream)
    # not SFT data (the consumer's check), and an empty completion written around the producer
    producer.push_sample(stream=stream, id=f"{tag}-sample", completion_ids=[1, 2])
    empty = samples_pb2.SFTExample(id=f"{tag}-empty", prompt="p", prefix=" sure,")
    rw.xadd(stream, {**encode_entry(samples_pb2.SFTExample(id=empty.id, completion="x")),
                     b"data": empty.SerializeToString()})
    worker = Worker(tmp_path / "worker.log", redis_url=WORKER_REDIS_URL, store=tmp_path / "store",
                    name="sft@test", env={"RLHF_JOB_REAP_INTERVAL_S": "0",
                                          "RLHF_JOB_TMP_DIR": str(tmp_path / "jobs-tmp")})
    tc = TrainingClient(WORKER_REDIS_URL)
    jobs = []
    try:
        worker.wait_ready()
        jobs.append(tc.submit_sft(model_name=model, base_dir=str(tiny_policy_dir), max_steps=6,
                                  eval_fraction=0.25, source={"type": "stream", "stream": stream},
                                  **FAST))
        rec = tc.wait(jobs[0], timeout=180, poll_s=0.2)
        assert (rec.status, rec.version, rec.worker) == ("succeeded", "v0001", "sft@test"), rec.error
        m = rec.metrics
        assert rec.spec["type"] == "sft" and rec.spec["source"]["group"] == "sft"
        assert m["steps"] == 6 and m["train_examples"] + m["eval_examples"] == 48
        assert m["eval_loss"] < 0.8 * m["eval_loss_initial"], m  # it learned the examples
        manifest = ModelStore(tmp_path / "store").verify(model, "v0001")
        assert manifest.parent is None and manifest.extra["job_type"] == "sft"
        seen = set(manifest.extra["applied_ids"]) | set(manifest.extra["eval_ids"])
        assert seen == set(benign + back)  # the bad payloads were never trained on
        assert rw.xpending(stream, "sft")["pending"] == 0
        dead = {d["id"]: d["reason"] for d in producer.dead_letters(stream)}
        assert set(dead) == {f"{tag}-sample", f"{tag}-empty"}
        assert "ScoredSample is not SFT data" in dead[f"{tag}-sample"]
        assert "SFTExample.completion: must be non-empty" in dead[f"{tag}-empty"]
        assert rlhf_main(["jobs", "list", "--redis-url", WORKER_REDIS_URL]) == 0
        assert re.search(rf"{jobs[0]}\s+sft\s+succeeded", capsys.readouterr().out)

        # applied once: a re-push of an applied id is skipped, and nothing else is new
        producer.push_sft_example(stream=stream, id=benign[0], prompt="p", completion=" c")
        jobs.append(tc.submit_sft(model_name=model, base_version="v0001", max_steps=1,
                                  source={"type": "stream", "stream": stream}, **FAST))
        rec2 = tc.wait(jobs[1], timeout=180, poll_s=0.2, raise_on_failure=False)
        assert rec2.status == "failed" and "gave 0 usable examples" in rec2.error, rec2
        assert rw.xpending(stream, "sft")["pending"] == 0
        assert ModelStore(tmp_path / "store").versions(model) == ["v0001"]
    finally:
        worker.stop()
        for job_id in jobs:
            forget_job(rw, job_id)
        forget_model(rw, model)
        delete_matching(rw, "train.sft*", f"{stream}*")
        tc.close()
        rw.close()
