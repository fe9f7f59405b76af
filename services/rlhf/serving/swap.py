"""Model version swaps shared by every service (LoadVersion and, later, registry following).

A swap to a store version: verify the manifest's checksums, load the weights beside the serving
ones, replay the version's golden probes on them, switch only when they match. A swappable
target (a policy engine, a scorer) has `info` and `load_version(model_dir, ref, check)`. On any
failure the old version keeps serving, unchanged, and the caller gets FAILED_PRECONDITION with
the reason. Swaps are serialised: one at a time per service.

The checksums are computed while the target loads (hashing drops the GIL; the directory's
listing and formats are checked before anything is read): `check` first waits for them, then
replays the probes, so a version still serves only after both passed — the same verification,
off the critical path. What each phase cost (event, verify, load, warm-up, probes, switch) is
logged per swap, kept in `SwapResult.phases` and exported as `rlhf_model_swap_phase_seconds`;
targets time their own steps with `swap_phase("load")` / `swap_phase("warm-up")` /
`swap_phase("drain")` (vLLM in place: the gate waiting for the calls in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rlhf.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.loading import UnsafeCheckpoint
from rlhf.models.probes import ProbeMismatch, check_probes
from rlhf.models.store import verify_checksums, verify_listing
from rlhf.serving.metrics import MODEL_SWAP_PHASE, MODEL_SWAPS, set_active_model

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
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES)


#: The phases of a swap, in order. `verify` is the checksum time that was *not* hidden behind the
#: load (the wait in `check`); `verify-total` (logged, not a phase) is the whole hashing time.
PHASES = ("event", "verify", "load", "warm-up", "probes", "drain", "switch")
_phases: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("swap_phases", default=None)


@contextlib.contextmanager
def swap_phase(name: str):
    """Add the time of the block to phase `name` of the swap running in this context (threads
    started with `asyncio.to_thread` inherit it); nothing outside a swap."""
    phases = _phases.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


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
        # a directory name: no NUL (os.stat raises ValueError), at most NAME_MAX bytes (OSError
        # ENAMETOOLONG): both reached the caller as INTERNAL before (found by tests/fuzz)
        if (not version or "/" in version or "\x00" in version or version.startswith(".")
                or len(version.encode()) > 255):
            raise InvalidArgument("version", f"not a version id: {version[:80]!r}")
        path = self.store_dir / name / version
        if not path.is_dir():
            raise NotFound(f"version {version!r} of model {name!r} is not in the store")
        return path

    async def load_version(self, version: str, *, event_time: float | None = None) -> SwapResult:
        """Swap to `version`; `event_time` (wall clock, the registry event's `time`) adds the
        event's delivery to the breakdown."""
        received = time.time()
        async with self._lock:
            previous = self.target.info.ref
            path = self.version_dir(previous.name, version)
            started = time.perf_counter()
            phases: dict[str, float] = {}
            if event_time is not None:
                phases["event"] = max(0.0, received - event_time)
            token = _phases.set(phases)
            hashing: asyncio.Future | None = None
            try:
                manifest = verify_listing(path)  # exactly the manifest's files, safe formats only
                hashing = asyncio.ensure_future(asyncio.to_thread(self._hash, path, manifest))

                async def check(run) -> None:
                    with swap_phase("verify"):  # checksums of every file, before anything
                        phases["verify-total"] = await asyncio.shield(hashing)
                    with swap_phase("probes"):
                        await check_probes(manifest.probes, run, dtype=self.dtype)

                try:
                    await self.target.load_version(path, ModelRef(previous.name, version), check)
                except BaseException:
                    await self._settle(hashing)  # a tampered file is refused as tampered
                    raise
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
            finally:
                _phases.reset(token)
            seconds = time.perf_counter() - started
            inside = sum(v for k, v in phases.items() if k not in ("event", "verify-total"))
            phases["switch"] = max(0.0, seconds - inside)
            MODEL_SWAPS.labels(self.label, "ok").inc()
            for name in PHASES:
                if name in phases:
                    MODEL_SWAP_PHASE.labels(self.label, name).observe(phases[name])
            current = self.target.info.ref
            set_active_model(self.label, current.name, current.version)
            log.info("swap %s -> %s in %.3fs: %s", previous.version, current.version, seconds,
                     " ".join(f"{k}={phases[k]:.4f}" for k in (*PHASES, "verify-total") if k in phases))
            return SwapResult(previous, current, seconds, dict(phases))

    @staticmethod
    def _hash(path: Path, manifest) -> float:
        started = time.perf_counter()
        verify_checksums(path, manifest)
        return time.perf_counter() - started

    @staticmethod
    async def _settle(hashing: asyncio.Future | None) -> None:
        """After a failed load: raise the checksum failure if there is one (else return)."""
        if hashing is None:
            return
        try:
            await asyncio.shield(hashing)
        except UnsafeCheckpoint:
            raise
        except Exception:  # noqa: BLE001 - the load's own error is the one to report
            pass
