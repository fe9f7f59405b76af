"""Server bootstrap shared by every model service.

Lifecycle: `start()` binds the port with health NOT_SERVING (probes answer while the model
loads); the caller loads and warms the model, then `set_serving(True)`. SIGTERM (or `drain()`)
flips health to NOT_SERVING first, then `stop(grace)` lets in-flight RPCs finish; exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rlhf.config import Settings
from rlhf.serving.interceptors import ServiceInterceptor

log = logging.getLogger(__name__)


@dataclass
class ServiceBinding:
    """One gRPC service to mount: its full name, servicer and generated `add_*_to_server`."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    admin_methods: tuple[str, ...] = ()  # short names, e.g. ("LoadVersion",)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Let clients ping every 10 s without GOAWAY too_many_pings (clients use 30 s).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass
class ModelServer:
    """A grpc.aio server with health, reflection, the interceptor and a metrics endpoint."""

    settings: Settings
    label: str
    bindings: list[ServiceBinding]
    port: int = 0
    metrics_port: int | None = None
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _health: HealthServicer | None = field(default=None, init=False)
    _metrics_http: Any = field(default=None, init=False)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def start(self) -> int:
        s = self.settings
        admin = {
            f"/{b.full_name}/{m}" for b in self.bindings for m in b.admin_methods
        }
        interceptor = ServiceInterceptor(
            self.label,
            auth_token=s.auth_token.get_secret_value() if s.auth_token else None,
            admin_token=s.admin_token.get_secret_value() if s.admin_token else None,
            admin_methods=admin,
        )
        server = grpc.aio.server(
            interceptors=[interceptor],
            options=server_options(s),
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        for b in self.bindings:
            b.add_to_server(b.servicer, server)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [b.full_name for b in self.bindings]
        if s.reflection:
            reflection.enable_server_reflection(
                [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME],
                server,
            )
        self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {s.host}:{s.port}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(s.metrics_port, addr=s.host)
            self.metrics_port = self._metrics_http.server_port
        log.info("%s listening on %s:%d (metrics %s)", self.label, s.host, self.port, self.metrics_port)
        return self.port

    async def _set_all(self, status) -> None:
        assert self._health is not None
        for name in ["", *(b.full_name for b in self.bindings)]:
            await self._health.set(name, status)

    async def set_serving(self, serving: bool) -> None:
        await self._set_all(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then stop accepting RPCs and give in-flight ones `grace` seconds."""
        if self._server is None:
            return
        await self.set_serving(False)
        grace = self.settings.drain_grace_s if grace is None else grace
        log.info("%s draining (grace %.1fs)", self.label, grace)
        await self._server.stop(grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        self._server = None
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT → drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
