"""The worker's housekeeping, without a worker: the heartbeat `rlhf worker-probe` reads, and the
per-attempt temp dirs that a dead attempt leaves behind (removed by whoever comes next)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rlhf.config import Settings
from rlhf.trainer import health
from rlhf.trainer.health import Heartbeat, check
from rlhf.trainer.workdirs import LOCK_NAME, attempt_dir, clean_stale


def write_beat(path, **fields):
    path.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), "ready": True,
                                "loop": time.time(), **fields}))


def test_the_probe_reads_liveness_and_readiness_from_the_heartbeat(tmp_path):
    beat = tmp_path / "hb.json"
    assert "has not started" in check(beat, interval_s=10, ready=False)
    write_beat(beat)
    assert check(beat, interval_s=10, ready=False) is None
    assert check(beat, interval_s=10, ready=True) is None
    write_beat(beat, time=time.time() - 31)  # 3 intervals: stale
    assert "stale after 30s" in check(beat, interval_s=10, ready=False)
    write_beat(beat, ready=False)  # reconnecting to the broker, or shutting down: live, not ready
    assert check(beat, interval_s=10, ready=False) is None
    assert "not consuming" in check(beat, interval_s=10, ready=True)
    write_beat(beat, loop=time.time() - 60)  # Celery's event loop stopped turning
    assert check(beat, interval_s=10, ready=False) is None
    assert "event loop" in check(beat, interval_s=10, ready=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    write_beat(beat, pid=int(dead))
    assert "is gone" in check(beat, interval_s=10, ready=False)
    beat.write_text("{not json")
    assert "unreadable" in check(beat, interval_s=10, ready=False)


def test_the_heartbeat_thread_rewrites_its_file(tmp_path):
    hb = Heartbeat(tmp_path / "sub" / "hb.json", 0.05).start()
    try:
        assert "not consuming" in check(hb.path, interval_s=0.05, ready=True)
        hb.loop_beat()
        first = json.loads(hb.path.read_text())["time"]
        deadline = time.monotonic() + 10
        while json.loads(hb.path.read_text())["time"] == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert check(hb.path, interval_s=0.05, ready=True) is None
    finally:
        hb.stop()
        health._current = None  # the process's heartbeat: only `rlhf worker` sets one


def test_a_dead_attempts_temp_dir_is_removed_and_a_live_ones_never(tmp_path):
    settings = Settings(job_tmp_dir=tmp_path / "jobs", metrics_port=None)
    root = tmp_path / "jobs"
    # A dead attempt: made by a process that is gone (its lock went with it).
    code = ("import os, sys\n"
            "from rlhf.config import Settings\n"
            "from rlhf.trainer.workdirs import attempt_dir\n"
            "s = Settings(job_tmp_dir=sys.argv[1], metrics_port=None)\n"
            "cm = attempt_dir(s, 'job-1', 1)\n"
            "p = cm.__enter__()\n"
            "(p / 'model.safetensors').write_bytes(b'x')\n"
            "os._exit(0)  # dies mid-attempt: no clean-up\n")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    (dead,) = (root / "job-1").iterdir()
    assert (dead / "model.safetensors").exists() and (dead / LOCK_NAME).exists()
    with attempt_dir(settings, "job-2", 1) as live:
        import tempfile

        assert tempfile.gettempdir() == str(live)  # the job's temp files land in its dir
        assert clean_stale(root) == 1  # the dead one only
        assert not (root / "job-1").exists() and live.exists()
        assert clean_stale(root) == 0
    assert not live.exists() and not (root / "job-2").exists()  # an attempt cleans up after itself
    assert tempfile.gettempdir() != str(live)
    # A later attempt of a job removes its dead attempts' dirs before making its own.
    subprocess.run([sys.executable, "-c", code.replace("job-1", "job-3"), str(root)], check=True)
    with attempt_dir(settings, "job-3", 2) as second:
        assert [p.name for p in (root / "job-3").iterdir()] == [second.name]
