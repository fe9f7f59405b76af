"""The commit step of every training job: store version → registry → (optionally) active.

The store's atomic rename is the commit point. A job's version records the job id in its
manifest, so a retried job first looks for a version it already published (`find_job_version`)
and finishes that one instead of training and publishing a second.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_client.registry import Registry

from rlhf.models.store import Manifest, ModelStore
from rlhf.trainer.faults import FAULT_PAUSE_ENV, fault_point  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    """Where a job starts from: a directory, and the store version it is (None for a bare dir)."""

    model_dir: Path
    version: str | None


def resolve_base(store: ModelStore, registry: Registry, name: str, *, base_dir: str | None,
                 base_version: str | None) -> Base:
    """The starting checkpoint; a store version is checked against its manifest first."""
    if base_dir is not None:
        return Base(Path(base_dir), None)
    version = base_version or registry.active(name)
    if version is None:
        raise ValueError(f"model {name!r} has no active version and the job names no base")
    store.verify(name, version)  # TamperedCheckpoint if any file differs from the manifest
    return Base(store.path(name, version), version)


def find_job_version(store: ModelStore, name: str, job_id: str) -> Manifest | None:
    """The version of `name` that job `job_id` published, if any (newest first)."""
    for version in reversed(store.versions(name)):
        try:
            manifest = store.manifest(name, version)
        except (OSError, ValueError, TypeError):
            continue
        if manifest.job_id == job_id:
            return manifest
    return None


def publish_version(
    store: ModelStore,
    registry: Registry,
    name: str,
    src_dir: str | Path,
    *,
    parent: str | None,
    job_id: str,
    kind: str,
    metrics: dict[str, Any],
    extra: dict[str, Any],
    probes: dict[str, Any] | None = None,
) -> Manifest:
    """Write `src_dir` as the next version of `name` (atomic) and register it.

    `probes` are the golden probes services replay before they swap to the version
    (rlhf.models.probes.compute_probes on `src_dir`).

    Idempotent per job: when the job already published a version, that one is registered and
    returned and nothing new is written.
    """
    manifest = find_job_version(store, name, job_id)
    if manifest is None:
        try:
            manifest = store.publish(name, src_dir, parent=parent, job_id=job_id, kind=kind,
                                     metrics=metrics, probes=probes, extra=extra)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            code = errno.errorcode[exc.errno]
            raise StoreFull(exc.errno, f"the model store {store.root} has no room for a new "
                            f"version of {name!r} ({code}: {exc.strerror}); nothing was "
                            f"published, the active version is unchanged") from exc
        log.info("published %s %s (job %s)", name, manifest.version, job_id)
        fault_point("after_store_publish", name)
    register(registry, manifest)
    fault_point("after_register", name)
    return manifest


#: Errors of a store with no room: its disk full, a file-size limit, a quota.
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class StoreFull(OSError):
    """Publishing failed for lack of room in the model store (ENOSPC / EFBIG / EDQUOT)."""


def register(registry: Registry, manifest: Manifest) -> None:
    registry.register(manifest.name, manifest.version, manifest.created)


def maybe_activate(registry: Registry, manifest: Manifest, *, activate: bool,
                   min_eval_accuracy: float | None) -> tuple[bool, str]:
    """Activate the version when the job asks and its held-out accuracy passes the gate.

    Returns (activated, why) for the job's metrics.
    """
    if not activate:
        return False, "not requested"
    if min_eval_accuracy is not None:
        acc = manifest.metrics.get("eval_accuracy")
        if acc is None or acc < min_eval_accuracy:
            return False, f"eval_accuracy {acc} below min_eval_accuracy {min_eval_accuracy}"
    registry.activate(manifest.name, manifest.version)
    return True, "activated"
