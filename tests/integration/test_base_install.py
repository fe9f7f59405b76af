"""The base install (no extras) submits, follows, lists and cancels jobs: no torch, no Celery.

A real `pip install` of the checkout without extras into a fresh virtualenv (versions from
requirements/cpu.lock as constraints, packages from the indexes pip is configured with here),
which must lack torch, transformers, celery and kombu. From that virtualenv an application
submits a reward-model job (`TrainingClient.submit`: the spec validated by
`rlhf_client.jobspecs`, its files checked, its Celery message written by hand) and follows it;
a real worker from the project's own environment runs it to success; `rlhf jobs list` there
shows it; a second job is cancelled from there. Redis database 3.

Everything it makes stays under the test's tmp_path (the checkout is copied there to build,
pip keeps no cache). About a minute, most of it pip and the virtualenv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from rlhf_client import TrainingClient
from rlhf_client.redis_conn import connect
from trainer_helpers import (
    REPO,
    celery_keys,
    delete_matching,
    forget_job,
    forget_model,
    unique,
    worker_starter,
    write_jsonl,
)

from helpers import TEST_REDIS

URL = f"{TEST_REDIS}/3"
LOCK = REPO / "requirements" / "cpu.lock"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, env: dict[str, str], cwd, timeout: float = 600,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def base_venv(tmp_path):
    """A fresh virtualenv with the checkout installed without extras; (python, env)."""
    src = tmp_path / "src"  # the build writes build/ and *.egg-info beside the sources
    for name in ("clients", "services"):
        shutil.copytree(REPO / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "RLHF_"))}
    env["PIP_NO_CACHE_DIR"] = "1"
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([sys.executable, "-m", "venv", str(venv)], env=env, cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(LOCK)]
    # the build backend (setuptools, wheel) from the lock, then the checkout without extras
    _run([*pip, "setuptools", "wheel"], env=env, cwd=tmp_path)
    _run([*pip, "--no-build-isolation", str(src)], env=env, cwd=tmp_path)
    return venv / "bin" / "python", env


@pytest.fixture
def env(tmp_path, tiny_reward_dir):
    r = connect(URL, decode_responses=True)
    celery_keys(r)
    ctx = {"r": r, "model": unique("rm"), "stream": unique("test:base"), "workers": [],
           "store": tmp_path / "store", "base": str(tiny_reward_dir)}
    ctx["start"] = worker_starter(ctx["workers"], tmp_path, store=ctx["store"], redis_url=URL)
    yield ctx
    for w in ctx["workers"]:
        w.stop()
    tc = TrainingClient(URL, client=r)
    for job in tc.jobs(limit=1000):
        if job.spec.get("model_name") == ctx["model"]:
            forget_job(r, job.id)
    forget_model(r, ctx["model"])
    delete_matching(r, f"{ctx['stream']}*")
    celery_keys(r)
    r.close()


APP = r"""
import json, sys
from rlhf_client import JobCancelled, TrainingClient
from rlhf_client.history import read_metrics
from rlhf_client.jobspecs import JobRejected

url, spec_file, waiting_file = sys.argv[1:]
tc = TrainingClient(url)
spec = json.load(open(spec_file))
try:  # the submit-time checks run here: a missing pairs file is refused, nothing queued
    tc.submit({**spec, "source": {"type": "jsonl", "path": spec_file + ".missing"}})
    sys.exit("a missing pairs file was accepted")
except JobRejected as exc:
    print("rejected:", str(exc).splitlines()[-1].strip())
job_id = tc.submit(spec)
seen = []  # every polled record's status (a short job may train between two polls)
rec = tc.wait(job_id, timeout=300, poll_s=0.2, on_update=lambda r: seen.append(r.status))
steps = max(row["step"] for row in read_metrics(tc.r, job_id))  # the job's history
print("job:", job_id, rec.status, rec.version, rec.metrics["train_pairs"], steps)
print("followed:", seen[0] if seen else None, seen[-1] if seen else None)
other = tc.submit(json.load(open(waiting_file)))
tc.cancel(other)
try:
    tc.wait(other, timeout=60, poll_s=0.1)
except JobCancelled as exc:
    print("cancelled:", other, exc.record.status)
"""


def test_the_base_install_submits_follows_lists_and_cancels_jobs(base_venv, env, tmp_path):
    python, venv_env = base_venv
    missing = _run([str(python), "-c", "import importlib.util as u; print(sorted(m for m in "
                    "('torch', 'transformers', 'celery', 'kombu', 'rlhf_client', 'rlhf') "
                    "if u.find_spec(m)))"], env=venv_env, cwd=tmp_path).stdout.strip()
    assert missing == "['rlhf', 'rlhf_client']"  # the packages, none of the heavy ones
    for module in ("torch", "celery", "kombu"):
        proc = _run([str(python), "-c", f"import {module}"], env=venv_env, cwd=tmp_path,
                    check=False)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr

    env["start"]("base")  # a worker of the full install (the project's .venv)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"p{i}", "prompt": f"Say something about item {i}.",
         "chosen": f"item {i} is good and great", "rejected": f"item {i} is bad and awful"}
        for i in range(24)])
    spec = {"type": "reward_model", "model_name": env["model"], "base_dir": env["base"],
            "source": {"type": "jsonl", "path": str(pairs)}, "epochs": 1, "batch_size": 8,
            "max_length": 64, "learning_rate": 1e-3}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    waiting = {**spec, "source": {"type": "stream", "stream": env["stream"], "block_ms": 60_000}}
    waiting_file = tmp_path / "waiting.json"
    waiting_file.write_text(json.dumps(waiting))

    out = _run([str(python), "-c", APP, URL, str(spec_file), str(waiting_file)], env=venv_env,
               cwd=tmp_path, timeout=420).stdout
    assert re.search(r"rejected: source\.path: .*spec\.json\.missing: no such file", out), out
    job = re.search(r"job: (\w+) succeeded v0001 (\d+) (\d+)", out)
    assert job, out
    job_id, train_pairs, steps = job.group(1), int(job.group(2)), int(job.group(3))
    assert 0 < train_pairs < 24 and steps == -(-train_pairs // 8)  # the held-out share aside
    assert re.search(r"followed: (queued|running|succeeded) succeeded", out), out
    assert re.search(r"cancelled: \w+ cancelled", out), out

    listed = _run([str(python.parent / "rlhf"), "jobs", "list", "--redis-url", URL],
                  env=venv_env, cwd=tmp_path).stdout
    assert re.search(rf"{job_id}\s+reward_model\s+succeeded", listed), listed
    assert re.search(r"\s+reward_model\s+cancelled", listed), listed
