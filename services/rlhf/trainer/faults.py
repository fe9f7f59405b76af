"""Fault injection for tests/chaos: inert unless `RLHF_FAULT_PAUSE_AT` names a point.

The variable is a comma-separated list of `point` or `point:<model name>` (the latter for that
model's jobs only). At a named point the job's process stops itself (SIGSTOP), so a test can
inject a fault (kill the worker, kill Redis) at exactly that point whatever the machine's speed,
then SIGCONT or SIGKILL it. Points:

- `training`: a job's first training step, as it reports its progress (rlhf.trainer.jobs);
- `after_store_publish`: its version written to the store, not yet registered (publish.py);
- `after_register`: its version registered, not yet activated (publish.py).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

FAULT_PAUSE_ENV = "RLHF_FAULT_PAUSE_AT"


def fault_point(point: str, name: str) -> None:
    """Stop this process here when `RLHF_FAULT_PAUSE_AT` names `point` (for model `name`)."""
    wanted = os.environ.get(FAULT_PAUSE_ENV, "").split(",")
    if point in wanted or f"{point}:{name}" in wanted:
        log.warning("fault injection (%s): pausing process %d at %s of %s",
                    os.environ[FAULT_PAUSE_ENV], os.getpid(), point, name)
        os.kill(os.getpid(), signal.SIGSTOP)
