"""The loop spec (`iterate`): typed, validated at submit, every rejection naming its field — the
round trainer's options as `train.<field>`, checked by building round 1's child job.

No Redis, no services: `parse_spec` and `check_loop_submit` are what `submit_job` runs before
anything is queued. The stop rules, prompt draws and round records are plain functions."""

from __future__ import annotations

import json

import pytest

from rlhf.trainer.jobs import (
    JOB_TYPES,
    DPOJob,
    JobRejected,
    LoopJob,
    PPOJob,
    check_loop_submit,
    loop_child_id,
    loop_stream,
    parse_spec,
)
from rlhf.trainer.loop import parse_round, round_prompts, stop_reason, win_rate

GOOD = {"type": "iterate", "job_id": "loop1", "model_name": "pol", "policy": "127.0.0.1:1",
        "labeller": {"type": "reward", "target": "127.0.0.1:2"},
        "prompts": {"texts": ["a", "b", "c"]}, "held_out": {"prompts": {"texts": ["d"]}}}


def reject(**changes) -> str:
    with pytest.raises(JobRejected) as err:
        parse_spec({**GOOD, **changes})
    return str(err.value)


def test_good_defaults_and_the_child_jobs():
    spec = parse_spec(GOOD)
    assert isinstance(spec, LoopJob) and JOB_TYPES["iterate"] is LoopJob
    assert (spec.trainer, spec.rounds, spec.dpo_reference, spec.overlap) == ("dpo", 3,
                                                                            "round_start", False)
    assert (spec.sampling.n, spec.pairs.builder, spec.held_out.n) == (4, "best_vs_random", 2)
    assert parse_spec(spec.model_dump(mode="json")) == spec  # the record's snapshot parses back
    child = spec.child_spec(2, "v0005", "v0001")
    assert isinstance(child, DPOJob)
    assert (child.job_id, child.model_name, child.base_version, child.activate) == \
        (loop_child_id("loop1", 2, "dpo"), "pol", "v0005", False) == ("loop1-r2-dpo", "pol",
                                                                      "v0005", False)
    assert (child.source.stream, child.source.group) == (loop_stream("loop1", 2, "pairs"), "dpo")
    assert (child.reference.source, child.reference.version) == ("local", None)  # round start
    original = parse_spec({**GOOD, "dpo_reference": "original", "train": {"beta": 0.3}})
    child = original.child_spec(2, "v0005", "v0001")
    assert (child.reference.version, child.beta) == ("v0001", 0.3)
    grpo = parse_spec({**GOOD, "trainer": "grpo", "reference": "127.0.0.1:3",
                       "sampling": {"n": 6}, "train": {"learning_rate": 1e-4}})
    child = grpo.child_spec(1, "v0001", "v0001")
    assert isinstance(child, PPOJob)
    assert (child.advantage_estimator, child.group_size, child.learning_rate) == ("grpo", 6, 1e-4)
    assert child.source.stream == loop_stream("loop1", 1, "samples")
    ppo = parse_spec({**GOOD, "trainer": "ppo", "reference": "127.0.0.1:3"}).child_spec(
        1, "v1", "v1")
    assert ppo.advantage_estimator == "gae" and ppo.job_id == "loop1-r1-ppo"


@pytest.mark.parametrize("changes, field", [
    ({"rounds": 0}, "rounds"),
    ({"policy": ""}, "policy"),
    ({"labeller": {"type": "oracle", "target": "x"}}, "labeller.type"),
    ({"labeller": {"type": "reward", "target": "x", "template": "t.txt"}}, "labeller.template"),
    ({"prompts": {"texts": []}}, "prompts.texts"),
    ({"prompts": {"texts": ["a"], "path": "p.jsonl"}}, "prompts.path"),
    ({"prompts": {"texts": ["a", ""]}}, "prompts.texts"),
    ({"prompts_per_round": 4}, "prompts_per_round"),
    ({"sampling": {"n": 1}}, "sampling.n"),
    ({"sampling": {"temperature": 0}}, "sampling.temperature"),
    ({"pairs": {"builder": "best_of_all"}}, "pairs.builder"),
    ({"pairs": {"min_margin": -1}}, "pairs.min_margin"),
    ({"stop": {"patience": 0}}, "stop.patience"),
    ({"stop": {"max_kl": 5}}, "stop.max_kl"),  # KL needs a reference
    ({"trainer": "ppo"}, "reference"),
    ({"trainer": "grpo", "reference": "r", "human": {"min_pairs": 2}}, "human"),
    ({"trainer": "ppo", "reference": "r", "dpo_reference": "original"}, "dpo_reference"),
    ({"base_dir": "/models/x"}, "base_dir"),
    ({"job_id": "x" * 101}, "job_id"),
    ({"job_id": "bad id"}, "job_id"),
    ({"held_out": {"prompts": {"texts": ["d"]}, "n": 0}}, "held_out.n"),
    ({"human": {"min_pairs": 0}}, "human.min_pairs"),
    ({"swap_timeout_s": 0}, "swap_timeout_s"),
    ({"unknown": 1}, "unknown"),
    # the round trainer's options: checked by building round 1's child job
    ({"train": {"beta": -1}}, "train.beta"),
    ({"train": {"loss_type": "kto"}}, "train.loss_type"),
    ({"train": {"no_such_option": 1}}, "train.no_such_option"),
    ({"train": {"min_eval_accuracy": 0.9, "eval_fraction": 0}}, "train"),
    ({"train": {"source": {"type": "stream"}}}, "train.source"),
    ({"train": {"activate": True}}, "train.activate"),
    ({"train": {"base_version": "v0001"}}, "train.base_version"),
    ({"train": {"reference": {"source": "local"}}}, "train.reference"),
    ({"trainer": "grpo", "reference": "r", "train": {"advantage_estimator": "gae"}},
     "train.advantage_estimator"),
    ({"trainer": "ppo", "reference": "r", "train": {"group_size": 2}}, "train.group_size"),
    ({"trainer": "ppo", "reference": "r", "train": {"kl_target": 1.0, "kl_coef": 0}},
     "train.kl_coef"),
    ({"trainer": "ppo", "reference": "r", "overlap": True, "train": {"max_staleness": 0}},
     "train.max_staleness"),
])
def test_bad_specs_are_rejected_naming_the_field(changes, field):
    msg = reject(**changes)
    assert msg.startswith("iterate job spec rejected:"), msg
    named = [line.split(":")[0].strip() for line in msg.splitlines()[1:]]
    assert field in named, msg


def test_every_problem_is_named_at_once():
    msg = reject(trainer="ppo", stop={"max_kl": 1.0}, job_id="y" * 120)
    named = {line.split(":")[0].strip() for line in msg.splitlines()[1:]}
    assert {"reference", "stop.max_kl", "job_id"} <= named, msg


def test_submit_checks_the_files_it_names(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello"}\n{"id": "b", "prompt": "there"}\n')
    ok = parse_spec({**GOOD, "prompts": {"path": str(prompts)}, "prompts_per_round": 2})
    check_loop_submit(ok, None)

    def rejected(**changes) -> str:
        with pytest.raises(JobRejected) as err:
            check_loop_submit(parse_spec({**GOOD, **changes}), None)
        return str(err.value)

    assert "prompts.path" in rejected(prompts={"path": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    assert "prompts.path" in rejected(prompts={"path": str(bad)})
    assert "held_out.prompts.path" in rejected(held_out={"prompts": {"path": str(bad)}})
    assert "prompts_per_round" in rejected(prompts={"path": str(prompts)}, prompts_per_round=3)
    assert "labeller.template" in rejected(labeller={"type": "judge", "target": "x",
                                                     "template": str(tmp_path / "no.txt")})


def _rounds(scores, kls=None):
    return [{"round": k, "held_out_score": s, **({"kl": kls[k]} if kls else {})}
            for k, s in enumerate(scores)]


def test_stop_rules():
    spec = parse_spec({**GOOD, "rounds": 5, "reference": "r",
                       "stop": {"patience": 2, "min_improvement": 0.1, "max_kl": 3.0}})
    assert stop_reason(spec, _rounds([0.0, 0.5])) is None
    assert stop_reason(spec, _rounds([0.0, 0.5, 0.55])) is None  # one flat round < patience
    # two rounds without beating the best before them (0.5) by 0.1: a plateau
    assert stop_reason(spec, _rounds([0.0, 0.5, 0.55, 0.58])) == "plateau"
    assert stop_reason(spec, _rounds([0.0, 0.5, 0.55, 0.61])) is None
    assert stop_reason(spec, _rounds([0.0, 0.5], [0.0, 3.5])) == "max_kl"
    assert stop_reason(spec, _rounds([0, 1, 2, 3, 4, 5])) == "rounds"
    plain = parse_spec({**GOOD, "rounds": 2})
    assert stop_reason(plain, _rounds([0.0, -1.0])) is None  # no patience set: only rounds
    assert stop_reason(plain, _rounds([0.0, -1.0, -2.0])) == "rounds"


def test_round_prompts_and_win_rate():
    prompts = [(f"p{i}", f"t{i}") for i in range(10)]
    assert round_prompts(prompts, 3, None, 0) == prompts
    a, b = round_prompts(prompts, 1, 4, 0), round_prompts(prompts, 2, 4, 0)
    assert len(a) == len(set(a)) == 4 and set(a) <= set(prompts)
    assert a == round_prompts(prompts, 1, 4, 0) and a != b  # fixed per round, fresh each round
    assert win_rate([0.9, 0.1, 0.5, 0.7]) == pytest.approx(2.5 / 4)


def test_round_records_parse_typed():
    rec = parse_round({"round": "2", "held_out_score": "0.25", "kl": "1.5", "done": "1",
                       "pairs_machine": "7", "seconds": json.dumps({"train": 1.2}),
                       "eval_texts": "[]", "new_version": "v0003"})
    assert rec["round"] == 2 and rec["held_out_score"] == 0.25 and rec["done"] is True
    assert rec["seconds"] == {"train": 1.2} and rec["pairs_machine"] == 7
    assert "eval_texts" not in rec and rec["versions"] == []


def test_a_yaml_spec_file_with_overrides(tmp_path):
    from rlhf.trainer.loop_cli import SpecFileError, load_spec_file

    path = tmp_path / "loop.yaml"
    path.write_text(
        "model_name: policy\n"
        "policy: 127.0.0.1:50051\n"
        "reference: 127.0.0.1:50053\n"
        "labeller: {type: reward, target: 127.0.0.1:50052}\n"
        "prompts: {path: prompts.jsonl}\n"
        "held_out: {prompts: {path: held_out.jsonl}, n: 4}\n"
        "sampling: {n: 8, temperature: 1.0, max_new_tokens: 64}\n"
        "pairs: {builder: best_vs_worst}\n"
        "train: {beta: 0.1, learning_rate: 1.0e-6, epochs: 2}\n"
        "stop: {patience: 2, min_improvement: 0.01, max_kl: 20}\n")
    spec = parse_spec(load_spec_file(path, ["rounds=5", "sampling.n=4", "train.beta=0.2",
                                            "overlap=true", "human.min_pairs=10"]))
    assert isinstance(spec, LoopJob)
    assert (spec.rounds, spec.sampling.n, spec.overlap, spec.human.min_pairs) == (5, 4, True, 10)
    assert spec.train == {"beta": 0.2, "learning_rate": 1e-6, "epochs": 2}
    assert spec.child_spec(1, "v1", "v1").learning_rate == 1e-6
    with pytest.raises(SpecFileError, match="KEY=VALUE"):
        load_spec_file(path, ["rounds"])
    with pytest.raises(SpecFileError, match="no.json"):
        load_spec_file(tmp_path / "no.json", [])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SpecFileError, match="mapping"):
        load_spec_file(tmp_path / "list.json", [])
