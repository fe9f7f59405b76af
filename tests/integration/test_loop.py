"""The online loop (`iterate`) on real parts: a tiny policy published and followed by a real
PolicyService, a tiny reward model trained here on the banana task (the demo's
`_banana_reward_model`, the trainer's own Bradley–Terry function) served by a real
RewardService, the ReferenceService on the original policy, real Redis (db 9, this module's
own), and — where a process is what is tested — a real `rlhf worker` running the loop task and,
in its own process, the rounds' training jobs.

What must hold: three rounds of online DPO labelled by the reward model raise the held-out mean
reward every round (each round's version is served and measured); the same loop labelled by an
AI judge runs end to end; a loop SIGKILLed while round 2 trains resumes without training round
1 again; a loop killed between a round's publish and its activation ends with exactly one
version for that round; bad specs are refused at submit naming the field.

Where a worker must die at an exact point the test starts it with a `sitecustomize` of its own
(PYTHONPATH) that makes the worker's pool process stop itself (SIGSTOP) there; the test waits
until it is stopped, then SIGKILLs the worker's process group: the same as an OOM kill at that
point, with nothing timed.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TEST_REDIS, ThreadedApp, make_settings
from rlhf_client import PolicyClient, QueueProducer, TrainingClient
from rlhf_client.redis_conn import connect
from rlhf_client.registry import Registry
from trainer_helpers import celery_keys, unique, wait_for, worker_starter

from rlhf.loop_demo import MAX_NEW_TOKENS, SAMPLES_PER_PROMPT, banana_loop_spec, banana_prompts
from rlhf.loop_demo import TRAIN as TRAIN_OPTIONS
from rlhf.models.probes import compute_probes
from rlhf.models.store import ModelStore
from rlhf.trainer.jobs import JobRejected, loop_child_id, loop_stream, parse_spec
from rlhf.trainer.loop import plot_loop, read_loop

REDIS_URL = f"{TEST_REDIS}/9"  # this module's own database (registry, loops, a worker's broker)
ROUNDS = 3
# The demo's loop (`rlhf demo --algo loop`, rlhf.loop_demo): each round 80 prompts × 16 samples,
# one best-vs-worst pair per prompt, DPO with RPO's NLL term on the chosen responses. Measured
# with sampling seeds 3, 4, 7 and 11: held-out mean reward (20 prompts × 8 samples) −1.60 →
# −1.14…−1.24 → −0.52…−0.96 → −0.06…+0.91 (the smallest rise of a round 0.28), 12–14 s for the
# three rounds.
N, MAX_NEW, TRAIN = SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TRAIN_OPTIONS


# ------------------------------------------------------------------------------------------------
# Fixtures: models, services, names
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r():
    client = connect(REDIS_URL, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny policy, and a tiny reward model that prefers responses saying "banana"."""
    from rich.console import Console

    from rlhf.demo import _banana_reward_model
    from rlhf.models.tiny import make_tiny_model

    src = tmp_path_factory.mktemp("loop-models")
    policy = make_tiny_model("policy", src / "policy", seed=0)
    reward = _banana_reward_model(src, Console(quiet=True))
    return {"policy": policy, "reward": reward, "store": src / "store"}


@pytest.fixture(scope="module")
def services(models):
    from rlhf.reference.app import make_reference_app
    from rlhf.reward.app import make_reward_app

    fast = dict(batch_max_wait_ms=2)
    reward = make_reward_app(make_settings(model_dir=models["reward"], **fast))
    reference = make_reference_app(make_settings(model_dir=models["policy"], **fast))
    with ThreadedApp(reward) as rw, ThreadedApp(reference) as rf:
        yield {"reward": rw.target, "reference": rf.target}


def publish_first(models, r, name: str) -> None:
    """`name` v0001 = the tiny policy, registered and active."""
    first = ModelStore(models["store"]).publish(name, models["policy"], kind="policy",
                                                probes=compute_probes("policy", models["policy"]))
    reg = Registry(r)
    reg.register(name, first.version, first.created)
    reg.activate(name, first.version)


@contextlib.contextmanager
def followed_policy(models, r, name: str):
    """`name` v0001 = the tiny policy (active), and a PolicyService following it."""
    from rlhf.policy.app import make_policy_app

    publish_first(models, r, name)
    settings = make_settings(model_name=name, store_dir=models["store"], redis_url=REDIS_URL,
                             swap_poll_s=0.2, batch_max_wait_ms=2)
    with ThreadedApp(make_policy_app(settings)) as app:
        yield app.target


TRAIN_PROMPTS, HELD_OUT = banana_prompts()


def loop_spec(name: str, policy: str, services, **over) -> dict:
    return banana_loop_spec(name, policy=policy, reward=services["reward"],
                            reference=services["reference"],
                            **{"rounds": ROUNDS, "job_id": unique("loop"), **over})


def settings_for(models, tmp_path, **over):
    from rlhf.config import Settings

    return Settings(redis_url=REDIS_URL, store_dir=models["store"], metrics_port=None,
                    torch_threads=1, **over)


def run_in_process(spec: dict, settings):
    from rlhf.trainer.jobs import execute
    from rlhf.trainer.loop import run_loop_job

    return execute(parse_spec(spec), run_loop_job, settings=settings, worker="test")


def versions_of(models, name: str) -> list[str]:
    return ModelStore(models["store"]).versions(name)


def job_of_version(models, name: str, version: str) -> str:
    return ModelStore(models["store"]).manifest(name, version).job_id


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_rounds_of_online_dpo_raise_the_held_out_reward_every_round(
        models, services, r, tmp_path):
    name = unique("loop-dpo")
    with followed_policy(models, r, name) as policy:
        spec = loop_spec(name, policy, services)
        t0 = time.monotonic()
        out = run_in_process(spec, settings_for(models, tmp_path))
        seconds = time.monotonic() - t0
        assert out.status == "succeeded", out
        status = read_loop(r, spec["job_id"])
        rounds = status.rounds
        scores = [x["held_out_score"] for x in rounds]
        print(f"held-out mean reward per round {[round(s, 3) for s in scores]}; KL "
              f"{[round(x.get('kl', 0), 2) for x in rounds]}; win rate "
              f"{[x.get('win_rate') for x in rounds]}; {seconds:.0f}s")
        assert [x["round"] for x in rounds] == list(range(ROUNDS + 1))
        assert all(x["done"] for x in rounds)
        assert all(b > a for a, b in zip(scores, scores[1:])), scores
        # every round trained from the previous round's version, which was served and measured
        versions = versions_of(models, name)
        assert versions == [f"v{k:04d}" for k in range(1, ROUNDS + 2)]
        for k in range(1, ROUNDS + 1):
            assert rounds[k]["start_version"] == rounds[k - 1]["new_version"]
            assert rounds[k]["new_version"] == versions[k]
            assert job_of_version(models, name, versions[k]) == loop_child_id(spec["job_id"], k,
                                                                             "dpo")
            assert rounds[k]["pairs_machine"] > 0 and 0 <= rounds[k]["win_rate"] <= 1
            assert rounds[k]["seconds"]["train"] > 0 and rounds[k]["seconds"]["evaluate"] > 0
        assert rounds[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # the reference itself
        assert rounds[-1]["kl"] > 0
        assert Registry(r).active(name) == versions[-1]
        with PolicyClient(policy) as pc:
            assert pc.get_model().model.version == versions[-1]
        rec = status.record
        assert rec.status == "succeeded" and rec.version == versions[-1]
        assert rec.metrics["stop_reason"] == "rounds" and rec.metrics["rounds_done"] == ROUNDS
        # the pairs in round 2's stream carry their provenance
        from rlhf_client.queues import decode_entry

        rb = connect(REDIS_URL)
        entries = rb.xrange(loop_stream(spec["job_id"], 2, "pairs"))
        pair = decode_entry(entries[0][1])
        rb.close()
        assert len(entries) == rounds[2]["pairs_machine"]
        assert (pair.chosen_model.name, pair.chosen_model.version) == (name, versions[1])
        assert pair.labeller.startswith("reward:") and pair.builder == "best_vs_worst"
        assert pair.chosen_score > pair.rejected_score
        assert pair.metadata["loop"] == spec["job_id"] and pair.metadata["round"] == "2"
        assert json.loads(pair.metadata["sampling"])["n"] == N
        png = plot_loop(rounds, tmp_path / "loop.png", title=name)
        assert png.stat().st_size > 10_000
    # the rounds' jobs ran inside the loop's attempt directory (nested), and all of it is gone
    assert not (Path(tempfile.gettempdir()) / "rlhf-jobs" / spec["job_id"]).exists()


def test_the_reward_labeller_scores_and_compares_as_the_reward_service_does(services):
    from rlhf_client import RewardClient

    from rlhf.trainer.labellers import RewardLabeller, compare_all, is_absolute, make_labeller
    from rlhf.trainer.jobs import LabellerSpec

    lab = make_labeller(LabellerSpec(type="reward", target=services["reward"]))
    assert isinstance(lab, RewardLabeller) and is_absolute(lab)
    prompts = ["Alice asked about the cake:", "Bob asked about the dog:"]
    groups = [[" banana the cake.", " apple the cake.", ""], [" banana.", " plum."]]
    with RewardClient(services["reward"]) as rc:
        model = rc.get_model().model
        scores = lab.score_groups(prompts, groups)
        assert lab.name == f"reward:{model.name}@{model.version}"
        assert [len(g) for g in scores] == [3, 2]
        want = rc.score([(p, t or " ") for p, g in zip(prompts, groups) for t in g]).rewards
        assert [x for g in scores for x in g] == pytest.approx(want, abs=1e-5)
        assert scores[0][0] > scores[0][1]  # the banana task's reward model
        triples = [(prompts[0], groups[0][0], groups[0][1]), (prompts[1], " plum.", " banana.")]
        batched = compare_all(lab, triples)
        one_by_one = [lab.compare(*t) for t in triples]
        service = [rc.compare(*t).probability_a for t in triples]
    assert batched == pytest.approx(service, abs=1e-5) and one_by_one == pytest.approx(service)
    assert batched[0] > 0.5 > batched[1]
    lab.close()


# A small loop for the tests that check what runs rather than how much it learns.
SMALL = {"rounds": 2, "sampling": {"n": 4, "max_new_tokens": MAX_NEW, "seed": 1},
         "prompts": {"texts": TRAIN_PROMPTS[:16]},
         "held_out": {"prompts": {"texts": HELD_OUT[:6]}, "n": 2},
         "train": {**TRAIN, "epochs": 2}}


def check_rounds(models, r, name: str, loop_id: str, rounds: int) -> list[dict]:
    """The loop succeeded with one version per round, each served, measured and activated in
    turn; its rounds."""
    status = read_loop(r, loop_id)
    assert status.record.status == "succeeded", status.record.error
    done = status.rounds
    assert [x["round"] for x in done] == list(range(rounds + 1)) and all(x["done"] for x in done)
    versions = versions_of(models, name)
    assert versions == [f"v{k:04d}" for k in range(1, rounds + 2)]
    for k in range(1, rounds + 1):
        assert done[k]["start_version"] == versions[k - 1] and done[k]["new_version"] == versions[k]
        assert job_of_version(models, name, versions[k]) == loop_child_id(loop_id, k, "dpo")
    assert Registry(r).active(name) == versions[-1]
    return done


@pytest.mark.slow
def test_the_loop_labelled_by_an_ai_judge_runs_end_to_end(models, services, r, tmp_path):
    """RLAIF: the judge is a language model served by its own PolicyService (the tiny policy,
    pinned); it scores each group pairwise, both orders averaged."""
    from rlhf.policy.app import make_policy_app
    from rlhf_client.queues import decode_entry

    name = unique("loop-judge")
    judge_settings = make_settings(model_dir=models["policy"], batch_max_wait_ms=2)
    with ThreadedApp(make_policy_app(judge_settings)) as judge, \
            followed_policy(models, r, name) as policy:
        spec = loop_spec(name, policy, services, **SMALL,
                         labeller={"type": "judge", "target": judge.target})
        out = run_in_process(spec, settings_for(models, tmp_path))
        assert out.status == "succeeded", out
        done = check_rounds(models, r, name, spec["job_id"], 2)
        judge_ref = PolicyClient(judge.target)
        judge_model = judge_ref.get_model().model
        judge_ref.close()
    # with a judge the held-out score is P(this version's sample ≻ the original's): ½ at first
    assert [x["held_out_metric"] for x in done] == ["p_vs_original"] * 3
    assert done[0]["held_out_score"] == 0.5
    for x in done[1:]:
        assert 0.0 <= x["held_out_score"] <= 1.0 and 0.0 <= x["win_rate"] <= 1.0
        assert x["pairs_machine"] > 0
    rb = connect(REDIS_URL)
    pairs = [decode_entry(f) for _, f in rb.xrange(loop_stream(spec["job_id"], 1, "pairs"))]
    rb.close()
    assert len(pairs) == done[1]["pairs_machine"]
    assert {p.labeller for p in pairs} == {f"judge:{judge_model.name}@{judge_model.version}"}
    assert all(p.chosen_score > p.rejected_score for p in pairs)


def test_overlapped_rounds_sample_the_next_round_while_this_one_trains(
        models, services, r, tmp_path):
    name = unique("loop-overlap")
    with followed_policy(models, r, name) as policy:
        spec = loop_spec(name, policy, services, **{**SMALL, "rounds": 3}, overlap=True)
        out = run_in_process(spec, settings_for(models, tmp_path))
        assert out.status == "succeeded", out
        done = check_rounds(models, r, name, spec["job_id"], 3)
    for k in (2, 3):
        # round k's samples were drawn while round k−1 trained: one version off-policy (or the
        # new one, for batches drawn after its swap)
        assert done[k]["collect_started"] < done[k - 1]["trained_at"], (k, done[k], done[k - 1])
        assert set(done[k]["versions"]) <= {done[k - 1]["start_version"],
                                            done[k - 1]["new_version"]}
        assert done[k - 1]["start_version"] in done[k]["versions"]
    assert done[1]["versions"] == [done[1]["start_version"]]


def test_a_round_waits_for_human_pairs_and_trains_on_them_too(models, services, r, tmp_path):
    import threading

    from rlhf.demo import synthetic_pairs
    from rlhf.trainer.queues import applied_ids

    name = unique("loop-human")
    human_stream = unique("test:loop:human")
    group = "loop-people"
    with followed_policy(models, r, name) as policy:
        spec = loop_spec(name, policy, services, **{**SMALL, "rounds": 1},
                         human={"stream": human_stream, "group": group, "min_pairs": 3,
                                "wait_s": 120})
        result = {}
        runner = threading.Thread(target=lambda: result.setdefault(
            "out", run_in_process(spec, settings_for(models, tmp_path))))
        runner.start()

        def waiting():
            if not runner.is_alive():
                raise AssertionError(f"the loop ended without waiting: {result}")
            rec = read_loop(r, spec["job_id"]).record
            return rec is not None and rec.metrics.get("stage") == "human"

        wait_for(waiting, timeout=120, what="round 1 to wait for human pairs", interval=0.05)
        producer = QueueProducer(connect(REDIS_URL))
        ids = [producer.push_pair(stream=human_stream, id=f"human-{i}", source="human",
                                  labeller="human:alice", **p)
               for i, p in enumerate(synthetic_pairs(3, seed=5))]
        runner.join(timeout=300)
        assert not runner.is_alive() and result["out"].status == "succeeded", result
        done = check_rounds(models, r, name, spec["job_id"], 1)
    machine, human = done[1]["pairs_machine"], done[1]["pairs_human"]
    assert human == 3 and machine > 0
    assert done[1]["train_metrics"]["train_pairs"] == machine + human  # eval_fraction 0
    rb = connect(REDIS_URL)
    stream_ids = {f[b"id"].decode() for _, f in rb.xrange(loop_stream(spec["job_id"], 1, "pairs"))}
    assert set(ids) <= stream_ids and len(stream_ids) == machine + human
    # the human entries are acked in the loop's group and recorded as applied (taken once)
    assert rb.xpending(human_stream, group)["pending"] == 0
    assert applied_ids(rb, human_stream, group) == set(ids)
    rb.close()
    producer.close()


@pytest.mark.parametrize("labeller", ["reward", "judge"])
def test_grpo_rounds_train_on_the_rounds_scored_samples(models, services, r, tmp_path, labeller):
    """GRPO as the round trainer: the rollout worker pushes each round's n samples per prompt
    (scored by the labeller, with the ReferenceService's log-probs) to the round's stream, and a
    PPO job with the GRPO estimator trains on exactly those."""
    from rlhf.policy.app import make_policy_app
    from rlhf_client.queues import decode_entry

    name = unique(f"loop-grpo-{labeller}")
    with contextlib.ExitStack() as stack:
        if labeller == "judge":
            judge = stack.enter_context(ThreadedApp(make_policy_app(make_settings(
                model_dir=models["policy"], batch_max_wait_ms=2))))
            lab = {"type": "judge", "target": judge.target}
        else:
            lab = {"type": "reward", "target": services["reward"]}
        policy = stack.enter_context(followed_policy(models, r, name))
        spec = loop_spec(name, policy, services, **{
            **SMALL, "prompts": {"texts": TRAIN_PROMPTS[:8]}, "trainer": "grpo", "labeller": lab,
            "train": {"learning_rate": 3e-3, "kl_coef": 0.05, "ppo_epochs": 2,
                      "minibatch_size": 16}})
        out = run_in_process(spec, settings_for(models, tmp_path))
        assert out.status == "succeeded", out
        status = read_loop(r, spec["job_id"])
    done = status.rounds
    assert [x["round"] for x in done] == [0, 1, 2] and all(x["done"] for x in done)
    versions = versions_of(models, name)
    assert versions == ["v0001", "v0002", "v0003"] and Registry(r).active(name) == "v0003"
    rb = connect(REDIS_URL)
    for k in (1, 2):
        assert job_of_version(models, name, versions[k]) == loop_child_id(spec["job_id"], k,
                                                                         "grpo")
        samples = [decode_entry(f) for _, f in rb.xrange(loop_stream(spec["job_id"], k, "samples"))]
        assert len(samples) == done[k]["samples"] == 8 * 4
        assert {s.policy.version for s in samples} == {versions[k - 1]}  # on-policy
        assert all(len(s.reference_logprobs) == len(s.completion_ids) for s in samples)
        assert done[k]["train_metrics"]["score_mean"] == pytest.approx(
            sum(s.reward for s in samples) / len(samples), abs=1e-4)
        assert samples[0].reward_model.version  # who scored them is recorded
    rb.close()


def test_bad_loop_specs_are_rejected_at_submit_and_nothing_is_queued(models, services, r,
                                                                      tmp_path):
    name = unique("loop-bad")
    jobs_before = r.zcard("rlhf:jobs")
    with TrainingClient(REDIS_URL) as tc:
        good = loop_spec(name, "127.0.0.1:1", services, **SMALL)
        with pytest.raises(JobRejected, match="  model_name: .* no active version"):
            tc.submit_loop(**good)  # nothing to start from yet
        publish_first(models, r, name)
        with pytest.raises(JobRejected, match="  base_version: .* no version 'v0009'"):
            tc.submit_loop(**good, base_version="v0009")
        bad_rows = tmp_path / "bad.jsonl"
        bad_rows.write_text('{"id": "a", "text": "no prompt key"}\n')
        cases = [
            ({"train": {"beta": 0}}, "train.beta"),
            ({"train": {"source": {"type": "stream"}}}, "train.source"),
            ({"prompts": {"path": str(tmp_path / "missing.jsonl")}}, "prompts.path"),
            ({"held_out": {"prompts": {"path": str(bad_rows)}}}, "held_out.prompts.path"),
            ({"labeller": {"type": "judge", "target": "x", "template": str(tmp_path / "no.txt")}},
             "labeller.template"),
            ({"sampling": {"n": 1}}, "sampling.n"),
        ]
        for changes, field in cases:
            with pytest.raises(JobRejected) as err:
                tc.submit_loop(**{**good, **changes})
            assert f"  {field}:" in str(err.value), (field, str(err.value))
    assert r.llen("train.loop") == 0 and r.zcard("rlhf:jobs") == jobs_before
    assert not r.exists(f"rlhf:job:{good['job_id']}")


# ------------------------------------------------------------------------------------------------
# A real worker: the loop task, killed and resumed
# ------------------------------------------------------------------------------------------------

# Makes a worker's pool process stop itself (SIGSTOP) at one point of a loop, named by
# RLHF_TEST_LOOP_STOP: "train:<k>" — at the first optimizer step of round k's DPO job;
# "publish:<k>" — right after round k's DPO job published its version, before anything else.
SITECUSTOMIZE = textwrap.dedent('''
    import os
    import signal

    _where, _, _round = os.environ.get("RLHF_TEST_LOOP_STOP", "").partition(":")

    def _ours(job_id):
        return job_id.endswith(f"-r{_round}-dpo")

    def _halt():
        os.kill(os.getpid(), signal.SIGSTOP)

    if _where == "train":
        import rlhf.trainer.dpo as dpo

        _train = dpo.train_dpo

        def train_dpo(spec, pairs, **kw):
            progress = kw.get("progress")
            if _ours(spec.job_id):
                def stop_at_first_step(step, total, metrics):
                    if progress is not None:
                        progress(step, total, metrics)
                    _halt()
                kw["progress"] = stop_at_first_step
            return _train(spec, pairs, **kw)

        dpo.train_dpo = train_dpo
    elif _where == "publish":
        import rlhf.trainer.pipeline as pipeline

        _publish = pipeline.publish_version

        def publish_version(*args, **kw):
            manifest = _publish(*args, **kw)
            if _ours(kw["job_id"]):
                _halt()
            return manifest

        pipeline.publish_version = publish_version
''')


@pytest.fixture
def wenv(models, r, tmp_path):
    """Worker starter (db 9 as broker), a sitecustomize directory; workers stopped afterwards."""
    chaos = tmp_path / "chaos"
    chaos.mkdir()
    (chaos / "sitecustomize.py").write_text(SITECUSTOMIZE)
    rb = connect(REDIS_URL)
    celery_keys(rb)
    workers: list = []
    start = worker_starter(workers, tmp_path, store=models["store"], redis_url=REDIS_URL)
    yield {"start": start, "chaos": str(chaos), "workers": workers, "tmp": tmp_path}
    for w in workers:
        w.stop()
    celery_keys(rb)
    rb.close()


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc/<pid>/stat."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def halt_and_kill(worker, loop_id: str, r) -> None:
    """Wait until the worker's pool process stopped itself, then SIGKILL the whole worker."""
    def halted():
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.log()[-3000:]}")
        rec = read_loop(r, loop_id).record
        if rec is not None and rec.status == "failed":
            raise AssertionError(f"loop failed: {rec.error}")
        return any(stopped(pid) for pid in worker.pool_children())

    wait_for(halted, timeout=240, what="the worker to stop at the chosen point", interval=0.05)
    worker.kill()


@pytest.mark.slow
def test_a_loop_killed_while_round_2_trains_resumes_without_training_round_1_again(
        models, services, r, wenv):
    name = unique("loop-kill")
    with followed_policy(models, r, name) as policy, TrainingClient(REDIS_URL) as tc:
        spec = loop_spec(name, policy, services, **SMALL)
        # the worker first: it declares the queues' bindings the submit routes through
        w1 = wenv["start"]("w1", PYTHONPATH=wenv["chaos"], RLHF_TEST_LOOP_STOP="train:2")
        loop_id = tc.submit_loop(**spec)
        halt_and_kill(w1, loop_id, r)
        r1, r2 = loop_child_id(loop_id, 1, "dpo"), loop_child_id(loop_id, 2, "dpo")
        # killed in round 2's training: round 1 is done, round 2's job runs, nothing published
        assert read_loop(r, loop_id).rounds[1]["done"]
        assert tc.status(r2).status == "running" and tc.status(r2).attempts == 1
        assert versions_of(models, name) == ["v0001", "v0002"]
        wenv["start"]("w2")
        rec = tc.wait(loop_id, timeout=300, poll_s=0.2)
        done = check_rounds(models, r, name, loop_id, 2)
    assert rec.attempts == 2 and rec.version == "v0003"
    assert tc.status(r1).attempts == 1  # round 1 trained once
    assert tc.status(r2).attempts == 2  # round 2: the killed attempt, then the one that finished
    assert done[2]["child_attempts"] == "2"
    # the killed attempts' temp dirs (the loop's and round 2's) were removed by the next ones
    assert list((wenv["tmp"] / "jobs-tmp").iterdir()) == []


@pytest.mark.slow
def test_a_loop_killed_between_publish_and_activate_ends_with_one_version_for_the_round(
        models, services, r, wenv, tmp_path, capsys):
    from rlhf.cli import main as rlhf_main

    name = unique("loop-publish")
    with followed_policy(models, r, name) as policy:
        spec = loop_spec(name, policy, services, **{**SMALL, "rounds": 1})
        spec_file = tmp_path / "loop.json"
        spec_file.write_text(json.dumps({k: v for k, v in spec.items() if k != "rounds"}))
        w1 = wenv["start"]("w1", PYTHONPATH=wenv["chaos"], RLHF_TEST_LOOP_STOP="publish:1")
        # `rlhf loop start` with an override: the spec file has no rounds; --set gives one
        assert rlhf_main(["loop", "start", str(spec_file), "--set", "rounds=1",
                          "--redis-url", REDIS_URL]) == 0
        loop_id = capsys.readouterr().out.strip()
        assert loop_id == spec["job_id"]
        halt_and_kill(w1, loop_id, r)
        child = loop_child_id(loop_id, 1, "dpo")
        # the version is in the store; the loop never recorded it, nor activated it
        assert versions_of(models, name) == ["v0001", "v0002"]
        assert job_of_version(models, name, "v0002") == child
        assert Registry(r).active(name) == "v0001"
        assert "new_version" not in read_loop(r, loop_id).rounds[1]
        wenv["start"]("w2")
        with TrainingClient(REDIS_URL) as tc:
            rec = tc.wait(loop_id, timeout=300, poll_s=0.2)
            assert rec.attempts == 2 and tc.status(child).attempts == 2
        check_rounds(models, r, name, loop_id, 1)  # exactly one version for the round: v0002
        # the CLI reads it back
        capsys.readouterr()
        assert rlhf_main(["loop", "status", loop_id, "--json", "--redis-url", REDIS_URL]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert [x["round"] for x in shown["rounds"]] == [0, 1]
        assert shown["state"]["final_version"] == "v0002"
        assert rlhf_main(["loop", "follow", loop_id, "--redis-url", REDIS_URL]) == 0
        assert rlhf_main(["loop", "status", loop_id, "--redis-url", REDIS_URL]) == 0
        table = capsys.readouterr().out
        assert "succeeded, stopped: rounds" in table and "v0002" in table
        png = tmp_path / "loop.png"
        assert rlhf_main(["loop", "plot", loop_id, str(png), "--redis-url", REDIS_URL]) == 0
        assert png.stat().st_size > 10_000
        assert rlhf_main(["loop", "status", "no-such-loop", "--redis-url", REDIS_URL]) == 1
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**spec, "job_id": unique("loop"), "rounds": 0}))
        assert rlhf_main(["loop", "start", str(bad), "--redis-url", REDIS_URL]) == 2
        assert "rounds:" in capsys.readouterr().err
