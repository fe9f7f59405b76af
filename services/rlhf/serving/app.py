"""A model service = a loadable model + its gRPC bindings + the shared server lifecycle."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from rlhf.config import Settings
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
    version of `model_name` in the store (followed afterwards, see ServiceApp)."""
    if settings.model_name is not None:
        from rlhf_client.registry import Registry

        name = settings.model_name
        version = Registry.from_url(settings.redis_url.get_secret_value()).active(name)
        if version is None:
            raise SystemExit(f"--model-name {name}: the registry has no active version of it")
        model_dir = Path(settings.store_dir) / name / version
        if not model_dir.is_dir():
            raise SystemExit(f"--model-name {name}: active version {version} is not in {settings.store_dir}")
        return model_dir, ModelRef(name, version)
    if settings.model_dir is None:
        raise SystemExit("no model: pass --model DIR or --model-name NAME")
    model_dir = Path(settings.model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: not a Hugging Face model directory (no config.json)")
    return model_dir, pinned_ref(model_dir)


class ServiceApp:
    """Start: bind (health NOT_SERVING) → load + warm up → SERVING. Stop: drain → close."""

    def __init__(self, settings: Settings, label: str, model: ServedModel, bindings: list[ServiceBinding],
                 swapper=None):
        self.settings = settings
        self.label = label
        self.model = model
        self.server = ModelServer(settings, label, bindings)
        self.follower = None
        if settings.model_name is not None and swapper is not None:
            from rlhf.serving.follow import RegistryFollower

            self.follower = RegistryFollower(
                swapper, settings.redis_url.get_secret_value(), settings.model_name, settings.swap_poll_s
            )

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    async def start(self) -> int:
        port = await self.server.start()
        await self.model.start()
        ref = self.model.info.ref
        set_active_model(self.label, ref.name, ref.version)
        if self.follower is not None:
            self.follower.start()
        await self.server.set_serving(True)
        log.info("%s serving %s@%s on port %d", self.label, ref.name, ref.version, port)
        return port

    async def stop(self, grace: float | None = None) -> None:
        if self.follower is not None:
            await self.follower.stop()
        await self.server.drain(grace)
        await self.model.close()

    async def run_forever(self) -> None:
        """For the CLI: start, serve until SIGTERM/SIGINT, drain, close."""
        self.server.install_signal_handlers()
        await self.start()
        await self.server.wait_stopped()
        if self.follower is not None:
            await self.follower.stop()
        await self.model.close()
