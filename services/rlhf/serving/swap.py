"""Model version swaps shared by every service (LoadVersion and, later, registry following).

A swap to a store version: verify the manifest's checksums, load the weights beside the serving
ones, replay the version's golden probes on them, switch only when they match. A swappable
target (a policy engine, a scorer) has `info` and `load_version(model_dir, ref, check)`. On any
failure the old version keeps serving, unchanged, and the caller gets FAILED_PRECONDITION with
the reason. Swaps are serialised: one at a time per service.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rlhf.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.loading import UnsafeCheckpoint
from rlhf.models.probes import ProbeMismatch, check_probes
from rlhf.models.store import verify
from rlhf.serving.metrics import MODEL_SWAPS, set_active_model

log = logging.getLogger(__name__)


class Swappable(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    async def load_version(self, model_dir: Path, ref: ModelRef, check=None) -> None:
        """Load beside the serving version; await `check(runner)` on the candidate (raising
        refuses it); switch atomically. On any failure the old version keeps serving."""
        ...


@dataclass(frozen=True)
class SwapResult:
    previous: ModelRef
    current: ModelRef
    seconds: float


def pinned_ref(model_dir: Path) -> ModelRef:
    """The ref a directory is served under: its manifest's, else (dir name, pinned-<hash>)."""
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        return ModelRef(str(data["name"]), str(data["version"]))
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("config.json")):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))  # first MiB: cheap and enough to tell versions apart
    return ModelRef(model_dir.resolve().name, f"pinned-{digest.hexdigest()[:12]}")


class Swapper:
    """Swaps `target` to versions found in `<store_dir>/<name>/<version>/`."""

    def __init__(self, target: Swappable, store_dir: Path, service_label: str, dtype: str = "float32"):
        self.target = target
        self.store_dir = Path(store_dir)
        self.label = service_label
        self.dtype = dtype
        self._lock = asyncio.Lock()
        self.follows_registry = False  # set by ServiceApp when a RegistryFollower drives it

    def version_dir(self, name: str, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise InvalidArgument("version", f"not a version id: {version!r}")
        path = self.store_dir / name / version
        if not path.is_dir():
            raise NotFound(f"version {version!r} of model {name!r} is not in the store")
        return path

    async def load_version(self, version: str) -> SwapResult:
        async with self._lock:
            previous = self.target.info.ref
            path = self.version_dir(previous.name, version)
            started = time.perf_counter()
            try:
                manifest = verify(path)  # checksums of every file, safetensors only
                check = functools.partial(check_probes, manifest.probes, dtype=self.dtype)
                await self.target.load_version(path, ModelRef(previous.name, version), check)
            except ServiceError:
                MODEL_SWAPS.labels(self.label, "failed").inc()
                raise
            except (UnsafeCheckpoint, ProbeMismatch) as exc:
                MODEL_SWAPS.labels(self.label, "refused").inc()
                log.warning("swap of %s to %s refused: %s", previous.name, version, exc)
                raise FailedPrecondition(f"version {version!r} refused: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old version
                MODEL_SWAPS.labels(self.label, "failed").inc()
                log.warning("swap of %s to %s failed: %s", previous.name, version, exc)
                raise FailedPrecondition(f"swap to version {version!r} failed: {exc}") from exc
            MODEL_SWAPS.labels(self.label, "ok").inc()
            current = self.target.info.ref
            set_active_model(self.label, current.name, current.version)
            return SwapResult(previous, current, time.perf_counter() - started)
