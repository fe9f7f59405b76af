"""A job's training history on real parts (Redis DB 6, a real `rlhf worker`, a tiny model):

- every progress call of a job is a row of its Redis stream (one per training step, plus the
  first and last rows), read back in order by `rlhf_client.history.read_metrics` (bytes or text
  clients, `count`, `since`), with the job record's TTL, and drawn by `plot_metrics`;
- `report_to`: TensorBoard event files and an MLflow run (file store) hold the same curves;
- the worker's `rlhf_train_metric` gauges carry the job and model labels; a process keeps the
  series of the most recent jobs only;
- the stream keeps the newest `job_metrics_maxlen` rows; rows wait in memory while Redis is
  away; a retried attempt continues the same stream and the same MLflow run; a reporter whose
  package is missing fails the job at start, naming the extra.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rlhf_client.history import metrics_key, numeric_metrics, plot_metrics, read_metrics
from rlhf_client.redis_conn import connect
from rlhf_client import TrainingClient
from trainer_helpers import (
    FAST_WORKER_ENV,
    Worker,
    celery_keys,
    forget_job,
    forget_model,
    names_fixture,
    unique,
    wait_for,
    write_jsonl,
)

from helpers import TEST_REDIS
from rlhf.trainer.data import synthetic_pairs

REDIS_URL = f"{TEST_REDIS}/6"
TRAIN = dict(learning_rate=1e-3, batch_size=4, max_length=64, epochs=2, eval_fraction=0.25)
PAIRS = 40  # 30 train pairs / batch 4 = 8 steps per epoch, 16 in all


def pairs_file(path):
    return write_jsonl(path, [{"id": p.source_id, "prompt": p.prompt, "chosen": p.chosen,
                               "rejected": p.rejected} for p in synthetic_pairs(PAIRS, seed=3)])


def mlflow_env(root) -> dict[str, str]:
    # MLflow 3 keeps its file store only behind this opt-in (its database stores need SQLAlchemy,
    # which the mlflow-skinny extra leaves out).
    return {"MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_EXPERIMENT_NAME": "rlhf-test"}


def mlflow_run(env: dict[str, str], job_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`rlhf.job_id` = '{job_id}'")
    return client, run


def history(rows, metric: str) -> list[tuple[int, float]]:
    return [(row["step"], numeric_metrics(row)[metric]) for row in rows if metric in numeric_metrics(row)]


# ---------------------------------------------------------------------------------------------
# One job on a real worker, every report_to on
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_reward_dir, monkeypatch_module):
    """A reward-model job with report_to tensorboard + mlflow, run by a real worker: its id,
    record, history, the worker (still running: its /metrics) and the paths it wrote."""
    tmp = tmp_path_factory.mktemp("history")
    r = connect(REDIS_URL, decode_responses=True)
    celery_keys(r)
    ml = mlflow_env(tmp)
    monkeypatch_module.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the test reads the same store
    model = unique("hist-rm")
    worker = Worker(tmp / "w.log", redis_url=REDIS_URL, store=tmp / "store", name="hist@test",
                    env={**FAST_WORKER_ENV, "RLHF_JOB_TMP_DIR": str(tmp / "jobs-tmp"), **ml})
    tc = TrainingClient(REDIS_URL)
    job_id = None
    try:
        worker.wait_ready()
        logdir = tmp / "tb"
        job_id = tc.submit_reward_model(
            model_name=model, base_dir=str(tiny_reward_dir), **TRAIN,
            source={"type": "jsonl", "path": str(pairs_file(tmp / "pairs.jsonl"))},
            report_to=["tensorboard", "mlflow"], logging_dir=str(logdir))
        rec = tc.wait(job_id, timeout=180, poll_s=0.1)
        yield {"id": job_id, "rec": rec, "rows": read_metrics(r, job_id), "r": r, "worker": worker,
               "logdir": logdir, "ml": ml, "tmp": tmp, "model": model}
    finally:
        worker.stop()
        if job_id is not None:
            forget_job(r, job_id)
        forget_model(r, model)
        celery_keys(r)
        tc.close()
        r.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_step_of_the_job_is_a_row_of_its_history(done):
    rec, rows = done["rec"], done["rows"]
    assert rec.status == "succeeded", rec.error
    steps = rec.metrics["steps"]
    assert steps == 16
    training = [row for row in rows if row.get("stage") == "training"]
    assert [row["step"] for row in training] == list(range(1, steps + 1))  # none throttled away
    assert all(row["steps"] == steps and isinstance(row["train_loss"], float) for row in training)
    # first row: what the job read (step 0); last row: the final metrics (at the last step)
    assert (rows[0]["step"], rows[0]["train_pairs"], rows[0]["eval_pairs"]) == (0, 30, 10)
    assert rows[-1]["step"] == steps and rows[-1]["eval_accuracy"] == rec.metrics["eval_accuracy"]
    assert rows[-1]["activated"] is False and len(rows) == steps + 2
    assert all(row["attempt"] == 1 for row in rows)
    times = [row["time"] for row in rows]
    assert times == sorted(times) and rec.created <= times[0] <= times[-1] <= rec.finished
    assert [row["train_loss"] for row in training][-1] == rec.metrics["train_loss"]


def test_read_metrics_orders_counts_and_filters_with_either_client(done):
    rows, job_id = done["rows"], done["id"]
    raw = connect(REDIS_URL)  # bytes replies
    try:
        assert read_metrics(raw, job_id) == rows
        assert read_metrics(raw, job_id, count=3) == rows[-3:]
    finally:
        raw.close()
    r = done["r"]
    assert read_metrics(r, job_id, count=0) == []
    middle = rows[len(rows) // 2]["time"]
    assert read_metrics(r, job_id, since=middle) == [row for row in rows if row["time"] > middle]
    assert read_metrics(r, job_id, since=middle, count=2) == \
        [row for row in rows if row["time"] > middle][-2:]
    assert read_metrics(r, unique("no-such-job")) == []


def test_the_history_expires_like_the_record(done):
    from rlhf.config import Settings

    ttl_s = Settings(redis_url=REDIS_URL).job_record_ttl_s
    ttl = done["r"].ttl(metrics_key(done["id"]))
    record_ttl = done["r"].ttl(f"rlhf:job:{done['id']}")
    assert ttl_s - 120 < ttl <= ttl_s and abs(ttl - record_ttl) <= 5


def test_plot_metrics_draws_a_panel_per_metric(done, tmp_path):
    png = plot_metrics(done["rows"], tmp_path / "curves" / "job.png", title=done["id"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    one = plot_metrics(done["rows"], tmp_path / "loss.png", keys=["train_loss"])
    assert one.stat().st_size < png.stat().st_size  # one panel, not every metric
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_metrics([], tmp_path / "none.png")


def test_tensorboard_holds_the_same_curves(done):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(done["logdir"]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "train_accuracy", "grad_norm", "eval_accuracy"} <= tags
    for tag in ("train_loss", "train_accuracy", "eval_accuracy"):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = history(done["rows"], tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag


def test_the_reporters_ran_without_an_error(done):
    assert "report_to" not in done["worker"].log()  # any reporter error is logged naming it


def test_mlflow_holds_the_run_its_params_and_curves(done):
    client, run = mlflow_run(done["ml"], done["id"])
    assert (run.info.run_name, run.info.status) == (done["id"], "FINISHED")
    assert run.data.tags["rlhf.model"] == done["model"] and run.data.tags["rlhf.attempt"] == "1"
    params = run.data.params
    assert (params["model_name"], params["source.type"], params["epochs"]) == (done["model"], "jsonl", "2")
    assert json.loads(params["report_to"]) == ["tensorboard", "mlflow"]
    for key in ("train_loss", "eval_accuracy"):
        got = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key))
        want = [(row["step"], int(row["time"] * 1000), numeric_metrics(row)[key])
                for row in done["rows"] if key in numeric_metrics(row)]
        assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in sorted(want)], key
        assert [v for *_, v in got] == pytest.approx([v for *_, v in sorted(want)]), key


def test_the_workers_gauges_carry_the_job_and_its_model(done):
    url = f"http://127.0.0.1:{done['worker'].metrics_port()}/metrics"

    def series():
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {s.labels["metric"]: s for f in text_string_to_metric_families(text)
                if f.name == "rlhf_train_metric" for s in f.samples
                if s.labels.get("job_id") == done["id"]}

    got = wait_for(lambda: "eval_accuracy" in (s := series()) and s, timeout=30,
                   what="the job's gauges on the worker's /metrics")
    sample = got["train_loss"]
    assert sample.labels == {"job_type": "reward_model", "job_id": done["id"],
                             "model": done["model"], "metric": "train_loss"}
    assert sample.value == pytest.approx(done["rec"].metrics["train_loss"])
    assert got["eval_accuracy"].value == pytest.approx(done["rec"].metrics["eval_accuracy"])


# ---------------------------------------------------------------------------------------------
# In-process: the bound, Redis away, retried attempts, a missing reporter, gauge cardinality
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def r():
    client = connect(REDIS_URL, decode_responses=True)
    yield client
    client.close()


names = names_fixture("hist-rm", "test:hist")  # unique model name; its keys and jobs' deleted


def settings_for(tmp_path, **kw):
    from rlhf.config import Settings

    return Settings(redis_url=REDIS_URL, store_dir=tmp_path / "store", metrics_port=None,
                    torch_threads=1, job_tmp_dir=tmp_path / "jobs-tmp", **kw)


def test_the_stream_keeps_the_newest_maxlen_rows_and_the_pipeline_sets_labelled_gauges(
        r, names, tmp_path, tiny_reward_dir):
    from prometheus_client import REGISTRY, generate_latest

    from rlhf.trainer.jobs import execute, parse_spec
    from rlhf.trainer.reward_model import run_reward_model_job

    model = names["model"]
    job = parse_spec({"type": "reward_model", "model_name": model, "base_dir": str(tiny_reward_dir),
                      **TRAIN, "source": {"type": "jsonl", "path": str(pairs_file(tmp_path / "p.jsonl"))}})
    names["jobs"].append(job.job_id)
    out = execute(job, run_reward_model_job, settings=settings_for(tmp_path, job_metrics_maxlen=5),
                  worker="test")
    assert out.status == "succeeded", out
    rows = read_metrics(r, job.job_id)
    assert len(rows) == 5 and r.xlen(metrics_key(job.job_id)) == 5
    assert [row["step"] for row in rows] == [13, 14, 15, 16, 16]  # the newest: last steps, final
    assert "eval_accuracy" in rows[-1]

    text = generate_latest(REGISTRY).decode()
    mine = {s.labels["metric"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "rlhf_train_metric" for s in f.samples if s.labels["job_id"] == job.job_id}
    assert {"train_loss", "train_accuracy", "eval_accuracy", "eval_loss"} <= set(mine)
    assert mine["train_loss"] == pytest.approx(rows[-2]["train_loss"])
    assert f'model="{model}"' in text and 'job_type="reward_model"' in text


def test_rows_wait_in_memory_while_redis_is_away_newest_kept(r, names, tmp_path):
    from rlhf.trainer.jobs import REDIS_ERRORS
    from rlhf.trainer.tracking import JobTracker

    job_id = unique("hist-away")
    names["jobs"].append(job_id)
    away = connect("redis://127.0.0.1:1/0")  # nothing listens there
    tracker = JobTracker(settings_for(tmp_path, job_metrics_maxlen=5), away, job_id, attempt=2)
    for step in range(1, 9):
        tracker.record({"step": step, "loss": 1.0 / step, "stage": "training", "skip": [1, 2]})
        if step in (3, 8):
            with pytest.raises(REDIS_ERRORS):
                tracker.flush()
    assert tracker.buffered == 5  # the newest job_metrics_maxlen
    tracker.r = r  # Redis is back
    assert tracker.flush() == 5 and tracker.buffered == 0
    rows = read_metrics(r, job_id)
    assert [(row["step"], row["attempt"], row["loss"]) for row in rows] == \
        [(s, 2, 1.0 / s) for s in range(4, 9)]
    assert all("skip" not in row and row["stage"] == "training" for row in rows)
    away.close()


def test_a_retried_attempt_continues_the_stream_the_mlflow_run_and_the_default_tensorboard_dir(
        r, names, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf.trainer.jobs import JobResult, JobStore, TransientError, execute, parse_spec

    ml = mlflow_env(tmp_path)
    for k, v in ml.items():
        monkeypatch.setenv(k, v)
    job = parse_spec({"type": "reward_model", "model_name": names["model"],
                      "report_to": ["mlflow", "tensorboard"],  # no logging_dir: the default
                      "source": {"type": "jsonl", "path": "unused"}})
    names["jobs"].append(job.job_id)
    settings = settings_for(tmp_path, job_max_retries=1)

    def work(spec, ctx):
        for step in range(1, 4):
            ctx.progress(step / 3, {"step": step, "loss": ctx.attempt + step / 10})
        if ctx.attempt == 1:
            raise TransientError("flaky storage")
        return JobResult(None, {"done": 1})

    first = execute(job, work, settings=settings, worker="test")
    assert first.status == "retry", first
    client, run = mlflow_run(ml, job.job_id)
    assert run.info.status == "FAILED"  # until the retry resumes it
    second = execute(job, work, settings=settings, worker="test")
    assert second.status == "succeeded", second
    assert JobStore(r).get(job.job_id).attempts == 2
    rows = read_metrics(r, job.job_id)
    assert [(row["attempt"], row["step"]) for row in rows] == \
        [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    client, run = mlflow_run(ml, job.job_id)  # one run for the job, both attempts in it
    assert (run.info.status, run.data.tags["rlhf.attempt"]) == ("FINISHED", "2")
    got = sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for _, s, _ in got] == [row["step"] for row in rows]
    assert [v for *_, v in got] == pytest.approx([row["loss"] for row in rows])

    logdir = tmp_path / "store" / ".runs" / job.job_id  # <store_dir>/.runs/<job id>
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per attempt
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted((e.wall_time, e.step, e.value) for e in acc.Scalars("loss"))
    assert [step for _, step, _ in events] == [row["step"] for row in rows]
    assert [t for t, *_ in events] == pytest.approx([row["time"] for row in rows], abs=1e-3)
    assert [v for *_, v in events] == pytest.approx([row["loss"] for row in rows], rel=1e-6)


def test_a_reporter_this_worker_lacks_fails_the_job_at_start_naming_the_extra(r, names, tmp_path,
                                                                             monkeypatch):
    from rlhf.trainer import tracking
    from rlhf.trainer.jobs import JobStore, execute, parse_spec

    monkeypatch.setitem(tracking.REPORTERS, "mlflow", ("rlhf_test_no_such_package", "mlflow"))
    job = parse_spec({"type": "reward_model", "model_name": names["model"],
                      "report_to": ["tensorboard", "mlflow"], "source": {"type": "jsonl", "path": "x"}})
    names["jobs"].append(job.job_id)
    ran = []
    out = execute(job, lambda spec, ctx: ran.append(1), settings=settings_for(tmp_path), worker="test")
    assert out.status == "failed" and not ran
    rec = JobStore(r).get(job.job_id)
    assert rec.status == "failed"
    assert "report_to 'mlflow'" in rec.error and "pip install 'rlhf[mlflow]'" in rec.error


def test_a_process_keeps_the_gauges_of_its_most_recent_jobs_only():
    from prometheus_client import REGISTRY, generate_latest

    from rlhf.serving.metrics import TRAIN_METRIC_JOBS, keep_train_jobs, set_train_metrics

    def exported() -> set[str]:
        text = generate_latest(REGISTRY).decode()
        return {s.labels["job_id"] for f in text_string_to_metric_families(text)
                if f.name == "rlhf_train_metric" for s in f.samples}

    ids = [unique("gauge-job") for _ in range(TRAIN_METRIC_JOBS + 3)]
    for i, job_id in enumerate(ids):
        set_train_metrics("dpo", job_id, "m", {"train_loss": 1.0 / (i + 1), "steps": 4,
                                               "activated": True, "stage": "training"})
    mine = exported() & set(ids)
    assert mine == set(ids[3:])  # the oldest three jobs' series were removed
    set_train_metrics("dpo", ids[3], "m", {"train_loss": 0.5})  # updated: now the newest
    set_train_metrics("dpo", unique("gauge-job"), "m", {"train_loss": 0.1})
    assert ids[3] in exported() and ids[4] not in exported()
    keep_train_jobs(ids[5:7])
    assert exported() == set(ids[5:7])
    keep_train_jobs([])
    assert exported() == set()


def test_the_default_plot_draws_curves_not_counts():
    from rlhf_client.history import curve_names

    rows = [{"step": 0, "time": 0.0, "pairs": 64, "train_pairs": 58},
            *({"step": s, "time": float(s), "train_loss": 1.0 / s, "steps": 30, "lr": 1e-4}
              for s in range(1, 5)),
            {"step": 4, "time": 5.0, "train_pairs": 58, "eval_loss": 0.3}]
    assert curve_names(rows) == ["train_loss"]  # one value per step, and it changes
    assert curve_names(rows[:1]) == ["pairs", "train_pairs"]  # no curve at all: every metric
