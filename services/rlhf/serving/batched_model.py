"""The lifecycle shared by the micro-batched model services (reward, reference): load and warm
up, serve through one MicroBatcher, swap versions beside the serving one, close.

A subclass supplies `_load_and_warm(model_dir, ref)` (its loaded-model record, which carries
`info` and `ref`) and `_candidate(loaded)` (the probe runner `check` calls on weights that are
not serving yet). Requests pin the loaded model they start on (`_loaded()`), and the batcher
never mixes two loaded models in one batch, so a swap never splits a request across versions.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

from rlhf.config import Settings
from rlhf.errors import FailedPrecondition, Unavailable
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.loading import UnsafeCheckpoint
from rlhf.serving.batcher import BatchLimits, MicroBatcher

log = logging.getLogger(__name__)


class BatchedModel:
    label = "model"  # service label: metrics, messages

    def __init__(self, settings: Settings, model_dir, ref: ModelRef, run_batch: Callable[[list], list]):
        self._settings = settings
        self._model_dir = Path(model_dir)
        self._initial_ref = ref
        self._current: Any = None
        self._swap_lock: asyncio.Lock | None = None
        self.batcher = MicroBatcher(
            self.label,
            run_batch,
            BatchLimits.from_settings(settings),
            cost=lambda it: len(it.ids),
            key=lambda it: it.loaded,
        )

    # -------------------------------------------------------------- to implement
    def _load_and_warm(self, model_dir: Path, ref: ModelRef) -> Any:
        raise NotImplementedError

    def _candidate(self, loaded: Any) -> Callable:
        """The probe runner for `check`, bound to `loaded` (not serving yet)."""
        raise NotImplementedError

    # -------------------------------------------------------------- lifecycle
    @property
    def info(self) -> ModelInfo:
        return self._loaded().info

    def health(self) -> bool:
        return self._current is not None and self.batcher.running

    async def start(self) -> None:
        if self._current is not None:
            return
        self._swap_lock = asyncio.Lock()
        self._current = await asyncio.to_thread(self._load_and_warm, self._model_dir, self._initial_ref)
        await self.batcher.start()
        log.info("%s serving %s/%s", self.label, self._current.ref.name, self._current.ref.version)

    async def load_version(self, model_dir, ref: ModelRef, check=None) -> None:
        """Load `model_dir` beside the serving model and warm it up; let `check(runner)` verify
        it (golden probes on the new weights; raising refuses the version); then serve new
        requests on it. On any failure the serving model stays, unchanged."""
        if not self.health():
            raise Unavailable(f"the {self.label} service is not serving")
        async with self._swap_lock:
            try:
                loaded = await asyncio.to_thread(self._load_and_warm, Path(model_dir), ref)
            except UnsafeCheckpoint:  # refused (the swapper says so), not a failed load
                raise
            except Exception as exc:
                log.warning("loading %s/%s failed: %s", ref.name, ref.version, exc)
                raise FailedPrecondition(f"loading {ref.name} version {ref.version} failed: {exc}") from exc
            if check is not None:
                await check(self._candidate(loaded))
            if not self.health():
                raise Unavailable(f"the {self.label} service closed while loading")
            old, self._current = self._current, loaded  # the swap: one assignment on the loop
            log.info("%s swapped %s/%s -> %s/%s", self.label, old.ref.name, old.ref.version, ref.name, ref.version)

    async def close(self) -> None:
        await self.batcher.close()
        self._current = None

    def _loaded(self) -> Any:
        current = self._current
        if current is None:
            raise Unavailable(f"the {self.label} model is not loaded")
        return current


async def run_candidate(run_batch: Callable[[list], list], items: list) -> list:
    """Run a batch off the loop and raise the first per-item error (probe replays)."""
    out = await asyncio.to_thread(run_batch, items)
    for x in out:
        if isinstance(x, BaseException):
            raise x
    return out
