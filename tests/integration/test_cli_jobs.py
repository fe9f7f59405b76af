"""`rlhf jobs ...` as a person runs it: real processes (`python -m rlhf`), real Redis (DB 4),
a real `rlhf worker` where a job must run, the tiny models of conftest.py.

- `jobs submit FILE.yaml --set ...` (YAML or JSON, dotted overrides read as YAML); `--wait` draws
  a progress bar (step/steps, loss, ETA) on stderr and ends with the job's metrics; a failed job
  ends with its error on one line;
- `jobs schema [TYPE]`: every type's fields and an example that validates;
- `jobs cancel`, `jobs metrics` (table, --json, --tail, --plot);
- every known failure is one line on stderr and a non-zero exit; `--debug` adds the traceback;
- on an install without the extras (their modules hidden) the client commands work, `--help`
  lists every command and a server command names the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rlhf_client.redis_conn import connect
from trainer_helpers import FAST_WORKER_ENV, REPO, Worker, unique, write_jsonl

from helpers import TEST_REDIS

from rlhf.procs import free_port

URL = f"{TEST_REDIS}/4"
NOISE = ("Traceback", "Event loop is closed", "never awaited")
#: Modules of the serve / train extras (and their optional neighbours): hidden from a
#: "base install" process by `_BASE_PRELUDE`.
EXTRA_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "grpc_health",
                 "grpc_reflection", "prometheus_client", "pydantic_settings", "rich", "aiohttp",
                 "jinja2", "matplotlib", "celery", "kombu", "billiard", "tensorboard", "mlflow",
                 "opentelemetry", "vllm")
_BASE_PRELUDE = ("import sys\n"
                 f"for m in {EXTRA_MODULES!r}: sys.modules[m] = None  # not installed\n"
                 "from rlhf.cli import main\n"
                 "sys.exit(main(sys.argv[1:]))\n")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update(extra)
    return env


def rlhf(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
         base: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    """`rlhf ARGS` in a fresh process (`base`: with the extras' modules hidden); its output as
    text, carriage returns kept (a progress bar redraws its line with them)."""
    cmd = [sys.executable, "-c", _BASE_PRELUDE] if base else [sys.executable, "-m", "rlhf"]
    out = subprocess.run([*cmd, *args], env=env or _env(), capture_output=True, timeout=timeout,
                         input=None if stdin is None else stdin.encode(), cwd=REPO)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(),
                                       out.stderr.decode())


def shown(text: str) -> list[str]:
    """The lines a terminal shows of `text`: a carriage return (a progress bar redrawn, or
    cleared) overwrites the line."""
    return [ln.split("\r")[-1] for ln in text.split("\n") if ln.split("\r")[-1].strip()]


def last_line(text: str) -> str:
    return shown(text)[-1]


def assert_one_line(r: subprocess.CompletedProcess, expected: str, *, code: int) -> None:
    """Exit `code`, stderr (as a terminal shows it) exactly one line `expected` (a regex when it
    starts with ^)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = shown(r.stderr)
    assert len(lines) == 1, r.stderr
    if expected.startswith("^"):
        assert re.match(expected, lines[0]), lines[0]
    else:
        assert lines[0] == expected
    for noise in NOISE:
        assert noise not in r.stderr


@pytest.fixture
def r():
    client = connect(URL, decode_responses=True)
    client.flushdb()  # DB 4 is this suite's own
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def worker(r, tmp_path):
    w = Worker(tmp_path / "worker.log", redis_url=URL, store=tmp_path / "store", name="cli@test",
               env={**FAST_WORKER_ENV, "RLHF_JOB_TMP_DIR": str(tmp_path / "jobs-tmp")})
    try:
        yield w.wait_ready()
    finally:
        w.stop()


def pairs_file(path: Path, n: int = 40) -> Path:
    from rlhf.trainer.data import synthetic_pairs

    pairs = synthetic_pairs(n, seed=3, prefix=unique("p"))
    return write_jsonl(path, [{"id": p.source_id, "prompt": p.prompt, "chosen": p.chosen,
                               "rejected": p.rejected} for p in pairs])


SPEC_YAML = """\
# a reward model trained on pairs from a file (the path comes with --set)
type: reward_model
model_name: {model}
base_dir: {base}
source:
  type: jsonl
  path: /set/on/the/command/line
batch_size: 8
max_length: 64
learning_rate: 1.0e-3
"""


# ------------------------------------------------------------------------------------------------
# submit, wait, metrics
# ------------------------------------------------------------------------------------------------


def test_submit_yaml_with_set_waits_with_a_bar_and_ends_with_the_metrics(r, worker, tmp_path,
                                                                          tiny_reward_dir,
                                                                          tiny_policy_dir):
    from rlhf_client import TrainingClient
    from rlhf_client.history import read_metrics

    model = unique("rm")
    spec = tmp_path / "rm.yaml"
    spec.write_text(SPEC_YAML.format(model=model, base=tiny_reward_dir))
    data = pairs_file(tmp_path / "pairs.jsonl")
    out = rlhf("jobs", "submit", str(spec), "--set", f"source.path={data}", "--set", "epochs=2",
               "--set", "activate=true", "--wait", "--timeout", "180", "--redis-url", URL)
    assert out.returncode == 0, out.stderr
    job_id, status_line, *metric_lines = out.stdout.splitlines()
    rec = TrainingClient(URL).status(job_id)
    assert rec.spec["epochs"] == 2 and rec.spec["activate"] is True  # --set values, as YAML
    assert rec.spec["source"] == {"type": "jsonl", "path": str(data)}
    assert status_line == "succeeded v0001"
    # 40 pairs, 10% held out, 8 per batch: 5 steps an epoch, 2 epochs: the bar ends at 10/10.
    steps = rec.metrics.get("steps", 10)
    # (the ETA is "?" when the job trained between two polls: a quiet machine, a tiny job)
    assert re.search(rf"\b{steps}/{steps} \[\d\d:\d\d<(\d\d:\d\d|\?)", out.stderr), out.stderr
    last_train = [row for row in read_metrics(r, job_id)
                  if "train_loss" in row and "steps" in row][-1]
    assert f"train_loss={last_train['train_loss']:.4g}]" in last_line(out.stderr), out.stderr
    shown = dict(line.split(None, 1) for line in metric_lines)
    assert float(shown["eval_accuracy"]) == pytest.approx(rec.metrics["eval_accuracy"], abs=1e-6)
    assert shown["activated"] == "True"

    # The job's history: a table, JSON rows, the last N, a plot.
    table = rlhf("jobs", "metrics", job_id, "--redis-url", URL)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["step", "time"] and "train_loss" in header.split()
    assert len(rows) >= steps
    got = rlhf("jobs", "metrics", job_id, "--json", "--tail", "3", "--redis-url", URL)
    tail = json.loads(got.stdout)
    assert len(tail) == 3 and tail[-1]["step"] == steps
    png = tmp_path / "curves.png"
    plotted = rlhf("jobs", "metrics", job_id, "--plot", str(png), "--keys", "train_loss,grad_norm",
                   "--redis-url", URL)
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unknown = rlhf("jobs", "metrics", job_id, "--keys", "nope", "--redis-url", URL)
    assert_one_line(unknown, rf"^rlhf jobs metrics: --keys: job {job_id} has no metric 'nope' "
                    r"\(it has: .*loss", code=2)
    # Without matplotlib (the base install): one line naming the extra.
    bare = rlhf("jobs", "metrics", job_id, "--plot", str(tmp_path / "x.png"), "--redis-url", URL,
                base=True)
    assert_one_line(bare, "rlhf jobs metrics: --plot needs matplotlib (pip install "
                    "'rlhf[serve]')", code=1)

    # The same spec as JSON on stdin; a job that fails ends --wait with its error on one line
    # (a policy checkpoint is no reward model).
    as_json = json.dumps({**yaml.safe_load(spec.read_text()), "base_dir": str(tiny_policy_dir),
                          "source": {"type": "jsonl", "path": str(data)}})
    failed = rlhf("jobs", "submit", "-", "--wait", "--timeout", "180", "--redis-url", URL,
                  stdin=as_json)
    failed_id = failed.stdout.splitlines()[0]
    assert_one_line(failed, rf"^rlhf jobs submit: job {failed_id} failed: .*num_labels", code=1)
    assert TrainingClient(URL).status(failed_id).status == "failed"


def test_cancel_a_queued_job(r, tmp_path, tiny_reward_dir):
    """No worker runs here: the job stays queued until cancelled, and is never run."""
    spec = {"type": "reward_model", "model_name": unique("rm"), "base_dir": str(tiny_reward_dir),
            "source": {"type": "jsonl", "path": str(pairs_file(tmp_path / "p.jsonl"))}}
    (tmp_path / "rm.json").write_text(json.dumps(spec))
    job_id = rlhf("jobs", "submit", str(tmp_path / "rm.json"), "--redis-url", URL).stdout.strip()
    assert r.hget(f"rlhf:job:{job_id}", "status") == "queued"
    out = rlhf("jobs", "cancel", job_id, "--redis-url", URL)
    assert out.returncode == 0 and out.stdout.strip() == f"{job_id} cancelled", out.stderr
    shown = rlhf("jobs", "show", job_id, "--redis-url", URL)
    assert json.loads(shown.stdout)["status"] == "cancelled"
    listed = rlhf("jobs", "list", "--status", "cancelled", "--redis-url", URL)
    assert re.search(rf"^{job_id}\s+reward_model\s+cancelled", listed.stdout, re.M)
    again = rlhf("jobs", "cancel", job_id, "--redis-url", URL)
    assert_one_line(again, f"rlhf jobs cancel: job {job_id} already cancelled: nothing to cancel",
                    code=1)


# ------------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------------


def test_schema_of_every_type_lists_its_fields_and_an_example_that_validates():
    from rlhf_client.jobspecs import JOB_TYPES, job_schema, parse_spec

    out = rlhf("jobs", "schema")
    assert out.returncode == 0, out.stderr
    sections = re.split(r"\n\n(?=\w+: )", out.stdout.strip())
    assert [s.split(":", 1)[0] for s in sections] == list(JOB_TYPES)
    for job_type, text in zip(JOB_TYPES, sections):
        fields = {line.split()[0] for line in text.splitlines() if line.startswith("  ")
                  and not line.startswith("      ") and line.strip()}
        assert set(job_schema(job_type)["properties"]) <= fields, (job_type, fields)
        example = text.split(f"example ({job_type}.yaml):\n", 1)[1]
        spec = yaml.safe_load("\n".join(line[2:] for line in example.splitlines()))
        assert parse_spec(spec).type == job_type
    one = rlhf("jobs", "schema", "dpo", "--json")
    data = json.loads(one.stdout)
    assert list(data) == ["dpo"] and data["dpo"]["schema"]["properties"]["beta"]["default"] == 0.1
    # dotted fields of nested specs and the variants of a tagged union
    text = rlhf("jobs", "schema", "dpo").stdout
    assert re.search(r"^  reference\.timeout_s\s+float\s+60\.0\s+> 0$", text, re.M)
    assert re.search(r"^  source\.path \[type=jsonl\]\s+str\s+\(required\)", text, re.M)
    unknown = rlhf("jobs", "schema", "nope")
    assert_one_line(unknown, "rlhf jobs schema: unknown job type 'nope'; the types are: "
                    + ", ".join(JOB_TYPES), code=2)


# ------------------------------------------------------------------------------------------------
# known failures: one line, non-zero; --debug: the traceback too
# ------------------------------------------------------------------------------------------------


def test_redis_unreachable_and_urls_without_a_scheme():
    port = free_port()
    down = f"redis://127.0.0.1:{port}/0"
    why = (f"Redis at {down} is unreachable (Error 111 connecting to 127.0.0.1:{port}. "
           "Connection refused.) (set --redis-url / RLHF_REDIS_URL)")
    assert_one_line(rlhf("jobs", "list", "--redis-url", down), f"rlhf jobs list: {why}", code=1)
    assert_one_line(rlhf("models", "list", env=_env(RLHF_REDIS_URL=down)),
                    f"rlhf models list: {why}", code=1)
    secret = rlhf("jobs", "show", "x", "--redis-url", f"redis://:secret@127.0.0.1:{port}/0")
    assert_one_line(secret, rf"^rlhf jobs show: Redis at redis://\*\*\*@127\.0\.0\.1:{port}/0 "
                    "is unreachable", code=1)  # the password never printed
    scheme = ("Redis URL 'localhost:6379' has no scheme: write redis://localhost:6379/0 "
              "(set --redis-url / RLHF_REDIS_URL)")
    assert_one_line(rlhf("jobs", "list", "--redis-url", "localhost:6379"),
                    f"rlhf jobs list: {scheme}", code=2)
    assert_one_line(rlhf("models", "show", "m", env=_env(RLHF_REDIS_URL="localhost:6379")),
                    f"rlhf models show: {scheme}", code=2)
    # server-side commands: the same lines
    assert_one_line(rlhf("jobs", "reap", "--redis-url", "localhost:6379"),
                    f"rlhf jobs reap: {scheme}", code=2)
    assert_one_line(rlhf("jobs", "reap", "--redis-url", down), f"rlhf jobs reap: failed: {why}",
                    code=1)
    debug = rlhf("jobs", "list", "--redis-url", down, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "redis.exceptions.ConnectionError" in debug.stderr
    assert last_line(debug.stderr) == f"rlhf jobs list: {why}"


def test_unknown_jobs_models_and_versions(r):
    from rlhf_client.registry import Registry

    for cmd in ("show", "cancel", "metrics"):
        assert_one_line(rlhf("jobs", cmd, "no-such-job", "--redis-url", URL),
                        f"rlhf jobs {cmd}: no job 'no-such-job'", code=1)
    assert_one_line(rlhf("models", "show", "nope", "--redis-url", URL),
                    "rlhf models show: model 'nope' has no registered versions", code=1)
    Registry(r).register("m", "v0001")
    assert_one_line(rlhf("models", "activate", "m", "v0009", "--redis-url", URL),
                    "rlhf models activate: model 'm' has no registered version 'v0009'", code=1)
    assert_one_line(rlhf("models", "rollback", "m", "--redis-url", URL),
                    "rlhf models rollback: model 'm' has no earlier active version to roll back to",
                    code=1)
    debug = rlhf("models", "activate", "m", "v0009", "--redis-url", URL, "--debug")
    assert "Traceback" in debug.stderr and "RegistryError" in debug.stderr


def test_bad_specs_files_and_overrides(r, tmp_path, tiny_reward_dir):
    spec = tmp_path / "rm.yaml"
    spec.write_text(SPEC_YAML.format(model=unique("rm"), base=tiny_reward_dir))

    def submit(*args, stdin=None):
        return rlhf("jobs", "submit", *args, "--redis-url", URL, stdin=stdin)

    assert_one_line(submit(str(spec), "--set", "epochs=-1", "--set", "batch_size=big"),
                    "rlhf jobs submit: reward_model job spec rejected: epochs: Input should be "
                    "greater than or equal to 1; batch_size: Input should be a valid integer, "
                    "unable to parse string as an integer", code=2)
    missing = tmp_path / "nope.yaml"
    assert_one_line(submit(str(missing)), f"rlhf jobs submit: cannot read the spec file {missing}: "
                    "No such file or directory", code=2)
    assert_one_line(submit(str(tmp_path)), f"rlhf jobs submit: cannot read the spec file "
                    f"{tmp_path}: Is a directory", code=2)
    assert_one_line(submit("-", stdin="type: dpo\n  model_name: [x\n"),
                    "^rlhf jobs submit: <stdin>: not YAML or JSON \\(line \\d+, column \\d+\\): ",
                    code=2)
    assert_one_line(submit("-", stdin=""), "rlhf jobs submit: <stdin> is empty: a job spec is a "
                    "mapping with a \"type\" (see rlhf jobs schema)", code=2)
    assert_one_line(submit("-", stdin="[1, 2]"), "rlhf jobs submit: <stdin>: a job spec is a "
                    "mapping with a \"type\", not a list", code=2)
    for bad, why in (("epochs.x=1", "epochs.x=1': epochs is 1, not a mapping"),
                     ("=3", "=3': expected KEY=VALUE (KEY dotted, e.g. source.stream=prefs)"),
                     ("source..path=x", "source..path=x': 'source..path' has an empty name in "
                      "its path"),
                     ("epochs", "epochs': expected KEY=VALUE (KEY dotted, e.g. "
                      "source.stream=prefs)")):
        assert_one_line(submit(str(spec), "--set", "epochs=1", "--set", bad),
                        f"rlhf jobs submit: --set '{why}", code=2)
    assert r.dbsize() == 0  # nothing recorded, nothing queued


def test_port_in_use_is_one_line_for_servers_and_workers(tiny_policy_dir):
    """Every server command binds through check_bindable: a port in use is one line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = rlhf("rollout", "--policy", "x:1", "--reward", "x:1", "--reference", "x:1",
                   "--prompt", "hi", "--metrics-port", str(port), "--redis-url", URL)
        assert out.returncode == 1 and "Traceback" not in out.stderr  # (after its settings log)
        assert last_line(out.stderr) == (f"rlhf rollout: cannot start: metrics: port {port} is "
                                         "in use (set --metrics-port / RLHF_METRICS_PORT)")
        out = rlhf("serve", "labels", "--policy", "127.0.0.1:1", "--prompt", "hi", "--port",
                   str(port), "--redis-url", URL)
        assert out.returncode != 0
        assert re.match(rf"^rlhf serve labels: .*port {port} is in use", last_line(out.stderr))
        assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------
# the base install: no torch, no celery
# ------------------------------------------------------------------------------------------------


def test_on_the_base_install_client_commands_run_and_server_ones_name_their_extra(r, tmp_path):
    from rlhf_client.registry import Registry

    Registry(r).register("m", "v0001")
    helped = rlhf("--help", base=True)
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "worker", "jobs", "models", "loop", "labels", "backtracking", "demo",
                    "rollout", "tiny-model"):
        assert re.search(rf"^    {command}\b", helped.stdout, re.M), command
    listed = rlhf("models", "list", "--redis-url", URL, base=True)
    assert listed.returncode == 0 and listed.stdout.startswith("m "), listed.stderr
    assert rlhf("jobs", "list", "--redis-url", URL, base=True).stdout.strip() == "(no jobs)"
    assert "example (ppo.yaml):" in rlhf("jobs", "schema", "ppo", base=True).stdout
    jobs_help = rlhf("jobs", "--help", base=True).stdout
    assert all(leaf in jobs_help for leaf in ("submit", "schema", "cancel", "metrics", "reap"))
    for args, line in (
            (["serve", "policy", "--model", "x"], "rlhf serve policy: needs the serve extra (torch "
             "is not installed): pip install 'rlhf[serve]'"),
            (["worker"], "rlhf worker: needs the train extra (torch is not installed): pip install "
             "'rlhf[train]'"),
            (["jobs", "reap"], "rlhf jobs reap: needs the train extra (torch is not installed): "
             "pip install 'rlhf[train]'"),
            (["models", "import", str(tmp_path), "--name", "m"], "rlhf models import: needs the "
             "serve extra (torch is not installed): pip install 'rlhf[serve]'")):
        assert_one_line(rlhf(*args, base=True), line, code=1)
