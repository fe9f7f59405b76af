"""A model service = a loadable model + its gRPC bindings + the shared server lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Protocol

from rlhf.config import Settings
from rlhf.errors import StartupError
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.serving.metrics import set_active_model
from rlhf.serving.server import ModelServer, ServiceBinding
from rlhf.serving.swap import pinned_ref

log = logging.getLogger(__name__)


class ServedModel(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def resolve_model(settings: Settings) -> tuple[Path, ModelRef]:
    """The directory and ref a service starts on: `model_dir` (pinned), or the registry's active
    version of `model_name` in the store (followed afterwards, see ServiceApp). `StartupError`
    naming the setting to change when there is none."""
    if settings.model_name is not None:
        import redis

        from rlhf_client.registry import Registry

        name = settings.model_name
        url = settings.redis_url.get_secret_value()
        try:
            registry = Registry.from_url(url)
        except ValueError as exc:
            raise StartupError(str(exc), "redis_url") from exc
        try:
            version = registry.active(name)
        except (redis.RedisError, OSError) as exc:
            raise StartupError(f"Redis at {redact_url(url)} is unreachable ({exc})", "redis_url") from exc
        finally:
            registry.r.close()
        if version is None:
            raise StartupError(f"model {name!r} has no active version in the registry at "
                               f"{redact_url(url)}", "model_name")
        model_dir = Path(settings.store_dir) / name / version
        if not model_dir.is_dir():
            raise StartupError(f"model {name!r}: its active version {version} is not in the store "
                               f"{settings.store_dir}", "store_dir")
        return model_dir, ModelRef(name, version)
    if settings.model_dir is None:
        raise StartupError("no model to serve", "model_dir", "model_name")
    model_dir = Path(settings.model_dir)
    if not model_dir.is_dir():
        raise StartupError(f"model directory {model_dir} does not exist", "model_dir")
    if not (model_dir / "config.json").is_file():
        raise StartupError(f"model directory {model_dir} has no config.json (not a Hugging Face "
                           "model directory)", "model_dir")
    return model_dir, pinned_ref(model_dir)


def redact_url(url: str) -> str:
    """`url` without its password (for messages and logs): `rlhf_client.redis_conn.redact_url`
    (a Sentinel URL's sentinel_password too)."""
    from rlhf_client.redis_conn import redact_url as redact

    return redact(url)


class Front(Protocol):
    """Another listener beside the gRPC server on the same event loop (the policy's HTTP front):
    started before the model loads (health answers "not serving"), told when serving starts,
    drained with the gRPC server."""

    port: int | None

    async def start(self) -> int: ...

    def set_serving(self, serving: bool) -> None: ...

    async def drain(self, grace: float) -> None: ...


class ServiceApp:
    """Start: bind (health NOT_SERVING) → load + warm up → SERVING. Stop: drain → close."""

    def __init__(self, settings: Settings, label: str, model: ServedModel, bindings: list[ServiceBinding],
                 swapper=None, fronts: list[Front] | None = None):
        self.settings = settings
        self.label = label
        self.model = model
        self.server = ModelServer(settings, label, bindings)
        self.fronts: list[Front] = list(fronts or ())
        self._drained = asyncio.Event()
        self.started = False  # True once start() has returned (SERVING)
        self.follower = None
        if settings.model_name is not None and swapper is not None:
            from rlhf.serving.follow import RegistryFollower

            swapper.follows_registry = True  # GetModel says so: rollout workers rely on it
            self.follower = RegistryFollower(
                swapper, settings.redis_url.get_secret_value(), settings.model_name, settings.swap_poll_s
            )

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def http_port(self) -> int | None:
        """The bound port of the HTTP front (None when it is off)."""
        return self.fronts[0].port if self.fronts else None

    async def start(self) -> int:
        """Bind, load, serve. On any failure what was started is stopped before the error
        propagates (server shut down, engine closed), so nothing is left for the loop's end."""
        try:
            port = await self.server.start()
            for front in self.fronts:
                await front.start()
            await self._start_model()
            ref = self.model.info.ref
            set_active_model(self.label, ref.name, ref.version)
            if self.follower is not None:
                self.follower.start()
            await self.server.set_serving(True)
            for front in self.fronts:
                front.set_serving(True)
        except BaseException:
            await self._clean_up_failed_start()
            raise
        self.started = True
        log.info("%s serving %s@%s on port %d", self.label, ref.name, ref.version, port)
        return port

    async def _start_model(self) -> None:
        from rlhf.models.loading import CheckpointNotFound, UnsafeCheckpoint

        try:
            await self.model.start()
        except (UnsafeCheckpoint, CheckpointNotFound) as exc:  # the checkpoint, not the code
            source = "model_name" if self.settings.model_name is not None else "model_dir"
            raise StartupError(f"cannot load the model: {exc}", source) from exc

    async def _clean_up_failed_start(self) -> None:
        for step in (self.follower.stop if self.follower is not None else None,
                     lambda: self.drain(0), self.model.close):
            if step is None:
                continue
            try:
                await step()
            except Exception:  # noqa: BLE001 - the start-up error is the one to report
                log.debug("clean-up after a failed start failed", exc_info=True)

    async def drain(self, grace: float | None = None) -> None:
        """Every listener at once: not serving, refuse new requests, in-flight ones get `grace`."""
        grace = self.settings.drain_grace_s if grace is None else grace
        await asyncio.gather(self.server.drain(grace), *(f.drain(grace) for f in self.fronts))
        self._drained.set()

    async def stop(self, grace: float | None = None) -> None:
        if self.follower is not None:
            await self.follower.stop()
        await self.drain(grace)
        await self.model.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT → drain (gRPC and the other fronts together)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    async def run_forever(self) -> None:
        """For the CLI: start, serve until SIGTERM/SIGINT, drain, close."""
        self.install_signal_handlers()
        await self.start()
        await self._drained.wait()
        if self.follower is not None:
            await self.follower.stop()
        await self.model.close()
