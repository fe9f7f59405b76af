"""Server bootstrap shared by every model service.

Lifecycle: `start()` binds the port with health NOT_SERVING (probes answer while the model
loads); the caller loads and warms the model, then `set_serving(True)`. SIGTERM (or `drain()`)
flips health to NOT_SERVING first, then `stop(grace)` lets in-flight RPCs finish; exit code 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rlhf.config import Settings
from rlhf.errors import StartupError
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
        # A port already in use is an error: without this, gRPC's SO_REUSEPORT lets a second
        # server bind the port of a running one and the kernel splits connections between them.
        ("grpc.so_reuseport", 0),
    ]


def _read_pem(path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {setting} {path} ({exc.strerror})", setting) from exc
    if b"-----BEGIN " not in data:
        raise StartupError(f"{setting} {path} is not PEM", setting)
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings (None: plaintext). With `tls_client_ca_file` the server
    requires a client certificate signed by that CA (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (_read_pem(settings.tls_key_file, "tls_key_file"),
            _read_pem(settings.tls_cert_file, "tls_cert_file"))
    client_ca = settings.tls_client_ca_file
    try:
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read_pem(client_ca, "tls_client_ca_file") if client_ca else None,
            require_client_auth=client_ca is not None,
        )
    except Exception as exc:  # noqa: BLE001 - grpc raises plain errors on bad PEM
        raise StartupError(f"bad TLS certificate or key ({exc})", "tls_cert_file", "tls_key_file") from exc


def tls_mode(settings: Settings) -> str:
    if settings.tls_cert_file is None:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"


def bind_problem(host: str, port: int) -> tuple[str, str] | None:
    """Why `host:port` cannot be bound for listening, and whether the host or the port is at
    fault ("host" / "port"); None when it can (port 0: whether the host can).

    A probe with a plain socket: it tells the causes apart, where gRPC only says it failed."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})", "host"
    for family, type_, proto, _, addr in infos:
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is in use", "port"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host} is not an address of this machine", "host"
                if exc.errno == errno.EACCES:
                    return f"port {port} needs privileges to bind", "port"
                return f"cannot bind {host}:{port} ({exc.strerror})", "port"
    return None


def check_bindable(host: str, port: int | None, port_setting: str = "port", *, what: str = "") -> None:
    """`StartupError` naming the setting to change when `host:port` cannot be bound."""
    problem = bind_problem(host, port) if port is not None else None
    if problem is not None:
        message, culprit = problem
        raise StartupError(f"{what}{message}", port_setting if culprit == "port" else "host")


@dataclass
class ModelServer:
    """A grpc.aio server with health, reflection, the interceptor and a metrics endpoint;
    TLS / mutual TLS when the settings name a certificate (`server_credentials`), and then
    optionally a plaintext health-only port (`health_port`) for probes that cannot do TLS."""

    settings: Settings
    label: str
    bindings: list[ServiceBinding]
    port: int = 0
    metrics_port: int | None = None
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _health: HealthServicer | None = field(default=None, init=False)
    health_port: int | None = None
    _health_server: grpc.aio.Server | None = field(default=None, init=False)
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
        check_bindable(s.host, s.port)  # gRPC itself only logs that binding failed
        check_bindable(s.host, s.metrics_port, "metrics_port", what="metrics: ")
        credentials = server_credentials(s)  # before binding: a bad file fails fast
        check_bindable(s.host, s.health_port, "health_port", what="health: ")
        try:
            address = f"{s.host}:{s.port}"
            self.port = (server.add_insecure_port(address) if credentials is None
                         else server.add_secure_port(address, credentials))
        except RuntimeError:
            self.port = 0
        if self.port == 0:  # lost a race for the port since the check
            check_bindable(s.host, s.port)
            raise StartupError(f"cannot bind {s.host}:{s.port}", "port", "host")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if s.health_port is not None:
            await self._start_health_server()
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            try:
                # "[::1]" (gRPC's form of an IPv6 host) is "::1" to the HTTP server
                self._metrics_http, _ = start_http_server(s.metrics_port, addr=s.host.strip("[]"))
            except OSError as exc:
                await self._stop_grpc(None)
                check_bindable(s.host, s.metrics_port, "metrics_port", what="metrics: ")
                raise StartupError(f"metrics: cannot listen on {s.host}:{s.metrics_port} ({exc.strerror})",
                                   "metrics_port") from exc
            self.metrics_port = self._metrics_http.server_port
        log.info("%s listening on %s:%d (%s; health-only port %s; metrics %s)", self.label, s.host,
                 self.port, tls_mode(s), self.health_port, self.metrics_port)
        return self.port

    async def _start_health_server(self) -> None:
        """Plaintext port with grpc.health.v1 only (the same status): Kubernetes gRPC probes
        cannot speak TLS, and nothing but health is reachable without it."""
        s = self.settings
        health = grpc.aio.server(options=server_options(s), maximum_concurrent_rpcs=16)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health)
        try:
            self.health_port = health.add_insecure_port(f"{s.host}:{s.health_port}")
        except RuntimeError:
            self.health_port = 0
        if self.health_port == 0:
            await self._stop_grpc(None)
            raise StartupError(f"health: cannot bind {s.host}:{s.health_port}", "health_port")
        await health.start()
        self._health_server = health

    async def _stop_grpc(self, grace: float | None) -> None:
        servers = [x for x in (self._server, self._health_server) if x is not None]
        self._server = self._health_server = None
        await asyncio.gather(*(x.stop(grace) for x in servers))

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
        await self._stop_grpc(grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT → drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
