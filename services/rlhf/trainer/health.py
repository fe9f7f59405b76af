"""The worker's heartbeat file and `rlhf worker-probe`, the trainer pod's probes.

The worker's main process writes a small JSON file every `worker_heartbeat_s`:

    {"pid": 1, "time": <unix time of this write>, "ready": true, "loop": <unix time>}

- `time` comes from a thread of the main process: it goes stale only when the process is gone
  or wedged. Liveness checks it alone, so a long job, a soft shutdown (the job's last minutes)
  or a Redis outage (the job trains on and waits for Redis) never gets the pod restarted.
- `ready` / `loop` come from Celery's own event loop (a consumer bootstep's timer, see
  celery_app.py): set while the worker is connected to the broker and consuming; a reconnect,
  a shutdown or a stalled loop leaves `loop` stale or `ready` false. Readiness checks them too.

A heartbeat older than 3 × `worker_heartbeat_s` is stale. The probe imports nothing heavy (no
Celery, no torch): it reads one file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: A heartbeat (or loop beat) older than this many intervals is stale.
STALE_AFTER_INTERVALS = 3.0

_current: "Heartbeat | None" = None


class Heartbeat:
    """Writes the heartbeat file from a thread of the worker's main process."""

    def __init__(self, path: Path, interval_s: float):
        self.path = Path(path)
        self.interval_s = interval_s
        self.ready = False
        self.loop = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def loop_beat(self) -> None:
        """Called from Celery's event loop while the worker is connected and consuming."""
        self.loop = time.time()
        self.ready = True

    def not_ready(self) -> None:
        self.ready = False

    def write(self) -> None:
        body = json.dumps({"pid": os.getpid(), "time": time.time(), "ready": self.ready,
                           "loop": self.loop})
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(body)
        os.replace(tmp, self.path)  # a probe never reads half a file

    def start(self) -> "Heartbeat":
        global _current
        _current = self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.write()
                except OSError:
                    log.warning("heartbeat file %s not written", self.path, exc_info=True)

        self._thread = threading.Thread(target=loop, name="worker-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def current() -> Heartbeat | None:
    """This process's heartbeat (set by `rlhf worker`), if any."""
    return _current


def check(path: Path, *, interval_s: float, ready: bool, now: float | None = None) -> str | None:
    """None when the heartbeat at `path` says live (and, with `ready`, ready); else why not."""
    now = time.time() if now is None else now
    max_age = STALE_AFTER_INTERVALS * interval_s
    try:
        beat = json.loads(Path(path).read_text())
        written, pid = float(beat["time"]), int(beat["pid"])
    except FileNotFoundError:
        return f"no heartbeat file {path} (the worker has not started)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable heartbeat file {path}: {exc}"
    if now - written > max_age:
        return f"heartbeat is {now - written:.0f}s old (stale after {max_age:g}s)"
    if not _alive(pid):
        return f"the worker process {pid} that wrote the heartbeat is gone"
    if ready:
        if not beat.get("ready"):
            return "the worker is not consuming (connecting to the broker, or shutting down)"
        age = now - float(beat.get("loop") or 0.0)
        if age > max_age:
            return f"the worker's event loop last turned {age:.0f}s ago (stale after {max_age:g}s)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
