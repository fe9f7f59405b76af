"""Job specs in the client (`rlhf_client.jobspecs`): the base install validates, describes and
checks jobs with them; the client package never imports the server package.

No Redis: the submit-time file checks are run on JSONL sources (a stream source is the only
thing they ask Redis about).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from rlhf_client import jobspecs
from rlhf_client.jobspecs import (
    JOB_TYPES,
    QUEUE_FOR_TASK,
    TASK_FOR_JOB,
    JobRejected,
    check_dpo_submit,
    check_loop_submit,
    check_ppo_submit,
    check_sft_submit,
    example_spec,
    job_schema,
    parse_spec,
)

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "rlhf_client"


def _server_imports(path: Path) -> list[str]:
    """`file:line module` for every import of `rlhf` / `rlhf.*` in a file, at any depth (lazy
    imports inside functions included), and every `import_module` / `__import__` of one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def server(name: str | None) -> bool:
        return name is not None and (name == "rlhf" or name.startswith("rlhf."))

    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path.name}:{node.lineno} {n}" for n in names if server(n)]
    return found


def test_the_client_package_never_imports_the_server_package():
    files = sorted(CLIENT.rglob("*.py"))
    assert len(files) > 10 and CLIENT / "jobspecs.py" in files
    offending = [hit for f in files for hit in _server_imports(f)]
    assert offending == [], "rlhf_client must not import rlhf:\n" + "\n".join(offending)


def test_the_import_check_sees_lazy_and_dynamic_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom rlhf_client import x\n"
                   "def f():\n    from rlhf.trainer import jobs\n    import rlhf\n"
                   "    importlib.import_module('rlhf.cli')\n")
    assert [h.split(" ")[1] for h in _server_imports(bad)] == ["rlhf.trainer", "rlhf", "rlhf.cli"]


@pytest.mark.parametrize("job_type", sorted(JOB_TYPES))
def test_every_example_is_a_valid_spec_of_its_type(job_type):
    example = example_spec(job_type)
    spec = parse_spec(example)
    assert type(spec) is JOB_TYPES[job_type] and spec.type == job_type
    assert spec.report_to == [] and spec.logging_dir is None
    example["type"] = "changed"  # a fresh copy every call
    assert example_spec(job_type)["type"] == job_type


@pytest.mark.parametrize("job_type", sorted(JOB_TYPES))
def test_every_schema_is_json_with_the_tracking_options(job_type):
    schema = job_schema(job_type)
    json.dumps(schema)  # plain JSON
    props = schema["properties"]
    assert props["type"]["default"] == job_type
    assert props["report_to"]["items"]["enum"] == ["tensorboard", "mlflow"]
    assert props["report_to"]["default"] == []
    assert "description" in props["report_to"] and "description" in props["logging_dir"]
    assert "model_name" in schema["required"]


def test_unknown_job_types_are_rejected_by_name():
    for fn in (job_schema, example_spec):
        with pytest.raises(JobRejected, match=r"unknown job type 'wandb'.*'dpo'"):
            fn("wandb")
    with pytest.raises(JobRejected, match="type: must be one of"):
        parse_spec({"type": "nope"})


def test_report_to_takes_tensorboard_and_mlflow_only():
    base = example_spec("dpo")
    spec = parse_spec({**base, "report_to": ["tensorboard", "mlflow"], "logging_dir": "/runs"})
    assert spec.report_to == ["tensorboard", "mlflow"] and spec.logging_dir == "/runs"
    with pytest.raises(JobRejected, match=r"report_to\.0: Input should be 'tensorboard' or "
                                          r"'mlflow'"):
        parse_spec({**base, "report_to": ["wandb"]})
    with pytest.raises(JobRejected, match="logging_dir"):
        parse_spec({**base, "logging_dir": ""})


def test_a_loop_passes_its_tracking_options_to_every_round():
    loop = parse_spec({**example_spec("iterate"), "job_id": "loop1",
                       "report_to": ["tensorboard"], "logging_dir": "/runs/loop1"})
    child = loop.child_spec(2, "v0003", "v0001")
    assert child.report_to == ["tensorboard"] and child.logging_dir == "/runs/loop1/loop1-r2-dpo"
    plain = parse_spec({**example_spec("iterate"), "job_id": "loop2"}).child_spec(1, "v1", "v1")
    assert plain.report_to == [] and plain.logging_dir is None
    with pytest.raises(JobRejected, match="train.report_to: set by the loop"):
        parse_spec({**example_spec("iterate"), "train": {"report_to": ["mlflow"]}})


def test_tasks_and_queues_cover_every_job_type_and_the_trainer_uses_them():
    from rlhf.trainer import celery_app, jobs

    assert set(TASK_FOR_JOB) == set(JOB_TYPES)
    assert set(QUEUE_FOR_TASK) == set(TASK_FOR_JOB.values())
    assert celery_app.TASK_FOR_JOB is TASK_FOR_JOB and celery_app.QUEUE_FOR_TASK is QUEUE_FOR_TASK
    assert celery_app.EXCHANGE.name == jobspecs.TRAIN_EXCHANGE
    # the trainer's names are the client's objects (one copy)
    for name in ("DPOJob", "PPOJob", "SFTJob", "LoopJob", "RewardModelJob", "parse_spec",
                 "JobRejected", "check_dpo_submit", "REFERENCE_FREE_LOSSES", "loop_stream"):
        assert getattr(jobs, name) is getattr(jobspecs, name), name


def test_the_data_readers_are_one_copy():
    import rlhf_client.datafiles as df

    from rlhf.models import loading
    from rlhf.trainer import data, ppo, sft

    assert data.read_jsonl is df.read_jsonl and data.DataError is df.DataError
    assert sft.read_sft_jsonl is df.read_sft_jsonl and sft.SFTExample is df.SFTExample
    assert ppo.SampleRecord is df.SampleRecord and ppo.read_samples_jsonl is df.read_samples_jsonl
    assert loading.check_safe_dir is df.check_safe_dir


# --- submit-time file checks (the base install runs them) -------------------------------------


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _safe_dir(d: Path) -> str:
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    return str(d)


def test_dpo_submit_checks_the_pairs_file_and_the_base_dir(tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "responses": ["x", "y", "z"], "ranks": [0, 1, 1]}])  # 1 + 2 pairs
    spec = {"type": "dpo", "model_name": "m", "source": {"type": "jsonl", "path": pairs},
            "base_dir": _safe_dir(tmp_path / "base")}
    check_dpo_submit(parse_spec({**spec, "min_pairs": 3}), None)
    with pytest.raises(JobRejected, match=r"source.path: .* holds 3 preference pairs; the job "
                                          r"needs at least 4"):
        check_dpo_submit(parse_spec({**spec, "min_pairs": 4}), None)
    with pytest.raises(JobRejected, match=r"source.path: .*nope.jsonl: no such file"):
        check_dpo_submit(parse_spec({**spec, "source": {"type": "jsonl",
                                                        "path": str(tmp_path / "nope.jsonl")}}),
                         None)
    unsafe = tmp_path / "unsafe"
    _safe_dir(unsafe)
    (unsafe / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(JobRejected, match=r"base_dir: .*pytorch_model.bin"):
        check_dpo_submit(parse_spec({**spec, "base_dir": str(unsafe)}), None)


def test_sft_and_ppo_submit_count_their_rows(tmp_path):
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    check_sft_submit(parse_spec({"type": "sft", "model_name": "m",
                                 "source": {"type": "jsonl", "path": sft}}), None)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(JobRejected, match=r"source.path: .*bad.jsonl:1: missing field"):
        check_sft_submit(parse_spec({"type": "sft", "model_name": "m",
                                     "source": {"type": "jsonl", "path": bad}}), None)
    row = {"id": "s1", "prompt_ids": [1, 2], "completion_ids": [3], "behaviour_logprobs": [-1.0],
           "reference_logprobs": [-1.1], "score": 0.5}
    samples = _jsonl(tmp_path / "samples.jsonl", [row])
    ppo = {"type": "ppo", "model_name": "m", "source": {"type": "jsonl", "path": samples}}
    check_ppo_submit(parse_spec(ppo), None)
    with pytest.raises(JobRejected, match="holds 1 scored samples; the job needs at least 2"):
        check_ppo_submit(parse_spec({**ppo, "min_samples": 2}), None)
    _jsonl(tmp_path / "samples.jsonl", [{**row, "reference_logprobs": []}])
    with pytest.raises(JobRejected, match="reference_logprobs has 0 values for 1"):
        check_ppo_submit(parse_spec(ppo), None)


def test_loop_submit_reads_its_prompt_files(tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}])
    spec = {**example_spec("iterate"), "prompts": {"path": prompts},
            "held_out": {"prompts": {"texts": ["x"]}}}
    check_loop_submit(parse_spec(spec), None)
    with pytest.raises(JobRejected, match="prompts_per_round: 3 > the 2 prompts"):
        check_loop_submit(parse_spec({**spec, "prompts_per_round": 3}), None)
    _jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(JobRejected, match=r"prompts.path: .*p.jsonl:2: id '1' repeats line 1"):
        check_loop_submit(parse_spec(spec), None)


def test_reward_model_submit_checks_its_pairs_file_but_not_its_stream(tmp_path):
    from rlhf_client.jobspecs import check_reward_model_submit

    spec = {**example_spec("reward_model"), "base_dir": _safe_dir(tmp_path / "base"),
            "source": {"type": "jsonl", "path": str(tmp_path / "none.jsonl")}}
    with pytest.raises(JobRejected, match=r"source.path: .*none.jsonl: no such file"):
        check_reward_model_submit(parse_spec(spec), None)
    _jsonl(tmp_path / "none.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(JobRejected, match="holds 1 preference pairs; the job needs at least 2"):
        check_reward_model_submit(parse_spec(spec), None)
    # a stream source is not looked at (no Redis here): its job may be queued ahead of its data
    check_reward_model_submit(parse_spec({**spec, "source": {"type": "stream"}}), None)
