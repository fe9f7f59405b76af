"""Each job attempt's own temp directory, so a dead attempt's checkpoints never pile up.

    <root>/<job id>/a<attempt>-<random>/      root = settings.job_tmp_dir or <temp>/rlhf-jobs
        .lock                                  held (flock) by the attempt's process while it lives

An attempt trains into its directory (`attempt_dir` also makes it the process's temp dir for the
attempt, so `tempfile.TemporaryDirectory()` in a job function lands there too) and removes it
when it ends. A process killed mid-job (SIGKILL, OOM, a pool child cancelled at the end of a soft
shutdown) cannot clean up; its directory stays behind with a lock nobody holds, because the
kernel drops a process's locks when it dies. `clean_stale` removes exactly those: a directory
whose lock it can take (its owner is gone), or that never got a lock and is older than a minute.
It is safe to run at any time from any process on the machine: a live attempt's directory is
never touched. A new attempt of the job runs it on its job's directory first, and the worker's
main process on the whole root at start-up and on every reaper pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf.config import Settings

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
#: A directory without a lock file this old is a half-made one of a dead attempt.
_UNLOCKED_GRACE_S = 60.0


def tmp_root(settings: "Settings") -> Path:
    """Where attempts make their directories."""
    if settings.job_tmp_dir is not None:
        return Path(settings.job_tmp_dir)
    return Path(tempfile.gettempdir()) / "rlhf-jobs"


@contextlib.contextmanager
def attempt_dir(settings: "Settings", job_id: str, attempt: int) -> Iterator[Path]:
    """This attempt's directory, locked while it runs and removed after it (stale directories
    of the job's earlier, dead attempts are removed first)."""
    job_dir = tmp_root(settings) / job_id
    removed = clean_stale(job_dir.parent, only=job_id)
    if removed:
        log.info("job %s: removed %d temp dir(s) of dead attempts", job_id, removed)
    for _ in range(3):  # a concurrent clean_stale may remove the empty job dir in between
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            path = Path(tempfile.mkdtemp(prefix=f"a{attempt}-", dir=job_dir))
            break
        except FileNotFoundError:
            continue
    else:
        path = Path(tempfile.mkdtemp(prefix=f"a{attempt}-", dir=job_dir))
    fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    previous, tempfile.tempdir = tempfile.tempdir, str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # only when empty


def clean_stale(root: Path, *, only: str | None = None) -> int:
    """Remove the attempt directories under `root` whose process is gone (their lock is free);
    `only`: just that job's. Returns how many were removed."""
    removed = 0
    try:
        job_dirs = [root / only] if only is not None else [p for p in root.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return 0
    for job_dir in job_dirs:
        try:
            attempts = [p for p in job_dir.iterdir() if p.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for path in attempts:
            if _remove_if_stale(path):
                removed += 1
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # only when empty
    return removed


def _remove_if_stale(path: Path) -> bool:
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # never locked: a dead attempt's half-made dir, or one just made
        try:
            young = time.time() - path.stat().st_mtime < _UNLOCKED_GRACE_S
        except FileNotFoundError:
            return False
        if young:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its attempt is alive
        log.info("removing %s: its attempt's process is gone", path)
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(fd)
